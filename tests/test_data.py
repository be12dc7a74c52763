"""Painted labels -> training data: conventions, checks, weight map, validation split."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_unet.data import (
    IGNORE,
    TrainingDataError,
    apply_roi,
    border_weight_map,
    check_labels,
    class_balance,
    instance_targets,
    semantic_targets,
    split_channels,
)
from napari_unet.training import prepare_training_data


def _two_cells(gap=4):
    lab = np.zeros((40, 60), np.int32)
    lab[5:35, 2:58] = 1
    lab[10:30, 10:25] = 2
    lab[10:30, 25 + gap:40 + gap] = 3
    return lab


def test_instance_targets_convention():
    lab = np.zeros((12, 12), np.uint8)
    lab[0:2] = 1
    lab[4:9, 2:7] = 2
    lab[4:9, 7:11] = 5  # touches cell 2
    target, cells = instance_targets(lab)
    assert target[0, 0] == 0  # painted background -> class 0
    assert target[11, 11] == IGNORE  # unlabelled -> ignored
    assert target[6, 4] == 1  # interior
    assert target[4, 4] == 2 and target[6, 2] == 2  # the cell's own border
    assert target[6, 6] == 2 and target[6, 7] == 2  # both sides of the contact between touching cells
    assert set(np.unique(cells)) == {0, 1, 2}
    assert (target[cells > 0] > 0).all()


def test_semantic_targets_convention():
    lab = np.array([[0, 1, 2, 3]], np.uint16)
    assert semantic_targets(lab).tolist() == [[IGNORE, 0, 1, 2]]


def test_roi_makes_unlabelled_background():
    lab = np.zeros((6, 6), np.int32)
    lab[2, 2] = 2
    roi = np.zeros((6, 6), bool)
    roi[:3, :3] = True
    out = apply_roi(lab, roi)
    assert out[2, 2] == 2 and out[0, 0] == 1 and out[5, 5] == 0
    with pytest.raises(TrainingDataError, match="roi shape"):
        apply_roi(lab, roi[:5])


@pytest.mark.parametrize("bad, msg", [
    (np.full((4, 4), 0.5), "not integers"),
    (np.full((4, 4), -1), "negative"),
    (np.zeros((4, 4), bool), "boolean"),
    (np.array([["a"]]), "not integers"),
])
def test_check_labels_refuses(bad, msg):
    with pytest.raises(TrainingDataError, match=msg):
        check_labels(bad)


def test_check_labels_accepts_whole_floats():
    assert check_labels(np.array([[0.0, 2.0]], np.float32)).dtype.kind == "i"


def test_split_channels():
    lab_shape = (20, 30)
    assert split_channels(np.zeros((20, 30)), lab_shape).shape == (20, 30, 1)
    assert split_channels(np.zeros((20, 30, 3)), lab_shape).shape == (20, 30, 3)  # RGB last
    assert split_channels(np.zeros((2, 20, 30)), lab_shape).shape == (20, 30, 2)  # channels first
    assert split_channels(np.zeros((20, 5, 30)), lab_shape, channel_axis=1).shape == (20, 30, 5)
    with pytest.raises(TrainingDataError, match="differ"):
        split_channels(np.zeros((21, 30)), lab_shape)


def test_weight_map_between_two_cells():
    gap, w0, sigma = 4, 10.0, 5.0
    lab = _two_cells(gap)
    target, cells = instance_targets(lab)
    cw = class_balance([target], 3)
    w = border_weight_map(cells, target, cw, w0=w0, sigma=sigma)
    # Background pixel in the gap, k px right of cell 2: d1 + d2 = gap + 1 for every pixel of the gap.
    row = 20
    for x in range(25, 25 + gap):
        expected = cw[0] + w0 * np.exp(-((gap + 1) ** 2) / (2 * sigma**2))
        assert w[row, x] == pytest.approx(expected, rel=1e-5)
    # Far from both cells: only the class weight.
    assert w[6, 56] == pytest.approx(cw[0] + w0 * np.exp(-((ndi.distance_transform_edt(cells != 1)[6, 56]
                                                             + ndi.distance_transform_edt(cells != 2)[6, 56]) ** 2)
                                                         / (2 * sigma**2)), rel=1e-4)
    assert w[0, 0] == 0.0  # unlabelled: weight 0
    # Interior pixels keep their class weight: the border term is for what separates cells...
    assert w[20, 23] == pytest.approx(cw[1])
    d_other = ndi.distance_transform_edt(cells != 2)[20, 24]  # boundary pixel of cell 1 facing cell 2: d1 = 0
    assert w[20, 24] == pytest.approx(cw[2] + w0 * np.exp(-(d_other**2) / (2 * sigma**2)), rel=1e-5)
    assert w[20, 26] > w[8, 56]  # gap weighs more than open background
    # ...unless asked for everywhere, as the paper's formula reads: interior pixel d1 = 0, d2 = distance to cell 3.
    wall = border_weight_map(cells, target, cw, w0=w0, sigma=sigma, skip_class=None)
    d2 = ndi.distance_transform_edt(cells != 2)[20, 23]
    assert wall[20, 23] == pytest.approx(cw[1] + w0 * np.exp(-(d2**2) / (2 * sigma**2)), rel=1e-5)
    assert np.array_equal(wall[target == 0], w[target == 0])


def test_class_balance_mean_one():
    t = np.array([0] * 90 + [1] * 8 + [2] * 2 + [IGNORE] * 50, np.uint8)
    cw = class_balance([t], 3)
    labelled = t[t != IGNORE]
    assert cw[labelled].mean() == pytest.approx(1.0)
    assert cw[2] > cw[1] > cw[0]


def _painted(n_cells=6, seed=0):
    from napari_unet.synthetic import make_nuclei, paint_sparse_labels

    img, gt = make_nuclei((128, 128), seed=seed)
    return img, paint_sparse_labels(gt, n_cells=n_cells, seed=seed)


@pytest.mark.parametrize("images, labels, msg", [
    (np.zeros((30, 30)), np.ones((31, 30), np.uint8), "differ"),
    (np.zeros((10, 10)), np.pad(np.array([[2]]), ((5, 4), (5, 4)), constant_values=1), "too small"),
    (np.full((21, 21), np.nan), np.pad(np.array([[2]]), 10, constant_values=1), "no finite"),
    (np.zeros((30, 30)), np.full((30, 30), 2), "no background"),
    (np.zeros((30, 30)), np.ones((30, 30), np.int32), "no object"),
    (np.zeros((30, 30)), np.zeros((30, 30), np.int32), "empty"),
    (np.zeros((30, 30)), np.full((30, 30), 1.5), "not integers"),
    ([np.zeros((30, 30))] * 2, [np.ones((30, 30), np.int32)], "2 images but 1"),
])
def test_prepare_refuses_bad_input(images, labels, msg):
    with pytest.raises(TrainingDataError, match=msg):
        prepare_training_data(images, labels)


def test_training_data_error_is_value_error():
    assert issubclass(TrainingDataError, ValueError)


def test_prepare_stack_uses_labelled_planes_only():
    img, lab = _painted()
    stack = np.stack([img, img[::-1], img])
    labs = np.zeros(stack.shape, np.int32)
    labs[1] = lab[::-1]
    data = prepare_training_data(stack, labs, val_fraction=0)
    assert len(data.planes) == 1 and data.planes[0].source == (0, 1)
    assert data.in_channels == 1 and data.n_classes == 3
    assert np.array_equal(data.planes[0].target != IGNORE, labs[1] > 0)
    # Normalised per image: 1st percentile -> 0, 99.8th -> 1.
    assert data.planes[0].image.dtype == np.float32
    assert abs(np.percentile(data.planes[0].image, 99.8) - 1) < 0.05


def test_prepare_semantic_classes():
    lab = np.zeros((32, 32), np.int32)
    lab[:4] = 1
    lab[10:14] = 2
    lab[20:24] = 4
    data = prepare_training_data(np.random.default_rng(0).random((32, 32)), lab, "semantic", val_fraction=0)
    assert data.n_classes == 4 and data.class_names[0] == "background"
    assert set(np.unique(data.planes[0].target)) == {0, 1, 3, IGNORE}


def test_validation_split_has_no_leakage():
    img, lab = _painted(n_cells=6)
    margin = 8
    data = prepare_training_data(img, lab, val_fraction=0.34, val_margin=margin, min_val_objects=3, seed=3)
    assert data.n_objects == 6 and data.n_val_objects == 2
    pl = data.planes[0]
    held = pl.val_target != IGNORE
    held_cells = np.unique(lab[held & (lab >= 2)])
    assert len(held_cells) == 2
    # The held-out objects and a margin around them are out of the training loss...
    zone = ndi.distance_transform_edt(~np.isin(lab, held_cells)) <= margin
    assert not (pl.target[zone] != IGNORE).any()
    assert not np.isin(pl.centres, np.flatnonzero(zone)).any()
    assert (pl.weight[zone] == 0).all()
    # ...and every other painted pixel is trained on.
    assert ((pl.target != IGNORE) == ((lab > 0) & ~zone)).all()


def test_validation_skipped_with_few_objects():
    img, lab = _painted(n_cells=2)
    data = prepare_training_data(img, lab)
    assert data.n_val_objects == 0
    assert "validation skipped" in data.messages[0]
    assert all(p.val_target is None for p in data.planes)


def test_boundary_band_width():
    lab = np.ones((30, 40), np.int32)
    lab[5:25, 5:20] = 2
    lab[5:25, 20:35] = 3  # touches cell 2 along x = 19 | 20
    lab[0, :] = 0  # unlabelled row: not part of any cell
    for width in (1, 3, 5):
        target, cells = instance_targets(lab, boundary_width=width)
        # Distance to the outside of each cell along a row through its middle.
        row = target[15]
        assert (row[5:5 + width] == 2).all() and row[5 + width] == 1  # left edge of cell 2
        assert (row[20 - width:20] == 2).all() and row[19 - width] == 1  # contact, cell 2's side
        assert (row[20:20 + width] == 2).all() and row[20 + width] == 1  # contact, cell 3's side
        assert (target[lab == 1] == 0).all()  # the band never spills into background
        # Interiors of the two touching cells are 2 * width apart: the watershed has a gap to fill.
        interior = (target == 1) & (cells > 0)
        assert not interior[15, 20 - width:20 + width].any() and interior[15].sum() == 30 - 4 * width
    with pytest.raises(ValueError, match="boundary_width"):
        instance_targets(lab, boundary_width=0)


def test_training_data_records_the_median_painted_cell_area():
    img = np.random.default_rng(0).random((60, 80)).astype(np.float32)
    lab = np.ones((60, 80), np.int32)
    sizes = [(4, 5), (6, 6), (8, 10), (5, 5), (10, 10)]  # areas 20, 36, 80, 25, 100
    x = 2
    for k, (h, w) in enumerate(sizes):
        lab[10:10 + h, x:x + w] = k + 2
        x += w + 4
    data = prepare_training_data(img, lab, "instances", min_val_objects=3, val_fraction=0.2)
    # All painted cells count, held-out ones too.
    assert data.object_area == 36.0
    sem = prepare_training_data(img, lab, "semantic")
    assert sem.object_area is None


def test_small_cells_keep_an_interior_inside_a_wide_band():
    lab = np.ones((20, 30), np.int32)
    lab[2:8, 2:8] = 2  # 6 x 6: a 3 px band would swallow it whole
    lab[2:18, 12:28] = 3  # 16 x 16: room for the band
    target, cells = instance_targets(lab, boundary_width=3)
    small_interior = (target == 1) & (lab == 2)
    assert small_interior.sum() == 16  # the 1 px ring only: 4 x 4 inside
    assert ((target == 1) & (lab == 3)).sum() == 10 * 10


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.float64])
def test_normalisation_in_two_steps_is_exact_on_any_crop(dtype):
    """normalize == apply_normalization(normalization_params): prediction normalises tile by tile
    with the whole image's percentiles and must get exactly the whole image's pixels."""
    from napari_unet.data import apply_normalization, normalization_params, normalize

    rng = np.random.default_rng(3)
    img = (rng.random((2, 40, 50)) * 300).astype(dtype)
    if np.dtype(dtype).kind == "f":
        img[0, 3, 4], img[1, 7, 8] = np.nan, np.inf  # ignored for the percentiles, 0 afterwards
    whole = normalize(img, channel_axis=0)
    params = normalization_params(img, channel_axis=0)
    crop = apply_normalization(img[None, :, 10:30, 5:45], params, channel_axis=1)[0]
    assert crop.dtype == np.float32
    np.testing.assert_array_equal(crop, whole[:, 10:30, 5:45])
    assert np.isfinite(whole).all()
    lo, hi = np.percentile(img[0][np.isfinite(img[0])].astype(np.float32), [1, 99.8])
    np.testing.assert_allclose(whole[0][np.isfinite(img[0])], (img[0][np.isfinite(img[0])] - lo) / (hi - lo),
                               rtol=1e-5, atol=1e-6)
    before = img.copy()
    apply_normalization(img, params, channel_axis=0)
    np.testing.assert_array_equal(img, before)  # the caller's array is never changed


@pytest.mark.parametrize("y0, x0, h, w", [(-5, -3, 12, 9), (4, 6, 8, 8), (-20, 10, 40, 30)])
def test_training_crops_mirror_like_prediction_tiles(y0, x0, h, w):
    """Training patches and validation planes see the same mirrored borders as prediction's
    tiles (numpy's "reflect": the edge pixel is not repeated), also beyond one reflection."""
    from napari_unet.training_data import crop_mirrored

    a = np.random.default_rng(0).random((2, 11, 13)).astype(np.float32)
    H, W = a.shape[-2:]
    pad = 60
    padded = np.pad(a, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    want = padded[:, pad + y0:pad + y0 + h, pad + x0:pad + x0 + w]
    got = crop_mirrored(a, y0, x0, h, w)
    assert np.array_equal(got, want)
    filled = crop_mirrored(a[0], y0, x0, h, w, fill=-1.0)
    inside = np.zeros((h, w), bool)
    ys, xs = np.arange(y0, y0 + h), np.arange(x0, x0 + w)
    inside[((ys >= 0) & (ys < H))[:, None] & ((xs >= 0) & (xs < W))[None, :]] = True
    assert np.array_equal(filled[inside], want[0][inside])
    assert np.all(filled[~inside] == -1.0)


@pytest.mark.parametrize("shape, kwargs, want", [
    ((64, 64), {"n_channels": 1}, None),
    ((64, 64, 3), {"n_channels": 1}, 2),                 # RGB, converted to grey
    ((5, 64, 64), {"n_channels": 1}, None),              # a stack of planes
    ((64, 64, 3), {"n_channels": 3}, 2),
    ((3, 64, 64), {"n_channels": 3}, 0),
    ((5, 2, 64, 64), {"n_channels": 2}, 1),              # any leading axis, not only the first
    ((64, 64, 3), {"n_channels": 1, "rgb": False}, None),  # napari: a non-RGB layer's last axes are Y, X
    ((3, 64, 3), {"n_channels": 3, "rgb": False}, 0),
    ((64, 64, 4), {"rgb": True}, 2),
    ((2, 64, 64), {"axes": "CYX", "n_channels": 1}, 0),  # a file's letters outrank guessing
    ((64, 64, 3), {"axes": "YXS", "n_channels": 3}, 2),
    ((64, 64), {"labels_shape": (64, 64)}, None),
    ((64, 64, 2), {"labels_shape": (64, 64)}, 2),
    ((2, 64, 64), {"labels_shape": (64, 64)}, 0),
    ((3, 3, 3), {"labels_shape": (3, 3)}, 2),            # both fit: the last axis first
    ((3, 3, 3), {"labels_shape": (3, 3), "rgb": False}, 0),
    ((2, 64, 64), {"channel_axis": -3, "n_channels": 5}, 0),  # said explicitly: only checked for range
])
def test_find_channel_axis_one_rule(shape, kwargs, want):
    from napari_unet.data import find_channel_axis

    assert find_channel_axis(shape, **kwargs) == want


@pytest.mark.parametrize("shape, kwargs, words", [
    ((64, 64), {"n_channels": 2}, "no axis"),
    ((5, 64, 64), {"n_channels": 2}, "no axis"),
    ((64, 64, 2), {"n_channels": 2, "rgb": False}, "no axis"),
    ((64, 65, 2), {"labels_shape": (64, 64)}, "differ"),
    ((64, 64), {"channel_axis": 2}, "out of range"),
    ((2, 64, 64), {"axes": "ZYX", "n_channels": 2}, "no channel axis"),  # the file says Z: not channels
])
def test_find_channel_axis_says_what_does_not_fit(shape, kwargs, words):
    from napari_unet.data import find_channel_axis

    with pytest.raises(ValueError, match=words) as e:
        find_channel_axis(shape, **kwargs)
    assert "\n" not in str(e.value) and str(tuple(shape)) in str(e.value)


@pytest.mark.parametrize("shape, axis", [((32, 32, 3), 2), ((3, 32, 32), 0), ((32, 32, 2), 2), ((2, 32, 32), 0),
                                         ((4, 32, 32, 2), 3), ((4, 2, 32, 32), 1)])
def test_training_prediction_and_widgets_find_the_same_channel_axis(shape, axis):
    """The channels training finds from the labels' shape are where prediction (told the
    model's channels) and the widgets (told napari's rgb flag) find them."""
    from napari_unet._widgets._common import layer_channel_axis
    from napari_unet.data import split_channels
    from napari_unet.inference import prepare_image

    image = np.random.default_rng(0).random(shape).astype(np.float32)
    spatial = shape[:axis] + shape[axis + 1:]
    k = shape[axis]
    moved = split_channels(image, spatial)
    assert np.array_equal(moved, np.moveaxis(image, axis, -1))
    prepared = prepare_image(image, k)
    assert prepared.has_channels and np.array_equal(prepared.image, moved)
    rgb = axis == len(shape) - 1  # napari shows channels-last data only as an RGB(A) layer
    if not rgb or k in (3, 4):
        assert layer_channel_axis(shape, rgb, k) == axis
        assert layer_channel_axis(shape, rgb, labels_shape=spatial) == axis
