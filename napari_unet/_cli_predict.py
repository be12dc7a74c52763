"""``napari-unet predict``: segment images with a model file and write label TIFFs.

Outputs: with one input image and ``--out`` ending in ``.tif``/``.tiff``, that one file;
otherwise ``--out`` is a folder (created if needed, inside an existing folder) receiving
``<stem>_labels.tif`` per input. ``--probabilities`` adds ``<stem>_probabilities.tif`` (float32, class axis as
ImageJ's C axis) beside each label file. Axes and pixel size are carried over from the
input. A ``Z`` axis (the TIFF's, or ``--axes``) makes each volume one 3D segmentation
(``--volume``), with the voxel size from the file or ``--voxel-size``. Every output is
checked before any computing starts (existing files need ``--overwrite``) and written
atomically, so a failure never leaves a partial file.

Under ``torchrun`` each process (rank) segments every ``world_size``-th input, on its own
GPU under NCCL: each input gets exactly one output, written by one rank. The ranks check
all outputs before any of them writes one. Without torchrun, ``--device auto`` or ``cuda``
spreads the tiles of each image over all the GPUs of the machine.
"""

from __future__ import annotations

import glob
import sys
from pathlib import Path

from .errors import BAD_INPUT_ERRORS
from .io import IMAGE_SUFFIXES, image_files


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="segment images with a trained model and write label TIFFs",
        description="Segment images with a napari-unet model file; write ImageJ-compatible label TIFFs.")
    p.add_argument("--model", required=True,
                   help="model file (.safetensors) written by napari-unet, or a bioimage.io package (.zip) of one")
    p.add_argument("--image", required=True, action="append", metavar="IMG",
                   help="image file, folder of images, or glob pattern (quote it); repeat for more")
    p.add_argument("--out", required=True,
                   help="output .tif when there is one input image, else a folder for <stem>_labels.tif files")
    p.add_argument("--output", choices=("instances", "semantic"), default=None,
                   help="label kind (default: the mode the model was trained in)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="compute precision (auto: the fastest safe choice for this machine)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino"),
                   help="what runs the network on the CPU (auto: OpenVINO where installed and measured faster "
                        "here, else torch)")
    p.add_argument("--tile", type=int, default=None, metavar="N", help="tile side in pixels (default: from memory)")
    p.add_argument("--batch", type=int, default=None, metavar="N", help="tiles per batch (default: from memory)")
    p.add_argument("--overlap", type=int, default=None, metavar="PX",
                   help="overlap of blended tiles for padded ('same') models")
    p.add_argument("--channel-axis", type=int, default=None, metavar="AXIS",
                   help="axis of the image's channels (default: from the file's axes, or detected)")
    p.add_argument("--min-size", type=int, default=None, metavar="PX",
                   help="remove cells smaller than this (default: 15 %% of the median area of the cells the "
                        "model was trained on, or 15 px)")
    p.add_argument("--seed-threshold", type=float, default=None, metavar="P",
                   help="cell-interior probability above which a pixel seeds a cell: lower finds more cells and "
                        "splits fewer, higher merges fewer touching ones (default: 0.4 for planes, 0.5 for "
                        "volumes, i.e. with Z in --axes)")
    p.add_argument("--foreground-threshold", type=float, default=None, metavar="P",
                   help="probability of interior + boundary above which a pixel belongs to a cell: higher gives "
                        "tighter outlines (default: 0.6 for planes, 0.5 for volumes, i.e. with Z in --axes)")
    p.add_argument("--scale", type=float, default=None, metavar="FACTOR",
                   help="resize images by this factor before the network, so that cells have the size the model "
                        "was trained on (default: the factor recorded in the model file at training, else 1)")
    p.add_argument("--axes", default=None, metavar="LETTERS",
                   help="what the image file's axes are, e.g. ZYX, TZYX, TYX, ZCYX (C or S: channels); Z makes "
                        "each volume one 3D segmentation, T and other letters hold independent planes or volumes "
                        "(default: the TIFF's ImageJ/OME axes; other files are 2D)")
    p.add_argument("--voxel-size", default=None, metavar="Z,Y,X",
                   help="voxel size along Z, Y, X, e.g. 2,0.5,0.5 (default: the TIFF's pixel size and Z spacing, "
                        "else cubic)")
    p.add_argument("--volume", choices=("3d", "orthogonal", "stitch"), default="3d",
                   help="how volumes are segmented: 3d (YX planes' probabilities, then a 3D watershed), "
                        "orthogonal (also the ZX and ZY planes, averaged; slower, better for cells touching "
                        "along Z), stitch (2D objects linked between planes by overlap) (default: 3d)")
    p.add_argument("--probabilities", action="store_true", help="also write the class probabilities (float32)")
    p.add_argument("--flips", action="store_true",
                   help="test-time augmentation: average the image's and its 3 mirror images' predictions "
                        "(4x the compute; smoother outlines; see docs/design.md for when it helps)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def expand_inputs(specs: list[str]) -> list[Path]:
    """Files named, folders' image files (sorted), and glob matches; in the order given, without repeats."""
    out: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise FileNotFoundError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        elif any(ch in spec for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())  # glob skips hidden files
            if not found:
                raise FileNotFoundError(f"{spec}: no file matches this pattern")
        else:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such image file")
            found = [path]
        for p in found:
            if p not in out:
                out.append(p)
    return out


def output_paths(inputs: list[Path], out: str) -> list[Path]:
    """Label file for each input (see the module docstring)."""
    target = Path(out)
    if len(inputs) == 1 and target.suffix.lower() in (".tif", ".tiff"):
        return [target]
    if target.suffix.lower() in (".tif", ".tiff"):
        raise ValueError(f"--out {target} is a file name but there are {len(inputs)} input images; give a folder")
    if target.exists() and not target.is_dir():
        raise ValueError(f"--out {target} exists and is not a folder")
    paths = [target / f"{p.stem}_labels.tif" for p in inputs]
    seen: dict[Path, Path] = {}
    for src, dst in zip(inputs, paths):
        if dst in seen:
            raise ValueError(f"{src} and {seen[dst]} would both write {dst}; rename one of them")
        seen[dst] = src
    return paths


def probability_path(labels_path: Path) -> Path:
    stem = labels_path.stem[:-len("_labels")] if labels_path.stem.endswith("_labels") else labels_path.stem
    return labels_path.with_name(f"{stem}_probabilities.tif")


def _file_axes(args, info, shape: tuple[int, ...]) -> str | None:
    """The image's axis letters: ``--axes`` (checked against the image), else the file's."""
    if args.axes is None:
        return info.axes
    axes = args.axes.strip().upper()
    if len(axes) != len(shape) or not axes.isalpha() or len(set(axes)) != len(axes) or not axes.endswith(
            ("YX", "YXS", "YXC")):
        raise ValueError(f"--axes {args.axes} does not describe this image of shape {shape}: give one distinct letter "
                         "per axis, ending in YX (or YXS/YXC for channels last), e.g. ZYX, TZYX, ZCYX")
    return axes


def _voxel_size(args, info) -> tuple[float, float, float] | None:
    """``--voxel-size Z,Y,X``, else the file's pixel size and Z spacing, else ``None`` (cubic)."""
    from .config import ConfigError, parse_voxel_size

    if args.voxel_size is not None:
        try:
            return parse_voxel_size(args.voxel_size)
        except ConfigError:
            raise ValueError(f"--voxel-size {args.voxel_size}: give three positive numbers Z,Y,X, e.g. 2,0.5,0.5"
                             ) from None
    return info.voxel_size()


def _predict_axes(axes: str | None, ndim: int, channel_axis: int | None) -> str | None:
    """The letters :class:`~napari_unet.config.PredictConfig` takes: the file's, channel axis left out."""
    if not axes or len(axes) != ndim:
        return None
    if channel_axis is not None:
        ax = channel_axis % ndim
        axes = axes[:ax] + axes[ax + 1:]
    axes = "".join(a for a in axes if a not in "CS")
    return axes if axes.endswith("YX") and len(axes) == len(set(axes)) else None


def _label_axes(info, ndim_in: int, channel_axis: int | None, ndim_out: int) -> str | None:
    """The input's axis letters without the channel axis, if ImageJ can store them."""
    axes = info.axes
    if not axes or len(axes) != ndim_in:
        return None
    if channel_axis is not None:
        ax = channel_axis % ndim_in
        axes = axes[:ax] + axes[ax + 1:]
    elif any(a in axes for a in "SC") and len(axes) == ndim_out + 1:  # detected RGB(A): the last axis
        axes = axes[:-1]
    if len(axes) != ndim_out or not set(axes) <= set("TZYX") or axes[-2:] != "YX":
        return None
    return axes


def _write_probabilities(path: Path, probs, axes: str | None, scale: dict, unit: str | None, overwrite: bool):
    """float32 ``(C, ..., Y, X)`` -> TIFF with C where ImageJ wants it (TZCYX order), atomically."""
    import numpy as np
    import tifffile

    from .io import atomic_write, imagej_tiff_kwargs

    lead = axes[:-2] if axes else None
    data = np.moveaxis(probs, 0, probs.ndim - 3)  # (..., C, Y, X)
    kwargs = imagej_tiff_kwargs(lead + "CYX" if lead is not None and data.ndim <= 5 else None, scale, unit)
    with atomic_write(path, overwrite=overwrite) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(data, dtype=np.float32), **kwargs)


def run(args) -> int:
    from .distributed import init_from_env

    ctx = init_from_env(args.device)
    ok = False
    try:
        code = _run(args, ctx)
        ok = True
        return code
    finally:
        ctx.shutdown(wait=ok)


def _run(args, ctx) -> int:
    from .config import PredictConfig
    from .distributed import shard
    from .io import OutputPathError, check_output_path, first_line, load_model
    from .tuning import tune_malloc

    # All ranks check all outputs before any of them writes one (else a slow rank would find a fast
    # one's fresh output "already existing"); a failure on any rank stops all.
    with ctx.agreeing():
        inputs = expand_inputs(args.image)
        outputs = output_paths(inputs, args.out)
        mine = shard(list(zip(inputs, outputs)), ctx.rank, ctx.world_size)  # each input on exactly one rank
        out_dir = outputs[0].parent
        wanted = [w for dst in outputs for w in ([dst, probability_path(dst)] if args.probabilities else [dst])]
        for w in wanted:
            if w.exists() and not w.is_dir() and not args.overwrite:
                raise FileExistsError(f"{w} already exists; use --overwrite to replace it")
        if (len(outputs) > 1 or not Path(args.out).suffix) and not out_dir.is_dir():
            # Only the last level: a mistyped path or an unmounted drive must not grow a tree of folders.
            if not out_dir.parent.is_dir():
                raise OutputPathError(f"cannot create the folder {out_dir}: {out_dir.parent} is not an existing "
                                      "folder")
            try:
                out_dir.mkdir(exist_ok=True)  # another rank may have made it a moment ago
            except OSError as e:
                raise OutputPathError(f"cannot create the folder {out_dir}: {e.strerror or first_line(e)}") from None
        for _, dst in mine:  # before any computing: a folder in the way, a read-only place, ...
            for w in [dst, probability_path(dst)] if args.probabilities else [dst]:
                check_output_path(w, overwrite=True)
        model, meta = load_model(args.model)
        device = ctx.device_name(args.device)  # under NCCL: this rank's own GPU
    tune_malloc()  # a short-lived process: keeping freed tensors in the heap saves page faults
    kw = {k: v for k, v in {"tile_size": args.tile, "batch_size": args.batch, "overlap": args.overlap,
                            "min_size": args.min_size, "seed_threshold": args.seed_threshold,
                            "foreground_threshold": args.foreground_threshold,
                            "scale": args.scale}.items() if v is not None}
    if args.voxel_size is not None:
        _voxel_size(args, None)
    # A bad option fails now, once, not for every image.
    PredictConfig(output=args.output, probabilities=args.probabilities, precision=args.precision,
                  backend=args.backend, flips=args.flips, volume=args.volume, **kw)
    show = not args.quiet and ctx.is_main  # one progress bar, not one per rank on the same terminal
    failed = 0
    for src, dst in mine:
        try:
            _predict_one(args, src, dst, model, meta, device, kw, show)
        except BAD_INPUT_ERRORS as e:
            if len(inputs) == 1:
                raise
            # One bad file of a batch: say which and go on with the others (nothing is written for it).
            failed += 1
            print(f"napari-unet predict: error: {first_line(e)}", file=sys.stderr)
    if failed:
        raise ValueError(f"{failed} of {len(mine)} images failed (see above); the others were written")
    return 0


def _predict_one(args, src: Path, dst: Path, model, meta, device, kw: dict, show: bool) -> None:
    from .config import PredictConfig
    from .data import find_channel_axis
    from .inference import predict
    from .io import first_line, read_image, write_labels_tiff
    from .jobs import drain

    try:
        image, info = read_image(src)
    except (ValueError, OSError) as e:
        message = first_line(e)
        raise ValueError(message if str(src) in message else f"{src}: {message}") from None
    try:
        info.axes = _file_axes(args, info, image.shape)
        voxel_size = _voxel_size(args, info)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    try:  # the package's one rule, told the file's axis letters and the model's channels
        cax = find_channel_axis(image.shape, model.config.in_channels, axes=info.axes, channel_axis=args.channel_axis)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    config = PredictConfig(output=args.output, probabilities=args.probabilities, device=device,
                           precision=args.precision, backend=args.backend, channel_axis=cax, flips=args.flips,
                           axes=_predict_axes(info.axes, image.ndim, cax), voxel_size=voxel_size,
                           volume=args.volume, **kw)
    gen = predict(model, image, config, meta)
    bar = None
    try:
        def show_progress(ev):
            nonlocal bar
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=ev.total, desc=src.name, unit="tile", file=sys.stderr, leave=False)
            bar.total = ev.total
            bar.n = ev.done
            bar.set_postfix_str(f"{ev.device} {ev.precision}{' OpenVINO' if ev.backend == 'openvino' else ''}",
                                refresh=False)
            bar.refresh()

        result = drain(gen, show_progress if show else None)
    except MemoryError as e:
        raise MemoryError(f"{src}: {first_line(e)}") from None
    except ValueError as e:
        raise ValueError(f"{src}: {first_line(e)}") from None
    finally:
        gen.close()
        if bar is not None:
            bar.close()
    if args.voxel_size is not None and voxel_size is not None:  # the voxel size the user gave is the file's now
        info.scale = {**info.scale, "Z": voxel_size[0], "Y": voxel_size[1], "X": voxel_size[2]}
    axes = _label_axes(info, image.ndim, cax, result.labels.ndim)
    write_labels_tiff(dst, result.labels, axes=axes, scale=info.scale, unit=info.unit or "um",
                      overwrite=args.overwrite)
    if args.probabilities and result.probabilities is not None:
        _write_probabilities(probability_path(dst), result.probabilities, axes, info.scale, info.unit or "um",
                             args.overwrite)
    n = int(result.labels.max()) if result.labels.size else 0
    what = f"{n} cells" if result.output == "instances" else f"classes up to {n}"
    if config.axes and "Z" in config.axes:
        what += f" in 3D ({config.volume})"
    print(f"{dst}: {what} ({result.device}, {result.precision}"
          f"{', OpenVINO' if result.backend == 'openvino' else ''})", file=sys.stderr)
