"""Cells resized to the size the model knows: the factor, training data, prediction, model files, CLI."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet._sample_data import SAMPLE_MODEL_PATH
from napari_unet.cli import main
from napari_unet.config import ConfigError, PredictConfig, TrainConfig
from napari_unet.data import (
    SCALE_LIMITS,
    SCALE_TOLERANCE,
    painted_area,
    rescale_factor,
    resize_plane,
)
from napari_unet.inference import predict_all
from napari_unet.io import ModelFileError, load_model, read_model_metadata, save_model
from napari_unet.synthetic import make_nuclei, paint_sparse_labels
from napari_unet.training import prepare_training_data, train

needs_model = pytest.mark.skipif(not SAMPLE_MODEL_PATH.is_file(), reason="no packaged model in this installation")


@pytest.fixture(scope="module")
def small_cells():
    """Nuclei of radius 4-6 px (area ~80): far smaller than the packaged model's cells."""
    image, truth = make_nuclei((96, 96), radius=(4, 6), seed=3)
    return image, paint_sparse_labels(truth, n_cells=5, seed=3), truth


def test_the_factor_matches_areas_within_limits():
    assert rescale_factor(100.0, 400.0) == pytest.approx(2.0)
    assert rescale_factor(400.0, 100.0) == pytest.approx(0.5)
    # Close enough: not resized.
    assert rescale_factor(400.0, 400.0 * SCALE_TOLERANCE ** 2 * 0.99) == 1.0
    assert rescale_factor(400.0, 400.0 / SCALE_TOLERANCE ** 2 * 1.01) == 1.0
    # Clipped, unknown sizes, and never below the smallest trainable image.
    assert rescale_factor(1.0, 1e6) == SCALE_LIMITS[1]
    assert rescale_factor(1e6, 1.0) == SCALE_LIMITS[0]
    assert rescale_factor(None, 400.0) == rescale_factor(100.0, None) == 1.0
    assert rescale_factor(1600.0, 100.0, min_side=40) == pytest.approx(16 / 40)


def test_painted_area_is_the_median_object_area_over_planes():
    a = np.zeros((10, 10), np.uint8)
    a[:2, :2] = 2  # 4 px
    a[5:8, 5:8] = 3  # 9 px
    a[9, 9] = 1  # background is no object
    b = np.zeros((10, 10), np.uint8)
    b[:5, :5] = 2  # 25 px: the same id on another plane is another object
    assert painted_area([a, b]) == 9.0
    assert painted_area([np.ones((4, 4), np.uint8)]) is None


def test_resize_keeps_ids_and_channels():
    lab = np.zeros((20, 30), np.uint16)
    lab[2:10, 3:12] = 7
    lab[12:18, 15:28] = 9
    up = resize_plane(lab, (40, 60), labels=True)
    assert up.shape == (40, 60) and up.dtype == np.uint16 and set(np.unique(up)) == {0, 7, 9}
    assert (up == 7).sum() == pytest.approx(4 * (lab == 7).sum(), rel=0.1)
    img = np.random.default_rng(0).random((3, 20, 30)).astype(np.float32)
    down = resize_plane(img, (10, 15), channel_axis=0)
    assert down.shape == (3, 10, 15) and down.dtype == np.float32
    assert 0 <= down.min() and down.max() <= 1
    last = resize_plane(np.moveaxis(img, 0, -1), (10, 15), channel_axis=-1)
    np.testing.assert_allclose(np.moveaxis(last, -1, 0), down, atol=1e-6)


def test_training_data_resized_to_the_target_cell_area(small_cells):
    image, painted, _ = small_cells
    plain = prepare_training_data(image, painted)
    assert plain.scale == 1.0 and plain.planes[0].image.shape[-2:] == (96, 96)
    target = 4 * plain.object_area
    data = prepare_training_data(image, painted, target_area=target)
    assert data.scale == pytest.approx(2.0, rel=0.01)
    assert data.planes[0].image.shape[-2:] == (192, 192)
    assert data.planes[0].target.shape == (192, 192)
    # The painted cells now have about the area the model knows (in the network's pixels).
    assert data.object_area == pytest.approx(target, rel=0.15)
    assert data.n_objects == plain.n_objects
    assert any("resized by 2.00" in m for m in data.messages)
    # Semantic labels have no cell size to match.
    assert prepare_training_data(image, painted, "semantic", target_area=target).scale == 1.0


def test_prediction_resizes_by_the_models_scale(tiny_model_file):
    path = tiny_model_file()
    image = make_nuclei((48, 64), seed=1)[0]
    model, meta = load_model(path)
    plain = predict_all(model, image, PredictConfig(probabilities=True, precision="fp32"), meta)
    scaled_meta = {**meta, "scale": 2.0}
    scaled = predict_all(model, image, PredictConfig(probabilities=True, precision="fp32"), scaled_meta)
    # Image-sized outputs, probabilities still summing to one, and not the unscaled result.
    assert scaled.labels.shape == (48, 64) and scaled.probabilities.shape == (3, 48, 64)
    np.testing.assert_allclose(scaled.probabilities.sum(axis=0), 1.0, atol=1e-4)
    assert np.abs(scaled.probabilities - plain.probabilities).max() > 1e-3
    # An explicit factor overrides the file's; 1 gives back the unscaled prediction.
    explicit = predict_all(model, image, PredictConfig(probabilities=True, precision="fp32", scale=2.0), meta)
    np.testing.assert_allclose(explicit.probabilities, scaled.probabilities, atol=1e-6)
    one = predict_all(model, image, PredictConfig(probabilities=True, precision="fp32", scale=1.0), scaled_meta)
    np.testing.assert_allclose(one.probabilities, plain.probabilities, atol=1e-6)


def test_prediction_at_twice_the_size_is_the_network_on_the_enlarged_image(tiny_model_file):
    path = tiny_model_file()
    image = make_nuclei((48, 64), seed=1)[0].astype(np.float32)
    model, meta = load_model(path)
    cfg = PredictConfig(output="semantic", probabilities=True, precision="fp32")
    scaled = predict_all(model, image, cfg, {**meta, "scale": 2.0}).probabilities
    from napari_unet.data import normalize

    big = resize_plane(normalize(image), (96, 128))
    direct = predict_all(model, big, cfg, {**meta, "normalization": {"method": "percentile", "low": 0.0,
                                                                      "high": 100.0}}).probabilities
    # Normalising the enlarged image again moves values a little; the maps agree closely.
    back = resize_plane(direct, (48, 64), channel_axis=0)
    assert np.abs(back - scaled).mean() < 0.02


def test_cell_size_limits_are_in_image_pixels(tiny_model_file, monkeypatch):
    import napari_unet.postprocess as post

    seen = []
    real = post.instance_labels
    monkeypatch.setattr(post, "instance_labels", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    model, meta = load_model(tiny_model_file())
    image = make_nuclei((64, 64), seed=1)[0]
    # Trained at scale 2 on cells of 400 network px: the image's cells are 100 px; cells below
    # 15 % of that are removed (15 px, not 60), seeds below 5 %.
    predict_all(model, image, PredictConfig(output="instances", precision="fp32"),
                {**meta, "object_area": 400.0, "scale": 2.0})
    predict_all(model, image, PredictConfig(output="instances", precision="fp32"), {**meta, "object_area": 400.0})
    assert [(kw["min_size"], kw["min_seed_size"]) for kw in seen] == [(15, 5), (60, 20)]


def test_model_files_keep_and_check_the_scale(tmp_path):
    import torch

    from napari_unet.model import UNet

    torch.manual_seed(0)
    model = UNet(1, 3, depth=2, base_filters=4, padding="same")
    path = save_model(tmp_path / "m.safetensors", model, {"mode": "instances", "scale": 2.5, "object_area": 480.0})
    assert read_model_metadata(path)["scale"] == 2.5
    for bad in (0.0, -1, "2", 1000.0, True):
        save_model(tmp_path / "bad.safetensors", model, {"mode": "instances", "scale": bad})
        with pytest.raises(ModelFileError, match="scale in the file"):
            load_model(tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="scale must be"):
        PredictConfig(scale=0.0)


def _cfg(**kw):
    return TrainConfig(**{**dict(iterations=3, max_time=None, patch_size=32, batch_size=2, precision="fp32",
                                 threads=1, seed=0, check_painted=True), **kw})


@needs_model
def test_fine_tuning_matches_the_packaged_models_cell_size_and_keeps_it(small_cells):
    image, painted, _ = small_cells
    prior_area = read_model_metadata(SAMPLE_MODEL_PATH)["object_area"]
    result = list(train(image, painted, _cfg(), init_from=SAMPLE_MODEL_PATH))[-1].result
    meta = result.metadata
    area = painted_area([painted])
    assert meta["scale"] == pytest.approx(rescale_factor(area, prior_area), rel=1e-6) and meta["scale"] > 1.5
    assert meta["object_area"] == pytest.approx(prior_area, rel=0.2)
    assert any("resized by" in m for m in meta["training"]["messages"])
    # The painted-cell check ran on the resized planes, which already have the network's size.
    assert meta["training"]["painted_check"]["painted"] == 5
    pred = predict_all(result.model, image, PredictConfig(), meta)
    assert pred.labels.shape == image.shape
    # Continue: the same painted cells, the same factor.
    again = list(train(image, painted, _cfg(), model=result.model, metadata=meta))[-1].result
    assert again.metadata["scale"] == pytest.approx(meta["scale"], rel=0.05)
    # Off: the images as they are.
    off = list(train(image, painted, _cfg(rescale=False), init_from=SAMPLE_MODEL_PATH))[-1].result
    assert off.metadata["scale"] == 1.0 and off.metadata["object_area"] == pytest.approx(area)


def test_a_new_network_has_no_size_to_match(small_cells):
    image, painted, _ = small_cells
    result = list(train(image, painted, _cfg(check_painted=False)))[-1].result
    assert result.metadata["scale"] == 1.0


@needs_model
def test_the_command_line_rescales_and_can_be_told_not_to(small_cells, tmp_path, capsys):
    import tifffile

    image, painted, _ = small_cells
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", painted)
    common = ["train", "--image", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif"),
              "--from", "sample", "--iterations", "2", "--patch-size", "32", "--batch-size", "2",
              "--precision", "fp32", "--threads", "1", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "on.safetensors")]) == 0
    assert main(common + ["--out", str(tmp_path / "off.safetensors"), "--no-rescale"]) == 0
    assert read_model_metadata(tmp_path / "on.safetensors")["scale"] > 1.5
    assert read_model_metadata(tmp_path / "off.safetensors")["scale"] == 1.0
    pred = ["predict", "--model", str(tmp_path / "on.safetensors"), "--image", str(tmp_path / "img.tif"),
            "--precision", "fp32", "--quiet"]
    assert main(pred + ["--out", str(tmp_path / "seg.tif")]) == 0
    assert tifffile.imread(tmp_path / "seg.tif").shape == image.shape
    capsys.readouterr()
    assert main(pred + ["--out", str(tmp_path / "seg0.tif"), "--scale", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert "scale must be" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "seg0.tif").exists()
