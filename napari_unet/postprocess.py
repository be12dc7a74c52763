"""Per-pixel class probabilities -> label images (scikit-image / scipy). No Qt, no torch.

Two outputs, matching the two training modes:

* ``semantic``: the most probable class per pixel; labels are class indices, 0 being the
  background class (uint8, or uint16 beyond 256 classes).
* ``instances`` (models trained in instance mode, 3 classes: 0 background, 1 cell
  interior, 2 cell boundary): connected interiors are the seeds, a watershed grows them
  into the foreground (interior + boundary) to recover the boundary pixels of touching
  cells, small objects are removed, holes filled, and ids made consecutive (uint16, or
  uint32 beyond 65535 cells).

Stacks (``(..., Y, X)``) are post-processed plane by plane; instance ids are offset so
that they are unique across the whole stack (plane 0 has ids 1..n0, plane 1 n0+1.., ...).
Volumes (``(Z, Y, X)``) can instead be post-processed in 3D (:func:`instance_labels` takes
3D probabilities), or plane by plane and then linked across planes by overlap
(:func:`stitch_planes`, the simple baseline).
"""

from __future__ import annotations

import os
from collections.abc import Generator

import numpy as np
from scipy import ndimage as ndi

from .jobs import drain

__all__ = [
    "semantic_labels", "instance_labels", "labels_from_probabilities", "label_dtype", "stitch_planes",
    "volume_size_limits", "INTERIOR", "BOUNDARY", "SEED_THRESHOLD", "FOREGROUND_THRESHOLD",
    "VOLUME_SEED_THRESHOLD", "VOLUME_FOREGROUND_THRESHOLD",
]

#: Class indices of an instance-mode model: 0 background, 1 cell interior, 2 cell boundary.
INTERIOR, BOUNDARY = 1, 2

#: How a plane's probabilities become cells unless told otherwise: a pixel seeds a cell where
#: the interior probability exceeds SEED_THRESHOLD, and belongs to some cell where the
#: foreground (interior + boundary) exceeds FOREGROUND_THRESHOLD. Chosen with the first-minute
#: networks of ``benchmarks/fewshot.py`` on real images (docs/design.md): they are unsure inside
#: cells they have not seen (at 0.5 such cells were missed or split), and generous at the
#: edges (a stricter foreground gave tighter outlines and fewer cells joined by a bridge).
SEED_THRESHOLD = 0.4
FOREGROUND_THRESHOLD = 0.6
#: The same for a volume (3D watershed, or its planes stitched; prediction passes them for any
#: plane of a volume): what volumes were measured with (synthetic volumes, docs/volumes.md);
#: the planes' values were not measured in 3D.
VOLUME_SEED_THRESHOLD = 0.5
VOLUME_FOREGROUND_THRESHOLD = 0.5


def label_dtype(max_label: int, kind: str = "instances") -> np.dtype:
    """Smallest unsigned dtype for labels up to ``max_label``.

    ``"instances"``: uint16 or uint32 (uint16 is what ImageJ and most tools read);
    ``"semantic"``: uint8 or uint16.
    """
    if kind == "semantic":
        return np.dtype(np.uint8) if max_label <= np.iinfo(np.uint8).max else np.dtype(np.uint16)
    return np.dtype(np.uint16) if max_label <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def semantic_labels(probabilities: np.ndarray) -> np.ndarray:
    """Argmax over the class axis (axis 0): ``(C, ...)`` -> ``(...)`` class indices.

    Returns uint8 for up to 256 classes, else uint16.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim < 3:
        raise ValueError(f"probabilities must be (C, ..., Y, X), got shape {probabilities.shape}")
    return probabilities.argmax(axis=0).astype(label_dtype(probabilities.shape[0] - 1, "semantic"))


def instance_labels(interior: np.ndarray, foreground: np.ndarray, *, threshold: float | None = None,
                    foreground_threshold: float | None = None, min_size: int = 15, min_seed_size: int = 0,
                    fill_holes: bool = True, block: int | None = None, halo: int | None = None) -> np.ndarray:
    """Instances of one 2D plane, or of one 3D volume, from interior and foreground probabilities.

    The same steps in 2D and 3D: seeds are the connected interiors (face connectivity), a
    watershed grows them into the foreground, small objects go, holes are filled, ids are
    made consecutive. In 3D every step is 3D, so one nucleus spanning many planes is one
    object; sizes are then counted in voxels (:func:`volume_size_limits` converts areas).

    Parameters
    ----------
    interior : numpy.ndarray
        ``(Y, X)`` or ``(Z, Y, X)`` probability of the cell-interior class (float16 is fine).
    foreground : numpy.ndarray
        Same shape: probability of interior + boundary (i.e. 1 - background).
    threshold : float, optional
        Interior probability above which a pixel seeds a cell (seeds = connected components).
        Lower finds more cells and splits fewer, higher merges fewer touching ones. ``None``:
        :data:`SEED_THRESHOLD` for a plane, :data:`VOLUME_SEED_THRESHOLD` for a volume.
    foreground_threshold : float, optional
        Foreground probability above which a pixel belongs to some cell: higher gives tighter
        outlines. ``None``: :data:`FOREGROUND_THRESHOLD` for a plane,
        :data:`VOLUME_FOREGROUND_THRESHOLD` for a volume.
    min_size : int
        Cells with fewer pixels are removed (before renumbering).
    min_seed_size : int
        Seeds with fewer pixels are dropped before the watershed, so their pixels go to a
        neighbouring cell instead of making a fragment of their own (a cell's interior
        broken in two by a dark nucleolus, a speck at a boundary).
    fill_holes : bool
        Fill holes inside each cell.
    block, halo : int, optional
        Images taller than ``block`` rows (Y) are flooded in bands of ``block`` rows, each
        with ``halo`` rows of context above and below, so the watershed's float64 copies
        stay small whatever the image size (2D: bands of about 8 M pixels, at least 512 rows,
        halo 128; 3D: bands of about 16 M voxels, halo 64). Seeds are labelled globally
        first, so ids agree between bands and no seam needs merging; the result equals the
        whole-image watershed for cells smaller than the halo.

    Returns
    -------
    numpy.ndarray
        Labels of the input's shape: 0 background, 1..N cells, uint16 (uint32 beyond 65535 cells).
    """
    gen = iter_instance_labels(interior, foreground, threshold=threshold, foreground_threshold=foreground_threshold,
                               min_size=min_size, min_seed_size=min_seed_size, fill_holes=fill_holes, block=block,
                               halo=halo)
    return drain(gen)


def iter_instance_labels(interior: np.ndarray, foreground: np.ndarray, *, threshold: float | None = None,
                         foreground_threshold: float | None = None, min_size: int = 15, min_seed_size: int = 0,
                         fill_holes: bool = True, block: int | None = None, halo: int | None = None
                         ) -> Generator[str, None, np.ndarray]:
    """:func:`instance_labels` as a generator: yields the step's name after every band (so that a
    volume's post-processing can report progress and be stopped), returns the labels."""

    interior = np.asarray(interior)
    foreground = np.asarray(foreground)
    if interior.ndim not in (2, 3) or interior.shape != foreground.shape:
        raise ValueError(f"interior and foreground must be 2D or 3D of the same shape, got {interior.shape} "
                         f"and {foreground.shape}")
    if block is None:
        per_row = int(np.prod(interior.shape)) // interior.shape[-2]
        # 2D: bands of about 8 M pixels (2048 rows of a 4096 px wide image, 1024 of 8192): the
        # flood's float64 copies of a band, not of the image, set the peak memory of huge images.
        block = max(512, (1 << 23) // max(per_row, 1)) if interior.ndim == 2 else max(32, (1 << 24) // max(per_row, 1))
    if halo is None:
        halo = 128 if interior.ndim == 2 else 64
    if threshold is None:
        threshold = SEED_THRESHOLD if interior.ndim == 2 else VOLUME_SEED_THRESHOLD
    if foreground_threshold is None:
        foreground_threshold = FOREGROUND_THRESHOLD if interior.ndim == 2 else VOLUME_FOREGROUND_THRESHOLD
    seeds = interior > threshold
    mask = (foreground > foreground_threshold) | seeds
    h = seeds.shape[-2]
    block = max(int(block), 1)
    todo = region = None
    if block >= h and min_seed_size <= 1:
        # One band and every seed kept: what the flood decides is known now, and is labelled
        # beside the seeds (two threads on a multi-core CPU).
        todo = mask & ~seeds
        (labels, n), region = _in_parallel(lambda s=seeds: ndi.label(s), lambda t=todo: ndi.label(t),
                                           size=seeds.size)
    else:
        labels, n = ndi.label(seeds)  # int32, labelled in place by the watershed below
    del seeds
    rows = (slice(None),) * (labels.ndim - 2)  # the leading (Z) axis whole: bands run along Y
    if n and min_seed_size > 1:  # small seeds out, in one lookup (as remove_small_objects, in fewer passes)
        table = np.arange(n + 1, dtype=labels.dtype)
        table[_sizes(labels, n) < int(min_seed_size)] = 0
        _renumber(labels, table, labels)
        n = int(table.max())
    if n:
        for top in range(0, h, block):
            lo, hi = max(top - halo, 0), min(top + block + halo, h)
            # Flood from the seeds in order of decreasing interior probability; boundary
            # pixels between touching cells go to the nearer seed. Rows above this band
            # are final already and act as markers too.
            band, rows_out = (*rows, slice(lo, hi)), (*rows, slice(top, min(top + block, h)))
            whole = lo == 0 and hi == h  # one band: flooded in place
            seeded = labels if whole else labels[band].copy()  # a copy: only the band's own rows go back
            if todo is None:
                todo = mask[band] & (seeded == 0)  # foreground no seed covers: what the flood decides
            _flood(interior[band], seeded, todo, region)
            if not whole:
                labels[rows_out] = seeded[(*rows, slice(top - lo, top - lo + min(block, h - top)))]
            todo = region = seeded = None
            yield "watershed"
    del mask
    if n:
        # Small cells out and ids made consecutive in one lookup (what remove_small_objects
        # and relabel_sequential do in two passes each over the image; hole filling below
        # only grows the cells that are kept, so their order and ids stay the same).
        kept = _sizes(labels, n) >= max(int(min_size), 1)
        kept[0] = False
        new_id = np.cumsum(kept)
        new_id *= kept
        table = new_id.astype(label_dtype(int(new_id[-1])))
        out = np.empty(labels.shape, table.dtype)
        _renumber(labels, table, out)
        labels = out
        del kept, new_id, table, out
    if fill_holes and n:
        for top in range(0, h, block):
            lo, hi = max(top - halo, 0), min(top + block + halo, h)
            if lo == 0 and hi == h:
                _fill_enclosed_holes(labels)
            else:
                filled = labels[(*rows, slice(lo, hi))].copy()
                _fill_enclosed_holes(filled)
                keep = (*rows, slice(top - lo, top - lo + min(block, h - top)))
                labels[(*rows, slice(top, min(top + block, h)))] = filled[keep]
            yield "filling holes"
    return labels if n else np.zeros(labels.shape, np.uint16)


def volume_size_limits(min_size: int, min_seed_size: int, anisotropy: float = 1.0) -> tuple[int, int]:
    """2D size limits (pixels) as 3D ones (voxels): the ball with the disc's radius.

    A cell of area ``A`` in a plane has radius ``sqrt(A / pi)``; a ball of that radius
    holds ``4/3 pi r^3`` cubic pixels, i.e. that over ``anisotropy`` (the Z step over the
    Y/X pixel size) voxels.
    """
    def ball(area: int) -> int:
        if area <= 1:
            return int(area)
        r = np.sqrt(area / np.pi)
        return int(round(4.0 / 3.0 * np.pi * r ** 3 / max(float(anisotropy), 1e-6)))

    return ball(int(min_size)), ball(int(min_seed_size))


def stitch_planes(labels: np.ndarray, iou_threshold: float = 0.25) -> np.ndarray:
    """Link the 2D objects of consecutive planes of a ``(Z, Y, X)`` volume into 3D objects.

    Plane by plane, each object takes the id of the object of the plane above that it
    overlaps most, if their IoU is at least ``iou_threshold`` and no other object of its
    plane took that id first (pairs by decreasing IoU); the rest start objects of their
    own. Ids may repeat between planes on input; the result has consecutive ids over the
    volume (uint16, or uint32 beyond 65535 objects). This is the simple baseline of
    cellpose's ``stitch_threshold`` (written here: no maintained library has it; a few
    lines of numpy). Touching objects can be linked wrongly where one overlaps the other's
    next plane more than its own: :func:`instance_labels` on 3D probabilities does not
    have that limit.
    """
    from skimage.segmentation import relabel_sequential

    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"stitch_planes needs a (Z, Y, X) volume, got shape {labels.shape}")
    out = np.zeros(labels.shape, np.int64)
    top = 0
    for z in range(labels.shape[0]):
        here, _, _ = relabel_sequential(labels[z])
        here = here.astype(np.int64)
        n = int(here.max()) if here.size else 0
        lut = np.zeros(n + 1, np.int64)
        lut[1:] = np.arange(top + 1, top + n + 1)  # new objects by default
        if z and n:
            above = out[z - 1]
            both = (above > 0) & (here > 0)
            if both.any():
                pairs, inter = np.unique(np.stack([here[both], above[both]]), axis=1, return_counts=True)
                size_here = np.bincount(here.ravel(), minlength=n + 1)
                ids_above, size_above = np.unique(above[above > 0], return_counts=True)
                a = size_here[pairs[0]]
                b = size_above[np.searchsorted(ids_above, pairs[1])]
                iou = inter / (a + b - inter)
                linked, taken = set(), set()
                for i in np.argsort(-iou, kind="stable"):
                    if iou[i] < iou_threshold:
                        break
                    h, t = int(pairs[0, i]), int(pairs[1, i])
                    if h in linked or t in taken:
                        continue
                    lut[h] = t
                    linked.add(h)
                    taken.add(t)
        out[z] = lut[here]
        top += n
    out, _, _ = relabel_sequential(out)
    return out.astype(label_dtype(int(out.max()) if out.size else 0), copy=False)


def _flood(interior: np.ndarray, labels: np.ndarray, todo: np.ndarray, region: tuple | None = None) -> None:
    """Flood the pixels of ``todo`` in ``labels`` (C-contiguous, changed in place) from its seeds.

    The same labels as ``skimage.segmentation.watershed(-interior, labels, mask=todo |
    (labels > 0))`` (face connectivity; up to the order of exact ties), computed where it
    matters: each connected region of ``todo`` touched by one seed goes to that seed
    whole (a flood reaches every pixel of a region it enters), one touched by none stays
    0, and only regions between several seeds (the boundaries of touching cells) are
    flooded, from the seed pixels at their edge. Those regions' bounding boxes are packed
    side by side, a pixel apart, into small arrays and flooded in one watershed call each
    (:func:`_packed_boxes`; groups of about :data:`_FLOOD_GROUP_PIXELS`, in two threads from
    :data:`_PARALLEL_MIN_REGIONS` regions on a multi-core CPU): scikit-image's watershed converts and pads its whole
    input, so one call over the image spent most of the post-processing on pixels no flood
    reaches, and one call per region on the calls' own overhead. Everything else works on
    the flat indices of a few percent of the image's pixels, not on whole-image arrays:
    which seeds touch which region, the regions' bounding boxes, the writes.
    ``region``: ``ndi.label(todo)`` when the caller has it already.
    """
    region, n = ndi.label(todo) if region is None else region
    if n == 0:
        return
    flat, region_flat = labels.reshape(-1), region.reshape(-1)  # views: both are C-contiguous
    # Which seeds touch which region: from the seed pixels at the regions' edges (fewer than
    # the regions' own pixels, most of which touch no seed).
    rim = np.flatnonzero(_face_neighbours(todo) & (labels > 0))
    seed_ids, region_ids = _touching_pairs(rim, todo.shape, flat[rim], region_flat)
    where = np.flatnonzero(todo)
    region_of = region_flat[where]
    owner, shared = _sole_owner(region_ids, seed_ids, n, labels.dtype)
    floods = []
    if shared.size:  # read labels before anything is written (a region touches no other region)
        floods = _flood_shared(interior, labels, region, n, shared,
                               _shared_boxes(where, region_of, shared, n, todo.shape))
    flat[where] = owner[region_of]
    for box, inside, ws in floods:
        labels[box][inside] = ws[inside]


def _shared_boxes(where: np.ndarray, region_of: np.ndarray, shared: np.ndarray, n: int,
                  shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Bounding boxes of the ``shared`` regions (ascending ids), grown by one pixel (the seed
    pixels at their edge), from their pixels' flat indices ``where`` (regions ``region_of``):
    ``ndi.find_objects`` would pass over the whole image for them."""
    is_shared = np.zeros(n + 1, bool)
    is_shared[shared] = True
    sel = is_shared[region_of]
    ids, pix = region_of[sel], where[sel]
    order = np.argsort(ids, kind="stable")
    ids, pix = ids[order], pix[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # one run per region, in shared's order
    coords = np.unravel_index(pix, shape)
    lo = [np.maximum(np.minimum.reduceat(c, starts) - 1, 0) for c in coords]
    hi = [np.minimum(np.maximum.reduceat(c, starts) + 2, size) for c, size in zip(coords, shape)]
    return [tuple(slice(int(a[k]), int(b[k])) for a, b in zip(lo, hi)) for k in range(len(starts))]


def _flood_shared(interior: np.ndarray, labels: np.ndarray, region: np.ndarray, n: int, shared: np.ndarray,
                  boxes: list[tuple[slice, ...]]) -> list[tuple[tuple[slice, ...], np.ndarray, np.ndarray]]:
    """``(box, region's pixels in the box, flooded box)`` for each of the ``shared`` regions
    (see :func:`_flood`); only reads ``labels``."""
    from skimage.segmentation import watershed

    shapes = [tuple(b.stop - b.start for b in box) for box in boxes]
    places, canvas = _packed_boxes(shapes, region.shape)
    if places is None:  # boxes as large as the image: one flood over it
        is_shared = np.zeros(n + 1, bool)
        is_shared[shared] = True
        inside = is_shared[region]  # a lookup: np.isin over the whole band is slower
        edge = _face_neighbours(inside) & (labels > 0)  # the seed pixels that flood a shared region
        ws = watershed(-np.asarray(interior, np.float32), np.where(edge, labels, 0), mask=inside | edge)
        return [(tuple(slice(None) for _ in region.shape), inside, ws)]
    # Groups of about _FLOOD_GROUP_PIXELS box pixels, each packed and flooded on its own:
    # scikit-image's watershed slows down with the size of its input (a field of 1900 nuclei,
    # 360 regions: one packed array 103 ms, eight 55 ms in all); two threads share them out.
    threads = len(shared) >= max(_PARALLEL_MIN_REGIONS, 2) and _cores() > 1
    k = int(min(len(shared), max(1 + threads, round(sum(np.prod(t) for t in shapes) / _FLOOD_GROUP_PIXELS))))
    groups = [list(range(j, len(shared), k)) for j in range(k)]  # interleaved: raster order, similar sizes
    packings = [(places, canvas)] if k == 1 else [_packed_boxes([shapes[i] for i in g], region.shape)
                                                   for g in groups]
    if any(p is None for p, _ in packings):
        groups, packings = [list(range(len(shared)))], [(places, canvas)]

    def flood(group, packing):
        places, canvas = packing
        height = np.zeros(canvas, np.float32)
        markers = np.zeros(canvas, labels.dtype)
        mask = np.zeros(canvas, bool)
        insides = []
        for i, place in zip(group, places):
            box = boxes[i]
            inside = region[box] == shared[i]
            seeded = labels[box]
            edge = _face_neighbours(inside) & (seeded > 0)  # the seed pixels at this region's edge
            height[place] = interior[box]
            markers[place] = np.where(edge, seeded, 0)
            mask[place] = inside | edge
            insides.append(inside)
        np.negative(height, out=height)
        ws = watershed(height, markers, mask=mask)
        return [(boxes[i], inside, ws[place]) for i, place, inside in zip(group, places, insides)]

    if len(groups) == 1 or not threads:
        return [r for g, p in zip(groups, packings) for r in flood(g, p)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # scikit-image's watershed releases the GIL for part of its work
        return [r for part in pool.map(flood, groups, packings) for r in part]


#: From this many regions between seeds on, :func:`_flood` floods them in two threads.
_PARALLEL_MIN_REGIONS = 64

#: :func:`_flood` floods the regions between seeds in groups of about this many box pixels.
_FLOOD_GROUP_PIXELS = 1 << 17

#: From this many pixels on, whole-image steps run in two threads (on a multi-core CPU).
_PARALLEL_MIN_PIXELS = 1 << 20


def _in_parallel(*calls, size: int) -> list:
    """The callables' results, run in threads when the image (``size`` pixels) is large
    enough to pay for them and the CPU has cores for them: scipy's labelling and numpy's
    bincount and take release the GIL, and the network is idle meanwhile."""
    if len(calls) < 2 or size < _PARALLEL_MIN_PIXELS or _cores() < 2:
        return [call() for call in calls]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


def _sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Pixels per id ``0..n`` of ``labels``: two halves in two threads on a multi-core CPU
    (numpy's bincount releases the GIL), each in chunks (bincount makes an int64 copy)."""
    return sum(_in_parallel(*(lambda p=p: sum(np.bincount(c.reshape(-1), minlength=n + 1) for c in _chunks(labels[p]))
                              for p in _halves(labels)), size=labels.size))


def _renumber(labels: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = table[labels]`` (``out`` may be ``labels``): in halves and chunks, as :func:`_sizes`."""
    def part(p):
        for src, dst in zip(_chunks(labels[p]), _chunks(out[p])):
            np.take(table, src, out=dst, mode="clip")  # ids are in range: no check needed

    _in_parallel(*(lambda p=p: part(p) for p in _halves(labels)), size=labels.size)


def _chunks(array: np.ndarray, size: int = 1 << 21) -> list[np.ndarray]:
    """Views of ``array`` along its first axis, about ``size`` elements each (at least one row)."""
    step = max(1, size // max(1, int(np.prod(array.shape[1:]))))
    return [array[i:i + step] for i in range(0, array.shape[0], step)]


def _halves(array: np.ndarray) -> list[tuple[slice, ...]]:
    """The first axis of ``array`` in two (one part when it is too small to share out)."""
    if array.size < _PARALLEL_MIN_PIXELS or array.shape[0] < 2 or _cores() < 2:
        return [(slice(None),)]
    mid = array.shape[0] // 2
    return [(slice(0, mid),), (slice(mid, None),)]


def _cores() -> int:
    """CPUs this process may use (affinity: taskset, SLURM, containers)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _packed_boxes(shapes: list[tuple[int, ...]], limit: tuple[int, ...]
                  ) -> tuple[list[tuple[slice, ...]] | None, tuple[int, ...]]:
    """Places for boxes of ``shapes`` side by side in one array, a pixel apart (shelves: rows
    of boxes along the last axis, stacked along the first; the tallest first), and that
    array's shape; ``(None, limit)`` when it would not be smaller than ``limit``.

    A gap of one unmasked pixel keeps the boxes' floods apart (a watershed never crosses
    a pixel outside its mask). A few lines of shelf packing: the boxes only need to be
    disjoint and the array small, not optimally packed.
    """
    width = max(limit[-1], max(s[-1] for s in shapes))
    middle = [max(s[i] for s in shapes) for i in range(1, len(limit) - 1)]
    order = sorted(range(len(shapes)), key=lambda i: -shapes[i][0])
    places: list = [None] * len(shapes)
    top = x = row = 0
    for i in order:
        s = shapes[i]
        if x and x + s[-1] > width:  # next shelf
            top, x, row = top + row + 1, 0, 0
        places[i] = (slice(top, top + s[0]), *(slice(0, m) for m in s[1:-1]), slice(x, x + s[-1]))
        x += s[-1] + 1
        row = max(row, s[0])
    canvas = (top + row, *middle, width)
    if np.prod(canvas, dtype=np.int64) >= np.prod(limit, dtype=np.int64):
        return None, tuple(limit)
    return places, canvas


def _touching_pairs(where: np.ndarray, shape: tuple[int, ...], own: np.ndarray, other: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pairs ``(own id, other id)`` of the pixels at flat indices ``where`` of an
    array of ``shape`` (their ids ``own``, all > 0) and their face neighbours (ids in the flat
    array ``other``, those > 0): which objects touch which."""
    own = own.astype(np.int64)
    coords = np.unravel_index(where, shape)
    strides = np.cumprod((1, *shape[:0:-1]))[::-1]  # C order, in pixels
    keys = []
    for c, size, stride in zip(coords, shape, strides):
        for d in (1, -1):
            ok = c < size - 1 if d == 1 else c > 0
            ids = other[where[ok] + d * int(stride)].astype(np.int64)
            sel = ids > 0
            keys.append((own[ok][sel] << 32) | ids[sel])  # one int64 per pair: a 1-D unique
    keys = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    return keys >> 32, keys & 0xFFFFFFFF


def _sole_owner(regions: np.ndarray, ids: np.ndarray, n: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """From distinct ``(region, id)`` pairs: ``owner`` (``n + 1`` entries, the one id touching
    each region; 0 for none or several) and the regions touched by several ids."""
    region, count = np.unique(regions, return_counts=True)
    single = np.isin(regions, region[count == 1])
    owner = np.zeros(n + 1, dtype)
    owner[regions[single]] = ids[single]
    return owner, region[count > 1]


def _face_neighbours(mask: np.ndarray) -> np.ndarray:
    """Pixels with a face neighbour in ``mask`` (the mask's dilation by a cross, minus nothing:
    a pixel of ``mask`` is in it when another pixel of ``mask`` touches it). Shifted views:
    several times faster than ``ndi.binary_dilation`` on large images."""
    out = np.zeros_like(mask)
    for axis in range(mask.ndim):
        n = mask.shape[axis]
        lo = tuple(slice(0, n - 1) if i == axis else slice(None) for i in range(mask.ndim))
        hi = tuple(slice(1, n) if i == axis else slice(None) for i in range(mask.ndim))
        out[hi] |= mask[lo]
        out[lo] |= mask[hi]
    return out


def fill_enclosed_holes(labels: np.ndarray) -> np.ndarray:
    """Give each background region enclosed by a single object to that object (a copy; 2D or 3D).

    Holes are the background's connected components (face connectivity, as
    ``ndi.binary_fill_holes``) that do not touch the array's border; each is given to the
    object around it when exactly one object touches it. Written with ``ndi.label`` and the
    holes' own pixels because ``binary_fill_holes`` (iterated erosions over the whole
    image) took a third of the instance post-processing, and a per-object loop took
    seconds on images with thousands of objects. Regions enclosed by several touching
    objects, and regions touching the border, stay background.
    """
    out = np.array(labels, order="C")  # a C-contiguous copy: filled in place through flat views
    _fill_enclosed_holes(out)
    return out


def _fill_enclosed_holes(labels: np.ndarray) -> None:
    """:func:`fill_enclosed_holes` in place (``labels`` C-contiguous)."""
    background, n = ndi.label(labels == 0)
    if n == 0:
        return
    open_ = np.zeros(n + 1, bool)  # touches the border (or is not background: id 0)
    open_[0] = True
    for axis in range(labels.ndim):
        for end in (0, -1):
            open_[np.take(background, end, axis=axis)] = True
    if open_.all():
        return
    flat = background.reshape(-1)
    where = np.flatnonzero(~open_[flat])  # the holes' pixels (a lookup, no write over the image)
    hole_of = flat[where]
    hole_ids, object_ids = _touching_pairs(where, labels.shape, hole_of, labels.reshape(-1))
    owner, _ = _sole_owner(hole_ids, object_ids, n, labels.dtype)
    fill = owner[hole_of]
    sel = fill > 0
    labels.reshape(-1)[where[sel]] = fill[sel]


def labels_from_probabilities(probabilities: np.ndarray, mode: str = "instances", **kwargs) -> np.ndarray:
    """Labels from ``(C, ..., Y, X)`` class probabilities (what :func:`napari_unet.inference.predict` returns).

    ``mode="semantic"``: argmax class. ``mode="instances"``: :func:`instance_labels` per
    2D plane, ids offset to be unique across the stack. ``kwargs`` go to
    :func:`instance_labels`.
    """
    probabilities = np.asarray(probabilities)
    if mode == "semantic":
        return semantic_labels(probabilities)
    if mode != "instances":
        raise ValueError(f"mode must be 'instances' or 'semantic', got {mode!r}")
    if probabilities.ndim < 3 or probabilities.shape[0] != 3:
        raise ValueError("instance labels need probabilities of 3 classes (background, interior, boundary) "
                         f"as (3, ..., Y, X); got shape {probabilities.shape}")
    lead = probabilities.shape[1:-2]
    out = StackLabels(probabilities.shape[1:])
    for idx in np.ndindex(*lead):
        p = probabilities[(slice(None), *idx)]
        out.put(idx, instance_labels(p[INTERIOR], p[INTERIOR] + p[BOUNDARY], **kwargs))
    return out.labels


class StackLabels:
    """Instance labels of a stack filled plane by plane, ids offset to stay unique.

    Starts as uint16 and switches to uint32 the first time the ids pass 65535.
    """

    def __init__(self, shape: tuple[int, ...]):
        self.labels = np.zeros(shape, np.uint16)
        self.offset = 0

    def put(self, index: tuple[int, ...], plane: np.ndarray) -> None:
        n = int(plane.max()) if plane.size else 0
        if n == 0:
            self.labels[index] = 0
            return
        top = self.offset + n
        if self.offset == 0 and plane.shape == self.labels.shape and plane.dtype in (np.uint16, np.uint32):
            # The whole output in one piece (a single image): kept as it is, not copied (the
            # zeros allocated up front were never touched, so they cost no memory).
            self.labels, self.offset = plane, top
            return
        if top > np.iinfo(self.labels.dtype).max:
            self.labels = self.labels.astype(label_dtype(top))
        dst = self.labels[index]
        dst[...] = plane
        if self.offset:
            dst[dst > 0] += self.offset
        self.offset = top
