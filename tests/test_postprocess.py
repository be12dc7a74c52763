"""Post-processing: probabilities -> semantic classes or instances (touching cells split)."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from napari_unet import postprocess as pp
from napari_unet.synthetic import make_nuclei


def ideal_probabilities(instances: np.ndarray, blur: float = 0.7) -> np.ndarray:
    """What a perfect instance-mode model outputs: (background, interior, boundary), slightly smooth."""
    boundary = find_boundaries(instances, mode="inner") & (instances > 0)
    interior = (instances > 0) & ~boundary
    p = np.stack([instances == 0, interior, boundary]).astype(np.float32)
    p = np.stack([ndi.gaussian_filter(c, blur) for c in p])
    return p / p.sum(axis=0, keepdims=True)


def matched_fraction(gt: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> float:
    """Fraction of ground-truth objects with a predicted object of IoU > ``iou`` (one-to-one above 0.5)."""
    n_gt = int(gt.max())
    pairs = np.stack([gt.ravel(), pred.ravel()], 1)
    pairs = pairs[(pairs[:, 0] > 0) & (pairs[:, 1] > 0)]
    uniq, inter = np.unique(pairs, axis=0, return_counts=True)
    area_gt = np.bincount(gt.ravel(), minlength=n_gt + 1)
    area_pr = np.bincount(pred.ravel(), minlength=int(pred.max()) + 1)
    ious = inter / (area_gt[uniq[:, 0]] + area_pr[uniq[:, 1]] - inter)
    return len(np.unique(uniq[ious > iou, 0])) / n_gt


def test_instances_recovered_from_touching_nuclei():
    _, gt = make_nuclei((256, 256), touching=0.6, seed=3)
    # The ground truth has many touching pairs: a plain foreground labelling merges them.
    merged = ndi.label(gt > 0)[0].max()
    assert merged < gt.max() - 5
    p = ideal_probabilities(gt)
    labels = pp.instance_labels(p[1], p[1] + p[2], min_size=15)
    assert labels.dtype == np.uint16
    assert matched_fraction(gt, labels) > 0.95
    assert abs(int(labels.max()) - int(gt.max())) <= 2
    # Boundaries recovered: the foreground of the result is the true foreground.
    assert ((labels > 0) == (gt > 0)).mean() > 0.99
    # Consecutive ids.
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))


def test_banded_watershed_equals_whole_image():
    _, gt = make_nuclei((300, 200), seed=5)
    p = ideal_probabilities(gt, blur=1.0)
    whole = pp.instance_labels(p[1], p[1] + p[2], block=10_000)
    banded = pp.instance_labels(p[1], p[1] + p[2], block=64, halo=48)
    assert whole.max() == banded.max()
    assert (whole == banded).mean() > 0.999


@pytest.mark.parametrize("volume", [False, True])
def test_a_band_writes_only_its_own_rows(volume):
    """Two seeds with a boundary region between them that crosses a band's lower edge (within
    the halo): each band keeps only its own rows, so the next band floods that region from
    both seeds, as the whole-image watershed does (2D, and a volume of one plane)."""
    interior = np.zeros((24, 3), np.float32)
    interior[:9] = interior[17:] = 0.9  # seed A above, seed B below
    interior[9:17] = np.linspace(0.1, 0.4, 8)[:, None]  # rising towards B: B floods most of it
    fg = np.ones_like(interior)
    if volume:
        interior, fg = interior[None], fg[None]
    whole = pp.instance_labels(interior, fg, min_size=0, fill_holes=False, block=10_000)
    banded = pp.instance_labels(interior, fg, min_size=0, fill_holes=False, block=8, halo=6)
    np.testing.assert_array_equal(banded, whole)
    assert (whole[..., :10, :] == 1).all() and (whole[..., 10:, :] == 2).all()


def test_small_objects_removed_and_holes_filled():
    interior = np.zeros((60, 60), np.float32)
    interior[5:25, 5:25] = 1.0
    interior[12:16, 12:16] = 0.0  # a hole in the first cell
    interior[40:43, 40:43] = 1.0  # 9 pixels: too small
    interior[30:50, 5:20] = 1.0
    labels = pp.instance_labels(interior, interior, min_size=15)
    assert labels.max() == 2
    assert labels[14, 14] == labels[6, 6] != 0
    assert labels[41, 41] == 0
    assert labels[35, 10] not in (0, labels[6, 6])


def test_semantic_argmax_and_dtypes():
    p = np.zeros((4, 5, 6), np.float32)
    p[2, :, :3] = 1
    p[3, :, 3:] = 0.6
    lab = pp.semantic_labels(p)
    assert lab.dtype == np.uint8 and lab.shape == (5, 6)
    assert (lab[:, :3] == 2).all() and (lab[:, 3:] == 3).all()
    assert pp.semantic_labels(np.zeros((300, 2, 2))).dtype == np.uint16
    assert pp.label_dtype(65535) == np.uint16 and pp.label_dtype(65536) == np.uint32
    with pytest.raises(ValueError, match="probabilities must be"):
        pp.semantic_labels(np.zeros((3, 4)))


def test_stack_ids_unique_and_dtype_grows():
    _, gt = make_nuclei((128, 128), seed=1)
    p = ideal_probabilities(gt)
    stack = np.stack([p, p[:, ::-1]], axis=1)  # (3, 2, Y, X)
    labels = pp.labels_from_probabilities(stack, "instances")
    n0 = int(labels[0].max())
    assert n0 > 3
    assert labels[1][labels[1] > 0].min() == n0 + 1
    assert labels.max() == 2 * n0
    s = pp.StackLabels((2, 4, 4))
    big = np.full((4, 4), 40_000, np.uint16)
    s.put((0,), big)
    s.put((1,), big)
    assert s.labels.dtype == np.uint32 and s.labels[1, 0, 0] == 80_000
    with pytest.raises(ValueError, match="3 classes"):
        pp.labels_from_probabilities(np.zeros((2, 8, 8)), "instances")


def test_fill_enclosed_holes_only_where_one_object_encloses():
    lab = np.zeros((30, 40), np.int32)
    lab[2:12, 2:12] = 1
    lab[5:8, 5:8] = 0          # hole inside object 1 -> filled with 1
    lab[15:25, 2:10] = 2
    lab[15:25, 10:18] = 3
    lab[18:21, 8:12] = 0       # gap enclosed by objects 2 and 3 together -> stays background
    lab[2:12, 25:35] = 4
    lab[5:9, 28:32] = 5        # object 5 lies inside object 4: left alone
    lab[0:5, 36:40] = 6
    lab[0:2, 38:40] = 0        # notch open to the image border -> stays background
    out = pp.fill_enclosed_holes(lab)
    assert (out[5:8, 5:8] == 1).all()
    assert (out[18:21, 8:12] == 0).all()
    assert (out[5:9, 28:32] == 5).all() and (out[lab == 4] == 4).all()
    assert (out[0:2, 38:40] == 0).all()
    changed = out != lab
    assert changed.sum() == 9 and lab[5, 5] == 0  # only the one hole, and the input is not modified


def test_small_seeds_join_their_neighbour_instead_of_making_fragments():
    interior = np.zeros((40, 60), np.float32)
    interior[10:30, 5:25] = 1.0  # a cell's interior ...
    interior[18:21, 27:30] = 1.0  # ... and a 9-px speck of interior in its own boundary band
    foreground = np.zeros_like(interior)
    foreground[8:32, 3:32] = 1.0
    kept = pp.instance_labels(interior, foreground, min_size=1)
    assert kept.max() == 2  # the speck seeds a fragment
    merged = pp.instance_labels(interior, foreground, min_size=1, min_seed_size=10)
    assert merged.max() == 1
    assert (merged > 0).sum() == (foreground > 0.5).sum()  # its pixels went to the cell
    assert merged[19, 28] == merged[20, 10] == 1


def _two_peaks(saddle: float) -> tuple[np.ndarray, np.ndarray]:
    """One blob of foreground holding two interior peaks (0.9) joined by a neck of ``saddle``."""
    interior = np.zeros((30, 60), np.float32)
    interior[8:22, 6:26] = 0.9
    interior[8:22, 34:54] = 0.9
    interior[12:18, 26:34] = saddle
    foreground = np.zeros_like(interior)
    foreground[6:24, 4:56] = 1.0
    return interior, foreground


def test_seed_threshold_decides_between_one_cell_and_two():
    interior, foreground = _two_peaks(saddle=0.45)
    assert pp.instance_labels(interior, foreground, threshold=0.5, min_size=1).max() == 2  # the neck is no seed
    assert pp.instance_labels(interior, foreground, threshold=0.4, min_size=1).max() == 1  # it joins the two
    # Unless told, a plane seeds at SEED_THRESHOLD, a volume at VOLUME_SEED_THRESHOLD.
    between = (pp.SEED_THRESHOLD + pp.VOLUME_SEED_THRESHOLD) / 2
    interior, foreground = _two_peaks(saddle=between)
    assert pp.instance_labels(interior, foreground, min_size=1).max() == 1
    volume_i, volume_f = np.stack([interior] * 3), np.stack([foreground] * 3)
    assert pp.instance_labels(volume_i, volume_f, min_size=1).max() == 2
    assert pp.instance_labels(volume_i, volume_f, threshold=pp.SEED_THRESHOLD, min_size=1).max() == 1
    # A cell whose interior the network is that unsure of is found at the plane's default only.
    faint = np.where(interior > 0, between, 0).astype(np.float32)
    assert pp.instance_labels(faint, foreground, min_size=1).max() == 1
    assert pp.instance_labels(faint, foreground, threshold=pp.VOLUME_SEED_THRESHOLD, min_size=1).max() == 0


def test_foreground_threshold_decides_the_outline():
    interior = np.zeros((30, 30), np.float32)
    interior[10:20, 10:20] = 0.9
    unsure = (pp.FOREGROUND_THRESHOLD + pp.VOLUME_FOREGROUND_THRESHOLD) / 2
    foreground = np.full(interior.shape, 0.05, np.float32)
    foreground[7:23, 7:23] = unsure  # a rim of 3 px the network is not sure of
    foreground[10:20, 10:20] = 0.95
    plane = pp.instance_labels(interior, foreground, min_size=1, fill_holes=False)
    assert (plane > 0).sum() == 100  # the plane's default leaves the rim out
    volume = pp.instance_labels(np.stack([interior] * 3), np.stack([foreground] * 3), min_size=1, fill_holes=False)
    assert (volume[1] > 0).sum() == 256  # a volume's takes it
    assert (pp.instance_labels(interior, foreground, foreground_threshold=0.3, min_size=1) > 0).sum() == 256


@pytest.mark.parametrize("shapes, limit", [
    ([(3, 5), (7, 2), (4, 9), (1, 1), (6, 6)], (40, 12)),
    ([(2, 3, 4), (4, 2, 5), (1, 6, 3)], (10, 8, 9)),
])
def test_packed_boxes_are_disjoint_a_pixel_apart_and_of_their_shapes(shapes, limit):
    """Each box gets a place of its own shape; grown by one pixel along the packing axes
    (first and last), no two places overlap: a pixel outside every mask keeps floods apart."""
    from napari_unet.postprocess import _packed_boxes

    places, canvas = _packed_boxes(shapes, limit)
    assert places is not None and np.prod(canvas) < np.prod(limit)
    taken = np.zeros(canvas, int)
    for shape, place in zip(shapes, places):
        assert tuple(s.stop - s.start for s in place) == shape
        assert all(s.stop <= n for s, n in zip(place, canvas))
        grown = (slice(place[0].start, place[0].stop + 1), *place[1:-1], slice(place[-1].start, place[-1].stop + 1))
        taken[grown] += 1
    assert taken.max() == 1
    assert _packed_boxes([(30, 10), (30, 10)], (40, 12)) == (None, (40, 12))  # not smaller: not packed


def test_the_packed_flood_runs_on_touching_cells_and_gives_the_whole_image_labels(monkeypatch):
    from skimage.segmentation import relabel_sequential, watershed

    import napari_unet.postprocess as pp
    from napari_unet.synthetic import make_nuclei

    _, truth = make_nuclei((256, 256), seed=4)  # touching nuclei: a boundary region per cluster
    inner = ndi.grey_erosion(truth, size=5) == truth
    noise = np.random.default_rng(3).random(truth.shape).astype(np.float32) * 0.2
    interior = np.where((truth > 0) & inner, 0.7, 0.1).astype(np.float32) + noise
    fg = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    calls = []
    real = pp._packed_boxes
    monkeypatch.setattr(pp, "_packed_boxes", lambda shapes, limit: calls.append(len(shapes)) or real(shapes, limit))
    got = pp.instance_labels(interior, fg, min_size=0, fill_holes=False)
    assert calls and calls[0] >= 2, "regions between several seeds were flooded in their packed boxes"
    seeds, _ = ndi.label(interior > pp.SEED_THRESHOLD)
    want = watershed(-interior, seeds, mask=(fg > pp.FOREGROUND_THRESHOLD) | (interior > pp.SEED_THRESHOLD))
    np.testing.assert_array_equal(got, relabel_sequential(want)[0])


@pytest.mark.parametrize("shape", [(40, 57), (7, 19, 23)])
def test_shared_boxes_are_the_regions_bounding_boxes_grown_by_one_pixel(shape):
    """Boxes from the regions' flat pixel indices equal scipy's find_objects boxes grown by one
    pixel (clipped at the edges), in the order of the region ids asked for."""
    from napari_unet.postprocess import _shared_boxes

    region, n = ndi.label(np.random.default_rng(5).random(shape) > 0.6)
    where = np.flatnonzero(region)
    shared = np.arange(1, n + 1)[::3]
    boxes = _shared_boxes(where, region.reshape(-1)[where], shared, n, shape)
    found = ndi.find_objects(region)
    want = [tuple(slice(max(s.start - 1, 0), min(s.stop + 1, size)) for s, size in zip(found[r - 1], shape))
            for r in shared]
    assert len(shared) > 3 and boxes == want
