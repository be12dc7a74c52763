"""Export masks widget (driven through its controls), the widgets' manifest and their light imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import tifffile

from napari_unet._widgets import ExportWidget


def _setup(make_napari_viewer):
    viewer = make_napari_viewer()
    a = np.zeros((3, 20, 30), np.int32)
    a[1, 5:9, 5:12] = 7
    a[2, 10:15, 3:6] = 300
    viewer.add_labels(a, name="cells [U-Net]", scale=(2.0, 0.5, 0.5))
    viewer.add_labels(np.arange(12, dtype=np.uint8).reshape(3, 4), name="painted/labels")
    export = ExportWidget(viewer)
    viewer.window.add_dock_widget(export, name="Export masks")
    return viewer, export


def _export(qtbot, export):
    with qtbot.waitSignal(export.runner.finished, timeout=60_000):
        export.export_button.click()


def test_export_one_layer_to_a_file(make_napari_viewer, qtbot, tmp_path, notes, no_threads_left):
    viewer, export = _setup(make_napari_viewer)
    export.layers.value = [viewer.layers["cells [U-Net]"]]
    export.file.value = str(tmp_path / "masks")  # no suffix: .tif is added
    _export(qtbot, export)
    path = tmp_path / "masks.tif"
    with tifffile.TiffFile(path) as tif:
        data = tif.asarray()
        assert tif.is_imagej and tif.series[0].axes == "ZYX"
        assert tif.imagej_metadata.get("spacing") == 2.0
        xres = tif.pages[0].tags["XResolution"].value
    np.testing.assert_array_equal(data, viewer.layers["cells [U-Net]"].data)
    assert data.dtype == np.uint16  # int32 labels up to 300, stored losslessly in ImageJ's uint16
    assert xres[0] / xres[1] == 2.0  # 0.5 per pixel
    assert export.state.state == "done" and str(path) in notes["info"][-1]


def test_export_several_layers_to_a_folder_asks_before_overwriting(make_napari_viewer, qtbot, tmp_path, monkeypatch,
                                                                   notes, no_threads_left):
    viewer, export = _setup(make_napari_viewer)
    export.layers.value = list(viewer.layers)
    export.target.value = "a folder"
    export.folder.value = str(tmp_path)
    _export(qtbot, export)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["cells [U-Net].tif", "painted_labels.tif"]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "painted_labels.tif"), viewer.layers[1].data)
    assert tifffile.imread(tmp_path / "painted_labels.tif").dtype == np.uint8

    # Second export: the question is asked; "no" leaves the files alone, "yes" replaces them.
    viewer.layers[1].data = np.full((3, 4), 9, np.uint8)
    asked = []
    monkeypatch.setattr("napari_unet._widgets._common.ask_overwrite", lambda parent, paths: asked.append(paths))
    export.export_button.click()  # answered "no" (None): nothing starts
    assert export.runner.worker is None and len(asked[0]) == 2
    assert tifffile.imread(tmp_path / "painted_labels.tif")[0, 0] == 0
    monkeypatch.setattr("napari_unet._widgets._common.ask_overwrite", lambda parent, paths: True)
    _export(qtbot, export)
    assert tifffile.imread(tmp_path / "painted_labels.tif")[0, 0] == 9
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_export_errors_are_one_line_notifications(make_napari_viewer, tmp_path, notes):
    viewer, export = _setup(make_napari_viewer)
    export.export_button.click()
    assert "choose at least one Labels layer" in notes["error"][-1]
    export.layers.value = list(viewer.layers)
    export.file.value = str(tmp_path / "a.tif")
    export.export_button.click()
    assert "several layers go to a folder" in notes["error"][-1]
    export.target.value = "a folder"
    export.folder.value = str(tmp_path / "missing")
    export.export_button.click()
    assert "does not exist" in notes["error"][-1]
    assert export.runner.worker is None and not list(tmp_path.iterdir())


def test_widget_modules_do_not_import_torch():
    code = ("import sys, napari_unet._widgets.train, napari_unet._widgets.segment, napari_unet._widgets.export, "
            "napari_unet._writer, napari_unet._sample_data\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_manifest_contributes_the_three_widgets_writer_and_samples():
    from npe2 import PluginManifest

    contrib = PluginManifest.from_distribution("napari-unet").contributions
    assert [w.display_name for w in contrib.widgets] == ["Train U-Net", "Segment with U-Net", "Export masks"]
    assert [s.key for s in contrib.sample_data] == ["cells", "stack", "volume"]
    assert contrib.writers[0].layer_types == ["labels"] and ".tif" in contrib.writers[0].filename_extensions


def test_gui_command_docks_the_widgets_and_opens_the_sample(qtbot, monkeypatch):
    import napari

    from napari_unet import cli

    opened = []
    monkeypatch.setattr(napari, "run", lambda *a, **k: opened.append(napari.current_viewer()))
    assert cli.main(["gui", "--sample"]) == 0
    viewer = opened[0]
    try:
        from napari_unet._widgets import SegmentWidget, TrainWidget

        kinds = {type(w) for w in viewer.window.dock_widgets.values()}
        assert kinds >= {TrainWidget, SegmentWidget, ExportWidget}
        assert [layer.name for layer in viewer.layers] == ["nuclei", "painted labels"]
    finally:
        viewer.close()
