"""Data augmentation for training patches, as in the U-Net paper: geometry and intensity.

Shift, arbitrary-angle rotation, flips, a mild scale change and the paper's elastic
deformation (random displacements on a coarse 3x3 grid, 10 px standard deviation,
smoothly interpolated to every pixel) are combined into ONE coordinate map per patch, so
each array is resampled by a single :func:`scipy.ndimage.map_coordinates` call: linear
interpolation for the image, nearest neighbour (``order=0``) for labels and weights, so
labels stay labels and stay aligned with the image. No Qt, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

__all__ = ["AugmentConfig", "elastic_displacement", "patch_coordinates", "warp", "augment_intensity"]


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to apply and how strongly.

    Attributes
    ----------
    rotate : bool
        Rotation by a uniformly random angle in [0, 360) degrees.
    flip : bool
        Random mirror along each axis.
    scale : (float, float)
        Range of a random isotropic zoom factor ((1, 1) disables it).
    elastic_sigma : float
        Standard deviation in pixels of the random displacements on the coarse grid (paper: 10).
    elastic_grid : int
        Side of the coarse displacement grid (paper: 3).
    gamma : (float, float)
        Range of a random gamma applied to the normalised intensities.
    contrast, brightness : (float, float)
        Ranges of a random gain and offset.
    noise : float
        Largest standard deviation of additive Gaussian noise (normalised intensity units).
    """

    rotate: bool = True
    flip: bool = True
    scale: tuple[float, float] = (0.85, 1.15)
    elastic_sigma: float = 10.0
    elastic_grid: int = 3
    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: tuple[float, float] = (0.75, 1.3)
    # Offsets and noise stay small: after percentile normalisation dim cells can sit at ~0.1
    # above the background (Huh7 nuclei vs their bright nucleoli), and a +-0.1 shift erased them.
    brightness: tuple[float, float] = (-0.03, 0.03)
    noise: float = 0.02


@lru_cache(maxsize=32)
def _spline_upsampling_matrix(n: int, grid: int) -> np.ndarray:
    """``(n, grid)`` matrix M with ``M @ v == scipy.ndimage.zoom(v, n / grid, order=3, grid_mode=False)``.

    Cubic-spline zoom is linear and separable, so zooming a ``grid x grid`` array is
    ``M_y @ a @ M_x.T``; building M by zooming the unit vectors once and caching it makes
    the elastic field much cheaper than calling ``zoom`` on every patch.
    """
    eye = np.eye(grid)
    cols = [ndi.zoom(eye[i], n / grid, order=3, mode="nearest", grid_mode=False) for i in range(grid)]
    return np.stack(cols, axis=1).astype(np.float32)


def elastic_displacement(shape: tuple[int, int], rng: np.random.Generator, sigma: float = 10.0,
                         grid: int = 3) -> np.ndarray:
    """Smooth random displacement field ``(2, H, W)`` in pixels (the paper's elastic deformation).

    Displacements are drawn from ``N(0, sigma^2)`` on a ``grid x grid`` lattice whose
    points sit on the patch's corners and are upsampled to every pixel with cubic-spline
    interpolation (what :func:`scipy.ndimage.zoom` with ``order=3, grid_mode=False`` does).
    """
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid)).astype(np.float32)
    my = _spline_upsampling_matrix(int(shape[0]), grid)
    mx = _spline_upsampling_matrix(int(shape[1]), grid)
    return np.stack([my @ coarse[k] @ mx.T for k in range(2)])


def patch_coordinates(shape: tuple[int, int], center: tuple[float, float], rng: np.random.Generator | None = None,
                      config: AugmentConfig | None = None) -> np.ndarray:
    """Source coordinates ``(2, H, W)`` of a patch of ``shape`` centred at ``center`` in the image.

    With ``rng`` and ``config``, the patch is flipped, rotated, scaled and elastically
    deformed around its centre; without them it is a plain crop (integer coordinates when
    ``center`` is chosen so). Pass the result to :func:`warp` for every array of the sample.
    """
    h, w = shape
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32) - (h - 1) / 2,
                         np.arange(w, dtype=np.float32) - (w - 1) / 2, indexing="ij")
    if rng is None or config is None:
        return np.stack([yy + center[0], xx + center[1]])
    if config.elastic_sigma > 0:
        disp = elastic_displacement(shape, rng, config.elastic_sigma, config.elastic_grid)
        yy, xx = yy + disp[0], xx + disp[1]
    s = rng.uniform(*config.scale) if config.scale[0] != config.scale[1] else float(config.scale[0])
    a = rng.uniform(0, 2 * np.pi) if config.rotate else 0.0
    fy = -1.0 if config.flip and rng.random() < 0.5 else 1.0
    fx = -1.0 if config.flip and rng.random() < 0.5 else 1.0
    c, si = np.cos(a) * s, np.sin(a) * s
    # One affine map (flip, then rotation and scale) applied to the deformed grid.
    ys = c * fy * yy - si * fx * xx + center[0]
    xs = si * fy * yy + c * fx * xx + center[1]
    return np.stack([ys, xs]).astype(np.float32, copy=False)


def warp(array: np.ndarray, coords: np.ndarray, order: int = 1, mode: str = "mirror", cval: float = 0.0,
         output_dtype=None) -> np.ndarray:
    """Resample a 2D array ``(H, W)`` or channels-first ``(C, H, W)`` at ``coords`` ``(2, h, w)``.

    ``order=1`` (linear) for images, ``order=0`` (nearest) for labels and weights.
    ``mode="mirror"`` mirrors the image beyond its edges without repeating the edge pixel
    (scipy's ``"mirror"`` is numpy's ``"reflect"``), as prediction's tiles do
    (:func:`napari_unet.data.reflect_indices`) and the paper's overlap-tile does. For
    labels use ``mode="constant"`` with ``cval`` the ignore value.
    """
    dtype = output_dtype or array.dtype
    if array.ndim == 2:
        return ndi.map_coordinates(array, coords, order=order, mode=mode, cval=cval, prefilter=False,
                                   output=dtype)
    return np.stack([ndi.map_coordinates(a, coords, order=order, mode=mode, cval=cval, prefilter=False,
                                         output=dtype) for a in array])


def augment_intensity(patch: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """Random gamma, contrast, brightness and Gaussian noise on a normalised patch (float32, in place)."""
    g = rng.uniform(*config.gamma)
    if g != 1.0:
        # Sign-preserving power: normalised images have values below 0 and above 1.
        np.copysign(np.abs(patch) ** g, patch, out=patch)
    patch *= rng.uniform(*config.contrast)
    patch += rng.uniform(*config.brightness)
    if config.noise > 0:
        sd = rng.uniform(0, config.noise)
        patch += rng.normal(0.0, sd, size=patch.shape).astype(np.float32)
    return patch
