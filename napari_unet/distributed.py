"""Running on several processes with PyTorch's own ``torchrun`` / DistributedDataParallel.

``torchrun`` starts one process per GPU (or per CPU share) and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`init_from_env` turns
them into a process group (NCCL on GPUs, Gloo on CPUs) and a :class:`DistContext`. The
training engine uses the context to wrap the model in DDP, give each rank its share of
every global batch, average the loss, and stop all ranks at the same iteration; the CLI
uses it so that only rank 0 prints progress and writes the model file, and to split
files between ranks for prediction.

No Qt; torch is imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

__all__ = ["DistContext", "init_from_env", "under_torchrun", "shard", "pair_by_name", "LABEL_SUFFIXES",
           "IMAGE_EXTENSIONS"]

T = TypeVar("T")

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
#: Accepted differences between an image's name and its labels' name (``cell01.tif`` -> ``cell01_labels.tif``).
LABEL_SUFFIXES = ("", "_labels", "_label", "_mask", "_masks", "_seg", "_gt")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a distributed job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on the process that prints progress and writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device_name(self, requested: str = "auto") -> str:
        """The device of this rank: its own GPU (``cuda:LOCAL_RANK``) under NCCL, else as requested."""
        if self.backend == "nccl" and requested in ("auto", "cuda"):
            return f"cuda:{self.local_rank}"
        return requested

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def shutdown(self) -> None:
        """Destroy the process group (safe to call twice, or when not distributed)."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def under_torchrun() -> bool:
    """True when the environment holds torchrun's variables for a job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment, or return a single-process context.

    Parameters
    ----------
    device : str
        The device asked for; ``"cpu"`` forces Gloo even where CUDA is present.

    Notes
    -----
    The backend is NCCL when CUDA is available and not refused by ``device``, else Gloo.
    Each rank of an NCCL job uses the GPU ``LOCAL_RANK``.
    """
    if not under_torchrun():
        return DistContext()
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and device not in ("cpu", "mps")
    backend = "nccl" if use_cuda else "gloo"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item from ``rank`` (each item exactly once)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return list(items[rank::world_size])


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def pair_by_name(images_dir: str | os.PathLike, labels_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Pair the images of one folder with the label files of another, by file name.

    ``cell01.tif`` pairs with ``cell01.tif``, ``cell01_labels.tif``, ``cell01_mask.png``
    ... (see :data:`LABEL_SUFFIXES`) in ``labels_dir``. Images without labels are left
    out (a folder may hold unlabelled images); it is an error when no image has labels,
    when a label file fits several images, or when an image has several label files.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for d, what in ((images_dir, "images"), (labels_dir, "labels")):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such folder (--{what})")
    labels_by_stem: dict[str, list[Path]] = {}
    for p in _image_files(labels_dir):
        labels_by_stem.setdefault(p.stem.lower(), []).append(p)
    pairs: list[tuple[Path, Path]] = []
    used: dict[Path, Path] = {}
    for img in _image_files(images_dir):
        found = [lab for suffix in LABEL_SUFFIXES for lab in labels_by_stem.get(img.stem.lower() + suffix, [])]
        found = [lab for lab in found if lab.resolve() != img.resolve()]
        if not found:
            continue
        if len(found) > 1:
            raise ValueError(f"{img.name}: several label files fit ({', '.join(p.name for p in found)})")
        lab = found[0]
        if lab in used:
            raise ValueError(f"{lab.name} fits both {used[lab].name} and {img.name}")
        used[lab] = img
        pairs.append((img, lab))
    if not pairs:
        raise ValueError(f"no image in {images_dir} has a label file of the same name in {labels_dir} "
                         f"(accepted: NAME.tif, NAME_labels.tif, NAME_mask.tif, ...)")
    return pairs
