"""Choosing the torch device. Imports torch lazily so that ``import napari_unet`` stays light."""

from __future__ import annotations

__all__ = ["resolve_device", "DeviceError"]


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
