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
from scipy import ndimage as ndi
from torch import nn

from .augment import AugmentConfig, augment_intensity, patch_coordinates, warp
from .config import ModelConfig, TrainConfig, default_model_config
from .data import (
    IGNORE,
    MIN_IMAGE_SIZE,
    TrainingDataError,
    apply_roi,
    as_list,
    border_weight_map,
    check_labels,
    class_balance,
    instance_targets,
    normalize,
    painted_area,
    rescale_factor,
    resize_plane,
    scaled_shape,
    semantic_targets,
    split_channels,
    to_grey,
)
from .distributed import DistContext, shard
from .model import UNet

__all__ = ["train", "TrainProgress", "TrainResult", "TrainingDataError", "TrainingData", "prepare_training_data",
           "default_model_config", "paper_preset", "INSTANCE_CLASS_NAMES"]

INSTANCE_CLASS_NAMES = ["background", "cell", "boundary"]
NORMALIZATION = {"method": "percentile", "low": 1.0, "high": 99.8}
#: Fractions of patches centred on a painted object pixel and on any painted pixel (the rest anywhere):
#: painted background usually outnumbers the few painted cells many times over.
OBJECT_CENTRE_FRACTION = 0.5
#: Validation IoU within this of the best so far counts as no worse (the later weights are kept).
VAL_TOLERANCE = 0.02
LABELLED_CENTRE_FRACTION = 0.4


def paper_preset(in_channels: int = 1, n_classes: int = 3, **overrides) -> tuple[TrainConfig, ModelConfig]:
    """The paper's set-up: SGD with momentum 0.99, batch 1, large 572 px tiles, the unpadded 64/5 U-Net.

    Returns ``(TrainConfig, ModelConfig)``; ``overrides`` replace TrainConfig fields.
    Slow on a CPU (about 10 s per step): meant for GPUs and for reproducing the paper.
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


# ---- data preparation -------------------------------------------------------------------------

@dataclass
class _Plane:
    image: np.ndarray  # (C, H, W) float32, normalised
    target: np.ndarray  # (H, W) uint8 class, IGNORE where unlabelled or held out
    weight: np.ndarray | None  # (H, W) float32 loss weights (0 where ignored), or None
    val_target: np.ndarray | None  # (H, W) uint8, labelled only in the held-out zones
    source: tuple[int, int]  # (image index, plane index)
    centres: np.ndarray = field(default=None)  # flat indices of trainable labelled pixels
    object_centres: np.ndarray = field(default=None)  # ... of those in objects (class > 0)
    painted: np.ndarray | None = None  # (H, W) the painted labels (instance mode), held-out objects included


@dataclass
class TrainingData:
    """Images and painted labels turned into normalised 2D planes with targets (see :func:`prepare_training_data`).

    Attributes
    ----------
    planes : list
        One entry per labelled 2D plane: normalised image ``(C, H, W)``, target, weights,
        validation target.
    in_channels, n_classes : int
        What the network must take and give.
    mode : str
        ``"instances"`` or ``"semantic"``.
    class_names : list of str
    n_objects, n_val_objects : int
        Painted objects, and how many of them are held out for validation.
    object_area : float or None
        Median area in pixels of the painted objects (instance mode), after resizing by
        ``scale``: prediction derives the smallest cell and seed it keeps from it.
    scale : float
        The factor the planes were resized by (1.0: not resized; see ``target_area`` of
        :func:`prepare_training_data`).
    shapes : list of tuple
        The input images' shapes (provenance).
    class_weights : numpy.ndarray
        ``w_c`` of the loss.
    messages : list of str
        Things worth telling the user (e.g. validation skipped).
    """

    planes: list[_Plane]
    in_channels: int
    n_classes: int
    mode: str
    class_names: list[str]
    n_objects: int
    n_val_objects: int
    shapes: list[tuple[int, ...]]
    class_weights: np.ndarray
    messages: list[str] = field(default_factory=list)
    object_area: float | None = None
    scale: float = 1.0


def _planes_2d(arr: np.ndarray, spatial_ndim: int) -> np.ndarray:
    """``(..., Y, X[, C])`` -> ``(P, Y, X[, C])``: every 2D plane of a stack."""
    lead = arr.shape[:spatial_ndim - 2]
    return arr.reshape((int(np.prod(lead, dtype=np.int64)),) + arr.shape[spatial_ndim - 2:])


def prepare_training_data(images: Any, labels: Any, mode: str = "instances", *, roi: Any = None,
                          channel_axis: int | None = None, val_fraction: float = 0.2, val_margin: int = 8,
                          min_val_objects: int = 8, border_weights: bool | None = None, w0: float = 10.0,
                          sigma: float = 5.0, class_balance_power: float = 1.0, n_classes: int | None = None,
                          boundary_width: int = 3, seed: int | None = 0,
                          model_channels: int | None = None, target_area: float | None = None) -> TrainingData:
    """Check images and painted labels and turn them into training planes; raise :class:`TrainingDataError`.

    Parameters
    ----------
    images, labels : array or list of arrays
        Images ``(Y, X)``, ``(Y, X, C)`` / with ``channel_axis``, or stacks ``(Z, Y, X)``,
        ``(T, Z, Y, X)``; labels integer arrays of the image's spatial shape. The 2D planes
        that hold labels are used.
    mode : {"instances", "semantic"}
    roi : array or list of arrays, optional
        Boolean masks; inside them unlabelled pixels count as background.
    channel_axis : int, optional
        Axis of the image channels (RGB(A) last axes and one extra axis are detected).
    val_fraction, val_margin, min_val_objects : float, int, int
        Fraction of painted objects held out for validation, the margin (px) around them
        that is also kept out of the training loss, and the object count below which
        nothing is held out (all painted objects train).
    border_weights : bool, optional
        The paper's weight map (default: on in instance mode).
    w0, sigma, class_balance_power : float
        Weight-map parameters (see :func:`napari_unet.data.border_weight_map` and
        :func:`napari_unet.data.class_balance`).
    n_classes : int, optional
        Force the number of classes (semantic mode, fine-tuning a model with more classes).
    boundary_width : int
        Instance mode: the boundary band's width (see :func:`napari_unet.data.instance_targets`).
    seed : int, optional
        Chooses the held-out objects.
    model_channels : int, optional
        The channels of the network that will train (fine-tuning): for a one-channel network
        an RGB(A) image (channels on the last axis, or on ``channel_axis``) is converted to
        grey (:func:`napari_unet.data.to_grey`), as prediction does; a message says so.
    target_area : float, optional
        Instance mode: the cell area (px) the network knows (the starting model's
        ``object_area``). The planes are resized so that the painted cells' median area
        matches it (:func:`napari_unet.data.rescale_factor`; ``TrainingData.scale``), and
        prediction resizes images by the same factor (the model file's ``scale``).

    This is cheap enough to call on the GUI thread to check the input before training.
    """
    imgs = as_list(images, "images")
    labs = as_list(labels, "labels")
    rois = as_list(roi, "roi")
    if not imgs:
        raise TrainingDataError("no image given")
    if len(imgs) != len(labs):
        raise TrainingDataError(f"{len(imgs)} images but {len(labs)} label arrays; give one labels array per image")
    if rois and len(rois) != len(labs):
        raise TrainingDataError(f"{len(rois)} roi masks for {len(labs)} label arrays")
    rng = np.random.default_rng(seed)
    messages: list[str] = []
    converted = False
    suffix = (lambda i: f" {i + 1}") if len(imgs) > 1 else (lambda i: "")
    raw: list[tuple[np.ndarray, np.ndarray, tuple[int, int]]] = []  # (image (Y,X,C) normalised, labels, source)
    constant: list[tuple[int, float]] = []  # (image index, its one value): nothing to learn from
    shapes: list[tuple[int, ...]] = []
    in_channels = None
    for i, (img, lab) in enumerate(zip(imgs, labs)):
        lab = check_labels(lab, f"labels{suffix(i)}")
        if lab.ndim < 2:
            raise TrainingDataError(f"labels{suffix(i)} must be at least 2D, got shape {lab.shape}")
        if rois:
            lab = apply_roi(lab, rois[i])
        im = split_channels(img, lab.shape, channel_axis, f"image{suffix(i)}")
        # RGB(A) for a one-channel model: as prediction reads it (an explicit channel axis, or the last axis).
        rgb_axis = channel_axis is not None or tuple(np.shape(img)[:-1]) == tuple(lab.shape)
        if model_channels == 1 and im.shape[-1] in (3, 4) and rgb_axis:
            im = to_grey(im)
            if not converted:
                messages.append("the model takes one channel: the colour image is trained on as grey")
                converted = True
        shapes.append(tuple(int(s) for s in np.shape(img)))
        if min(lab.shape[-2:]) < MIN_IMAGE_SIZE:
            raise TrainingDataError(f"image{suffix(i)} is too small ({lab.shape[-2]}x{lab.shape[-1]} px); training "
                                    f"needs at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}")
        if in_channels is None:
            in_channels = im.shape[-1]
        elif im.shape[-1] != in_channels:
            raise TrainingDataError(f"image{suffix(i)} has {im.shape[-1]} channels, image 1 has {in_channels}")
        lab_p = _planes_2d(lab, lab.ndim)
        has = np.flatnonzero(lab_p.reshape(len(lab_p), -1).max(axis=1) > 0)
        if not len(has):
            continue
        im_f = np.asarray(im, dtype=np.float32)
        finite = np.isfinite(im_f)
        if not finite.any():
            raise TrainingDataError(f"image{suffix(i)} has no finite values (all NaN or Inf)")
        if np.min(im_f, where=finite, initial=np.inf) == np.max(im_f, where=finite, initial=-np.inf):
            # Told after the labels' problems: those are what a user painting is working on.
            constant.append((i, float(im_f[finite].flat[0])))
        del finite
        norm = normalize(im_f, NORMALIZATION["low"], NORMALIZATION["high"], channel_axis=-1)
        im_p = _planes_2d(norm, lab.ndim)
        for p in has:
            raw.append((im_p[p], lab_p[p], (i, int(p))))
    if not raw:
        raise TrainingDataError("the labels are empty: paint background (1) and objects (2, 3, ...)")
    values = set()
    for _, lab, _ in raw:
        values.update(np.unique(lab).tolist())
    if mode == "instances":
        if 1 not in values:
            raise TrainingDataError("no background painted: paint some background with label 1")
        if not any(v >= 2 for v in values):
            raise TrainingDataError("no object painted: paint at least one cell with label 2 or more")
        n_cls = 3
        class_names = list(INSTANCE_CLASS_NAMES)
    elif mode == "semantic":
        painted = sorted(v for v in values if v >= 1)
        if len(painted) < 2:
            raise TrainingDataError("semantic training needs at least two classes painted (1 = background, 2, 3, ...)")
        n_cls = max(int(max(painted)), int(n_classes or 0))
        class_names = ["background"] + [f"class {k}" for k in range(1, n_cls)]
    else:
        raise TrainingDataError(f"mode must be 'instances' or 'semantic', got {mode!r}")
    scale = 1.0
    if mode == "instances" and target_area:
        lab_planes = [lab for _, lab, _ in raw]
        area = painted_area(lab_planes)
        scale = rescale_factor(area, target_area, min_side=min(min(lab.shape) for lab in lab_planes))
        if scale != 1.0:
            raw = [(resize_plane(im, scaled_shape(lab.shape, scale), channel_axis=-1),
                    resize_plane(lab, scaled_shape(lab.shape, scale), labels=True), src) for im, lab, src in raw]
            messages.append(f"the painted cells ({area:.0f} px) are {'smaller' if scale > 1 else 'larger'} than "
                            f"those the model knows ({target_area:.0f} px): images are resized by {scale:.2f} "
                            "for training and prediction")
    if constant:
        i, value = constant[0]
        raise TrainingDataError(f"image{suffix(i)} has the same value ({value:g}) everywhere: nothing to learn from; "
                                "check that the right image is chosen")

    # Hold out whole objects (with a margin) for validation.
    objects = []  # (raw index, value or component mask id)
    comps = []
    for r, (_, lab, _) in enumerate(raw):
        if mode == "instances":
            for v in np.unique(lab[lab >= 2]):
                objects.append((r, int(v)))
            comps.append(None)
        else:
            cc, n = ndi.label(lab >= 2)
            # A component can hold several painted classes; it is still one held-out region.
            comps.append(cc)
            objects.extend((r, k) for k in range(1, n + 1))
    n_val = 0
    if val_fraction > 0 and len(objects) >= min_val_objects:
        n_val = int(min(max(1, round(val_fraction * len(objects))), len(objects) - 1))
    elif val_fraction > 0:
        messages.append(f"{len(objects)} painted object(s): all used for training, validation skipped (it holds "
                        f"objects out from {min_val_objects} on)")
    val_set = {objects[k] for k in rng.choice(len(objects), size=n_val, replace=False)} if n_val else set()

    planes = []
    targets = []
    cells_list = []
    cells_all = []
    for r, (im, lab, src) in enumerate(raw):
        if mode == "instances":
            target, cells = instance_targets(lab, boundary_width)
            cells_all.append(cells)  # before the held-out objects are removed: all painted cells count
        else:
            target, cells = semantic_targets(lab), None
        val_target = None
        held = [v for (rr, v) in val_set if rr == r]
        if held:
            obj = np.isin(lab, held) if mode == "instances" else np.isin(comps[r], held)
            zone = ndi.distance_transform_edt(~obj) <= val_margin
            val_target = np.where(zone, target, IGNORE).astype(np.uint8)
            target = np.where(zone, IGNORE, target).astype(np.uint8)
            if cells is not None:
                cells = np.where(zone, 0, cells)
        targets.append(target)
        cells_list.append(cells)
        planes.append(_Plane(image=np.ascontiguousarray(np.moveaxis(im, -1, 0)), target=target, weight=None,
                             val_target=val_target, source=src, painted=lab if mode == "instances" else None))
    cw = class_balance(targets, n_cls, class_balance_power)
    use_border = (mode == "instances") if border_weights is None else bool(border_weights)
    for pl, cells in zip(planes, cells_list):
        if use_border and cells is not None:
            pl.weight = border_weight_map(cells, pl.target, cw, w0, sigma)
        elif use_border:  # semantic with border weights requested: class balance only
            pl.weight = np.where(pl.target != IGNORE, cw[np.minimum(pl.target, n_cls - 1)], 0).astype(np.float32)
        pl.centres = np.flatnonzero(pl.target.ravel() != IGNORE)
        pl.object_centres = np.flatnonzero((pl.target.ravel() != IGNORE) & (pl.target.ravel() > 0))
    planes = [p for p in planes if len(p.centres) or p.val_target is not None]
    if not any(len(p.centres) for p in planes):
        raise TrainingDataError("nothing left to train on after holding out validation objects; paint more")
    object_area = None
    if mode == "instances":
        areas = np.concatenate([np.bincount(c.ravel())[1:] for c in cells_all if c.max() > 0])
        object_area = float(np.median(areas[areas > 0]))
    return TrainingData(planes=planes, in_channels=int(in_channels), n_classes=n_cls, mode=mode,
                        class_names=class_names, n_objects=len(objects), n_val_objects=n_val, shapes=shapes,
                        class_weights=cw, messages=messages, object_area=object_area, scale=scale)


# ---- patches ----------------------------------------------------------------------------------

def _reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices mirrored into ``[0, n)`` (numpy's ``"symmetric"`` padding, any distance)."""
    period = 2 * n
    i = np.mod(idx, period)
    return np.where(i >= n, period - 1 - i, i)


def _crop(arr: np.ndarray, y0: int, x0: int, h: int, w: int, fill=None) -> np.ndarray:
    """Crop ``[y0:y0+h, x0:x0+w]`` of the last two axes; beyond the edges mirror (or ``fill``)."""
    H, W = arr.shape[-2:]
    iy, ix = np.arange(y0, y0 + h), np.arange(x0, x0 + w)
    out = arr[..., _reflect_index(iy, H)[:, None], _reflect_index(ix, W)[None, :]]
    if fill is not None:
        outside = ((iy < 0) | (iy >= H))[:, None] | ((ix < 0) | (ix >= W))[None, :]
        out = np.where(outside, fill, out).astype(arr.dtype)
    return out


class _Sampler:
    """Random training patches (image, target, weights) that favour labelled pixels, with augmentation."""

    def __init__(self, planes: list[_Plane], size_in: int, size_out: int, rng: np.random.Generator,
                 augment: AugmentConfig | None):
        self.planes = [p for p in planes if len(p.centres)]
        counts = np.array([len(p.centres) for p in self.planes], np.float64)
        # sqrt: a plane with many labels is picked more often, but a few cells elsewhere still get seen.
        self.p = np.sqrt(counts) / np.sqrt(counts).sum()
        self.size_in, self.size_out = size_in, size_out
        self.rng, self.augment = rng, augment

    def sample(self, batch: int, rngs: list[np.random.Generator] | None = None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``batch`` patches, patch k drawn with ``rngs[k]`` when given (else all with the sampler's RNG)."""
        imgs, tgts, wts = [], [], []
        for k in range(batch):
            rng = self.rng if rngs is None else rngs[k]
            pl = self.planes[rng.choice(len(self.planes), p=self.p)]
            H, W = pl.target.shape
            r = rng.random()
            if r < OBJECT_CENTRE_FRACTION and len(pl.object_centres):
                cy, cx = divmod(int(pl.object_centres[rng.integers(len(pl.object_centres))]), W)
            elif r < OBJECT_CENTRE_FRACTION + LABELLED_CENTRE_FRACTION:
                cy, cx = divmod(int(pl.centres[rng.integers(len(pl.centres))]), W)
            else:
                cy, cx = int(rng.integers(H)), int(rng.integers(W))
            off = (self.size_in - self.size_out) // 2
            if self.augment is None:
                y0, x0 = cy - self.size_in // 2, cx - self.size_in // 2
                imgs.append(_crop(pl.image, y0, x0, self.size_in, self.size_in))
                tgts.append(_crop(pl.target, y0 + off, x0 + off, self.size_out, self.size_out, fill=IGNORE))
                if pl.weight is not None:
                    wts.append(_crop(pl.weight, y0 + off, x0 + off, self.size_out, self.size_out, fill=0.0))
                continue
            coords = patch_coordinates((self.size_in, self.size_in), (cy, cx), rng, self.augment)
            img = warp(pl.image, coords, order=1, mode="mirror")
            imgs.append(augment_intensity(img, rng, self.augment))
            inner = coords[:, off:off + self.size_out, off:off + self.size_out]
            tgts.append(warp(pl.target, inner, order=0, mode="constant", cval=IGNORE))
            if pl.weight is not None:
                wts.append(warp(pl.weight, inner, order=0, mode="constant", cval=0.0))
        return np.stack(imgs), np.stack(tgts), (np.stack(wts) if wts else None)


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
    nothing more on the few-shot benchmark (AP 0.664 against 0.669 for this, on the same
    three networks) and did worse on the synthetic quality test (AP 0.29 against 0.39).
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


def _blended(judged: UNet, st: dict[str, Any], config: TrainConfig) -> UNet:
    """What the result would be now: ``judged`` itself, or a blended copy when fine-tuning (keep_pretrained)."""
    start = st.get("start_state")
    if start is None:
        return judged
    kept = copy.deepcopy(judged)
    _blend_into(kept, start, config.keep_pretrained)
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
    x = _crop(image, -m, -m, sh, sw)
    xt = torch.from_numpy(np.ascontiguousarray(x))[None].to(device).contiguous(memory_format=memory_format)
    with autocast(precision, device):
        out = model(xt)
    return out[0, :, :H, :W].float()


def _val_crops(planes: list[_Plane], context: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image crop, target crop) around each plane's held-out zones, with ``context`` px of image around."""
    crops = []
    for pl in planes:
        if pl.val_target is None:
            continue
        lab = pl.val_target != IGNORE
        cc, _ = ndi.label(ndi.binary_dilation(lab, iterations=context // 2))
        for sl in ndi.find_objects(cc):
            y0 = max(sl[0].start - context // 2, 0)
            y1 = min(sl[0].stop + context // 2, lab.shape[0])
            x0 = max(sl[1].start - context // 2, 0)
            x1 = min(sl[1].stop + context // 2, lab.shape[1])
            crops.append((pl.image[:, y0:y1, x0:x1], pl.val_target[y0:y1, x0:x1]))
    return crops


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
    from .device import autocast, resolve_device, select_training_setup
    from .io import load_model

    config = config or TrainConfig()
    dctx = distributed or DistContext()
    if dctx.distributed and config.seed is None:
        # The ranks must hold out the same objects and draw one global batch: rank 0's seed for all.
        config = dataclasses.replace(config, seed=dctx.broadcast(int(np.random.SeedSequence().entropy % 2**32)))
    t_start = time.perf_counter()
    result = TrainResult(model=None, metadata=dict(metadata or {}))
    st: dict[str, Any] = {"iteration": 0, "best_state": None, "best_iou": None, "best_iteration": None,
                          "status": "error", "data": None, "messages": [], "precision": None, "device": None,
                          "t_start": t_start, "world_size": dctx.world_size}
    threads_before = torch.get_num_threads()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.batch_size < dctx.world_size:
            raise ValueError(f"batch size {config.batch_size} is smaller than the {dctx.world_size} processes; "
                             f"each needs a patch: use a batch size of at least {dctx.world_size}")
        device = resolve_device(dctx.device_name(config.device))
        prior_meta: dict[str, Any] = dict(metadata or {})
        if init_from is not None:
            if model is not None:
                raise ValueError("give either model (continue training) or init_from (fine-tune a file), not both")
            model, prior_meta = load_model(init_from, device="cpu")
            st["init_from"] = str(init_from)
        # A semantic model keeps its classes when fine-tuned on labels that use only some of them.
        target_classes = None
        if model is not None and config.mode == "semantic" and prior_meta.get("mode") == "semantic":
            target_classes = model.config.n_classes
        data = prepare_training_data(
            images, labels, config.mode, roi=roi, channel_axis=channel_axis, val_fraction=config.val_fraction,
            val_margin=config.val_margin, min_val_objects=config.min_val_objects,
            border_weights=config.border_weights, w0=config.w0, sigma=config.sigma,
            class_balance_power=config.class_balance, boundary_width=config.boundary_width, seed=config.seed,
            n_classes=target_classes, model_channels=None if model is None else model.config.in_channels,
            target_area=prior_meta.get("object_area") if (config.rescale and model is not None) else None)
        st["data"] = data
        st["messages"].extend(data.messages)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        if model is None:
            mc = model_config or default_model_config()
            mc = dataclasses.replace(mc, in_channels=data.in_channels, n_classes=data.n_classes)
            model = UNet.from_config(mc)
        else:
            replaced = False
            if model.config.in_channels != data.in_channels:
                raise TrainingDataError(f"the model takes {model.config.in_channels} channel(s) but the image has "
                                        f"{data.in_channels}")
            if model.config.n_classes != data.n_classes:
                msg = f"replaced the output layer: {model.config.n_classes} -> {data.n_classes} classes"
                _replace_output_layer(model, data.n_classes)
                st["messages"].append(msg)
                prior_meta.pop("class_names", None)
                prior_meta.pop(BIAS_SHIFT_KEY, None)
                setattr(model, BIAS_SHIFT_KEY, None)  # a new output layer: nothing to undo
                replaced = True
            # What an earlier training added to the bias: recorded on the model object (so that
            # model= without metadata= is undone too), else in the metadata (model files).
            earlier = getattr(model, BIAS_SHIFT_KEY, None)
            if earlier is None:
                earlier = prior_meta.get(BIAS_SHIFT_KEY)
            prior_meta.pop(BIAS_SHIFT_KEY, None)
            if isinstance(earlier, list) and len(earlier) == model.config.n_classes:
                _add_to_output_bias(model, -np.asarray(earlier, np.float64))  # train on from the raw output
                st["undone_shift"] = np.asarray(earlier, np.float64)
            setattr(model, BIAS_SHIFT_KEY, None)
            if config.keep_pretrained > 0:  # the starting weights, raw output, for the blend (WiSE-FT)
                st["start_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()
                                     if not (replaced and k.startswith("outc."))}
                st["messages"].append(f"the result keeps {config.keep_pretrained:.0%} of the starting weights "
                                      f"(keep_pretrained){'; not the new output layer' if replaced else ''}")
        # Set at once: from here on, however training ends, _finish shifts the kept weights.
        shift = st["bias_shift"] = _bias_shift(config, data)
        result.model = model
        st["prior_meta"] = prior_meta
        model.to(device)
        if st.get("start_state") is not None:  # blended at every validation and preview: keep it beside the model
            st["start_state"] = {k: v.to(device) for k, v in st["start_state"].items()}
        rng = np.random.default_rng(config.seed)
        largest = max(max(p.target.shape) for p in data.planes)
        size_in = _size_in(model, config.patch_size, largest)
        size_out = model.output_size(size_in)
        st["patch"] = (size_in, size_out)
        share = shard(range(config.batch_size), dctx.rank, dctx.world_size)  # this rank's patches of each batch
        # Precision and memory layout: what is fastest depends on the CPU (channels-last fp32 was
        # 1.5x faster on one AVX-512 CPU and 2.7x slower on another), so "auto" measures.
        precision, channels_last = select_training_setup(config.precision, device, model,
                                                         (max(len(share), 1), data.in_channels, size_in, size_in),
                                                         max_time=config.max_time)
        st["precision"], st["device"] = precision, str(device)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        st["memory_format"] = memory_format
        model.to(memory_format=memory_format)
        sampler = _Sampler(data.planes, size_in, size_out, rng, AugmentConfig() if config.augment else None)
        crops = _val_crops(data.planes)
        if config.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate,
                                                         momentum=config.momentum)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        _complete_metadata(result, config, st)
        # Every rank tells the others whether its set-up failed (bad input on one node only,
        # no GPU ...), so that none of them waits for ever in the first collective below.
        st["agreed"] = True
        dctx.agree(None)
        ema = average = None
        if config.ema > 0:
            from torch.optim.swa_utils import AveragedModel

            # PyTorch's own weight averaging, batch-norm statistics included; its stock EMA
            # (get_ema_multi_avg_fn) has no warm-up, which left short runs near their start.
            # Made before the DDP wrap and the SyncBatchNorm swap (CUDA): the copy keeps plain
            # BatchNorm2d, whose state-dict keys are SyncBatchNorm's, so _finish loads it as is.
            average = _EmaAverage(config.ema)
            ema = AveragedModel(model, multi_avg_fn=average, use_buffers=True)
            st["ema"] = ema
        net: nn.Module = model
        if dctx.distributed:
            # precision="auto" times the set-ups on each rank; the ranks must compute alike.
            precision, channels_last = dctx.broadcast((precision, channels_last))
            st["precision"] = precision
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            st["memory_format"] = memory_format
            model.to(memory_format=memory_format)
            if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
                if device.type == "cuda":
                    # Per-GPU batches are small (the global batch divided by the ranks): normalise over the global one.
                    from .distributed import sync_batch_norm

                    sync_batch_norm(model)
                    st["sync_bn"] = True
                else:
                    st["messages"].append("batch norm statistics are per process on CPUs (PyTorch's SyncBatchNorm "
                                          "needs CUDA): several processes train exactly like one only without "
                                          "batch norm")
            # Each rank its own dropout masks (the weights are rank 0's: DDP broadcasts them).
            torch.manual_seed(int(np.random.SeedSequence([config.seed, dctx.rank]).generate_state(1)[0]))
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        scaler = _grad_scaler(precision, device)
        patch_seed = config.seed if config.seed is not None else int(np.random.SeedSequence().entropy % 2**32)

        def event(it, loss, val=None, message=None, prev=None, warning=False):
            el = time.perf_counter() - t_start
            fr = 0.0
            if config.iterations:
                fr = max(fr, it / config.iterations)
            if config.max_time:
                fr = max(fr, el / config.max_time)
            return TrainProgress(iteration=it, total=config.iterations, loss=loss,
                                 val_loss=None if val is None else val[0], val_iou=None if val is None else val[1],
                                 best_val_iou=st["best_iou"], elapsed=el, max_time=config.max_time,
                                 fraction=min(fr, 1.0), message=message, preview=prev, result=result,
                                 n_val_objects=data.n_val_objects, warning=warning)

        model.train()
        yield event(0, None, message="; ".join(st["messages"]) or None)
        last_preview = time.perf_counter()
        it = 0
        while True:
            failure = None
            try:
                # Patch j of step `it` comes from its own generator: the global batch does not depend
                # on how many processes share it (nor on which rank draws which patch).
                rngs = [np.random.default_rng([patch_seed, it, j]) for j in share]
                x, t, w = sampler.sample(len(share), rngs)
                xt = torch.from_numpy(x).to(device).contiguous(memory_format=memory_format)
                tt = torch.from_numpy(t.astype(np.int64)).to(device)
                wt = None if w is None else torch.from_numpy(w).to(device)
                with autocast(precision, device):
                    logits = net(xt)
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
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                average.n = it  # steps averaged so far (a Python count: no device sync)
                ema.update_parameters(model)
            it += 1
            st["iteration"] = it
            elapsed = time.perf_counter() - t_start
            flags = [float(bool(config.max_time and elapsed >= config.max_time)),
                     float(bool(stop is not None and stop())), elapsed]
            if dctx.distributed:  # the ranks' clocks differ: all stop at the step where the first one is out of time
                flags = dctx.all_reduce(flags, op="max").tolist()
            stopped = flags[1] > 0
            done = bool((config.iterations and it >= config.iterations) or flags[0] > 0 or stopped)
            if config.lr_schedule == "cosine" and not done:
                # The same factor on every rank: from the step count and the slowest rank's clock.
                for group in opt.param_groups:
                    group["lr"] = config.learning_rate * _cosine_factor(it, flags[2], config)
            val = None
            judged = model if ema is None else ema.module  # the weights validation and preview judge
            if crops and dctx.is_main and (it % config.val_every == 0 or done):
                judged.eval()
                with torch.no_grad(), _shifted_output(_blended(judged, st, config), shift) as kept:
                    val = _validate(kept, crops, data.mode, data.n_classes, device, precision, memory_format)
                model.train()
                # Later weights win near-ties: a few held-out objects make a noisy IoU, and
                # keeping an early best threw away most of the training.
                # (Compared with the running maximum, so small decreases cannot chain downwards.)
                top = max(val[1], st.get("max_iou", -1.0))
                st["max_iou"] = top
                if val[1] >= top - VAL_TOLERANCE:
                    st["best_iou"], st["best_iteration"] = val[1], it
                    st["best_state"] = copy.deepcopy({k: v.detach() for k, v in judged.state_dict().items()})
            prev = None
            if preview is not None and dctx.is_main and (time.perf_counter() - last_preview >= preview_every or done):
                judged.eval()
                with torch.no_grad(), _shifted_output(_blended(judged, st, config), shift) as kept:
                    prev = preview(kept)
                model.train()
                last_preview = time.perf_counter()
            if done:
                st["status"] = "stopped" if stopped else "finished"
            yield event(it, float(sums[0] / denominator), val, None, prev)
            if done:
                break
        if config.check_painted and data.mode == "instances" and dctx.is_main and st["status"] == "finished":
            # Does the kept network find the painted cells again? Told to the user in a last event.
            # Not after Stop: the user asked for the result now.
            from .io import first_line
            from .quality import painted_check

            _finish(result, config, st)
            try:
                # The planes are already at the network's scale.
                check = painted_check(model, {**result.metadata, "scale": 1.0},
                                      [(p.image, p.painted) for p in data.planes],
                                      device=st["device"])
            except Exception as e:  # noqa: BLE001 - an advisory check must never cost the run its result
                message, warning = f"painted-cell check skipped: {first_line(e)}", True
            else:
                st["painted_check"] = check.to_dict()
                message, warning = check.message(), not check.ok
                _complete_metadata(result, config, st)
            yield event(it, None, message=message, warning=warning)
        return result
    except (GeneratorExit, KeyboardInterrupt):  # closed (Stop, worker.quit()) or Ctrl-C inside a step
        st["status"] = "stopped"
        raise
    except Exception as e:
        if dctx.distributed and not st.get("agreed"):
            dctx.agree(e)  # the other ranks learn of it in their agree() after set-up; raises on all
        raise
    finally:
        _finish(result, config, st)
        if config.threads:
            torch.set_num_threads(threads_before)


def _finish(result: TrainResult, config: TrainConfig, st: dict[str, Any]) -> None:
    """Whatever way training ended: the kept weights into the model, metadata completed. Never raises.

    The kept weights: the best validated state, else the running average (``ema``), else the
    last step's. A run that failed keeps them too (then with the earlier output shift).
    Called once more (the painted-cell check finishes the weights first), it only brings the
    metadata up to date (how the run ended).
    """
    model = result.model
    if model is None:
        return
    if not st.get("finished"):
        _finish_weights(model, config, st)
        st["finished"] = True
    _complete_metadata(result, config, st)


def _finish_weights(model: UNet, config: TrainConfig, st: dict[str, Any]) -> None:
    """The kept weights into ``model``, blended and output-shifted (once per run)."""
    if st.get("sync_bn"):
        from .distributed import plain_batch_norm

        plain_batch_norm(model)  # a plain UNet again: inference folds BatchNorm2d, model files need no process group
    if st.get("best_state") is not None:
        model.load_state_dict(st["best_state"])
    elif st.get("ema") is not None:
        model.load_state_dict(st["ema"].module.state_dict())
    if st.get("start_state") is not None and st.get("status") != "error":
        _blend_into(model, st["start_state"], config.keep_pretrained)
    if st.get("status") == "error" and st.get("undone_shift") is not None:
        st["bias_shift"] = st["undone_shift"]  # a failed run hands the model back calibrated as it came
    if st.get("bias_shift") is not None and not st.get("shift_applied"):
        _add_to_output_bias(model, st["bias_shift"])
        st["shift_applied"] = True
    setattr(model, BIAS_SHIFT_KEY, [float(v) for v in st["bias_shift"]] if st.get("shift_applied") else None)
    model.eval()
    try:
        model.to(memory_format=torch.contiguous_format)
    except Exception:  # pragma: no cover - a model on an odd device: leave its layout
        pass


def _complete_metadata(result: TrainResult, config: TrainConfig, st: dict[str, Any]) -> None:
    prior = dict(st.get("prior_meta") or {})
    data: TrainingData | None = st.get("data")
    meta = result.metadata
    meta.clear()
    meta.update({k: v for k, v in prior.items() if k not in ("model", "format", "format_version", "saved")})
    meta["normalization"] = dict(prior.get("normalization") or NORMALIZATION)
    meta["mode"] = config.mode
    if data is not None and data.object_area is not None:
        meta["object_area"] = data.object_area
    elif config.mode != "instances":
        meta.pop("object_area", None)
    if data is not None:
        meta["scale"] = data.scale  # prediction resizes images by it (1.0: as they are)
    meta.pop(BIAS_SHIFT_KEY, None)
    if st.get("shift_applied"):
        meta[BIAS_SHIFT_KEY] = [float(v) for v in st["bias_shift"]]
    if data is not None:
        # The earlier names only while they still describe the classes: same count, same mode
        # (an instance model fine-tuned on three semantic classes keeps its 3 outputs, not its names).
        names = prior.get("class_names") if prior.get("mode", config.mode) == config.mode else None
        meta["class_names"] = names if isinstance(names, list) and len(names) == data.n_classes else data.class_names
    previous = prior.get("training") or None
    if isinstance(previous, dict):
        previous = {k: v for k, v in previous.items() if k != "previous"}
    elapsed = round(time.perf_counter() - st["t_start"], 2) if "t_start" in st else None
    meta["training"] = {
        "date": _now(),
        "status": st.get("status"),
        "iterations": int(st.get("iteration", 0)),
        "elapsed": elapsed,
        "data_shapes": [list(s) for s in (data.shapes if data else [])],
        "n_objects": data.n_objects if data else None,
        "n_val_objects": data.n_val_objects if data else None,
        "best_val_iou": st.get("best_iou"),
        "best_iteration": st.get("best_iteration"),
        "patch": list(st["patch"]) if st.get("patch") else None,
        "device": st.get("device"),
        "processes": int(st.get("world_size", 1)),
        "precision": st.get("precision"),
        "memory_format": ("channels_last" if st["memory_format"] == torch.channels_last else "contiguous")
        if st.get("memory_format") is not None else None,
        "config": config.to_dict(),
        "init_from": st.get("init_from"),
        "messages": list(st.get("messages", [])),
        "painted_check": st.get("painted_check"),
        "previous": previous,
    }

