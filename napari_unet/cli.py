"""The ``napari-unet`` command line: ``train``, ``predict`` and ``gui``.

Each subcommand lives in its own module (``_cli_train``, ``_cli_predict``) and drains the
same generators the napari widgets run in a worker thread. Bad input ends with a one-line
message on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_FAILURE"]

#: Exit status for bad input (missing file, wrong shape, ...), as argparse uses for usage errors.
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: Exit status of a rank of a torchrun job that failed otherwise (a lost peer, a CUDA error, ...).
EXIT_FAILURE = 1


def _add_gui(sub) -> None:
    p = sub.add_parser("gui", help="open napari with the napari-unet widgets docked",
                       description="Open napari with the napari-unet widgets docked (and the sample data).")
    p.add_argument("--sample", action="store_true", help="load the plugin's sample image and painted labels")
    p.add_argument("files", nargs="*", help="image files to open")
    p.set_defaults(func=_cmd_gui)


def _cmd_gui(args) -> int:
    """Open napari with the three widgets docked as tabs (Train in front) and, with --sample, the sample."""
    import napari
    from npe2 import PluginManager

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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, _cli_predict, _cli_train

    parser = argparse.ArgumentParser(
        prog="napari-unet",
        description="Train U-Nets on painted labels and segment images, without napari (same model files).")
    parser.add_argument("--version", action="version", version=f"napari-unet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _cli_train.add_parser(sub)
    _cli_predict.add_parser(sub)
    _add_gui(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``napari-unet`` console script; returns the exit status."""
    from .distributed import BAD_INPUT_ERRORS, DistributedError, env_rank

    parser = build_parser()
    args = parser.parse_args(argv)
    rank = env_rank()  # under torchrun: say which process a message comes from
    where = "" if rank is None else f"rank {rank}: "
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"napari-unet: {where}interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DistributedError as e:  # the ranks agreed on a failure: rank 0 tells it once, for all of them
        if not rank:
            print(f"napari-unet {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE if e.bad_input else EXIT_FAILURE
    except BAD_INPUT_ERRORS as e:  # bad input: one line, no traceback
        from .io import first_line

        print(f"napari-unet {args.command}: error: {where}{first_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if rank is None:
            raise  # a bug: its traceback is what a report needs
        # One rank of many: one line naming it; torchrun then stops the others and reports the job.
        from .io import first_line

        print(f"napari-unet {args.command}: error: {where}{type(e).__name__}: {first_line(e)}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
