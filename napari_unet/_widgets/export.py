"""Export masks: Labels layers -> ImageJ-compatible TIFF files (through ``io.write_labels_tiff``)."""

from __future__ import annotations

from pathlib import Path

import napari.layers
from magicgui.widgets import Container, FileEdit, RadioButtons
from qtpy.QtWidgets import QPushButton, QVBoxLayout, QWidget

from ..errors import BAD_INPUT_ERRORS
from . import _common
from ._common import State, StateLabel, WorkerRunner, follow_layers, layers_select

__all__ = ["ExportWidget", "label_tiff_kwargs"]


def label_tiff_kwargs(layer) -> dict:
    """``write_labels_tiff`` keywords for a Labels layer: axis letters and pixel sizes by axis.

    Pixel sizes are written only when the layer has a scale other than 1 on its y/x axes.
    """
    axes = _common.spatial_axes_letters(layer.ndim, tuple(layer.axis_labels))
    scale = {letter: float(s) for letter, s in zip(axes, layer.scale) if letter in "ZYX"}
    if all(abs(scale.get(k, 1.0) - 1.0) < 1e-12 for k in "ZYX"):
        scale = {}
    return {"axes": axes, "scale": scale}


def _export_job(items: list[tuple[str, object, dict]]):
    """Write each ``(path, data, kwargs)``; yields the path written (worker thread)."""
    from ..io import write_labels_tiff

    written = []
    for path, data, kwargs in items:
        write_labels_tiff(path, data, overwrite=True, **kwargs)
        written.append(path)
        yield path
    return written


class ExportWidget(QWidget):
    """Export masks: one or several Labels layers to a TIFF file or a folder of TIFFs.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer whose Labels layers are listed.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.layers = layers_select(napari_viewer, napari.layers.Labels, "Labels layers")
        self.target = RadioButtons(label="Save as", choices=["one file", "a folder"], value="one file",
                                   orientation="horizontal")
        self.file = FileEdit(label="File", mode="w", filter="TIFF (*.tif *.tiff)")
        self.folder = FileEdit(label="Folder", mode="d")
        self.export_button = QPushButton("Export")
        self.state = StateLabel()
        self.runner = WorkerRunner(self)

        layout = QVBoxLayout(self)
        layout.addWidget(Container(widgets=[self.layers, self.target, self.file, self.folder], labels=True).native)
        layout.addWidget(self.export_button)
        layout.addWidget(self.state)
        layout.addStretch(1)

        self.target.changed.connect(self._on_target)
        self.export_button.clicked.connect(self.export)
        follow_layers(napari_viewer, self.reset_choices, self)
        self._on_target()

    def reset_choices(self, *_):
        self.layers.reset_choices()

    def _on_target(self, *_):
        one_file = self.target.value == "one file"
        self.file.visible = one_file
        self.folder.visible = not one_file

    def planned_paths(self) -> list[tuple[str, object]]:
        """``(path, layer)`` pairs the current settings would write; ``ValueError`` if incomplete."""
        layers = list(self.layers.value or [])
        if not layers:
            raise ValueError("choose at least one Labels layer to export")
        if self.target.value == "one file":
            if len(layers) > 1:
                raise ValueError("several layers go to a folder: choose 'a folder' or select one layer")
            path = Path(self.file.value)
            if str(self.file.value) in ("", ".") or path.is_dir():
                raise ValueError("choose a file name ending in .tif")
            if path.suffix.lower() not in (".tif", ".tiff"):
                path = path.with_name(path.name + ".tif")
            return [(str(path), layers[0])]
        folder = Path(self.folder.value)
        if str(self.folder.value) in ("", ".") and not folder.is_dir():
            raise ValueError("choose a folder to write into")
        if not folder.is_dir():
            raise ValueError(f"the folder {folder} does not exist; choose an existing folder")
        names = [_common.safe_file_stem(layer.name) for layer in layers]
        seen: dict[str, int] = {}
        out = []
        for name, layer in zip(names, layers):
            k = seen.get(name, 0)
            seen[name] = k + 1
            out.append((str(folder / (f"{name}.tif" if k == 0 else f"{name}-{k + 1}.tif")), layer))
        return out

    def export(self) -> None:
        """Copy the layers' data (main thread) and write the files in a worker thread."""
        if self.runner.running:
            return
        try:
            planned = self.planned_paths()
        except ValueError as e:
            _common.notify_error(e)
            return
        existing = [p for p, _ in planned if Path(p).exists()]
        if existing and not _common.ask_overwrite(self, existing):
            self.state.set_state(State.IDLE, "nothing written")
            return
        items = [(p, _common.copy_layer_data(layer), label_tiff_kwargs(layer)) for p, layer in planned]
        self.export_button.setEnabled(False)
        self.state.set_state(State.EXPORTING, f"{len(items)} file(s)")
        self._written: list[str] = []
        self.runner.start(lambda: _export_job(items), yielded=self._written.append, errored=self._on_error,
                          finished=self._on_finished)

    def _on_error(self, exc: BaseException) -> None:
        self.state.set_state(State.FAILED if not isinstance(exc, BAD_INPUT_ERRORS) else State.IDLE,
                             _common.first_line(exc))
        _common.notify_error(f"Export failed: {_common.first_line(exc)}")

    def _on_finished(self) -> None:
        self.export_button.setEnabled(True)
        if self._written:
            where = self._written[0] if len(self._written) == 1 else f"{len(self._written)} files in " \
                f"{Path(self._written[0]).parent}"
            _common.notify_info(f"Masks written to {where}")
            if self.state.state is State.EXPORTING:
                self.state.set_state(State.DONE, f"wrote {where}")
