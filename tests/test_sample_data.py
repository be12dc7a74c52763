"""The plugin's sample data and the packaged pretrained model."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from napari_unet._sample_data import cells_sample, sample_model_path, stack_sample


def test_cells_sample_is_deterministic_and_follows_the_convention():
    (image, meta, kind), (labels, _, _) = cells_sample()
    assert kind == "image" and meta["name"] == "nuclei" and image.dtype == np.uint16
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5, 6}
    np.testing.assert_array_equal(cells_sample()[1][0], labels)


def test_stack_sample():
    [(stack, meta, kind)] = stack_sample()
    assert kind == "image" and stack.shape == (4, 256, 256) and meta["axis_labels"] == ("t", "y", "x")
    assert not np.array_equal(stack[0], stack[1])


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
