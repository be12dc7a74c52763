"""Plumbing shared by the dock widgets: layer pickers, worker life cycle, notifications.

No algorithm lives here (nor in the widgets): the widgets copy layer data on the main
thread, hand arrays and configs to the core generators running in a napari
``thread_worker``, and create or update layers in main-thread slots. Nothing here
imports torch.
"""

from __future__ import annotations

import contextlib
import enum
import re
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Select
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, QThreadPool, Signal
from qtpy.QtWidgets import QFileDialog, QLabel, QMessageBox, QWidget

from .._writer import axes_letters
from ..errors import BAD_INPUT_ERRORS
from ..io import first_line
from ..tuning import (
    background_priority,
    gc_job_ended,
    gc_job_started,
    gc_paused,
    import_torch,
    torch_default_threads,
)

__all__ = [
    "ModelEntry", "WorkerRunner", "layer_picker", "layers_select", "follow_layers", "copy_layer_data",
    "connect_while_alive", "spatial_axes_letters", "find_docked", "notify_error", "notify_warning", "notify_info",
    "ask_overwrite", "ask_save_path", "safe_file_stem", "StateLabel", "State", "TRANSITIONS",
    "MODEL_FILE_FILTER", "layer_channel_axis", "STACK_KINDS", "stack_kind_from_axis_labels", "stack_axes",
    "output_axis_labels", "spatial_axis_labels",
]

#: The file dialogs' filter for models: napari-unet files and bioimage.io packages of them.
MODEL_FILE_FILTER = "napari-unet model (*.safetensors *.zip)"

_LAYER_EVENTS = ("inserted", "removed", "reordered", "renamed")


@dataclass
class ModelEntry:
    """A model a widget can use: loaded (``model`` set) or still on disk (``path`` set).

    The Segment widget lists these; the Train widget publishes one when training ends
    (a snapshot, so that segmenting never races with continued training of the same
    network).
    """

    name: str
    model: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def describe(self) -> str:
        meta = self.metadata or {}
        arch = meta.get("model") or (self.model.config.to_dict() if self.model is not None else {})
        if not arch:
            return self.name
        text = (f"{meta.get('mode', '?')} model, {arch.get('in_channels', '?')} channel(s) in, "
                f"depth {arch.get('depth')}, width {arch.get('base_filters')}, {arch.get('padding')} padding")
        scale = meta.get("scale")
        if isinstance(scale, (int, float)) and scale != 1:
            text += f"; images resized by {scale:.2f} (the size of the cells it was trained on)"
        return text


# ---- notifications ------------------------------------------------------------------------------

def notify_error(message: str | BaseException) -> None:
    """One-line error notification (never a traceback dialog)."""
    show_error(first_line(message) if isinstance(message, BaseException) else message)


def notify_warning(message: str) -> None:
    show_warning(message)


def notify_info(message: str) -> None:
    show_info(message)


def ask_overwrite(parent: QWidget | None, paths: list[str]) -> bool:
    """Ask before overwriting files; a module function so tests can replace it."""
    names = "\n".join(paths[:10]) + ("\n..." if len(paths) > 10 else "")
    answer = QMessageBox.question(parent, "Overwrite files?", f"These files exist and will be replaced:\n{names}",
                                  QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
    return answer == QMessageBox.Yes


def ask_save_path(parent: QWidget | None, caption: str, default: str, filter_: str) -> str | None:
    """A save-file dialog; a module function so tests can replace it. ``None`` if cancelled."""
    path, _ = QFileDialog.getSaveFileName(parent, caption, default, filter_)
    return path or None


def safe_file_stem(name: str) -> str:
    """A layer name turned into a file name (no path separators or odd characters)."""
    stem = re.sub(r"[^\w.\-\[\] ]+", "_", name).strip(" .")
    return stem or "labels"


class State(str, enum.Enum):
    """What a widget is doing. A ``str`` enum: ``state == "done"`` reads as it did."""

    IDLE = "idle"
    TRAINING = "training"
    STOPPING = "stopping"
    LOOKING = "looking"  # Train: where to paint next
    SEGMENTING = "segmenting"
    CANCELLING = "cancelling"
    EXPORTING = "exporting"
    DONE = "done"
    FAILED = "failed"


_RESTING = {State.IDLE, State.DONE, State.FAILED}
_ENDINGS = {State.IDLE, State.DONE, State.FAILED}
#: The allowed transitions (a state may always be set again, with a new detail): a job starts
#: from rest, can be asked to stop, and ends in done, idle (the user's input problem, nothing
#: to show) or failed (a bug).
TRANSITIONS: dict[State, set[State]] = {
    **{s: _RESTING | {State.TRAINING, State.LOOKING, State.SEGMENTING, State.EXPORTING} for s in _RESTING},
    State.TRAINING: _ENDINGS | {State.STOPPING},
    State.LOOKING: _ENDINGS | {State.STOPPING},
    State.STOPPING: set(_ENDINGS),
    State.SEGMENTING: _ENDINGS | {State.CANCELLING},
    State.CANCELLING: set(_ENDINGS),
    State.EXPORTING: set(_ENDINGS),
}


class StateLabel(QLabel):
    """Shows the widget's state (a :class:`State`) and a detail in one line; refuses a
    transition :data:`TRANSITIONS` does not allow (a bug in the widget's flow)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = State.IDLE
        self.set_state(State.IDLE)

    def set_state(self, state: State | str, detail: str = "") -> None:
        state = State(state)
        if state != self.state and state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"widget state {self.state.value} -> {state.value} is not an allowed transition")
        self.state = state
        self.setText(f"<b>{state.value}</b>" + (f": {detail}" if detail else ""))


# ---- layers -------------------------------------------------------------------------------------

def layer_picker(viewer, layer_type: type, label: str, nullable: bool = False) -> ComboBox:
    """A magicgui combo box listing the viewer's layers of ``layer_type``.

    The choices come from the viewer given to the widget's constructor (not from a parent
    window lookup), so the picker works before the widget is docked, e.g. in tests; call
    :func:`follow_layers` to refresh it when layers change.
    """

    def choices(_widget=None):
        return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, layer_type)]

    return ComboBox(label=label, choices=choices, nullable=nullable)


def layers_select(viewer, layer_type: type, label: str) -> Select:
    """A magicgui multi-selection list of the viewer's layers of ``layer_type``."""

    def choices(_widget=None):
        return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, layer_type)]

    return Select(label=label, choices=choices, allow_multiple=True)


def follow_layers(viewer, callback: Callable[..., Any], owner: QWidget) -> None:
    """Call ``callback`` when the viewer's layers are added, removed, reordered or renamed.

    The connections are dropped when ``owner`` is destroyed, so a closed widget is never called.
    """
    events = viewer.layers.events
    for name in _LAYER_EVENTS:
        getattr(events, name).connect(callback)

    def _disconnect(*_):
        for name in _LAYER_EVENTS:
            with contextlib.suppress(Exception):
                getattr(events, name).disconnect(callback)

    owner.destroyed.connect(_disconnect)


def connect_while_alive(owner: QWidget, connections: list[tuple[Any, Callable[..., Any]]]) -> None:
    """Connect each ``(emitter, slot)`` (napari/psygnal events of the viewer) and disconnect
    them all when ``owner`` is destroyed: a closed widget is neither called nor kept alive by
    the viewer it was docked in."""
    for emitter, slot in connections:
        emitter.connect(slot)

    def _disconnect(*_):
        for emitter, slot in connections:
            with contextlib.suppress(Exception):  # the viewer may be gone first
                emitter.disconnect(slot)

    owner.destroyed.connect(_disconnect)


def layer_channel_axis(shape: tuple[int, ...], rgb: bool, in_channels: int | None = None,
                       labels_shape: tuple[int, ...] | None = None) -> int | None:
    """The channel axis of an image layer's data: :func:`napari_unet.data.find_channel_axis`
    told the layer's ``rgb`` flag (an RGB(A) layer's last axis; napari shows any other
    layer's last two axes as Y, X) and the model's channels, or for training the labels'
    shape (the axis the labels do not have).

    Raises ``ValueError`` (one line) when a multi-channel model or the labels find no such axis.
    """
    from ..data import find_channel_axis

    try:
        return find_channel_axis(shape, in_channels, rgb=bool(rgb), labels_shape=labels_shape)
    except ValueError:  # the widgets have no channel-axis option: say what to pick instead
        if labels_shape is None and in_channels and in_channels > 1:
            raise ValueError(f"the model takes {in_channels} channels but no axis of the image (shape "
                             f"{tuple(shape)}) has {in_channels} entries; pick a {in_channels}-channel image") from None
        raise


#: What the leading axes of an image layer are (the Segment widget's "Stack is").
STACK_KINDS = ("independent planes", "3D volume", "time series")


def stack_kind_from_axis_labels(axis_labels: tuple[str, ...] | None) -> str:
    """"3D volume" when a leading axis is labelled z, "time series" for t, else "independent planes"."""
    letters = [str(a).strip().lower()[:1] for a in (axis_labels or ())[:-2]]
    if "z" in letters:
        return "3D volume"
    if "t" in letters:
        return "time series"
    return "independent planes"


def stack_axes(kind: str, n_spatial: int, axis_labels: tuple[str, ...] | None = None) -> str | None:
    """:attr:`~napari_unet.config.PredictConfig.axes` for ``n_spatial`` non-channel axes of a stack of ``kind``.

    A volume's Z is the axis labelled ``z`` when the labels (of those axes) have one, else
    the axis before Y, X (napari shows the last two as Y, X); the other leading axes are
    frames (``TZYX``). Planes and time series are segmented plane by plane: ``None``.
    """
    if kind != "3D volume" or n_spatial < 3:
        return None
    z = n_spatial - 3
    letters = [str(a).strip().lower()[:1] for a in (axis_labels or ())]
    if len(letters) == n_spatial and "z" in letters[:-2]:
        z = letters[:-2].index("z")
    others = iter("TQPONMLKJIHGFEDBA")  # distinct letters, none of C, S, Z, Y, X
    return "".join("Z" if i == z else next(others) for i in range(n_spatial - 2)) + "YX"


def spatial_axis_labels(axis_labels: tuple[str, ...], rgb: bool, channel_axis: int | None,
                        ndim: int) -> tuple[str, ...]:
    """A layer's axis labels for its data's axes other than the channels (an RGB layer's colours
    are not among its dims; a multi-channel model's channel axis is); ``()`` if they do not fit."""
    labels = list(axis_labels) + (["c"] if rgb else [])
    if len(labels) != ndim:
        return ()
    if channel_axis is not None:
        del labels[channel_axis]
    return tuple(labels)


def output_axis_labels(kind: str, ndim: int, image_labels: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Axis labels for a result layer of ``ndim`` dims: the image's when it has its own, else from ``kind``."""
    labels = tuple(str(a) for a in (image_labels or ()))
    if len(labels) >= ndim and not all(a.lstrip("-").isdigit() for a in labels[-ndim:]):
        return labels[-ndim:]
    if ndim < 3 or kind == "independent planes":
        return None
    lead = ["z"] if kind == "3D volume" else ["t"]
    if kind == "3D volume" and ndim > 3:
        lead = ["t", "z"] if ndim == 4 else [f"axis {i}" for i in range(ndim - 4)] + ["t", "z"]
    elif kind == "time series" and ndim > 3:
        lead = [f"axis {i}" for i in range(ndim - 3)] + ["t"]
    return (*lead, "y", "x")


def copy_layer_data(layer) -> np.ndarray:
    """A private copy of a layer's data (highest resolution level), taken on the main thread."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return np.array(data, copy=True)


def spatial_axes_letters(ndim: int, axis_labels: tuple[str, ...] | None = None) -> str:
    """ImageJ axis letters for labels of ``ndim`` dimensions (see :func:`napari_unet._writer.axes_letters`)."""
    return axes_letters(ndim, axis_labels)


def find_docked(viewer, role: str) -> list:
    """The widgets docked in this viewer's window whose ``ROLE`` is ``role`` ("train", "segment").

    Widgets of one viewer find each other through napari's public ``window.dock_widgets``
    (the inner widgets); this keeps the link per viewer with no module-level registry, and
    by role rather than by class, so that no widget module imports another.
    """
    window = getattr(viewer, "window", None)
    docks = getattr(window, "dock_widgets", None) if window is not None else None
    if docks is None:
        return []
    found = []
    with contextlib.suppress(RuntimeError):  # a dock being deleted while we look
        for widget in list(docks.values()):
            if getattr(widget, "ROLE", None) == role:
                found.append(widget)
    return found


# ---- workers ------------------------------------------------------------------------------------

@dataclass
class _Failed:
    error: BaseException


def import_engine(training: bool = False):
    """Worker thread, first thing in a job: import torch and the engine without freezing the
    viewer (torch's libraries loaded outside the GIL, no garbage collection); returns torch."""
    with gc_paused():
        torch = import_torch()
        from .. import inference, io  # noqa: F401 - imported here, under the pause

        if training:
            from .. import training as _training  # noqa: F401

            # The first optimizer imports torch._dynamo (sympy, ...): done here too.
            torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    torch_default_threads(torch)
    return torch


class JobError(Exception):
    """An unexpected ``RuntimeError`` of a job, raised again under this type.

    superqt takes a ``RuntimeError`` coming out of a worker for a deleted Qt object: it
    then neither reports it nor emits ``finished``, and the widget would stay busy for
    good. torch raises ``RuntimeError`` for most of its failures.
    """


class WorkerRunner(QObject):
    """Runs one generator job at a time in a napari worker thread and stops it cleanly.

    The slots given to :meth:`start` run on the main thread (Qt queued signals). ``stop``
    asks the worker to quit at its next yield; :meth:`shutdown` (the widget is being
    destroyed, e.g. the viewer closes) also waits for the thread, so none is left running.
    ``finished`` is emitted after the widget's own ``finished`` slot, once per job (tests
    wait on it: it exists before the job starts, unlike the worker's signal).
    """

    finished = Signal()

    def __init__(self, owner: QWidget):
        super().__init__()
        self.worker = None
        self.stop_reason: str | None = None
        # The destroyed slot must not hold the widget itself (it is being deleted): a weak
        # reference to this runner is enough to reach the worker.
        ref = weakref.ref(self)
        self.owner_alive = True

        def _on_destroyed(*_):
            runner = ref()
            if runner is not None:
                runner.owner_alive = False
                runner.shutdown()

        owner.destroyed.connect(_on_destroyed)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, job: Callable[..., Generator], *, yielded=None, returned=None, errored=None,
              finished=None) -> Any:
        """Start ``job()`` (a generator function) in a worker; returns the worker."""
        if self.worker is not None:
            raise RuntimeError("a job is already running")
        self.stop_reason = None

        def _run():  # a generator function, so napari makes a (stoppable) GeneratorWorker
            background_priority()
            try:
                return (yield from job())
            except BAD_INPUT_ERRORS as e:
                # The user's input problem: handed to the widget as a value, so napari does not
                # also pop up a traceback notification for it (it does for unexpected errors).
                return _Failed(e)
            except RuntimeError as e:
                from ..inference import is_out_of_memory

                if is_out_of_memory(e):  # torch's (CUDA) out of memory: the user's problem too
                    return _Failed(MemoryError(f"out of memory: {first_line(e)}"))
                raise JobError(f"{type(e).__name__}: {e}") from e

        def _guard(slot):  # the widget's slots must not run once Qt has deleted the widget
            if slot is None:
                return None
            return lambda *args: slot(*args) if self.owner_alive else None

        yielded, returned, errored, finished = map(_guard, (yielded, returned, errored, finished))

        def _returned(value):
            if isinstance(value, _Failed):
                if errored is not None:
                    errored(value.error)
            elif returned is not None:
                returned(value)

        worker = create_worker(_run, _start_thread=False)
        if yielded is not None:
            worker.yielded.connect(yielded)
        worker.returned.connect(_returned)
        if errored is not None:
            worker.errored.connect(errored)

        def _done():
            # Here, not in the generator: a stopped worker abandons its generator, whose
            # clean-up would wait for a garbage collection (which the freeze can postpone).
            gc_job_ended()
            if self.worker is worker:
                self.worker = None
            try:
                if finished is not None:
                    finished()
            finally:
                self.finished.emit()

        worker.finished.connect(_done)
        self.worker = worker
        gc_job_started()
        try:
            worker.start()
        except BaseException:
            self.worker = None
            gc_job_ended()
            raise
        return worker

    def stop(self, reason: str | None = None) -> bool:
        """Ask the running worker to quit at its next yield; False if none runs."""
        if self.worker is None:
            return False
        self.stop_reason = self.stop_reason or reason
        self.worker.quit()
        return True

    def shutdown(self, msecs: int = 30000) -> None:
        """Stop and wait for the worker thread (used when the widget or viewer goes away)."""
        worker = self.worker
        if worker is None:
            return
        with contextlib.suppress(RuntimeError):
            worker.quit()
            # Blocking is fine here: the window is closing. The worker never waits on the
            # main thread (its signals are queued), so this cannot deadlock.
            QThreadPool.globalInstance().waitForDone(msecs)
