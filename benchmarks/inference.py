"""Inference speed and memory: ``predict`` against the plain tiled forward most plugins use.

Run from the repository root (takes 10-20 minutes on a 2-core CPU; the 8192 x 8192 memory
case alone several minutes)::

    .venv/bin/python benchmarks/inference.py                 # everything, markdown tables on stdout
    .venv/bin/python benchmarks/inference.py --parts speed   # only the speed table (also: avx2, memory)

In one run, with the same weights:

* (a) plain: the image cut into non-overlapping 512 x 512 tiles (zero-padded), an eager
  float32 NCHW forward of each under ``torch.no_grad``, argmax per tile;
* (b) :func:`napari_unet.inference.predict` with its defaults (instance output, so the
  watershed post-processing is included), and the same with semantic output (argmax only,
  the work (a) does; the two run in turns), and with :func:`~napari_unet.tuning.tune_malloc`
  as the CLI does. The instance post-processing's share is timed inside ``predict``, alone
  on the image's maps, and as the difference of the instance and semantic times.

Models: depth 4 / width 8 (the training engine's default) and depth 5 / width 32, padded
convolutions with batch norm, trained for ``--steps`` quick steps on synthetic nuclei so
that the masks mean something. Reported: megapixels per second, ratio (b)/(a), effective
GFLOP/s (the model's FLOPs per image pixel x pixels / time) against a float32 matmul peak
measured in the same run, and how well reduced-precision masks agree with float32.
``avx2`` repeats the comparison in a subprocess restricted to AVX2 (as on most laptops)
to show what ``precision="auto"`` picks there. ``auto`` asks ``precision="auto"`` in
``--processes`` fresh processes (empty cache: each measures; warm: each reads the first
one's decision). ``startup`` times a ``napari-unet predict`` process from its start to its
first finished tile (warm cache). ``memory`` segments an 8192 x 8192 float32
image in a subprocess and prints its peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
MODELS = [(8, 4), (32, 5)]


# ---- helpers ----------------------------------------------------------------------------------

def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def interleaved_medians(fns, repeats: int) -> list[tuple[float, object]]:
    """:func:`median_time` of several callables run in turns (a, b, a, b, ...), so that a
    slow spell of the machine falls on all of them alike: their differences mean something."""
    times, outs = [[] for _ in fns], [None] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return [(float(np.median(t)), out) for t, out in zip(times, outs)]


class TimedCalls:
    """Times every call of ``module.name`` while active (how long a step takes inside a job,
    where the job calls it by that name)."""

    def __init__(self, module, name: str):
        self.module, self.name, self.times = module, name, []

    def __enter__(self):
        self.real = real = getattr(self.module, self.name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.times.append(time.perf_counter() - t0)

        setattr(self.module, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.real)


def matmul_peak(dtype_name: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n matmul (the best of ``repeats``): the machine's practical peak."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def flops_per_pixel(net, size: int = 256) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, net.config.in_channels, size, size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x)
    return fc.get_total_flops() / (size * size)


def make_data(size: int, seed: int = 0):
    from napari_unet.synthetic import make_nuclei

    return make_nuclei((size, size), seed=seed)


def train_quickly(width: int, depth: int, steps: int, seed: int = 0):
    """A plain torch training loop on fully labelled synthetic nuclei (3 instance classes)."""
    import torch

    from napari_unet.data import instance_targets, normalize
    from napari_unet.model import UNet

    torch.manual_seed(seed)
    net = UNet(1, 3, depth=depth, base_filters=width, padding="same", batch_norm=True)
    img, gt = make_data(512, seed=seed + 100)
    x = normalize(img)
    target, _ = instance_targets(np.where(gt > 0, gt + 1, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    p, bs = 128, 4
    net.train()
    for _ in range(steps):
        ys, xs = rng.integers(0, 512 - p, bs), rng.integers(0, 512 - p, bs)
        xb = torch.from_numpy(np.stack([x[y:y + p, xx:xx + p] for y, xx in zip(ys, xs)])[:, None])
        tb = torch.from_numpy(np.stack([target[y:y + p, xx:xx + p] for y, xx in zip(ys, xs)]).astype(np.int64))
        loss = torch.nn.functional.cross_entropy(net(xb), tb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def plain_tiled(net, image: np.ndarray, tile: int = 512) -> np.ndarray:
    """What most plugins do: non-overlapping tiles, eager float32 NCHW, no_grad, argmax."""
    import torch

    from napari_unet.data import normalize

    x = normalize(image)
    h, w = x.shape
    ph, pw = -(-h // tile) * tile, -(-w // tile) * tile
    xp = np.zeros((ph, pw), np.float32)
    xp[:h, :w] = x
    out = np.zeros((ph, pw), np.uint8)
    with torch.no_grad():
        for y in range(0, ph, tile):
            for xx in range(0, pw, tile):
                t = torch.from_numpy(xp[y:y + tile, xx:xx + tile])[None, None]
                out[y:y + tile, xx:xx + tile] = net(t).argmax(1)[0].numpy()
    return out[:h, :w]


def run_predict(net, image, **cfg):
    from napari_unet.config import PredictConfig
    from napari_unet.inference import predict_all

    cfg.setdefault("backend", os.environ.get("NAPARI_UNET_BENCH_BACKEND", "auto"))
    return predict_all(net, image, PredictConfig(**cfg), {"mode": "instances"})


def matched_fraction(a: np.ndarray, b: np.ndarray, iou: float = 0.5) -> float:
    """Fraction of the objects of ``a`` that have an object in ``b`` with IoU > ``iou``."""
    n = int(a.max())
    if n == 0:
        return 1.0 if b.max() == 0 else 0.0
    pairs = np.stack([a.ravel(), b.ravel()], 1).astype(np.int64)
    pairs = pairs[(pairs[:, 0] > 0) & (pairs[:, 1] > 0)]
    uniq, inter = np.unique(pairs, axis=0, return_counts=True)
    area_a = np.bincount(a.ravel(), minlength=n + 1)
    area_b = np.bincount(b.ravel(), minlength=int(b.max()) + 1)
    ious = inter / (area_a[uniq[:, 0]] + area_b[uniq[:, 1]] - inter)
    return len(np.unique(uniq[ious > iou, 0])) / n


def _path(res) -> str:
    """What ran the network: the precision, and OpenVINO when ``backend="auto"`` took it."""
    return res.precision + (", OpenVINO" if getattr(res, "backend", "torch") == "openvino" else "")


def packaged_post_share(image, repeats: int):
    """``(post-processing inside predict, instance time, semantic time, cells)`` of the packaged
    model on ``image`` (medians, run in turns), or None when this installation lacks it: its
    maps of a dense field are harder work for the post-processing than a briefly trained network's."""
    from napari_unet import postprocess
    from napari_unet._sample_data import sample_model_path
    from napari_unet.config import PredictConfig
    from napari_unet.inference import predict_all
    from napari_unet.io import load_model

    path = sample_model_path()
    if path is None:
        return None
    net, meta = load_model(path)
    run = lambda **kw: predict_all(net, image, PredictConfig(**kw), meta)  # noqa: E731
    run()
    with TimedCalls(postprocess, "instance_labels") as in_predict:
        (t_i, res), (t_s, _) = interleaved_medians([run, lambda: run(output="semantic")], repeats)
    return float(np.median(in_predict.times)), t_i, t_s, int(res.labels.max())


def load_line() -> str:
    try:
        return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


# ---- parts ------------------------------------------------------------------------------------

def part_speed(args) -> dict:
    import torch

    from napari_unet import postprocess
    from napari_unet.inference import DEFAULT_MIN_SIZE
    from napari_unet.postprocess import BOUNDARY, INTERIOR, instance_labels, semantic_labels
    from napari_unet.tuning import tune_malloc

    print(f"\n### Speed: {args.size} x {args.size} synthetic nuclei, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"{load_line()}\n", flush=True)
    peak32 = matmul_peak("float32")
    peak16 = matmul_peak("bfloat16", n=512)  # 2048 took minutes where bf16 is emulated (AVX2)
    print(f"matmul peak: float32 {peak32:.0f} GFLOP/s, bfloat16 {peak16:.0f} GFLOP/s\n")
    image, gt = make_data(args.size, seed=7)
    mpx = image.size / 1e6
    rows, agree_rows, post_rows, nets = [], [], [], {}
    for width, depth in MODELS:
        steps = args.steps if (width, depth) == MODELS[0] else args.steps // 2
        t0 = time.perf_counter()
        net = nets[width, depth] = train_quickly(width, depth, steps)
        t_train = time.perf_counter() - t0
        fpp = flops_per_pixel(net)
        run_predict(net, image[:256, :256])  # calibration of precision="auto" (cached), warm-up
        plain_tiled(net, image[:512, :512])
        t_a, sem_a = median_time(lambda n=net: plain_tiled(n, image), args.repeats)
        with TimedCalls(postprocess, "instance_labels") as in_predict:  # the job calls it once per image
            (t_b, res_b), (t_s, res_s) = interleaved_medians(
                [lambda n=net: run_predict(n, image), lambda n=net: run_predict(n, image, output="semantic")],
                args.repeats)
        res_32 = run_predict(net, image, precision="fp32", probabilities=True)
        interior, fg = res_32.probabilities[INTERIOR], res_32.probabilities[INTERIOR] + res_32.probabilities[BOUNDARY]
        t_post, _ = median_time(lambda i=interior, f=fg: instance_labels(i, f, min_size=DEFAULT_MIN_SIZE),
                                args.repeats)
        del interior, fg
        # bf16 against fp32 on a crop: where bf16 is emulated (no AVX512-BF16/AMX) the whole image took minutes.
        crop = image[:args.agreement_size, :args.agreement_size]
        c32 = run_predict(net, crop, precision="fp32", probabilities=True)
        c16 = run_predict(net, crop, precision="bf16", probabilities=True)
        sem32 = semantic_labels(res_32.probabilities)
        csem32, csem16 = semantic_labels(c32.probabilities), semantic_labels(c16.probabilities)
        name = f"{width}/{depth}"
        for label, t in (("(a) plain fp32 NCHW, 512 tiles, argmax", t_a),
                         (f"(b) predict defaults, instances ({_path(res_b)}, tile {res_b.tile_size})", t_b),
                         (f"(b) predict defaults, semantic ({_path(res_s)})", t_s)):
            rows.append((name, label, t, mpx / t, t_a / t, fpp * image.size / t / 1e9))
        post_rows.append((name, t_post, float(np.median(in_predict.times)), t_b))
        agree_rows.append((name, steps, t_train, float((csem16 == csem32).mean()),
                           matched_fraction(c32.labels, c16.labels), float((sem_a == sem32).mean()),
                           matched_fraction(gt, res_32.labels), res_b.precision))
    packaged = packaged_post_share(image, args.repeats)
    tune_malloc()
    for width, depth in MODELS:
        net = nets[width, depth]
        t_a, _ = median_time(lambda n=net: plain_tiled(n, image), args.repeats)
        t_b, res_b = median_time(lambda n=net: run_predict(n, image), args.repeats)
        rows.append((f"{width}/{depth}", "(a) plain, after tune_malloc (as the CLI runs)", t_a, mpx / t_a, 1.0,
                     flops_per_pixel(net) * image.size / t_a / 1e9))
        rows.append((f"{width}/{depth}", f"(b) predict defaults + tune_malloc ({_path(res_b)})", t_b, mpx / t_b,
                     t_a / t_b, flops_per_pixel(net) * image.size / t_b / 1e9))
    print("| model (width/depth) | path | time (s, median) | Mpx/s | ratio to (a) | effective GFLOP/s "
          f"(% of fp32 matmul peak {peak32:.0f}) |")
    print("|---|---|---|---|---|---|")
    for name, label, t, speed, ratio, gf in rows:
        print(f"| {name} | {label} | {t:.2f} | {speed:.3f} | {ratio:.2f}x | {gf:.0f} ({100 * gf / peak32:.0f} %) |")
    for name, t_post, t_situ, t_inst in post_rows:
        inst = next(r[2] for r in rows if r[0] == name and "instances" in r[1])
        sem = next(r[2] for r in rows if r[0] == name and "semantic" in r[1])
        print(f"\n{name}: instance post-processing (instance_labels, median) inside predict {t_situ:.2f} s, "
              f"{100 * t_situ / t_inst:.0f} % of the instance time; timed alone on the image's maps {t_post:.2f} s "
              f"({100 * t_post / t_inst:.0f} %); instances minus semantic {inst - sem:.2f} s "
              f"({100 * (inst - sem) / inst:.0f} %; semantic output pays an argmax instead)", end="")
    if packaged is not None:
        t_situ, t_inst, t_sem, cells = packaged
        print(f"\npackaged model (8/4, pretrained; its metadata's size limits), same image, {cells} cells: instance "
              f"post-processing inside predict {t_situ:.2f} s, {100 * t_situ / t_inst:.0f} % of the instance time "
              f"{t_inst:.2f} s (semantic {t_sem:.2f} s)", end="")
    print()
    print(f"\nMask agreement (same image, bf16 on its top-left {args.agreement_size} px; the models trained "
          "briefly on other synthetic nuclei):\n")
    print("| model | training steps | training s | bf16 vs fp32 argmax pixels equal | bf16 vs fp32 instances "
          "matched (IoU>0.5) | plain (a) vs predict argmax equal | fp32 instances vs ground truth matched | "
          "auto picks |")
    print("|---|---|---|---|---|---|---|---|")
    for name, steps, tt, sem, inst, pa, gtm, prec in agree_rows:
        print(f"| {name} | {steps} | {tt:.0f} | {100 * sem:.2f} % | {100 * inst:.1f} % | {100 * pa:.2f} % | "
              f"{100 * gtm:.1f} % | {prec} |")
    return {"rows": rows, "agreement": agree_rows}


def part_avx2(args) -> None:
    """The speed comparison for the default model in a subprocess limited to AVX2."""
    env = dict(os.environ, **AVX2_ENV)
    cmd = [sys.executable, os.path.abspath(__file__), "--child-avx2", "--size", str(min(args.size, 1024)),
           "--repeats", str(args.repeats), "--steps", str(args.steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:])
        raise SystemExit("AVX2 subprocess failed")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n### Without bf16 hardware (AVX2 forced: {' '.join(f'{k}={v}' for k, v in AVX2_ENV.items())}); "
          f"{load_line()}\n")
    print(f"CPU capability seen by torch: {res['capability']}; {res['size']} x {res['size']} image\n")
    print("| model | path | precision | time (s, median) | Mpx/s | ratio to (a) |")
    print("|---|---|---|---|---|---|")
    for name, label, prec, t, t_a in res["rows"]:
        print(f"| {name} | {label} | {prec} | {t:.2f} | {res['mpx'] / t:.3f} | {t_a / t:.2f}x |")


def child_avx2(args) -> None:
    import torch

    image, _ = make_data(args.size, seed=7)
    rows = []
    for width, depth in MODELS:
        # Trained a little, as in the speed part: an untrained network's confetti is not what the
        # post-processing of a real model does.
        net = train_quickly(width, depth, args.steps if (width, depth) == MODELS[0] else args.steps // 2)
        run_predict(net, image[:256, :256])
        plain_tiled(net, image[:512, :512])
        name = f"{width}/{depth}"
        t_a, _ = median_time(lambda n=net: plain_tiled(n, image), args.repeats)
        t_i, res_i = median_time(lambda n=net: run_predict(n, image), args.repeats)
        t_b, res = median_time(lambda n=net: run_predict(n, image, output="semantic"), args.repeats)
        t_16, _ = median_time(lambda n=net: run_predict(n, image, output="semantic", precision="bf16"), 1)
        rows += [(name, "(a) plain fp32 NCHW, 512 tiles", "fp32", t_a, t_a),
                 (name, "(b) predict defaults, instances", _path(res_i), t_i, t_a),
                 (name, "(b) predict defaults, semantic", _path(res), t_b, t_a),
                 (name, "predict forced bf16, semantic", "bf16", t_16, t_a)]
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "size": args.size,
                      "mpx": image.size / 1e6, "rows": rows}))


def part_memory(args) -> None:
    gb = 1e9
    rows = []
    for model in [m.strip() for m in args.memory_model.split(",") if m.strip()]:
        for backend in args.memory_backends.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", "--memory-size", str(args.memory_size),
                   "--memory-model", model, "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 env=dict(os.environ, NAPARI_UNET_BENCH_BACKEND=backend.strip()))
            if out.returncode != 0:
                print(out.stderr[-3000:])
                raise SystemExit("memory subprocess failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n### Memory: {args.memory_size} x {args.memory_size} float32 image, instances, predict defaults, "
          f"each model in a fresh process; {load_line()}\n")
    print("| model | tile, precision | input (GB) | output labels (GB) | RSS before predict (GB) | peak RSS, sampled "
          "every 20 ms (GB) | ru_maxrss (GB) | **peak above input + output** (GB) | time (s) | cells |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tile']}, {r['precision']} | {r['input'] / gb:.2f} | {r['output'] / gb:.2f} "
              f"({r['labels_dtype']}) | {r['rss_before'] / gb:.2f} | {r['rss_peak'] / gb:.2f} | "
              f"{r['maxrss'] / gb:.2f} | **{(r['rss_peak'] - r['rss_before'] - r['output']) / gb:.2f}** | "
              f"{r['time']:.0f} | {r['cells']} |")
    print("\nRSS before predict: interpreter, torch, the model and the input, after a small prediction "
          "(torch's one-time allocations); the peak above it less the output is what predict itself needs.")


def child_memory(args) -> None:
    import resource

    import psutil
    import torch

    from napari_unet.model import UNet

    width, depth = (int(v) for v in args.memory_model.split("/"))
    torch.manual_seed(0)
    net = UNet(1, 3, depth=depth, base_filters=width, padding="same", batch_norm=True).eval()
    # A realistic large image: a 1024 x 1024 synthetic nuclei field repeated (cheap to make).
    base, _ = make_data(1024, seed=3)
    reps = -(-args.memory_size // 1024)
    image = np.tile(base.astype(np.float32), (reps, reps))[:args.memory_size, :args.memory_size].copy()
    del base
    # A briefly trained model gives realistic cells (a random one makes confetti).
    trained = train_quickly(width, depth, max(args.steps // 4, 10))
    net.load_state_dict(trained.state_dict())
    del trained
    run_predict(net, image[:64, :64].copy())  # torch's one-time allocations belong to the baseline
    import gc

    gc.collect()
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    peak = [rss_before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    res = run_predict(net, image)
    elapsed = time.perf_counter() - t0
    stop.set()
    th.join()
    print(json.dumps({
        "size": args.memory_size, "model": args.memory_model, "tile": res.tile_size, "precision": _path(res),
        "input": image.nbytes, "output": res.labels.nbytes, "labels_dtype": str(res.labels.dtype),
        "rss_before": rss_before, "rss_peak": peak[0],
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "time": elapsed,
        "cells": int(res.labels.max()),
    }))


_AUTO_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from napari_unet import device as dev
from napari_unet.model import UNet
import torch
torch.manual_seed(0)
width, depth, side = (int(v) for v in sys.argv[1:4])
net = UNet(1, 3, depth=depth, base_filters=width, padding="same", batch_norm=True).eval()
t1 = time.perf_counter()
choice = dev.select_precision("auto", "cpu", net, shape=(1, 1, side, side))
print(json.dumps({"choice": choice, "decide_s": time.perf_counter() - t1, "native": dev.native_bf16()}))
"""


def part_auto(args) -> None:
    """What precision='auto' picks in N fresh processes, each with an empty cache (it measures)
    and then each with the cache the first one wrote (it reads)."""
    import tempfile

    print(f"\n### precision='auto' in {args.processes} fresh processes ({load_line()})\n")
    print("| model | tile | cache | choices | time to decide (median s) |")
    print("|---|---|---|---|---|")
    for width, depth in MODELS:
        for cache in ("empty", "warm"):
            choices, times = [], []
            shared = tempfile.mkdtemp()
            for _ in range(args.processes):
                env = dict(os.environ, NAPARI_UNET_CACHE=shared if cache == "warm" else tempfile.mkdtemp())
                out = subprocess.run([sys.executable, "-c", _AUTO_CHILD, str(width), str(depth), "512"], env=env,
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(out.stderr[-2000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                choices.append(r["choice"])
                times.append(r["decide_s"])
            counts = ", ".join(f"{c} {choices.count(c)}/{len(choices)}" for c in sorted(set(choices)))
            print(f"| {width}/{depth} | 512 | {cache} | {counts} | {np.median(times):.2f} |", flush=True)


_STARTUP_CHILD = r"""
import sys, time
t0 = time.perf_counter()
from napari_unet.cli import main
import napari_unet.inference as inf
first = []
real = inf.tiled_predict_iter
def timed(*a, **k):
    gen = real(*a, **k)
    try:
        ev = next(gen)
    except StopIteration as stop:
        return stop.value
    if not first:
        first.append(time.perf_counter() - t0)
    yield ev
    return (yield from gen)
inf.tiled_predict_iter = timed
rc = main(sys.argv[1:])
print("FIRST_TILE", first[0] if first else -1, "TOTAL", time.perf_counter() - t0, "DYNAMO",
      "torch._dynamo" in sys.modules)
"""


def part_startup(args) -> None:
    """Seconds from the start of a `napari-unet predict` process (after the interpreter) to its
    first finished tile, with the precision cache warm, the packaged model and a 512 px image."""
    import tempfile

    import tifffile

    from napari_unet._sample_data import SAMPLE_MODEL_PATH

    d = tempfile.mkdtemp()
    image, _ = make_data(512, seed=5)
    tifffile.imwrite(os.path.join(d, "img.tif"), image)
    cmd = [sys.executable, "-c", _STARTUP_CHILD, "predict", "--model", str(SAMPLE_MODEL_PATH), "--image",
           os.path.join(d, "img.tif"), "--out", os.path.join(d, "out.tif"), "--overwrite", "--quiet"]
    env = dict(os.environ, NAPARI_UNET_CACHE=d)
    rows = []
    for i in range(args.processes + 1):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        line = [x for x in out.stdout.splitlines() if x.startswith("FIRST_TILE")]
        if out.returncode != 0 or not line:
            raise SystemExit(out.stderr[-2000:])
        parts = line[0].split()
        if i:  # the first process fills the precision cache
            rows.append((float(parts[1]), float(parts[3]), wall, parts[5]))
    first = np.median([r[0] for r in rows])
    print(f"\n### Start-up of `napari-unet predict` (packaged model, 512 x 512, warm precision cache, "
          f"{len(rows)} processes; {load_line()})\n")
    print("| first tile after the script starts (median s) | whole command in the script (s) | process wall "
          "time incl. interpreter (s) | torch._dynamo imported |")
    print("|---|---|---|---|")
    print(f"| {first:.2f} | {np.median([r[1] for r in rows]):.2f} | {np.median([r[2] for r in rows]):.2f} | "
          f"{rows[0][3]} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="speed,avx2,auto,startup,memory",
                   help="comma-separated: speed, avx2, auto, startup, memory")
    p.add_argument("--processes", type=int, default=20, help="fresh processes for the auto and startup parts")
    p.add_argument("--size", type=int, default=2048, help="side of the speed-test image")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--agreement-size", type=int, default=256, help="side of the crop where bf16 is compared")
    p.add_argument("--steps", type=int, default=100, help="quick training steps (the default model; half for width 32)")
    p.add_argument("--memory-size", type=int, default=8192)
    p.add_argument("--memory-backends", default="torch,auto",
                   help="backend= of the memory runs, comma-separated (auto: OpenVINO where it measures faster)")
    p.add_argument("--memory-model", default="8/4,32/5",
                   help="width/depth of the memory-test models, comma-separated (each in a fresh process)")
    p.add_argument("--child-avx2", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_avx2:
        return child_avx2(args)
    if args.child_memory:
        return child_memory(args)
    parts = {s.strip() for s in args.parts.split(",")}
    if "speed" in parts:
        part_speed(args)
    if "avx2" in parts:
        part_avx2(args)
    if "auto" in parts:
        part_auto(args)
    if "startup" in parts:
        part_startup(args)
    if "memory" in parts:
        part_memory(args)


if __name__ == "__main__":
    main()
