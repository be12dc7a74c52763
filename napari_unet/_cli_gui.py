"""``napari-unet gui``: open napari with the plugin's widgets docked (the one subcommand that imports napari)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("gui", help="open napari with the napari-unet widgets docked",
                       description="Open napari with the napari-unet widgets docked (and the sample data).")
    p.add_argument("--sample", action="store_true", help="load the plugin's sample image and painted labels")
    p.add_argument("files", nargs="*", help="image files to open")
    p.set_defaults(func=run)


def run(args) -> int:
    """Open napari with the three widgets docked as tabs (Train in front) and, with --sample, the sample."""
    try:
        import napari
        from npe2 import PluginManager
    except ImportError as e:  # a headless install (train / predict only)
        raise OSError(f"napari is not installed ({e.name or e}): pip install \"napari-unet[gui]\" for the "
                      "widgets; train and predict work without it") from None

    viewer = napari.Viewer(title="napari-unet")
    for f in args.files:
        viewer.open(f)
    manifest = PluginManager.instance().get_manifest("napari-unet")
    if args.sample:
        viewer.open_sample("napari-unet", "cells")
    docks = [viewer.window.add_plugin_dock_widget("napari-unet", widget.display_name, tabify=True)[0]
             for widget in manifest.contributions.widgets or []]
    if docks:
        from qtpy.QtCore import QTimer

        # The Train tab in front (the first step of the walkthrough), once the docks are laid out.
        QTimer.singleShot(0, docks[0].raise_)
    if args.sample and len(viewer.layers) > 1:
        viewer.layers.selection.active = viewer.layers[-1]  # the painted labels, ready for painting
    napari.run()
    return 0
