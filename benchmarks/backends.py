"""CPU inference back-ends against napari-unet's own forward pass, in one run.

For each network (``--sizes``, width/depth; batch norm folded as ``predict`` does) one
forward pass of a ``--tile`` x ``--tile`` one-channel tile (median of ``--repeats`` after
warm-up), through:

* torch fp32 (plain, channels-last), and torch bf16 autocast channels-last (what
  ``predict`` runs where the processor computes bf16 in hardware);
* ``torch.compile`` (inductor; the compile time is printed separately);
* ONNX Runtime (CPU execution provider, fp32) on the model exported with ``torch.onnx``;
* OpenVINO on the same ONNX file, with its default precision hint (bf16 on AMX
  processors, fp32 elsewhere) and with fp32 forced.

Mask agreement: the share of pixels whose argmax equals torch fp32's, on a real-looking
tile (synthetic nuclei; the networks are briefly trained so that the classes are not
noise). ONNX Runtime and OpenVINO are optional: install them beside the package
(``pip install onnxruntime openvino onnx onnxscript``) to include them. Usage::

    .venv/bin/python benchmarks/backends.py [--sizes 8/4,32/5] [--tile 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _median_time(fn, repeats: int) -> float:
    """The speed benchmark's median after two warm-up calls."""
    from inference import median_time

    fn()
    fn()
    return median_time(fn, repeats)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8/4,32/5")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60, help="quick training steps before timing (realistic classes)")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it needs a C++ compiler)")
    args = ap.parse_args(argv)

    import torch
    from inference import load_line, make_data  # the speed benchmark's helpers

    from napari_unet.device import native_bf16

    image, _ = make_data(args.tile, seed=5)
    lo, hi = np.percentile(image, (1, 99.8))
    x = torch.from_numpy(((image - lo) / max(hi - lo, 1e-6)).astype(np.float32)[None, None])
    xcl = x.contiguous(memory_format=torch.channels_last)
    print(f"# one forward pass of a {args.tile} x {args.tile} tile, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"bf16 hardware {native_bf16()}; {load_line()}")
    print("| network | back-end | s (median) | Mpx/s | vs torch fp32 | argmax equal to torch fp32 | set-up s |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        bench_size(size.strip(), args, x, xcl)
    return 0


def bench_size(size: str, args, x, xcl) -> None:
    """The table's rows for one network."""
    import torch
    from inference import train_quickly

    from napari_unet.device import autocast
    from napari_unet.inference import _replica

    width, depth = (int(v) for v in size.split("/"))
    net = _replica(train_quickly(width, depth, args.steps if width <= 16 else args.steps // 2), torch.device("cpu"))
    rows = []

    def run(name, fn, setup_s=0.0):
        try:
            out = fn()
            t = _median_time(fn, args.repeats)
        except Exception as e:  # noqa: BLE001 - a back-end that cannot run here is reported, not fatal
            print(f"| {size} | {name} | fails: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | | |",
                  flush=True)
            return
        rows.append((name, t, np.asarray(out).argmax(axis=1), setup_s))
        ref_t, ref_arg = rows[0][1], rows[0][2]
        print(f"| {size} | {name} | {t:.3f} | {args.tile ** 2 / 1e6 / t:.2f} | {ref_t / t:.2f}x | "
              f"{(rows[-1][2] == ref_arg).mean() * 100:.2f} % | {setup_s:.1f} |", flush=True)

    with torch.inference_mode():
        run("torch fp32 (channels-last)", lambda: net(xcl).float().numpy())
        run("torch bf16 autocast (channels-last; predict's path with bf16 hardware)",
            lambda: _bf16(net, xcl, autocast))
    if not args.no_compile:
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(net)
            with torch.inference_mode():
                compiled(xcl)
            setup = time.perf_counter() - t0
            with torch.inference_mode():
                run("torch.compile fp32", lambda: compiled(xcl).float().numpy(), setup)
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast("bf16", torch.device("cpu")):
                compiled(xcl)
            setup = time.perf_counter() - t0
            with torch.inference_mode():
                run("torch.compile bf16 autocast", lambda: _bf16(compiled, xcl, autocast), setup)
        except Exception as e:  # noqa: BLE001
            print(f"| {size} | torch.compile | fails: {type(e).__name__}: {str(e).splitlines()[0][:80]} |||||")
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    try:
        from napari_unet.openvino_backend import import_openvino  # telemetry off

        ov = import_openvino()
    except ImportError:
        ov = None
    if ort is None and ov is None:
        print(f"| {size} | ONNX Runtime, OpenVINO | not installed | | | | |")
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "unet.onnx")
        t0 = time.perf_counter()
        try:
            torch.onnx.export(net, (x,), path, input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {2: "h", 3: "w"}, "logits": {2: "h", 3: "w"}}, dynamo=False)
        except Exception as e:  # noqa: BLE001
            print(f"| {size} | ONNX export | fails: {type(e).__name__}: {str(e).splitlines()[0][:80]} |||||")
            return
        export_s = time.perf_counter() - t0
        xn = x.numpy()
        if ort is not None:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            t0 = time.perf_counter()
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            run(f"ONNX Runtime {ort.__version__} fp32", lambda: sess.run(None, {"x": xn})[0],
                export_s + time.perf_counter() - t0)
        if ov is not None:
            core = ov.Core()
            for label, cfg in (("default hint", {}), ("fp32", {"INFERENCE_PRECISION_HINT": "f32"})):
                t0 = time.perf_counter()
                compiled_ov = core.compile_model(path, "CPU", {**cfg, "INFERENCE_NUM_THREADS":
                                                                torch.get_num_threads()})
                setup = export_s + time.perf_counter() - t0
                prec = compiled_ov.get_property("INFERENCE_PRECISION_HINT")
                run(f"OpenVINO {ov.__version__.split('-')[0]} ({label}: {prec})",
                    lambda c=compiled_ov: c({"x": xn})[0], setup)


def _bf16(net, x, autocast):
    import torch

    with torch.inference_mode(), autocast("bf16", torch.device("cpu")):
        return net(x).float().numpy()


if __name__ == "__main__":
    sys.exit(main())
