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

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import BAD_INPUT_ERRORS

__all__ = ["DistContext", "DistributedError", "init_from_env", "under_torchrun", "env_rank", "shard",
           "sync_batch_norm", "plain_batch_norm", "BAD_INPUT_ERRORS",
           "DEFAULT_TIMEOUT"]

T = TypeVar("T")



#: Seconds a collective waits for the other ranks before failing (instead of hanging forever when
#: one of them died without torchrun noticing, e.g. on another node).
DEFAULT_TIMEOUT = 600.0


class DistributedError(RuntimeError):
    """Raised on EVERY rank after the ranks agreed that one or more of them failed.

    Attributes
    ----------
    failures : dict
        ``rank -> (exception type name, one-line message, bad input?)`` of the ranks that failed.
    world_size : int
        Ranks in the job.
    """

    def __init__(self, failures: dict[int, tuple[str, str, bool]], world_size: int):
        self.failures = dict(sorted(failures.items()))
        self.world_size = world_size
        super().__init__(self._message())

    @property
    def bad_input(self) -> bool:
        """True when every failing rank failed on bad input (a ValueError, OSError or MemoryError)."""
        return all(bad for _, _, bad in self.failures.values())

    def reworded(self, fn: Callable[[str], str], types: tuple[str, ...]) -> DistributedError:
        """The same failures, with ``fn(message)`` for the exceptions of the named types (e.g. to name files)."""
        return DistributedError({r: (t, fn(m) if t in types else m, b)
                                 for r, (t, m, b) in self.failures.items()}, self.world_size)

    def _message(self) -> str:
        by_message: dict[str, list[int]] = {}
        for rank, (_, message, _) in self.failures.items():
            by_message.setdefault(message, []).append(rank)
        if len(by_message) == 1 and len(self.failures) == self.world_size:
            return next(iter(by_message))  # every rank failed alike: as a single process would say it
        return "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {message}"
                         for message, ranks in by_message.items())


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
        """The device of this rank: its own GPU (``cuda:LOCAL_RANK``) under NCCL, else as requested.

        Raises ``ValueError`` for a numbered GPU (``cuda:1``) under NCCL: every rank would use it.
        """
        if self.backend == "nccl":
            if requested in ("auto", "cuda"):
                return f"cuda:{self.local_rank}"
            if requested.startswith("cuda:"):
                raise ValueError(f"--device {requested}: under torchrun each process uses the GPU numbered by its "
                                 "LOCAL_RANK; give --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose GPUs")
        return requested

    @property
    def comm_device(self):
        """Where tensors for collectives live: this rank's GPU under NCCL, else the CPU (Gloo)."""
        import torch

        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def all_reduce(self, values, op: str = "sum"):
        """Collective: ``values`` (a 1D tensor or a list of floats) summed (or ``"max"``) over the ranks.

        Returns a float64 tensor on the device of ``values`` (the CPU for a list). Works in a
        single process too (then it returns the values).
        """
        import torch

        t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
        home = t.device
        t = t.detach().to(self.comm_device if self.distributed else home, torch.float64)
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.to(home)

    def broadcast(self, obj: T) -> T:
        """Collective: rank 0's ``obj`` (any picklable value) on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, error: BaseException | None = None) -> None:
        """Collective: every rank says whether it failed; if any did, raise :class:`DistributedError` on all.

        Call it on every rank at the same point (e.g. after reading the inputs), with the
        exception this rank met or ``None``. Without it, a rank that fails alone leaves the
        others waiting in their next collective. In a single process it re-raises ``error``.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        from .io import first_line

        mine = None if error is None else (type(error).__name__, first_line(error),
                                           isinstance(error, BAD_INPUT_ERRORS))
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        failures = {rank: tuple(g) for rank, g in enumerate(gathered) if g is not None}
        if failures:
            raise DistributedError(failures, self.world_size) from error

    @contextlib.contextmanager
    def agreeing(self) -> Iterator[None]:
        """Run a block on every rank and :meth:`agree` on its outcome at the end.

        If the block raises on any rank, every rank raises :class:`DistributedError`; in a
        single process the block's own exception comes out unchanged.
        """
        try:
            yield
        except Exception as e:
            if not self.distributed:
                raise
            self.agree(e)  # raises on every rank
        else:
            self.agree(None)

    def shutdown(self, wait: bool = False) -> None:
        """Destroy the process group (safe to call twice, or when not distributed).

        ``wait``: the run ended normally on this rank; wait (at most a minute) until every rank
        has, before tearing the group down. Without it a rank done early destroyed its Gloo
        group while rank 0 was still checking and writing the model, and now and then aborted
        at exit ("terminate called without an active exception", seen once in CI's two-rank
        test). After an error no rank waits: the others may never arrive.
        """
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                if wait:
                    import datetime

                    try:
                        if dist.get_backend() == "gloo":
                            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
                        else:
                            dist.barrier()
                    except Exception:  # noqa: BLE001 - a rank gone or late: nothing left to wait for
                        pass
                dist.destroy_process_group()


def under_torchrun() -> bool:
    """True when the environment holds torchrun's variables for a job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def env_rank() -> int | None:
    """This process's rank under torchrun (from ``RANK``), or ``None`` when not distributed."""
    return int(os.environ["RANK"]) if under_torchrun() else None


def init_from_env(device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> DistContext:
    """Join the process group described by torchrun's environment, or return a single-process context.

    Parameters
    ----------
    device : str
        The device asked for; ``"cpu"`` forces Gloo even where CUDA is present.
    timeout : float
        Seconds a collective waits for the other ranks before it fails: a rank that died
        unnoticed makes the others fail after this long instead of hanging for ever.

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
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise ValueError(f"process {local_rank} of this node has no GPU of its own ({n_gpus} here); start at most "
                             f"{n_gpus} processes per node (--nproc_per_node) or use --device cpu")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def sync_batch_norm(model):
    """Swap the model's batch norms for ``torch.nn.SyncBatchNorm`` (statistics over the global batch), in place.

    Only for CUDA: PyTorch's SyncBatchNorm refuses CPU tensors. The swapped modules share
    the parameters and running statistics of the originals, so an optimiser made before
    keeps working. Undo with :func:`plain_batch_norm` before saving or predicting.
    """
    import torch

    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def plain_batch_norm(module):
    """Swap ``SyncBatchNorm`` modules back for ``BatchNorm2d`` (same parameters and statistics), in place."""
    import torch

    if isinstance(module, torch.nn.SyncBatchNorm):
        plain = torch.nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats, device=module.running_mean.device
                                     if module.running_mean is not None else None)
        if module.affine:
            plain.weight, plain.bias = module.weight, module.bias
        plain.running_mean, plain.running_var = module.running_mean, module.running_var
        plain.num_batches_tracked = module.num_batches_tracked
        plain.train(module.training)
        return plain
    for name, child in module.named_children():
        swapped = plain_batch_norm(child)
        if swapped is not child:
            setattr(module, name, swapped)
    return module


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item from ``rank`` (each item exactly once)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return list(items[rank::world_size])
