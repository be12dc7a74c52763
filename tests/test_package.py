"""The package: light core imports, npe2 manifest, CLI entry point, sample data."""

import subprocess
import sys
from pathlib import Path

import numpy as np


def test_core_imports_no_qt_napari_or_torch():
    code = (
        "import sys, napari_unet, napari_unet.config, napari_unet.io, napari_unet.data, napari_unet.synthetic, "
        "napari_unet.device, napari_unet.cli\n"
        "bad = [m for m in ('qtpy', 'PyQt5', 'napari', 'magicgui', 'torch') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_core_model_import_has_no_qt():
    code = "import sys, napari_unet.model; print('qtpy' in sys.modules or 'napari' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_manifest_valid():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-unet")
    assert manifest.name == "napari-unet"
    out = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-unet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_console_script_help():
    exe = Path(sys.executable).parent / "napari-unet"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("train", "predict", "gui"):
        assert cmd in out.stdout


def test_sample_data_follows_label_convention():
    from napari_unet._sample_data import cells_sample

    (image, _, kind_i), (labels, _, kind_l) = cells_sample()
    assert kind_i == "image" and kind_l == "labels"
    assert image.shape == labels.shape
    values = np.unique(labels)
    assert values[0] == 0 and 1 in values and values.max() >= 6  # unlabelled, background, >= 5 cells
    assert (labels == 0).mean() > 0.5  # sparse painting
