"""Segment with U-Net: runs :func:`napari_unet.inference.predict` in a worker, results as editable Labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import napari.layers
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, LineEdit, RadioButtons, SpinBox
from napari.utils import progress
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget
from superqt import QCollapsible

from .. import _sample_data
from ..errors import BAD_INPUT_ERRORS
from . import _common
from ._common import ModelEntry, State, StateLabel, WorkerRunner, follow_layers, layer_picker
from .share import BioimageioExport

__all__ = ["SegmentWidget", "training_labels_from_corrected"]

_FILE_ENTRY = ModelEntry(name="model file...")
#: Trained models (held in memory) the model list keeps, most recent first.
KEEP_TRAINED = 3
_RING = 4  # px of background painted around corrected cells, as paint_sparse_labels does


def training_labels_from_corrected(current: np.ndarray, predicted: np.ndarray | None = None,
                                   only_edited: bool = False, *, painted: np.ndarray | None = None,
                                   semantic: bool = False) -> np.ndarray:
    """Turn a (corrected) U-Net output into painted training labels (0 unlabelled, 1 background, 2.. objects).

    Parameters
    ----------
    current : numpy.ndarray
        The output Labels layer as the user left it: 0 background, ``k >= 1`` an object
        (instances) or class ``k`` (semantic).
    predicted : numpy.ndarray, optional
        The output as the U-Net produced it (needed for ``only_edited``).
    only_edited : bool
        ``False``: the whole image becomes training labels (background -> 1, ``k`` -> ``k + 1``),
        for outputs the user has checked everywhere. ``True``: only the objects the user
        edited (any pixel changed) become objects, with a ring of background around them,
        and pixels the user erased become background; everything else stays 0 (unlabelled),
        so errors the user did not look at are not learnt.
    painted : numpy.ndarray, optional
        With ``only_edited``: labels painted before (the first painting, or the previous
        round's training labels), kept: the corrected cells are added to them as painted
        cells (new ids after the painted ones), and their background ring never covers a
        painted pixel.
    semantic : bool
        ``current`` holds classes, not objects: an edited object is the connected region of
        one class that holds a changed pixel (not every pixel of that class in the image).
    """
    from scipy import ndimage as ndi

    current = np.asarray(current)
    if not only_edited:
        dtype = np.uint32 if int(current.max(initial=0)) >= np.iinfo(np.uint16).max - 1 else np.uint16
        return (current.astype(np.int64) + 1).astype(dtype)
    if predicted is None or predicted.shape != current.shape:
        raise ValueError("the U-Net output has changed shape since it was predicted; segment again")
    if painted is not None and np.shape(painted) != current.shape:
        painted = None
    changed = current != predicted
    if not changed.any():
        raise ValueError("no cell was edited: correct some cells with the paint tools first, or untick "
                         "'Only cells I edited' to train on the whole result")
    # An edited object: one that gained pixels, or one that lost some (trimmed) and is still there.
    if semantic:
        edited = np.zeros(current.shape, bool)
        touched = np.union1d(np.unique(current[changed]), np.unique(predicted[changed]))
        for k in touched[touched > 0]:
            regions, _ = ndi.label(current == k)
            near = ndi.binary_dilation(changed & ((current == k) | (predicted == k)))
            hit = np.unique(regions[near & (current == k)])
            edited |= np.isin(regions, hit[hit > 0])
        values = current.astype(np.int64) + 1  # class k -> k + 1, as the whole-image conversion
    else:
        ids = np.union1d(np.unique(current[changed]), np.intersect1d(np.unique(predicted[changed]), current))
        edited = np.isin(current, ids[ids > 0])
        offset = int(np.asarray(painted).max(initial=1)) - 1 if painted is not None else 0
        values = current.astype(np.int64) + 1 + max(offset, 0)  # after the painted ids
    top = int(values[edited].max(initial=1))
    if painted is not None:
        top = max(top, int(np.asarray(painted).max(initial=0)))
    dtype = np.uint32 if top >= np.iinfo(np.uint16).max - 1 else np.uint16
    out = np.zeros(current.shape, dtype) if painted is None else np.asarray(painted).astype(dtype)
    ring = ndi.binary_dilation(edited, iterations=_RING) & (current == 0)
    background = ring | (changed & (current == 0))
    if painted is not None:
        background &= np.asarray(painted) == 0
    out[background] = 1
    out[edited] = values[edited]
    return out


#: Beyond this many changed voxels a new result replaces the layer's data without an undo step.
UNDO_LIMIT = 1 << 24


def _update_labels_undoably(layer, new: np.ndarray, index: tuple = ()) -> None:
    """Write ``new`` into ``layer.data[index]`` through ``Labels.data_setitem`` so napari's undo works.

    Only the changed pixels are written (one undo step). A shape or dtype change replaces
    the data instead (napari then starts a fresh undo history), and so does a change of
    more than :data:`UNDO_LIMIT` voxels (a volume segmented again: napari's undo step would
    hold three int64 indices per changed voxel, gigabytes for a large volume).
    """
    current = layer.data[index] if index else layer.data
    if current.shape != new.shape or int(new.max(initial=0)) > np.iinfo(layer.data.dtype).max:
        if index:
            raise ValueError("the output layer no longer fits the image; delete it and segment again")
        layer.data = new
        return
    diff = current != new
    if not index and int(np.count_nonzero(diff)) > UNDO_LIMIT:
        layer.data = new
        return
    changed = np.nonzero(diff)
    del diff
    if changed[0].size == 0:
        return
    full = tuple(np.full(changed[0].shape, i, dtype=np.intp) for i in index) + changed
    layer.data_setitem(full, new[changed])


def _segment_job(model_source: Any, metadata: dict | None, image: np.ndarray, config, rgb: bool,
                 current: tuple[int, ...] | None, stack_kind: str = "independent planes",
                 axis_labels: tuple[str, ...] = ()):
    """Worker thread: load the model if needed, then drain :func:`predict` (yielding its events).

    Returns ``(prediction, plane_index, metadata)``; ``plane_index`` is the index over the
    image's leading axes when only the current plane was segmented, else ``None``.
    """
    import dataclasses

    _common.import_engine()
    from ..inference import predict
    from ..io import load_model

    if isinstance(model_source, str):
        model, metadata = load_model(model_source)
    else:
        model = model_source
    channel_axis = _common.layer_channel_axis(image.shape, rgb, model.config.in_channels)
    labels = _common.spatial_axis_labels(axis_labels, rgb, channel_axis, image.ndim)
    axes = _common.stack_axes(stack_kind, image.ndim - (channel_axis is not None), labels)
    config = dataclasses.replace(config, channel_axis=channel_axis, axes=axes)
    planes = plane = None
    if current is not None:
        spatial = [a for a in range(image.ndim) if a != channel_axis][-2:]
        lead_axes = [a for a in range(image.ndim) if a != channel_axis and a not in spatial]
        if lead_axes:
            plane = tuple(int(current[a]) for a in lead_axes)
            planes = [plane]
    pred = yield from predict(model, image, config=config, metadata=metadata, planes=planes)
    return pred, plane, metadata


class SegmentWidget(QWidget):
    """Segment with U-Net: model picker, image picker, output options, Run / Cancel.

    Results go to a Labels layer ``"<image> [U-Net]"`` with the image's scale and
    translate; running again updates that layer (undoably) instead of adding one. The
    user's own layers are never modified. A stack set to "3D volume" ("Stack is", from the
    layer's axis labels) is segmented as 3D objects with the "3D method" and "Voxel size"
    (:attr:`napari_unet.config.PredictConfig.axes`, ``volume``, ``voxel_size``).

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer whose Image layers are listed and where results appear.
    """

    #: How the other widgets of the viewer find this one (:func:`._common.find_docked`).
    ROLE = "segment"

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.runner = WorkerRunner(self)
        self._models: list[ModelEntry] = []
        sample = _sample_data.sample_model_path()
        if sample is not None:
            self._models.append(ModelEntry(name="sample model: cells (packaged)", path=str(sample)))
        self._outputs: list[_Output] = []
        self._job_image = None
        self._job_entry = None
        self._job_layers: tuple = ()
        self._pbar = None

        self.model = ComboBox(label="Model", choices=self._model_choices)
        self.model_file = FileEdit(label="Model file", mode="r", filter=_common.MODEL_FILE_FILTER)
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        self.image = layer_picker(napari_viewer, napari.layers.Image, "Image")
        self.output = ComboBox(label="Output", choices=["as trained", "instances", "semantic"], value="as trained")
        self.probabilities = CheckBox(label="Also probabilities", value=False)
        self.flips = CheckBox(label="Mirror-average (4x time)", value=False,
                              tooltip="Test-time augmentation: average the predictions of the image and its "
                                      "three mirror images: smoother outlines, four times the compute; it "
                                      "does not help every model (see docs/design.md).")
        self.scope = RadioButtons(label="Planes", choices=["current plane", "whole stack"], value="whole stack",
                                  orientation="horizontal")
        self.stack_kind = ComboBox(label="Stack is", choices=list(_common.STACK_KINDS), value="independent planes",
                                   tooltip="3D volume: each volume is segmented in 3D (one object per cell across "
                                           "planes); time series and independent planes: plane by plane. Set from "
                                           "the layer's axis labels (z, t) when it has them.")
        self.volume_method = ComboBox(label="3D method", choices=[("3D watershed", "3d"),
                                                                  ("orthogonal views (slower)", "orthogonal"),
                                                                  ("stitch planes", "stitch")], value="3d",
                                      tooltip="3D watershed: the YX planes' probabilities, seeds and watershed in 3D. "
                                              "Orthogonal views: also the ZX and ZY planes, averaged (better for "
                                              "cells touching along Z; several times the time). Stitch planes: 2D "
                                              "objects linked to the plane above by overlap.")
        self.voxel_size = LineEdit(label="Voxel size (Z, Y, X)", value="1, 1, 1",
                                   tooltip="From the layer's scale; the Z step makes the side views isotropic and "
                                           "the size limits volumes.")
        self.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.device_info = QLabel("")
        self.tile_size = SpinBox(label="Tile size (0 = auto)", value=0, min=0, max=8192, step=16)
        self.precision = ComboBox(label="Precision", choices=["auto", "fp32", "bf16", "fp16"], value="auto")
        self.min_size = SpinBox(label="Smallest cell (px, 0 = auto)", value=0, min=0, max=100000,
                                tooltip="Cells with fewer pixels are removed. Auto: 15 % of the median area "
                                        "of the cells the model was trained on (15 px if unknown).")
        self.seed_threshold = FloatSpinBox(
            label="Seed threshold (0 = auto)", value=0.0, min=0.0, max=0.95, step=0.05,
            tooltip="Cell-interior probability above which a pixel seeds a cell: lower finds more cells and splits "
                    "fewer, higher merges fewer touching ones. Auto: 0.4 for planes, 0.5 for volumes. Instance "
                    "outputs only.")
        self.foreground_threshold = FloatSpinBox(
            label="Foreground threshold (0 = auto)", value=0.0, min=0.0, max=0.95, step=0.05,
            tooltip="Probability of cell (interior + boundary) above which a pixel belongs to a cell: higher gives "
                    "tighter outlines. Auto: 0.6 for planes, 0.5 for volumes. Instance outputs only.")
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        # Ticked by default: after a handful of corrections the rest of the result still holds
        # errors, and training on them as if right gained little (docs/fewshot.md, --whole-round).
        self.only_edited = CheckBox(label="Only cells I edited", value=True,
                                    tooltip="Ticked: the cells you corrected (and what you erased) are added to "
                                            "what you painted before; the rest stays unlabelled. Unticked: the "
                                            "whole result becomes training labels - check it everywhere first.")
        self.to_training_button = QPushButton("Use corrected result as training labels")
        self.state = StateLabel()
        self.exporter = BioimageioExport(self, self._export_source)

        layout = QVBoxLayout(self)
        layout.addWidget(Container(widgets=[self.model, self.model_file], labels=True).native)
        layout.addWidget(self.model_info)
        layout.addWidget(Container(widgets=[self.image, self.output, self.probabilities, self.flips, self.scope,
                                            self.stack_kind, self.volume_method, self.voxel_size, self.device],
                                   labels=True).native)
        layout.addWidget(self.device_info)
        advanced = QCollapsible("Options")
        advanced.addWidget(Container(widgets=[self.tile_size, self.precision, self.min_size, self.seed_threshold,
                                              self.foreground_threshold], labels=True).native)
        layout.addWidget(advanced)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        layout.addWidget(self.state)
        layout.addWidget(self.only_edited.native)
        layout.addWidget(self.to_training_button)
        layout.addWidget(self.exporter.button)
        layout.addStretch(1)

        self.model.changed.connect(self._on_model)
        self.image.changed.connect(self._on_image)
        self.stack_kind.changed.connect(self._on_stack_kind)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.to_training_button.clicked.connect(self.make_training_labels)
        follow_layers(napari_viewer, self.reset_choices, self)
        _common.connect_while_alive(self, [(napari_viewer.layers.events.removed, self._on_layer_removed)])
        self._pull_trained_models()
        self._on_model()
        self._on_image()
        self._set_running(False)

    # ---- models ---------------------------------------------------------------------------------

    def _model_choices(self, _widget=None):
        return [(m.name, m) for m in self._models] + [(_FILE_ENTRY.name, _FILE_ENTRY)]

    def _pull_trained_models(self) -> None:
        """List the models published by Train widgets already docked in this viewer."""
        for trainer in _common.find_docked(self.viewer, "train"):
            entry = trainer.published_model
            if entry is not None and all(m is not entry for m in self._models):
                self._models.insert(0, entry)

    def use_model(self, entry: ModelEntry) -> None:
        """Add ``entry`` to the model list and select it (the Train widget calls this).

        Trained models are kept in memory: only the :data:`KEEP_TRAINED` most recent stay in
        the list (a saved model file can be picked again with "model file...").
        """
        models = [entry] + [m for m in self._models if m is not entry and
                            not (m.model is not None and m.name == entry.name)]
        trained = [m for m in models if m.model is not None]
        dropped = {id(m) for m in trained[KEEP_TRAINED:]}
        self._models = [m for m in models if id(m) not in dropped]
        # magicgui keeps the items it already shows and appends new ones: emptied first, the
        # list shows the models in this order (the latest trained at the top).
        self.model.native.blockSignals(True)
        try:
            self.model.native.clear()
        finally:
            self.model.native.blockSignals(False)
        self.model.reset_choices()
        self.model.value = entry
        self._on_model()

    def _on_model(self, *_):
        entry = self.model.value
        self.model_file.visible = entry is _FILE_ENTRY
        self.model_info.setText(entry.describe() if entry is not None and entry is not _FILE_ENTRY else "")

    def _selected_model(self) -> tuple[Any, dict | None]:
        entry = self.model.value
        if entry is None:
            raise ValueError("choose a model: train one, use the sample model or pick a model file")
        if entry is _FILE_ENTRY:
            path = str(self.model_file.value)
            if path in ("", "."):
                raise ValueError("choose a model file (*.safetensors, or a bioimage.io *.zip) first")
            return path, None
        if entry.model is not None:
            return entry.model, dict(entry.metadata)
        return entry.path, None

    def _export_source(self) -> tuple[Any, Any, str]:
        """What "Export for bioimage.io..." writes: the selected model, with the image layer as test data."""
        from pathlib import Path

        model_source, metadata = self._selected_model()
        if isinstance(model_source, str):
            return model_source, self.image.value, Path(model_source).stem
        return (model_source, metadata), self.image.value, self.model.value.name

    # ---- layers ---------------------------------------------------------------------------------

    def reset_choices(self, *_):
        self._pull_trained_models()
        self.image.reset_choices()
        self.model.reset_choices()

    def _on_image(self, *_):
        layer = self.image.value
        stack = layer is not None and layer.ndim > 2
        self.scope.enabled = stack
        self._stack = stack
        self.stack_kind.visible = stack
        if stack:
            self.stack_kind.value = _common.stack_kind_from_axis_labels(tuple(layer.axis_labels))
            zyx = [abs(float(v)) for v in np.asarray(layer.scale)[-3:]]
            self.voxel_size.value = ", ".join(f"{v:g}" for v in zyx)
        self._on_stack_kind()

    def _on_stack_kind(self, *_):
        volume = self._stack_kind() == "3D volume"
        self.volume_method.visible = volume
        self.voxel_size.visible = volume

    def _record(self, image_layer) -> _Output | None:
        for rec in self._outputs:
            if rec.image == image_layer and rec.labels in self.viewer.layers:
                return rec
        return None

    def output_layer(self, image_layer) -> napari.layers.Labels | None:
        """The Labels layer this widget made for ``image_layer``, if it is still in the viewer."""
        rec = self._record(image_layer) if image_layer is not None else None
        return rec.labels if rec is not None else None

    def _on_layer_removed(self, event) -> None:
        gone = event.value
        self._outputs = [r for r in self._outputs if not (r.image == gone or r.labels == gone)]
        for r in self._outputs:
            if r.probabilities is not None and r.probabilities == gone:
                r.probabilities = None
            if r.training is not None and r.training == gone:
                r.training = None
        if self.runner.running and any(gone == layer for layer in self._job_layers):
            self.runner.stop(f"the layer '{event.value.name}' was removed")
            self.state.set_state(State.CANCELLING, "input layer removed")

    # ---- running --------------------------------------------------------------------------------

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.to_training_button.setEnabled(not running)

    def prediction_config(self):
        """The :class:`~napari_unet.config.PredictConfig` the widget's settings describe."""
        from ..config import PredictConfig, parse_voxel_size

        volume = self._stack_kind() == "3D volume"
        return PredictConfig(output=None if self.output.value == "as trained" else self.output.value,
                             probabilities=bool(self.probabilities.value),
                             tile_size=int(self.tile_size.value) or None, device=self.device.value,
                             precision=self.precision.value, min_size=int(self.min_size.value) or None,
                             seed_threshold=float(self.seed_threshold.value) or None,
                             foreground_threshold=float(self.foreground_threshold.value) or None,
                             flips=bool(self.flips.value), volume=self.volume_method.value,
                             voxel_size=parse_voxel_size(self.voxel_size.value) if volume else None)

    def _stack_kind(self) -> str:
        """What the chosen image's leading axes are ("Stack is"); a 2D image has none."""
        return self.stack_kind.value if getattr(self, "_stack", False) else "independent planes"

    def run(self) -> None:
        """Copy the image (main thread) and segment it in a worker thread."""
        if self.runner.running:
            return
        layer = self.image.value
        try:
            if layer is None:
                raise ValueError("add or choose an image layer to segment")
            model_source, metadata = self._selected_model()
            config = self.prediction_config()
        except ValueError as e:
            _common.notify_error(e)
            return
        image = _common.copy_layer_data(layer)
        current = None
        if layer.ndim > 2 and self.scope.value == "current plane":
            point = self.viewer.dims.point[-layer.ndim:]
            idx = np.round(layer.world_to_data(point)).astype(int)
            shape = image.shape
            current = tuple(int(np.clip(i, 0, n - 1)) for i, n in zip(idx, shape))
        self._job_layers = (layer,)
        self._job_image = layer
        kind = self._stack_kind()
        self._job_meta = {"scale": np.asarray(layer.scale), "translate": np.asarray(layer.translate),
                          "name": layer.name, "rgb": bool(layer.rgb), "data_ndim": image.ndim, "stack_kind": kind,
                          "axis_labels": tuple(layer.axis_labels)}
        self._job_result = None
        self._job_entry = self.model.value  # the entry that runs (the user may pick another meanwhile)
        self._set_running(True)
        self.state.set_state(State.SEGMENTING, layer.name)
        self._pbar = progress(total=100, desc=f"U-Net: {layer.name}")
        rgb = bool(layer.rgb)
        axis_labels = tuple(layer.axis_labels)
        self.runner.start(lambda: _segment_job(model_source, metadata, image, config, rgb, current, kind, axis_labels),
                          yielded=self._on_yielded, returned=self._on_returned, errored=self._on_errored,
                          finished=self._on_finished)

    def cancel(self) -> None:
        if self.runner.stop("cancelled"):
            self.state.set_state(State.CANCELLING)
            self.cancel_button.setEnabled(False)

    def _on_yielded(self, ev) -> None:
        # napari's progress bar runs QApplication.processEvents() on every change (and may end
        # the run under us): update it at most once per percent, through a local reference.
        pbar = self._pbar
        if pbar is not None and ev.total:
            value = int(100 * ev.done / ev.total)
            if value != pbar.n:
                pbar.update(value - pbar.n)
        backend = ", OpenVINO" if ev.backend == "openvino" else ""
        self.device_info.setText(f"{self.device.value} \u2192 {ev.device} ({ev.precision}{backend})")
        if self.state.state is State.SEGMENTING:
            self.state.set_state(State.SEGMENTING, ev.message)

    def _on_returned(self, result) -> None:
        self._job_result = result

    def _on_errored(self, exc: BaseException) -> None:
        expected = isinstance(exc, BAD_INPUT_ERRORS)
        self.state.set_state(State.IDLE if expected else State.FAILED, _common.first_line(exc))
        hint = "" if expected else " (see the console for details)"
        _common.notify_error(f"Segmentation failed: {_common.first_line(exc)}{hint}")

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._set_running(False)
        result, self._job_result = self._job_result, None
        self._job_layers = ()
        image_layer, self._job_image = self._job_image, None
        entry, self._job_entry = self._job_entry, None
        if result is None:
            if self.runner.stop_reason and self.state.state is State.CANCELLING:
                self.state.set_state(State.IDLE, self.runner.stop_reason)
                if "removed" in self.runner.stop_reason:
                    _common.notify_warning(f"Segmentation stopped: {self.runner.stop_reason}")
            return
        pred, plane, meta = result
        if entry is not None and entry.model is None and meta:
            # A model read from a file: now that the worker has loaded it, say what it is, on the
            # entry that ran (and in the info line only if that entry is still the one shown).
            if entry is not _FILE_ENTRY:
                entry.metadata = dict(meta)
            if self.model.value is entry:
                self.model_info.setText(ModelEntry(name="", metadata=dict(meta)).describe())
        try:
            layer = self._show(pred, plane, image_layer)
        except ValueError as e:
            self.state.set_state(State.IDLE, _common.first_line(e))
            _common.notify_error(e)
            return
        n = int(pred.labels.max(initial=0)) if pred.output == "instances" else None
        self.state.set_state(State.DONE, f"{layer.name}" + (f": {n} cells" if n is not None and plane is None else ""))

    def _show(self, pred, plane, image_layer) -> napari.layers.Labels:
        """Create or update the output layer(s) on the main thread."""
        meta = self._job_meta
        labels = pred.labels
        nd = labels.ndim
        scale, translate = meta["scale"][-nd:], meta["translate"][-nd:]
        if len(scale) < nd:  # the channel axis was among the layer's dims
            scale = np.concatenate([np.ones(nd - len(scale)), scale])
            translate = np.concatenate([np.zeros(nd - len(translate)), translate])
        rec = self._record(image_layer) if image_layer is not None else None
        if rec is not None and rec.labels.data.shape != labels.shape:
            if plane is not None:
                raise ValueError("the output layer no longer fits the image; delete it and segment again")
            rec.labels.data = labels  # a new shape: napari starts a fresh undo history
            rec.labels.scale, rec.labels.translate = scale, translate
        elif rec is not None:
            if plane is None:
                _update_labels_undoably(rec.labels, labels)
            else:
                _update_labels_undoably(rec.labels, labels[plane], plane)
        else:
            data = labels if plane is None else np.zeros_like(labels)
            if plane is not None:
                data[plane] = labels[plane]
            axis_labels = _common.output_axis_labels(meta["stack_kind"], nd, meta["axis_labels"])
            out = self.viewer.add_labels(data, name=f"{meta['name']} [U-Net]", scale=scale, translate=translate,
                                         **({"axis_labels": axis_labels} if axis_labels else {}))
            rec = _Output(image=image_layer, labels=out)
            self._outputs = [r for r in self._outputs if not (image_layer is not None and r.image == image_layer)]
            if image_layer is not None:
                self._outputs.append(rec)
        rec.predicted = np.array(rec.labels.data, copy=True)
        rec.semantic = pred.output == "semantic"
        if pred.probabilities is not None:
            probs = pred.probabilities if plane is None else pred.probabilities[(slice(None), *plane)]
            self._show_probabilities(rec, probs, meta, scale if plane is None else scale[-2:],
                                     translate if plane is None else translate[-2:])
        return rec.labels

    def _show_probabilities(self, rec: _Output, probs, meta, scale, translate) -> None:
        layer = rec.probabilities
        if layer is not None and layer in self.viewer.layers and layer.data.shape == probs.shape:
            layer.data = probs
        else:
            rec.probabilities = self.viewer.add_image(
                probs, name=f"{meta['name']} [U-Net probabilities]", scale=np.concatenate([[1.0], scale]),
                translate=np.concatenate([[0.0], translate]), colormap="magma", contrast_limits=(0, 1), visible=False)

    # ---- human in the loop ----------------------------------------------------------------------

    def _painted_before(self, rec: _Output) -> np.ndarray | None:
        """The labels painted for this image so far: this widget's training-labels layer, else the
        labels layer a Train widget of this viewer trains on with this image."""
        if rec.training is not None and rec.training in self.viewer.layers:
            return np.asarray(rec.training.data)
        for trainer in _common.find_docked(self.viewer, "train"):
            layer = trainer.labels.value
            if trainer.image.value == rec.image and layer is not None and layer in self.viewer.layers:
                return np.asarray(layer.data)
        return None

    def make_training_labels(self) -> napari.layers.Labels | None:
        """Turn the (corrected) output of the selected image into a training Labels layer.

        A new layer ``"<image> [training labels]"`` in the painted convention (see
        :func:`training_labels_from_corrected`); pressing again updates that layer. The
        output layer itself is left as it is. With "Only cells I edited", the corrected
        cells are added to what was painted before (that layer, or else the labels the
        Train widget trains on for this image), so that Continue trains on both.
        """
        image_layer = self.image.value
        rec = self._record(image_layer) if image_layer is not None else None
        if rec is None:
            _common.notify_error("segment the image first: there is no U-Net output to turn into training labels")
            return None
        try:
            labels = training_labels_from_corrected(rec.labels.data, rec.predicted, bool(self.only_edited.value),
                                                    painted=self._painted_before(rec), semantic=rec.semantic)
        except ValueError as e:
            _common.notify_error(e)
            return None
        target = rec.training
        if target is not None and target in self.viewer.layers and target.data.shape == labels.shape:
            _update_labels_undoably(target, labels)
        else:
            target = self.viewer.add_labels(labels, name=f"{image_layer.name} [training labels]",
                                            scale=rec.labels.scale, translate=rec.labels.translate, opacity=0.6)
            rec.training = target
        _common.notify_info(f"'{target.name}' is ready: pick it as the labels layer in Train U-Net and press Start")
        return target


@dataclass
class _Output:
    """The layers this widget made for one image layer (strong references, dropped when a layer is
    removed). Layers are compared with ``==``, not ``is``: napari hands plugins proxies of them."""

    image: Any
    labels: Any
    predicted: np.ndarray | None = None  # the output as predicted, to find the user's edits
    semantic: bool = False  # the output holds classes, not objects
    probabilities: Any = None
    training: Any = None
