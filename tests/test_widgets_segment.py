"""Segment with U-Net widget, driven through its own controls (tiny untrained model files)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet._widgets import SegmentWidget
from napari_unet._widgets.segment import training_labels_from_corrected


def _setup(make_napari_viewer, image, model_file=None, dock=None, **layer_kw):
    """A viewer with the image and a docked Segment widget using ``model_file`` (default: the packaged model)."""
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells", **layer_kw)
    if dock is not None:  # as napari makes it (with a proxy of the viewer)
        seg = dock(viewer, "Segment with U-Net")
        assert isinstance(seg, SegmentWidget)
    else:
        seg = SegmentWidget(viewer)
        viewer.window.add_dock_widget(seg, name="Segment with U-Net")
    if model_file is not None:
        seg.model.value = seg.model.choices[-1]  # "model file..."
        seg.model_file.value = str(model_file)
    else:
        assert seg.model.value.name == "sample model: cells (packaged)"
    return viewer, seg


def _run(qtbot, seg, timeout=120_000):
    with qtbot.waitSignal(seg.runner.finished, timeout=timeout):
        seg.run_button.click()
    assert seg.runner.worker is None


def test_segment_2d_creates_then_updates_one_layer_undoably(make_napari_viewer, qtbot, small_cells, notes, dock,
                                                            no_threads_left):
    image, _ = small_cells
    viewer, seg = _setup(make_napari_viewer, image, dock=dock, scale=(0.5, 0.25), translate=(3, 4))
    seg.min_size.value = 1  # keep every cell
    _run(qtbot, seg)
    assert seg.state.state == "done", seg.state.text()
    out = viewer.layers["cells [U-Net]"]
    assert out.data.shape == image.shape
    np.testing.assert_allclose(out.scale, (0.5, 0.25))
    np.testing.assert_allclose(out.translate, (3, 4))
    np.testing.assert_array_equal(viewer.layers["cells"].data, image)  # the user's layer is untouched
    assert "cpu" in seg.device_info.text()
    assert seg.model_info.text().startswith("instances model, 1 channel(s) in, depth 4")
    first = out.data.copy()

    # The user edits the output, then segments again: same layer, and undo brings the edit back.
    out.data_setitem((np.array([5, 5]), np.array([5, 6])), 77)
    edited = out.data.copy()
    _run(qtbot, seg)
    assert [layer.name for layer in viewer.layers] == ["cells", "cells [U-Net]"]
    np.testing.assert_array_equal(out.data, first)
    out.undo()
    np.testing.assert_array_equal(out.data, edited)
    assert notes["error"] == []


def test_mirror_average_checkbox(make_napari_viewer, qtbot, small_cells, no_threads_left):
    """The checkbox turns on test-time flips; the layer holds what the core computes with them."""
    import dataclasses

    from napari_unet.inference import predict_all
    from napari_unet.io import load_model

    image, _ = small_cells
    viewer, seg = _setup(make_napari_viewer, image)
    assert seg.prediction_config().flips is False
    seg.flips.value = True
    config = seg.prediction_config()
    assert config.flips is True
    _run(qtbot, seg)
    assert seg.state.state == "done", seg.state.text()
    model, meta = load_model(seg.model.value.path)
    np.testing.assert_array_equal(viewer.layers["cells [U-Net]"].data, predict_all(model, image, config, meta).labels)
    # ... which is not what the plain prediction gives (else the test could not tell).
    plain = predict_all(model, image, dataclasses.replace(config, flips=False), meta)
    assert not np.array_equal(viewer.layers["cells [U-Net]"].data, plain.labels)


def test_segment_stack_whole_and_current_plane(make_napari_viewer, qtbot, no_threads_left):
    from napari_unet.synthetic import make_nuclei

    stack = np.stack([make_nuclei((64, 64), radius=(6, 10), seed=s)[0] for s in range(3)])
    viewer, seg = _setup(make_napari_viewer, stack)
    seg.min_size.value = 1  # keep every cell
    assert seg.scope.enabled
    seg.scope.value = "whole stack"
    _run(qtbot, seg)
    out = viewer.layers["cells [U-Net]"]
    assert out.data.shape == stack.shape and all(out.data[z].any() for z in range(3))

    out.data = np.zeros_like(out.data)
    viewer.dims.set_current_step(0, 1)
    seg.scope.value = "current plane"
    seg.probabilities.value = True
    _run(qtbot, seg)
    assert out.data[1].any() and not out.data[0].any() and not out.data[2].any()
    probs = viewer.layers["cells [U-Net probabilities]"]
    assert probs.data.shape == (3, 64, 64) and probs.data.dtype == np.float32
    np.testing.assert_allclose(probs.data.sum(axis=0), 1.0, atol=1e-3)


def test_segment_rgb_image(make_napari_viewer, qtbot, small_cells, tiny_model_file, no_threads_left):
    image, _ = small_cells
    rgb = np.stack([image // 256] * 3, axis=-1).astype(np.uint8)
    viewer, seg = _setup(make_napari_viewer, rgb, tiny_model_file(), rgb=True)
    _run(qtbot, seg)
    assert viewer.layers["cells [U-Net]"].data.shape == image.shape


def test_channel_mismatch_and_cancel(make_napari_viewer, qtbot, small_cells, tiny_model_file, notes,
                                    no_threads_left):
    image, _ = small_cells
    viewer, seg = _setup(make_napari_viewer, image, tiny_model_file(in_channels=2, name="two.safetensors"))
    _run(qtbot, seg)
    assert seg.state.state == "idle" and seg.run_button.isEnabled()
    assert len(notes["error"]) == 1 and "2 channels" in notes["error"][0]
    assert [layer.name for layer in viewer.layers] == ["cells"]

    # Cancel: a stack with small tiles gives many events; cancel at the first one.
    seg.model_file.value = str(tiny_model_file(name="one.safetensors"))
    viewer.layers["cells"].data = np.stack([image] * 6)
    seg.scope.value = "whole stack"
    seg.tile_size.value = 32
    with qtbot.waitSignal(seg.runner.finished, timeout=120_000):
        seg.run_button.click()
        with qtbot.waitSignal(seg.runner.worker.yielded, timeout=120_000):
            pass
        seg.cancel_button.click()
    assert seg.state.state == "idle"
    assert [layer.name for layer in viewer.layers] == ["cells"]


def test_threshold_options_reach_the_prediction_config(make_napari_viewer, small_cells):
    image, _ = small_cells
    viewer, seg = _setup(make_napari_viewer, image)
    config = seg.prediction_config()
    assert config.seed_threshold is None and config.foreground_threshold is None  # 0 = auto
    seg.seed_threshold.value, seg.foreground_threshold.value = 0.7, 0.25
    config = seg.prediction_config()
    assert (config.seed_threshold, config.foreground_threshold) == (0.7, 0.25)


def test_corrected_output_becomes_training_labels(make_napari_viewer, qtbot, small_cells, notes, dock,
                                                  no_threads_left):
    image, _ = small_cells
    viewer, seg = _setup(make_napari_viewer, image, dock=dock)
    seg.min_size.value = 1  # keep every cell
    _run(qtbot, seg)
    out = viewer.layers["cells [U-Net]"]
    # "Only cells I edited" is ticked by default: with nothing edited there is nothing to learn.
    assert seg.only_edited.value is True
    seg.to_training_button.click()
    assert len(notes["error"]) == 1 and "no cell was edited" in notes["error"][0]
    assert "Only cells I edited" in notes["error"][0]
    assert [layer.name for layer in viewer.layers] == ["cells", "cells [U-Net]"]
    # The user paints a new cell (id 500) on background in the output.
    y, x = np.argwhere(out.data == 0)[len(np.argwhere(out.data == 0)) // 2]
    out.data_setitem((np.array([y]), np.array([x])), 500)
    seg.to_training_button.click()
    train = viewer.layers["cells [training labels]"]
    assert train.data[y, x] == 501 and set(np.unique(train.data)) == {0, 1, 501}  # the rest unlabelled
    seg.only_edited.value = False
    seg.to_training_button.click()
    assert train.data.min() == 1 and train.data[y, x] == 501  # whole image now, same layer
    assert len([layer for layer in viewer.layers if "training" in layer.name]) == 1


def test_corrections_join_the_painting_the_train_widget_uses(make_napari_viewer, qtbot, small_cells, notes, dock,
                                                             no_threads_left):
    image, painted = small_cells
    viewer, seg = _setup(make_napari_viewer, image, dock=dock)
    viewer.add_labels(painted, name="painted")
    train = dock(viewer, "Train U-Net")
    assert train.image.value == viewer.layers["cells"] and train.labels.value == viewer.layers["painted"]
    seg.min_size.value = 1
    _run(qtbot, seg)
    out = viewer.layers["cells [U-Net]"]
    free = np.argwhere((out.data == 0) & (painted == 0))
    y, x = free[len(free) // 2]
    out.data_setitem((np.array([y]), np.array([x])), 500)  # the user adds a cell
    seg.only_edited.value = True
    seg.to_training_button.click()
    labels = viewer.layers["cells [training labels]"].data
    cells = painted >= 2
    np.testing.assert_array_equal(labels[cells], painted[cells])  # the painting is there
    assert labels[y, x] > painted.max()  # and the new cell, with an id of its own
    np.testing.assert_array_equal(viewer.layers["painted"].data, painted)  # the user's layer is untouched


def test_training_labels_conversion():
    predicted = np.array([[0, 0, 3], [0, 2, 2]])
    current = predicted.copy()
    np.testing.assert_array_equal(training_labels_from_corrected(current), [[1, 1, 4], [1, 3, 3]])
    current[0, 2] = 0  # erased a false positive
    edited = training_labels_from_corrected(current, predicted, only_edited=True)
    np.testing.assert_array_equal(edited, [[0, 0, 1], [0, 0, 0]])  # erased -> background, the rest unlabelled
    current[1, 1] = 5  # split a cell: both halves (the new one and the trimmed one) are labelled
    edited = training_labels_from_corrected(current, predicted, only_edited=True)
    np.testing.assert_array_equal(edited, [[1, 1, 1], [1, 6, 3]])
    with pytest.raises(ValueError, match="no cell was edited"):
        training_labels_from_corrected(predicted, predicted, only_edited=True)


def test_corrected_cells_join_the_painted_ones():
    painted = np.zeros((6, 8), np.uint16)
    painted[0:2, 0:2] = 2  # a painted cell
    painted[5, :] = 1  # painted background
    predicted = np.zeros((6, 8), np.int64)
    predicted[2:4, 4:7] = 1
    current = predicted.copy()
    current[2:4, 6] = 0  # the user trims the cell
    out = training_labels_from_corrected(current, predicted, only_edited=True, painted=painted)
    assert out[0, 0] == 2 and (out[5] == 1).all()  # the painting is kept
    corrected = np.unique(out[2:4, 4:6])
    assert len(corrected) == 1 and corrected[0] > 2  # a new object, after the painted ids
    assert (out[2:4, 6] == 1).all()  # what was erased is background
    assert out[1, 1] == 2  # the correction's background ring never covers a painted cell


def test_only_edited_in_semantic_mode_takes_the_edited_region_not_the_whole_class():
    predicted = np.zeros((5, 9), np.int64)
    predicted[1:4, 1:3] = 1  # two regions of class 1
    predicted[1:4, 6:8] = 1
    current = predicted.copy()
    current[2, 3] = 1  # the user grows the left region
    out = training_labels_from_corrected(current, predicted, only_edited=True, semantic=True)
    assert (out[1:4, 1:3] == 2).all() and out[2, 3] == 2
    assert (out[1:4, 6:8] != 2).all()  # the untouched region of the same class stays unlabelled


def test_packaged_sample_model_is_listed(make_napari_viewer):
    viewer = make_napari_viewer()
    seg = SegmentWidget(viewer)
    names = [entry.name for entry in seg.model.choices]  # what the Model list shows
    assert names[0] == "sample model: cells (packaged)" and names[-1] == "model file..."


def test_two_channel_image_with_a_two_channel_model(make_napari_viewer, qtbot, small_cells, tiny_model_file,
                                                    no_threads_left):
    image, _ = small_cells
    two = np.stack([image, image[::-1]])  # (C, Y, X): napari shows it as a stack with a slider
    viewer, seg = _setup(make_napari_viewer, two, tiny_model_file(in_channels=2, name="two.safetensors"),
                         scale=(1.0, 0.5, 0.5))
    _run(qtbot, seg)
    out = viewer.layers["cells [U-Net]"]
    assert out.data.shape == image.shape
    np.testing.assert_allclose(out.scale, (0.5, 0.5))


def test_removing_the_image_during_a_run_stops_it(make_napari_viewer, qtbot, small_cells, tiny_model_file, notes,
                                                  no_threads_left):
    image, _ = small_cells
    viewer, seg = _setup(make_napari_viewer, np.stack([image] * 8), tiny_model_file())
    seg.tile_size.value = 32
    with qtbot.waitSignal(seg.runner.finished, timeout=120_000):
        seg.run_button.click()
        with qtbot.waitSignal(seg.runner.worker.yielded, timeout=120_000):
            pass
        viewer.layers.remove("cells")
    assert seg.state.state == "idle" and seg.run_button.isEnabled()
    assert any("removed" in w for w in notes["warning"])
    assert len(viewer.layers) == 0


def test_the_models_description_goes_to_the_entry_that_ran(make_napari_viewer, qtbot, small_cells, notes,
                                                           no_threads_left):
    image, _ = small_cells
    viewer, seg = _setup(make_napari_viewer, image)
    sample = seg.model.value
    assert sample.metadata == {}  # a file not read yet
    with qtbot.waitSignal(seg.runner.finished, timeout=120_000):
        seg.run_button.click()
        seg.model.value = seg.model.choices[-1]  # the user picks "model file..." while it runs
    assert sample.metadata["mode"] == "instances" and sample.metadata["object_area"] > 0
    assert seg.model.value is not sample and seg.model_info.text() == ""  # the shown entry is not described
    seg.model.value = sample
    assert seg.model_info.text().startswith("instances model")


def test_the_model_list_keeps_the_latest_trained_models_only(make_napari_viewer, tiny_model_file):
    from napari_unet._widgets._common import ModelEntry
    from napari_unet._widgets.segment import KEEP_TRAINED
    from napari_unet.io import load_model

    viewer = make_napari_viewer()
    seg = SegmentWidget(viewer)
    model, meta = load_model(tiny_model_file())
    entries = [ModelEntry(name=f"trained model {i}", model=model, metadata=meta) for i in range(5)]
    for e in entries:
        seg.use_model(e)
    names = [entry.name for entry in seg.model.choices]  # what the Model list shows
    assert names[:KEEP_TRAINED] == [f"trained model {i}" for i in (4, 3, 2)]
    assert "trained model 1" not in names and names[-2:] == ["sample model: cells (packaged)", "model file..."]
    assert seg.model.value is entries[-1]


def test_segment_says_when_openvino_ran(make_napari_viewer, qtbot, small_cells, monkeypatch, no_threads_left):
    """With 'auto' picking OpenVINO (forced here: the test image is below the size where it would),
    the network runs on it in the worker thread and the widget's device line says so."""
    from napari_unet import openvino_backend

    if not openvino_backend.openvino_available():
        pytest.skip("the openvino extra is not installed")
    monkeypatch.setattr(openvino_backend, "select_backend", lambda *a, **k: "openvino")
    image, _ = small_cells
    viewer, seg = _setup(make_napari_viewer, image)
    seg.min_size.value = 1
    _run(qtbot, seg)
    assert seg.state.state == "done", seg.state.text()
    assert "OpenVINO" in seg.device_info.text()
    assert viewer.layers["cells [U-Net]"].data.max() > 0
