"""Process-wide tuning (napari_unet.tuning): each setting is undone exactly where it promises to be."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import numpy as np
import pytest

from napari_unet import tuning


def test_torch_threads_are_read_once(monkeypatch):
    monkeypatch.setattr(tuning, "_TORCH_THREADS", None)
    assert tuning.torch_default_threads(SimpleNamespace(get_num_threads=lambda: 4)) == 4
    assert tuning.torch_default_threads(SimpleNamespace(get_num_threads=lambda: 2)) == 4


def test_torch_threads_restored_exactly_also_after_an_error():
    import torch

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with tuning.torch_threads(torch, target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), tuning.torch_threads(torch, target):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with tuning.torch_threads(torch, None):  # nothing asked: nothing touched
        assert torch.get_num_threads() == before


def test_training_puts_the_thread_count_back_when_stopped_early():
    import torch

    from napari_unet.config import TrainConfig
    from napari_unet.synthetic import make_nuclei, paint_sparse_labels
    from napari_unet.training import train

    image, truth = make_nuclei((96, 96), seed=1)
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    gen = train(image, paint_sparse_labels(truth, n_cells=3, seed=1),
                TrainConfig(iterations=50, threads=target, patch_size=64, batch_size=2, check_painted=False))
    next(gen)
    assert torch.get_num_threads() == target
    gen.close()  # Stop
    assert torch.get_num_threads() == before


def test_gc_jobs_freeze_and_the_last_one_restores():
    thresholds = gc.get_threshold()
    tuning.gc_job_started()
    tuning.gc_job_started()
    try:
        assert gc.get_threshold()[2] > thresholds[2] and gc.get_freeze_count() > 0
        tuning.gc_job_ended()
        assert gc.get_threshold()[2] > thresholds[2]  # one job still runs
    finally:
        tuning.gc_job_ended()
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0
    tuning.gc_job_ended()  # one end too many changes nothing
    assert gc.get_threshold() == thresholds


def test_gc_paused_reenables_collection():
    assert gc.isenabled()
    with tuning.gc_paused():
        assert not gc.isenabled()
        np.zeros(3)
    assert gc.isenabled()
