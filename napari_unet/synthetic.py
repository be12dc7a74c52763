"""Synthetic fluorescence nuclei with known ground truth, for sample data, tests and benchmarks.

Touching nuclei of varied size, shape and brightness, with texture, blur, background and
shot noise, plus "painted" sparse labels in the plugin's convention (0 unlabelled,
1 background, 2.. cells). No Qt, no torch.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import draw, segmentation

__all__ = ["make_nuclei", "paint_sparse_labels"]


def make_nuclei(shape: tuple[int, int] = (256, 256), n_cells: int | None = None, radius: tuple[float, float] = (7, 14),
                touching: float = 0.35, seed: int | None = 0, dtype=np.uint16) -> tuple[np.ndarray, np.ndarray]:
    """A nuclei image and its instance ground truth.

    Parameters
    ----------
    shape : (int, int)
        Image size.
    n_cells : int, optional
        Number of nuclei; by default about one per ``(4 * mean radius) ** 2`` pixels.
    radius : (float, float)
        Range of the ellipses' semi-axes in pixels.
    touching : float
        Fraction of nuclei placed right next to an earlier one (so they touch).
    seed : int, optional
        Random seed.

    Returns
    -------
    image : numpy.ndarray
        ``dtype`` image (uint16 by default), blurred, with background and noise.
    instances : numpy.ndarray
        int32 ground truth, 0 background and 1..N nuclei (touching nuclei split by a
        watershed between their centres).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    r_mean = float(np.mean(radius))
    if n_cells is None:
        n_cells = max(1, int(h * w / (4.2 * r_mean) ** 2))
    centres: list[tuple[float, float]] = []
    markers = np.zeros(shape, np.int32)
    mask = np.zeros(shape, bool)
    axes = []
    for _ in range(n_cells * 20):
        if len(centres) == n_cells:
            break
        a, b = rng.uniform(*radius, size=2)
        if centres and rng.random() < touching:
            cy, cx = centres[rng.integers(len(centres))]
            ang = rng.uniform(0, 2 * np.pi)
            d = (a + b) * 0.5 + rng.uniform(0.6, 1.0) * r_mean
            y, x = cy + d * np.sin(ang), cx + d * np.cos(ang)
        else:
            y, x = rng.uniform(0, h), rng.uniform(0, w)
        if not (0 <= y < h and 0 <= x < w):
            continue
        if any((y - cy) ** 2 + (x - cx) ** 2 < (0.9 * r_mean) ** 2 for cy, cx in centres):
            continue
        centres.append((y, x))
        axes.append((a, b, rng.uniform(-np.pi, np.pi)))
    for i, ((y, x), (a, b, rot)) in enumerate(zip(centres, axes), start=1):
        rr, cc = draw.ellipse(y, x, a, b, shape=shape, rotation=rot)
        mask[rr, cc] = True
        markers[int(y), int(x)] = i
    # Split overlapping ellipses between their centres, as touching nuclei look.
    dist = ndi.distance_transform_edt(mask)
    instances = segmentation.watershed(-dist, markers, mask=mask).astype(np.int32)
    instances = _drop_fragments(instances)

    brightness = rng.uniform(0.35, 1.0, size=instances.max() + 1)
    brightness[0] = 0.0
    img = brightness[instances]
    texture = ndi.gaussian_filter(rng.normal(0, 1, shape), 2.0)
    img = img * (1 + 0.25 * texture / (texture.std() + 1e-9)) * (instances > 0)
    # Darker rims make touching nuclei visible, as in real DNA stains.
    edt = ndi.distance_transform_edt(instances > 0)
    img *= np.clip(0.55 + edt / 4.0, 0, 1)
    img = ndi.gaussian_filter(img, 1.3)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    background = 0.08 + 0.06 * np.sin(2.5 * yy + 1.0) * np.cos(1.7 * xx)
    img = img + background
    photons = 400.0
    img = rng.poisson(np.clip(img, 0, None) * photons) / photons + rng.normal(0, 0.01, shape)
    scale = 255 if np.dtype(dtype) == np.uint8 else 4000
    if np.issubdtype(np.dtype(dtype), np.integer):
        img = np.clip(img * scale + 100 * (np.dtype(dtype) != np.uint8), 0, np.iinfo(dtype).max)
    return img.astype(dtype), instances


def _drop_fragments(instances: np.ndarray, min_size: int = 20) -> np.ndarray:
    """Remove tiny pieces (ellipses clipped by the border) and renumber 1..N."""
    sizes = np.bincount(instances.ravel())
    keep = sizes >= min_size
    keep[0] = False
    out = np.where(keep[instances], instances, 0)
    out, _, _ = segmentation.relabel_sequential(out)
    return out.astype(np.int32)


def paint_sparse_labels(instances: np.ndarray, n_cells: int = 5, ring: int = 4, background_strokes: int = 6,
                        seed: int | None = 0, exclude_border: int = 8) -> np.ndarray:
    """What a user paints: ``n_cells`` whole nuclei (labels 2, 3, ...) and background strokes.

    Background (1) is a ring of ``ring`` pixels around each painted nucleus (touching
    neighbours excluded) plus a few short random strokes on background; the rest is 0.
    """
    rng = np.random.default_rng(seed)
    ids = np.unique(instances)
    ids = ids[ids > 0]
    if exclude_border:
        border = np.unique(np.concatenate([instances[:exclude_border].ravel(), instances[-exclude_border:].ravel(),
                                           instances[:, :exclude_border].ravel(),
                                           instances[:, -exclude_border:].ravel()]))
        inner = np.setdiff1d(ids, border)
        ids = inner if len(inner) >= n_cells else ids
    chosen = rng.choice(ids, size=min(n_cells, len(ids)), replace=False)
    labels = np.zeros(instances.shape, np.uint16)
    painted = np.isin(instances, chosen)
    grown = ndi.binary_dilation(painted, iterations=ring)
    labels[grown & (instances == 0)] = 1
    bg = np.flatnonzero(instances.ravel() == 0)
    h, w = instances.shape
    for _ in range(background_strokes if len(bg) else 0):
        y, x = np.unravel_index(rng.choice(bg), instances.shape)
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(15, 40)
        y2, x2 = int(np.clip(y + length * np.sin(ang), 0, h - 1)), int(np.clip(x + length * np.cos(ang), 0, w - 1))
        rr, cc = draw.line(int(y), int(x), y2, x2)
        stroke = np.zeros(instances.shape, bool)
        stroke[rr, cc] = True
        stroke = ndi.binary_dilation(stroke, iterations=1) & (instances == 0)
        labels[stroke] = 1
    for k, cid in enumerate(chosen, start=2):
        labels[instances == cid] = k
    return labels
