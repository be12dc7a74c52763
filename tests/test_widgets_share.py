""""Export for bioimage.io..." in the Train and Segment widgets, and bioimage.io packages picked as models."""

from __future__ import annotations

import importlib.util
import io
import zipfile

import numpy as np
import pytest

from napari_unet._widgets import SegmentWidget, TrainWidget, _common
from napari_unet._widgets.share import BUTTON_TEXT, export_plane
from napari_unet._widgets.train import START_NEW
from napari_unet.io import load_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bioimageio.core") is None,
                                reason="needs the [bioimageio] extra (make test installs it)")


def _export(qtbot, widget, monkeypatch, path):
    """Click the export button, answering the file dialog with ``path``; wait for the job."""
    asked = []
    monkeypatch.setattr(_common, "ask_save_path", lambda *a: asked.append(a) or str(path))
    with qtbot.waitSignal(widget.exporter.runner.finished, timeout=120_000):
        widget.exporter.button.click()
        assert widget.exporter.button.text().startswith("Exporting") and not widget.exporter.button.isEnabled()
    assert widget.exporter.runner.worker is None
    assert widget.exporter.button.text() == BUTTON_TEXT and widget.exporter.button.isEnabled()
    return asked


def _train_widget(make_napari_viewer, small_cells):
    """A viewer with the cells and painted labels, and a Train widget set for a tiny 2-iteration network."""
    image, labels = small_cells
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="painted")
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="Train U-Net")
    train.start_from.value = START_NEW
    train.depth.value, train.width.value = 2, 4
    train.patch_size.value, train.batch_size.value = 64, 2
    train.budget_kind.value, train.budget.value = "iterations", 2
    return train


def test_segment_exports_the_selected_model_and_segments_with_the_package(make_napari_viewer, qtbot, small_cells,
                                                                         notes, tmp_path, monkeypatch,
                                                                         no_threads_left):
    image, _ = small_cells
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment with U-Net")
    asked = _export(qtbot, seg, monkeypatch, tmp_path / "shared")  # ".zip" is added
    pkg = tmp_path / "shared.zip"
    assert asked[0][2] == "cells_unet.zip"  # the model file's name proposed
    assert pkg.is_file() and notes["error"] == []
    assert any(f"bioimage.io package written to {pkg}" in m and "model test" in m for m in notes["info"])
    # The test input came from the image layer (96 x 96, mirrored to the 256 x 256 test size).
    x = np.load(io.BytesIO(zipfile.ZipFile(pkg).read("test_input.npy")))
    off = (256 - 96) // 2
    np.testing.assert_array_equal(x[0, 0, off:off + 96, off:off + 96], image.astype(np.float32))

    # The package, picked as the model file, segments as the packaged model does.
    with qtbot.waitSignal(seg.runner.finished, timeout=120_000):
        seg.run_button.click()
    from_file = viewer.layers["cells [U-Net]"].data.copy()
    seg.model.value = seg.model.choices[-1]  # "model file..."
    seg.model_file.value = str(pkg)
    with qtbot.waitSignal(seg.runner.finished, timeout=120_000):
        seg.run_button.click()
    assert seg.state.state == "done", seg.state.text()
    np.testing.assert_array_equal(viewer.layers["cells [U-Net]"].data, from_file)
    assert from_file.max() >= 3


def test_train_exports_only_a_trained_model(make_napari_viewer, qtbot, small_cells, notes, tmp_path, monkeypatch,
                                             no_threads_left):
    train = _train_widget(make_napari_viewer, small_cells)
    assert not train.exporter.button.isEnabled()
    assert train.exporter.export(str(tmp_path / "none.zip")) is False
    assert notes["error"] == ["train a model first"] and list(tmp_path.iterdir()) == []
    with qtbot.waitSignal(train.runner.finished, timeout=120_000):
        train.start_button.click()
        assert not train.exporter.button.isEnabled()  # not while training
    assert train.state.state == "done" and train.exporter.button.isEnabled()
    _export(qtbot, train, monkeypatch, tmp_path / "trained.zip")
    model, meta = load_model(tmp_path / "trained.zip")
    assert model.config == train.current.model.config and meta["training"]["iterations"] == 2
    assert notes["error"] == ["train a model first"]  # only the refusal before training


def test_failed_export_tells_one_line_and_writes_nothing(make_napari_viewer, qtbot, notes, tmp_path, monkeypatch,
                                                         no_threads_left):
    from napari_unet import bioimageio as bio

    monkeypatch.setattr(bio, "_normalised", lambda raw, meta: raw.astype(np.float32))  # a test output that fails
    viewer = make_napari_viewer()
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment with U-Net")
    _export(qtbot, seg, monkeypatch, tmp_path / "bad.zip")
    assert len(notes["error"]) == 1 and notes["error"][0].startswith("Export failed:")
    assert "model test failed" in notes["error"][0] and "\n" not in notes["error"][0]
    assert list(tmp_path.iterdir()) == []


def test_train_exports_the_weights_of_the_moment_it_was_asked(make_napari_viewer, qtbot, small_cells, notes,
                                                              tmp_path, monkeypatch, no_threads_left):
    """The worker writes a snapshot taken at the click: training on (Continue) cannot change the package;
    a name the dialog gave without .zip is asked about again when NAME.zip exists."""
    import torch

    train = _train_widget(make_napari_viewer, small_cells)
    with qtbot.waitSignal(train.runner.finished, timeout=120_000):
        train.start_button.click()
    model = train.current.model
    at_click = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "snap.zip").write_bytes(b"an older package")
    asked = []
    monkeypatch.setattr(_common, "ask_overwrite", lambda parent, paths: asked.append(paths) or False)
    assert train.exporter.export(str(tmp_path / "snap")) is False  # declined: nothing starts
    assert asked == [[str(tmp_path / "snap.zip")]] and (tmp_path / "snap.zip").read_bytes() == b"an older package"
    monkeypatch.setattr(_common, "ask_overwrite", lambda parent, paths: True)
    with qtbot.waitSignal(train.exporter.runner.finished, timeout=120_000):
        assert train.exporter.export(str(tmp_path / "snap"))
        with torch.no_grad():  # what training on would do, before the worker reads the weights
            for p in model.parameters():
                p.add_(1.0)
    exported, _ = load_model(tmp_path / "snap.zip")
    for key, value in exported.state_dict().items():
        assert torch.equal(value, at_click[key].to(value.dtype)), key
    assert notes["error"] == []


def test_test_plane_reads_one_plane_of_lazy_layers():
    import dask.array as da

    stack = da.from_array(np.arange(4 * 2 * 5 * 6, dtype=np.uint16).reshape(4, 2, 5, 6), chunks=(1, 1, 5, 6))
    plane, cax = export_plane(stack, rgb=False, in_channels=1)
    assert cax is None and isinstance(plane, np.ndarray)
    np.testing.assert_array_equal(plane, stack[2, 1].compute())
    plane, cax = export_plane(stack, rgb=False, in_channels=2)  # (T, C, Y, X): the channels kept
    assert cax == 0 and plane.shape == (2, 5, 6)
    np.testing.assert_array_equal(plane, stack[2].compute())
    rgb = np.zeros((3, 5, 6, 3), np.uint8)
    rgb[1] = 7
    plane, cax = export_plane(rgb, rgb=True, in_channels=1)
    assert cax == -1 and plane.shape == (5, 6, 3) and (plane == 7).all()
