"""Long jobs are generators of progress events that return their result (no Qt, no torch).

Training, prediction, export and "where to paint next" are such generators: the widgets run
them in napari's ``thread_worker`` (which can stop them at any yield), the command line and
the tests drain them with :func:`drain`; a job made of another job passes its events on,
translated, with :func:`relay`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

__all__ = ["drain", "relay"]

R = TypeVar("R")


def drain(gen: Generator[Any, Any, R], each: Callable[[Any], Any] | None = None) -> R:
    """Run ``gen`` to its end, handing every event to ``each``; return what the generator returns."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if each is not None:
            each(event)


def relay(gen: Generator[Any, Any, R], each: Callable[[Any], Any]) -> Generator[Any, None, R]:
    """Yield ``each(event)`` for every event of ``gen`` (skipping ``None``); return what ``gen``
    returns: ``result = yield from relay(inner, translate)``."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        out = each(event)
        if out is not None:
            yield out
