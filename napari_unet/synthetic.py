"""Synthetic fluorescence nuclei and whole cells with known ground truth, for sample data, tests and benchmarks.

Touching nuclei of varied size, shape and brightness, with texture, blur, background and
shot noise (:func:`make_nuclei`); clusters of touching whole cells, each a bright nucleus
in a dim cytoplasm (:func:`make_whole_cells`); volumes of touching ellipsoidal nuclei
(:func:`make_nuclei_3d`, isotropic or with a coarser Z step); plus "painted" sparse labels in the
plugin's convention (0 unlabelled, 1 background, 2.. cells). No Qt, no torch.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import draw, segmentation

__all__ = ["make_nuclei", "make_nuclei_3d", "make_varied_nuclei", "make_whole_cells", "make_varied_cells",
           "paint_sparse_labels"]


def make_nuclei(shape: tuple[int, int] = (256, 256), n_cells: int | None = None, radius: tuple[float, float] = (7, 14),
                touching: float = 0.35, seed: int | None = 0, dtype=np.uint16, *,
                brightness: tuple[float, float] = (0.35, 1.0), blur: float = 1.3, photons: float = 400.0,
                nucleoli: float = 0.0, gain: float = 1.0, cytoplasm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
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
    dtype : numpy dtype
        Of the image; integer images are scaled to 4000 (uint16, plus an offset of 100) or
        255 (uint8) at brightness 1 and clipped to the type's range.
    brightness : (float, float)
        Range of the nuclei's mean brightness (uniform per nucleus).
    blur : float
        Standard deviation of the Gaussian blur (the microscope's point spread), pixels.
    photons : float
        Photons at brightness 1: the lower, the stronger the shot noise.
    nucleoli : float
        Mean number of small bright spots per nucleus (Poisson); 0 for none.
    gain : float
        Intensity gain before the conversion to an integer ``dtype`` (above 1, bright nuclei
        saturate); float images ignore it.
    cytoplasm : float
        0: nuclei (a DNA stain). Above 0: whole cells of a cytoplasmic stain, each a bright
        centre (its nucleus) fading to this relative brightness at its edge; the ground truth
        is the whole cell.

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

    brightness = rng.uniform(*brightness, size=instances.max() + 1)
    brightness[0] = 0.0
    img = brightness[instances]
    if cytoplasm > 0:
        img = img * _cell_profile(instances, cytoplasm)
    texture = ndi.gaussian_filter(rng.normal(0, 1, shape), 2.0)
    img = img * (1 + 0.25 * texture / (texture.std() + 1e-9)) * (instances > 0)
    # Darker rims make touching nuclei visible, as in real DNA stains.
    edt = ndi.distance_transform_edt(instances > 0)
    img *= np.clip(0.55 + edt / 4.0, 0, 1)
    if nucleoli > 0:
        img *= 1 + _spots(instances, nucleoli, rng)
    return _acquire(img, rng, blur, photons, gain, dtype), instances


def make_nuclei_3d(shape: tuple[int, int, int] = (24, 128, 128),
                   voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0), n_cells: int | None = None,
                   radius: tuple[float, float] = (7, 11), touching: float = 0.5,
                   seed: int | None = 0, dtype=np.uint16, *, brightness: tuple[float, float] = (0.4, 1.0),
                   blur: float = 1.2, photons: float = 400.0) -> tuple[np.ndarray, np.ndarray]:
    """A ``(Z, Y, X)`` volume of touching ellipsoidal nuclei and its 3D instance ground truth.

    Nuclei are ellipsoids in physical space (semi-axes drawn from ``radius``, in Y/X pixel
    units), sampled on voxels of ``voxel_size`` (Z, Y, X; e.g. ``(3, 1, 1)``: a Z step of
    three pixels, as confocal stacks usually have). A fraction ``touching`` of them is
    placed against an earlier one, in any direction, Z included: touching pairs share a
    flat interface (each voxel goes to the ellipsoid it lies deepest in). Blur is
    ``blur`` pixels in Y/X and the same physical length in Z; noise and background as
    :func:`make_nuclei`.

    Returns
    -------
    image : numpy.ndarray
        ``dtype`` volume (uint16 by default).
    instances : numpy.ndarray
        int32 ground truth: 0 background, 1..N nuclei, each one 3D object.
    """
    rng = np.random.default_rng(seed)
    vz, vy, vx = (float(v) for v in voxel_size)
    extent = np.array([shape[0] * vz, shape[1] * vy, shape[2] * vx])
    r_mean = float(np.mean(radius))
    if n_cells is None:
        n_cells = max(1, int(np.prod(extent) / (3.2 * r_mean) ** 3))
    centres: list[np.ndarray] = []
    semi: list[np.ndarray] = []
    for _ in range(n_cells * 30):
        if len(centres) == n_cells:
            break
        r = rng.uniform(*radius, size=3)
        if centres and rng.random() < touching:
            j = int(rng.integers(len(centres)))
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            # Reach of each ellipsoid along d: together, a contact (slightly pressed).
            reach = 1.0 / np.sqrt(np.sum((d / semi[j]) ** 2)) + 1.0 / np.sqrt(np.sum((d / r) ** 2))
            c = centres[j] + 0.9 * reach * d
        else:
            c = rng.uniform(0, 1, 3) * extent
        if not np.all((c >= 0) & (c < extent)):
            continue
        if any(np.linalg.norm((c - o) / np.maximum(r, s)) < 1.2 for o, s in zip(centres, semi)):
            continue
        centres.append(c)
        semi.append(r)
    # Each voxel to the ellipsoid it lies deepest in (smallest normalised radius below 1).
    depth = np.full(shape, np.inf, np.float32)
    instances = np.zeros(shape, np.int32)
    size = np.array([vz, vy, vx])
    for i, (c, r) in enumerate(zip(centres, semi), start=1):
        lo = np.maximum(np.floor((c - r) / size).astype(int), 0)
        hi = np.minimum(np.ceil((c + r) / size).astype(int) + 1, shape)
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        q = (((zz + 0.5) * vz - c[0]) / r[0]) ** 2 + (((yy + 0.5) * vy - c[1]) / r[1]) ** 2 \
            + (((xx + 0.5) * vx - c[2]) / r[2]) ** 2
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        win = (q <= 1.0) & (q < depth[box])
        depth[box][win] = q[win]
        instances[box][win] = i
    instances = _drop_fragments(instances, min_size=30)
    level = rng.uniform(*brightness, size=int(instances.max()) + 1)
    level[0] = 0.0
    img = level[instances] * (1 + 0.2 * ndi.gaussian_filter(rng.normal(0, 1, shape), 1.5))
    # Darker rims, between touching nuclei too, as in real DNA stains (distances in Y/X pixels).
    inner = (instances > 0) & ~segmentation.find_boundaries(instances, mode="inner")
    img *= np.clip(0.55 + ndi.distance_transform_edt(inner, sampling=(vz / vy, 1.0, vx / vy)) / 4.0, 0, 1)
    img = ndi.gaussian_filter(img, (blur * vy / vz, blur, blur))
    img = img + 0.08 + rng.normal(0, 0.01, shape)
    img = rng.poisson(np.clip(img, 0, None) * photons) / photons
    if np.issubdtype(np.dtype(dtype), np.integer):
        top = 255 if np.dtype(dtype) == np.uint8 else 4000
        img = np.clip(img * top + 100 * (np.dtype(dtype) != np.uint8), 0, np.iinfo(dtype).max)
    return img.astype(dtype), instances


def _acquire(img: np.ndarray, rng: np.random.Generator, blur: float, photons: float, gain: float, dtype,
             background: float = 0.08) -> np.ndarray:
    """What the camera records of a fluorophore map: blur, uneven background, shot and read noise, ``dtype``."""
    h, w = img.shape
    img = ndi.gaussian_filter(img, blur)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = img + background + 0.75 * background * np.sin(2.5 * yy + 1.0) * np.cos(1.7 * xx)
    img = rng.poisson(np.clip(img, 0, None) * photons) / photons + rng.normal(0, 0.01, img.shape)
    scale = 255 if np.dtype(dtype) == np.uint8 else 4000
    if np.issubdtype(np.dtype(dtype), np.integer):
        img = np.clip(gain * img * scale + 100 * (np.dtype(dtype) != np.uint8), 0, np.iinfo(dtype).max)
    return img.astype(dtype)


def _cell_profile(instances: np.ndarray, edge: float) -> np.ndarray:
    """Per cell, 1 at its centre falling smoothly to ``edge`` at its outline (0 outside cells)."""
    inner = (instances > 0) & ~segmentation.find_boundaries(instances, mode="inner")
    dist = ndi.distance_transform_edt(inner)
    depth = np.zeros(int(instances.max()) + 1)
    depth[1:] = ndi.maximum(dist, instances, np.arange(1, len(depth)))
    rel = np.clip(dist / np.maximum(depth[instances], 1.0), 0, 1)
    core = np.clip((rel - 0.35) / 0.3, 0, 1)  # the nucleus: the inner part of the cell
    core = core * core * (3 - 2 * core)  # smoothstep
    return np.where(instances > 0, edge + (1 - edge) * core, 0.0)


def _spots(instances: np.ndarray, per_cell: float, rng: np.random.Generator) -> np.ndarray:
    """Relative brightening of small discs (nucleoli, chromocentres) inside the nuclei."""
    inside = np.flatnonzero(instances.ravel() > 0)
    n = rng.poisson(per_cell * max(int(instances.max()), 1))
    spots = np.zeros(instances.shape, np.float64)
    if n == 0 or inside.size == 0:
        return spots
    for flat, r, amp in zip(rng.choice(inside, size=n), rng.uniform(1.5, 3.5, n), rng.uniform(0.5, 2.0, n)):
        y, x = np.unravel_index(flat, instances.shape)
        rr, cc = draw.disk((y, x), r, shape=instances.shape)
        same = instances[rr, cc] == instances[y, x]  # a spot stays inside its own nucleus
        spots[rr[same], cc[same]] = np.maximum(spots[rr[same], cc[same]], amp)
    return spots


def make_varied_nuclei(shape: tuple[int, int] = (256, 256), seed: int | None = 0,
                       whole_cells: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`make_nuclei` with its appearance drawn at random: a generalist's training image.

    Nuclei of 5 to about 40 px semi-axes (one size range per image), sparse to crowded, dim to
    saturated, sharp to blurred, clean to noisy, with or without nucleoli, in uint8 or
    uint16. With probability ``whole_cells`` the image shows whole cells instead (a bright
    nucleus in a dim cytoplasm, the cell as ground truth: ``make_nuclei(cytoplasm=...)``).
    Used (with ``whole_cells=0``) to pretrain the packaged starting model
    (``sample_data/make_sample_data.py``), so that fine-tuning on a few painted cells of a
    real image starts from a network that already knows what a nucleus and its outline look
    like at many scales.
    """
    rng = np.random.default_rng(seed)
    r_lo = float(rng.uniform(5, 22))
    radius = (r_lo, r_lo * float(rng.uniform(1.3, 1.8)))
    lo = float(rng.uniform(0.1, 0.6))
    return make_nuclei(
        shape, n_cells=None if rng.random() < 0.7 else max(1, int(shape[0] * shape[1] / (6.0 * np.mean(radius)) ** 2)),
        radius=radius, touching=float(rng.uniform(0.1, 0.7)), seed=int(rng.integers(2**31)),
        dtype=np.uint8 if rng.random() < 0.4 else np.uint16, brightness=(lo, float(rng.uniform(lo + 0.2, 1.0))),
        blur=float(rng.uniform(0.7, 2.5)), photons=float(10 ** rng.uniform(1.5, 3.3)),
        nucleoli=float(rng.choice([0.0, 1.0, 3.0])), gain=float(rng.uniform(0.6, 1.6)),
        cytoplasm=float(rng.uniform(0.1, 0.4)) if rng.random() < whole_cells else 0.0)


def make_whole_cells(shape: tuple[int, int] = (256, 256), n_cells: int | None = None,
                     nucleus_radius: tuple[float, float] = (6.0, 11.0), cell_scale: tuple[float, float] = (1.6, 2.4),
                     clustered: float = 0.7, seed: int | None = 0, dtype=np.uint16, *,
                     brightness: tuple[float, float] = (0.4, 1.0), cytoplasm: tuple[float, float] = (0.06, 0.3),
                     junction: float = 0.3, elongation: tuple[float, float] = (1.0, 2.2), blur: float = 1.2,
                     photons: float = 400.0, nucleoli: float = 2.0, dark_nucleoli: bool = True,
                     eccentric: float = 0.6, gain: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Whole cells stained in nucleus and cytoplasm, many of them touching; the ground truth is the whole cell.

    What a whole-cell fluorescence image shows (Cell Tracking Challenge Fluo-C2DL-Huh7, for
    one): each cell a bright nucleus in a dim, irregular cytoplasm, cells pressed together in
    clusters where only the nuclei and a faint line tell them apart. A network pretrained on
    these learns to split touching cytoplasm between nuclei, which nuclei images cannot
    teach it.

    Parameters
    ----------
    shape : (int, int)
        Image size.
    n_cells : int, optional
        Cells to place; by default about one per ``(2.6 * mean cell radius) ** 2`` pixels.
    nucleus_radius : (float, float)
        Range of the nuclei's semi-axes in pixels.
    cell_scale : (float, float)
        Range of a cell's radius relative to its nucleus's.
    clustered : float
        Fraction of cells placed against an earlier one (their cytoplasms touch).
    seed : int, optional
        Random seed.
    dtype : numpy dtype
        Of the image, as in :func:`make_nuclei`.
    brightness : (float, float)
        Range of the nuclei's brightness (uniform per cell).
    cytoplasm : (float, float)
        Range of the cytoplasm's brightness relative to its nucleus (per cell).
    junction : float
        How much darker the cytoplasm is along the line where two cells touch (0: no line).
    elongation : (float, float)
        Range of the cells' aspect ratio (each cell a randomly turned, wobbly ellipse).
    blur, photons, gain : float
        As in :func:`make_nuclei`.
    nucleoli : float
        Mean number of nucleoli per nucleus (Poisson).
    dark_nucleoli : bool
        Nucleoli darker than the nucleus (as in Huh7) or brighter.
    eccentric : float
        Largest offset of a nucleus from its cell's centre, as a fraction of the room
        there is (cell radius minus nucleus radius): off-centre nuclei can reach the line
        where their cell meets the next one, and are cut straight there.

    Returns
    -------
    image : numpy.ndarray
        ``dtype`` image.
    instances : numpy.ndarray
        int32 ground truth, 0 background and 1..N whole cells. Touching cells meet where
        their (shape-normalised) distances from their centres are equal, so each cell keeps
        its own nucleus.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    r_cell = float(np.mean(nucleus_radius)) * float(np.mean(cell_scale))
    if n_cells is None:
        n_cells = max(1, int(h * w / (2.6 * r_cell) ** 2))
    cells: list[tuple] = []  # (y, x, nucleus radius, cell radius, elongation, angle, outline harmonics)
    for _ in range(n_cells * 30):
        if len(cells) == n_cells:
            break
        rn = rng.uniform(*nucleus_radius)
        radius = rn * rng.uniform(*cell_scale)
        if cells and rng.random() < clustered:
            other = cells[rng.integers(len(cells))]
            ang = rng.uniform(0, 2 * np.pi)
            d = (radius + other[3]) * rng.uniform(0.5, 0.8)  # closer than the two radii: the cytoplasms touch
            y, x = other[0] + d * np.sin(ang), other[1] + d * np.cos(ang)
        else:
            y, x = rng.uniform(0, h), rng.uniform(0, w)
        if not (-0.3 * radius <= y < h + 0.3 * radius and -0.3 * radius <= x < w + 0.3 * radius):
            continue
        if any((y - c[0]) ** 2 + (x - c[1]) ** 2 < (1.25 * (rn + c[2])) ** 2 for c in cells):
            continue  # nuclei never overlap
        harmonics = [(k, rng.uniform(0.0, 0.12), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5)]
        cells.append((y, x, rn, radius, rng.uniform(*elongation), rng.uniform(0, np.pi), harmonics))
    # Territories: each pixel goes to the cell it is relatively nearest to, within that cell's outline.
    nearest = np.full(shape, np.inf, np.float32)
    owner = np.zeros(shape, np.int32)
    for i, (y, x, _, radius, e, th, harmonics) in enumerate(cells, start=1):
        reach = int(np.ceil(radius * np.sqrt(e) * 1.4)) + 2
        y0, y1 = max(int(y) - reach, 0), min(int(y) + reach + 1, h)
        x0, x1 = max(int(x) - reach, 0), min(int(x) + reach + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = dy - y, dx - x
        u, v = dy * np.cos(th) + dx * np.sin(th), dx * np.cos(th) - dy * np.sin(th)
        phi = np.arctan2(v, u)
        wobble = 1.0 + sum(a * np.cos(k * phi + p) for k, a, p in harmonics)
        rho = np.hypot(u / (radius * np.sqrt(e)), v * np.sqrt(e) / radius) / wobble
        near, own = nearest[y0:y1, x0:x1], owner[y0:y1, x0:x1]
        take = (rho < near) & (rho < 1.0)
        near[take] = rho[take]
        own[take] = i
    nuclei = np.zeros(shape, np.int32)
    for i, (y, x, rn, radius, *_rest) in enumerate(cells, start=1):
        off, ang = rng.uniform(0, eccentric) * max(radius - rn, 0.0), rng.uniform(0, 2 * np.pi)
        rr, cc = draw.ellipse(y + off * np.sin(ang), x + off * np.cos(ang), rn, rn * rng.uniform(0.7, 1.0),
                              shape=shape, rotation=rng.uniform(-np.pi, np.pi))
        mine = owner[rr, cc] == i
        nuclei[rr[mine], cc[mine]] = i
    # Cells cut to slivers by the image border or by their neighbours, or without a nucleus, go.
    area = np.bincount(owner.ravel(), minlength=len(cells) + 1)
    nucleus_area = np.bincount(nuclei.ravel(), minlength=len(cells) + 1)
    keep = (area >= 0.15 * np.pi * r_cell**2) & (nucleus_area >= 8)
    keep[0] = False
    owner = np.where(keep[owner], owner, 0)
    nuclei = np.where(keep[nuclei], nuclei, 0)
    instances, forward, _ = segmentation.relabel_sequential(owner)
    nuclei = forward[nuclei]
    n = int(instances.max())

    bright = np.concatenate([[0.0], rng.uniform(*brightness, size=n)])
    relative = np.concatenate([[0.0], rng.uniform(*cytoplasm, size=n)])
    texture = ndi.gaussian_filter(rng.normal(0, 1, shape), 2.0)
    cyto = bright[instances] * relative[instances] * (1 + 0.3 * texture / (texture.std() + 1e-9))
    edge = segmentation.find_boundaries(instances, mode="inner") & (instances > 0)
    cyto *= np.clip(0.55 + ndi.distance_transform_edt((instances > 0) & ~edge) / 8.0, 0, 1)  # dimmer at the rim
    grain = ndi.gaussian_filter(rng.normal(0, 1, shape), 1.5)
    nucleus = bright[instances] * (1 + 0.15 * grain / (grain.std() + 1e-9))
    if nucleoli > 0:
        spots = _spots(nuclei, nucleoli, rng)
        nucleus = nucleus / (1 + spots) if dark_nucleoli else nucleus * (1 + spots)
    img = np.where(nuclei > 0, nucleus, cyto)
    # Where two cells touch, a faint darker line (their membranes).
    hi = ndi.maximum_filter(instances, size=3)
    lo = ndi.minimum_filter(np.where(instances > 0, instances, n + 1), size=3)
    touching = edge & ((hi > instances) | (lo < instances)) & (nuclei == 0)
    img[touching] *= 1.0 - junction
    return _acquire(img, rng, blur, photons, gain, dtype, background=0.03), instances.astype(np.int32)


def make_varied_cells(shape: tuple[int, int] = (256, 256), seed: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`make_whole_cells` with its appearance drawn at random, as :func:`make_varied_nuclei` does for nuclei.

    Nuclei of 4 to about 20 px semi-axes, cells 1.4 to 3 times their nucleus, isolated to
    packed, round to elongated, faint to saturated, visible or invisible lines between
    touching cells, dark or bright nucleoli, uint8 or uint16.
    """
    rng = np.random.default_rng(seed)
    rn = float(rng.uniform(4, 14))
    lo_scale = float(rng.uniform(1.4, 2.2))
    lo = float(rng.uniform(0.2, 0.7))
    c_lo = float(rng.uniform(0.03, 0.25))
    return make_whole_cells(
        shape, nucleus_radius=(rn, rn * float(rng.uniform(1.1, 1.5))), cell_scale=(lo_scale, lo_scale + 0.8),
        clustered=float(rng.uniform(0.3, 0.95)), seed=int(rng.integers(2**31)),
        dtype=np.uint8 if rng.random() < 0.4 else np.uint16, brightness=(lo, float(rng.uniform(lo + 0.2, 1.0))),
        cytoplasm=(c_lo, c_lo * float(rng.uniform(1.2, 2.5))), junction=float(rng.uniform(0.0, 0.6)),
        elongation=(1.0, float(rng.uniform(1.2, 2.8))), blur=float(rng.uniform(0.7, 2.2)),
        photons=float(10 ** rng.uniform(1.5, 3.3)), nucleoli=float(rng.choice([0.0, 1.0, 3.0])),
        dark_nucleoli=bool(rng.random() < 0.6), gain=float(rng.uniform(0.7, 2.0)))


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
