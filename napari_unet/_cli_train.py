"""``napari-unet train``: see :mod:`napari_unet.cli`."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="(not available yet)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise ValueError("'train' is not available yet in this version")
