"""Is napari still responsive while the widgets train and segment? Event-loop gaps, measured.

napari runs under Xvfb with the Train and Segment widgets docked and the sample loaded. A
10 ms ``QTimer`` on the GUI thread records when it actually fires; a "gap" is the time
between two consecutive ticks (10 ms when the event loop is free). Phases, all in one run:

* ``idle``: nothing running (the floor of this machine).
* ``train, first run``: click Start in the Train widget (the worker imports torch, then
  trains with the live preview on), a time budget of ``--train-seconds``.
* ``train, continue``: click Start again (torch already imported).
* ``segment``: click Run in the Segment widget on a ``--size`` square image with the packaged model.
* ``baseline: train on the GUI thread``: the same training generator drained on the GUI thread
  for ``--blocking-seconds``, as a plugin without a worker would (what users must not see).

Prints max, 99th percentile and median gap per phase, and how many gaps exceeded 100 ms,
then which long gaps fell inside the widgets' own GUI-thread slots. A reference phase shows
what napari itself needs to display a 384 x 384 Labels update (the live preview's size)
with nothing else running. Target: max gap under 100 ms while the widgets work.

Phases ``reference: napari adds a ... Labels layer`` and ``segment ... again`` show napari's
own cost of a new layer and the steady state of segmenting (the result layer updated).
Each long gap is attributed to the widgets' GUI-thread slots and to the button click that
started the phase.

Latest results are in docs/gui.md ("Does the viewer stay responsive?"), with what was fixed
from this script's output, cProfile and py-spy: napari's progress bar ran
``QApplication.processEvents()`` on every change (now once per percent); the preview layer
is made at Start and its transforms set only on a move; worker threads run at a lower OS
priority; torch's libraries are loaded outside the GIL (``tuning.import_torch``); the
garbage collector skips the session's objects while a job runs (``tuning.gc_job_started``);
training leaves one core to the viewer by default.

Run: ``xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/responsiveness.py``
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _percentile(gaps: list[float], q: float) -> float:
    return float(np.percentile(gaps, q)) if gaps else float("nan")


class GapRecorder:
    """Timestamps of a 10 ms QTimer; ``gaps_ms(t0, t1)`` are the intervals between ticks in [t0, t1]."""

    def __init__(self):
        from qtpy.QtCore import Qt, QTimer

        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setTimerType(Qt.PreciseTimer)
        self.timer.setInterval(10)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))
        self.timer.start()

    def gaps_ms(self, t0: float, t1: float) -> list[float]:
        """Intervals between ticks from the last tick before ``t0`` to the first after ``t1``."""
        t = np.asarray(self.ticks)
        i0 = max(int(np.searchsorted(t, t0)) - 1, 0)
        i1 = min(int(np.searchsorted(t, t1)) + 1, len(t))
        return list(np.diff(t[i0:i1]) * 1000.0)

    def long_gaps(self, t0: float, t1: float, over_ms: float = 100.0) -> list[tuple[float, float]]:
        t = np.asarray(self.ticks)
        t = t[(t >= t0 - 1.0) & (t <= t1 + 1.0)]
        return [(a, b) for a, b in zip(t[:-1], t[1:]) if (b - a) * 1000 > over_ms and b >= t0 and a <= t1]


class SlotTimer:
    """Wraps a widget's worker slots to record when they run on the GUI thread (to explain gaps)."""

    def __init__(self, widget, names):
        self.spans: list[tuple[float, float, str]] = []
        for name in names:
            fn = getattr(widget, name)
            setattr(widget, name, self._wrap(fn, name))

    def _wrap(self, fn, name):
        def slot(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.spans.append((t0, time.perf_counter(), name))
        return slot

    def in_slots(self, a: float, b: float) -> float:
        """Seconds of [a, b] spent inside recorded slots."""
        return sum(max(0.0, min(b, e) - max(a, s)) for s, e, _ in self.spans)


def _wait(app, seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.002)  # the benchmark's own loop, not the widgets': keep the timer honest


#: (start, end) of each button click's own slot (Start, Run: copies layers, makes the preview layer).
CLICKS: list[tuple[float, float, str]] = []


def _run_until_finished(app, runner, click) -> float:
    from qtpy.QtCore import QEventLoop

    loop = QEventLoop()
    runner.finished.connect(loop.quit)
    t0 = time.perf_counter()
    click()
    CLICKS.append((t0, time.perf_counter(), "click"))
    if runner.worker is not None:
        loop.exec_()
    runner.finished.disconnect(loop.quit)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seconds", type=float, default=20.0)
    parser.add_argument("--blocking-seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=1024, help="side of the image to segment")
    args = parser.parse_args(argv)
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        sys.exit("no display: run under xvfb-run (see the module docstring)")

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_unet._sample_data import cells_sample
    from napari_unet._widgets import SegmentWidget, TrainWidget
    from napari_unet.synthetic import make_nuclei

    viewer = napari.Viewer(show=True)
    for data, kw, kind in cells_sample():
        getattr(viewer, f"add_{kind}")(data, **kw)
    train = TrainWidget(viewer)
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(train, name="Train U-Net")
    viewer.window.add_dock_widget(segment, name="Segment with U-Net", tabify=True)
    app = QApplication.instance()
    _wait(app, 1.0)
    rec = GapRecorder()
    rows = []
    slots = [SlotTimer(train, ["_on_yielded", "_on_finished"]), SlotTimer(segment, ["_on_yielded", "_on_finished"])]
    explained = []

    def phase(name, fn):
        _wait(app, 0.5)  # let the previous step's GUI work settle outside the measured window
        t0 = time.perf_counter()
        fn()
        _wait(app, 0.5)  # the end of a job belongs to it: the result layer's first draw, ...
        t1 = time.perf_counter()
        gaps = rec.gaps_ms(t0, t1)
        rows.append((name, t1 - t0, max(gaps, default=float("nan")), _percentile(gaps, 99), _percentile(gaps, 50),
                     sum(g > 100 for g in gaps)))
        for a, b in rec.long_gaps(t0, t1):
            in_slot = sum(st.in_slots(a, b) for st in slots)
            in_click = sum(max(0.0, min(b, e) - max(a, s)) for s, e, _ in CLICKS)
            explained.append((name, (b - a) * 1000, in_slot * 1000, in_click * 1000))

    phase("idle", lambda: _wait(app, 3.0))

    def redraws():  # napari's own cost of showing a new preview (software OpenGL under Xvfb)
        rng = np.random.default_rng(0)
        layer = viewer.add_labels(np.zeros((384, 384), np.uint16), name="redraw test")
        _wait(app, 0.5)
        t_end = time.perf_counter() + 3.0
        while time.perf_counter() < t_end:
            layer.data = rng.integers(0, 50, (384, 384)).astype(np.uint16)
            _wait(app, 0.5)
        viewer.layers.remove(layer)

    phase("reference: idle, a 384x384 Labels update every 0.5 s", redraws)
    train.budget_kind.value = "seconds"
    train.budget.value = int(args.train_seconds)
    phase("train, first run (imports torch)", lambda: _run_until_finished(app, train.runner, train.start_button.click))
    iters_first = train._last_event.iteration if train._last_event is not None else 0
    import torch

    from napari_unet._widgets.train import gui_threads

    n_cores = torch.get_num_threads()
    default = gui_threads(n_cores)
    its = {}
    for threads in sorted({n_cores, default}, reverse=True):
        # The widget's "CPU threads" option; its default (0) leaves one core to the viewer.
        train.threads.value = 0 if threads == default else threads
        name = (f"train, continue ({threads} torch thread{'s' if threads > 1 else ''}"
                f"{', the default' if threads == default else ''})")
        phase(name, lambda: _run_until_finished(app, train.runner, train.start_button.click))
        its[name] = train._last_event.iteration if train._last_event is not None else 0
    train.threads.value = 0
    big, _ = make_nuclei((args.size, args.size), seed=11)
    viewer.add_image(big, name="big")

    def add_layer():  # napari's own cost of a new Labels layer of the result's size
        layer = viewer.add_labels(np.zeros((args.size, args.size), np.uint16), name="layer test")
        _wait(app, 1.0)
        viewer.layers.remove(layer)
        _wait(app, 0.5)

    phase(f"reference: napari adds a {args.size}x{args.size} Labels layer", add_layer)
    segment.image.value = viewer.layers["big"]
    segment.model.value = _sample_entry(segment)
    phase(f"segment {args.size}x{args.size} (packaged model, creates the layer)",
          lambda: _run_until_finished(app, segment.runner, segment.run_button.click))
    phase(f"segment {args.size}x{args.size} again (updates the layer)",
          lambda: _run_until_finished(app, segment.runner, segment.run_button.click))

    def blocking():
        from napari_unet.config import TrainConfig
        from napari_unet.training import train as train_gen

        (image, _, _), (labels, _, _) = cells_sample()
        end = time.perf_counter() + args.blocking_seconds
        for _ in train_gen(image, labels, TrainConfig(max_time=args.blocking_seconds, patch_size=256)):
            if time.perf_counter() > end:
                break
        app.processEvents()

    _wait(app, 0.5)
    phase("baseline: train on the GUI thread", blocking)
    _wait(app, 0.2)

    print(f"iterations per training phase: {its}")
    print(f"napari {napari.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{os.cpu_count()} CPUs; first training run: {iters_first} iterations; "
          f"segment state: {segment.state.text()}")
    print()
    print("| phase | seconds | max gap (ms) | p99 gap (ms) | median gap (ms) | gaps > 100 ms |")
    print("|---|---|---|---|---|---|")
    for name, dur, mx, p99, med, n_long in rows:
        print(f"| {name} | {dur:.1f} | {mx:.0f} | {p99:.0f} | {med:.1f} | {n_long} |")
    print()
    print("Gaps over 100 ms and how much of each the widgets' own GUI-thread slots took:")
    for name, gap, in_slot, in_click in explained:
        print(f"  {name}: {gap:.0f} ms, {in_slot:.0f} ms in widget slots, {in_click:.0f} ms in the button's click")
    slow = sorted(((e - s) * 1000, n) for st in slots for s, e, n in st.spans if e - s > 0.05)
    print("Widget slots over 50 ms (ms, slot):", [(round(d), n) for d, n in slow[::-1][:10]])
    viewer.close()
    return 0


def _sample_entry(segment):
    for entry in segment.model.choices:
        if entry.name.startswith("sample model"):
            return entry
    raise SystemExit("the packaged sample model is missing; run sample_data/make_sample_data.py")


if __name__ == "__main__":
    sys.exit(main())
