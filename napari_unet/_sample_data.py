"""npe2 sample data: synthetic nuclei with a few painted cells, and the packaged model (no Qt needed).

The images are generated on the fly by :mod:`napari_unet.synthetic` (seeded, so the same
every time); only the small pretrained model is stored in the package, as
``napari_unet/_data/cells_unet.safetensors`` (made by ``sample_data/make_sample_data.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["cells_sample", "stack_sample", "SAMPLE_MODEL_PATH", "sample_model_path"]

#: The small model shipped in the package, pretrained on real and synthetic nuclei and cells (instances, 1 channel in).
SAMPLE_MODEL_PATH = Path(__file__).resolve().parent / "_data" / "cells_unet.safetensors"


def sample_model_path() -> Path | None:
    """The packaged pretrained model, or ``None`` if this installation lacks it."""
    return SAMPLE_MODEL_PATH if SAMPLE_MODEL_PATH.is_file() else None


def cells_sample():
    """A nuclei image and labels painted in the plugin's convention (0 unlabelled, 1 background, 2.. cells).

    Returns napari layer data tuples: the image ``"nuclei"`` (uint16, 384 x 384) and the
    Labels layer ``"painted labels"`` (5 whole nuclei painted 2..6, background strokes and
    rings painted 1, the rest 0).
    """
    from .synthetic import make_nuclei, paint_sparse_labels

    image, truth = make_nuclei((384, 384), seed=7)
    labels = paint_sparse_labels(truth, n_cells=5, seed=7)
    return [
        (image, {"name": "nuclei"}, "image"),
        (labels, {"name": "painted labels", "opacity": 0.6}, "labels"),
    ]


def stack_sample():
    """A small time series of nuclei images (4 x 256 x 256, uint16), to try stack segmentation."""
    from .synthetic import make_nuclei

    frames = [make_nuclei((256, 256), seed=100 + t)[0] for t in range(4)]
    return [(np.stack(frames), {"name": "nuclei stack", "axis_labels": ("t", "y", "x")}, "image")]


def volume_sample():
    """A synthetic 3D volume of touching nuclei (24 x 192 x 192 uint16, Z step 3 pixels), to try 3D segmentation."""
    from .synthetic import make_nuclei_3d

    image, _ = make_nuclei_3d((24, 192, 192), (3.0, 1.0, 1.0), seed=11)
    return [(image, {"name": "nuclei volume", "scale": (3.0, 1.0, 1.0), "axis_labels": ("z", "y", "x")}, "image")]
