"""Augmentation: labels stay aligned with the image, the elastic field is smooth, shapes and ranges."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_unet.augment import (
    AugmentConfig,
    _spline_upsampling_matrix,
    augment_intensity,
    elastic_displacement,
    patch_coordinates,
    warp,
)


def _blobs(shape=(96, 120), seed=0):
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    for k in range(2, 9):
        y, x = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10)
        lab[max(y - 6, 0):y + 6, max(x - 8, 0):x + 8] = k
    return lab


@pytest.mark.parametrize("seed", range(5))
def test_labels_stay_aligned_with_image(seed):
    lab = _blobs(seed=seed)
    img = lab.astype(np.float32)  # an image equal to its labels
    rng = np.random.default_rng(seed)
    coords = patch_coordinates((64, 64), (48, 60), rng, AugmentConfig())
    wl = warp(lab, coords, order=0, mode="constant", cval=255)
    wi = warp(img, coords, order=0, mode="constant", cval=255)
    assert np.array_equal(wl, wi.astype(np.int32))
    # Linear interpolation agrees with the nearest-neighbour labels away from label edges.
    wi1 = warp(img, coords, order=1, mode="constant", cval=255)
    # (5x5: a pixel whose output neighbourhood is one label has a source neighbourhood of one label too.)
    flat = ndi.maximum_filter(wl, 5, mode="constant", cval=10**6) == ndi.minimum_filter(wl, 5, mode="constant", cval=-1)
    assert flat.mean() > 0.5
    assert np.allclose(wi1[flat], wl[flat], atol=1e-4)
    assert set(np.unique(wl)) <= set(np.unique(lab)) | {255}  # nearest neighbour: no new values


def test_plain_crop_without_augmentation():
    img = np.arange(100 * 80, dtype=np.float32).reshape(100, 80)
    coords = patch_coordinates((16, 20), (50.5, 40.5))
    out = warp(img, coords, order=1)
    assert np.array_equal(out, img[43:59, 31:51])


def test_elastic_field_is_smooth_and_sized():
    rng = np.random.default_rng(0)
    d = elastic_displacement((128, 96), rng, sigma=10.0, grid=3)
    assert d.shape == (2, 128, 96)
    # Neighbouring displacements differ little (a few 1/10 px), while the field moves pixels by several px.
    assert np.abs(np.diff(d, axis=1)).max() < 1.0 and np.abs(np.diff(d, axis=2)).max() < 1.0
    fields = np.stack([elastic_displacement((64, 64), rng) for _ in range(200)])
    assert 5 < fields[:, :, 0, 0].std() < 15  # lattice points: N(0, 10 px)


def test_spline_matrix_equals_scipy_zoom():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 3))
    ref = ndi.zoom(a, (50 / 3, 37 / 3), order=3, mode="nearest", grid_mode=False)
    got = _spline_upsampling_matrix(50, 3) @ a @ _spline_upsampling_matrix(37, 3).T
    assert ref.shape == (50, 37) and np.allclose(got, ref, atol=1e-5)


def test_rotation_covers_arbitrary_angles():
    rng = np.random.default_rng(0)
    cfg = AugmentConfig(elastic_sigma=0, scale=(1, 1), flip=False)
    angles = []
    for _ in range(50):
        c = patch_coordinates((9, 9), (0, 0), rng, cfg)
        v = c[:, 4, 8] - c[:, 4, 4]  # image of the x unit vector
        angles.append(np.degrees(np.arctan2(v[0], v[1])) % 360)
    angles = np.array(angles)
    assert ((angles % 90) > 5).sum() > 30  # not only multiples of 90 degrees
    assert np.ptp(angles) > 270


def test_intensity_augmentation_changes_values_only():
    rng = np.random.default_rng(0)
    x = np.linspace(-0.2, 1.2, 400, dtype=np.float32).reshape(1, 20, 20)
    y = augment_intensity(x.copy(), rng, AugmentConfig())
    assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all()
    assert not np.allclose(y, x)
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.9  # a monotone-ish change plus mild noise
