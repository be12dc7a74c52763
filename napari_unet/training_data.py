"""Painted labels -> training planes, patches and validation crops (numpy and scipy only, no torch).

:func:`prepare_training_data` checks images and painted labels (``0`` unlabelled, ``1``
background, ``2, 3, ...`` objects) and turns them into normalised 2D planes with targets,
loss weights and held-out validation zones; the sampler draws augmented patches from
them; :func:`val_crops` cuts the held-out zones out for validation. The training loop
(:mod:`napari_unet.training`, which imports torch) uses them; a widget can check painted
labels without loading torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .augment import AugmentConfig, augment_intensity, patch_coordinates, warp
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
    reflect_indices,
    rescale_factor,
    resize_plane,
    scaled_shape,
    semantic_targets,
    split_channels,
    to_grey,
)

__all__ = ["prepare_training_data", "side_planes", "TrainingData", "Sampler", "val_crops", "crop_mirrored",
           "INSTANCE_CLASS_NAMES", "NORMALIZATION"]

INSTANCE_CLASS_NAMES = ["background", "cell", "boundary"]
#: How training normalises images (recorded in model files; prediction does the same).
NORMALIZATION = {"method": "percentile", "low": 1.0, "high": 99.8}
#: Fractions of patches centred on a painted object pixel and on any painted pixel (the rest anywhere):
#: painted background usually outnumbers the few painted cells many times over.
OBJECT_CENTRE_FRACTION = 0.5
LABELLED_CENTRE_FRACTION = 0.4


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
                          model_channels: int | None = None, target_area: float | None = None,
                          side_views: tuple[float, float, float] | None = None) -> TrainingData:
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
    side_views : (float, float, float), optional
        The voxel size (Z, Y, X) of volumes: stacks are then volumes (Z = the axis before
        Y, X), and besides the painted YX planes, the ZX and ZY planes of each volume
        resampled to cubic voxels train too, where they cross cells painted on at least two
        planes (:func:`side_planes`): a cell painted over several planes teaches the network
        what cells look like from the side, as the ``"orthogonal"`` volume prediction sees
        them.

    This is cheap enough to call on the GUI thread to check the input before training.
    """
    imgs, labs, rois = _inputs(images, labels, roi)
    messages: list[str] = []
    suffix = (lambda i: f" {i + 1}") if len(imgs) > 1 else (lambda i: "")
    raw, shapes, in_channels, constant = _labelled_planes(imgs, labs, rois, channel_axis, model_channels,
                                                          side_views, suffix, messages)
    n_cls, class_names = _classes(raw, mode, n_classes)
    raw, scale = _rescaled(raw, mode, target_area, messages)
    if constant:  # told after the labels' problems: those are what a user painting is working on
        i, value = constant[0]
        raise TrainingDataError(f"image{suffix(i)} has the same value ({value:g}) everywhere: nothing to learn from; "
                                "check that the right image is chosen")
    held = _held_out(raw, mode, val_fraction, min_val_objects, np.random.default_rng(seed), messages)
    planes, cells_list, cells_all = _target_planes(raw, mode, held, boundary_width, val_margin)
    cw = class_balance([p.target for p in planes], n_cls, class_balance_power)
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
                        class_names=class_names, n_objects=len(held.objects), n_val_objects=held.n_val,
                        shapes=shapes, class_weights=cw, messages=messages, object_area=object_area, scale=scale)


# ---- the steps of prepare_training_data ---------------------------------------------------------

#: ``(image (Y, X, C) normalised, labels (Y, X), (image index, plane index; -1 for side views))``
_RawPlane = tuple[np.ndarray, np.ndarray, tuple[int, int]]


def _inputs(images: Any, labels: Any, roi: Any) -> tuple[list, list, list]:
    """Images, labels and roi masks as lists of one entry per image."""
    imgs = as_list(images, "images")
    labs = as_list(labels, "labels")
    rois = as_list(roi, "roi")
    if not imgs:
        raise TrainingDataError("no image given")
    if len(imgs) != len(labs):
        raise TrainingDataError(f"{len(imgs)} images but {len(labs)} label arrays; give one labels array per image")
    if rois and len(rois) != len(labs):
        raise TrainingDataError(f"{len(rois)} roi masks for {len(labs)} label arrays")
    return imgs, labs, rois


def _labelled_planes(imgs: list, labs: list, rois: list, channel_axis: int | None, model_channels: int | None,
                     side_views, suffix: Callable[[int], str], messages: list[str]
                     ) -> tuple[list[_RawPlane], list[tuple[int, ...]], int | None, list[tuple[int, float]]]:
    """Every image checked, its channels last (grey for a one-channel model), normalised, cut into
    the 2D planes that hold labels (and the side views of painted volumes); the images' shapes,
    their channel count and those with one value everywhere ``(image index, value)``."""
    raw: list[_RawPlane] = []
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
            if "the model takes one channel: the colour image is trained on as grey" not in messages:
                messages.append("the model takes one channel: the colour image is trained on as grey")
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
            constant.append((i, float(im_f[finite].flat[0])))
        del finite
        norm = normalize(im_f, NORMALIZATION["low"], NORMALIZATION["high"], channel_axis=-1)
        im_p = _planes_2d(norm, lab.ndim)
        for p in has:
            raw.append((im_p[p], lab_p[p], (i, int(p))))
        if side_views is not None and lab.ndim >= 3:
            side = side_planes(norm, lab, side_views)
            raw.extend((im_s, lab_s, (i, -1)) for im_s, lab_s in side)
            if side:
                messages.append(f"image{suffix(i)}: {len(side)} side-view planes (ZX, ZY) of the painted volume train "
                                "too")
    if not raw:
        raise TrainingDataError("the labels are empty: paint background (1) and objects (2, 3, ...)")
    return raw, shapes, in_channels, constant


def _classes(raw: list[_RawPlane], mode: str, n_classes: int | None) -> tuple[int, list[str]]:
    """The number of classes and their names, from the painted values; what must be painted."""
    values = set()
    for _, lab, _ in raw:
        values.update(np.unique(lab).tolist())
    if mode == "instances":
        if 1 not in values:
            raise TrainingDataError("no background painted: paint some background with label 1")
        if not any(v >= 2 for v in values):
            raise TrainingDataError("no object painted: paint at least one cell with label 2 or more")
        return 3, list(INSTANCE_CLASS_NAMES)
    if mode == "semantic":
        painted = sorted(v for v in values if v >= 1)
        if len(painted) < 2:
            raise TrainingDataError("semantic training needs at least two classes painted (1 = background, 2, 3, ...)")
        n_cls = max(int(max(painted)), int(n_classes or 0))
        return n_cls, ["background"] + [f"class {k}" for k in range(1, n_cls)]
    raise TrainingDataError(f"mode must be 'instances' or 'semantic', got {mode!r}")


def _rescaled(raw: list[_RawPlane], mode: str, target_area: float | None, messages: list[str]
              ) -> tuple[list[_RawPlane], float]:
    """Instance mode with ``target_area``: the planes resized so that the painted cells' median
    area matches it; the factor (1.0: left as they are)."""
    if mode != "instances" or not target_area:
        return raw, 1.0
    lab_planes = [lab for _, lab, src in raw if src[1] >= 0]  # side views show cells cut off: not their size
    area = painted_area(lab_planes)
    scale = rescale_factor(area, target_area, min_side=min(min(lab.shape) for lab in lab_planes))
    if scale == 1.0:
        return raw, scale
    messages.append(f"the painted cells ({area:.0f} px) are {'smaller' if scale > 1 else 'larger'} than "
                    f"those the model knows ({target_area:.0f} px): images are resized by {scale:.2f} "
                    "for training and prediction")
    return [(resize_plane(im, scaled_shape(lab.shape, scale), channel_axis=-1),
             resize_plane(lab, scaled_shape(lab.shape, scale), labels=True), src) for im, lab, src in raw], scale


@dataclass
class _HeldOut:
    """The painted objects and those held out for validation."""

    objects: list[tuple[int, int]]  # (raw plane, instance value or semantic component id)
    components: list[np.ndarray | None]  # semantic mode: each plane's painted components
    held: set[tuple[int, int]]  # the held-out objects
    by_image: dict[int, set[int]]  # instance ids held out, by image: kept out of its side views too
    n_val: int


def _held_out(raw: list[_RawPlane], mode: str, val_fraction: float, min_val_objects: int,
              rng: np.random.Generator, messages: list[str]) -> _HeldOut:
    """Whole painted objects held out for validation (from ``min_val_objects`` objects on)."""
    objects = []
    comps = []
    for r, (_, lab, src) in enumerate(raw):
        if src[1] < 0:  # side views: their cells are the YX planes' ones (held out with them)
            comps.append(None)
        elif mode == "instances":
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
    held = {objects[k] for k in rng.choice(len(objects), size=n_val, replace=False)} if n_val else set()
    by_image: dict[int, set[int]] = {}
    for rr, v in held:
        by_image.setdefault(raw[rr][2][0], set()).add(v)
    return _HeldOut(objects=objects, components=comps, held=held, by_image=by_image, n_val=n_val)


def _target_planes(raw: list[_RawPlane], mode: str, held: _HeldOut, boundary_width: int, val_margin: int
                   ) -> tuple[list[_Plane], list[np.ndarray | None], list[np.ndarray]]:
    """The training planes (targets; held-out objects and a margin moved to the validation
    target), each plane's cells (instance mode, held-out ones removed) and every painted
    plane's cells before that (for their median area)."""
    planes = []
    cells_list = []
    cells_all = []
    for r, (im, lab, src) in enumerate(raw):
        side = src[1] < 0
        if mode == "instances":
            target, cells = instance_targets(lab, boundary_width)
            if side:
                # A cell painted on a few planes ends, in a side view, at unpainted rows: that edge is
                # where the painting stops, not the cell's boundary. Not learnt either way.
                near_unpainted = ndi.distance_transform_edt(lab != 0) <= boundary_width
                target[(target == 2) & near_unpainted] = IGNORE
            else:
                cells_all.append(cells)  # before the held-out objects are removed: all painted cells count
        else:
            target, cells = semantic_targets(lab), None
        val_target = None
        here = [v for (rr, v) in held.held if rr == r]
        if side and mode == "instances":
            hidden = np.isin(lab, sorted(held.by_image.get(src[0], ())))
            if hidden.any():  # a held-out cell must not train from the side
                zone = ndi.distance_transform_edt(~hidden) <= val_margin
                target = np.where(zone, IGNORE, target).astype(np.uint8)
                cells = np.where(zone, 0, cells)
        elif here:
            obj = np.isin(lab, here) if mode == "instances" else np.isin(held.components[r], here)
            zone = ndi.distance_transform_edt(~obj) <= val_margin
            val_target = np.where(zone, target, IGNORE).astype(np.uint8)
            target = np.where(zone, IGNORE, target).astype(np.uint8)
            if cells is not None:
                cells = np.where(zone, 0, cells)
        cells_list.append(cells)
        planes.append(_Plane(image=np.ascontiguousarray(np.moveaxis(im, -1, 0)), target=target, weight=None,
                             val_target=val_target, source=src, painted=lab if mode == "instances" else None))
    return planes, cells_list, cells_all


def side_planes(image: np.ndarray, labels: np.ndarray, voxel_size: tuple[float, float, float],
                max_planes: int = 128) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ZX and ZY planes of painted volumes, at cubic voxels: ``[(image (Z', W, C), labels (Z', W)), ...]``.

    ``image`` is ``(..., Z, Y, X, C)`` (normalised), ``labels`` ``(..., Z, Y, X)``; leading
    axes hold independent volumes. A side plane is kept where it crosses cells (labels >= 2)
    painted on at least two of the volume's planes; at most ``max_planes`` per volume and
    direction, evenly spread. Along Z the image is resampled by the Z step over the Y/X
    pixel size (linear, scipy), the labels take the nearest plane; unpainted planes stay 0
    (ignored, as everywhere). Volumes whose resampled depth is under
    :data:`~napari_unet.data.MIN_IMAGE_SIZE` give none.
    """
    vz, vy, vx = (float(v) for v in voxel_size)
    anisotropy = vz / (0.5 * (vy + vx))
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for vidx in np.ndindex(*labels.shape[:-3]):
        lab = labels[vidx]
        n_z = lab.shape[0]
        n_iso = max(1, int(round(n_z * anisotropy)))
        if n_iso < MIN_IMAGE_SIZE:
            continue
        cells = lab >= 2
        src = np.minimum(((np.arange(n_iso) + 0.5) * n_z / n_iso).astype(int), n_z - 1)
        img = image[vidx]
        for axis in (1, 2):  # ZX planes (one per y), then ZY planes (one per x)
            across = cells.any(axis=3 - axis).sum(axis=0)  # per y (or x): painted planes holding a cell
            keep = np.flatnonzero(across >= 2)
            if len(keep) > max_planes:
                keep = keep[np.linspace(0, len(keep) - 1, max_planes).round().astype(int)]
            if not len(keep):
                continue
            sub = np.take(img, keep, axis=axis)  # only the planes kept are resampled
            if n_iso != n_z:
                sub = ndi.zoom(sub, (n_iso / n_z, 1, 1, 1), order=1, grid_mode=True, mode="nearest")
            sub = sub.astype(np.float32, copy=False)
            lab_sub = np.take(lab, keep, axis=axis)[src]
            for j in range(len(keep)):
                out.append((np.ascontiguousarray(np.take(sub, j, axis=axis)),
                            np.ascontiguousarray(np.take(lab_sub, j, axis=axis))))
    return out


# ---- patches ----------------------------------------------------------------------------------

def crop_mirrored(arr: np.ndarray, y0: int, x0: int, h: int, w: int, fill=None) -> np.ndarray:
    """Crop ``[y0:y0+h, x0:x0+w]`` of the last two axes; beyond the edges mirror (or ``fill``).

    The mirror does not repeat the edge pixel (numpy's ``"reflect"``,
    :func:`napari_unet.data.reflect_indices`), as prediction's tiles and the augmentation.
    """
    H, W = arr.shape[-2:]
    iy, ix = np.arange(y0, y0 + h), np.arange(x0, x0 + w)
    out = arr[..., reflect_indices(y0, y0 + h, H)[:, None], reflect_indices(x0, x0 + w, W)[None, :]]
    if fill is not None:
        outside = ((iy < 0) | (iy >= H))[:, None] | ((ix < 0) | (ix >= W))[None, :]
        out = np.where(outside, fill, out).astype(arr.dtype)
    return out


class Sampler:
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
                imgs.append(crop_mirrored(pl.image, y0, x0, self.size_in, self.size_in))
                tgts.append(crop_mirrored(pl.target, y0 + off, x0 + off, self.size_out, self.size_out, fill=IGNORE))
                if pl.weight is not None:
                    wts.append(crop_mirrored(pl.weight, y0 + off, x0 + off, self.size_out, self.size_out, fill=0.0))
                continue
            coords = patch_coordinates((self.size_in, self.size_in), (cy, cx), rng, self.augment)
            img = warp(pl.image, coords, order=1, mode="mirror")
            imgs.append(augment_intensity(img, rng, self.augment))
            inner = coords[:, off:off + self.size_out, off:off + self.size_out]
            tgts.append(warp(pl.target, inner, order=0, mode="constant", cval=IGNORE))
            if pl.weight is not None:
                wts.append(warp(pl.weight, inner, order=0, mode="constant", cval=0.0))
        return np.stack(imgs), np.stack(tgts), (np.stack(wts) if wts else None)


def val_crops(planes: list[_Plane], context: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
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
