"""The painted-cell check (napari_unet.quality), colour images with the one-channel packaged model."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet import quality
from napari_unet._sample_data import SAMPLE_MODEL_PATH, cells_sample
from napari_unet.config import PredictConfig, TrainConfig
from napari_unet.data import LUMINANCE, normalize, to_grey
from napari_unet.inference import predict_all
from napari_unet.io import load_model
from napari_unet.quality import PaintedCheck, match_objects, painted_check
from napari_unet.synthetic import make_nuclei, paint_sparse_labels
from napari_unet.training import prepare_training_data, train

needs_model = pytest.mark.skipif(not SAMPLE_MODEL_PATH.is_file(), reason="no packaged model in this installation")


def _drain(gen):
    """All events, and the result (every event carries the same TrainResult)."""
    events = list(gen)
    return events, events[-1].result


def test_match_objects_gives_each_reference_object_its_best_iou():
    truth = np.zeros((10, 10), int)
    truth[0:4, 0:4] = 1  # 16 px
    truth[6:10, 6:10] = 2  # 16 px, predicted half
    truth[0:2, 8:10] = 3  # missed
    pred = np.zeros((10, 10), int)
    pred[0:4, 0:4] = 7  # exact
    pred[6:10, 6:8] = 9  # 8 px inside object 2
    iou = match_objects(truth, pred)
    np.testing.assert_allclose(iou, [1.0, 0.5, 0.0])
    assert match_objects(truth, np.zeros_like(pred)).tolist() == [0.0, 0.0, 0.0]


def test_check_counts_and_message():
    good, bad = PaintedCheck(5, 4, 0), PaintedCheck(5, 2, 3)
    assert good.ok and not bad.ok and PaintedCheck(0, 0, 0).ok
    assert good.message().startswith("check on the painted cells: 4 of 5 found again")
    assert "train again" not in good.message()
    assert "2 of 5" in bad.message() and "3 object(s) on painted background" in bad.message()
    assert "train again" in bad.message()


@needs_model
def test_the_packaged_model_finds_the_painted_sample_cells():
    (image, _, _), (labels, _, _) = cells_sample()
    model, meta = load_model(SAMPLE_MODEL_PATH)
    check = painted_check(model, meta, [(image[None].astype(np.float32), labels)])
    assert check.painted == len(np.unique(labels[labels >= 2])) == 5
    assert check.recovered >= 3, check
    # The same counts from the normalised plane training keeps: normalising twice changes nothing.
    again = painted_check(model, meta, [(normalize(image)[None], labels)])
    assert (again.painted, again.recovered) == (check.painted, check.recovered)


def test_an_untrained_network_fails_the_check_and_training_says_so(small_cells):
    image, labels = small_cells
    from napari_unet.config import ModelConfig

    cfg = TrainConfig(iterations=1, max_time=None, patch_size=32, batch_size=1, precision="fp32", seed=0,
                      threads=1, ema=0.0)
    events, result = _drain(train(image, labels, cfg, model_config=ModelConfig(depth=2, base_filters=4)))
    check = result.metadata["training"]["painted_check"]
    assert check["painted"] == len(np.unique(labels[labels >= 2]))
    assert check["recovered"] < check["painted"] / 2
    last = events[-1]
    assert last.warning and last.message.startswith("check on the painted cells") and last.loss is None
    assert all(not e.warning for e in events[:-1])
    off = dict(cfg.to_dict(), check_painted=False)
    events, result = _drain(train(image, labels, TrainConfig(**off), model_config=ModelConfig(depth=2, base_filters=4)))
    assert result.metadata["training"]["painted_check"] is None and not any(e.warning for e in events)


def test_semantic_training_has_no_painted_cell_check(small_cells):
    image, labels = small_cells
    cfg = TrainConfig(mode="semantic", iterations=1, max_time=None, patch_size=32, batch_size=1,
                      precision="fp32", threads=1)
    events, result = _drain(train(image, np.minimum(labels, 2), cfg))
    assert result.metadata["training"]["painted_check"] is None and not any(e.warning for e in events)


def _rgb(seed=5):
    """A colour image (dark-violet nuclei on a pale background, like H&E) and painted labels."""
    image, truth = make_nuclei((96, 96), radius=(5, 9), seed=seed)
    grey = image.astype(np.float32) / image.max()
    rgb = np.stack([1 - 0.5 * grey, 1 - 0.8 * grey, 1 - 0.3 * grey], axis=-1)
    return (255 * rgb).astype(np.uint8), paint_sparse_labels(truth, n_cells=4, seed=seed, exclude_border=4)


def test_training_data_for_a_one_channel_model_from_rgb_is_grey():
    rgb, labels = _rgb()
    data = prepare_training_data(rgb, labels, model_channels=1)
    assert data.in_channels == 1 and data.planes[0].image.shape == (1, 96, 96)
    want = normalize(rgb[..., :3].astype(np.float32) @ LUMINANCE)
    np.testing.assert_allclose(data.planes[0].image[0], want, atol=1e-5)
    assert any("trained on as grey" in m for m in data.messages)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=-1)  # alpha is dropped
    np.testing.assert_allclose(prepare_training_data(rgba, labels, model_channels=1).planes[0].image[0], want,
                               atol=1e-5)
    # A new network takes the colours; three planes first are channels, not a colour image, as in prediction.
    assert prepare_training_data(rgb, labels).in_channels == 3
    first = np.moveaxis(rgb, -1, 0)
    assert prepare_training_data(first, labels, model_channels=1).in_channels == 3
    assert prepare_training_data(first, labels, model_channels=1, channel_axis=0).in_channels == 1


@needs_model
def test_fine_tuning_the_packaged_model_on_rgb(tmp_path):
    rgb, labels = _rgb()
    cfg = TrainConfig(iterations=2, max_time=None, patch_size=32, batch_size=2, precision="fp32", threads=1)
    events, result = _drain(train(rgb, labels, cfg, init_from=SAMPLE_MODEL_PATH))
    assert result.model.config.in_channels == 1
    assert result.metadata["training"]["painted_check"]["painted"] == 4
    colour = predict_all(result.model, rgb, PredictConfig(), result.metadata)
    grey = predict_all(result.model, to_grey(rgb)[..., 0], PredictConfig(), result.metadata)
    assert colour.labels.shape == (96, 96)
    np.testing.assert_array_equal(colour.labels, grey.labels)


def test_a_size_one_channel_axis_for_a_one_channel_model(tiny_model_file):
    path = tiny_model_file()
    image = make_nuclei((48, 48), seed=1)[0]
    plain = predict_all(path, image, PredictConfig(output="semantic", probabilities=True))
    axis0 = predict_all(path, image[None], PredictConfig(output="semantic", probabilities=True,
                                                         channel_axis=0))
    assert axis0.labels.shape == (48, 48)
    np.testing.assert_allclose(axis0.probabilities, plain.probabilities, atol=1e-6)


def _fine_tune_config(**kw):
    return TrainConfig(**{**dict(iterations=3, max_time=None, patch_size=32, batch_size=2, precision="fp32",
                                 threads=1, seed=0), **kw})


@needs_model
def test_the_check_judges_the_kept_weights_and_leaves_them_alone(small_cells):
    image, labels = small_cells
    _, checked = _drain(train(image, labels, _fine_tune_config(), init_from=SAMPLE_MODEL_PATH))
    _, plain = _drain(train(image, labels, _fine_tune_config(check_painted=False), init_from=SAMPLE_MODEL_PATH))
    # The same weights with and without the check (blended with the start and output-shifted once).
    a, b = checked.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    again = painted_check(checked.model, checked.metadata, [(image[None].astype(np.float32), labels)])
    assert checked.metadata["training"]["painted_check"] == again.to_dict()
    assert checked.metadata["training"]["status"] == "finished"


def test_a_failing_check_keeps_the_run(small_cells, monkeypatch):
    image, labels = small_cells

    def broken(*args, **kwargs):
        raise MemoryError("out of memory even with the smallest tile")

    monkeypatch.setattr(quality, "painted_check", broken)
    events, result = _drain(train(image, labels, _fine_tune_config()))
    assert events[-1].warning and events[-1].message == "painted-cell check skipped: out of memory even with the " \
                                                        "smallest tile"
    assert result.model is not None and result.metadata["training"]["status"] == "finished"
    assert result.metadata["training"]["painted_check"] is None


def test_a_stopped_run_is_not_checked(small_cells):
    image, labels = small_cells
    events, result = _drain(train(image, labels, _fine_tune_config(iterations=50), stop=lambda: True))
    assert result.metadata["training"]["status"] == "stopped" and events[-1].iteration == 1
    assert result.metadata["training"]["painted_check"] is None and not any(e.warning for e in events)


def test_uncertainty_is_the_normalised_entropy():
    p = np.zeros((3, 2, 2), np.float32)
    p[0, 0, 0] = 1.0  # certain
    p[:, 0, 1] = 1 / 3  # all equal
    p[1:, 1, 0] = 0.5  # two classes tie
    p[0, 1, 1], p[1, 1, 1] = 0.9, 0.1
    u = quality.uncertainty(p)
    assert u.shape == (2, 2) and u.dtype == np.float32
    np.testing.assert_allclose(u, [[0.0, 1.0], [np.log(2) / np.log(3), 0.325 / np.log(3)]], atol=1e-3)


def test_where_to_paint_prefers_broad_doubt_over_outlines_and_skips_painted_places():
    u = np.zeros((120, 160), np.float32)
    yy, xx = np.mgrid[:120, :160]
    for cy, cx in [(20, 20), (20, 60), (90, 130)]:  # confident cells: only their outlines are unsure
        ring = np.abs(np.hypot(yy - cy, xx - cx) - 10) < 1
        u[ring] = 0.7
    u[50:70, 80:100] = 0.6  # a cell-sized patch the network hesitates over
    u[90:110, 20:40] = 0.8  # as unsure, but already painted there
    painted = np.zeros(u.shape, np.uint8)
    painted[85:115, 15:45] = 1
    places = quality.where_to_paint(u, cell_area=300.0, n=3, painted=painted)
    assert 1 <= len(places) <= 3
    y, x = places[0].centre
    assert 50 <= y < 70 and 80 <= x < 100
    assert all(not painted[p.centre] for p in places)
    assert [p.score for p in places] == sorted((p.score for p in places), reverse=True)
    assert quality.where_to_paint(np.zeros((30, 30), np.float32), n=5) == []


def test_masking_the_predicted_outlines_leaves_the_doubt_inside_cells():
    labels = np.zeros((100, 100), np.int32)
    yy, xx = np.mgrid[:100, :100]
    labels[np.hypot(yy - 25, xx - 25) < 12] = 1  # a confident cell: unsure along its outline only
    labels[(np.abs(yy - 70) < 12) & (np.abs(xx - 70) < 20)] = 2  # a merged pair: unsure inside, at the gap
    from skimage.segmentation import find_boundaries

    u = np.where(find_boundaries(labels, mode="thick"), 0.9, 0.0).astype(np.float32)
    u[(np.abs(yy - 70) < 10) & (np.abs(xx - 70) < 3)] = 0.5  # the gap between the two merged cells
    plain = quality.where_to_paint(u, cell_area=300.0, n=1)
    masked = quality.where_to_paint(u, cell_area=300.0, n=1, labels=labels)
    # Unmasked, the outlines win (the long outline of the merged pair or the confident cell's);
    # masked, the gap inside the merged pair does.
    assert np.hypot(*np.subtract(plain[0].centre, (70, 70))) > 10
    y, x = masked[0].centre
    assert labels[y, x] == 2 and abs(x - 70) <= 10 and abs(y - 70) <= 10


@needs_model
def test_the_painted_check_always_runs_on_torch(monkeypatch):
    """It runs after every training: it must never convert the freshly trained network for OpenVINO
    (a 4 Mpx painted image would qualify for backend='auto')."""
    from napari_unet import inference

    seen = []
    real = inference._PredictJob.__init__

    def spy(self, model, image, config, *a, **k):
        seen.append(config.backend)
        return real(self, model, image, config, *a, **k)

    monkeypatch.setattr(inference._PredictJob, "__init__", spy)
    (image, _, _), (labels, _, _) = cells_sample()
    model, meta = load_model(SAMPLE_MODEL_PATH)
    painted_check(model, meta, [(image[None].astype(np.float32), labels)])
    assert seen and set(seen) == {"torch"}
