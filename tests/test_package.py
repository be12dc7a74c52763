"""The package: light core imports, npe2 manifest, CLI entry point, sample data."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.mark.parametrize("modules, forbidden", [
    # what the GUI thread imports before a job starts: no torch either
    ("napari_unet, napari_unet.config, napari_unet.io, napari_unet.data, napari_unet.synthetic, napari_unet.device, "
     "napari_unet.cli, napari_unet.training_data", ("qtpy", "PyQt5", "PyQt6", "napari", "magicgui", "torch")),
    ("napari_unet.model, napari_unet.training, napari_unet.inference",
     ("qtpy", "PyQt5", "PyQt6", "napari", "magicgui")),
])
def test_core_imports_no_qt_napari_or_torch(modules, forbidden):
    code = (f"import sys, {modules}\n"
            f"print(','.join(m for m in {forbidden!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


_HEADLESS = r"""
import importlib.abc, sys

GUI = ("napari", "npe2", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "pyqtgraph", "superqt")

class NotInstalled(importlib.abc.MetaPathFinder):  # an environment with the core dependencies only
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in GUI:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from napari_unet.cli import main
folder = sys.argv[1]
common = ["--iterations", "2", "--patch-size", "32", "--batch-size", "2", "--threads", "1", "--precision", "fp32",
          "--quiet"]
assert main(["train", "--image", folder + "/img.tif", "--labels", folder + "/lab.tif", "--out",
             folder + "/m.safetensors", "--from", "sample", *common]) == 0
assert main(["predict", "--model", folder + "/m.safetensors", "--image", folder + "/img.tif", "--out",
             folder + "/seg.tif", "--quiet"]) == 0
assert main(["gui"]) == 2
print(",".join(m for m in sys.modules if m.split(".")[0] in GUI))
"""


def test_a_headless_install_trains_and_predicts_without_napari_or_qt(tmp_path):
    """The core dependencies only (what `pip install napari-unet` installs): train, predict and a
    clear message from `gui`; nothing of napari, Qt or magicgui is imported."""
    import tifffile

    from napari_unet.synthetic import make_nuclei, paint_sparse_labels

    image, truth = make_nuclei((64, 64), seed=1)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", paint_sparse_labels(truth, n_cells=3, seed=1))
    out = subprocess.run([sys.executable, "-c", _HEADLESS, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == ""
    assert "pip install \"napari-unet[gui]\"" in out.stderr
    assert tifffile.imread(tmp_path / "seg.tif").shape == (64, 64)


def test_the_core_needs_no_gui_dependency():
    """setup.cfg: napari, Qt and the widgets' libraries are extras, not install requirements."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    required = cfg["options"]["install_requires"].split()
    assert not any(r.split(">")[0].split("=")[0].lower() in ("napari", "npe2", "magicgui", "qtpy", "pyqtgraph",
                                                               "superqt", "pyqt5", "pyqt6") for r in required)
    assert "napari>=0.5" in cfg["options.extras_require"]["napari"].split()


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


def _internal_imports() -> dict[str, set[str]]:
    """napari_unet module -> the napari_unet modules it imports anywhere (function-level imports too)."""
    import ast

    root = Path(__file__).resolve().parent.parent / "napari_unet"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = (path, parts[-1] == "__init__")
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in modules.items():
        package = name if is_pkg else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("napari_unet"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = package.split(".")
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                if not base.startswith("napari_unet"):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in modules else base)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_import_cycles():
    """No module imports (at any level, function-level imports included) one that imports it
    back; a package's __init__ importing its own modules does not count as a cycle."""
    graph = _internal_imports()
    assert graph["napari_unet._cli_train"] and graph["napari_unet._widgets.train"]  # the parse found imports

    def edges(m):
        return {n for n in graph[m] if not (n == m.rpartition(".")[0] or m.startswith(n + "."))}

    cycles = []
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in edges(m):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert cycles == []
