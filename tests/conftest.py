"""Shared fixtures. Widget tests use napari's ``make_napari_viewer`` and pytest-qt's ``qtbot``."""

from __future__ import annotations

import os
from pathlib import Path

# qtpy (napari, the widgets) and pytest-qt (qt_api in pyproject.toml) must pick the same binding;
# the test environment also holds PyQt5, which qtpy would otherwise prefer.
os.environ.setdefault("QT_API", "pyqt6")

import pytest


@pytest.fixture(autouse=True)
def _private_precision_cache(tmp_path_factory, monkeypatch):
    """Each test measures (or fakes) its own precision choices: a fresh on-disk cache, never the
    user's (napari_unet.device.cache_dir), and an empty in-process one."""
    monkeypatch.setenv("NAPARI_UNET_CACHE", str(tmp_path_factory.mktemp("cache")))
    from napari_unet import device

    monkeypatch.setattr(device, "_CALIBRATION", {})
    monkeypatch.setattr(device, "_TRAIN_CALIBRATION", {})


@pytest.fixture
def notes(monkeypatch):
    """Record the widgets' napari notifications: ``notes["error"]``, ``notes["warning"]``, ``notes["info"]``."""
    from napari_unet._widgets import _common

    seen: dict[str, list[str]] = {"error": [], "warning": [], "info": []}
    monkeypatch.setattr(_common, "show_error", seen["error"].append)
    monkeypatch.setattr(_common, "show_warning", seen["warning"].append)
    monkeypatch.setattr(_common, "show_info", seen["info"].append)
    return seen


@pytest.fixture
def small_cells():
    """A 96 x 96 synthetic nuclei image and sparse painted labels (0 unlabelled, 1 background, 2.. cells)."""
    from napari_unet.synthetic import make_nuclei, paint_sparse_labels

    image, truth = make_nuclei((96, 96), radius=(5, 9), seed=3)
    labels = paint_sparse_labels(truth, n_cells=4, seed=3, exclude_border=4)
    return image, labels


@pytest.fixture
def tiny_model_file(tmp_path):
    """A saved, untrained, tiny instance model (depth 2, width 4, padded): fast to run, any output."""
    from napari_unet.io import save_model
    from napari_unet.model import UNet

    def make(in_channels: int = 1, name: str = "tiny.safetensors"):
        import torch

        torch.manual_seed(0)
        model = UNet(in_channels, 3, depth=2, base_filters=4, padding="same", batch_norm=True)
        return save_model(tmp_path / name, model.eval(), {"mode": "instances",
                                                          "class_names": ["background", "cell", "boundary"]})

    return make


@pytest.fixture
def thresholds_seen(monkeypatch):
    """The (seed, foreground) thresholds every instance step is called with, in order: planes and
    volumes alike (instance_labels runs through iter_instance_labels)."""
    from napari_unet import postprocess

    seen = []
    real = postprocess.iter_instance_labels

    def spy(interior, foreground, **kw):
        seen.append((kw.get("threshold"), kw.get("foreground_threshold")))
        return (yield from real(interior, foreground, **kw))

    monkeypatch.setattr(postprocess, "iter_instance_labels", spy)
    return seen


@pytest.fixture
def no_threads_left():
    """After the test body: no worker of napari's thread pool still runs."""
    yield
    from qtpy.QtCore import QThreadPool

    assert QThreadPool.globalInstance().waitForDone(20000)


@pytest.fixture
def dock():
    """Open one of the plugin's widgets the way napari does (Plugins menu): ``dock(viewer, "Train U-Net")``.

    napari builds it from the manifest and passes a proxy of the viewer, as users get it.
    """

    def _dock(viewer, name: str):
        _, widget = viewer.window.add_plugin_dock_widget("napari-unet", name)
        return widget

    return _dock


@pytest.fixture
def read_only_dir(tmp_path):
    """``make()`` returns a folder where no file can be created.

    A folder without write permission, unless the tests run as root, whom permission bits
    do not stop: then ``/proc``, where not even root can create a file. Decided at run time
    by trying to create a file, so the test asserts the same thing either way.
    """
    made = []

    def make():
        ro = tmp_path / "read_only"
        if not ro.exists():
            ro.mkdir()
            made.append(ro)
        ro.chmod(0o555)
        try:
            (ro / "probe").touch()
        except PermissionError:
            return ro
        (ro / "probe").unlink()
        ro.chmod(0o755)
        return Path("/proc")

    yield make
    for ro in made:  # so that pytest can clean tmp_path up
        ro.chmod(0o755)
