"""3D stacks: plane-wise stitching against the 3D watershed against orthogonal views.

Run from the repository root::

    .venv/bin/python benchmarks/volumes.py                       # quality table, about 10 minutes on 2 cores
    .venv/bin/python benchmarks/volumes.py --parts big           # time and peak memory on 64 x 1024 x 1024
    .venv/bin/python benchmarks/volumes.py --parts quality,big --out volumes.md

``quality``: synthetic volumes of touching ellipsoidal nuclei (:func:`napari_unet.synthetic.
make_nuclei_3d`), isotropic (cubic voxels) and anisotropic (a Z step of 3 pixels, as
confocal stacks usually have), ``--seeds`` volumes of each. Every volume is segmented, in
one run and with the same network, by the three ``PredictConfig.volume`` methods:

* ``stitch``: 2D objects per plane, linked to the plane above by IoU >= 0.25 (the simple
  baseline, cellpose's ``stitch_threshold``);
* ``3d``: the YX planes' probabilities, then seeds and watershed in 3D (the default);
* ``orthogonal``: also the ZX and ZY planes of the volume resampled to cubic voxels, the
  three averaged (cellpose's 2.5D), then 3D;

``3d`` and ``orthogonal`` with each ``--smoothing`` (the Gaussian over the volume's
probabilities before the 3D steps, ``PredictConfig.volume_smoothing``; default 1 and 0).

Networks: the packaged model as it is (no painting), and the packaged model fine-tuned for
``--train`` seconds (default 60) on one painted training volume (its own seed: five nuclei
painted on the 3 planes through their middle, with background around), without and with
``side_views``. Reported: 3D AP@0.5 (one-to-one matching of 3D objects, TP / (TP + FP +
FN)), mean and sd over the volumes, the worst volume, seconds per volume, and the peak of
numpy's memory per method (tracemalloc: the arrays, not torch's tile buffers).

``big``: a 64 x 1024 x 1024 uint16 volume (a 64 x 256 x 256 synthetic volume tiled 4 x 4),
each method in a fresh subprocess with the packaged model: wall time and peak resident
memory of the whole process (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np

METHODS = ("stitch", "3d", "orthogonal")
KINDS = {"isotropic": ((40, 128, 128), (1.0, 1.0, 1.0)), "anisotropic": ((16, 128, 128), (3.0, 1.0, 1.0))}


def ap50(truth: np.ndarray, pred: np.ndarray) -> float:
    from napari_unet.quality import match_objects

    n_t, n_p = len(np.unique(truth[truth > 0])), len(np.unique(pred[pred > 0]))
    tp = int(np.sum(match_objects(truth, pred) > 0.5))
    return tp / max(n_t + n_p - tp, 1)


def painted_volume(truth: np.ndarray, n_cells: int = 5, seed: int = 0) -> np.ndarray:
    """Five nuclei painted on the 3 planes through their middle, background (1) in a ring and far from cells."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    labels = np.zeros(truth.shape, np.uint16)
    ids = [i for i in np.unique(truth) if i]
    rng.shuffle(ids)
    chosen = []
    for i in ids:
        zs = np.unique(np.nonzero(truth == i)[0])
        if len(zs) >= 5:
            chosen.append((i, int(np.median(zs))))
        if len(chosen) == n_cells:
            break
    far = ndi.distance_transform_edt(truth == 0) > 6
    for k, (i, zc) in enumerate(chosen, start=2):
        for z in (zc - 1, zc, zc + 1):
            obj = truth[z] == i
            ring = ndi.binary_dilation(obj, iterations=6) & (truth[z] == 0)
            labels[z][ring | far[z]] = 1
            labels[z][obj] = k
    return labels


def networks(train_seconds: float, kind: str):
    """(name, model, metadata): the packaged model, and fine-tuned without / with side views."""
    from napari_unet._sample_data import sample_model_path
    from napari_unet.config import TrainConfig
    from napari_unet.io import load_model
    from napari_unet.jobs import drain
    from napari_unet.synthetic import make_nuclei_3d
    from napari_unet.training import train

    model, meta = load_model(sample_model_path())
    out = [("packaged model, no painting", model, meta)]
    if train_seconds <= 0:
        return out
    shape, vs = KINDS[kind]
    image, truth = make_nuclei_3d(shape, vs, seed=1000)
    labels = painted_volume(truth)
    for side in (False, True):
        cfg = TrainConfig(max_time=train_seconds, side_views=side, voxel_size=vs, seed=0)
        res = drain(train(image, labels, cfg, init_from=sample_model_path()))
        steps = res.metadata["training"]["iterations"]
        name = f"fine-tuned {train_seconds:g} s{' + side views' if side else ''} ({steps} steps)"
        out.append((name, res.model, res.metadata))
    return out


def quality(args) -> list[str]:
    from napari_unet.config import PredictConfig
    from napari_unet.inference import predict_all
    from napari_unet.synthetic import make_nuclei_3d

    lines = ["| volumes | network | method | 3D AP@0.5 mean ± sd | worst | s per volume | numpy peak (MB) |",
             "|---|---|---|---|---|---|---|"]
    for kind, (shape, vs) in KINDS.items():
        volumes = [make_nuclei_3d(shape, vs, seed=s) for s in range(args.seeds)]
        n_obj = int(np.mean([t.max() for _, t in volumes]))
        for name, model, meta in networks(args.train, kind):
            runs = [(m, sm) for m in METHODS for sm in ((0.0,) if m == "stitch" else args.smoothing)]
            for method, smooth in runs:
                aps, times, peaks = [], [], []
                for image, truth in volumes:
                    cfg = PredictConfig(axes="ZYX", voxel_size=vs, volume=method, volume_smoothing=smooth)
                    tracemalloc.start()
                    t0 = time.perf_counter()
                    labels = predict_all(model, image, cfg, meta).labels
                    times.append(time.perf_counter() - t0)
                    peaks.append(tracemalloc.get_traced_memory()[1] / 2 ** 20)
                    tracemalloc.stop()
                    aps.append(ap50(truth, labels))
                label = method if method == "stitch" else f"{method}, smoothing {smooth:g}"
                row = (f"| {kind} {shape[0]}x{shape[1]}x{shape[2]}, Z step {vs[0]:g}, ~{n_obj} nuclei | {name} | "
                       f"{label} | {np.mean(aps):.3f} ± {np.std(aps):.3f} | {min(aps):.3f} | "
                       f"{np.median(times):.1f} | {max(peaks):.0f} |")
                print(row, flush=True)
                lines.append(row)
    return lines


def _big_child(method: str) -> None:
    """In a fresh process: segment the big volume with ``method``; print JSON (time, peak RSS)."""
    import resource

    from napari_unet._sample_data import sample_model_path
    from napari_unet.config import PredictConfig
    from napari_unet.inference import predict_all
    from napari_unet.io import load_model
    from napari_unet.synthetic import make_nuclei_3d

    block, _ = make_nuclei_3d((64, 256, 256), (3.0, 1.0, 1.0), seed=7)
    image = np.tile(block, (1, 4, 4))
    del block
    model, meta = load_model(sample_model_path())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    t0 = time.perf_counter()
    if method == "planes":
        res = predict_all(model, image, PredictConfig(), meta)
    else:
        res = predict_all(model, image, PredictConfig(axes="ZYX", voxel_size=(3, 1, 1), volume=method), meta)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(json.dumps({"method": method, "seconds": dt, "peak_gb": peak, "before_gb": before,
                      "objects": int(res.labels.max()), "precision": res.precision}))


def big(args) -> list[str]:
    lines = ["| 64 x 1024 x 1024 uint16 (128 MiB) | time | peak resident memory (process) | objects | precision |",
             "|---|---|---|---|---|"]
    for method in ("planes",) + METHODS:
        proc = subprocess.run([sys.executable, __file__, "--big-child", method], capture_output=True, text=True)
        if proc.returncode:
            lines.append(f"| {method} | failed: {proc.stderr.strip().splitlines()[-1]} | | | |")
            print(lines[-1], flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        name = {"planes": "plane by plane (2D, no 3D objects)"}.get(method, method)
        row = (f"| {name} | {r['seconds']:.0f} s | {r['peak_gb']:.2f} GB (image and model loaded: "
               f"{r['before_gb']:.2f} GB) | {r['objects']} | {r['precision']} |")
        print(row, flush=True)
        lines.append(row)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="quality", help="comma-separated: quality, big")
    p.add_argument("--seeds", type=int, default=3, help="volumes of each kind")
    p.add_argument("--train", type=float, default=60.0, help="seconds of fine-tuning (0: the packaged model only)")
    p.add_argument("--smoothing", default="1,0",
                   help="PredictConfig.volume_smoothing values to compare for 3d and orthogonal (default 1,0)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the tables (markdown) here")
    p.add_argument("--big-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.smoothing = tuple(float(v) for v in args.smoothing.split(","))
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if args.big_child:
        _big_child(args.big_child)
        return
    import platform

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    head = f"# volumes benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}"
    print(head, flush=True)
    out = [head, ""]
    parts = set(args.parts.split(","))
    if "quality" in parts:
        out += quality(args) + [""]
    if "big" in parts:
        out += big(args) + [""]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
