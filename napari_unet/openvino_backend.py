"""OpenVINO as the CPU back-end of :func:`napari_unet.inference.predict` (optional extra).

On Intel CPUs OpenVINO can run the U-Net faster than torch's own path, with nearly all
argmax pixels equal to float32 (``benchmarks/backends.py``; numbers in docs/benchmarks.md).
It is an optional extra (``pip install "napari-unet[openvino]"``); without it everything
runs on torch.

* :func:`select_backend`: ``"torch"`` or ``"openvino"`` as asked; ``"auto"`` takes OpenVINO
  only on the CPU, when it is installed, for jobs of at least :data:`MIN_PIXELS`, and when
  the job's batches plus OpenVINO's set-up (compiling; converting a network seen for the
  first time) take at most 0.8 of torch's time. The per-batch times are measured once
  per machine, architecture, shape and precision (warm-up, interleaved repeats, the best
  of each) and cached with the precision choices.
* :func:`openvino_runner` converts the inference copy of the network (batch norm folded)
  with ``openvino.convert_model`` and compiles it for the precision chosen (f32 or bf16
  inference hint); the converted model is kept in the cache folder, keyed by a hash of
  its weights, so a second run of the same model does not convert again.

Only the network changes: tiling, blending and post-processing are the same code.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["BACKENDS", "openvino_available", "openvino_version", "select_backend", "openvino_runner",
           "import_openvino"]

BACKENDS = ("auto", "torch", "openvino")
_LOCK = threading.Lock()
_CHOICES: dict[str, dict | None] = {}  # this process's timings, per key


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def import_openvino():
    """``import openvino`` with its usage telemetry off; returns the module.

    The ``openvino`` wheel depends on ``openvino-telemetry``, which sends usage statistics
    to Google Analytics from conversions and model reads unless the user opted out, and
    writes files under ``~/intel``. A segmentation plugin has no business sending anything
    anywhere: when this process has not imported openvino yet, ``openvino_telemetry`` is
    made unimportable here (``sys.modules`` entry ``None``), so OpenVINO uses its built-in
    no-op stub. Nothing on disk changes; other users of openvino in the same process see
    the same stub.
    """
    import sys

    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)
    import openvino as ov

    return ov


def openvino_version() -> str:
    return str(import_openvino().__version__).split("-")[0]


def _weights_hash(model) -> str:
    """SHA-256 of the network's architecture and weights (the cache key of its converted form)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _ir_folder(model) -> Path:
    """Where the converted form of this network (these weights) is kept."""
    return cache_folder() / f"{openvino_version()}-{_weights_hash(model)}"


def is_converted(model) -> bool:
    """Whether this network was converted before (a run then only compiles it, which is quicker)."""
    return (_ir_folder(model) / "model.xml").is_file()


def _converted(model, in_channels: int):
    """The OpenVINO model of ``model`` (dynamic batch, height and width), from the cache folder
    when this network was converted before, else converted now and stored (atomically)."""
    import warnings

    import torch

    ov = import_openvino()
    folder = _ir_folder(model)
    xml = folder / "model.xml"
    core = ov.Core()
    if xml.is_file() and (folder / "model.bin").is_file():
        try:
            return core.read_model(str(xml))
        except Exception:  # noqa: BLE001 - a damaged cache entry: set aside below, convert again
            pass
    side = model.valid_input_size(64) if getattr(model, "config", None) and model.config.padding == "valid" else 64
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation, inside OpenVINO's converter
        converted = ov.convert_model(model, example_input=torch.zeros(1, in_channels, side, side),
                                     input=[(-1, in_channels, -1, -1)])
    _store(converted, folder)
    return converted


def _store(converted, folder: Path) -> None:
    """Save a converted network into ``folder`` atomically (a complete folder or none); a
    damaged entry there is replaced; failing to store (read-only or full disk) only means
    converting again next time."""
    import shutil
    import tempfile

    ov = import_openvino()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            ov.save_model(converted, str(tmp / "model.xml"), compress_to_fp16=False)
            if folder.exists():  # damaged (it could not be read): out of the way first
                shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        except Exception:  # noqa: BLE001 - another process stored it first, or the disk refused
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass


def openvino_runner(model, in_channels: int, precision: str) -> Callable:
    """``f(x) -> logits``: the network on OpenVINO's CPU plugin, ``x`` a float32 torch tensor
    ``(N, C, H, W)``, the logits a new float32 torch tensor. ``precision`` ``"bf16"`` or
    ``"fp32"`` sets OpenVINO's inference precision hint (bf16 only with bf16 hardware)."""
    return _compiled_runner(_converted(model, in_channels), precision)


def _compiled_runner(converted, precision: str) -> Callable:
    import torch

    ov = import_openvino()
    hint = "bf16" if precision == "bf16" else "f32"
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                          "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one infer request: one call at a time

    def run(x):
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        with lock:
            out = request.infer({0: arr})[0]
            return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))

    return run


def select_backend(requested: str, device, model, shape: tuple[int, ...], precision: str,
                   torch_forward: Callable | None = None, n_batches: int = 1) -> str:
    """``"torch"`` or ``"openvino"`` for a prediction job.

    ``"torch"`` and ``"openvino"`` are taken as asked. ``"auto"`` takes OpenVINO only on the
    CPU, in fp32 or bf16, when it is installed, when the job feeds the network at least
    :data:`MIN_PIXELS`, and when it then saves time: one batch at the job's shape is timed
    on both (warm-up, interleaved repeats, the best of each; once per machine, network
    architecture and shape, cached), and OpenVINO is taken if ``n_batches`` batches plus its
    set-up (compiling, and converting a network not converted before) take at most
    :data:`~napari_unet.device.BF16_MARGIN` (0.8) of torch's time.

    Parameters
    ----------
    requested : str
        ``"auto"``, ``"torch"`` or ``"openvino"``.
    device : torch.device or str
        Where the job runs; OpenVINO runs on the CPU only.
    model : torch.nn.Module
        The inference copy of the network (batch norm folded).
    shape : tuple of int
        ``(N, C, H, W)`` of the job's batches.
    precision : str
        The precision chosen for the job.
    torch_forward : callable, optional
        ``f(x)``: torch's forward as the job runs it (timed against OpenVINO's); without it
        ``"auto"`` keeps torch.
    n_batches : int
        Batches in the whole job.

    Raises
    ------
    ValueError
        ``"openvino"`` asked for where it cannot run (not installed, not the CPU, fp16).
    """
    import torch

    from .device import BF16_MARGIN

    requested = (requested or "auto").lower()
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; use {', '.join(BACKENDS)}")
    device = torch.device(device)
    if requested == "torch":
        return "torch"
    usable = device.type == "cpu" and precision in ("fp32", "bf16") and openvino_available()
    if requested == "openvino":
        if not usable:
            why = ("it is not installed: pip install 'napari-unet[openvino]'" if not openvino_available()
                   else f"it runs on the CPU in fp32 or bf16 only (here: {device.type}, {precision})")
            raise ValueError(f"backend 'openvino' cannot run: {why}")
        return "openvino"
    pixels = int(n_batches) * int(np.prod([shape[0], *shape[2:]]))
    if not usable or torch_forward is None or pixels < MIN_PIXELS:
        return "torch"
    try:
        t = _timings(model, shape, precision, torch_forward)
    except Exception:  # noqa: BLE001 - an OpenVINO that is installed but will not load: torch, as without it
        return "torch"
    if not t:
        return "torch"
    setup = t["compile"] + (0.0 if is_converted(model) else t["convert"])
    return "openvino" if n_batches * t["openvino"] + setup <= BF16_MARGIN * n_batches * t["torch"] else "torch"


#: ``"auto"`` leaves jobs smaller than this (pixels through the network) on torch without
#: measuring: OpenVINO's set-up (compiling, and converting a new network) outweighs its
#: gain there (docs/benchmarks.md).
MIN_PIXELS = 4_000_000


def _timings(model, shape: tuple[int, ...], precision: str, torch_forward: Callable) -> dict | None:
    """Seconds per batch on torch and OpenVINO, and OpenVINO's compile and conversion times, for
    this machine, architecture, shape and precision: measured once, then read from the cache."""
    import time

    import torch

    from .device import _best_times, _cache_get, _cache_key, _cache_put

    key = _cache_key(f"backend-{precision}", model, tuple(shape)) + f"|openvino={openvino_version()}"
    with _LOCK:
        if key in _CHOICES:
            return _CHOICES[key]
    cached = _cache_get(key)
    if isinstance(cached, dict) and {"torch", "openvino", "compile", "convert"} <= set(cached):
        with _LOCK:
            _CHOICES[key] = cached
        return cached
    x = torch.rand(tuple(shape))
    try:
        known = is_converted(model)
        t0 = time.perf_counter()
        converted = _converted(model, int(shape[1]))
        convert = time.perf_counter() - t0
        t0 = time.perf_counter()
        ov_run = _compiled_runner(converted, precision)
        compile_s = time.perf_counter() - t0
        # Both as the job runs them: torch_forward is predict's own predictor (layout, autocast,
        # softmax); OpenVINO's output goes through the same softmax.
        times = _best_times({"torch": lambda: torch_forward(x),
                             "openvino": lambda: torch.softmax(ov_run(x), dim=1)}, repeats=3)
    except Exception:  # noqa: BLE001 - a network OpenVINO cannot convert or run: torch, as before
        times, known, convert, compile_s = {}, True, 0.0, 0.0
    if "torch" not in times or "openvino" not in times:
        result = None
    else:
        # A conversion timed here is what a new network will cost; one read from disk says nothing.
        result = {"torch": times["torch"], "openvino": times["openvino"], "compile": compile_s,
                  "convert": convert if not known else DEFAULT_CONVERT_S}
    with _LOCK:
        _CHOICES[key] = result
    if result is not None:
        _cache_put(key, result)
    return result


#: Conversion time assumed when it could not be timed (the network was already on disk).
DEFAULT_CONVERT_S = 3.0


def clear_memory_cache() -> None:
    """Forget this process's decisions (tests)."""
    with _LOCK:
        _CHOICES.clear()


def cache_folder() -> Path:
    """Where converted networks are kept (in :func:`napari_unet.device.cache_dir`)."""
    from .device import cache_dir

    return cache_dir() / "openvino"
