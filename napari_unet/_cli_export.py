"""``napari-unet export-model``: a model file -> a bioimage.io model package (zip), checked before it is written.

The package runs in the BioImage Model Zoo's tools (bioimageio.core, deepImageJ, ilastik,
QuPath, ...); ``napari-unet predict --model PKG.zip`` and ``train --from PKG.zip`` read it
back. Needs ``pip install "napari-unet[bioimageio]"``.
"""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    from .bioimageio import WEIGHT_FORMATS

    p = sub.add_parser(
        "export-model", help="write a model as a bioimage.io model package (zip) others can run",
        description="Write a napari-unet model file as a bioimage.io model package (format 0.5): PyTorch "
                    "state-dict and TorchScript weights, preprocessing, test input/output and a cover. The "
                    "package is validated (and, with bioimageio.core installed, its model test run on every "
                    "weight format) before it is written; a failed check writes nothing.")
    p.add_argument("model", metavar="MODEL", help="napari-unet model file (.safetensors) or package (.zip)")
    p.add_argument("--out", required=True, metavar="PKG.zip", help="package to write (.zip)")
    p.add_argument("--name", default=None, help="model name (default: the model file's name)")
    p.add_argument("--description", default=None, help="one-sentence description")
    p.add_argument("--authors", default=None, metavar="'A; B'",
                   help="author names separated by ';' (default: your login name)")
    p.add_argument("--license", default="CC-BY-4.0", help="SPDX licence identifier (default: CC-BY-4.0)")
    p.add_argument("--tags", default=None, metavar="a,b", help="comma-separated tags (default: from the label mode)")
    p.add_argument("--image", default=None, metavar="IMG",
                   help="image to take the test input and cover from (default: a synthetic nuclei image); "
                        "its middle plane is resized by the model's scale and cropped to about 256 x 256")
    p.add_argument("--channel-axis", type=int, default=None, metavar="AXIS", help="the image's channel axis")
    p.add_argument("--weight-formats", default=",".join(WEIGHT_FORMATS), metavar="F,G",
                   help=f"weight formats to write (default: {','.join(WEIGHT_FORMATS)}; pytorch_state_dict is "
                        "always written)")
    p.add_argument("--no-test", action="store_true",
                   help="skip bioimage.io's model test (the format validation still runs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.add_argument("--quiet", action="store_true", help="print only the result")
    p.set_defaults(func=run)


def run(args) -> int:
    from .bioimageio import export_steps
    from .io import read_image

    image = None
    if args.image is not None:
        image, _ = read_image(args.image)
    authors = [a for a in (args.authors or "").split(";") if a.strip()] or None
    if authors is None:
        import getpass

        print(f"napari-unet export-model: no --authors: the package names {getpass.getuser()!r} as its author",
              file=sys.stderr)
    tags = [t.strip() for t in (args.tags or "").split(",") if t.strip()] or None
    formats = [f.strip() for f in args.weight_formats.split(",") if f.strip()]
    last: dict = {}
    for last in export_steps(args.model, args.out, name=args.name, description=args.description, authors=authors,
                             license=args.license, tags=tags, image=image, channel_axis=args.channel_axis,
                             weight_formats=formats, test=False if args.no_test else None,
                             overwrite=args.overwrite):
        if not args.quiet and "path" not in last:
            print(f"[{last['step']}/{last['total']}] {last['stage']}", file=sys.stderr)
    print(f"wrote {last['path']} (checked: {'; '.join(last['checks'])})")
    return 0
