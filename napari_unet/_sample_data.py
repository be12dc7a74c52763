"""npe2 sample data: synthetic nuclei with a few painted cells (no Qt needed)."""

from __future__ import annotations


def cells_sample():
    """A nuclei image and labels painted in the plugin's convention (0 unlabelled, 1 background, 2.. cells)."""
    from .synthetic import make_nuclei, paint_sparse_labels

    image, truth = make_nuclei((384, 384), seed=7)
    labels = paint_sparse_labels(truth, n_cells=5, seed=7)
    return [
        (image, {"name": "nuclei"}, "image"),
        (labels, {"name": "painted labels", "opacity": 0.6}, "labels"),
    ]
