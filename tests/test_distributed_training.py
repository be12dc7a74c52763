"""What makes N processes train like one, checked in one process: per-patch RNGs, global loss sums, scaler, stop."""

import numpy as np
import pytest
import torch

from napari_unet.augment import AugmentConfig
from napari_unet.config import ModelConfig, TrainConfig
from napari_unet.distributed import shard
from napari_unet.synthetic import make_nuclei, paint_sparse_labels
from napari_unet.training import (
    _grad_scaler,
    _loss,
    _loss_terms,
    _use_grad_scaler,
    prepare_training_data,
    train,
)
from napari_unet.training_data import Sampler

TINY = ModelConfig(depth=2, base_filters=4, padding="same", batch_norm=False)


@pytest.fixture(scope="module")
def planes():
    img, gt = make_nuclei((96, 96), seed=2)
    return prepare_training_data(img, paint_sparse_labels(gt, n_cells=5, seed=2), seed=0).planes


def _batch(sampler, seed, step, js):
    return sampler.sample(len(js), [np.random.default_rng([seed, step, j]) for j in js])


@pytest.mark.parametrize("augment", [True, False])
def test_global_batch_is_the_same_for_any_number_of_ranks(planes, augment):
    sampler = Sampler(planes, 48, 48, np.random.default_rng(0), AugmentConfig() if augment else None)
    batch = 5
    whole = _batch(sampler, 7, 3, list(range(batch)))
    for world in (2, 3):
        parts = [_batch(sampler, 7, 3, shard(range(batch), r, world)) for r in range(world)]
        order = [j for r in range(world) for j in shard(range(batch), r, world)]
        for k, arr in enumerate(whole):  # images, targets, weights
            joined = np.concatenate([p[k] for p in parts])
            np.testing.assert_array_equal(joined, arr[order])
    # A different step (or seed) is a different batch.
    assert not np.array_equal(_batch(sampler, 7, 4, [0])[0], whole[0][:1])
    assert not np.array_equal(_batch(sampler, 8, 3, [0])[0], whole[0][:1])


def test_loss_sums_over_shares_give_the_global_weighted_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 8, 8, generator=g)
    target = torch.randint(0, 3, (4, 8, 8), generator=g)
    target[0, :4] = 255  # unlabelled pixels
    weight = torch.rand(4, 8, 8, generator=g) * (target != 255)
    weight[3] *= 20  # one patch near touching cells weighs much more
    for w in (weight, None):
        whole = _loss(logits, target, w)
        terms = [_loss_terms(logits[s], target[s], None if w is None else w[s]) for s in (slice(0, 2), slice(2, 4))]
        global_mean = sum(n for n, _ in terms) / sum(d for _, d in terms)
        torch.testing.assert_close(global_mean, whole)
        # The mean of the two shares' own means is NOT the global mean: why the normaliser is all-reduced.
        per_share = sum(n / d for n, d in terms) / 2
        assert abs(float(per_share - whole)) > 1e-3


def test_grad_scaler_only_for_fp16_on_cuda():
    assert _use_grad_scaler("fp16", "cuda")
    assert not _use_grad_scaler("bf16", "cuda") and not _use_grad_scaler("fp32", "cuda")
    assert not _use_grad_scaler("fp16", "cpu") and not _use_grad_scaler("bf16", "cpu")
    scaler = _grad_scaler("fp16", "cpu")
    assert not scaler.is_enabled()
    loss = torch.tensor(2.0, requires_grad=True)
    assert scaler.scale(loss) is loss  # disabled: a pass-through


def test_stop_callable_ends_training_after_that_step(planes):
    img, gt = make_nuclei((96, 96), seed=2)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) >= 3

    cfg = TrainConfig(iterations=50, max_time=None, patch_size=32, batch_size=2, precision="fp32", threads=1)
    events = list(train(img, paint_sparse_labels(gt, n_cells=5, seed=2), cfg, model_config=TINY, stop=stop))
    assert events[-1].iteration == 3 and len(calls) == 3
    result = events[-1].result
    assert result.metadata["training"]["status"] == "stopped" and result.metadata["training"]["processes"] == 1

