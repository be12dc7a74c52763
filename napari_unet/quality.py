"""Does a trained network agree with what the user painted? (No Qt, no napari.)

A few painted cells and a minute of training can end in a network that misses most cells,
and the user should hear it rather than find out cell by cell. After training, the
painted planes are segmented as prediction would segment them, and each painted cell is
looked for in the result (matched at IoU > 0.5). A network that recovers fewer than half
of the cells that were painted (those held out for validation included) will not do better
on the cells nobody painted: that is reported (:func:`painted_check`).

Where to paint next: :func:`uncertainty` turns class probabilities into a map of how unsure
the network is, and :func:`where_to_paint` picks the places where a minute of painting
should help most (the most unsure cell-sized neighbourhoods not painted yet).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

__all__ = ["match_objects", "PaintedCheck", "painted_check", "uncertainty", "where_to_paint", "Suggestion",
           "PaintNext", "paint_next"]

#: Below this fraction of painted cells recovered, the check warns.
MIN_RECOVERED = 0.5


def match_objects(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Best IoU of each object of ``truth`` (ids ``1..``, in ``np.unique`` order) with an object of ``pred``.

    Above IoU 0.5 a match is one-to-one (two objects cannot both overlap more than half of
    a third), so counting ``iou > 0.5`` counts matched pairs.
    """
    from skimage.metrics import contingency_table

    t_ids, t = np.unique(truth, return_inverse=True)
    p_ids, p = np.unique(pred, return_inverse=True)
    table = contingency_table(t.reshape(truth.shape), p.reshape(pred.shape)).toarray().astype(np.float64)
    t_area, p_area = table.sum(axis=1), table.sum(axis=0)
    keep_t, keep_p = t_ids != 0, p_ids != 0
    inter = table[keep_t][:, keep_p]
    if inter.size == 0:
        return np.zeros(int(keep_t.sum()))
    iou = inter / (t_area[keep_t, None] + p_area[None, keep_p] - inter)
    return iou.max(axis=1)


@dataclass
class PaintedCheck:
    """How a trained network segments the planes it was trained on.

    Attributes
    ----------
    painted : int
        Painted cells (labels >= 2) on the checked planes.
    recovered : int
        Of those, the ones the network's segmentation matches at IoU > 0.5.
    on_background : int
        Predicted objects lying mostly (> half their area) on painted background.
    """

    painted: int
    recovered: int
    on_background: int

    @property
    def ok(self) -> bool:
        return self.painted == 0 or self.recovered >= MIN_RECOVERED * self.painted

    def message(self) -> str:
        """One line for the user: always the counts, and what to do when the check fails."""
        text = (f"check on the painted cells: {self.recovered} of {self.painted} found again (IoU > 0.5), "
                f"{self.on_background} object(s) on painted background")
        if not self.ok:
            text += ("; the model does not reproduce what you painted, so its result elsewhere will be poor: "
                     "paint more cells, and background where it errs, and train again")
        return text

    def to_dict(self) -> dict:
        return {"painted": self.painted, "recovered": self.recovered, "on_background": self.on_background}


def painted_check(model, metadata: dict, planes, max_planes: int = 4, device: str = "auto") -> PaintedCheck:
    """Segment painted planes with ``model`` and compare with the painting.

    Parameters
    ----------
    model : napari_unet.model.UNet
        The trained network (instance mode).
    metadata : dict
        Its metadata (normalisation, smallest cell size).
    planes : iterable of (image, painted)
        ``image`` ``(C, Y, X)``, the whole plane, raw or normalised (prediction normalises
        each plane by its percentiles, which leaves a normalised 2D image as it is; a plane
        of a stack normalised as a whole is judged as Segment would see that plane alone);
        ``painted`` ``(Y, X)``: 0 unlabelled, 1 background, 2.. cells.
    max_planes : int
        Only the planes with the most painted cells are segmented (it costs a prediction
        each); the counts are those of these planes.
    device : str
        Where to segment (the training's device).
    """
    from .config import PredictConfig
    from .inference import predict_all

    planes = [(im, lab) for im, lab in planes if (lab >= 2).any()]
    planes.sort(key=lambda p: -len(np.unique(p[1][p[1] >= 2])))
    painted = recovered = on_background = 0
    for image, lab in planes[:max_planes]:
        image = image[0] if image.shape[0] == 1 else image
        axis = None if image.ndim == 2 else 0
        # torch: the check must not convert each freshly trained network for OpenVINO
        config = PredictConfig(output="instances", channel_axis=axis, device=device, backend="torch")
        pred = predict_all(model, image, config, metadata).labels
        cells = np.where(lab >= 2, lab, 0)
        best = match_objects(cells, pred)
        painted += len(best)
        recovered += int((best > 0.5).sum())
        ids, area = np.unique(pred[pred > 0], return_counts=True)
        on_bg = np.bincount(pred[lab == 1].ravel(), minlength=int(pred.max()) + 1)[ids]
        on_background += int((on_bg > 0.5 * area).sum())
    return PaintedCheck(painted=painted, recovered=recovered, on_background=on_background)


# ---- where to paint next ------------------------------------------------------------------------

def uncertainty(probabilities: np.ndarray, axis: int = 0) -> np.ndarray:
    """How unsure the network is at each pixel: the entropy of its class probabilities,
    divided by its largest value (``log`` of the class count), so 0 = certain, 1 = all
    classes equally likely. ``probabilities`` has the classes on ``axis``."""
    from scipy.stats import entropy

    p = np.asarray(probabilities, dtype=np.float32)
    n = p.shape[axis]
    if n < 2:
        return np.zeros(np.delete(p.shape, axis), np.float32)
    h = np.nan_to_num(entropy(p, axis=axis) / np.log(n))  # all-zero probabilities (unsegmented planes): 0
    return np.clip(h, 0.0, 1.0).astype(np.float32)


#: paint_next leaves the predicted outlines out of the uncertainty averages (see where_to_paint);
#: chosen with benchmarks/fewshot.py --suggest, which scores both.
OUTLINES_MASKED = False


@dataclass
class Suggestion:
    """A place to paint next: ``centre`` ``(y, x)`` in the plane's pixels, ``score`` the mean
    uncertainty of the cell-sized window around it."""

    centre: tuple[int, int]
    score: float


def where_to_paint(uncertain: np.ndarray, cell_area: float | None = None, n: int = 5,
                   painted: np.ndarray | None = None, labels: np.ndarray | None = None) -> list[Suggestion]:
    """The ``n`` places most worth painting next, most unsure first.

    Every cell outline is a little unsure (the classes change there), so single pixels say
    little; a window of about one cell (``cell_area``, px; 300 if unknown) averages the map,
    and the highest local means at least a cell apart are the suggestions: cells the network
    hesitates to split, merge, find or shape. With ``labels`` (the segmentation the map
    came with), the 2 px band along the predicted outlines is left out of the averages, so
    that doubt inside a cell (a merge) or in the background (a missed cell) counts, not the
    outlines every cell has. Places already painted (``painted`` > 0 over most of the
    window) are left out: the user has said what is there; so is a band of half a cell along
    the image border (cells cut by the border).
    """
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max

    u = np.asarray(uncertain, dtype=np.float32)
    if labels is not None and np.shape(labels) == u.shape:
        from skimage.segmentation import find_boundaries

        band = ndi.binary_dilation(find_boundaries(np.asarray(labels), mode="thick"))
        u = np.where(band, 0.0, u).astype(np.float32)
    diameter = 2.0 * np.sqrt(float(cell_area or 300.0) / np.pi)
    size = max(3, int(round(diameter)))
    mean = ndi.uniform_filter(u, size=size, mode="reflect")
    if painted is not None:
        on = np.asarray(painted) > 0
        covered = ndi.uniform_filter(on.astype(np.float32), size=size, mode="reflect")
        mean = np.where((covered > 0.5) | on, 0.0, mean)
    # Not within half a cell of the image border: cells cut by the border are unsure for want
    # of context, and painting half a cell teaches little.
    border = max(1, size // 2) if min(u.shape) > 2 * size else False
    peaks = peak_local_max(mean, min_distance=max(1, size // 2), threshold_abs=1e-3, exclude_border=border,
                           num_peaks=n)
    found = [Suggestion(centre=(int(y), int(x)), score=float(mean[y, x])) for y, x in peaks]
    return sorted(found, key=lambda s: -s.score)


@dataclass
class PaintNext:
    """What :func:`paint_next` found: the uncertainty map ``(Y, X)`` (0 certain .. 1), the
    places to paint next (most unsure first) and the segmentation they were judged on."""

    uncertainty: np.ndarray
    places: list[Suggestion]
    labels: np.ndarray


def paint_next(model, image: np.ndarray, metadata: dict | None, painted: np.ndarray | None = None, n: int = 5,
               config=None):
    """Segment one plane and say where painting would help most: a generator of
    :class:`napari_unet.inference.PredictProgress` (stoppable at every tile) returning a
    :class:`PaintNext`.

    ``image`` is one plane (``(Y, X)``, or with channels as :func:`napari_unet.inference.predict`
    takes them); ``painted`` the plane's painted labels (places already painted are not
    suggested); ``config`` a :class:`~napari_unet.config.PredictConfig` for the device,
    precision and channel axis (probabilities are always computed).
    """
    import dataclasses

    from .config import PredictConfig
    from .inference import predict

    if isinstance(model, (str, os.PathLike)):
        from .io import load_model

        model, file_meta = load_model(model)
        metadata = file_meta if metadata is None else metadata
    cfg = dataclasses.replace(config or PredictConfig(), probabilities=True)
    pred = yield from predict(model, image, cfg, metadata)
    if pred.probabilities.ndim != 3:
        raise ValueError(f"where to paint next works on one plane; the image has {pred.labels.ndim} dimensions")
    meta = metadata or {}
    area = meta.get("object_area")
    scale = float(cfg.scale if cfg.scale is not None else (meta.get("scale") or 1.0))
    cell_area = float(area) / scale ** 2 if area else None
    u = uncertainty(pred.probabilities)
    if painted is not None and np.shape(painted) != u.shape:
        painted = None
    return PaintNext(uncertainty=u, places=where_to_paint(u, cell_area, n, painted, labels=pred.labels if
                                                          OUTLINES_MASKED else None), labels=pred.labels)
