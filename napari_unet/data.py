"""Images and painted labels -> training data: normalisation, targets, patches, augmentation.

No Qt, no napari. Normalisation is shared with inference: the model file stores the
parameters used in training (``metadata["normalization"]``) and prediction reuses them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["normalize", "normalize_like", "LUMINANCE", "to_grey", "reflect_indices", "find_channel_axis",
           "IGNORE", "TrainingDataError", "as_list", "check_labels", "split_channels",
           "apply_roi", "instance_targets", "semantic_targets", "class_balance", "border_weight_map",
           "SCALE_LIMITS", "SCALE_TOLERANCE", "painted_area", "rescale_factor", "resize_plane"]


def normalize(image: np.ndarray, low: float = 1.0, high: float = 99.8, channel_axis: int | None = None,
              eps: float = 1e-6) -> np.ndarray:
    """Percentile normalisation to float32: the ``low`` percentile -> 0, ``high`` -> 1.

    Per channel when ``channel_axis`` is given. NaN and Inf are ignored for the
    percentiles and set to 0 afterwards; a constant image maps to zeros.
    (:func:`normalization_params` and :func:`apply_normalization`, the same in two steps:
    prediction applies the second tile by tile instead of copying a huge image.)
    """
    return apply_normalization(image, normalization_params(image, low, high, channel_axis, eps), channel_axis)


def normalization_params(image: np.ndarray, low: float = 1.0, high: float = 99.8, channel_axis: int | None = None,
                         eps: float = 1e-6) -> list[tuple[float, float]]:
    """``[(low value, span), ...]``, one per channel (one when ``channel_axis`` is None), from the
    finite values' ``low`` and ``high`` percentiles: what :func:`apply_normalization` applies."""
    x = np.asarray(image)
    planes = [x] if channel_axis is None else [np.take(x, c, axis=channel_axis) for c in range(x.shape[channel_axis])]
    params = []
    for p in planes:
        p = np.asarray(p, dtype=np.float32)  # percentiles of the float32 values, as the pixels are computed
        finite = np.isfinite(p)
        vals = p if finite.all() else p[finite]
        del finite
        if vals.size == 0:
            params.append((0.0, 1.0))  # nothing finite: all zeros
            continue
        lo, hi = np.percentile(vals, [low, high])
        params.append((float(lo), max(float(hi - lo), eps)))
    return params


def apply_normalization(image: np.ndarray, params: list[tuple[float, float]], channel_axis: int | None = None
                        ) -> np.ndarray:
    """``(image - low) / span`` per channel as a new float32 array (computed in float64, so that a
    tile gives exactly the pixels of the whole image), non-finite values 0."""
    x = np.asarray(image, dtype=np.float32)
    n = 1 if channel_axis is None else x.shape[channel_axis]
    if len(params) != n:
        raise ValueError(f"{len(params)} normalisation parameter pairs for {n} channel(s)")
    if channel_axis is None:
        out = ((x - np.float64(params[0][0])) / params[0][1]).astype(np.float32)
    else:
        ax = channel_axis % x.ndim
        out = np.empty(x.shape, np.float32)
        for c, (low, span) in enumerate(params):
            idx = (slice(None),) * ax + (c,)
            out[idx] = (x[idx] - np.float64(low)) / span
    if not np.isfinite(out).all():
        out[~np.isfinite(out)] = 0.0
    return out


def normalize_like(image: np.ndarray, params: dict[str, Any] | None, channel_axis: int | None = None) -> np.ndarray:
    """Normalise ``image`` as described by a model file's ``metadata["normalization"]``."""
    return apply_normalization(image, normalization_params_like(image, params, channel_axis), channel_axis)


def normalization_params_like(image: np.ndarray, params: dict[str, Any] | None,
                              channel_axis: int | None = None) -> list[tuple[float, float]]:
    """:func:`normalization_params` as a model file's ``metadata["normalization"]`` describes them."""
    params = params or {}
    method = params.get("method", "percentile")
    if method != "percentile":
        raise ValueError(f"unknown normalisation method {method!r} in the model file")
    return normalization_params(image, float(params.get("low", 1.0)), float(params.get("high", 99.8)), channel_axis)


#: RGB -> grey weights (``skimage.color.rgb2gray``'s), for a one-channel model given an RGB(A) image.
LUMINANCE = np.array([0.2125, 0.7154, 0.0721], np.float32)


def to_grey(image: np.ndarray) -> np.ndarray:
    """``(..., C)`` RGB(A), channels last -> ``(..., 1)`` float32 luminance (alpha dropped).

    Training and prediction convert alike, so a one-channel model (the packaged one) can be
    fine-tuned on and applied to colour images (H&E, brightfield).
    """
    return (np.asarray(image[..., :3], dtype=np.float32) @ LUMINANCE)[..., None]


# ---- painted labels -> training data ---------------------------------------------------------

#: Target value of pixels the loss ignores (unlabelled, or held out for validation).
IGNORE = 255

# ---- object size: images resized so that cells have the size the model knows ------------------

#: The smallest and largest factor an image is resized by to match the model's cell size.
SCALE_LIMITS = (0.25, 4.0)
#: Factors within this ratio of 1 are not applied (resampling costs time and sharpness for
#: a size difference the network handles anyway).
SCALE_TOLERANCE = 1.25


def painted_area(labels: list[np.ndarray]) -> float | None:
    """Median area (px) of the painted objects (values >= 2, each value one object per plane)."""
    areas = []
    for lab in labels:
        counts = np.bincount(np.asarray(lab).ravel())[2:]
        areas.append(counts[counts > 0])
    areas = np.concatenate(areas) if areas else np.zeros(0)
    return float(np.median(areas)) if len(areas) else None


def rescale_factor(area: float | None, target_area: float | None, min_side: int | None = None) -> float:
    """The factor by which to resize an image whose cells have median ``area`` so that they get
    ``target_area`` (cellpose's diameter idea, measured on the painted cells).

    1.0 when either is unknown or the factor is within :data:`SCALE_TOLERANCE` of 1; clipped to
    :data:`SCALE_LIMITS`, and never so small that a side of ``min_side`` px drops below
    :data:`MIN_IMAGE_SIZE`.
    """
    if not area or not target_area or area <= 0 or target_area <= 0:
        return 1.0
    s = float(np.sqrt(target_area / area))
    if 1 / SCALE_TOLERANCE <= s <= SCALE_TOLERANCE:
        return 1.0
    s = float(np.clip(s, *SCALE_LIMITS))
    if min_side:
        s = max(s, MIN_IMAGE_SIZE / min_side)
    return round(s, 4)


def scaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """``(Y, X)`` resized by ``factor`` (at least 1 px a side)."""
    return tuple(max(1, int(round(n * factor))) for n in shape)  # type: ignore[return-value]


def resize_plane(plane: np.ndarray, shape: tuple[int, int], labels: bool = False, channel_axis: int | None = None
                 ) -> np.ndarray:
    """A 2D plane (channels on ``channel_axis``) resized to ``shape`` (its ``(Y, X)``).

    Images: linear interpolation, smoothed first when shrinking (scikit-image's
    anti-aliasing), float32 kept. Labels: nearest value (ids are not blended).
    """
    from skimage.transform import resize

    plane = np.asarray(plane)
    if tuple(plane.shape[-2:] if channel_axis == 0 else plane.shape[:2]) == tuple(shape):
        return plane
    if channel_axis is None:
        out_shape = tuple(shape)
    elif channel_axis in (-1, plane.ndim - 1):
        out_shape = (*shape, plane.shape[-1])
    else:
        out_shape = (plane.shape[0], *shape)
    if labels:
        return resize(plane, out_shape, order=0, mode="edge", anti_aliasing=False, preserve_range=True
                      ).astype(plane.dtype)
    shrink = np.prod(out_shape) < np.prod(plane.shape)
    return resize(plane.astype(np.float32, copy=False), out_shape, order=1, mode="reflect",
                  anti_aliasing=bool(shrink), preserve_range=True).astype(np.float32)

#: Smallest image side (in pixels) training accepts.
MIN_IMAGE_SIZE = 16


class TrainingDataError(ValueError):
    """Images or painted labels that cannot be trained on; the one-line message says why."""


def as_list(x: Any, name: str) -> list:
    """One array, or a list/tuple of arrays, as a list (``None`` stays an empty list)."""
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def check_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """Painted labels as a non-negative integer array, or :class:`TrainingDataError`.

    Float arrays are accepted when every value is a whole number (ImageJ writes labels as
    float32 sometimes); anything else that is not integer is refused.
    """
    lab = np.asarray(labels)
    if lab.dtype == bool:
        raise TrainingDataError(f"{name} are boolean; paint 1 for background and 2, 3, ... for objects")
    if np.issubdtype(lab.dtype, np.floating):
        if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise TrainingDataError(f"{name} are not integers (dtype {lab.dtype} with fractional values)")
        lab = lab.astype(np.int64)
    elif not np.issubdtype(lab.dtype, np.integer):
        raise TrainingDataError(f"{name} are not integers (dtype {lab.dtype})")
    if lab.size and lab.min() < 0:
        raise TrainingDataError(f"{name} have negative values; use 0 unlabelled, 1 background, 2.. objects")
    return lab


def find_channel_axis(shape: tuple[int, ...], n_channels: int | None = None, *,
                      labels_shape: tuple[int, ...] | None = None, rgb: bool | None = None,
                      axes: str | None = None, channel_axis: int | None = None) -> int | None:
    """The channel axis of an image of ``shape`` (``0..ndim-1``), or ``None`` when it has none.

    The one rule of the package (training, prediction, the widgets and the command line all
    ask it, each giving what it knows), evidence in this order:

    1. ``channel_axis``: the user said so (only checked to be in range).
    2. ``rgb=True`` (a napari RGB(A) layer): the last axis. ``rgb=False`` (any other napari
       layer): napari shows the last two axes as ``(Y, X)``, so they are never channels.
    3. ``axes`` (a file's axis letters, e.g. ``"CYX"``): the axis named ``S`` (samples) or ``C``;
       letters for every axis without either leave no axis for a ``k > 1``-channel model.
    4. ``labels_shape`` (training): none when the image has the labels' shape, else the axis
       the labels do not have, the last axis first.
    5. ``n_channels`` (the model's): for one channel, a last axis of 3 or 4 entries on an
       image of 3+ dimensions is RGB(A) (converted to grey), other axes are planes; for
       ``k > 1``, an axis of ``k`` entries, the last axis first, then from the first on.

    Raises
    ------
    ValueError
        One line naming the shape, when ``channel_axis`` is out of range, or nothing fits the
        labels' shape or the model's ``k > 1`` channels.
    """
    shape = tuple(int(n) for n in shape)
    nd = len(shape)
    if channel_axis is not None:
        if not -nd <= channel_axis < nd:
            raise ValueError(f"channel_axis {channel_axis} is out of range for an image of shape {shape}")
        return channel_axis % nd
    if rgb:
        return nd - 1
    allowed = range(nd - 2) if rgb is False else range(nd)
    order = [a for a in [nd - 1, *range(nd - 1)] if a in allowed]  # the last axis first
    if axes and len(axes) == nd:
        for letter in "SC":
            if letter in axes:
                return axes.index(letter)
        if n_channels is not None and n_channels > 1:  # the file says which axes it has: none is channels
            raise ValueError(f"the model takes {n_channels} channels but the image's axes {axes} (shape {shape}) "
                             f"have no channel axis (C); give the channel axis")
    if labels_shape is not None:
        labels_shape = tuple(int(n) for n in labels_shape)
        if shape == labels_shape:
            return None
        fits = [a for a in order if shape[:a] + shape[a + 1:] == labels_shape]
        if not fits:
            raise ValueError(f"image shape {shape} and labels shape {labels_shape} differ")
        return fits[0]
    if n_channels is None or n_channels <= 1:
        return nd - 1 if n_channels == 1 and nd >= 3 and nd - 1 in order and shape[-1] in (3, 4) else None
    fits = [a for a in order if shape[a] == n_channels] if nd >= 3 else []
    if not fits:
        raise ValueError(f"the model takes {n_channels} channels but no axis of the image (shape {shape}) has "
                         f"{n_channels} entries; give the channel axis")
    return fits[0]


def split_channels(image: Any, labels_shape: tuple[int, ...], channel_axis: int | None = None,
                   name: str = "image") -> np.ndarray:
    """The image with its channels as the last axis (``(..., Y, X, C)``), matched to the labels' shape.

    The channel axis is :func:`find_channel_axis`'s (``channel_axis``, else the axis the
    labels do not have, the last axis first, e.g. RGB).
    """
    img = np.asarray(image)
    if img.dtype == bool:
        img = img.astype(np.float32)
    if img.dtype.kind not in "iuf":  # complex counts as a number to numpy, but has no intensity to learn
        raise TrainingDataError(f"{name} is not made of real numbers (dtype {img.dtype})")
    try:
        ax = find_channel_axis(img.shape, labels_shape=labels_shape, channel_axis=channel_axis)
    except ValueError:  # the only two ways it fails here
        if channel_axis is not None:
            raise TrainingDataError(f"channel_axis {channel_axis} is out of range for {name} of shape "
                                    f"{img.shape}") from None
        raise TrainingDataError(f"{name} shape {img.shape} and labels shape {tuple(labels_shape)} differ") from None
    if ax is None:
        return img[..., None]
    img = np.moveaxis(img, ax, -1)
    if img.shape[:-1] != tuple(labels_shape):
        raise TrainingDataError(f"{name} shape {img.shape[:-1]} (without channels) and labels shape "
                                f"{tuple(labels_shape)} differ")
    return img


def apply_roi(labels: np.ndarray, roi: Any) -> np.ndarray:
    """Inside the region of interest, unlabelled pixels (0) become background (1)."""
    if roi is None:
        return labels
    mask = np.asarray(roi)
    if mask.shape != labels.shape:
        raise TrainingDataError(f"roi shape {mask.shape} and labels shape {labels.shape} differ")
    out = labels.copy()
    out[(mask != 0) & (labels == 0)] = 1
    return out


def instance_targets(labels: np.ndarray, boundary_width: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Painted instance labels (2D) -> targets: 0 background, 1 interior, 2 boundary, :data:`IGNORE`.

    The boundary is the band of each cell's own pixels within ``boundary_width`` px of
    anything that is not that cell (background, unlabelled pixels or another cell), so
    touching cells are separated by two boundary bands and their interiors never touch.
    A cell too small to keep an interior inside the band gets a 1 px ring instead.

    Returns
    -------
    target : numpy.ndarray
        uint8 class per pixel.
    cells : numpy.ndarray
        int32 instances, 0 outside cells and 1..N (renumbered) inside.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries, relabel_sequential

    if boundary_width < 1:
        raise ValueError(f"boundary_width must be at least 1 px, got {boundary_width}")
    cells = np.where(labels >= 2, labels, 0)
    cells = relabel_sequential(cells.astype(np.int64, copy=False))[0].astype(np.int32)
    target = np.full(labels.shape, IGNORE, np.uint8)
    target[labels == 1] = 0
    target[cells > 0] = 1
    edge = find_boundaries(cells, mode="inner") & (cells > 0)  # each cell's outermost pixels
    if boundary_width > 1:
        # Pixels of a cell closer than boundary_width to its outermost ring. A ring pixel of a
        # neighbouring cell is never nearer than the cell's own ring next to it, so one
        # distance transform serves all cells.
        ring = edge
        edge = (cells > 0) & (ndi.distance_transform_edt(~ring) < boundary_width)
        # Cells too small for the band would have no interior, so no seed at prediction:
        # they keep the 1 px ring.
        n = int(cells.max())
        inner = np.bincount(cells[(cells > 0) & ~edge], minlength=n + 1)
        small = inner == 0
        small[0] = False
        if small.any():
            in_small = small[cells]
            edge[in_small] = ring[in_small]
    target[edge] = 2
    return target, cells


def semantic_targets(labels: np.ndarray) -> np.ndarray:
    """Painted semantic labels -> class per pixel (painted k -> k - 1), :data:`IGNORE` where unpainted."""
    if labels.size and labels.max() > IGNORE:
        raise TrainingDataError(f"semantic labels go up to {labels.max()}; at most {IGNORE} classes are supported")
    target = labels.astype(np.int16) - 1
    target[labels == 0] = IGNORE
    return target.astype(np.uint8)


def class_balance(targets: list[np.ndarray], n_classes: int, power: float = 1.0) -> np.ndarray:
    """Class weights ``w_c`` proportional to ``f_c ** -power`` over the labelled pixels (mean weight 1).

    ``f_c`` is class c's share of the labelled pixels; ``power=1`` gives ``1 / (K f_c)``
    with ``K`` the number of classes present, ``power=0.5`` a softer balance. Absent
    classes get weight 1.
    """
    counts = np.zeros(n_classes, np.float64)
    for t in targets:
        counts += np.bincount(t[t != IGNORE].ravel(), minlength=n_classes)[:n_classes]
    total = counts.sum()
    present = counts > 0
    w = np.ones(n_classes, np.float64)
    if total > 0:
        f = counts[present] / total
        raw = f ** -float(power)
        w[present] = raw / (f * raw).sum()  # labelled pixels' mean weight is 1
    return w.astype(np.float32)


def border_weight_map(cells: np.ndarray, target: np.ndarray, class_weights: np.ndarray, w0: float = 10.0,
                      sigma: float = 5.0, skip_class: int | None = 1) -> np.ndarray:
    """The U-Net paper's weight map ``w = w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))``.

    Parameters
    ----------
    cells : numpy.ndarray
        int instances (0 = no cell), 2D.
    target : numpy.ndarray
        Class per pixel (:data:`IGNORE` for unlabelled pixels, which get weight 0).
    class_weights : numpy.ndarray
        ``w_c`` per class (see :func:`class_balance`).
    w0, sigma : float
        The paper's 10 and 5 px.
    skip_class : int or None
        A class that gets no border term: by default 1, the cell interior, so the term
        weights what separates cells (the background gaps and, with our explicit boundary
        class, the boundary pixels where cells touch), which is what the paper wants it for
        ("to learn the small separation borders between touching cells"). Applied to
        interior pixels as well (where ``d1 = 0``), it weighted every cell pixel near a
        neighbour about tenfold and the network predicted thick boundaries that split
        cells (docs/design.md). ``None`` applies it everywhere, as the formula reads.

    Notes
    -----
    ``d1`` and ``d2`` are the Euclidean distances to the nearest and second-nearest cell
    (scipy's distance transform; a pixel next to a cell is at distance 1, a pixel inside
    a cell at 0). Each cell's distance transform is computed in a window around it of
    ``4 sigma`` px beyond its bounding box: farther away the exponential term is below
    ``1e-6 w0`` and is dropped.
    """
    from scipy import ndimage as ndi

    w = np.zeros(target.shape, np.float32)
    labelled = target != IGNORE
    w[labelled] = class_weights[target[labelled]]
    if w0 <= 0 or cells.max() == 0:
        return w
    reach = int(np.ceil(4 * sigma)) + 1
    d1 = np.full(cells.shape, np.inf, np.float32)
    d2 = np.full(cells.shape, np.inf, np.float32)
    for i, sl in enumerate(ndi.find_objects(cells), start=1):
        if sl is None:
            continue
        win = tuple(slice(max(s.start - reach, 0), min(s.stop + reach, n)) for s, n in zip(sl, cells.shape))
        d = ndi.distance_transform_edt(cells[win] != i).astype(np.float32)
        a, b = d1[win], d2[win]
        d2[win] = np.minimum(b, np.maximum(a, d))
        d1[win] = np.minimum(a, d)
    both = np.isfinite(d2) & labelled
    if skip_class is not None:
        both &= target != skip_class
    w[both] += w0 * np.exp(-((d1[both] + d2[both]) ** 2) / (2 * sigma**2))
    return w


def reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Indices ``start..stop-1`` folded into ``[0, n)`` by mirroring without repeating the edge.

    The same values as ``np.pad(mode="reflect")`` (repeated reflection when the pad is
    longer than the array). The one mirror rule of the package: prediction reads its tiles
    through it (instead of padding a copy of a possibly huge image), training crops its
    patches and validation planes through it, and the augmentation's warp (scipy's
    ``"mirror"``) folds the same way, so training sees the borders prediction will.
    """
    i = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i < n, i, period - i)
