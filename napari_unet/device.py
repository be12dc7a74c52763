"""Choosing the torch device and the compute precision.

Imports torch lazily so that ``import napari_unet`` stays light. Never assume reduced
precision is faster: on the project's development machine (a Xeon with AVX-512 but
neither AMX nor AVX512-BF16) bf16 autocast measured 2.5-6x *slower* than fp32 for a
width-16 U-Net, while on AMX CPUs it is about 4x faster. ``select_precision("auto", ...)``
therefore measures once per process and keeps fp32 unless bf16 is clearly faster.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import sys
import time
from pathlib import Path

__all__ = ["resolve_device", "DeviceError", "select_precision", "autocast", "PRECISIONS", "import_torch"]

PRECISIONS = ("fp32", "bf16", "fp16")

# Calibration results, per (device, threads, model architecture): measured once per process.
_CALIBRATION: dict[tuple, str] = {}


#: torch's own libraries loaded ahead of ``import torch`` by :func:`import_torch`, in order,
#: with the flags torch itself uses (``libtorch_global_deps`` global, as in torch's
#: ``_load_global_deps``). libtorch_cpu.so carries most of the load time (its static
#: initialisers register the operators) and needs no CUDA library.
_PRELOAD = (("libtorch_global_deps.so", os.RTLD_GLOBAL if hasattr(os, "RTLD_GLOBAL") else 0),
            ("libc10.so", 0), ("libtorch_cpu.so", 0))


def import_torch():
    """``import torch`` from a worker thread without freezing the GUI thread; returns torch.

    Importing torch loads its shared libraries from inside the import, with Python's GIL
    held: 0.3-0.6 s during which no other Python thread runs (napari's event loop froze for
    up to 644 ms on the first Start, ``benchmarks/responsiveness.py``). On Linux the
    biggest libraries are loaded first with ``dlopen`` called through ctypes, which
    releases the GIL during the call; ``import torch`` then finds them loaded (the longest
    pause measured fell to 56-80 ms, CPU build). Only the CPU libraries: a CUDA build still
    loads ``libtorch_cuda.so`` inside the import (not measured: no GPU machine here).
    Anything unexpected (another platform, another layout, a library that will not load)
    falls back to the plain import.
    """
    if "torch" not in sys.modules and sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            spec = importlib.util.find_spec("torch")
            lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
            dlopen = ctypes.CDLL(None).dlopen  # a ctypes call: the GIL is released while it runs
            dlopen.restype, dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
            for name, flags in _PRELOAD:
                if (lib / name).is_file():
                    # The handle is not closed: torch keeps these libraries loaded anyway.
                    dlopen(os.fsencode(lib / name), os.RTLD_NOW | flags)
    import torch

    return torch


class DeviceError(ValueError):
    """A device name that is unknown or not available on this machine."""


def resolve_device(name: str = "auto"):
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"`` into an available ``torch.device``.

    ``"auto"`` picks CUDA, then Apple MPS, then the CPU. A named device that is not
    available raises :class:`DeviceError` with a one-line message.
    """
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was asked for but no CUDA GPU is available; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise DeviceError("Apple MPS was asked for but is not available here; use --device cpu or auto")
    elif dev.type != "cpu":
        raise DeviceError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


def _calibration_net(model, in_channels: int):
    """What to time: the model itself on a small valid tile, or a conv stack like a U-Net level."""
    import torch

    if model is not None:
        size = model.valid_input_size(96) if hasattr(model, "valid_input_size") else 96
        return model, torch.randn(1, model.config.in_channels if hasattr(model, "config") else in_channels, size, size)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1),
    ).eval()
    return net, torch.randn(1, in_channels, 128, 128)


def _median_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up: first calls pick kernels and allocate
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _calibrate_cpu(model, in_channels: int) -> str:
    """Time fp32 against bf16 autocast (channels-last) on this CPU; bf16 only if clearly faster.

    bf16 convolutions are about 4x faster than fp32 on CPUs with AMX, but 1.5x (AVX-512
    without AMX) to 17x (AVX2 only) slower elsewhere, so only a measurement can decide.
    """
    import torch

    net, x = _calibration_net(model, in_channels)
    was_training = net.training
    net.eval()
    x = x.contiguous(memory_format=torch.channels_last)
    try:
        net = net.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            t32 = _median_time(lambda: net(x))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                t16 = _median_time(lambda: net(x))
    except Exception:  # bf16 kernels missing on this build/CPU: fp32 is the safe answer
        return "fp32"
    finally:
        net.train(was_training)
    return "bf16" if t16 < 0.8 * t32 else "fp32"


def select_precision(requested: str, device, model=None, in_channels: int = 1) -> str:
    """Choose the compute precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    Parameters
    ----------
    requested : str
        ``"auto"`` or one of :data:`PRECISIONS`. An explicit choice is returned as is
        (after checking the device can do it).
    device : torch.device or str
        Where the model runs.
    model : torch.nn.Module, optional
        Calibrate on this network (a small tile) instead of a generic conv stack.

    Notes
    -----
    ``"auto"`` on CUDA is bf16 where the GPU supports it, else fp16; on Apple MPS fp32
    (untested here); on the CPU a quick calibration (a few forward passes, cached for the
    process) picks bf16 only if it is at least 1.25x faster than fp32, so ``auto`` never
    chooses a slower path.
    """
    import torch

    device = torch.device(device)
    requested = (requested or "auto").lower()
    if requested not in ("auto", *PRECISIONS):
        raise ValueError(f"unknown precision {requested!r}; use auto, fp32, bf16 or fp16")
    if requested != "auto":
        if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bf16; use --precision fp16 or fp32")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type != "cpu":
        return "fp32"
    key = (device.type, torch.get_num_threads(),
           tuple(sorted(model.config.to_dict().items())) if hasattr(model, "config") else in_channels)
    if key not in _CALIBRATION:
        _CALIBRATION[key] = _calibrate_cpu(model, in_channels)
    return _CALIBRATION[key]


#: Training set-ups ``auto`` chooses from on a CPU: (precision, channels-last), the plain one first.
TRAINING_CANDIDATES = (("fp32", False), ("fp32", True), ("bf16", True))

# Training calibration results, per (device, threads, architecture, batch shape): measured once per process.
_TRAIN_CALIBRATION: dict[tuple, tuple[str, bool]] = {}


def _time_training_step(model, shape: tuple[int, ...], precision: str, channels_last: bool,
                        repeats: int = 2) -> float:
    """Fastest of ``repeats`` forward + backward passes of a copy of ``model`` on a random batch (after a warm-up)."""
    import copy

    import torch

    net = copy.deepcopy(model).train()  # the caller's weights and batch-norm statistics stay untouched
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    n_classes = net.config.n_classes if hasattr(net, "config") else 2

    def step():
        with autocast(precision, "cpu"):
            out = net(x)
        target = torch.zeros(out.shape[0], *out.shape[2:], dtype=torch.long)
        loss = torch.nn.functional.cross_entropy(out.float(), target.clamp(max=n_classes - 1))
        net.zero_grad(set_to_none=True)
        loss.backward()

    step()  # warm-up: the first pass picks kernels and allocates
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return min(times)  # the least disturbed pass: other load on the machine only adds time


def select_training_setup(requested: str, device, model, batch_shape: tuple[int, ...]) -> tuple[str, bool]:
    """Precision and memory layout for training: ``(precision, channels_last)``.

    Parameters
    ----------
    requested : str
        ``"auto"`` or one of :data:`PRECISIONS`.
    device : torch.device or str
    model : torch.nn.Module
        The network to train (timed on a copy; its weights are not touched).
    batch_shape : tuple of int
        ``(N, C, H, W)`` of one training batch.

    Notes
    -----
    An explicit precision is kept, in the layout used with it everywhere (channels-last
    for bf16/fp16, the plain layout for fp32), so a run asked for in fp32 repeats bit for
    bit. ``"auto"`` on a GPU is :func:`select_precision` with channels-last for reduced
    precision. ``"auto"`` on a CPU times one forward + backward pass of the model at the
    run's batch shape in each of :data:`TRAINING_CANDIDATES` (about a second for the
    default network) and keeps the plain fp32 set-up unless another is at least 1.25x
    faster: what wins depends on the CPU. One training step of the default network,
    8 patches of 128 px: on an AMD EPYC with AVX-512 and AVX512-BF16 (no AMX) 129 ms in
    fp32, 87 ms fp32 channels-last, 67 ms bf16 channels-last; on a Xeon with AVX-512 but no
    BF16 instructions channels-last fp32 was 2.7x slower and bf16 2.5x slower than plain
    fp32. Cached per process for the device, thread count, architecture and batch shape.
    """
    import torch

    device = torch.device(device)
    requested = (requested or "auto").lower()
    if requested != "auto" or device.type != "cpu":
        precision = select_precision(requested, device, model=model)
        return precision, precision != "fp32"
    key = (device.type, torch.get_num_threads(), tuple(batch_shape),
           tuple(sorted(model.config.to_dict().items())) if hasattr(model, "config") else type(model).__name__)
    if key not in _TRAIN_CALIBRATION:
        times = {}
        for precision, channels_last in TRAINING_CANDIDATES:
            try:
                times[(precision, channels_last)] = _time_training_step(model, batch_shape, precision, channels_last)
            except Exception:  # noqa: BLE001 - a set-up this CPU/build cannot run is simply not a candidate
                continue
        plain = TRAINING_CANDIDATES[0]
        choice = plain
        if times:
            best = min(times, key=times.get)
            if plain not in times or times[best] < 0.8 * times[plain]:
                choice = best
        _TRAIN_CALIBRATION[key] = choice
    return _TRAIN_CALIBRATION[key]


def autocast(precision: str, device):
    """A context manager running the enclosed ops in ``precision`` (a no-op for fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype)
