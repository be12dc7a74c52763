"""What counts as the user's input problem, and the command line's exit statuses (no Qt, no torch).

One definition for the CLI, the torchrun context and the widgets: these errors are told
as one line (stderr, or a napari notification) and the program or widget goes on; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["BAD_INPUT_ERRORS", "EXIT_USAGE", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "ModelFileError",
           "first_line"]

#: The user's input problems: a missing or unreadable file, shapes that differ, labels that
#: are not labels (ValueError, TrainingDataError, ConfigError), out of memory.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MemoryError)

#: Exit status for bad input (missing file, wrong shape, ...), as argparse uses for usage errors.
EXIT_USAGE = 2
#: Exit status of a rank of a torchrun job that failed otherwise (a lost peer, a CUDA error, ...).
EXIT_FAILURE = 1
#: Ctrl-C (SIGINT); ``napari-unet train`` saved the weights so far.
EXIT_INTERRUPTED = 130
#: ``napari-unet train`` stopped by SIGTERM (a batch system's time limit, ``scancel``), weights saved.
EXIT_TERMINATED = 143


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if empty), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ModelFileError(ValueError):
    """A file that is not a usable napari-unet model; the message names the file and why."""
