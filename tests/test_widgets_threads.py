"""What the widgets' worker threads do for the viewer's sake: a lower OS priority, and no
garbage-collector pass over the whole session while a job runs (see ``napari_unet/tuning.py``)."""

from __future__ import annotations

import gc
import os
import sys
import threading

import pytest
from qtpy.QtWidgets import QWidget

from napari_unet import tuning
from napari_unet._widgets import _common
from napari_unet.errors import BAD_INPUT_ERRORS


def _run_job(qtbot, job):
    owner = QWidget()
    qtbot.addWidget(owner)
    runner = _common.WorkerRunner(owner)
    seen = []
    with qtbot.waitSignal(runner.finished, timeout=30_000):
        runner.start(job, returned=seen.append)
    assert not runner.running
    return seen[0]


def test_a_job_runs_with_the_session_frozen_then_unfreezes(qtbot):
    assert gc.get_freeze_count() == 0

    def job():
        yield
        inside = gc.get_freeze_count()
        garbage = [[] for _ in range(1000)]
        for a, b in zip(garbage, garbage[1:]):  # cycles made during the job are still collected
            a.append(b), b.append(a)
        del garbage, a, b
        return inside, gc.collect()

    frozen, collected = _run_job(qtbot, job)
    assert frozen > 1000  # the objects that existed when the job started
    assert collected >= 1000
    assert gc.get_freeze_count() == 0  # nothing stays frozen after the job


def test_a_stopped_job_unfreezes_too(qtbot):
    """A stopped worker abandons its generator (no clean-up runs in it): the runner unfreezes."""
    owner = QWidget()
    qtbot.addWidget(owner)
    runner = _common.WorkerRunner(owner)
    started = threading.Event()

    def endless():
        while True:
            started.set()
            yield

    with qtbot.waitSignal(runner.finished, timeout=30_000):
        runner.start(endless)
        assert started.wait(10) and gc.get_freeze_count() > 0
        runner.stop()
    assert gc.get_freeze_count() == 0


def test_full_collections_wait_for_the_end_of_the_jobs(qtbot):
    before = gc.get_threshold()

    def job():
        yield
        return gc.get_threshold()

    during = _run_job(qtbot, job)
    assert during[:2] == before[:2] and during[2] >= 1 << 30
    assert gc.get_threshold() == before


def _job_raising(qtbot, message):
    """Run a job that raises ``RuntimeError(message)``: (exceptions napari re-raised in the
    event loop, what the errored slot got); the runner must have finished and unfrozen."""
    owner = QWidget()
    qtbot.addWidget(owner)
    runner = _common.WorkerRunner(owner)
    errors = []

    def job():
        yield
        raise RuntimeError(message)

    with qtbot.capture_exceptions() as raised, qtbot.waitSignal(runner.finished, timeout=30_000):
        runner.start(job, errored=errors.append)
    assert not runner.running and gc.get_freeze_count() == 0
    return [e[1] for e in raised], errors


def test_a_job_that_raises_runtime_error_still_finishes(qtbot):
    """superqt swallows a RuntimeError (no errored, no finished): the runner re-raises it as JobError,
    which napari shows with its traceback (an unexpected error)."""
    raised, errors = _job_raising(qtbot, "CUDA error: an illegal memory access was encountered")
    assert [type(e) for e in raised] == [_common.JobError] and [type(e) for e in errors] == [_common.JobError]
    assert _common.first_line(errors[0]) == "RuntimeError: CUDA error: an illegal memory access was encountered"


def test_out_of_memory_from_a_job_is_the_users_problem(qtbot):
    """torch's out of memory (a RuntimeError) becomes a MemoryError: a one-line message, no traceback."""
    raised, errors = _job_raising(qtbot, "CUDA out of memory. Tried to allocate 2.00 GiB")
    assert raised == []
    assert [type(e) for e in errors] == [MemoryError] and isinstance(errors[0], BAD_INPUT_ERRORS)
    assert "out of memory" in str(errors[0])


def test_gc_paused_collects_nothing_and_freezes_what_it_made_during_a_job(qtbot):
    def job():
        yield
        before = gc.get_freeze_count()
        with tuning.gc_paused():
            enabled = gc.isenabled()
            made = [[i] for i in range(5000)]  # lists are always tracked by the collector
        return enabled, gc.isenabled(), gc.get_freeze_count() - before, len(made)

    enabled_inside, enabled_after, newly_frozen, n = _run_job(qtbot, job)
    assert enabled_inside is False and enabled_after is True
    assert newly_frozen >= n
    assert gc.get_freeze_count() == 0


def test_gc_paused_outside_a_job_only_pauses():
    was = gc.isenabled()
    with tuning.gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled() == was and gc.get_freeze_count() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux-only")
def test_jobs_run_at_a_lower_priority_than_the_gui_thread(qtbot):
    def job():
        yield
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    gui = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert _run_job(qtbot, job) >= min(gui + tuning.WORKER_NICENESS, 19)
