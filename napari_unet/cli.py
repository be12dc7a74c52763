"""The ``napari-unet`` command line: ``train``, ``predict``, ``export-model`` and ``gui``.

Each subcommand lives in its own module (``_cli_train``, ``_cli_predict``, ``_cli_export``, ``_cli_gui``);
train and predict drain the same generators the napari widgets run in a worker thread. Bad input ends with a one-line
message on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE

__all__ = ["main", "build_parser", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "EXIT_FAILURE"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, _cli_export, _cli_gui, _cli_predict, _cli_train

    parser = argparse.ArgumentParser(
        prog="napari-unet",
        description="Train U-Nets on painted labels and segment images, without napari (same model files).")
    parser.add_argument("--version", action="version", version=f"napari-unet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _cli_train.add_parser(sub)
    _cli_predict.add_parser(sub)
    _cli_export.add_parser(sub)
    _cli_gui.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``napari-unet`` console script; returns the exit status."""
    from .distributed import DistributedError, env_rank
    from .errors import BAD_INPUT_ERRORS

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
