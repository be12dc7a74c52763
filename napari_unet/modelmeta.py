"""What a napari-unet model's metadata holds and may hold (no torch): defaults and checks.

Shared by the model file reader (:mod:`napari_unet.io`) and the bioimage.io package reader,
so that both refuse the same unusable values with the same one-line messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFileError

__all__ = ["default_metadata", "check_metadata", "weights_mismatch"]


def default_metadata() -> dict[str, Any]:
    """Metadata keys every model file has, with their defaults."""
    return {
        "normalization": {"method": "percentile", "low": 1.0, "high": 99.8},
        "mode": "semantic",
        "class_names": None,
        "training": {},
    }


def check_metadata(meta: dict[str, Any], path: Path) -> None:
    """Refuse metadata that prediction would trip over later (with a vaguer message, or a traceback)."""
    if not isinstance(meta.get("model"), dict):
        raise ModelFileError(f"{path}: the file has no model architecture")
    mode = meta.get("mode", "semantic")
    if mode not in ("instances", "semantic"):
        raise ModelFileError(f"{path}: unknown label mode {str(mode)[:40]!r} in the file "
                             "(expected 'instances' or 'semantic')")
    norm = meta.get("normalization")
    if norm is not None:
        ok = isinstance(norm, dict) and norm.get("method", "percentile") == "percentile"
        if ok:
            low, high = norm.get("low", 1.0), norm.get("high", 99.8)
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) \
                and 0.0 <= low < high <= 100.0
        if not ok:
            raise ModelFileError(f"{path}: unusable normalisation settings in the file ({str(norm)[:60]}); "
                                 "expected percentiles 0 <= low < high <= 100")
    area = meta.get("object_area")
    if area is not None and not (isinstance(area, (int, float)) and not isinstance(area, bool)
                                 and np.isfinite(area) and area > 0):
        raise ModelFileError(f"{path}: object_area in the file must be a positive number of pixels, "
                             f"got {str(area)[:40]}")
    scale = meta.get("scale")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and np.isfinite(scale) and 0.05 <= scale <= 20):
        raise ModelFileError(f"{path}: scale in the file must be a factor between 0.05 and 20, got {str(scale)[:40]}")
    shift = meta.get("output_bias_shift")
    if shift is not None and not (
            isinstance(shift, list) and len(shift) == meta["model"].get("n_classes")
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in shift)):
        raise ModelFileError(f"{path}: output_bias_shift in the file must be one number per class, "
                             f"got {str(shift)[:40]}")
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ModelFileError(f"{path}: class_names in the file must be a list of names")


def weights_mismatch(expected: dict[str, tuple], stored: dict[str, tuple]) -> str | None:
    """How tensor shapes ``stored`` (name -> shape) differ from what an architecture ``expected``, or ``None``."""
    if stored == expected:
        return None
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(stored) & set(expected) if stored[k] != expected[k])
    return (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
            f"{wrong[0]} has shape {list(stored[wrong[0]])}, the architecture needs {list(expected[wrong[0]])}")
