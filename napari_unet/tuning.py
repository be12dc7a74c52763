"""Process-wide tuning: the few settings that change how the whole process runs, in one place.

Each is turned on only by the caller that needs it, and kept only because a measurement
showed that it pays (the numbers are in docs/benchmarks.md and docs/gui.md):

========================  ==========================================  ==============================
setting                   turned on by                                undone
========================  ==========================================  ==============================
:func:`import_torch`      the widgets' worker threads (first job)     nothing to undo (loads once)
:func:`tune_malloc`       ``napari-unet predict`` (a short-lived      never: process-wide, and the
                          process)                                    command ends
:func:`torch_threads`     :func:`napari_unet.training.train` when     when the run ends, however
                          ``TrainConfig.threads`` is set              it ends
:func:`background_        every widget job, in its worker thread      the pool thread keeps it until
priority`                                                             Qt retires it (30 s idle)
:func:`gc_job_started`,   the widgets: around every job, and around   when the last job ends
:func:`gc_paused`         the imports of the first one
========================  ==========================================  ==============================

Nothing here imports Qt, napari or torch at import time.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import os
import sys
import threading
from pathlib import Path

__all__ = ["import_torch", "tune_malloc", "torch_threads", "background_priority", "WORKER_NICENESS",
           "gc_job_started", "gc_job_ended", "gc_paused", "torch_default_threads"]


# ---- loading torch without holding the GIL ---------------------------------------------------

#: torch's own libraries loaded ahead of ``import torch`` by :func:`import_torch`, in order,
#: with the flags torch itself uses (``libtorch_global_deps`` global, as in torch's
#: ``_load_global_deps``). libtorch_cpu.so carries most of the load time (its static
#: initialisers register the operators) and needs no CUDA library.
_PRELOAD = (("libtorch_global_deps.so", os.RTLD_GLOBAL if hasattr(os, "RTLD_GLOBAL") else 0),
            ("libc10.so", 0), ("libtorch_cpu.so", 0))



def import_torch():
    """``import torch`` from a worker thread without freezing the GUI thread; returns torch.

    Importing torch loads its shared libraries from inside the import, with Python's GIL
    held, for a long pause during which no other Python thread runs (napari's event loop
    froze on the first Start, ``benchmarks/responsiveness.py``). On Linux the
    biggest libraries are loaded first with ``dlopen`` called through ctypes, which
    releases the GIL during the call; ``import torch`` then finds them loaded (the longest
    pause fell several-fold, CPU build; docs/benchmarks.md). Only the CPU libraries: a CUDA build still
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


# ---- the heap of a short-lived process ------------------------------------------------------

_MALLOC_TUNED = False


def tune_malloc(threshold: int = 1 << 30) -> bool:
    """Keep large freed blocks in the process heap (glibc only); returns whether it applied.

    glibc hands every large tensor back to the OS when it is freed and maps it again on the
    next forward: tens of thousands of page faults per tile, a measurable slowdown on the CPU.
    Raising the mmap and trim thresholds (``mallopt``) keeps that memory for reuse. It is
    process-wide and the process then keeps its peak heap, so the command line turns it on
    (short-lived process) and :func:`predict` does not (napari keeps running).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        ok = libc.mallopt(m_mmap_threshold, int(threshold)) == 1
        ok = libc.mallopt(m_trim_threshold, int(2 * threshold)) == 1 and ok
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    _MALLOC_TUNED = ok
    return ok


# ---- torch's thread count ----------------------------------------------------------------------

@contextlib.contextmanager
def torch_threads(torch, n: int | None):
    """torch's intra-op threads set to ``n`` inside the block (unchanged when ``n`` is falsy),
    then exactly what they were. Process-wide in torch: the training generator sets it for
    its run and puts it back where it is closed."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


# ---- worker threads: priority and the garbage collector ----------------------------------------

#: How much lower (in nice steps) the worker threads run than the GUI thread, see background_priority().
WORKER_NICENESS = 5



def background_priority() -> None:
    """Lower the OS priority of the calling (worker) thread, on Linux; call it before torch is used.

    With as many busy torch threads as cores, the GUI thread had to wait for a core and the
    viewer stuttered. A lower priority (nice) gives the GUI thread the CPU as soon as it needs
    it, and costs training nothing while the GUI is idle. torch's intra-op threads are created
    by the first thread that runs a parallel op and inherit its priority. On Linux ``nice`` is
    per thread; elsewhere this does nothing. A pool thread keeps the lower priority until Qt
    retires it (30 s idle): fine for the background jobs it runs.
    """
    if not (sys.platform.startswith("linux") and hasattr(os, "setpriority")):
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < WORKER_NICENESS:
            os.setpriority(os.PRIO_PROCESS, tid, WORKER_NICENESS)


# ---- the garbage collector ------------------------------------------------------------------------
#
# CPython's cyclic garbage collector stops every thread while it runs. A full pass over a
# napari session with torch loaded (hundreds of thousands of tracked objects) takes a visible pause, and
# the allocations of a job (torch's own imports above all) triggered several: they were the
# event-loop freezes of the first Start (benchmarks/responsiveness.py). While jobs run:
# - the objects that existed when the first one started are frozen (gc.freeze: collections
#   skip them; reference counting still frees them);
# - full (generation 2) collections are put off; generations 0 and 1 still collect the
#   jobs' short-lived cycles.
# When the last job ends everything is unfrozen and the thresholds restored. A full pass
# during a job would also have reset the collector's count of long-lived objects to the
# few unfrozen ones, and the next full pass, over everything, would have come right after.
# (gc.unfreeze also unfreezes what the host application may have frozen itself.)

_GC_LOCK = threading.Lock()
_GC_JOBS = 0
_GC_THRESHOLDS: tuple[int, ...] | None = None
#: Generation-2 threshold while jobs run: in effect, no full collection.
_NO_FULL_COLLECTION = 1 << 30


def gc_job_started() -> None:
    """A job starts (main thread): see above."""
    global _GC_JOBS, _GC_THRESHOLDS
    with _GC_LOCK:
        if _GC_JOBS == 0:
            _GC_THRESHOLDS = gc.get_threshold()
            gc.set_threshold(_GC_THRESHOLDS[0], _GC_THRESHOLDS[1], _NO_FULL_COLLECTION)
        _GC_JOBS += 1
        gc.freeze()


def gc_job_ended() -> None:
    """A job ended, however it ended: the last one unfreezes and restores the thresholds."""
    global _GC_JOBS, _GC_THRESHOLDS
    with _GC_LOCK:
        if _GC_JOBS == 0:
            return
        _GC_JOBS -= 1
        if _GC_JOBS == 0:
            gc.unfreeze()
            if _GC_THRESHOLDS is not None:
                gc.set_threshold(*_GC_THRESHOLDS)
                _GC_THRESHOLDS = None


@contextlib.contextmanager
def gc_paused():
    """No collection at all for a burst of allocations (imports); what it made is then frozen
    too (see :func:`gc_job_started`), so the first collection afterwards does not scan it.

    Never wrap a ``yield`` in it: a job stopped there would leave the collector disabled.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        with _GC_LOCK:
            if _GC_JOBS:
                gc.freeze()
        if was_enabled:
            gc.enable()


_TORCH_THREADS: int | None = None


def torch_default_threads(torch) -> int:
    """torch's own thread count, read once (by the first job, before any run changed it).

    Read again later it could be what a stopped run left in a reused worker thread (the
    engine restores its setting where its generator is closed, on the main thread).
    """
    global _TORCH_THREADS
    if _TORCH_THREADS is None:
        _TORCH_THREADS = torch.get_num_threads()
    return _TORCH_THREADS


