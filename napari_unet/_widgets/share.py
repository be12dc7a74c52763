"""The "Export for bioimage.io..." button of the Train and Segment widgets.

It translates the widget's model (a file, or a model trained in this session) and its image
layer into a call of :func:`napari_unet.bioimageio.export_steps`, run in a worker thread with
its own runner (exporting does not block segmenting, nor the other way round); the result
is a notification naming the package and what was checked.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import QPushButton, QWidget

from ..errors import BAD_INPUT_ERRORS
from . import _common

__all__ = ["BioimageioExport", "BUTTON_TEXT", "export_plane"]

BUTTON_TEXT = "Export for bioimage.io..."
FILTER = "bioimage.io model package (*.zip)"


def export_plane(data, rgb: bool, in_channels: int) -> tuple[np.ndarray, int | None]:
    """The middle plane of an image layer's ``data`` (a numpy or dask array), with its channels:
    ``(plane, channel_axis)`` for :func:`~napari_unet.bioimageio.export_steps`.

    The channels are where the Segment widget finds them (:func:`~._common.layer_channel_axis`).
    """
    cax = _common.layer_channel_axis(tuple(data.shape), rgb, in_channels)
    if rgb:
        idx = tuple(s // 2 for s in data.shape[:-3])
        return np.asarray(data[idx]), -1
    idx = tuple(slice(None) if a == cax else n // 2 for a, n in enumerate(data.shape[:-2]))
    return np.asarray(data[idx]), (None if cax is None else 0)


class BioimageioExport:
    """A button that exports the model ``source()`` returns: ``(model file or (UNet, metadata), image layer, name)``.

    ``source`` raises ``ValueError`` (shown as a notification) when there is no model yet.
    ``runner.finished`` is emitted once per export (tests wait on it).
    """

    def __init__(self, owner: QWidget, source: Callable[[], tuple[Any, Any, str]]):
        self.owner = owner
        self._source = source
        self.button = QPushButton(BUTTON_TEXT)
        self.button.setToolTip("Write the model as a BioImage Model Zoo package (zip) that Fiji/deepImageJ, "
                               "ilastik, QuPath and bioimageio.core can run; the image layer gives the test "
                               "input and cover. The package is validated before it is written.")
        self.runner = _common.WorkerRunner(owner)
        self.written: str | None = None
        self._allowed = True
        self.button.clicked.connect(lambda *_: self.export())

    def set_enabled(self, enabled: bool) -> None:
        """What the owner allows (no model yet, training running); a running export keeps it off."""
        self._allowed = bool(enabled)
        self.button.setEnabled(self._allowed and not self.runner.running)

    def export(self, path: str | None = None) -> bool:
        """Ask for the package name (unless ``path``) and start writing it; ``False`` if nothing started."""
        if self.runner.running:
            return False
        try:
            model_source, image_layer, name = self._source()
        except ValueError as e:
            _common.notify_error(e)
            return False
        if not path:
            path = _common.ask_save_path(self.owner, "Export for bioimage.io",
                                         f"{_common.safe_file_stem(name)}.zip", FILTER)
            if not path:
                return False
        if not str(path).lower().endswith(".zip"):
            path = f"{path}.zip"
            # The dialog asked about the name without .zip: ask about this one.
            if Path(path).exists() and not _common.ask_overwrite(self.owner, [path]):
                return False
        if not isinstance(model_source, str):
            # A snapshot, taken here: the Train widget may train the same network on meanwhile.
            model_source = copy.deepcopy(model_source)
        # A reference only (a dask or multiscale layer is not loaded): the worker reads one plane.
        data = None
        if image_layer is not None:
            data = image_layer.data[0] if getattr(image_layer, "multiscale", False) else image_layer.data
        rgb = bool(image_layer is not None and image_layer.rgb)

        def job():
            _common.import_engine()
            from ..bioimageio import export_steps
            from ..io import load_model

            source = load_model(model_source) if isinstance(model_source, str) else model_source
            image, channel_axis = (None, None) if data is None else \
                export_plane(data, rgb, source[0].config.in_channels)
            last = None
            for last in export_steps(source, path, name=name, image=image, channel_axis=channel_axis,
                                     overwrite=True):  # the dialogs asked before replacing a file
                yield last
            return last

        self.written = None
        self.button.setEnabled(False)
        self.button.setText("Exporting...")
        self.runner.start(job, yielded=self._on_yielded, returned=self._on_returned, errored=self._on_errored,
                          finished=self._on_finished)
        return True

    def _on_yielded(self, ev: dict) -> None:
        self.button.setText(f"Exporting: {ev['stage']}...")

    def _on_returned(self, last: dict | None) -> None:
        if last and "path" in last:
            self.written = str(last["path"])
            _common.notify_info(f"bioimage.io package written to {last['path']} "
                                f"(checked: {'; '.join(last['checks'])})")

    def _on_errored(self, exc: BaseException) -> None:
        hint = "" if isinstance(exc, BAD_INPUT_ERRORS) else " (see the console for details)"
        _common.notify_error(f"Export failed: {_common.first_line(exc)}{hint}")

    def _on_finished(self) -> None:
        self.button.setText(BUTTON_TEXT)
        self.button.setEnabled(self._allowed)
        if self.written is None and self.runner.stop_reason:
            _common.notify_warning(f"Export stopped: {self.runner.stop_reason}; nothing was written")
