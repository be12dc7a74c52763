"""Train U-Net widget, driven through its own buttons (tiny models, a few iterations)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from napari_unet import tuning
from napari_unet._sample_data import SAMPLE_MODEL_PATH
from napari_unet._widgets import TrainWidget
from napari_unet._widgets.train import START_NEW, START_SAMPLE


def _setup(make_napari_viewer, image, labels, iterations=3, dock=None):
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells", scale=(0.5, 0.5), translate=(10, 20))
    viewer.add_labels(labels, name="painted")
    if dock is not None:  # as napari makes it (with a proxy of the viewer)
        train = dock(viewer, "Train U-Net")
        assert isinstance(train, TrainWidget) and type(train.viewer).__name__ == "PublicOnlyProxy"
    else:
        train = TrainWidget(viewer)
        viewer.window.add_dock_widget(train, name="Train U-Net")
    train.start_from.value = START_NEW  # a tiny new network (the default fine-tunes the sample model)
    train.depth.value, train.width.value = 2, 4
    train.patch_size.value, train.batch_size.value = 64, 2
    train.budget_kind.value = "iterations"
    train.budget.value = iterations
    return viewer, train


def _run(qtbot, widget, button, timeout=120_000):
    """Click ``button`` and wait until the job it starts has finished."""
    with qtbot.waitSignal(widget.runner.finished, timeout=timeout):
        button.click()
    assert widget.runner.worker is None


def test_train_then_stop_keeps_model_and_feeds_segment(make_napari_viewer, qtbot, small_cells, notes, dock,
                                                       no_threads_left):
    image, labels = small_cells
    viewer, train = _setup(make_napari_viewer, image, labels, iterations=10_000, dock=dock)
    segment = dock(viewer, "Segment with U-Net")
    assert train.image.value == viewer.layers["cells"] and train.labels.value == viewer.layers["painted"]
    assert train.state.state == "idle" and not train.stop_button.isEnabled()

    train.start_button.click()
    assert train.state.state == "training" and not train.start_button.isEnabled()
    worker = train.runner.worker
    with qtbot.waitSignal(worker.yielded, timeout=120_000, check_params_cb=lambda ev: ev.iteration >= 1):
        pass
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        train.stop_button.click()
        assert train.state.state == "stopping"
    assert train.state.state == "done", train.state.text()
    assert train.start_button.isEnabled() and train.save_button.isEnabled()
    meta = train.current.metadata
    assert meta["training"]["status"] == "stopped"
    assert 1 <= meta["training"]["iterations"] < 10_000
    assert train.curves.points["loss"][0], "the loss plot got points"
    # The Segment widget docked in the same viewer now uses a snapshot of the trained model.
    entry = segment.model.value
    assert entry is train.published_model and entry.model is not train.current.model
    for a, b in zip(entry.model.state_dict().values(), train.current.model.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())
    # The user's layers are untouched.
    np.testing.assert_array_equal(viewer.layers["painted"].data, labels)
    assert notes["error"] == []


def test_start_again_continues_same_model_and_preview(make_napari_viewer, qtbot, small_cells, tmp_path, monkeypatch,
                                                      dock, no_threads_left):
    image, labels = small_cells
    viewer, train = _setup(make_napari_viewer, image, labels, iterations=2, dock=dock)
    viewer.layers.selection.active = viewer.layers["painted"]
    _run(qtbot, train, train.start_button)
    assert train.state.state == "done"
    first = train.current.model
    # The run ends with a preview of the visible part, in a layer of its own placed on the image;
    # the layer the user was painting stays the active one.
    preview = viewer.layers["cells [U-Net preview]"]
    assert viewer.layers.selection.active is viewer.layers["painted"]
    assert preview.data.ndim == 2 and preview.data.shape[0] <= 96
    np.testing.assert_allclose(preview.scale, (0.5, 0.5))
    # Human in the loop: paint one more cell, press Start again: the same network keeps training.
    assert train.start_from.value == "current model (continue)"
    _run(qtbot, train, train.start_button)
    assert train.current.model is first
    assert train.current.metadata["training"]["previous"] is not None
    # Save model (the dialog is replaced), then reload it.
    target = tmp_path / "m.safetensors"
    monkeypatch.setattr("napari_unet._widgets._common.ask_save_path", lambda *a, **k: str(target))
    train.save_button.click()
    from napari_unet.io import load_model

    model, meta = load_model(target)
    assert meta["mode"] == "instances" and model.config.base_filters == 4


@pytest.mark.parametrize("problem", ["nothing painted", "shapes differ"])
def test_bad_input_notifies_and_returns_to_idle(make_napari_viewer, qtbot, small_cells, notes, problem,
                                                no_threads_left):
    image, labels = small_cells
    labels = np.zeros_like(labels) if problem == "nothing painted" else labels[:80]
    viewer, train = _setup(make_napari_viewer, image, labels)
    before = viewer.layers["painted"].data.copy()
    if problem == "shapes differ":  # found at the click, by the rule that finds the channels: no job starts
        train.start_button.click()
        assert train.runner.worker is None
        assert notes["error"] == [f"cells: image shape {image.shape} and labels shape {labels.shape} differ"]
    else:
        _run(qtbot, train, train.start_button)
        assert len(notes["error"]) == 1 and "\n" not in notes["error"][0]
        assert notes["error"][0].startswith("Training failed:")
    assert train.state.state == "idle"
    assert train.start_button.isEnabled() and not train.stop_button.isEnabled()
    assert train.current is None
    np.testing.assert_array_equal(viewer.layers["painted"].data, before)
    assert [layer.name for layer in viewer.layers] == ["cells", "painted"]


def test_no_layers_notifies(make_napari_viewer, notes):
    viewer = make_napari_viewer()
    train = TrainWidget(viewer)
    train.start_button.click()
    assert train.runner.worker is None and train.state.state == "idle"
    assert "image layer" in notes["error"][0]


def test_removing_a_layer_stops_training(make_napari_viewer, qtbot, small_cells, notes, no_threads_left):
    image, labels = small_cells
    viewer, train = _setup(make_napari_viewer, image, labels, iterations=10_000)
    train.start_button.click()
    worker = train.runner.worker
    with qtbot.waitSignal(worker.yielded, timeout=120_000):
        pass
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        viewer.layers.remove("painted")
    assert train.state.state in ("done", "idle")
    assert any("removed" in w for w in notes["warning"])


def test_closing_the_viewer_stops_training(make_napari_viewer, qtbot, small_cells, no_threads_left):
    image, labels = small_cells
    viewer, train = _setup(make_napari_viewer, image, labels, iterations=10_000)
    train.start_button.click()
    worker = train.runner.worker
    with qtbot.waitSignal(worker.yielded, timeout=120_000):
        pass
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        viewer.close()
    assert not worker.is_running


@pytest.mark.parametrize("torch_threads, usable, threads", [(1, 1, 1), (2, 2, 1), (8, 16, 7), (8, 3, 2)])
def test_gui_training_leaves_a_core_to_the_viewer(monkeypatch, torch_threads, usable, threads):
    """All of torch's threads but one, and no more than the CPUs this process may use, but one."""
    from napari_unet._widgets.train import gui_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(usable)), raising=False)
    assert gui_threads(torch_threads) == threads


def test_the_job_trains_with_all_cores_but_one_by_default(make_napari_viewer, qtbot, small_cells, monkeypatch,
                                                         no_threads_left):
    """Threads "0": the job passes gui_threads(torch's own count) to the engine, run after run."""
    from napari_unet._widgets.train import gui_threads

    seen = []

    def fake_train(images, labels, config, **kw):
        seen.append(config.threads)
        raise ValueError("recorded")
        yield

    monkeypatch.setattr("napari_unet.training.train", fake_train)
    # As on an 8-core machine: torch's own count, read by the first job, is what counts.
    monkeypatch.setattr(tuning, "_TORCH_THREADS", 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    image, labels = small_cells
    viewer, train = _setup(make_napari_viewer, image, labels, iterations=2)
    for _ in range(2):
        _run(qtbot, train, train.start_button)
    assert seen == [7, 7] == [gui_threads(8)] * 2
    train.threads.value = 3
    _run(qtbot, train, train.start_button)
    assert seen[-1] == 3


def test_widget_starts_from_the_engines_defaults(make_napari_viewer):
    from napari_unet._widgets.train import model_config_from, train_config_from
    from napari_unet.config import TrainConfig, default_model_config

    train = TrainWidget(make_napari_viewer())
    cfg, dflt = train_config_from(train.settings()), TrainConfig()
    assert (cfg.patch_size, cfg.batch_size, cfg.learning_rate, cfg.optimizer, cfg.max_time) == \
        (dflt.patch_size, dflt.batch_size, dflt.learning_rate, dflt.optimizer, 60.0)
    # "0": the job leaves one core to the viewer (gui_threads), unless the user asks for a number.
    assert train.threads.value == 0 and cfg.threads is None
    train.threads.value = 3
    assert train_config_from(train.settings()).threads == 3
    mc, dm = model_config_from(train.settings()), default_model_config()
    assert (mc.depth, mc.base_filters, mc.padding, mc.batch_norm) == (dm.depth, dm.base_filters, dm.padding,
                                                                       dm.batch_norm)


def test_default_start_fine_tunes_the_sample_model_for_grey_images(make_napari_viewer, qtbot, small_cells, notes,
                                                                   no_threads_left):
    image, labels = small_cells
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="painted")
    train = TrainWidget(viewer)
    assert train.start_from.value == START_SAMPLE
    assert train.depth.native.isHidden() and train.width.native.isHidden()  # the sample model's architecture
    train.patch_size.value, train.batch_size.value = 64, 2
    train.budget_kind.value, train.budget.value = "iterations", 2
    _run(qtbot, train, train.start_button)
    assert train.state.state == "done", train.state.text()
    meta = train.current.metadata
    assert meta["training"]["init_from"] == str(SAMPLE_MODEL_PATH) and meta["training"]["iterations"] == 2
    assert train.current.model.config.base_filters == 8 and notes["error"] == []


def test_default_start_fine_tunes_the_sample_model_on_a_colour_image(make_napari_viewer, qtbot, small_cells, notes,
                                                                     no_threads_left):
    image, labels = small_cells
    grey = image.astype(np.float32) / image.max()
    rgb = (255 * np.stack([1 - 0.5 * grey, 1 - 0.8 * grey, 1 - 0.3 * grey], axis=-1)).astype(np.uint8)  # H&E-like
    viewer = make_napari_viewer()
    viewer.add_image(rgb, name="stained", rgb=True)
    viewer.add_labels(labels, name="painted")
    train = TrainWidget(viewer)
    assert train.start_from.value == START_SAMPLE
    train.patch_size.value, train.batch_size.value = 64, 2
    train.budget_kind.value, train.budget.value = "iterations", 2
    _run(qtbot, train, train.start_button)
    assert train.state.state == "done", train.state.text()
    check = train.current.metadata["training"]["painted_check"]
    # The state line reports the painted-cell check; a notification gives the whole sentence.
    assert f"{check['recovered']} of {check['painted']} painted cells found again" in train.state.text()
    assert any(n.startswith("check on the painted cells") for n in notes["info"] + notes["warning"])
    assert train.current.model.config.in_channels == 1 and notes["error"] == []
    preview = viewer.layers["stained [U-Net preview]"]  # labels of the visible part, from the grey image
    assert preview.data.ndim == 2 and preview.data.dtype.kind == "u"


def test_a_failed_painted_cell_check_is_a_warning(make_napari_viewer, qtbot, small_cells, notes, no_threads_left):
    image, labels = small_cells
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="painted")
    train = TrainWidget(viewer)
    train.start_from.value = START_NEW  # one step of a tiny new network finds no painted cell
    train.depth.value, train.width.value = 2, 4
    train.patch_size.value, train.batch_size.value = 32, 1
    train.budget_kind.value, train.budget.value = "iterations", 1
    _run(qtbot, train, train.start_button)
    assert train.state.state == "done", train.state.text()
    warned = [n for n in notes["warning"] if n.startswith("check on the painted cells")]
    assert len(warned) == 1 and "train again" in warned[0]
    assert not any(n.startswith("check on the painted cells") for n in notes["info"])


def test_start_from_follows_the_image_and_mode_until_the_user_chooses(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.uint8), name="grey")
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), name="rgb", rgb=True)
    train = TrainWidget(viewer)
    train.image.value = viewer.layers["grey"]
    assert train.start_from.value == START_SAMPLE
    # The sample model has instance classes: semantic gets a new model. It takes RGB as grey.
    train.image.value = viewer.layers["rgb"]
    assert train.start_from.value == START_SAMPLE and train.depth.native.isHidden()
    train.mode.value = "semantic"
    assert train.start_from.value == START_NEW and not train.depth.native.isHidden()
    train.mode.value = "instances"
    assert train.start_from.value == START_SAMPLE
    # Once the user picks, the widget stops choosing.
    train.start_from.value = START_NEW
    train.mode.value = "semantic"
    train.mode.value = "instances"
    assert train.start_from.value == START_NEW


def test_without_the_packaged_model_it_starts_from_a_new_one(make_napari_viewer, monkeypatch):
    from napari_unet import _sample_data

    monkeypatch.setattr(_sample_data, "sample_model_path", lambda: None)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.uint8), name="grey")
    train = TrainWidget(viewer)
    assert train.start_from.value == START_NEW and START_SAMPLE not in train.start_from.choices


def test_validation_plot_says_when_nothing_is_held_out(make_napari_viewer, qtbot, small_cells):
    from napari_unet._widgets.train import IOU_TITLE

    image, labels = small_cells  # 4 painted cells: fewer than min_val_objects, all of them train
    viewer, train = _setup(make_napari_viewer, image, labels, iterations=3)
    _run(qtbot, train, train.start_button)
    assert train.state.state == "done", train.state.text()
    title = train.curves.iou_title
    assert title == "validation IoU: none (under 8 painted)" and train.curves.points["iou"] == ([], [])
    # Ten painted squares: two are held out, the plot gets its points and its plain title back.
    many = np.ones(labels.shape, labels.dtype)
    for k in range(10):
        many[4 + 9 * k:9 + 9 * k, 40:46] = k + 2
    viewer.layers["painted"].data = many
    _run(qtbot, train, train.start_button)
    assert train.state.state == "done", train.state.text()
    assert train.curves.iou_title == IOU_TITLE and len(train.curves.points["iou"][0]) >= 1


def test_where_to_paint_next_shows_uncertainty_and_places_on_the_current_plane(make_napari_viewer, qtbot,
                                                                               small_cells, notes,
                                                                               no_threads_left):
    image, labels = small_cells
    stack, painted = np.stack([image, image[::-1]]), np.stack([labels, np.zeros_like(labels)])
    viewer, train = _setup(make_napari_viewer, stack, painted, iterations=2)
    viewer.layers["cells"].scale = (1.0, 0.5, 0.5)
    viewer.layers["cells"].translate = (0, 10, 20)
    assert not train.suggest_button.isEnabled()  # nothing trained yet
    _run(qtbot, train, train.start_button)
    assert train.suggest_button.isEnabled()
    viewer.dims.set_current_step(0, 1)
    viewer.layers.selection.active = viewer.layers["painted"]
    _run(qtbot, train, train.suggest_button)
    assert train.state.state == "done", train.state.text()
    u = viewer.layers["cells (plane 1) [uncertainty]"]
    points = viewer.layers["cells (plane 1) [paint next]"]
    assert u.data.shape == (96, 96) and 0.0 <= u.data.min() and u.data.max() <= 1.0
    assert np.allclose(u.scale, (0.5, 0.5)) and np.allclose(u.translate, (10, 20))
    assert 1 <= len(points.data) <= 5 and points.features["rank"].tolist() == list(range(1, len(points.data) + 1))
    assert "places to paint next marked on plane 1" in train.state.text()
    # The map is the one of the plane shown, not of the painted plane.
    from napari_unet.quality import paint_next

    def direct(plane):
        gen = paint_next(train.current.model, stack[plane], train.current.metadata)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value.uncertainty

    d1, d0 = np.abs(u.data - direct(1)).mean(), np.abs(u.data - direct(0)).mean()
    assert d1 < 0.2 * d0, (d1, d0)
    assert viewer.layers.selection.active == viewer.layers["painted"]  # the user goes on painting
    assert notes["error"] == []
    # Again: the same layers are updated, not new ones added.
    n_layers = len(viewer.layers)
    _run(qtbot, train, train.suggest_button)
    assert len(viewer.layers) == n_layers


def test_where_to_paint_next_needs_a_model(make_napari_viewer, small_cells, notes):
    image, labels = small_cells
    viewer, train = _setup(make_napari_viewer, image, labels)
    train.suggest()
    assert notes["error"] and "train a model first" in notes["error"][0]
    assert train.runner.worker is None


def test_a_multichannel_stack_trains_with_its_live_preview(make_napari_viewer, qtbot, small_cells, notes,
                                                           no_threads_left):
    image, labels = small_cells
    two = np.stack([image, image[::-1]])  # (C, Y, X), not RGB: napari shows the channels as planes
    viewer, train = _setup(make_napari_viewer, two, labels, iterations=2)
    viewer.layers["cells"].scale = (1.0, 0.5, 0.5)
    viewer.layers["cells"].translate = (0, 10, 20)
    assert train.live_preview.value
    _run(qtbot, train, train.start_button)
    assert train.state.state == "done", train.state.text()
    assert notes["error"] == []
    assert train.current.model.config.in_channels == 2
    preview = viewer.layers["cells [U-Net preview]"]
    # The visible part of the image (both channels went into the network), on the image's grid.
    assert preview.data.ndim == 2 and 32 <= min(preview.data.shape) and max(preview.data.shape) <= 96
    assert np.allclose(preview.scale, (0.5, 0.5))
    # Where to paint next also takes both channels (not the channel napari shows as the current plane).
    with qtbot.waitSignal(train.runner.finished, timeout=120_000):
        train.suggest_button.click()
    assert notes["error"] == [], notes["error"]
    uncertainty = viewer.layers["cells [uncertainty]"]
    assert uncertainty.data.shape == image.shape and np.allclose(uncertainty.scale, (0.5, 0.5))


def test_a_destroyed_widget_leaves_no_handler_on_the_viewer(make_napari_viewer, qtbot):
    from napari_unet._widgets import SegmentWidget

    viewer = make_napari_viewer()
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    events = [camera.events.center, camera.events.zoom, viewer.dims.events.current_step,
              viewer.layers.events.removed, viewer.layers.events.inserted]
    before = [len(e.callbacks) for e in events]
    widgets = [TrainWidget(viewer), SegmentWidget(viewer)]
    assert [len(e.callbacks) for e in events] > before
    for w in widgets:
        with qtbot.waitSignal(w.destroyed, timeout=10_000):
            w.deleteLater()
    assert [len(e.callbacks) for e in events] == before


def test_without_pyqtgraph_the_curves_are_a_line_of_text(make_napari_viewer, monkeypatch):
    """napari does not depend on pyqtgraph: a plugin-manager install without it still trains,
    with the latest loss and IoU as text instead of the plot."""
    import sys

    from qtpy.QtWidgets import QLabel

    from napari_unet._widgets.train import Curves

    monkeypatch.setitem(sys.modules, "pyqtgraph", None)  # import pyqtgraph now raises ImportError
    viewer = make_napari_viewer()
    train = TrainWidget(viewer)
    assert isinstance(train.curves.widget, QLabel) and "install pyqtgraph" in train.curves.widget.text()
    curves = Curves()
    curves.add("loss", 1, 0.75)
    curves.add("iou", 5, 0.5)
    curves.add("loss", 5, 0.25)
    assert curves.widget.text() == "training loss 0.250, validation IoU 0.500"
    assert curves.points == {"loss": ([1, 5], [0.75, 0.25]), "iou": ([5], [0.5])}
    curves.clear()
    assert curves.points == {"loss": ([], []), "iou": ([], [])}
    assert curves.widget.text() == "training loss: none yet"  # not the previous run's
