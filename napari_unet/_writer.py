"""npe2 writer: a Labels layer to an ImageJ-compatible ``.tif`` / ``.tiff`` (File > Save Selected Layers).

Uses the same TIFF code as the command line and the Export widget
(:func:`napari_unet.io.write_labels_tiff`): labels dtype kept (or the smallest of
uint8/uint16 holding the values), axes and pixel size stored, written atomically.
No Qt import.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["write_labels", "axes_letters"]


def axes_letters(ndim: int, axis_labels=None) -> str:
    """ImageJ axis letters for labels of ``ndim`` dimensions: napari's axis labels when they are
    t/z/c/y/x letters ending in y, x; else ``YX``, ``ZYX``, ``TZYX``, ``TZCYX``."""
    if axis_labels and len(axis_labels) == ndim:
        letters = "".join(str(a).strip().upper()[:1] for a in axis_labels)
        if set(letters) <= set("TZCYX") and len(set(letters)) == ndim and letters.endswith("YX"):
            return letters
    axes = {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TZCYX"}.get(ndim)
    if axes is None:
        raise ValueError(f"cannot write labels with {ndim} dimensions to TIFF (2 to 5 are supported)")
    return axes


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer's data to ``path`` (napari has already asked about overwriting).

    Parameters
    ----------
    path : str
        Target ``.tif`` / ``.tiff`` file.
    data : array-like
        The layer's data (the first level of a multiscale layer).
    meta : dict
        The layer's attributes as napari passes them (``scale``, ``axis_labels``, ...).

    Returns
    -------
    list of str
        The path written.
    """
    from .io import write_labels_tiff

    if isinstance(data, list | tuple):  # multiscale: the full-resolution level
        data = data[0]
    labels = np.asarray(data)
    axes = axes_letters(labels.ndim, meta.get("axis_labels"))
    scale = {}
    layer_scale = meta.get("scale")
    if layer_scale is not None and len(layer_scale) == labels.ndim:
        scale = {a: float(s) for a, s in zip(axes, layer_scale) if a in "ZYX"}
        if all(abs(v - 1.0) < 1e-12 for v in scale.values()):
            scale = {}
    write_labels_tiff(path, labels, axes=axes, scale=scale, overwrite=True)
    return [str(path)]
