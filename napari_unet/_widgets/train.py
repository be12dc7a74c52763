"""Train U-Net: runs :func:`napari_unet.training.train` in a worker, with a live plot and a live preview.

How the trained model reaches the Segment widget: when a run ends, this widget publishes a
snapshot of the model (:attr:`TrainWidget.published_model`, plus the ``model_published``
signal) and hands it to every Segment widget docked in the same viewer, found through
napari's public ``viewer.window.dock_widgets``; a Segment widget opened later pulls it the
same way. The link is per viewer and visible in the code, with no module-level registry.
The snapshot is a copy because pressing Start again keeps training this widget's model in
place, which must not change a model that is segmenting at the same time.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import os
from typing import Any

import napari.layers
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, RadioButtons, SpinBox
from napari.utils import progress
from psygnal import Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget
from superqt import QCollapsible

from .. import _sample_data
from ..config import TrainConfig, default_model_config
from ..errors import BAD_INPUT_ERRORS
from ..jobs import relay
from . import _common
from ._common import ModelEntry, State, StateLabel, WorkerRunner, follow_layers, layer_picker
from .share import BioimageioExport

__all__ = ["TrainWidget", "train_config_from", "model_config_from", "PREVIEW_SIDE"]

#: Largest side of the preview crop (the visible part of the image, centred): the preview
#: runs in the training thread every few seconds and must stay cheap.
PREVIEW_SIDE = 384
#: The widget starts from the engine's defaults (config.py has no torch import).
DEFAULTS, DEFAULT_MODEL = TrainConfig(), default_model_config()
OPTIMIZERS = {"Adam (fine-tuning)": ("adam", DEFAULTS.learning_rate), "SGD, momentum 0.99 (paper)": ("sgd", 1e-2)}
START_CURRENT, START_NEW, START_FILE = "current model (continue)", "new model", "model file"
IOU_TITLE = "validation IoU"
START_SAMPLE = "sample cell model (fine-tune)"


def gui_threads(torch_threads: int) -> int:
    """CPU threads for training from the widget: all cores but one, which stays with the viewer.

    ``torch_threads`` is torch's own default (physical cores); CPUs this process may not
    use (affinity: taskset, SLURM, containers) are not counted. With every core busy in
    torch the GUI thread waits for one (``benchmarks/responsiveness.py``, docs/benchmarks.md).
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(min(torch_threads, usable) - 1, 1)


def train_config_from(s: dict[str, Any]):
    """The :class:`~napari_unet.config.TrainConfig` a widget state (a plain dict) describes."""
    from ..config import TrainConfig

    optimizer, _ = OPTIMIZERS[s["optimizer"]]
    seconds = s["budget_kind"] == "seconds"
    return TrainConfig(mode=s["mode"], iterations=None if seconds else int(s["budget"]),
                       max_time=float(s["budget"]) if seconds else None, patch_size=int(s["patch_size"]),
                       batch_size=int(s["batch_size"]), learning_rate=float(s["learning_rate"]), optimizer=optimizer,
                       augment=bool(s["augment"]), device=s["device"], rescale=bool(s.get("rescale", True)),
                       threads=int(s.get("threads") or 0) or None,  # None: the job picks, see gui_threads
                       side_views=bool(s.get("side_views", False)),
                       voxel_size=tuple(s["voxel_size"]) if s.get("side_views") and s.get("voxel_size") else None)


def model_config_from(s: dict[str, Any]):
    """The architecture of a new model (channels and classes are set by the training engine)."""
    from ..config import ModelConfig

    return ModelConfig(depth=int(s["depth"]), base_filters=int(s["width"]), padding=s["padding"],
                       batch_norm=bool(s["batch_norm"]))


@dataclasses.dataclass
class _Crop:
    """The image region the live preview segments (set on the main thread, read by the worker)."""

    image: np.ndarray
    plane: tuple[int, ...]  # indices of the leading (non-spatial) axes of the layer
    offset: tuple[int, int]  # (y, x) of the crop's top-left pixel in the layer


class _JobState:
    """What the worker thread shares with the main thread during one run."""

    def __init__(self):
        self.gen = None  # the engine's generator (closed on the main thread when the worker ends)
        # Replaced, never mutated, by the main thread when the view moves; the worker reads the
        # reference once per preview (an atomic read in Python), so it needs no lock.
        self.crop: _Crop | None = None
        self.metadata: dict | None = None  # the run's metadata (worker thread only): the preview's cell sizes


def _train_job(state: _JobState, images, labels, config, kwargs: dict, preview_mode: str | None,
               channel_axis: int | None):
    """Worker thread: import the engine (torch) here, not at napari start-up, and relay its events."""
    torch = _common.import_engine(training=True)
    from ..training import train

    if config.threads is None:  # "0 = all cores but one", counted as torch counts them
        config = dataclasses.replace(config, threads=gui_threads(_common.torch_default_threads(torch)))

    preview = None
    if preview_mode is not None:
        from ..config import PredictConfig
        from ..inference import predict_all

        # The crop is normalised on its own (the engine's percentiles); close enough for a
        # preview, while Segment normalises each whole plane.
        pconf = PredictConfig(output=preview_mode, device=config.device,
                              channel_axis=None if channel_axis is None else -1,
                              backend="torch")

        def preview(model):
            crop = state.crop
            if crop is None:
                return None
            # The run's metadata (set before the first step): the same cell-size limits as Segment.
            return crop, predict_all(model, crop.image, pconf, state.metadata).labels

    gen = train(images, labels, config, channel_axis=channel_axis, preview=preview, preview_every=5.0, **kwargs)
    state.gen = gen

    def record(event):
        state.metadata = event.result.metadata
        return event

    return (yield from relay(gen, record))


class Curves:
    """The live loss and validation-IoU curves: a pyqtgraph plot, or where pyqtgraph is not
    installed (napari does not depend on it; the ``[napari]`` extra brings it) a line of text
    with the latest values. ``points[name]`` holds the ``(iterations, values)`` shown."""

    def __init__(self):
        self.points: dict[str, tuple[list, list]] = {"loss": ([], []), "iou": ([], [])}
        self.iou_title = IOU_TITLE
        try:
            import pyqtgraph as pg
        except ImportError:
            pg = None
        if pg is None:
            self.widget = QLabel("training loss and validation IoU (install pyqtgraph for the live plot)")
            self.widget.setWordWrap(True)
            self._curves = None
            return
        self.widget = pg.GraphicsLayoutWidget()
        self.widget.setMinimumHeight(180)
        loss_plot = self.widget.addPlot(row=0, col=0, title="training loss")
        self._iou_plot = self.widget.addPlot(row=1, col=0, title=IOU_TITLE)
        self._iou_plot.setYRange(0, 1)
        self._iou_plot.setXLink(loss_plot)
        self._curves = {"loss": loss_plot.plot(pen=pg.mkPen("#ffb000", width=1.5)),
                        "iou": self._iou_plot.plot(pen=pg.mkPen("#00c0ff", width=1.5), symbol="o", symbolSize=4)}

    def add(self, name: str, iteration: int, value: float) -> None:
        xs, ys = self.points[name]
        xs.append(iteration)
        ys.append(value)
        if self._curves is not None:
            self._curves[name].setData(xs, ys)
        else:
            loss, iou = self.points["loss"][1], self.points["iou"][1]
            text = f"training loss {loss[-1]:.3f}" if loss else "training loss: none yet"
            self.widget.setText(text + (f", validation IoU {iou[-1]:.3f}" if iou else ""))

    def set_iou_title(self, text: str) -> None:
        self.iou_title = text
        if self._curves is not None:
            self._iou_plot.setTitle(text)
        elif text != IOU_TITLE:  # e.g. "none (under 8 painted)": the text line says it
            self.widget.setText(f"training loss: none yet, {text}")

    def clear(self) -> None:
        for xs, ys in self.points.values():
            xs.clear()
            ys.clear()
        if self._curves is not None:
            for curve in self._curves.values():
                curve.setData([], [])
        else:
            self.widget.setText("training loss: none yet")
        self.set_iou_title(IOU_TITLE)


class TrainWidget(QWidget):
    """Train U-Net: pick image and painted labels, a new model or a file, then Start / Stop.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer whose layers are listed and where the live preview appears.

    Attributes
    ----------
    current : ModelEntry or None
        The model being trained (Start continues it); ``None`` before the first run.
    published_model : ModelEntry or None
        The latest finished model, as a snapshot for the Segment widget.
    """

    #: How the other widgets of the viewer find this one (:func:`._common.find_docked`).
    ROLE = "train"

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.runner = WorkerRunner(self)
        #: ``events.model_published(entry)`` fires when a run ends (a snapshot ModelEntry).
        self.events = _Events()
        self.current: ModelEntry | None = None
        self.published_model: ModelEntry | None = None
        self._pbar = None
        self._job: _JobState | None = None
        self._last_event = None
        self._job_layers: tuple = ()
        # Strong references, compared with ==: napari hands plugins proxies of its layers.
        self._preview_layer = None
        self._suggest_target: tuple = (None, ())
        self._suggested = None
        self._image_layer = None
        self._runs = 0
        self._error: BaseException | None = None
        self._empty_preview = None
        self._returned = None

        self.image = layer_picker(napari_viewer, napari.layers.Image, "Image")
        self.labels = layer_picker(napari_viewer, napari.layers.Labels, "Painted labels")
        self.mode = RadioButtons(label="Mode", choices=["instances", "semantic"], value="instances",
                                 orientation="horizontal")
        # Fine-tuning the packaged model is the default start where it fits (instances; colour
        # images as grey): on the few-shot benchmark it beat a new network trained for the same
        # minute. The widget picks it (see _auto_start) until the user chooses for themselves.
        self._start_is_auto = True
        self.start_from = ComboBox(label="Start from", choices=self._start_choices, value=START_NEW,
                                   tooltip="sample cell model: a small network pretrained on real and synthetic "
                                           "nuclei and whole cells (fluorescence, brightfield, H&E, phase "
                                           "contrast), fine-tuned on your painted cells (colour images as grey). "
                                           "new model: a network trained from scratch.")
        self.depth = SpinBox(label="Depth", value=DEFAULT_MODEL.depth, min=2, max=6)
        self.width = SpinBox(label="Width (filters)", value=DEFAULT_MODEL.base_filters, min=4, max=128, step=4)
        self.padding = ComboBox(label="Padding", choices=["same", "valid"], value="same")
        self.batch_norm = CheckBox(label="Batch norm", value=True)
        self.model_file = FileEdit(label="Model file", mode="r", filter=_common.MODEL_FILE_FILTER)
        self.budget_kind = RadioButtons(label="Budget", choices=["seconds", "iterations"], value="seconds",
                                        orientation="horizontal")
        self.budget = SpinBox(label="Stop after", value=60, min=1, max=1_000_000)
        self.learning_rate = FloatSpinBox(label="Learning rate", value=DEFAULTS.learning_rate, min=1e-6, max=1.0,
                                          step=1e-4)
        self.optimizer = ComboBox(label="Optimiser", choices=list(OPTIMIZERS), value="Adam (fine-tuning)")
        self.augment = CheckBox(label="Augmentation", value=True)
        self.rescale = CheckBox(label="Match cell size to the model", value=DEFAULTS.rescale,
                                tooltip="Fine-tuning: resize the images so that your painted cells have the size "
                                        "of the cells the starting model knows; Segment then resizes the same way.")
        self.side_views = CheckBox(label="3D volume: learn side views too", value=DEFAULTS.side_views,
                                   tooltip="The image is a 3D volume (Z before Y, X): also train on its ZX and ZY "
                                           "planes (resampled with the layer's Z scale) where cells were painted "
                                           "on two or more planes; for Segment's 'orthogonal views' 3D method.")
        self.patch_size = SpinBox(label="Patch size", value=DEFAULTS.patch_size, min=32, max=1024, step=16)
        self.batch_size = SpinBox(label="Batch size", value=DEFAULTS.batch_size, min=1, max=64)
        self.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.threads = SpinBox(label="CPU threads (0 = all cores but one)", value=0, min=0, max=1024,
                               tooltip="Threads torch trains with on the CPU. The default leaves one core to "
                                       "napari so that the viewer stays smooth.")
        self.live_preview = CheckBox(label="Live preview of the visible part", value=True)
        self.start_button = QPushButton("Start")
        self.stop_button = QPushButton("Stop")
        self.save_button = QPushButton("Save model...")
        self.suggest_button = QPushButton("Where to paint next")
        self.suggest_button.setToolTip(
            "Segment the current plane with the trained model and show where it is least sure: an uncertainty "
            "layer, and the places where painting a few more cells (or background) should help most.")
        self.state = StateLabel()
        self.exporter = BioimageioExport(self, self._export_source)

        self.curves = Curves()
        self.plot = self.curves.widget

        layout = QVBoxLayout(self)
        layout.addWidget(Container(widgets=[self.image, self.labels, self.mode, self.start_from, self.depth,
                                            self.width, self.padding, self.batch_norm, self.model_file,
                                            self.budget_kind, self.budget], labels=True).native)
        advanced = QCollapsible("Advanced options")
        advanced.addWidget(Container(widgets=[self.optimizer, self.learning_rate, self.augment, self.rescale,
                                              self.side_views, self.patch_size,
                                              self.batch_size, self.device, self.threads, self.live_preview],
                                     labels=True).native)
        layout.addWidget(advanced)
        buttons = QHBoxLayout()
        for b in (self.start_button, self.stop_button, self.save_button):
            buttons.addWidget(b)
        layout.addLayout(buttons)
        layout.addWidget(self.suggest_button)
        layout.addWidget(self.exporter.button)
        layout.addWidget(self.state)
        layout.addWidget(self.plot)
        layout.addStretch(1)

        self.start_from.changed.connect(self._on_start_from)
        self.image.changed.connect(self._auto_start)
        self.mode.changed.connect(self._auto_start)
        self.budget_kind.changed.connect(self._on_budget_kind)
        self.optimizer.changed.connect(self._on_optimizer)
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.save_button.clicked.connect(lambda *_: self.save_model())
        self.suggest_button.clicked.connect(lambda *_: self.suggest())
        follow_layers(napari_viewer, self.reset_choices, self)
        # napari 0.9 moved the camera to viewer.scene.camera (the old attribute warns).
        camera = napari_viewer.scene.camera if hasattr(napari_viewer, "scene") else napari_viewer.camera
        _common.connect_while_alive(self, [(napari_viewer.layers.events.removed, self._on_layer_removed),
                                           (camera.events.center, self._on_view_changed),
                                           (camera.events.zoom, self._on_view_changed),
                                           (napari_viewer.dims.events.current_step, self._on_view_changed)])
        self._auto_start()
        self._show_start_options()
        self._set_buttons(State.IDLE)

    # ---- settings -------------------------------------------------------------------------------

    def _start_choices(self, _widget=None):
        sample = [START_SAMPLE] if _sample_data.sample_model_path() is not None else []
        return ([START_CURRENT] if self.current is not None else []) + [START_NEW] + sample + [START_FILE]

    def _set_start(self, value: str) -> None:
        """Set Start from without counting it as the user's choice."""
        auto = self._start_is_auto
        self.start_from.value = value
        self._start_is_auto = auto

    def _auto_start(self, *_):
        """The packaged model for instances (its classes are background / cell / boundary; an RGB
        image trains and is segmented as grey), else a new model; left alone once the user
        has chosen, or after a run (then it is the current model)."""
        if not self._start_is_auto:
            return
        fits = _sample_data.sample_model_path() is not None and self.mode.value == "instances"
        self._set_start(START_SAMPLE if fits else START_NEW)

    def _on_start_from(self, *_):
        self._start_is_auto = False
        self._show_start_options()

    def _show_start_options(self):
        self.start_button.setText("Continue" if self.start_from.value == START_CURRENT else "Start")
        new = self.start_from.value == START_NEW
        for w in (self.depth, self.width, self.padding, self.batch_norm):
            w.visible = new
        self.model_file.visible = self.start_from.value == START_FILE

    def _on_budget_kind(self, *_):
        if self.budget_kind.value == "seconds":
            self.budget.value = 60
        else:
            self.budget.value = 300

    def _on_optimizer(self, *_):
        self.learning_rate.value = OPTIMIZERS[self.optimizer.value][1]

    def settings(self) -> dict[str, Any]:
        """The widget's state as a plain dict (see :func:`train_config_from`)."""
        return {"mode": self.mode.value, "budget_kind": self.budget_kind.value, "budget": self.budget.value,
                "patch_size": self.patch_size.value, "batch_size": self.batch_size.value,
                "learning_rate": self.learning_rate.value, "optimizer": self.optimizer.value,
                "augment": self.augment.value, "rescale": self.rescale.value, "device": self.device.value,
                "depth": self.depth.value,
                "width": self.width.value, "padding": self.padding.value, "batch_norm": self.batch_norm.value,
                "threads": self.threads.value, "side_views": self.side_views.value,
                "voxel_size": self._voxel_size()}

    def _voxel_size(self) -> tuple[float, float, float] | None:
        """The image layer's scale along its last three axes (Z, Y, X), if it has three."""
        layer = self.image.value
        if layer is None or layer.ndim < 3:
            return None
        return tuple(abs(float(v)) or 1.0 for v in np.asarray(layer.scale)[-3:])  # type: ignore[return-value]

    def reset_choices(self, *_):
        self.image.reset_choices()
        self.labels.reset_choices()

    # ---- state ----------------------------------------------------------------------------------

    def _set_buttons(self, state: State, detail: str = "") -> None:
        running = state in (State.TRAINING, State.STOPPING, State.LOOKING)
        self.start_button.setEnabled(not running)
        self.stop_button.setEnabled(state in (State.TRAINING, State.LOOKING))
        self.save_button.setEnabled(not running and self.current is not None)
        self.suggest_button.setEnabled(not running and self.current is not None)
        self.exporter.set_enabled(not running and self.current is not None)
        self.start_button.setText("Continue" if self.start_from.value == START_CURRENT else "Start")
        self.state.set_state(state, detail)

    # ---- start / stop ---------------------------------------------------------------------------

    def start(self) -> None:
        """Copy the layers (main thread) and train in a worker thread."""
        if self.runner.running:
            return
        image_layer, labels_layer = self.image.value, self.labels.value
        try:
            if image_layer is None:
                raise ValueError("add or choose an image layer to train on")
            if labels_layer is None:
                raise ValueError("add a Labels layer and paint a few cells (2, 3, ...) and some background (1)")
            s = self.settings()
            config = train_config_from(s)
            kwargs: dict[str, Any] = {}
            choice = self.start_from.value
            if choice == START_CURRENT and self.current is not None:
                kwargs.update(model=self.current.model, metadata=dict(self.current.metadata))
            elif choice == START_SAMPLE:
                kwargs.update(init_from=str(_sample_data.sample_model_path()))
            elif choice == START_FILE:
                path = str(self.model_file.value)
                if path in ("", "."):
                    raise ValueError("choose the model file to fine-tune, or start from a new model")
                kwargs.update(init_from=path)
            else:
                kwargs.update(model_config=model_config_from(s))
        except ValueError as e:
            _common.notify_error(e)
            return
        images = _common.copy_layer_data(image_layer)
        labels = _common.copy_layer_data(labels_layer)
        try:
            channel_axis = _common.layer_channel_axis(images.shape, image_layer.rgb, labels_shape=labels.shape)
        except ValueError as e:
            _common.notify_error(f"{image_layer.name}: {e}")
            return
        job = _JobState()
        self._job = job
        self._image_layer = image_layer
        self._job_layers = (image_layer, labels_layer)
        if self.live_preview.value:
            job.crop = self._visible_crop(image_layer, images, channel_axis)
            if job.crop is not None:
                # Creating a layer costs napari a few hundred ms on the GUI thread: do it now, at
                # the click, rather than in the middle of the run; previews then only swap data.
                had_preview = self._preview_layer is not None and self._preview_layer in self.viewer.layers
                self._show_preview(job.crop, np.zeros(job.crop.image.shape[:2], np.uint16))
                self._empty_preview = None if had_preview else self._preview_layer
        self._last_event = None
        self._returned = None
        self.curves.clear()
        self._job_images = images
        self._job_channel_axis = channel_axis
        self._pbar = progress(total=100, desc="Training U-Net")
        self._set_buttons(State.TRAINING, "starting (loading PyTorch)")
        preview_mode = config.mode if self.live_preview.value else None
        self.runner.start(lambda: _train_job(job, images, labels, config, kwargs, preview_mode, channel_axis),
                          yielded=self._on_yielded, returned=self._on_returned, errored=self._on_errored,
                          finished=self._on_finished)

    def stop(self) -> None:
        """Stop at the next iteration; the weights so far are kept (best validated, or averaged)."""
        if self.runner.stop("stopped"):
            self._set_buttons(State.STOPPING, "finishing the current step")

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        if self._preview_layer is not None and self._preview_layer == layer:
            self._preview_layer = None
        if self.runner.running and any(layer == x for x in self._job_layers):
            self.runner.stop(f"the layer '{layer.name}' was removed")
            self._set_buttons(State.STOPPING, "input layer removed")

    # ---- preview --------------------------------------------------------------------------------

    def _visible_crop(self, layer, data: np.ndarray, channel_axis: int | None = None) -> _Crop | None:
        """The visible part of the layer's current plane (at most PREVIEW_SIDE a side), as a copy;
        channels (an RGB(A) axis, or ``channel_axis`` of a multichannel stack) last."""
        spatial_nd = layer.ndim  # an RGB layer's ndim leaves out its channel axis
        corners = np.asarray(layer.corner_pixels)
        point = np.round(layer.world_to_data(self.viewer.dims.point[-spatial_nd:])).astype(int)
        if channel_axis is not None and not layer.rgb:
            # A (C, Y, X)-like layer: napari shows the channels as planes; the crop takes them all.
            ax = channel_axis % data.ndim
            data = np.moveaxis(data, ax, -1)
            point = np.delete(point, ax)
            corners = np.delete(corners, ax, axis=1)
            spatial_nd -= 1
        if spatial_nd < 2:
            return None
        shape = data.shape[:spatial_nd]
        plane = tuple(int(np.clip(p, 0, n - 1)) for p, n in zip(point[:-2], shape[:-2]))
        (y0, x0), (y1, x1) = corners[0, -2:], corners[1, -2:]
        h, w = shape[-2:]
        if y1 <= y0 or x1 <= x0:  # nothing visible (yet): the whole plane
            y0, x0, y1, x1 = 0, 0, h, w
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        hh, hw = min(y1 - y0, PREVIEW_SIDE) // 2, min(x1 - x0, PREVIEW_SIDE) // 2
        y0, x0 = int(np.clip(cy - hh, 0, max(h - 2 * hh, 0))), int(np.clip(cx - hw, 0, max(w - 2 * hw, 0)))
        y1, x1 = min(y0 + max(2 * hh, 16), h), min(x0 + max(2 * hw, 16), w)
        return _Crop(image=np.array(data[plane + (slice(y0, y1), slice(x0, x1))], copy=True), plane=plane,
                     offset=(y0, x0))

    def _on_view_changed(self, *_):
        job = self._job
        if job is None or job.crop is None or not self.runner.running:
            return
        layer = self._image_layer
        if layer is None or self._job_images is None:
            return
        job.crop = self._visible_crop(layer, self._job_images, self._job_channel_axis)

    def _show_preview(self, crop: _Crop, labels: np.ndarray) -> None:
        image_layer = self._image_layer
        if image_layer is None:
            return
        scale = np.asarray(image_layer.scale)[-2:]
        translate = np.asarray(image_layer.translate)[-2:] + np.asarray(crop.offset) * scale
        layer = self._preview_layer
        if layer is not None and layer in self.viewer.layers:
            layer.data = labels
            # Setting scale/translate rebuilds napari's transforms (tens of ms): only on a move.
            if not np.allclose(layer.translate, translate):
                layer.translate = translate
            if not np.allclose(layer.scale, scale):
                layer.scale = scale
        else:
            active = self.viewer.layers.selection.active
            layer = self.viewer.add_labels(labels, name=f"{image_layer.name} [U-Net preview]", scale=scale,
                                           translate=translate, opacity=0.5)
            self._preview_layer = layer
            if active is not None:  # napari activates a new layer: the user goes on painting where they were
                self.viewer.layers.selection.active = active

    # ---- worker slots (main thread) -------------------------------------------------------------

    def _on_yielded(self, ev) -> None:
        self._last_event = ev
        if ev.iteration == 0 and ev.n_val_objects == 0:
            # All painted objects train: fewer than min_val_objects (the notification says it in full).
            self.curves.set_iou_title(f"validation IoU: none (under {DEFAULTS.min_val_objects} painted)")
        if ev.preview is not None:
            self._show_preview(*ev.preview)
            self._empty_preview = None
        # napari's progress display may process events, so the run can finish (and the bar
        # close) while this slot runs: work on a local reference.
        pbar = self._pbar
        value = int(ev.fraction * 100)
        if pbar is not None and value != pbar.n:
            # napari's progress bar runs QApplication.processEvents() on every change (it repaints
            # the viewer): update it once per percent, never its description, to keep slots short.
            pbar.update(value - pbar.n)
        if ev.loss is not None:
            self.curves.add("loss", ev.iteration, ev.loss)
        if ev.val_iou is not None:
            self.curves.add("iou", ev.iteration, ev.val_iou)
        if ev.message:
            (_common.notify_warning if ev.warning else _common.notify_info)(ev.message)
        if self.state.state is State.TRAINING:
            parts = [f"iteration {ev.iteration}" + (f"/{ev.total}" if ev.total else ""),
                     f"{ev.elapsed:.0f}" + (f"/{ev.max_time:.0f}" if ev.max_time else "") + " s"]
            if ev.loss is not None:
                parts.append(f"loss {ev.loss:.3f}")
            if ev.best_val_iou is not None:
                parts.append(f"best IoU {ev.best_val_iou:.2f}")
            self.state.set_state(State.TRAINING, ", ".join(parts))

    def _on_returned(self, result) -> None:
        self._returned = result

    def _on_errored(self, exc: BaseException) -> None:
        self._error = exc

    def _on_finished(self) -> None:
        job, self._job = self._job, None
        if job is not None and job.gen is not None:
            # worker.quit() leaves the engine's generator suspended; closing it here (the worker
            # thread is done with it) runs its clean-up now: the kept weights back into the model.
            job.gen.close()
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._job_layers = ()
        self._job_images = None
        self._image_layer = None
        error, self._error = self._error, None
        empty, self._empty_preview = self._empty_preview, None
        if empty is not None and empty in self.viewer.layers:
            self.viewer.layers.remove(empty)  # made at Start, never got a preview: no stray layer
        result = self._returned or (self._last_event.result if self._last_event is not None else None)
        stop_reason = self.runner.stop_reason
        if error is not None:
            expected = isinstance(error, BAD_INPUT_ERRORS)
            _common.notify_error(f"Training failed: {_common.first_line(error)}"
                                 + ("" if expected else " (see the console for details)"))
            self._set_buttons(State.IDLE if expected else State.FAILED, _common.first_line(error))
            return
        if result is None or result.model is None:
            self._set_buttons(State.IDLE, stop_reason or "")
            return
        self._runs += 1
        ev = self._last_event
        iterations = ev.iteration if ev is not None else 0
        name = self.current.name if self.current is not None and result.model is self.current.model else \
            f"trained model {self._runs} ({_dt.datetime.now():%H:%M})"
        self.current = ModelEntry(name=name, model=result.model, metadata=result.metadata)
        self._publish()
        self.start_from.reset_choices()
        self.start_from.value = START_CURRENT
        detail = f"{iterations} iterations"
        if ev is not None and ev.best_val_iou is not None:
            detail += f", best validation IoU {ev.best_val_iou:.2f}"
        check = (result.metadata.get("training") or {}).get("painted_check")
        if check:
            detail += f", {check['recovered']} of {check['painted']} painted cells found again"
        if stop_reason and "removed" in stop_reason:
            _common.notify_warning(f"Training stopped: {stop_reason}; the weights so far are kept")
        self._set_buttons(State.DONE, detail + ("; stopped" if stop_reason else ""))

    def _publish(self) -> None:
        """Hand a snapshot of the current model to the Segment widgets of this viewer."""
        entry = ModelEntry(name=f"{self.current.name}", model=copy.deepcopy(self.current.model),
                           metadata=copy.deepcopy(self.current.metadata))
        self.published_model = entry
        self.events.model_published.emit(entry)
        for seg in _common.find_docked(self.viewer, "segment"):
            seg.use_model(entry)

    # ---- where to paint next --------------------------------------------------------------------

    def suggest(self) -> None:
        """Segment the image's current plane with the current model (worker thread) and show an
        uncertainty layer and the places worth painting next (:func:`napari_unet.quality.paint_next`)."""
        if self.runner.running:
            return
        image_layer, labels_layer = self.image.value, self.labels.value
        if self.current is None:
            _common.notify_error("train a model first: then it can say where it is least sure")
            return
        if image_layer is None:
            _common.notify_error("choose the image layer to look at")
            return
        data = image_layer.data
        try:  # the channels where training and Segment find them: all of them, whatever the plane
            cax = _common.layer_channel_axis(data.shape, image_layer.rgb, self.current.model.config.in_channels)
        except ValueError as e:
            _common.notify_error(f"{image_layer.name}: {e}")
            return
        point = np.round(image_layer.world_to_data(self.viewer.dims.point[-image_layer.ndim:])).astype(int)
        if cax is not None and not image_layer.rgb:  # napari shows a (C, Y, X) layer's channels as planes
            data = np.moveaxis(data, cax, -1)
            point = np.delete(point, cax)
        spatial_nd = data.ndim - (cax is not None)
        plane = tuple(int(np.clip(p, 0, n - 1)) for p, n in zip(point[-spatial_nd:-2], data.shape[:spatial_nd - 2]))
        image = np.array(data[plane], copy=True)
        painted = None
        if labels_layer is not None and tuple(labels_layer.data.shape[-spatial_nd:]) == tuple(data.shape[:spatial_nd]):
            painted = np.array(labels_layer.data[plane], copy=True)
        from ..config import PredictConfig

        config = PredictConfig(device=self.device.value, channel_axis=None if cax is None else image.ndim - 1)
        model, metadata = self.current.model, dict(self.current.metadata)

        def job():
            _common.import_engine()
            from ..quality import paint_next

            return (yield from paint_next(model, image, metadata, painted, n=5, config=config))

        self._suggest_target = (image_layer, plane)
        self._suggested = None
        self._error = None
        self._set_buttons(State.LOOKING, "segmenting the current plane")
        self.runner.start(job, returned=self._on_suggested_returned, errored=self._on_errored,
                          finished=self._on_suggest_finished)

    def _on_suggested_returned(self, result) -> None:
        self._suggested = result

    def _on_suggest_finished(self) -> None:
        error, self._error = self._error, None
        found, self._suggested = self._suggested, None
        image_layer, plane = self._suggest_target
        self._suggest_target = (None, ())
        if error is not None:
            _common.notify_error(f"Could not look for places to paint: {_common.first_line(error)}")
            self._set_buttons(State.IDLE, _common.first_line(error))
            return
        if found is None or image_layer is None or image_layer not in self.viewer.layers:
            self._set_buttons(State.DONE, "stopped" if found is None else "the image layer was removed")
            return
        self._show_paint_next(image_layer, plane, found)
        where = f" on plane {', '.join(map(str, plane))}" if plane else ""
        self._set_buttons(State.DONE, f"{len(found.places)} places to paint next marked{where}, most unsure first")

    def _show_paint_next(self, image_layer, plane: tuple[int, ...], found) -> None:
        """The uncertainty map and the numbered places, over the image's plane; the active layer stays."""
        active = self.viewer.layers.selection.active
        scale = np.asarray(image_layer.scale)[-2:]
        translate = np.asarray(image_layer.translate)[-2:]
        name = image_layer.name + (f" (plane {', '.join(map(str, plane))})" if plane else "")
        u_name, p_name = f"{name} [uncertainty]", f"{name} [paint next]"
        if u_name in self.viewer.layers:
            layer = self.viewer.layers[u_name]
            layer.data = found.uncertainty
        else:
            self.viewer.add_image(found.uncertainty, name=u_name, colormap="magma", blending="additive",
                                  contrast_limits=(0.0, 1.0), opacity=0.7, scale=scale, translate=translate)
        points = np.array([p.centre for p in found.places], float).reshape(-1, 2)
        ranks = {"rank": np.arange(1, len(points) + 1)}
        size = 2.0 * np.sqrt(float((self.current.metadata or {}).get("object_area") or 300.0) / np.pi)
        size /= float((self.current.metadata or {}).get("scale") or 1.0)
        if p_name in self.viewer.layers:
            layer = self.viewer.layers[p_name]
            layer.data = points
            layer.features = ranks
        else:
            self.viewer.add_points(points, name=p_name, features=ranks, size=max(size * 1.5, 8.0), symbol="ring",
                                   face_color="yellow", border_width=0, scale=scale, translate=translate,
                                   text={"string": "{rank}", "color": "yellow", "anchor": "upper_left",
                                         "size": 12})
        if active is not None:
            self.viewer.layers.selection.active = active

    # ---- saving ---------------------------------------------------------------------------------

    def _export_source(self) -> tuple[Any, Any, str]:
        """What "Export for bioimage.io..." writes: the trained model, with the training image as test data."""
        if self.current is None:
            raise ValueError("train a model first")
        return (self.current.model, dict(self.current.metadata)), self.image.value, self.current.name

    def save_model(self, path: str | None = None) -> str | None:
        """Write the current model to a ``.safetensors`` file (atomically); asks for the path if not given."""
        if self.current is None:
            _common.notify_error("train a model first")
            return None
        if not path:
            path = _common.ask_save_path(self, "Save U-Net model", "unet.safetensors",
                                         "napari-unet model (*.safetensors)")
            if not path:
                return None
        from ..io import save_model

        try:
            written = save_model(path, self.current.model, self.current.metadata)
        except (ValueError, OSError) as e:
            _common.notify_error(f"Could not save the model: {_common.first_line(e)}")
            return None
        _common.notify_info(f"Model saved to {written}")
        return str(written)


class _Events:
    """psygnal signals of the Train widget (connect any callable)."""

    model_published = Signal(object)
