"""Property-based tests (hypothesis) of the tiling and of the label conversions, over random shapes,
dtypes and values. (test_inference.py has those of mirroring and of tiled prediction itself.)
"""
from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage as ndi

from napari_unet import postprocess as pp
from napari_unet.data import (
    IGNORE,
    TrainingDataError,
    apply_roi,
    border_weight_map,
    check_labels,
    class_balance,
    instance_targets,
    semantic_targets,
)
from napari_unet.inference import _positions, prepare_image

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT_DTYPES = st.sampled_from([np.uint8, np.uint16, np.uint32, np.int16, np.int32, np.int64])
SHAPES = hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24)


def painted(max_value: int = 6, shape=SHAPES):
    """Painted labels: 0 unlabelled, 1 background, 2.. objects, in any integer dtype that holds ``max_value``."""
    dtypes = INT_DTYPES.filter(lambda dt: np.iinfo(dt).max >= max_value)
    return dtypes.flatmap(lambda dt: hnp.arrays(dt, shape, elements=st.integers(0, max_value)))


def _neighbours(a: np.ndarray):
    """For each of the 4 directions: every pixel's neighbour value (-1 outside the image), and where it is inside."""
    h, w = a.shape
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        out = np.full(a.shape, -1, np.int64)
        out[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)] = a[max(dy, 0):h + min(dy, 0),
                                                                          max(dx, 0):w + min(dx, 0)]
        inside = np.zeros(a.shape, bool)
        inside[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)] = True
        yield out, inside


# ---- tiling --------------------------------------------------------------------------------------

@given(size=st.integers(1, 300), out_tile=st.integers(1, 80), overlap=st.integers(0, 79),
       multiple=st.sampled_from([1, 2, 4, 8, 16]))
@FAST
def test_tile_positions_cover_the_axis_on_the_grid_with_the_overlap(size, out_tile, overlap, multiple):
    overlap = min(overlap, out_tile - 1)
    if out_tile < size and (out_tile - overlap) // multiple * multiple < 1:
        with pytest.raises(ValueError, match="no step"):
            _positions(size, out_tile, overlap, multiple)
        return
    starts = _positions(size, out_tile, overlap, multiple)
    covered = np.zeros(size, bool)
    for s in starts:
        covered[max(s, 0):max(s + out_tile, 0)] = True
    assert covered.all()
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    if out_tile >= size:  # one region for the whole axis
        assert len(starts) == 1
        return
    assert starts[0] == 0 and all(s % multiple == 0 for s in starts)
    assert all(b - a <= out_tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours overlap enough
    assert starts[-1] + out_tile >= size and starts[-1] + out_tile - size < multiple  # the overhang is mirrored


@given(lead=hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3),
       plane=hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9), rgb=st.booleans(),
       dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.float64]))
@FAST
def test_stacks_are_planes_for_a_2d_model(lead, plane, rgb, dtype):
    """(..., Y, X[, RGB]) for a 1-channel model: one (1, Y, X) float32 plane per index of the leading axes."""
    shape = lead + plane + ((3,) if rgb else ())
    image = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape).astype(dtype)
    before = image.copy()
    # The documented rule: a last axis of 3 or 4 is RGB(A) for a 1-channel model (so is a stack 3 px wide).
    rgb_detected = len(shape) >= 3 and shape[-1] in (3, 4)
    spatial = shape[:-1] if rgb_detected else shape
    lead, plane = spatial[:-2], spatial[-2:]
    prep = prepare_image(image, 1)
    assert prep.plane_shape == plane and prep.lead_shape == lead and prep.to_grey == rgb_detected
    for idx in np.ndindex(*lead):
        p = prep.plane(idx)
        assert p.shape == (1, *plane) and p.dtype == np.float32
        want = image[idx].astype(np.float32)
        if rgb_detected:
            want = want[..., :3] @ np.array([0.2125, 0.7154, 0.0721], np.float32)  # alpha ignored
        np.testing.assert_allclose(p[0], want, rtol=1e-6)
    np.testing.assert_array_equal(image, before)


# ---- painted labels -> targets ------------------------------------------------------------------

@given(labels=painted())
@FAST
def test_check_labels_keeps_every_value(labels):
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size:
        signed = labels.copy()
        signed.flat[0] = -1
        with pytest.raises(TrainingDataError, match="negative"):
            check_labels(signed)
    out = check_labels(labels)
    assert out.dtype.kind in "iu" and np.array_equal(out, labels)
    as_float = check_labels(labels.astype(np.float32))  # ImageJ writes labels as float32 at times
    assert as_float.dtype.kind == "i" and np.array_equal(as_float, labels)
    if labels.size:
        with pytest.raises(TrainingDataError, match="not integers"):
            check_labels(labels.astype(np.float32) + 0.25)
    with pytest.raises(TrainingDataError, match="boolean"):
        check_labels(labels > 1)


@given(labels=painted())
@FAST
def test_instance_targets_keep_the_painting(labels):
    before = labels.copy()
    target, cells = instance_targets(labels)
    np.testing.assert_array_equal(labels, before)
    assert target.dtype == np.uint8 and target.shape == labels.shape
    assert np.array_equal(target == IGNORE, labels == 0)  # unlabelled stays ignored, and only it
    assert np.array_equal(target == 0, labels == 1)  # background is background, and only it
    assert np.isin(target[labels >= 2], [1, 2]).all()  # every painted object pixel: interior or boundary
    # One cell per painted value, numbered 1..N.
    assert np.array_equal(cells > 0, labels >= 2)
    values = np.unique(labels[labels >= 2])
    assert np.array_equal(np.unique(cells[cells > 0]), np.arange(1, len(values) + 1))
    for v in values:
        assert len(np.unique(cells[labels == v])) == 1
    # Interior: all 4-neighbours in the same cell; boundary: at least one is not.
    same = np.ones(labels.shape, bool)
    for nb, inside in _neighbours(cells):
        same &= ~inside | (nb == cells)
    assert same[target == 1].all()
    assert not same[target == 2].any()
    # Any integer dtype gives the same targets.
    t64, c64 = instance_targets(labels.astype(np.int64))
    assert np.array_equal(t64, target) and np.array_equal(c64, cells)


@given(labels=painted(max_value=300))
@FAST
def test_semantic_targets(labels):
    if labels.size and labels.max() > IGNORE:
        with pytest.raises(TrainingDataError, match="at most"):
            semantic_targets(labels)
        return
    target = semantic_targets(labels)
    assert target.dtype == np.uint8
    assert np.array_equal(target == IGNORE, labels == 0)
    painted_px = labels > 0
    assert np.array_equal(target[painted_px].astype(np.int64), labels[painted_px].astype(np.int64) - 1)


@given(labels=painted(), data=st.data())
@FAST
def test_roi_only_turns_unlabelled_into_background(labels, data):
    roi = data.draw(hnp.arrays(bool, labels.shape))
    before = labels.copy()
    out = apply_roi(labels, roi)
    np.testing.assert_array_equal(labels, before)
    assert out.dtype == labels.dtype
    assert np.array_equal(out[labels > 0], labels[labels > 0])  # painting is never changed
    assert (out[roi & (labels == 0)] == 1).all() and (out[~roi & (labels == 0)] == 0).all()
    assert apply_roi(labels, None) is labels


@given(labels=painted(), w0=st.sampled_from([0.0, 10.0]), sigma=st.floats(1.0, 8.0), power=st.sampled_from([0, 0.5, 1]))
@FAST
def test_weight_map_bounds(labels, w0, sigma, power):
    target, cells = instance_targets(labels)
    cw = class_balance([target], 3, power)
    assert (cw > 0).all()
    labelled = target != IGNORE
    if labelled.any():
        assert cw[target[labelled]].mean() == pytest.approx(1.0, rel=1e-5)
    w = border_weight_map(cells, target, cw, w0=w0, sigma=sigma)
    assert w.dtype == np.float32 and np.isfinite(w).all()
    assert (w[~labelled] == 0).all()  # ignored pixels weigh nothing
    base = cw[target[labelled]]
    assert (w[labelled] >= base - 1e-6).all() and (w[labelled] <= base + w0 + 1e-5).all()
    assert np.allclose(w[target == 1], cw[1])  # no border term on cell interiors (the default skip_class)
    if w0 == 0:
        assert np.allclose(w[labelled], base)


# ---- probabilities -> labels ----------------------------------------------------------------------

def _smooth(field: np.ndarray, upsample: int) -> np.ndarray:
    return np.clip(ndi.zoom(field, upsample, order=1), 0, 1)


@given(raw=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=10),
                      elements=st.floats(0, 1, width=32)),
       extra=st.floats(0, 0.5), upsample=st.integers(1, 4), min_size=st.integers(0, 12),
       banded=st.booleans(), fill=st.booleans())
@FAST
def test_instance_labels_invariants(raw, extra, upsample, min_size, banded, fill):
    interior = _smooth(raw, upsample)
    foreground = np.clip(interior + extra, 0, 1)
    kw = {"block": 5, "halo": 3} if banded else {}
    labels = pp.instance_labels(interior, foreground, min_size=min_size, fill_holes=fill, **kw)
    assert labels.shape == interior.shape and labels.dtype == np.uint16
    ids = np.unique(labels[labels > 0])
    assert np.array_equal(ids, np.arange(1, len(ids) + 1))  # consecutive ids
    sizes = np.bincount(labels.ravel())
    assert (sizes[1:] >= min_size).all()
    t, f = _thresholds(interior)
    seeds, n = ndi.label(interior > t)
    mask = (foreground > f) | (seeds > 0)
    assert not (labels[~ndi.binary_fill_holes(mask)] > 0).any()  # cells lie in the foreground (or its holes)
    if not fill:
        assert not (labels[~mask] > 0).any()
    seen = {}
    for k, size in enumerate(np.bincount(seeds.ravel())[1:], start=1):
        got = np.unique(labels[seeds == k])
        if size >= min_size:  # a seed big enough is one cell of its own
            assert len(got) == 1 and got[0] > 0 and got[0] not in seen.values()
            seen[k] = got[0]


@given(labels=painted())
@FAST
def test_fill_enclosed_holes_only_fills_enclosed_background(labels):
    before = labels.copy()
    out = pp.fill_enclosed_holes(labels)
    np.testing.assert_array_equal(labels, before)
    assert out.dtype == labels.dtype
    assert np.array_equal(out[labels > 0], labels[labels > 0])  # objects are never changed
    changed = out != labels
    holes = ndi.binary_fill_holes(labels > 0) & (labels == 0)
    assert not (changed & ~holes).any() and (out[changed] > 0).all()


@given(planes=st.lists(hnp.arrays(np.uint16, (6, 7), elements=st.integers(0, 9)), min_size=1, max_size=4))
@FAST
def test_stack_ids_are_unique_across_planes(planes):
    stack = pp.StackLabels((len(planes), 6, 7))
    for z, p in enumerate(planes):
        stack.put((z,), p)
    out = stack.labels
    offset = 0
    for z, p in enumerate(planes):
        n = int(p.max())
        assert np.array_equal(out[z] > 0, p > 0)
        if n:
            assert np.array_equal(out[z][p > 0], p[p > 0].astype(np.int64) + offset)
            offset += n
    for a in range(len(planes)):
        for b in range(a + 1, len(planes)):
            assert not (set(np.unique(out[a])) & set(np.unique(out[b]))) - {0}


@given(max_label=st.integers(0, 2**32 - 1), kind=st.sampled_from(["instances", "semantic"]))
@FAST
def test_label_dtype_holds_the_largest_label(max_label, kind):
    if kind == "semantic" and max_label > np.iinfo(np.uint16).max:
        return  # semantic classes stop far below (at most 255 painted classes)
    dt = pp.label_dtype(max_label, kind)
    assert np.iinfo(dt).max >= max_label
    smaller = {np.dtype(np.uint32): np.uint16, np.dtype(np.uint16): np.uint8}.get(dt)
    if smaller is not None and (kind == "semantic" or dt != np.uint16):
        assert np.iinfo(smaller).max < max_label


def _thresholds(interior) -> tuple[float, float]:
    """The (seed, foreground) thresholds instance_labels uses unless told: the plane's or the volume's."""
    if np.ndim(interior) == 2:
        return pp.SEED_THRESHOLD, pp.FOREGROUND_THRESHOLD
    return pp.VOLUME_SEED_THRESHOLD, pp.VOLUME_FOREGROUND_THRESHOLD


def _reference_instances(interior, foreground, min_size, min_seed_size, fill):
    """The instance steps written the plain way with scikit-image: flood the whole image from
    every seed pixel, remove small objects, fill each enclosed hole one by one, renumber."""
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import relabel_sequential, watershed

    t, f = _thresholds(interior)
    seeds, _ = ndi.label(interior > t)
    with warnings.catch_warnings():  # "only one label": fine here
        warnings.simplefilter("ignore", UserWarning)
        if min_seed_size > 1:
            seeds = remove_small_objects(seeds, max_size=min_seed_size - 1)
        mask = (foreground > f) | (interior > t)
        labels = watershed(-interior.astype(np.float32), seeds, mask=mask)
        if min_size > 1:
            labels = remove_small_objects(labels, max_size=min_size - 1)
    if fill:
        holes, n = ndi.label(ndi.binary_fill_holes(labels > 0) & (labels == 0))
        for k in range(1, n + 1):
            hole = holes == k
            around = np.unique(labels[ndi.binary_dilation(hole) & ~hole])
            if len(around) == 1:
                labels[hole] = around[0]
    return relabel_sequential(labels)[0]


@given(seed=st.integers(0, 2**16), shape=st.sampled_from([(23, 31), (40, 17), (6, 9, 11)]),
       sigma=st.floats(0.5, 3.0), extra=st.floats(0, 0.4), min_size=st.integers(0, 20),
       min_seed_size=st.integers(0, 6), fill=st.booleans(), one_flood=st.booleans(), threads=st.booleans())
@FAST
def test_instance_labels_equal_the_plain_scikit_image_steps(seed, shape, sigma, extra, min_size, min_seed_size, fill,
                                                            one_flood, threads):
    """The fast flood (only the regions between seeds, in their bounding boxes), the one-pass size
    filter and renumbering and the hole filling from the holes' own pixels give exactly the labels
    of the plain whole-image steps (values made distinct: exact ties may be broken either way)."""
    from scipy.stats import rankdata

    field = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    field = (field - field.min()) / max(np.ptp(field), 1e-12)
    interior = (rankdata(field, method="ordinal").reshape(shape) / field.size).astype(np.float32)
    interior = np.where(field > 0.55, interior, interior * 0.5)  # seeds where the field is high
    foreground = np.clip(field + extra, 0, 1).astype(np.float32)
    # one_flood: the regions between seeds flooded in one call over the image (when their boxes
    # would not pack smaller), not in their boxes packed side by side
    unpacked = mock.patch.object(pp, "_packed_boxes", lambda shapes, limit: (None, tuple(limit)))
    # threads: the regions split in two packed arrays flooded in two threads (from one region on),
    # seeds and flood regions labelled in two threads, sizes and renumbering in two halves,
    # the regions between seeds in groups
    split = mock.patch.object(pp, "_PARALLEL_MIN_REGIONS", 1 if threads else 10**9)
    halves = mock.patch.object(pp, "_PARALLEL_MIN_PIXELS", 1 if threads else 10**12)
    groups = mock.patch.object(pp, "_FLOOD_GROUP_PIXELS", 16 if threads else 1 << 17)  # many small packed arrays
    cores = mock.patch.object(pp, "_cores", lambda: 2)  # also on a one-core machine
    with unpacked if one_flood else contextlib.nullcontext(), split, halves, groups, cores:
        got = pp.instance_labels(interior, foreground, min_size=min_size, min_seed_size=min_seed_size,
                                 fill_holes=fill)
    want = _reference_instances(interior, foreground, min_size, min_seed_size, fill)
    np.testing.assert_array_equal(got, want)
