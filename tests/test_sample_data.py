"""The plugin's sample data and the packaged pretrained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_unet._sample_data import cells_sample, sample_model_path, stack_sample, volume_sample


def test_cells_sample_is_deterministic_and_follows_the_convention():
    (image, meta, kind), (labels, _, _) = cells_sample()
    assert kind == "image" and meta["name"] == "nuclei" and image.dtype == np.uint16
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5, 6}
    np.testing.assert_array_equal(cells_sample()[1][0], labels)


def test_stack_sample():
    [(stack, meta, kind)] = stack_sample()
    assert kind == "image" and stack.shape == (4, 256, 256) and meta["axis_labels"] == ("t", "y", "x")
    assert not np.array_equal(stack[0], stack[1])


def test_volume_sample_says_it_is_a_volume():
    [(volume, meta, kind)] = volume_sample()
    assert kind == "image" and volume.shape == (24, 192, 192) and volume.dtype == np.uint16
    assert meta["axis_labels"] == ("z", "y", "x") and meta["scale"] == (3.0, 1.0, 1.0)
    np.testing.assert_array_equal(volume_sample()[0][0], volume)  # deterministic


def test_packaged_model_segments_the_sample_image():
    from napari_unet.inference import predict_all
    from napari_unet.io import load_model
    from napari_unet.synthetic import make_nuclei

    path = sample_model_path()
    assert path is not None and path.stat().st_size < 5e6
    model, meta = load_model(path)
    assert meta["mode"] == "instances" and model.config.in_channels == 1 and model.config.padding == "same"
    image, truth = make_nuclei((128, 128), seed=7)
    pred = predict_all(model, image, metadata=meta)
    # A usable model, not a random one: most nuclei found, background mostly background.
    fg, true_fg = pred.labels > 0, truth > 0
    assert (fg & true_fg).sum() / true_fg.sum() > 0.7
    assert (fg & ~true_fg).sum() / (~true_fg).sum() < 0.1
    assert 0.5 * truth.max() <= pred.labels.max() <= 1.5 * truth.max()


def test_varied_nuclei_repeat_and_vary():
    from napari_unet.synthetic import make_varied_nuclei

    made = [make_varied_nuclei((160, 160), seed=s) for s in range(8)]
    again = make_varied_nuclei((160, 160), seed=3)
    np.testing.assert_array_equal(again[0], made[3][0])
    np.testing.assert_array_equal(again[1], made[3][1])
    assert {im.dtype for im, _ in made} == {np.dtype(np.uint8), np.dtype(np.uint16)}
    median_area = [np.median(np.bincount(t.ravel())[1:]) for _, t in made]
    assert max(median_area) > 4 * min(median_area)  # nuclei of very different sizes
    for im, truth in made:
        assert im.shape == truth.shape == (160, 160) and truth.max() >= 1
        assert im[truth > 0].mean() > 1.5 * im[truth == 0].mean()  # bright nuclei on a dark background


def test_nucleoli_brighten_the_nuclei_only():
    from napari_unet.synthetic import make_nuclei

    plain, truth = make_nuclei((128, 128), seed=1)
    spotted, truth2 = make_nuclei((128, 128), seed=1, nucleoli=3)
    np.testing.assert_array_equal(truth, truth2)
    assert spotted[truth > 0].mean() > 1.1 * plain[truth > 0].mean()
    assert abs(spotted[truth == 0].mean() / plain[truth == 0].mean() - 1) < 0.05


def test_whole_cells_fade_from_a_bright_centre_to_a_dim_cytoplasm():
    from skimage.segmentation import find_boundaries

    from napari_unet.synthetic import make_nuclei, make_varied_nuclei

    nuclei, truth = make_nuclei((160, 160), seed=4, dtype=np.float32)
    cells, truth2 = make_nuclei((160, 160), seed=4, dtype=np.float32, cytoplasm=0.2)
    np.testing.assert_array_equal(truth, truth2)  # the ground truth is the whole cell
    edge = find_boundaries(truth, mode="inner")
    centre = ndi.distance_transform_edt(truth > 0) >= 6
    assert cells[centre].mean() > 2.5 * cells[edge].mean()
    assert nuclei[centre].mean() < 2.5 * nuclei[edge].mean()
    # make_varied_nuclei draws the same nuclei either way; whole_cells=1 only dims their outer part.
    a, ta = make_varied_nuclei((128, 128), seed=2)
    b, tb = make_varied_nuclei((128, 128), seed=2, whole_cells=1.0)
    np.testing.assert_array_equal(ta, tb)
    assert not np.array_equal(a, b)


def _touching(truth: np.ndarray) -> np.ndarray:
    """Pixels of a cell next to another cell (not to background)."""
    hi = ndi.maximum_filter(truth, size=3)
    lo = ndi.minimum_filter(np.where(truth > 0, truth, truth.max() + 1), size=3)
    return (truth > 0) & ((hi > truth) | (lo < truth))


def test_whole_cells_touch_in_clusters_and_keep_one_bright_nucleus_each():
    from napari_unet.synthetic import make_whole_cells

    image, truth = make_whole_cells((256, 256), seed=3, dtype=np.float32, photons=1e5, blur=0.5)
    again, truth2 = make_whole_cells((256, 256), seed=3, dtype=np.float32, photons=1e5, blur=0.5)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(truth, truth2)
    assert truth.dtype == np.int32 and np.array_equal(np.unique(truth), np.arange(truth.max() + 1))
    ids = np.arange(1, truth.max() + 1)
    assert len(ids) >= 10
    touching = _touching(truth)
    touches = np.unique(truth[touching])
    assert len(touches) > 0.5 * len(ids)  # clustered=0.7: most cells press against a neighbour
    # Fewer cells: clustered ones all touch a neighbour, scattered ones mostly do not (measured over
    # seeds 0-4: 0.83-1.0 against 0.17-0.58 of the cells).
    for seed in range(3):
        _, packed = make_whole_cells((256, 256), seed=seed, n_cells=12, clustered=0.95)
        _, apart = make_whole_cells((256, 256), seed=seed, n_cells=12, clustered=0.0)
        assert len(np.unique(packed[_touching(packed)])) >= 0.8 * packed.max()
        assert len(np.unique(apart[_touching(apart)])) <= 0.6 * apart.max()
    # Each cell: a bright nucleus (its brightest tenth) in a cytoplasm several times dimmer (its rim).
    rim = (truth > 0) & (ndi.distance_transform_edt(truth > 0) <= 2)
    for i in ids:
        px = image[truth == i]
        assert np.percentile(px, 90) > 2.0 * np.median(image[rim & (truth == i)])
    assert image[truth > 0].mean() > 3 * image[truth == 0].mean()


def test_whole_cells_junction_darkens_only_where_cells_touch():
    from napari_unet.synthetic import make_whole_cells

    kw = dict(seed=5, dtype=np.float32, photons=1e6, blur=0.5, clustered=0.9)
    plain, truth = make_whole_cells((192, 192), junction=0.0, **kw)
    lined, truth2 = make_whole_cells((192, 192), junction=0.6, **kw)
    np.testing.assert_array_equal(truth, truth2)  # the same cells: the line is drawn last
    touching = _touching(truth)
    # (the median: where a nucleus reaches the line it is not darkened, 0.76 measured for this seed)
    assert np.median(lined[touching]) < 0.85 * np.median(plain[touching])
    away = (truth > 0) & (ndi.distance_transform_edt(~touching) > 4)
    np.testing.assert_allclose(lined[away].mean(), plain[away].mean(), rtol=0.01)


def test_varied_cells_repeat_and_vary():
    from napari_unet.synthetic import make_varied_cells

    made = [make_varied_cells((192, 192), seed=s) for s in range(8)]
    np.testing.assert_array_equal(make_varied_cells((192, 192), seed=2)[0], made[2][0])
    assert {im.dtype for im, _ in made} == {np.dtype(np.uint8), np.dtype(np.uint16)}
    median_area = [np.median(np.bincount(t.ravel())[1:]) for _, t in made]
    assert max(median_area) > 4 * min(median_area)
    for im, truth in made:
        assert im.shape == truth.shape == (192, 192) and truth.max() >= 1
        assert im[truth > 0].mean() > 1.3 * im[truth == 0].mean()


def test_packaged_model_segments_whole_cells():
    # The packaged model is pretrained on whole cells too: it finds whole cells (nucleus and
    # cytoplasm), not only their bright nuclei, and separates most touching ones.
    from napari_unet.inference import predict_all
    from napari_unet.io import load_model
    from napari_unet.synthetic import make_varied_cells

    model, meta = load_model(sample_model_path())
    assert "whole cells" in meta["training"]["source"]
    image, truth = make_varied_cells((192, 192), seed=6000)  # a held-out seed of make_sample_data
    pred = predict_all(model, image, metadata=meta)
    fg, true_fg = pred.labels > 0, truth > 0
    assert (fg & true_fg).sum() / true_fg.sum() > 0.8
    assert (fg & ~true_fg).sum() / (~true_fg).sum() < 0.1
    assert 0.7 * truth.max() <= pred.labels.max() <= 1.3 * truth.max()


def test_packaged_model_records_its_real_pretraining_data():
    from napari_unet.io import load_model

    _, meta = load_model(sample_model_path())
    training = meta["training"]
    assert "DSB2018" in training["source"] and "Usiigaci" in training["source"]
    # One held-out real image per group, scored when the model was made.
    assert {k.split("_")[0] for k in training["test_ap50_real"]} == {"fluo-small", "fluo-large", "bf", "he",
                                                                     "usiigaci"}


def _recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_sample_data", Path(__file__).resolve().parent.parent / "sample_data" / "make_sample_data.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    return make


def test_pretraining_recipe_defaults(tmp_path, capsys):
    make = _recipe()
    (tmp_path / "manifest.csv").write_text("dataset,image,mask\n")
    # With real data: the shipped file's fixed 20000 steps, no time limit, validation every 1000.
    config = make.training_config(make.parse_args(["--data", str(tmp_path)]), n_real=190)
    assert (config.iterations, config.max_time, config.val_every) == (20000, None, 1000)
    assert config.lr_schedule == "cosine" and config.val_fraction == 0.02
    # A time budget instead of the step count, and another validation interval.
    config = make.training_config(make.parse_args(["--data", str(tmp_path), "--seconds", "90", "--val-every", "7"]),
                                  n_real=190)
    assert (config.iterations, config.max_time, config.val_every) == (None, 90.0, 7)
    config = make.training_config(make.parse_args(["--data", str(tmp_path), "--iterations", "30"]), n_real=190)
    assert (config.iterations, config.max_time) == (30, None)
    # Synthetic only: the 2400 s budget, or the steps asked for.
    config = make.training_config(make.parse_args([]), n_real=0)
    assert (config.iterations, config.max_time, config.val_every) == (None, 2400.0, 50)
    config = make.training_config(make.parse_args(["--iterations", "12"]), n_real=0)
    assert (config.iterations, config.max_time) == (12, None)
    config = make.training_config(make.parse_args(["--iterations", "12", "--seconds", "5"]), n_real=0)
    assert (config.iterations, config.max_time) == (12, 5.0)  # whichever comes first
    # A folder that is not laid out like ../shared/pretrain: one line, exit status 2.
    with pytest.raises(SystemExit) as exc:
        make.parse_args(["--data", str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "has no manifest.csv" in capsys.readouterr().err
    for bad in (["--iterations", "0"], ["--seconds", "-5"], ["--val-every", "0"]):
        with pytest.raises(SystemExit) as exc:
            make.parse_args(bad)
        assert exc.value.code == 2 and "must be positive" in capsys.readouterr().err
    assert make.parse_args(["--seconds", "0.5"]).seconds == 0.5
    with pytest.raises(SystemExit):
        make.parse_args(["--cells", "65"])


def test_pretraining_reads_a_real_data_folder(tmp_path):
    import csv

    import imageio.v3 as iio
    import tifffile

    make = _recipe()
    rng = np.random.default_rng(0)
    rows = []
    for stem, rgb in [("he_a", True), ("he_b", True), ("usiigaci_set01", False), ("usiigaci_set02", False)]:
        image = rng.integers(0, 255, (40, 48, 3) if rgb else (40, 48), dtype=np.uint8)
        mask = np.zeros((40, 48), np.uint16)
        mask[5:15, 5:15], mask[20:30, 20:35] = 1, 2
        (tmp_path / "d" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / "masks").mkdir(parents=True, exist_ok=True)
        iio.imwrite(tmp_path / "d" / "images" / f"{stem}.png", image)
        tifffile.imwrite(tmp_path / "d" / "masks" / f"{stem}.tif", mask)
        rows.append({"dataset": "d", "image": f"d/images/{stem}.png", "mask": f"d/masks/{stem}.tif"})
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    train, held = make.load_real(tmp_path)
    assert [s for s, _, _ in held] == ["he_a", "usiigaci_set01"]  # the first of each group
    assert [s for s, _, _ in train] == ["he_b", "usiigaci_set02"]
    for _, image, masks in train + held:
        assert image.shape == masks.shape == (40, 48)  # colour read as grey
        assert set(np.unique(masks)) == {0, 1, 2}
