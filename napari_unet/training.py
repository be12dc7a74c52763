"""Training and fine-tuning a U-Net on painted labels: one generator, used by the CLI and the widget.

``train(images, labels, config)`` yields a :class:`TrainProgress` at least once per
optimiser step and returns a :class:`TrainResult` (the model and the metadata a model file
needs). It can be stopped at any yield: closing the generator (or letting it be garbage
collected, which is what napari's ``worker.quit()`` does) loads the weights so far (the
best validated ones, or the running average) into ``result.model`` and completes
``result.metadata``; the caller keeps the ``TrainResult`` from the last event (the same
object every time).

Labels convention: ``0`` unlabelled (ignored), ``1`` background, ``2, 3, ...`` objects.

* ``mode="instances"``: every value >= 2 is one cell. Targets: 0 background, 1 cell
  interior, 2 cell boundary (each cell's own border pixels), with the paper's border
  weight map ``w = w_c + w0 exp(-(d1 + d2)^2 / (2 sigma^2))`` on by default.
* ``mode="semantic"``: painted k >= 1 is class k - 1 (1 = background = class 0).

Validation holds out whole objects (and a margin around them, masked out of the training
loss), reports their IoU and loss, and keeps the best weights; with fewer painted objects
than ``min_val_objects`` all of them train. An exponential moving average of the weights
(``ema``) is what validation judges, the preview shows and the result keeps. Imports
torch (this module is only imported when training); no Qt, no napari.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import AugmentConfig
from .config import ModelConfig, TrainConfig, default_model_config
from .data import IGNORE, TrainingDataError
from .distributed import DistContext, shard
from .model import UNet
from .training_data import (
    INSTANCE_CLASS_NAMES,
    NORMALIZATION,
    Sampler,
    TrainingData,
    crop_mirrored,
    prepare_training_data,
    val_crops,
)
from .tuning import torch_threads

__all__ = ["train", "TrainProgress", "TrainResult", "TrainingDataError", "TrainingData", "prepare_training_data",
           "default_model_config", "paper_preset", "INSTANCE_CLASS_NAMES"]

#: Validation IoU within this of the best so far counts as no worse (the later weights are kept).
VAL_TOLERANCE = 0.02


def paper_preset(in_channels: int = 1, n_classes: int = 3, **overrides) -> tuple[TrainConfig, ModelConfig]:
    """The paper's set-up: SGD with momentum 0.99, batch 1, large 572 px tiles, the unpadded 64/5 U-Net.

    Returns ``(TrainConfig, ModelConfig)``; ``overrides`` replace TrainConfig fields.
    Slow on a CPU (seconds per step): meant for GPUs and for reproducing the paper.
    """
    model = ModelConfig(in_channels=in_channels, n_classes=n_classes, depth=5, base_filters=64, padding="valid",
                        batch_norm=False, dropout=0.5)
    return TrainConfig.paper_preset(**overrides), model


# ---- events and result ------------------------------------------------------------------------

@dataclass
class TrainResult:
    """The trained network and the metadata for its model file (:func:`napari_unet.io.save_model`).

    The same object is attached to every :class:`TrainProgress`; when training ends in any
    way, ``model`` holds the kept weights (those of the best validation IoU; without
    validation the running average, ``TrainConfig.ema``, or with ``ema=0`` the last
    weights) and ``metadata`` is complete.
    """

    model: UNet | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainProgress:
    """One training event (yielded at least once per optimiser step).

    Attributes
    ----------
    iteration : int
        Optimiser steps done (0 for the first event, before training).
    total : int or None
        ``config.iterations`` (None when only a time budget is set).
    loss : float or None
        Training loss of this step.
    val_loss, val_iou : float or None
        Validation loss and IoU of the held-out objects, when computed at this step.
    best_val_iou : float or None
        Best validation IoU so far (its weights are kept).
    n_val_objects : int or None
        Painted objects held out for validation (0: all train); None before set-up.
    elapsed : float
        Seconds since training started.
    max_time : float or None
        The time budget.
    fraction : float
        Progress in [0, 1] by iterations or time, whichever ends first.
    message : str or None
        Something to tell the user (e.g. "replaced the output layer: 2 -> 3 classes"; the
        last event of an instance run: how many painted cells the result finds again).
    warning : bool
        The message is a warning: the painted-cell check failed (fewer than half found).
    preview : Any
        The return value of the ``preview`` callable, when it was called for this event.
    result : TrainResult
        The same object for every event, kept up to date.
    """

    iteration: int
    total: int | None
    loss: float | None
    val_loss: float | None
    val_iou: float | None
    best_val_iou: float | None
    elapsed: float
    max_time: float | None
    fraction: float
    message: str | None = None
    preview: Any = None
    result: TrainResult | None = None
    n_val_objects: int | None = None
    warning: bool = False  # the message is a warning (the painted-cell check failed)


# ---- model set-up -----------------------------------------------------------------------------

def _replace_output_layer(model: UNet, n_classes: int) -> None:
    old = model.outc
    model.outc = nn.Conv2d(old.in_channels, n_classes, kernel_size=1).to(old.weight.device)
    nn.init.kaiming_normal_(model.outc.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(model.outc.bias)
    model.config = dataclasses.replace(model.config, n_classes=n_classes)


#: Metadata key: what training added to the output layer's bias (see TrainConfig.calibrate).
BIAS_SHIFT_KEY = "output_bias_shift"


def _bias_shift(config: TrainConfig, data: TrainingData) -> np.ndarray | None:
    """``[0, 0, -log(w_boundary / w_interior)]`` for the output bias (instances, ``config.calibrate``), else None.

    Weighted cross-entropy with class weights ``w_c`` is minimised by probabilities
    proportional to ``w_c * p(c | x)``; subtracting ``log w_c`` from the logits gives back
    ``p(c | x)`` (logit adjustment, Menon et al. 2021). Only the boundary's weight relative
    to the interior's is undone: that ratio is geometric (band width against cell size),
    while how much background a user paints is arbitrary. Undoing all three weights gained
    nothing on the few-shot benchmark and did worse on the synthetic quality test
    (docs/design.md).
    """
    if not config.calibrate or data.mode != "instances" or data.n_classes != 3:
        return None
    w = np.asarray(data.class_weights, np.float64)
    if not np.all(w > 0) or np.isclose(w[2], w[1]):
        return None
    return np.array([0.0, 0.0, -np.log(w[2] / w[1])])


def _add_to_output_bias(model: UNet, shift) -> None:
    with torch.no_grad():
        model.outc.bias.add_(torch.as_tensor(np.asarray(shift), dtype=model.outc.bias.dtype,
                                             device=model.outc.bias.device))


@contextlib.contextmanager
def _shifted_output(model: UNet, shift: np.ndarray | None):
    """The model with its output bias shifted for a while (validation, preview); restored bit for bit."""
    if shift is None:
        yield model
        return
    saved = model.outc.bias.detach().clone()
    _add_to_output_bias(model, shift)
    try:
        yield model
    finally:
        with torch.no_grad():
            model.outc.bias.copy_(saved)


def _blend_into(model: UNet, start: dict[str, torch.Tensor], keep: float) -> None:
    """``keep * start + (1 - keep) * model`` for every floating-point tensor ``start`` has
    (weights and batch-norm statistics; the batch counters stay the trained ones), in place."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            old = start.get(key)
            if old is not None and value.is_floating_point() and old.shape == value.shape:
                value.mul_(1.0 - keep).add_(old.to(value.device, value.dtype), alpha=keep)


def _blended(judged: UNet, start: dict[str, torch.Tensor] | None, keep: float) -> UNet:
    """What the result would be now: ``judged`` itself, or a blended copy when fine-tuning (keep_pretrained)."""
    if start is None:
        return judged
    kept = copy.deepcopy(judged)
    _blend_into(kept, start, keep)
    return kept


def _size_in(model: UNet, patch_size: int, largest: int) -> int:
    """Patch input size: the config's, not much larger than the images, valid for the model."""
    want = min(patch_size, largest + 2 * model.margin())
    if model.padding == "same":
        want = max(want, model.size_multiple)
    return model.valid_input_size(max(want, 1))


def _prediction_for(model: UNet, image: np.ndarray, device, precision: str,
                    memory_format=torch.contiguous_format) -> torch.Tensor:
    """Logits ``(n_classes, H, W)`` of a whole plane (``(C, H, W)``), mirrored at the edges (validation)."""
    from .device import autocast

    H, W = image.shape[-2:]
    m = model.margin()
    sh, sw = model.valid_input_size(H + 2 * m), model.valid_input_size(W + 2 * m)
    x = crop_mirrored(image, -m, -m, sh, sw)
    xt = torch.from_numpy(np.ascontiguousarray(x))[None].to(device).contiguous(memory_format=memory_format)
    with autocast(precision, device):
        out = model(xt)
    return out[0, :, :H, :W].float()


def _validate(model: UNet, crops, mode: str, n_classes: int, device, precision: str,
              memory_format=torch.contiguous_format) -> tuple[float, float]:
    """(loss, IoU) of the held-out zones: IoU of the predicted cell mask (instances) or mean class IoU."""
    inter = np.zeros(n_classes)
    union = np.zeros(n_classes)
    loss_sum, n_px = 0.0, 0
    fg_i = fg_u = 0
    for img, tgt in crops:
        logits = _prediction_for(model, img, device, precision, memory_format)
        t = torch.from_numpy(tgt.astype(np.int64)).to(device)
        loss_sum += float(F.cross_entropy(logits[None], t[None], ignore_index=IGNORE, reduction="sum"))
        keep = tgt != IGNORE
        n_px += int(keep.sum())
        pred = logits.argmax(0).cpu().numpy()[keep]
        gt = tgt[keep]
        if mode == "instances":
            fg_i += int(((pred > 0) & (gt > 0)).sum())
            fg_u += int(((pred > 0) | (gt > 0)).sum())
        else:
            for c in range(n_classes):
                inter[c] += ((pred == c) & (gt == c)).sum()
                union[c] += ((pred == c) | (gt == c)).sum()
    loss = loss_sum / max(n_px, 1)
    if mode == "instances":
        iou = fg_i / fg_u if fg_u else 1.0
    else:
        iou = float(np.mean(inter[union > 0] / union[union > 0])) if (union > 0).any() else 1.0
    return loss, float(iou)


class _EmaAverage:
    """``multi_avg_fn`` for :class:`torch.optim.swa_utils.AveragedModel`: an EMA with warm-up.

    After ``n`` averaged steps the decay is ``min(decay, (1 + n) / (10 + n))`` (as in
    TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``). The caller sets ``n``
    before each update (AveragedModel's own count is a tensor: reading it on a GPU would
    wait for the device). Integer buffers (batch norm's step counter) are copied.
    """

    def __init__(self, decay: float):
        self.decay = float(decay)
        self.n = 0

    def __call__(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _n_averaged=None) -> None:
        d = min(self.decay, (1.0 + self.n) / (10.0 + self.n))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, 1.0 - d)
            else:
                a.copy_(c)


def _loss_terms(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of weighted per-pixel losses, sum of weights)``: the loss is their ratio (see :func:`_loss`).

    Kept apart so that distributed training can add the denominators of all ranks first:
    the mean of per-rank weighted means is not the weighted mean of the global batch.
    """
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")
    if weight is None:
        return ce.sum(), (target != IGNORE).sum().to(ce.dtype)
    return (ce * weight).sum(), weight.sum()


def _loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per-pixel softmax cross-entropy, unlabelled pixels ignored, optionally weighted (weighted mean)."""
    num, den = _loss_terms(logits, target, weight)
    return num / den.clamp(min=1e-6)


#: The cosine schedule ends at this fraction of the learning rate, not at 0.
LR_FLOOR = 0.05


def _cosine_factor(iteration: int, elapsed: float, config: TrainConfig) -> float:
    """Learning-rate factor of the cosine schedule: 1 at the start, :data:`LR_FLOOR` at the end of the budget.

    The budget is whichever of ``iterations`` and ``max_time`` runs out first.
    """
    fraction = 0.0
    if config.iterations:
        fraction = max(fraction, iteration / config.iterations)
    if config.max_time:
        fraction = max(fraction, elapsed / config.max_time)
    fraction = min(fraction, 1.0)
    return LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def _use_grad_scaler(precision: str, device_type: str) -> bool:
    """Whether training scales the loss: fp16 on CUDA only.

    Small fp16 gradients underflow to zero without loss scaling; bf16 has fp32's range and
    needs none. fp16 is what ``precision="auto"`` picks on GPUs without bf16; on the CPU it
    is never picked, and is left unscaled when asked for.
    """
    return precision == "fp16" and device_type == "cuda"


def _grad_scaler(precision: str, device) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler``, enabled as :func:`_use_grad_scaler` says (a disabled one passes through)."""
    return torch.amp.GradScaler("cuda", enabled=_use_grad_scaler(precision, torch.device(device).type))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---- the generator ----------------------------------------------------------------------------

def train(images: Any, labels: Any, config: TrainConfig | None = None, *, model: UNet | None = None,
          metadata: dict[str, Any] | None = None, init_from: Any = None, model_config: ModelConfig | None = None,
          roi: Any = None, channel_axis: int | None = None, preview: Callable[[UNet], Any] | None = None,
          preview_every: float = 5.0, distributed: DistContext | None = None,
          stop: Callable[[], bool] | None = None) -> Generator[TrainProgress, None, TrainResult]:
    """Train (or fine-tune, or continue training) a U-Net on painted labels; a generator of progress events.

    Parameters
    ----------
    images, labels : array or sequence of arrays
        Image/label pairs. Images ``(Y, X)``, with channels (``channel_axis``, or an RGB(A)
        last axis), or stacks ``(Z, Y, X)``, ``(T, Y, X)``, ``(T, Z, Y, X)`` of which the 2D
        planes holding labels are used. Labels: integers of the image's spatial shape,
        ``0`` unlabelled, ``1`` background, ``2, 3, ...`` objects.
    config : TrainConfig, optional
        Mode, time budget / iterations, patch and batch size, optimiser, augmentation,
        weight map, validation, seed, device, precision.
    model : UNet, optional
        A network to continue training IN PLACE (paint more, train again). ``metadata``
        is its metadata (kept where still true: class names, earlier training).
    init_from : path-like, optional
        A model file to fine-tune. If its output classes differ from the labels', the
        output 1x1 conv is replaced (a progress message says so).
    model_config : ModelConfig, optional
        Architecture of a new network (``in_channels`` and ``n_classes`` are set from the
        data); default :func:`default_model_config`.
    roi : array or sequence of arrays, optional
        Boolean masks inside which unlabelled pixels count as background.
    channel_axis : int, optional
        Channel axis of the images.
    preview : callable, optional
        ``preview(model) -> Any`` called in the training thread every ``preview_every``
        seconds (model in eval mode, under ``torch.no_grad``); the return value is put
        on the next event's ``preview``.
    distributed : DistContext, optional
        This process's place in a torchrun job (:func:`napari_unet.distributed.init_from_env`);
        call ``train`` on every rank with the same arguments. The model is wrapped in
        DistributedDataParallel, ``config.batch_size`` is the GLOBAL batch (each rank draws
        its share of it), the reported loss is the global one, batch norm is synchronised
        on GPUs, and all ranks stop at the same step. Validation and ``preview`` run on rank
        0 only; a failure of one rank is raised on every rank as
        :class:`napari_unet.distributed.DistributedError` where the ranks can agree on it.
    stop : callable, optional
        ``stop() -> bool``, asked after every step; True ends training after that step
        (status "stopped"). Under ``distributed`` all ranks stop when any rank's ``stop``
        says so (closing the generator on one rank would leave the others waiting).

    Yields
    ------
    TrainProgress
        At least one per optimiser step (plus a first one at iteration 0).

    Returns
    -------
    TrainResult
        The model (the kept weights, see :class:`TrainResult`) and its metadata; the same
        object as ``event.result``.

    Raises
    ------
    TrainingDataError
        Bad input (on the first ``next``): shapes that differ, labels that are not
        non-negative integers, no background or no object painted, images too small, ...

    Notes
    -----
    Patch ``j`` of step ``i`` is drawn with its own generator, ``numpy.random.default_rng([seed,
    i, j])``, so the global batch of a step is the same whatever the number of processes:
    with the same seed, one process and N processes follow the same loss curve (up to
    float rounding, and to batch norm statistics on CPUs, which are per process).
    """
    config = config or TrainConfig()
    dctx = distributed or DistContext()
    if dctx.distributed and config.seed is None:
        # The ranks must hold out the same objects and draw one global batch: rank 0's seed for all.
        config = dataclasses.replace(config, seed=dctx.broadcast(int(np.random.SeedSequence().entropy % 2**32)))
    run = _Run(config, dctx, metadata)
    with torch_threads(torch, config.threads):  # process-wide: put back when the run ends, however it ends
        try:
            run.prepare(images, labels, model=model, init_from=init_from, model_config=model_config, roi=roi,
                        channel_axis=channel_axis)
            run.set_up()
            yield run.event(0, None, message="; ".join(run.messages) or None)
            last_preview = time.perf_counter()
            it = 0
            while True:
                loss = run.step(it)
                it += 1
                done, stopped = run.after_step(it, stop)
                val = run.validate(it, done)
                prev = None
                due = time.perf_counter() - last_preview >= preview_every or done
                if preview is not None and dctx.is_main and due:
                    prev = run.preview(preview)
                    last_preview = time.perf_counter()
                if done:
                    run.status = "stopped" if stopped else "finished"
                yield run.event(it, loss, val, None, prev)
                if done:
                    break
            if config.check_painted and run.data.mode == "instances" and dctx.is_main and run.status == "finished":
                # Not after Stop: the user asked for the result now.
                message, warning = run.check_painted()
                yield run.event(it, None, message=message, warning=warning)
            return run.result
        except (GeneratorExit, KeyboardInterrupt):  # closed (Stop, worker.quit()) or Ctrl-C inside a step
            run.status = "stopped"
            raise
        except Exception as e:
            if dctx.distributed and not run.agreed:
                dctx.agree(e)  # the other ranks learn of it in their agree() after set-up; raises on all
            raise
        finally:
            run.finish()


class _Run:
    """One call of :func:`train`: its state, and the named steps ``train`` loops over.

    :meth:`prepare` (the data, the network to train: new, fine-tuned from a file, or
    continued), :meth:`set_up` (device, precision and memory layout, sampler, optimiser,
    weight averaging, DDP), then per iteration :meth:`step` (one optimiser step on the
    global batch), :meth:`after_step` (budget, Stop, learning-rate schedule),
    :meth:`validate` (keeping the best weights) and :meth:`preview`;
    :meth:`check_painted` after a finished run; :meth:`finish` however the run ends.

    The output-bias calibration has one source of truth here: :attr:`bias_shift` is what
    this run adds to the kept weights' output bias (:meth:`finish`), :attr:`undone_shift`
    what an earlier training had added and this run took off to train on; the metadata and
    the model's ``output_bias_shift`` attribute are written from them.
    """

    def __init__(self, config: TrainConfig, dctx: DistContext, metadata: dict[str, Any] | None):
        self.config, self.dctx = config, dctx
        self.t_start = time.perf_counter()
        self.result = TrainResult(model=None, metadata=dict(metadata or {}))
        self.prior_meta: dict[str, Any] = dict(metadata or {})
        self.status = "error"  # until the run ends otherwise
        self.iteration = 0
        self.messages: list[str] = []
        self.data: TrainingData | None = None
        self.device = None
        self.precision: str | None = None
        self.memory_format = None
        self.init_from: str | None = None
        self.patch: tuple[int, int] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_iou: float | None = None
        self.best_iteration: int | None = None
        self.max_iou = -1.0
        self.start_state: dict[str, torch.Tensor] | None = None  # the starting weights, for keep_pretrained
        self.undone_shift: np.ndarray | None = None
        self.bias_shift: np.ndarray | None = None
        self.shift_applied = False
        self.agreed = False
        self.ema = self.average = None
        self.sync_bn = False
        self.painted_check: dict | None = None
        self.finished = False

    @property
    def model(self) -> UNet:
        return self.result.model

    # ---- set-up -----------------------------------------------------------------------------

    def prepare(self, images, labels, *, model: UNet | None, init_from, model_config: ModelConfig | None, roi,
                channel_axis: int | None) -> None:
        """The training data, and the network: new, fine-tuned from ``init_from``, or ``model`` continued."""
        from .device import resolve_device
        from .io import load_model

        config, dctx = self.config, self.dctx
        if config.batch_size < dctx.world_size:
            raise ValueError(f"batch size {config.batch_size} is smaller than the {dctx.world_size} processes; "
                             f"each needs a patch: use a batch size of at least {dctx.world_size}")
        self.device = resolve_device(dctx.device_name(config.device))
        if init_from is not None:
            if model is not None:
                raise ValueError("give either model (continue training) or init_from (fine-tune a file), not both")
            model, self.prior_meta = load_model(init_from, device="cpu")
            self.init_from = str(init_from)
        prior = self.prior_meta
        border_weights = config.border_weights
        if border_weights is None and model is not None and init_from is None and config.mode == "instances":
            # Continue: corrections gather on touching cells, where the border weights then held most
            # of the loss and crowded fields came back in fragments (measured: docs/fewshot.md).
            border_weights = False
            self.messages.append("continuing: no border weight map (see TrainConfig.border_weights)")
        # A semantic model keeps its classes when fine-tuned on labels that use only some of them.
        target_classes = None
        if model is not None and config.mode == "semantic" and prior.get("mode") == "semantic":
            target_classes = model.config.n_classes
        data = self.data = prepare_training_data(
            images, labels, config.mode, roi=roi, channel_axis=channel_axis, val_fraction=config.val_fraction,
            val_margin=config.val_margin, min_val_objects=config.min_val_objects,
            border_weights=border_weights, w0=config.w0, sigma=config.sigma,
            class_balance_power=config.class_balance, boundary_width=config.boundary_width, seed=config.seed,
            n_classes=target_classes, model_channels=None if model is None else model.config.in_channels,
            target_area=prior.get("object_area") if (config.rescale and model is not None) else None,
            side_views=(config.voxel_size or (1.0, 1.0, 1.0)) if config.side_views else None)
        self.messages.extend(data.messages)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        if model is None:
            mc = model_config or default_model_config()
            model = UNet.from_config(dataclasses.replace(mc, in_channels=data.in_channels, n_classes=data.n_classes))
        else:
            self._adapt(model)
        # Set at once: from here on, however training ends, finish() shifts the kept weights.
        self.bias_shift = _bias_shift(config, data)
        self.result.model = model
        model.to(self.device)
        if self.start_state is not None:  # blended at every validation and preview: keep it beside the model
            self.start_state = {k: v.to(self.device) for k, v in self.start_state.items()}

    def _adapt(self, model: UNet) -> None:
        """A given network made ready to train on: output layer, earlier output shift taken off, blend start."""
        data, prior = self.data, self.prior_meta
        replaced = False
        if model.config.in_channels != data.in_channels:
            raise TrainingDataError(f"the model takes {model.config.in_channels} channel(s) but the image has "
                                    f"{data.in_channels}")
        if model.config.n_classes != data.n_classes:
            msg = f"replaced the output layer: {model.config.n_classes} -> {data.n_classes} classes"
            _replace_output_layer(model, data.n_classes)
            self.messages.append(msg)
            prior.pop("class_names", None)
            prior.pop(BIAS_SHIFT_KEY, None)
            setattr(model, BIAS_SHIFT_KEY, None)  # a new output layer: nothing to undo
            replaced = True
        # What an earlier training added to the bias: recorded on the model object (so that
        # model= without metadata= is undone too), else in the metadata (model files).
        earlier = getattr(model, BIAS_SHIFT_KEY, None)
        if earlier is None:
            earlier = prior.get(BIAS_SHIFT_KEY)
        prior.pop(BIAS_SHIFT_KEY, None)
        if isinstance(earlier, list) and len(earlier) == model.config.n_classes:
            self.undone_shift = np.asarray(earlier, np.float64)
            _add_to_output_bias(model, -self.undone_shift)  # train on from the raw output
        setattr(model, BIAS_SHIFT_KEY, None)
        if self.config.keep_pretrained > 0:  # the starting weights, raw output, for the blend (WiSE-FT)
            self.start_state = {k: v.detach().clone() for k, v in model.state_dict().items()
                                if not (replaced and k.startswith("outc."))}
            self.messages.append(f"the result keeps {self.config.keep_pretrained:.0%} of the starting weights "
                                 f"(keep_pretrained){'; not the new output layer' if replaced else ''}")

    def set_up(self) -> None:
        """Patch size, precision and memory layout, sampler, optimiser, weight averaging, DDP."""
        from .device import select_training_setup

        config, dctx, data, model, device = self.config, self.dctx, self.data, self.model, self.device
        rng = np.random.default_rng(config.seed)
        largest = max(max(p.target.shape) for p in data.planes)
        size_in = _size_in(model, config.patch_size, largest)
        size_out = model.output_size(size_in)
        self.patch = (size_in, size_out)
        self.share = shard(range(config.batch_size), dctx.rank, dctx.world_size)  # this rank's patches of a batch
        # Precision and memory layout: what is fastest depends on the CPU (channels-last fp32 is
        # faster on some AVX-512 CPUs and slower on others), so "auto" measures.
        precision, channels_last = select_training_setup(config.precision, device, model,
                                                         (max(len(self.share), 1), data.in_channels, size_in,
                                                          size_in), max_time=config.max_time)
        self._set_layout(precision, channels_last)
        self.sampler = Sampler(data.planes, size_in, size_out, rng, AugmentConfig() if config.augment else None)
        self.crops = val_crops(data.planes)
        if config.optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate,
                                                              momentum=config.momentum)
        else:
            self.opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        self.complete_metadata()
        # Every rank tells the others whether its set-up failed (bad input on one node only,
        # no GPU ...), so that none of them waits for ever in the first collective below.
        self.agreed = True
        dctx.agree(None)
        if config.ema > 0:
            from torch.optim.swa_utils import AveragedModel

            # PyTorch's own weight averaging, batch-norm statistics included; its stock EMA
            # (get_ema_multi_avg_fn) has no warm-up, which left short runs near their start.
            # Made before the DDP wrap and the SyncBatchNorm swap (CUDA): the copy keeps plain
            # BatchNorm2d, whose state-dict keys are SyncBatchNorm's, so finish() loads it as is.
            self.average = _EmaAverage(config.ema)
            self.ema = AveragedModel(model, multi_avg_fn=self.average, use_buffers=True)
        self.net: nn.Module = model
        if dctx.distributed:
            self._wrap_ddp()
        self.scaler = _grad_scaler(self.precision, device)
        self.patch_seed = config.seed if config.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
        model.train()

    def _set_layout(self, precision: str, channels_last: bool) -> None:
        self.precision = precision
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)

    def _wrap_ddp(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        config, dctx, model, device = self.config, self.dctx, self.model, self.device
        # precision="auto" times the set-ups on each rank; the ranks must compute alike.
        self._set_layout(*dctx.broadcast((self.precision, self.memory_format == torch.channels_last)))
        if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            if device.type == "cuda":
                # Per-GPU batches are small (the global batch divided by the ranks): normalise over the global one.
                from .distributed import sync_batch_norm

                sync_batch_norm(model)
                self.sync_bn = True
            else:
                self.messages.append("batch norm statistics are per process on CPUs (PyTorch's SyncBatchNorm "
                                     "needs CUDA): several processes train exactly like one only without "
                                     "batch norm")
        # Each rank its own dropout masks (the weights are rank 0's: DDP broadcasts them).
        torch.manual_seed(int(np.random.SeedSequence([config.seed, dctx.rank]).generate_state(1)[0]))
        self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- the loop ---------------------------------------------------------------------------

    def event(self, it: int, loss: float | None, val=None, message: str | None = None, prev=None,
              warning: bool = False) -> TrainProgress:
        config = self.config
        el = time.perf_counter() - self.t_start
        fr = 0.0
        if config.iterations:
            fr = max(fr, it / config.iterations)
        if config.max_time:
            fr = max(fr, el / config.max_time)
        return TrainProgress(iteration=it, total=config.iterations, loss=loss,
                             val_loss=None if val is None else val[0], val_iou=None if val is None else val[1],
                             best_val_iou=self.best_iou, elapsed=el, max_time=config.max_time,
                             fraction=min(fr, 1.0), message=message, preview=prev, result=self.result,
                             n_val_objects=self.data.n_val_objects, warning=warning)

    def step(self, it: int) -> float:
        """One optimiser step on the global batch of step ``it``; returns its loss (the global one)."""
        from .device import autocast

        dctx, device = self.dctx, self.device
        failure = None
        try:
            # Patch j of step `it` comes from its own generator: the global batch does not depend
            # on how many processes share it (nor on which rank draws which patch).
            rngs = [np.random.default_rng([self.patch_seed, it, j]) for j in self.share]
            x, t, w = self.sampler.sample(len(self.share), rngs)
            xt = torch.from_numpy(x).to(device).contiguous(memory_format=self.memory_format)
            tt = torch.from_numpy(t.astype(np.int64)).to(device)
            wt = None if w is None else torch.from_numpy(w).to(device)
            with autocast(self.precision, device):
                logits = self.net(xt)
            num, den = _loss_terms(logits, tt, wt)
        except Exception as e:  # noqa: BLE001 - a lone failure is told to the other ranks, then raised
            if not dctx.distributed:
                raise
            failure = e
            num = den = torch.zeros((), device=device)
        # Sums over the global batch. Each rank's loss is its share of the global weighted mean
        # times the world size, because DDP averages the ranks' gradients: the averaged gradient
        # is then exactly the gradient of one process on the whole batch.
        sums = dctx.all_reduce(torch.stack([num.detach().double(), den.detach().double(),
                                            torch.tensor(float(failure is not None), dtype=torch.float64,
                                                         device=num.device)]))
        if sums[2] > 0:
            dctx.agree(failure)
        denominator = sums[1].clamp(min=1e-6)
        loss = num * (dctx.world_size / denominator).to(num.dtype)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.ema is not None:
            self.average.n = it  # steps averaged so far (a Python count: no device sync)
            self.ema.update_parameters(self.model)
        self.iteration = it + 1
        return float(sums[0] / denominator)

    def after_step(self, it: int, stop: Callable[[], bool] | None) -> tuple[bool, bool]:
        """``(done, stopped)`` after ``it`` steps (budget spent or Stop asked, agreed by all ranks); the
        learning-rate schedule moves on."""
        config = self.config
        elapsed = time.perf_counter() - self.t_start
        flags = [float(bool(config.max_time and elapsed >= config.max_time)),
                 float(bool(stop is not None and stop())), elapsed]
        if self.dctx.distributed:  # the ranks' clocks differ: all stop at the step where the first one is out of time
            flags = self.dctx.all_reduce(flags, op="max").tolist()
        stopped = flags[1] > 0
        done = bool((config.iterations and it >= config.iterations) or flags[0] > 0 or stopped)
        if config.lr_schedule == "cosine" and not done:
            # The same factor on every rank: from the step count and the slowest rank's clock.
            for group in self.opt.param_groups:
                group["lr"] = config.learning_rate * _cosine_factor(it, flags[2], config)
        return done, stopped

    @property
    def judged(self) -> UNet:
        """The weights validation and preview judge: the running average, else the model."""
        return self.model if self.ema is None else self.ema.module

    @contextlib.contextmanager
    def _as_kept(self):
        """The network as the result would be now (averaged, blended, output shifted), in eval mode."""
        judged = self.judged
        judged.eval()
        try:
            with torch.no_grad(), _shifted_output(_blended(judged, self.start_state, self.config.keep_pretrained),
                                                  self.bias_shift) as kept:
                yield kept
        finally:
            self.model.train()

    def validate(self, it: int, done: bool):
        """``(loss, IoU)`` on the held-out objects every ``val_every`` steps and at the end (rank 0), else None."""
        if not (self.crops and self.dctx.is_main and (it % self.config.val_every == 0 or done)):
            return None
        data = self.data
        with self._as_kept() as kept:
            val = _validate(kept, self.crops, data.mode, data.n_classes, self.device, self.precision,
                            self.memory_format)
        # Later weights win near-ties: a few held-out objects make a noisy IoU, and keeping an
        # early best threw away most of the training. (Compared with the running maximum, so
        # small decreases cannot chain downwards.)
        self.max_iou = max(val[1], self.max_iou)
        if val[1] >= self.max_iou - VAL_TOLERANCE:
            self.best_iou, self.best_iteration = val[1], it
            self.best_state = copy.deepcopy({k: v.detach() for k, v in self.judged.state_dict().items()})
        return val

    def preview(self, preview: Callable[[UNet], Any]) -> Any:
        with self._as_kept() as kept:
            return preview(kept)

    def check_painted(self) -> tuple[str, bool]:
        """Does the kept network find the painted cells again? ``(message, warning)`` for a last event."""
        from .io import first_line
        from .quality import painted_check

        self.finish()
        try:
            # The planes are already at the network's scale; the YX planes only, not side views.
            check = painted_check(self.model, {**self.result.metadata, "scale": 1.0},
                                  [(p.image, p.painted) for p in self.data.planes if p.source[1] >= 0],
                                  device=str(self.device))
        except Exception as e:  # noqa: BLE001 - an advisory check must never cost the run its result
            return f"painted-cell check skipped: {first_line(e)}", True
        self.painted_check = check.to_dict()
        self.complete_metadata()
        return check.message(), not check.ok

    # ---- the end ----------------------------------------------------------------------------

    def finish(self) -> None:
        """However the run ended: the kept weights into the model, metadata completed. Never raises.

        The kept weights: the best validated state, else the running average (``ema``), else
        the last step's. A run that failed keeps them too (then with the earlier output shift).
        Called once more (the painted-cell check finishes the weights first), it only brings the
        metadata up to date (how the run ended).
        """
        if self.model is None:
            return
        if not self.finished:
            self._finish_weights()
            self.finished = True
        self.complete_metadata()

    def _finish_weights(self) -> None:
        """The kept weights into the model, blended and output-shifted (once per run)."""
        model = self.model
        if self.sync_bn:
            from .distributed import plain_batch_norm

            plain_batch_norm(model)  # a plain UNet again: inference folds BatchNorm2d, files need no process group
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        elif self.ema is not None:
            model.load_state_dict(self.ema.module.state_dict())
        if self.start_state is not None and self.status != "error":
            _blend_into(model, self.start_state, self.config.keep_pretrained)
        if self.status == "error" and self.undone_shift is not None:
            self.bias_shift = self.undone_shift  # a failed run hands the model back calibrated as it came
        if self.bias_shift is not None and not self.shift_applied:
            _add_to_output_bias(model, self.bias_shift)
            self.shift_applied = True
        setattr(model, BIAS_SHIFT_KEY, [float(v) for v in self.bias_shift] if self.shift_applied else None)
        model.eval()
        try:
            model.to(memory_format=torch.contiguous_format)
        except Exception:  # pragma: no cover - a model on an odd device: leave its layout
            pass

    def complete_metadata(self) -> None:
        config, prior, data = self.config, self.prior_meta, self.data
        meta = self.result.metadata
        meta.clear()
        # Not "bioimageio": where an imported package came from describes that package, not this model.
        meta.update({k: v for k, v in prior.items()
                     if k not in ("model", "format", "format_version", "saved", "bioimageio")})
        meta["normalization"] = dict(prior.get("normalization") or NORMALIZATION)
        meta["mode"] = config.mode
        if data is not None and data.object_area is not None:
            meta["object_area"] = data.object_area
        elif config.mode != "instances":
            meta.pop("object_area", None)
        if data is not None:
            meta["scale"] = data.scale  # prediction resizes images by it (1.0: as they are)
        meta.pop(BIAS_SHIFT_KEY, None)
        if self.shift_applied:
            meta[BIAS_SHIFT_KEY] = [float(v) for v in self.bias_shift]
        if data is not None:
            # The earlier names only while they still describe the classes: same count, same mode
            # (an instance model fine-tuned on three semantic classes keeps its 3 outputs, not its names).
            names = prior.get("class_names") if prior.get("mode", config.mode) == config.mode else None
            meta["class_names"] = names if isinstance(names, list) and len(names) == data.n_classes \
                else data.class_names
        previous = prior.get("training") or None
        if isinstance(previous, dict):
            previous = {k: v for k, v in previous.items() if k != "previous"}
        meta["training"] = {
            "date": _now(),
            "status": self.status,
            "iterations": int(self.iteration),
            "elapsed": round(time.perf_counter() - self.t_start, 2),
            "data_shapes": [list(s) for s in (data.shapes if data else [])],
            "n_objects": data.n_objects if data else None,
            "n_val_objects": data.n_val_objects if data else None,
            "best_val_iou": self.best_iou,
            "best_iteration": self.best_iteration,
            "patch": list(self.patch) if self.patch else None,
            "device": None if self.device is None or self.precision is None else str(self.device),
            "processes": int(self.dctx.world_size),
            "precision": self.precision,
            "memory_format": None if self.memory_format is None else
            ("channels_last" if self.memory_format == torch.channels_last else "contiguous"),
            "config": config.to_dict(),
            "init_from": self.init_from,
            "messages": list(self.messages),
            "painted_check": self.painted_check,
            "previous": previous,
        }
