"""``napari-unet predict``: see :mod:`napari_unet.cli`."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="(not available yet)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise ValueError("'predict' is not available yet in this version")
