"""The widgets with bad layers and files, and while the viewer changes under a running job.

What the other widget tests do not cover: training on a constant image, an RGB image for a
1-channel model, hostile or truncated model files, an export to a place where no file can
be created (one-line notification each, layers untouched); closing the viewer while
segmenting; changing the layers' data or removing the image while a job runs (no crash,
no thread left).
"""

from __future__ import annotations

import os
import pickle
import threading

import numpy as np
import pytest
from qtpy.QtCore import QThreadPool

from napari_unet._widgets import ExportWidget, SegmentWidget, TrainWidget
from napari_unet._widgets.train import START_FILE, START_NEW


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _python_threads() -> set:
    """Python threads other than the pool threads Qt runs workers in (those show as dummy threads for ever)."""
    return {t for t in threading.enumerate() if type(t).__name__ != "_DummyThread" and t.is_alive()}


def _no_job_left(widget, before: set) -> None:
    assert widget.runner.worker is None
    pool = QThreadPool.globalInstance()
    assert pool.waitForDone(20000) and pool.activeThreadCount() == 0
    assert _python_threads() <= before


def _layers(viewer) -> dict:
    return {layer.name: np.array(layer.data, copy=True) for layer in viewer.layers}


def _unchanged(viewer, before: dict) -> None:
    assert [layer.name for layer in viewer.layers] == list(before)
    for name, data in before.items():
        np.testing.assert_array_equal(viewer.layers[name].data, data)


def test_train_refuses_bad_layers_and_files(make_napari_viewer, qtbot, small_cells, tiny_model_file, tmp_path,
                                            notes):
    image, labels = small_cells
    viewer = make_napari_viewer()
    viewer.add_image(np.full(image.shape, 7, np.uint16), name="flat")
    viewer.add_image(np.stack([image // 256] * 3, axis=-1).astype(np.uint8), name="rgb", rgb=True)
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="painted")
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train)
    train.depth.value, train.width.value, train.patch_size.value = 2, 4, 64
    train.budget_kind.value, train.budget.value = "iterations", 2
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.safetensors"
    hostile.write_bytes(pickle.dumps({"weights": [], "hook": _RunsCode(marker)}))
    cases = [("flat", START_NEW, None, "same value"),
             ("rgb", START_FILE, tiny_model_file(2), "takes 2 channel(s) but the image has 3"),
             ("cells", START_FILE, hostile, "never unpickled")]
    threads = _python_threads()
    for image_name, start, model_file, expected in cases:
        before = _layers(viewer)
        train.image.value = viewer.layers[image_name]
        train.start_from.value = start
        if model_file is not None:
            train.model_file.value = str(model_file)
        with qtbot.waitSignal(train.runner.finished, timeout=60_000):
            train.start_button.click()
        assert train.state.state == "idle" and train.start_button.isEnabled()
        error = notes["error"].pop()
        assert error.startswith("Training failed:") and expected in error and "\n" not in error, error
        assert train.current is None
        _unchanged(viewer, before)  # no preview layer left behind either
    assert notes["error"] == [] and not marker.exists()
    _no_job_left(train, threads)


def test_segment_refuses_bad_model_files(make_napari_viewer, qtbot, small_cells, tiny_model_file, tmp_path, notes):
    image, _ = small_cells
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg)
    marker = tmp_path / "ran"
    good = tiny_model_file()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    hostile = tmp_path / "model.safetensors"
    hostile.write_bytes(pickle.dumps(_RunsCode(marker)))
    seg.model.value = seg.model.choices[-1]  # "model file..."
    threads = _python_threads()
    before = _layers(viewer)
    for path, expected in ((truncated, "not a valid safetensors file"), (hostile, "never unpickled")):
        seg.model_file.value = str(path)
        with qtbot.waitSignal(seg.runner.finished, timeout=60_000):
            seg.run_button.click()
        assert seg.state.state == "idle" and seg.run_button.isEnabled()
        error = notes["error"].pop()
        assert error.startswith("Segmentation failed:") and expected in error and "\n" not in error, error
        _unchanged(viewer, before)
    assert not marker.exists()
    _no_job_left(seg, threads)


def test_export_where_nothing_can_be_written(make_napari_viewer, qtbot, notes, read_only_dir):
    viewer = make_napari_viewer()
    viewer.add_labels(np.arange(12, dtype=np.uint8).reshape(3, 4), name="cells [U-Net]")
    export = ExportWidget(viewer)
    viewer.window.add_dock_widget(export)
    export.layers.value = list(viewer.layers)
    target = read_only_dir() / "masks.tif"
    export.file.value = str(target)
    before = _layers(viewer)
    with qtbot.waitSignal(export.runner.finished, timeout=60_000):
        export.export_button.click()
    assert export.state.state == "idle" and export.export_button.isEnabled()
    assert len(notes["error"]) == 1 and notes["error"][0].startswith("Export failed: cannot write")
    assert "\n" not in notes["error"][0] and not target.exists() and notes["info"] == []
    _unchanged(viewer, before)


def _segment_stack(make_napari_viewer, image, planes: int, tiny_model_file):
    """A viewer with a stack of ``planes`` copies of ``image`` and a Segment widget set to segment all of it."""
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([image] * planes), name="cells")
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg)
    seg.model.value = seg.model.choices[-1]
    seg.model_file.value = str(tiny_model_file())
    seg.scope.value = "whole stack"
    seg.tile_size.value = 32
    seg.precision.value = "fp32"  # "auto" would time bf16 against fp32 first
    return viewer, seg


def test_closing_the_viewer_while_segmenting(make_napari_viewer, qtbot, small_cells, tiny_model_file):
    image, _ = small_cells
    viewer, seg = _segment_stack(make_napari_viewer, image, 8, tiny_model_file)
    threads = _python_threads()
    seg.run_button.click()
    worker = seg.runner.worker
    with qtbot.waitSignal(worker.yielded, timeout=60_000):
        pass
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        viewer.close()
    assert not worker.is_running
    pool = QThreadPool.globalInstance()
    assert pool.waitForDone(20000) and pool.activeThreadCount() == 0
    assert _python_threads() <= threads


def test_changing_the_image_while_segmenting_uses_the_data_of_the_run(make_napari_viewer, qtbot, small_cells,
                                                                      tiny_model_file, notes):
    image, _ = small_cells
    viewer, seg = _segment_stack(make_napari_viewer, image, 3, tiny_model_file)
    threads = _python_threads()
    replacement = image[:40, :50].copy()
    with qtbot.waitSignal(seg.runner.finished, timeout=60_000):
        seg.run_button.click()
        with qtbot.waitSignal(seg.runner.worker.yielded, timeout=60_000):
            pass
        viewer.layers["cells"].data = replacement  # another shape, mid-run
    assert seg.state.state == "done", seg.state.text()
    np.testing.assert_array_equal(viewer.layers["cells"].data, replacement)  # the user's new data stays
    assert viewer.layers["cells [U-Net]"].data.shape == (3, *image.shape)  # the data the run was given
    assert notes["error"] == []
    _no_job_left(seg, threads)


@pytest.mark.parametrize("then", ["stop", "remove the image"])
def test_changing_layers_while_training(make_napari_viewer, qtbot, small_cells, notes, then):
    image, labels = small_cells
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="painted")
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train)
    train.start_from.value = START_NEW
    train.depth.value, train.width.value, train.patch_size.value, train.batch_size.value = 2, 4, 64, 2
    train.budget_kind.value, train.budget.value = "iterations", 100_000
    threads = _python_threads()
    train.start_button.click()
    worker = train.runner.worker
    with qtbot.waitSignal(worker.yielded, timeout=60_000, check_params_cb=lambda ev: ev.iteration >= 1):
        pass
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        # Paint over everything and crop the image: the run keeps the copies it started with.
        viewer.layers["painted"].data = np.zeros((30, 30), labels.dtype)
        viewer.layers["cells"].data = image[:30, :30].copy()
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # moved in napari 0.9
        camera.center = (0, 15, 15)  # the live preview follows the view (cropping the copy)
        camera.zoom = 3.0
        if then == "remove the image":
            viewer.layers.remove("cells")
        else:
            train.stop_button.click()
    assert train.state.state == "done", train.state.text()
    meta = train.current.metadata["training"]
    assert meta["data_shapes"] == [list(image.shape)] and meta["status"] == "stopped"
    assert viewer.layers["painted"].data.shape == (30, 30) and not viewer.layers["painted"].data.any()
    assert notes["error"] == []
    if then == "remove the image":
        assert any("removed" in w for w in notes["warning"])
    _no_job_left(train, threads)


def test_widget_states_follow_the_allowed_transitions(qtbot):
    from napari_unet._widgets._common import State, StateLabel

    label = StateLabel()
    qtbot.addWidget(label)
    assert label.state == "idle" == State.IDLE
    label.set_state("training", "iteration 1")
    label.set_state(State.TRAINING, "iteration 2")  # the same state, a new detail
    label.set_state("stopping")
    label.set_state("done", "3 iterations")
    assert label.state == "done" and "3 iterations" in label.text()
    with pytest.raises(RuntimeError, match="done -> stopping is not an allowed transition"):
        label.set_state("stopping")
    with pytest.raises(ValueError):
        label.set_state("dancing")
    assert label.state == "done"
