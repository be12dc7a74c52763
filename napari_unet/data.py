"""Images and painted labels -> training data: normalisation, targets, patches, augmentation.

No Qt, no napari. Normalisation is shared with inference: the model file stores the
parameters used in training (``metadata["normalization"]``) and prediction reuses them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["normalize", "normalize_like"]


def normalize(image: np.ndarray, low: float = 1.0, high: float = 99.8, channel_axis: int | None = None,
              eps: float = 1e-6) -> np.ndarray:
    """Percentile normalisation to float32: the ``low`` percentile -> 0, ``high`` -> 1.

    Per channel when ``channel_axis`` is given. NaN and Inf are ignored for the
    percentiles and set to 0 afterwards; a constant image maps to zeros.
    """
    x = np.asarray(image, dtype=np.float32)
    if channel_axis is not None:
        x = np.moveaxis(x, channel_axis, -1)
        out = np.stack([normalize(x[..., c], low, high, None, eps) for c in range(x.shape[-1])], axis=-1)
        return np.moveaxis(out, -1, channel_axis)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros_like(x)
    vals = x[finite] if not finite.all() else x
    lo, hi = np.percentile(vals, [low, high])
    out = (x - lo) / max(float(hi - lo), eps)
    out[~finite] = 0.0
    return out.astype(np.float32, copy=False)


def normalize_like(image: np.ndarray, params: dict[str, Any] | None, channel_axis: int | None = None) -> np.ndarray:
    """Normalise ``image`` as described by a model file's ``metadata["normalization"]``."""
    params = params or {}
    method = params.get("method", "percentile")
    if method != "percentile":
        raise ValueError(f"unknown normalisation method {method!r} in the model file")
    return normalize(image, float(params.get("low", 1.0)), float(params.get("high", 99.8)), channel_axis)
