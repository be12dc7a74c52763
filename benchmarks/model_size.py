"""Network size against CPU speed: training steps a minute buys and inference speed, per instruction set.

The packaged model's size is a trade-off: a wider network may learn more from a minute of
fine-tuning per step but makes fewer steps in that minute, and segments more slowly; how
much slower depends on the processor (bf16 in hardware or not). For each network
(``--sizes``, width/depth) and each instruction-set limit (``--isa``: ``native``, and
oneDNN's ``AVX512_CORE_BF16`` = AVX-512 with bf16 but no AMX, ``AVX2`` = no AVX-512 and no
bf16 hardware, as on most laptops; both emulated on a newer CPU with ``ONEDNN_MAX_CPU_ISA``
and ``ATEN_CPU_CAPABILITY``), in a fresh process with an empty precision cache:

* the training set-up ``precision="auto"`` picks for the few-shot batch (8 x 128 px) and
  the median time of one step in it: the steps a 60 s budget buys (an upper bound: the
  run also spends time on data, validation and previews);
* ``predict`` with its defaults (instances, ``precision="auto"``) on a 1024 x 1024
  synthetic image: median of ``--repeats`` after a warm-up.

Quality after 60 s of fine-tuning is measured by ``benchmarks/fewshot.py`` (``--init
MODEL`` once per pretrained size); ``--iterations N`` there replays the step count of a
slower processor. Usage::

    .venv/bin/python benchmarks/model_size.py [--sizes 8/4,16/4] [--isa native,AVX512_CORE_BF16,AVX2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ISA_ENV = {
    "native": {},
    "AVX512_CORE_BF16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}


def child(width: int, depth: int, steps: int, repeats: int) -> dict:
    """Run in the fresh process: the training set-up auto picks, its step time, predict's time."""
    import dataclasses

    import numpy as np
    import torch
    from inference import median_time  # the speed benchmark's helper (benchmarks/ is on sys.path)

    from napari_unet import device as dev
    from napari_unet.config import PredictConfig, default_model_config
    from napari_unet.inference import predict_all
    from napari_unet.model import UNet
    from napari_unet.synthetic import make_nuclei

    torch.manual_seed(0)
    cfg = dataclasses.replace(default_model_config(), base_filters=width, depth=depth)
    model = UNet.from_config(cfg)
    batch = (8, 1, 128, 128)
    t0 = time.perf_counter()
    setup = dev.select_training_setup("auto", "cpu", model, batch, max_time=60.0)
    decide = time.perf_counter() - t0
    step = dev._time_training_step(model, batch, *setup)
    for _ in range(2):  # warm-up
        step()
    step_s, _ = median_time(step, steps)
    image, _ = make_nuclei((1024, 1024), seed=1)
    model.eval()
    config = PredictConfig(output="semantic")  # the network's time: post-processing does not depend on its size
    pred = predict_all(model, image, config)  # warm-up (and the precision choice)
    ptimes = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict_all(model, image, config)
        ptimes.append(time.perf_counter() - t0)
    return {"params": sum(p.numel() for p in model.parameters()), "setup": f"{setup[0]}{' cl' if setup[1] else ''}",
            "decide_s": decide, "step_s": step_s, "predict_s": float(np.median(ptimes)),
            "predict_precision": pred.precision, "capability": torch.backends.cpu.get_cpu_capability()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8/4,16/4", help="networks as width/depth, comma-separated")
    ap.add_argument("--isa", default="native,AVX512_CORE_BF16,AVX2", help=f"any of {', '.join(ISA_ENV)}")
    ap.add_argument("--steps", type=int, default=15, help="timed training steps")
    ap.add_argument("--repeats", type=int, default=3, help="timed predictions")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        width, depth = (int(v) for v in args.child.split("/"))
        print(json.dumps(child(width, depth, args.steps, args.repeats)))
        return 0
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    isas = [s.strip() for s in args.isa.split(",") if s.strip()]
    for isa in isas:
        if isa not in ISA_ENV:
            ap.error(f"--isa: unknown {isa!r}; use {', '.join(ISA_ENV)}")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    cpu = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags) or "unknown"
    print(f"# {model} ({cpu}), {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print("| instruction sets | network | parameters | training set-up (auto) | s / step | steps in 60 s "
          "(at most) | predict 1024² semantic (s) | predict precision |")
    print("|---|---|---|---|---|---|---|---|")
    for isa in isas:
        for size in sizes:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, **ISA_ENV[isa], "NAPARI_UNET_CACHE": cache}
                out = subprocess.run([sys.executable, __file__, "--child", size, "--steps", str(args.steps),
                                      "--repeats", str(args.repeats)], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {isa} | {size} | failed: {out.stderr.strip().splitlines()[-1:]} |||||")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {isa} ({r['capability']}) | {size} | {r['params'] / 1e6:.2f} M | {r['setup']} "
                  f"(decided in {r['decide_s']:.1f} s) | {r['step_s']:.3f} | {60 / r['step_s']:.0f} | "
                  f"{r['predict_s']:.2f} | {r['predict_precision']} |", flush=True)
    print(f"\nload at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
