"""Make the plugin's packaged sample model: ``napari_unet/_data/cells_unet.safetensors``.

A small instance-segmentation U-Net (the engine's default: depth 4, 8 base filters, padded
convolutions, batch norm; 0.12 M parameters, 0.5 MB) trained, fully labelled (every object
and all background), on 64 images of synthetic nuclei of varied size, density, brightness,
blur and noise (:func:`napari_unet.synthetic.make_varied_nuclei`), 64 of synthetic whole
cells (:func:`napari_unet.synthetic.make_varied_cells`) and, with ``--data DIR``, the real
annotated images of a folder laid out like ``../shared/pretrain/`` (``manifest.csv``,
``<dataset>/images/<stem>.png``, ``<dataset>/masks/<stem>.tif`` instance labels): colour
images as grey (the model takes one channel; training and prediction convert RGB alike).
One real image per group (the stem's prefix before ``_``) is held out and scored. Never
give it an image a benchmark scores. The shipped model was made with ``--data
../shared/pretrain`` (see sample_data/README.md for the sources and licences).

It lets "Segment with U-Net" work before any training, and Train U-Net fine-tunes it by
default for instances (``napari-unet train --from sample``; ``train()`` and the command
line start from a new network unless told). The sample *images* are not stored:
napari_unet._sample_data makes them on the fly with the same generator (seeded).

Run it with ``make sample-data DATA=../shared/pretrain`` or ``.venv/bin/python
sample_data/make_sample_data.py [--data DIR] [--iterations 20000] [--seconds S] [--cells 64]
[--out PATH] [--width W] [--depth D] [--val-every 1000]``. With ``--data`` it trains a fixed
20000 steps (the shipped file: 47 minutes on a 2-core Xeon with AMX, in bf16), so that the
recipe does not depend on the machine's speed; ``--seconds`` gives a time budget instead.
It prints the held-out average precision it reaches on the sample's kind of image, on
varied nuclei, on whole cells and on the held-out real images, and stores them in the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "napari_unet" / "_data" / "cells_unet.safetensors"
TRAIN_SEEDS = range(1000, 1064)  # not the seeds of the sample image (7) nor of the stack (100..103)
CELL_SEEDS = range(5000, 5064)  # whole-cell images (make_varied_cells)
TEST_SEED = 2000
VARIED_TEST_SEEDS = range(3000, 3008)
CELL_TEST_SEEDS = range(6000, 6008)


def _average_precision(truth: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> float:
    """Matched objects at IoU >= threshold: TP / (TP + FP + FN) (the usual instance AP at one threshold)."""
    from skimage.metrics import contingency_table

    table = contingency_table(truth, pred).toarray().astype(float)
    sizes_t, sizes_p = table.sum(axis=1), table.sum(axis=0)
    inter = table[1:, 1:]
    union = sizes_t[1:, None] + sizes_p[None, 1:] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    tp = int((iou > threshold).sum())  # IoU > 0.5 matches are unique
    fp, fn = iou.shape[1] - tp, iou.shape[0] - tp
    return tp / max(tp + fp + fn, 1)


def _held_out_aps(result, make, seeds) -> list[float]:
    """AP@0.5 of the trained model on one 320x320 image ``make(seed=...)`` per held-out seed."""
    from napari_unet.config import PredictConfig
    from napari_unet.inference import predict_all

    aps = []
    for seed in seeds:
        image, truth = make((320, 320), seed=seed)
        pred = predict_all(result.model, image, PredictConfig(output="instances"), result.metadata)
        aps.append(_average_precision(truth, pred.labels))
    return aps


Pair = tuple[str, np.ndarray, np.ndarray]  # (stem, image, instance labels)


def load_real(folder: Path) -> tuple[list[Pair], list[Pair]]:
    """``(train, held_out)`` lists of ``(stem, image, instances)`` from a pretraining folder.

    Colour images become grey (:func:`napari_unet.data.to_grey`); the first image of each
    group (stem prefix before the first ``_``, e.g. ``fluo-small``, ``he``, ``usiigaci``)
    is held out.
    """
    import csv

    import imageio.v3 as iio
    import tifffile

    from napari_unet.data import to_grey

    train, held, groups = [], [], set()
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{folder / 'manifest.csv'} lists no images")
    for row in rows:
        image = np.asarray(iio.imread(folder / row["image"]))
        if image.ndim == 3:
            image = to_grey(image)[..., 0]
        masks = np.asarray(tifffile.imread(folder / row["mask"])).astype(np.int32)
        stem = Path(row["image"]).stem
        group = stem.split("_")[0].rstrip("0123456789") if "_" in stem else stem.rstrip("0123456789")
        (train if group in groups else held).append((stem, image, masks))
        groups.add(group)
    return train, held


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the step count or time budget resolved (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None,
                        help="a training time budget; with --iterations too, the first reached ends training "
                             "(default without --data and --iterations: 2400)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"model file to write (default {OUT})")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of real annotated images to pretrain on too (like ../shared/pretrain)")
    parser.add_argument("--cells", type=int, default=len(CELL_SEEDS),
                        help=f"whole-cell images added to the {len(TRAIN_SEEDS)} nuclei images "
                             f"(default and most: {len(CELL_SEEDS)})")
    parser.add_argument("--iterations", type=int, default=None,
                        help="a fixed number of steps (default with --data and without --seconds: 20000, "
                             "the shipped model's)")
    parser.add_argument("--val-every", type=int, default=1000,
                        help="with --data: validate every this many steps (default 1000; each takes about 10 s)")
    parser.add_argument("--width", type=int, default=None,
                        help="base filters of the network (default: the engine's default network's)")
    parser.add_argument("--depth", type=int, default=None,
                        help="levels of the network (default: the engine's default network's)")
    args = parser.parse_args(argv)
    for name in ("seconds", "iterations", "val_every", "width", "depth"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0 <= args.cells <= len(CELL_SEEDS):
        parser.error(f"--cells must be from 0 to {len(CELL_SEEDS)}, got {args.cells}")
    if args.data is not None and args.seconds is None and args.iterations is None:
        args.iterations = 20000
    if args.seconds is None and args.iterations is None:
        args.seconds = 2400.0
    if args.data is not None and not (args.data / "manifest.csv").is_file():
        parser.error(f"--data: {args.data} has no manifest.csv (a folder laid out like ../shared/pretrain)")
    return args


def training_config(args: argparse.Namespace, n_real: int):
    """The :class:`~napari_unet.config.TrainConfig` of a run: ``--iterations`` steps and/or the
    ``--seconds`` budget (the first reached ends it); with real images also rare validation and a
    cosine schedule."""
    from napari_unet.config import TrainConfig

    if n_real:  # thousands of objects: hold few out, validate rarely (validating is costly)
        return TrainConfig(mode="instances", max_time=args.seconds,
                           iterations=args.iterations, seed=0, val_every=args.val_every, val_fraction=0.02,
                           lr_schedule="cosine")
    # Validation every 50 steps: with 64 images, validating every 10 took most of the time.
    # ema=0: the settings the synthetic-only file was made with (before weight averaging was the default).
    return TrainConfig(mode="instances", max_time=args.seconds,
                       iterations=args.iterations, seed=0, val_every=50, ema=0.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from napari_unet.config import PredictConfig, default_model_config
    from napari_unet.inference import predict_all
    from napari_unet.io import save_model
    from napari_unet.synthetic import make_nuclei, make_varied_cells, make_varied_nuclei
    from napari_unet.training import train

    images, labels = [], []
    made = [make_varied_nuclei((320, 320), seed=seed) for seed in TRAIN_SEEDS]
    made += [make_varied_cells((320, 320), seed=seed) for seed in CELL_SEEDS[: args.cells]]
    real, held = load_real(args.data) if args.data else ([], [])
    made += [(image, truth) for _, image, truth in real]
    for image, truth in made:
        images.append(image)
        labels.append(np.where(truth > 0, truth + 1, 1).astype(np.uint16))  # fully painted: 1 bg, 2.. cells
    print(f"{len(made)} training images ({len(real)} real), {len(held)} real ones held out", flush=True)
    config = training_config(args, len(real))
    arch = default_model_config()
    arch = dataclasses.replace(arch, base_filters=args.width or arch.base_filters, depth=args.depth or arch.depth)
    t0 = time.perf_counter()
    from napari_unet.jobs import drain

    def report(ev):
        if ev.iteration % 50 == 0 and ev.loss is not None:
            print(f"iteration {ev.iteration:5d}  loss {ev.loss:.3f}  best val IoU {ev.best_val_iou}  "
                  f"{ev.elapsed:.0f} s", flush=True)

    result = drain(train(images, labels, config, model_config=arch), report)
    source = "sample_data/make_sample_data.py (synthetic nuclei and whole cells" + (
        f"; {len(real)} real images of {args.data.name}: DSB2018 stage 1 (CC0), Usiigaci (MIT))" if real else ")")
    result.metadata.setdefault("training", {})["source"] = source
    image, truth = make_nuclei((384, 384), seed=TEST_SEED)
    pred = predict_all(result.model, image, PredictConfig(output="instances"), result.metadata)
    ap = _average_precision(truth, pred.labels)
    result.metadata["training"]["test_ap50"] = round(ap, 3)
    varied = _held_out_aps(result, make_varied_nuclei, VARIED_TEST_SEEDS)
    result.metadata["training"]["test_ap50_varied"] = round(float(np.mean(varied)), 3)
    cells = _held_out_aps(result, make_varied_cells, CELL_TEST_SEEDS)
    result.metadata["training"]["test_ap50_cells"] = round(float(np.mean(cells)), 3)
    real_aps = {}
    for stem, image, truth in held:
        pred = predict_all(result.model, image, PredictConfig(output="instances"), result.metadata)
        real_aps[stem] = round(_average_precision(truth, pred.labels), 3)
    if real_aps:
        result.metadata["training"]["test_ap50_real"] = real_aps
        print("held-out real images, AP@0.5: " + ", ".join(f"{k} {v:.3f}" for k, v in real_aps.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_model(args.out, result.model, result.metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) after {time.perf_counter() - t0:.0f} s; "
          f"AP@0.5 on a held-out synthetic image: {ap:.3f} ({truth.max()} nuclei, {pred.labels.max()} found); "
          f"on {len(varied)} held-out varied images: {np.mean(varied):.3f} (min {np.min(varied):.3f}); "
          f"on {len(cells)} held-out whole-cell images: {np.mean(cells):.3f} (min {np.min(cells):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
