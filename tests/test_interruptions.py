"""Interrupted training always leaves a valid model with the best weights so far.

Stopping at moments drawn from a seeded RNG: closing the generator after k events (the
widget's Stop, ``worker.quit()``), a KeyboardInterrupt in the middle of a step (Ctrl-C
inside the engine), and SIGINT to a running ``napari-unet train`` process. Each time the
model is saved with ``save_model`` and loaded back. (Killed writers: test_file_safety.py.)
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_unet.config import ModelConfig, TrainConfig
from napari_unet.io import load_model, save_model
from napari_unet.model import UNet
from napari_unet.synthetic import make_nuclei, paint_sparse_labels
from napari_unet.training import VAL_TOLERANCE, train

TINY = ModelConfig(depth=2, base_filters=4, padding="same", batch_norm=True)


@pytest.fixture(scope="module")
def painted():
    img, truth = make_nuclei((80, 80), seed=11)
    return img, paint_sparse_labels(truth, n_cells=6, seed=11)


def _config(val_every: int, seed: int) -> TrainConfig:
    # Validation on 6 painted cells and the last step's weights: these tests check best-weight keeping.
    return TrainConfig(iterations=60, max_time=None, patch_size=32, batch_size=2, precision="fp32", threads=1,
                       val_every=val_every, seed=seed, min_val_objects=3, ema=0.0)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _expected_kept(snapshots: dict[int, tuple[float, dict]]) -> int | None:
    """The validation whose weights training must keep: the last within VAL_TOLERANCE of the running best."""
    running, kept = -1.0, None
    for it in sorted(snapshots):
        running = max(running, snapshots[it][0])
        if snapshots[it][0] >= running - VAL_TOLERANCE:
            kept = it
    return kept


def _check_saved(result, tmp_path: Path, iterations: int, kept: dict[str, torch.Tensor]) -> None:
    """The result holds ``kept``, says it was stopped after ``iterations`` steps, and survives a file round trip."""
    model = result.model
    assert not model.training
    # The kept weights, with the output calibration added to the last bias (TrainConfig.calibrate).
    shift = torch.tensor(result.metadata["output_bias_shift"], dtype=torch.float32)
    state = model.state_dict()
    assert torch.equal(state["outc.bias"], kept["outc.bias"] + shift)
    assert all(torch.equal(v, kept[k]) for k, v in state.items() if k != "outc.bias")
    t = result.metadata["training"]
    assert t["status"] == "stopped" and t["iterations"] == iterations
    path = save_model(tmp_path / f"stopped_{iterations}.safetensors", model, result.metadata)
    loaded, meta = load_model(path)
    assert meta["training"]["status"] == "stopped" and meta["training"]["iterations"] == iterations
    x = torch.from_numpy(np.random.default_rng(iterations).normal(size=(1, 1, 32, 32)).astype(np.float32))
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_closing_at_random_events_keeps_the_best_weights(painted, tmp_path):
    img, lab = painted
    rng = np.random.default_rng(2026)
    draws = [(1, 1)] + [(int(rng.integers(2, 25)), int(rng.integers(1, 4))) for _ in range(4)]
    for k, val_every in draws:  # stop after k events (event 0 comes before any step)
        gen = train(img, lab, _config(val_every, seed=k), model_config=TINY)
        snapshots, current = {}, None
        for n, ev in enumerate(gen, start=1):
            current = _state(ev.result.model)
            if ev.val_iou is not None:
                snapshots[ev.iteration] = (ev.val_iou, current)
            if n == k:
                break
        gen.close()  # what napari's worker.quit() amounts to
        best = _expected_kept(snapshots)
        kept = snapshots[best][1] if best is not None else current  # no validation yet: the last weights
        _check_saved(ev.result, tmp_path, k - 1, kept)
        assert ev.result.metadata["training"]["best_iteration"] == best


def test_ctrl_c_inside_a_step_keeps_the_best_weights(painted, tmp_path, monkeypatch):
    """KeyboardInterrupt raised inside the forward pass of step j (before its weights change)."""
    img, lab = painted
    forward = UNet.forward
    rng = np.random.default_rng(7)
    for j in sorted(int(j) for j in rng.integers(1, 30, size=3)):
        calls = {"train": 0}

        def interrupted(self, x, j=j, calls=calls):
            if self.training:
                calls["train"] += 1
                if calls["train"] == j:
                    raise KeyboardInterrupt
            return forward(self, x)

        monkeypatch.setattr(UNet, "forward", interrupted)
        gen = train(img, lab, _config(2, seed=j), model_config=TINY)
        snapshots, current, last = {}, None, None
        with pytest.raises(KeyboardInterrupt):
            for ev in gen:
                last, current = ev, _state(ev.result.model)
                if ev.val_iou is not None:
                    snapshots[ev.iteration] = (ev.val_iou, current)
        monkeypatch.setattr(UNet, "forward", forward)
        best = _expected_kept(snapshots)
        _check_saved(last.result, tmp_path, j - 1, snapshots[best][1] if best is not None else current)


def _read_until(stream, needle: bytes, deadline: float) -> bytes:
    """Read ``stream`` (a pipe) until ``needle`` shows up or the deadline passes; returns what was read."""
    seen = b""
    fd = stream.fileno()
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} in time; got {seen[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, f"the process ended early: {seen[-500:]!r}"
            seen += chunk
    return seen


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_train_command_saves_the_best_weights(painted, tmp_path, sig, status):
    """Ctrl-C in a terminal (SIGINT), or a batch system's time limit or scancel (SIGTERM), after a
    validation, at whatever point of a step the signal lands: exit status 130 / 143 and a
    complete, loadable model file marked as stopped."""
    img, lab = painted
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    out = tmp_path / "m.safetensors"
    exe = Path(sys.executable).parent / "napari-unet"
    # A shell starts background jobs (`make test &`) with SIGINT ignored, and a child inherits
    # that: Python then never turns Ctrl-C into KeyboardInterrupt. Start the command as a
    # terminal would (a handler, unlike SIG_IGN, is reset to the default in the child).
    parent = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([str(exe), "train", "--image", str(tmp_path / "img.tif"), "--labels",
                                 str(tmp_path / "lab.tif"), "--out", str(out), "--iterations", "100000", "--depth",
                                 "2", "--width", "4", "--patch-size", "32", "--batch-size", "2", "--threads", "1",
                                 "--precision", "fp32", "--min-val-objects", "3"],
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if parent is None else parent)
    try:
        seen = _read_until(proc.stderr, b"val IoU", time.monotonic() + 120)
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # pragma: no cover - only when an assertion above failed
            proc.kill()
            proc.wait()
    err = (seen + rest).decode(errors="replace")
    assert proc.returncode == status, err[-2000:]
    assert "Traceback" not in err and "interrupted: wrote" in err
    model, meta = load_model(out)
    t = meta["training"]
    assert t["status"] == "stopped" and t["iterations"] >= 10
    assert t["best_iteration"] is not None and t["best_iteration"] <= t["iterations"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
