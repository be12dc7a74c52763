"""Take the README walkthrough's screenshots: napari with the three widgets, driven through their controls.

Run under Xvfb from the repository root::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_screenshots.py

It opens napari as ``napari-unet gui --sample`` does, then: paints one more cell, fine-tunes
the packaged cell model for ``--seconds`` (screenshot during training, with the live preview), segments with the
trained model, corrects a cell and turns the result into training labels, and exports the
masks to a temporary folder. With ``--data ../shared/data`` it takes instead the "Where to
paint next" picture on a real image (``07_paint_next.png``); with ``--volume`` the volume
sample segmented in 3D, in napari's 3D view (``08_volume_3d.png``). The images go to ``docs/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The dev environment holds PyQt5 too (for its smoke test); the screenshots show Qt6, as `make run`.
os.environ.setdefault("QT_API", "pyqt6")
DOCS = Path(__file__).resolve().parent


def _wait_until(app, cond, timeout: float) -> None:
    end = time.perf_counter() + timeout
    while not cond() and time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="training time budget")
    parser.add_argument("--data", type=Path, default=None,
                        help="instead, take 07_paint_next.png on a real image of this folder (laid out like "
                             "../shared/data): 5 cells painted as the few-shot benchmark paints them, --seconds "
                             "of fine-tuning, then Where to paint next")
    parser.add_argument("--real-image", default="dsb2018_stage1/aa58ba4512955771",
                        help="with --data: which image (a name as benchmarks/fewshot.py prints it)")
    parser.add_argument("--volume", action="store_true",
                        help="instead, take 08_volume_3d.png: the volume sample segmented in 3D (orthogonal views) "
                             "with the packaged model, in napari's 3D view")
    args = parser.parse_args(argv)

    import napari
    from napari.settings import get_settings
    from qtpy.QtWidgets import QApplication

    # napari shows a PyQt5 deprecation toast over the canvas when the window first appears:
    # keep it out of the pictures (and give the user's setting back right after).
    settings = get_settings().application
    level = settings.gui_notification_level
    settings.gui_notification_level = "error"
    try:
        viewer = napari.Viewer(title="napari-unet")
        QApplication.instance().processEvents()
    finally:
        settings.gui_notification_level = level
    viewer.window.resize(1560, 960)
    if args.data is not None or args.volume:
        (_volume_shot if args.volume else _paint_next_shot)(viewer, args)
        viewer.close()
        return 0
    viewer.open_sample("napari-unet", "cells")
    names = ["Train U-Net", "Segment with U-Net", "Export masks"]
    docks, widgets = zip(*[viewer.window.add_plugin_dock_widget("napari-unet", n, tabify=True) for n in names])
    train, segment, export = widgets
    app = QApplication.instance()

    def shot(name: str) -> None:
        _wait_until(app, lambda: False, 0.5)
        viewer.screenshot(str(DOCS / name), canvas_only=False)
        print("wrote", DOCS / name)

    # 1. The sample, and one more cell painted with the paint brush (label 7).
    _wait_until(app, lambda: False, 0.5)
    docks[0].raise_()
    labels = viewer.layers["painted labels"]
    image = viewer.layers["nuclei"]
    viewer.layers.selection.active = labels
    labels.mode = "paint"
    labels.selected_label = 7
    labels.brush_size = 8
    from napari_unet.synthetic import make_nuclei

    _, truth = make_nuclei((384, 384), seed=7)
    unpainted = [i for i in np.unique(truth[40:-40, 40:-40]) if i and not labels.data[truth == i].any()]
    cell = truth == unpainted[len(unpainted) // 2]
    labels.data_setitem(np.nonzero(cell), 7)
    shot("01_sample_and_painting.png")

    # 2. Train: a live plot of the loss and validation IoU, a live preview of the visible part.
    train.start_from.value = "sample cell model (fine-tune)"
    train.budget_kind.value = "seconds"
    train.budget.value = args.seconds
    train.start_button.click()
    _wait_until(app, lambda: train._last_event is not None and train._last_event.elapsed > args.seconds * 0.6,
                args.seconds * 3 + 60)
    shot("02_training.png")
    _wait_until(app, lambda: not train.runner.running, args.seconds * 3 + 60)
    shot("03_trained.png")

    # 3. Segment with the model just trained (the Train widget made it the Segment widget's model).
    docks[1].raise_()
    viewer.layers["nuclei [U-Net preview]"].visible = False
    labels.visible = False
    segment.image.value = image
    _wait_until(app, lambda: False, 0.3)
    segment.run_button.click()
    _wait_until(app, lambda: not segment.runner.running, 300)
    out = viewer.layers["nuclei [U-Net]"]
    viewer.layers.selection.active = out
    shot("04_segmented.png")

    # 4. Correct: split the largest predicted object (a merged clump) in two, as a user does by
    # painting one nucleus of it with a new label; then make training labels of the edit.
    ids, counts = np.unique(out.data[out.data > 0], return_counts=True)
    clump = out.data == ids[np.argmax(counts)]
    halves = _split_in_two(clump)
    out.data_setitem(np.nonzero(halves == 2), int(out.data.max()) + 1)
    segment.to_training_button.click()  # "Only cells I edited" ticked, the default
    out.visible = False  # show the training labels: the painting plus the two corrected cells
    shot("05_corrected.png")
    out.visible = True

    # 5. Export the masks (to a temporary folder here).
    docks[2].raise_()
    export.layers.value = [out]
    target = Path(tempfile.mkdtemp()) / "nuclei_masks.tif"
    export.file.value = str(target)
    export.export_button.click()
    _wait_until(app, lambda: not export.runner.running and target.exists(), 60)
    shot("06_exported.png")
    viewer.close()
    return 0


def _split_in_two(mask: np.ndarray) -> np.ndarray:
    """``mask`` cut into its two largest round parts (1 and 2): a watershed of the distance to
    its edge from its two deepest points, as a user would paint the second nucleus of a clump."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    dist = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(dist, labels=mask.astype(np.int32), num_peaks=2, min_distance=5, exclude_border=False)
    if len(peaks) < 2:
        raise RuntimeError("the largest object is one round cell, not a merged clump: no correction to show")
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=mask)


def _volume_shot(viewer, args) -> None:
    """The volume sample, segmented in 3D through the Segment widget, shown in napari's 3D view."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    viewer.open_sample("napari-unet", "volume")
    segment = viewer.window.add_plugin_dock_widget("napari-unet", "Segment with U-Net")[1]
    assert segment.stack_kind.value == "3D volume", segment.stack_kind.value
    segment.volume_method.value = "orthogonal"
    segment.run_button.click()
    _wait_until(app, lambda: not segment.runner.running, 600)
    out = viewer.layers["nuclei volume [U-Net]"]
    viewer.layers["nuclei volume"].visible = False
    viewer.dims.ndisplay = 3
    viewer.reset_view()
    viewer.camera.angles = (-25, 40, 120)  # oblique: the nuclei's extent along Z shows
    viewer.camera.zoom *= 0.85
    viewer.layers.selection.active = out
    _wait_until(app, lambda: False, 1.0)
    viewer.screenshot(str(DOCS / "08_volume_3d.png"), canvas_only=False)
    print("wrote", DOCS / "08_volume_3d.png", "-", segment.state.text())


def _paint_next_shot(viewer, args) -> None:
    """A real image painted as the few-shot benchmark paints it, fine-tuned, then Where to paint next."""
    from qtpy.QtWidgets import QApplication

    sys.path.insert(0, str(DOCS.parent / "benchmarks"))
    from fewshot import border_ids, load_folder, paint
    from scipy import ndimage as ndi

    app = QApplication.instance()
    image, objects, region = load_folder(args.data)[args.real_image]
    ids = np.unique(objects[objects > 0])
    areas = ndi.sum_labels(np.ones_like(objects), objects, ids)
    big = ids[(areas >= 50) & ~np.isin(ids, border_ids(objects))]
    painted = paint(objects, region, np.random.default_rng(0).permutation(big)[:5])
    name = args.real_image.split("/")[-1][:8]
    viewer.add_image(image, name=name, rgb=image.ndim == 3)
    viewer.add_labels(painted, name="painted", opacity=0.5)
    train = viewer.window.add_plugin_dock_widget("napari-unet", "Train U-Net")[1]
    train.live_preview.value = False
    train.budget_kind.value, train.budget.value = "seconds", args.seconds
    train.start_button.click()
    _wait_until(app, lambda: not train.runner.running, args.seconds * 3 + 60)
    train.suggest_button.click()
    _wait_until(app, lambda: not train.runner.running, 300)
    viewer.layers["painted"].visible = True
    viewer.reset_view()
    _wait_until(app, lambda: False, 0.5)
    viewer.screenshot(str(DOCS / "07_paint_next.png"), canvas_only=False)
    print("wrote", DOCS / "07_paint_next.png", "-", train.state.text())


if __name__ == "__main__":
    sys.exit(main())
