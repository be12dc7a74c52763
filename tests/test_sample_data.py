"""The plugin's sample data and the packaged pretrained model."""

from __future__ import annotations

import numpy as np

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
