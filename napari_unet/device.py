"""Choosing the torch device and the compute precision.

Imports torch lazily so that ``import napari_unet`` stays light. Never assume reduced
precision is faster: without bf16 hardware (AMX or AVX512-BF16) bf16 autocast is emulated
and several times *slower* than fp32, with it several times faster (measurements in
docs/benchmarks.md). ``select_precision("auto", ...)`` therefore keeps fp32 on CPUs
without bf16 hardware, and on the others measures once per machine (cached on disk) and
takes bf16 only if it is clearly faster.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

__all__ = ["resolve_device", "DeviceError", "select_precision", "select_training_setup", "native_bf16", "cpu_name",
           "cache_dir", "autocast", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16", "fp16")

# Precision choices of this process, per key (see _cache_key); also kept on disk (see cache_dir).
_CALIBRATION: dict[str, str] = {}


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


# ---- precision: decided from the hardware, confirmed by a measurement, cached per machine --------

#: bf16 must be at least this much faster (time ratio) to be chosen: noise cannot flip a tie.
BF16_MARGIN = 0.8
#: Timed calls per candidate (after a warm-up); the fastest counts.
REPEATS = 5


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX tiles or AVX512-BF16), as oneDNN will use it.

    Without it, bf16 is emulated and several times slower than fp32: ``auto`` never picks it then.
    A ``ONEDNN_MAX_CPU_ISA`` limit below the bf16 instruction sets counts as no support.
    """
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa and isa != "ALL" and "BF16" not in isa and "AMX" not in isa:
        return False
    import torch

    cpu = getattr(torch, "cpu", None)
    # torch's own capability queries (private, hence looked up defensively).
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        query = getattr(cpu, name, None)
        try:
            if query is not None and query():
                return True
        except Exception:  # noqa: BLE001 - a query this build lacks means "not known": fp32
            continue
    return False


def cpu_name() -> str:
    """The processor's model name (the cache key of the measured choices)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    """Where measured choices are kept: ``$NAPARI_UNET_CACHE``, else the user's cache folder."""
    env = os.environ.get("NAPARI_UNET_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-unet"


def _cache_file() -> Path:
    return cache_dir() / "precision.json"


def _cache_key(kind: str, model, shape: tuple[int, ...]) -> str:
    import torch

    arch = model.config.to_dict() if hasattr(model, "config") else type(model).__name__
    return "|".join([kind, cpu_name(), torch.__version__, f"threads={torch.get_num_threads()}",
                     os.environ.get("ONEDNN_MAX_CPU_ISA", "") or "isa=all", json.dumps(arch, sort_keys=True),
                     "x".join(map(str, shape))])


def _cache_get(key: str):
    try:
        with open(_cache_file(), encoding="utf-8") as f:
            return json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _cache_put(key: str, value) -> None:
    """Best effort, atomic (a temporary file renamed): a read-only home only costs re-measuring."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, encoding="utf-8") as f:
                table = json.load(f)
            if not isinstance(table, dict):
                table = {}
        except (OSError, ValueError):
            table = {}
        table[key] = value
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def _best_times(fns: dict, repeats: int = REPEATS, warmup: int = 1, budget_s: float = 10.0) -> dict:
    """The fastest of ``repeats`` calls of each function, after ``warmup`` calls, the candidates
    interleaved (so that a slow spell of the machine hits them alike); fewer repeats when the
    ``budget_s`` is spent. A candidate that raises is left out."""
    best: dict = {}
    ok = dict(fns)
    for name, fn in list(ok.items()):
        try:
            for _ in range(warmup):
                fn()
        except Exception:  # noqa: BLE001 - a path this CPU/build cannot run is simply not a candidate
            ok.pop(name)
    end = time.perf_counter() + budget_s
    for _ in range(repeats):
        for name, fn in ok.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
        if time.perf_counter() > end:
            break
    return best


def _forward_times(model, shape: tuple[int, ...]) -> dict:
    """fp32 (as prediction runs it: channels-last) and bf16-autocast forward times at ``shape``."""
    import torch

    net = model
    was_training = net.training
    net.eval()
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    try:
        net = net.to(memory_format=torch.channels_last)

        def run(precision):
            def call():
                with torch.inference_mode(), autocast(precision, "cpu"):
                    net(x)
            return call

        return _best_times({"fp32": run("fp32"), "bf16": run("bf16")})
    finally:
        net.train(was_training)


def select_precision(requested: str, device, model=None, in_channels: int = 1,
                     shape: tuple[int, ...] | None = None) -> str:
    """Choose the compute precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    Parameters
    ----------
    requested : str
        ``"auto"`` or one of :data:`PRECISIONS`. An explicit choice is returned as is
        (after checking the device can do it).
    device : torch.device or str
        Where the model runs.
    model : torch.nn.Module, optional
        The network that will run (timed as it is; its weights are not changed).
    shape : tuple of int, optional
        ``(N, C, H, W)`` of the batches the job will run (default one 256 px tile).

    Notes
    -----
    ``"auto"`` on CUDA is bf16 where the GPU supports it, else fp16; on Apple MPS fp32
    (untested here). On a CPU: fp32 unless the processor computes bf16 in hardware
    (:func:`native_bf16`: AMX or AVX512-BF16; emulated bf16 is several times slower), and
    then bf16 only if a measurement at the job's batch shape (warm-up, interleaved repeats,
    the best of each) finds it at least ``1 / BF16_MARGIN`` = 1.25x faster. The decision is
    kept in a small per-user cache (:func:`cache_dir`) keyed by processor, torch version,
    threads, architecture and shape, so it is measured once per machine, not at every start.
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
    if device.type != "cpu" or not native_bf16():
        return "fp32"
    if model is None:
        model = _generic_net(in_channels)
    channels = model.config.in_channels if hasattr(model, "config") else in_channels
    shape = tuple(int(v) for v in (shape or (1, channels, 256, 256)))
    key = _cache_key("predict", model, shape)
    if key in _CALIBRATION:
        return _CALIBRATION[key]
    cached = _cache_get(key)
    if cached in ("fp32", "bf16"):
        _CALIBRATION[key] = cached
        return cached
    times = _forward_times(model, shape)
    choice = "bf16" if "bf16" in times and "fp32" in times and times["bf16"] < BF16_MARGIN * times["fp32"] else "fp32"
    _CALIBRATION[key] = choice
    _cache_put(key, choice)
    return choice


def _generic_net(in_channels: int):
    """A conv stack like a U-Net level, for a choice made without a model."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1),
    ).eval()


#: Training set-ups ``auto`` chooses from on a CPU with native bf16: (precision, channels-last),
#: the plain one first. Without native bf16 training runs in plain fp32, unmeasured.
TRAINING_CANDIDATES = (("fp32", False), ("bf16", True))

# Training calibration results, per key (see _cache_key): measured once per machine.
_TRAIN_CALIBRATION: dict[str, tuple[str, bool]] = {}


def _time_training_step(model, shape: tuple[int, ...], precision: str, channels_last: bool):
    """A function running one forward + backward pass of a copy of ``model`` on a random batch."""
    import copy

    import torch

    net = copy.deepcopy(model).train()  # the caller's weights and batch-norm statistics stay untouched
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    n_classes = net.config.n_classes if hasattr(net, "config") else 2

    def step():
        net.zero_grad(set_to_none=True)
        with autocast(precision, "cpu"):
            out = net(x)
        target = torch.zeros(out.shape[0], *out.shape[2:], dtype=torch.long)
        torch.nn.functional.cross_entropy(out.float(), target[:, :out.shape[2], :out.shape[3]] % n_classes).backward()

    return step


def select_training_setup(requested: str, device, model, batch_shape: tuple[int, ...],
                          max_time: float | None = None) -> tuple[str, bool]:
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
    max_time : float, optional
        The run's time budget (s): measuring takes at most about 5 % of it.

    Notes
    -----
    An explicit precision is kept, in the layout used with it everywhere (channels-last
    for bf16/fp16, the plain layout for fp32), so a run asked for in fp32 repeats bit for
    bit. ``"auto"`` on a GPU is :func:`select_precision` with channels-last for reduced
    precision. ``"auto"`` on a CPU: plain fp32 unless the processor computes bf16 in
    hardware (:func:`native_bf16`); then one training step in each of
    :data:`TRAINING_CANDIDATES` is timed at the run's batch shape (warm-up, interleaved
    repeats, the best of each) and bf16 is kept if at least 1.25x faster. When one step
    would make the measurement cost more than 5 % of ``max_time``, bf16 is taken without it
    (with bf16 hardware it has always measured faster for training steps; docs/benchmarks.md).
    Cached per machine like :func:`select_precision`.
    """
    import torch

    device = torch.device(device)
    requested = (requested or "auto").lower()
    if requested != "auto" or device.type != "cpu":
        precision = select_precision(requested, device, model=model)
        return precision, precision != "fp32"
    plain = TRAINING_CANDIDATES[0]
    if not native_bf16():
        return plain
    key = _cache_key("train", model, tuple(batch_shape))
    if key in _TRAIN_CALIBRATION:
        return _TRAIN_CALIBRATION[key]
    cached = _cache_get(key)
    if isinstance(cached, list) and tuple(cached) in TRAINING_CANDIDATES:
        _TRAIN_CALIBRATION[key] = tuple(cached)
        return tuple(cached)
    steps = {c: _time_training_step(model, batch_shape, *c) for c in TRAINING_CANDIDATES}
    t0 = time.perf_counter()
    try:
        steps[plain]()  # also the warm-up of the plain set-up
    except Exception:  # noqa: BLE001 - cannot even run the plain step: let training say why
        return plain
    one = time.perf_counter() - t0
    allowance = 0.05 * max_time if max_time else float("inf")
    if 8 * one > allowance:  # 2 set-ups x (warm-up + 3 repeats): too dear for this run
        choice = TRAINING_CANDIDATES[1]
    else:
        times = _best_times(steps, repeats=3, warmup=1, budget_s=max(allowance - 2 * one, one))
        best = min(times, key=times.get) if times else plain
        choice = best if plain in times and times[best] < BF16_MARGIN * times[plain] else plain
    _TRAIN_CALIBRATION[key] = choice
    _cache_put(key, list(choice))
    return choice


def autocast(precision: str, device):
    """A context manager running the enclosed ops in ``precision`` (a no-op for fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype)
