"""Training speed: one optimiser step in each precision / memory layout, against plain fp32, in one run.

For each network (the default 8/4, and 16/4) and each set-up (fp32, fp32 channels-last,
bf16 autocast + channels-last; ``auto`` chooses between the first and the last on CPUs with
bf16 hardware, see :func:`napari_unet.device.select_training_setup`), times full training
steps (forward, weighted cross-entropy, backward, Adam) on random batches of the default
size (8 patches of 128 px), the median of ``--steps`` after two warm-up steps, and prints
the ratio to plain fp32 measured in the same run. Then says what ``precision="auto"``
picks here and how long deciding took.

Usage::

    .venv/bin/python benchmarks/training_speed.py [--steps 20] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SETUPS = (("fp32", False), ("fp32", True), ("bf16", True))


def time_steps(width: int, precision: str, channels_last: bool, steps: int, batch: int, patch: int) -> float:
    import torch

    from napari_unet.config import default_model_config
    from napari_unet.device import autocast
    from napari_unet.model import UNet

    torch.manual_seed(0)
    cfg = default_model_config()
    model = UNet.from_config(cfg.__class__(**{**cfg.to_dict(), "base_filters": width}))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.train().to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.randn(batch, 1, patch, patch).contiguous(memory_format=fmt)
    target = torch.randint(0, 3, (batch, patch, patch))
    weight = torch.rand(batch, patch, patch)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with autocast(precision, "cpu"):
            out = model(x)
        loss = (torch.nn.functional.cross_entropy(out.float(), target, reduction="none") * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", type=int, default=128)
    args = ap.parse_args(argv)

    import torch

    from napari_unet import device as dev
    from napari_unet.config import default_model_config
    from napari_unet.model import UNet

    if args.threads:
        torch.set_num_threads(args.threads)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags) or "unknown"
    print(f"# training step, batch {args.batch} x {args.patch} px, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU flags: {isa}, load {os.getloadavg()[0]:.1f}")
    print("| network | set-up | s / step (median) | vs plain fp32 |")
    print("|---|---|---|---|")
    for width in (8, 16):
        base = None
        for precision, channels_last in SETUPS:
            try:
                t = time_steps(width, precision, channels_last, args.steps, args.batch, args.patch)
            except Exception as e:  # noqa: BLE001 - a set-up this build cannot run
                print(f"| {width}/4 | {precision}{' channels-last' if channels_last else ''} | fails: {e} | - |")
                continue
            base = base or t
            print(f"| {width}/4 | {precision}{' channels-last' if channels_last else ''} | {t:.3f} | "
                  f"{base / t:.2f}x |", flush=True)
    model = UNet.from_config(default_model_config())
    t0 = time.perf_counter()
    choice = dev.select_training_setup("auto", "cpu", model, (args.batch, 1, args.patch, args.patch), max_time=60)
    print(f"\nprecision='auto' picks {choice[0]}{' channels-last' if choice[1] else ''} for the default network "
          f"(bf16 hardware: {dev.native_bf16()}; decided in {time.perf_counter() - t0:.2f} s, or read from the cache "
          f"in {dev.cache_dir()}); load at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
