"""The widgets run on the Qt binding napari recommends (Qt6) and still on PyQt5 (the [pyqt5] extra)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

# Docks the three widgets, segments the sample with the packaged model in Segment's worker
# thread, and prints the binding qtpy chose and the labels layer's largest id.
SMOKE = textwrap.dedent("""
    import napari, qtpy
    from qtpy.QtCore import QEventLoop
    viewer = napari.Viewer(show=False)
    viewer.open_sample("napari-unet", "cells")
    widgets = [viewer.window.add_plugin_dock_widget("napari-unet", name)[1]
               for name in ("Train U-Net", "Segment with U-Net", "Export masks")]
    seg = widgets[1]
    seg.image.value = viewer.layers["nuclei"]
    loop = QEventLoop()  # runs until the job's finished signal (queued from the worker thread)
    seg.runner.finished.connect(loop.quit)
    seg.run_button.click()
    loop.exec()
    print(qtpy.API_NAME, int(viewer.layers["nuclei [U-Net]"].data.max()), seg.state.state.value)
    viewer.close()
""")


def test_suite_runs_on_qt6():
    import qtpy

    assert qtpy.API_NAME == "PyQt6"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("PyQt5") is None, reason="PyQt5 not installed")
def test_widgets_work_on_pyqt5(tmp_path):
    env = {**os.environ, "QT_API": "pyqt5", "NAPARI_UNET_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", SMOKE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    binding, max_id, state = r.stdout.split()[-3:]
    assert binding == "PyQt5" and int(max_id) >= 10 and state == "done"
