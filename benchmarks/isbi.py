"""The U-Net paper's own task: ISBI 2012 EM membranes, fully labelled, scored with the paper's measures.

Train on slices 0-19 of ``isbi2012_em`` (a folder laid out like ``../shared/data/``: binary
masks, 255 = cell interior, 0 = membrane) with every pixel labelled (semantic mode: 1 =
membrane, 2 = cell, as in the paper's two-class setting), for ``--max-time`` seconds of CPU
(default 20 minutes), then predict slices 20-29 and score them with

- **pixel error**: 1 - the maximal F-score of pixel similarity (cell vs membrane) over the
  thresholds 0.05, 0.10, ..., 0.95 of the cell probability, ISBI 2012's definition;
- **Rand error**: 1 - the maximal foreground-restricted Rand F-score over the same thresholds,
  ISBI 2012's "Rand error" (:func:`skimage.metrics.adapted_rand_error`, the reference
  segments being the 4-connected cell regions, membrane pixels excluded);

and the plain fraction of misclassified pixels at 0.5. The paper reports 0.0611 pixel error and
0.0382 Rand error on the challenge's hidden test slices (the labels of 30 other slices of the
same stack); the slices here are the challenge's training slices split 20/10, so the numbers
are comparable in kind, not equal in test set.

Usage::

    .venv/bin/python benchmarks/isbi.py --data ../shared/data                 # 20 min training
    .venv/bin/python benchmarks/isbi.py --data ../shared/data --max-time 60 --width 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


def load_slices(folder: Path, indices) -> tuple[np.ndarray, np.ndarray]:
    """``(images, cell masks)`` of the named slices, ``(N, 512, 512)`` uint8 and bool."""
    from skimage.io import imread

    images = np.stack([imread(folder / "isbi2012_em" / "images" / f"slice_{i:02d}.png") for i in indices])
    masks = np.stack([imread(folder / "isbi2012_em" / "masks" / f"slice_{i:02d}.png") > 127 for i in indices])
    return images, masks


def pixel_error(cell_prob: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """``(1 - max F-score of cell pixels over thresholds, its threshold)``."""
    best = (-1.0, 0.5)
    for t in THRESHOLDS:
        pred = cell_prob >= t
        tp = float((pred & truth).sum())
        f = 2 * tp / max(float(pred.sum() + truth.sum()), 1.0)
        best = max(best, (f, float(t)))
    return 1.0 - best[0], best[1]


def rand_error(cell_prob: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """``(1 - max foreground-restricted Rand F-score over thresholds, its threshold)``."""
    from scipy import ndimage as ndi
    from skimage.metrics import adapted_rand_error

    four = ndi.generate_binary_structure(2, 1)
    ref = ndi.label(truth, structure=four)[0]
    best = (np.inf, 0.5)
    for t in THRESHOLDS:
        seg = ndi.label(cell_prob >= t, structure=four)[0]
        err = float(adapted_rand_error(ref, seg)[0])
        best = min(best, (err, float(t)))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder laid out like ../shared/data")
    ap.add_argument("--max-time", type=float, default=1200.0, help="training seconds (default 1200)")
    ap.add_argument("--init", default="new", help="new (default), sample, or a model file to fine-tune")
    ap.add_argument("--width", type=int, default=16, help="base filters of a new network (default 16)")
    ap.add_argument("--depth", type=int, default=4, help="depth of a new network (default 4)")
    ap.add_argument("--padding", choices=("same", "valid"), default="same")
    ap.add_argument("--patch-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, default=None, help="also write the trained model here")
    args = ap.parse_args(argv)
    if not (args.data / "isbi2012_em" / "images" / "slice_29.png").is_file():
        ap.error(f"--data: {args.data} has no isbi2012_em/images/slice_00..29.png")

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fewshot import _cpu_name, _drained

    from napari_unet._sample_data import SAMPLE_MODEL_PATH
    from napari_unet.config import ModelConfig, PredictConfig, TrainConfig
    from napari_unet.inference import predict_all
    from napari_unet.training import train

    train_x, train_y = load_slices(args.data, range(20))
    test_x, test_y = load_slices(args.data, range(20, 30))
    labels = np.where(train_y, 2, 1).astype(np.uint8)  # every pixel painted: 1 membrane, 2 cell
    kw = dict(mode="semantic", max_time=args.max_time, seed=args.seed)
    if args.patch_size:
        kw["patch_size"] = args.patch_size
    cfg = TrainConfig(**kw)
    init = {"new": None, "sample": SAMPLE_MODEL_PATH}.get(args.init, args.init)
    mc = ModelConfig(depth=args.depth, base_filters=args.width, padding=args.padding, batch_norm=True)
    print(f"# ISBI 2012, train slices 0-19 (full labels), test 20-29; {args.max_time:.0f} s, init {args.init}"
          + (f", new network width {args.width} depth {args.depth} {args.padding}" if init is None else "")
          + f"; torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {_cpu_name()}",
          flush=True)
    t0 = time.perf_counter()
    result = _drained(train(list(train_x), list(labels), cfg, model_config=mc, init_from=init))
    t_train = time.perf_counter() - t0
    meta = result.metadata
    info = meta["training"]
    print(f"trained {info['iterations']} steps in {info['elapsed']:.0f} s ({info['precision']}), best validation "
          f"IoU {info['best_val_iou']}", flush=True)
    if args.save:
        from napari_unet.io import save_model

        save_model(args.save, result.model, meta)
    rows = []
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(zip(test_x, test_y)):
        probs = predict_all(result.model, x, PredictConfig(output="semantic", probabilities=True), meta).probabilities
        cell = probs[1]
        pe, pt = pixel_error(cell, y)
        re, rt = rand_error(cell, y)
        wrong = float(((cell >= 0.5) != y).mean())
        rows.append((pe, re, wrong))
        print(f"  slice {20 + i}: pixel error {pe:.4f} (threshold {pt:.2f}), Rand error {re:.4f} (threshold {rt:.2f}), "
              f"misclassified at 0.5 {wrong:.4f}", flush=True)
    t_pred = time.perf_counter() - t0
    pe, re, wrong = np.mean(rows, axis=0)
    print()
    print("| measure | this run (slices 20-29) | U-Net paper (challenge test set) |")
    print("|---|---|---|")
    print(f"| pixel error | {pe:.4f} | 0.0611 |")
    print(f"| Rand error | {re:.4f} | 0.0382 |")
    print(f"| misclassified pixels at 0.5 | {wrong:.4f} | - |")
    print(f"\ntraining {t_train:.0f} s ({info['iterations']} steps), prediction of 10 slices {t_pred:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
