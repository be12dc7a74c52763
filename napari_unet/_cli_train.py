"""``napari-unet train``: train or fine-tune a U-Net on painted labels and write one model file.

Drains :func:`napari_unet.training.train` (the generator the napari widget runs in a
worker thread) with a tqdm progress bar on stderr. Bad input raises ``ValueError`` /
``OSError``, which :func:`napari_unet.cli.main` turns into one line on stderr and exit
status 2.

Under ``torchrun`` (several processes) every rank runs this command with the same
arguments: the ranks train one model with DistributedDataParallel, rank 0 alone checks
and writes ``--out`` / ``--log`` and shows progress, and Ctrl-C makes all ranks stop at
the same step (rank 0 then saves the weights so far: best validated, or averaged).
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows argparse defaults, except ``None`` ("take the library's default", named in the help text)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_parser(sub) -> None:
    from .config import TrainConfig, default_model_config

    dflt, dmodel = TrainConfig(), default_model_config()
    p = sub.add_parser(
        "train", help="train or fine-tune a U-Net on painted labels",
        description="Train (or fine-tune with --from) a U-Net on images with painted labels: 0 unlabelled, "
                    "1 background, 2, 3, ... objects. Writes exactly the file --out names.",
        formatter_class=_HelpFormatter)
    p.add_argument("--image", action="append", default=None, metavar="IMG",
                   help="image file (TIFF, PNG, ...); repeat for several images, each followed by its --labels")
    p.add_argument("--images", action="append", default=None, metavar="DIR",
                   help="folder of images, paired by file name with the label files of the --labels folder that "
                        "follows (a.tif with a.tif, a_labels.tif, a_mask.tif, ...); images without labels are "
                        "left out; repeat for several folders")
    p.add_argument("--labels", action="append", required=True, metavar="LAB",
                   help="painted labels of the same shape as the image, one per --image; or a folder of them, "
                        "one per --images")
    p.add_argument("--out", required=True, metavar="MODEL", help="model file to write (.safetensors)")
    p.add_argument("--log-csv", default=None, metavar="CSV",
                   help="also write the loss of every step to this CSV file (iteration, elapsed_s, loss, "
                        "val_loss, val_iou), line by line")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and --log-csv) if they exist")
    p.add_argument("--mode", choices=("instances", "semantic"), default="instances",
                   help="instances: each label >= 2 is one cell; semantic: label k is class k - 1")
    p.add_argument("--max-time", type=float, default=None, metavar="SEC",
                   help="time budget in seconds (default 60 when --iterations is not given)")
    p.add_argument("--iterations", type=int, default=None, metavar="N", help="number of optimiser steps")
    p.add_argument("--from", dest="init_from", default=None, metavar="MODEL",
                   help="model file to fine-tune, or 'sample' for the packaged model pretrained on real and "
                        "synthetic nuclei and cells (the best start for a few painted cells; it takes colour images "
                        "as grey; a file named sample: ./sample)")
    p.add_argument("--seed", type=int, default=0, help="random seed (repeatable runs on the CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="compute precision (auto: times fp32, fp32 channels-last and bf16 on this machine and "
                        "takes the clearly fastest; an explicit choice repeats bit for bit)")
    p.add_argument("--channel-axis", type=int, default=None,
                   help="channel axis of the images (default: the axis the labels do not have, the last axis "
                        "first, e.g. RGB)")
    p.add_argument("--depth", type=int, default=None, help=f"U-Net depth of a new model (default: {dmodel.depth})")
    p.add_argument("--width", type=int, default=None,
                   help=f"base filters of a new model (default: {dmodel.base_filters})")
    p.add_argument("--padding", choices=("same", "valid"), default=None,
                   help="padded convs (same) or the paper's unpadded ones (valid) for a new model")
    p.add_argument("--no-batch-norm", action="store_true",
                   help="no batch normalisation in a new model (always off with --padding valid)")
    p.add_argument("--patch-size", type=int, default=None,
                   help=f"training patch side in pixels (default: {dflt.patch_size})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"patches per step (default: {dflt.batch_size}; under torchrun: in all, shared between "
                        "the processes)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default: {dflt.learning_rate:g}; 0.01 with --optimizer sgd)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                   help="constant (default), or cosine: decay to 5%% of --lr over the budget")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=None, help="adam, or sgd with momentum 0.99")
    p.add_argument("--no-augment", action="store_true", help="no geometric or intensity augmentation")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"fraction of painted objects held out for validation (default: {dflt.val_fraction:g})")
    p.add_argument("--min-val-objects", type=int, default=None, metavar="N",
                   help=f"hold objects out only from N painted objects on; with fewer, all train "
                        f"(default: {dflt.min_val_objects})")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help=f"keep an exponential moving average of the weights with this decay (validation, "
                        f"preview and result use it); 0: no averaging (default: {dflt.ema:g})")
    p.add_argument("--keep-pretrained", type=float, default=None, metavar="FRACTION",
                   help=f"with --from: the result blends this fraction of the starting weights into the "
                        f"trained ones (0: the trained weights only; default: {dflt.keep_pretrained:g})")
    p.add_argument("--no-rescale", action="store_true",
                   help="with --from: train on the images as they are (default: resize them so that the painted "
                        "cells have the size of those the starting model knows; prediction does the same)")
    p.add_argument("--side-views", action="store_true",
                   help="the images are 3D volumes (Z before Y, X): also train on their ZX and ZY planes, resampled "
                        "to cubic voxels, where cells were painted on two or more planes (for predict --volume "
                        "orthogonal)")
    p.add_argument("--voxel-size", default=None, metavar="Z,Y,X",
                   help="with --side-views: voxel size along Z, Y, X (default: the first TIFF's pixel size and Z "
                        "spacing, else cubic)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _config(args):
    from .config import TrainConfig

    kw = {"mode": args.mode, "seed": args.seed, "device": args.device, "precision": args.precision,
          "iterations": args.iterations, "max_time": args.max_time, "augment": not args.no_augment,
          "threads": args.threads, "rescale": not args.no_rescale, "side_views": args.side_views}
    if args.voxel_size is not None:
        if not args.side_views:
            raise ValueError("--voxel-size is for --side-views (training on the volumes' side views)")
        from .config import ConfigError, parse_voxel_size

        try:
            kw["voxel_size"] = parse_voxel_size(args.voxel_size)
        except ConfigError:
            raise ValueError(f"--voxel-size {args.voxel_size}: give three positive numbers Z,Y,X, e.g. 2,0.5,0.5"
                             ) from None
    if args.optimizer == "sgd" and args.lr is None:
        kw["learning_rate"] = 0.01  # as the widget's SGD preset: Adam's rate is far too small for SGD
    for name, value in (("patch_size", args.patch_size), ("batch_size", args.batch_size),
                        ("learning_rate", args.lr), ("lr_schedule", args.lr_schedule), ("optimizer", args.optimizer),
                        ("val_fraction", args.val_fraction), ("min_val_objects", args.min_val_objects),
                        ("ema", args.ema), ("keep_pretrained", args.keep_pretrained)):
        if value is not None:
            kw[name] = value
    return TrainConfig(**kw)


def input_pairs(args) -> list[tuple[str, str]]:
    """``(image, labels)`` file pairs from ``--image``/``--labels`` files or ``--images``/``--labels`` folders."""
    from .io import image_files, pair_by_name

    labels = args.labels or []
    if args.images:
        if args.image:
            raise ValueError("give image files (--image) or folders of images (--images), not both")
        if len(args.images) != len(labels):
            raise ValueError(f"{len(args.images)} --images but {len(labels)} --labels; give one labels folder after "
                             "each --images folder")
        pairs = []
        for img_dir, lab_dir in zip(args.images, labels):
            found = pair_by_name(img_dir, lab_dir)
            pairs += [(str(i), str(lab)) for i, lab in found]
            unlabelled = len(image_files(img_dir)) - len(found)
            if unlabelled:
                print(f"napari-unet train: {img_dir}: {unlabelled} image(s) without a label file left out",
                      file=sys.stderr)
        return pairs
    if not args.image:
        raise ValueError("no training images: give --image FILE --labels FILE, or --images DIR --labels DIR")
    if len(args.image) != len(labels):
        raise ValueError(f"{len(args.image)} --image but {len(labels)} --labels; give one --labels per --image")
    for lab in labels:
        if Path(lab).is_dir():
            raise ValueError(f"--labels {lab} is a folder; for folders of images and labels use --images DIR "
                             "--labels DIR")
    return list(zip(args.image, labels))


def _name_inputs(message: str, pairs: list[tuple[str, str]]) -> str:
    """The data error ``message`` with the files it is about ("image 2 ..." names the second pair)."""
    if len(pairs) == 1:
        return f"--image {pairs[0][0]} --labels {pairs[0][1]}: {message}"
    m = re.search(r"\b(?:image|labels) (\d+)\b", message)
    if m and 1 <= int(m.group(1)) <= len(pairs):
        img, lab = pairs[int(m.group(1)) - 1]
        return f"--image {img} --labels {lab}: {message}"
    return f"the inputs: {message}"


def _check_new_file(path: Path, overwrite: bool) -> None:
    from .io import OutputPathError, check_output_path

    # Check the output before minutes of training, not after: check_output_path also creates
    # (and removes) a file beside it, which finds read-only places that permission bits miss.
    if path.exists() and not path.is_dir() and not overwrite:
        raise OutputPathError(f"{path} already exists; use --overwrite to replace it")
    check_output_path(path, overwrite=True)


def run(args) -> int:
    import threading

    from .distributed import init_from_env

    ctx = init_from_env(args.device)
    # Handlers can only be set from the main thread (not when main() is called from another one).
    main_thread = threading.current_thread() is threading.main_thread()
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    ok = False
    try:
        code = _run(args, ctx, catch_signals=main_thread)
        ok = True
        return code
    finally:
        for sig, handler in before.items():
            if handler is not None:
                signal.signal(sig, handler)
        ctx.shutdown(wait=ok)  # also on errors and Ctrl-C: no process group left behind


def _run(args, ctx, catch_signals: bool = False) -> int:
    from .io import read_image

    out = Path(args.out)
    log = Path(args.log_csv) if args.log_csv else None
    # Every rank reads the inputs; a failure on any of them (a file missing on one node) stops all.
    with ctx.agreeing():
        pairs = input_pairs(args) if ctx.is_main else _quietly(input_pairs, args)
        if ctx.is_main:  # only rank 0 writes, and on other nodes its folder may not even exist
            _check_new_file(out, args.overwrite)
            if log is not None:
                _check_new_file(log, args.overwrite)
        if args.init_from is not None:
            given = [flag for flag, v in (("--depth", args.depth), ("--width", args.width),
                                          ("--padding", args.padding), ("--no-batch-norm", args.no_batch_norm or None))
                     if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} describe a new network; a model fine-tuned with --from keeps "
                                 "its own architecture")
        else:
            given = [flag for flag, v in (("--keep-pretrained", args.keep_pretrained),
                                          ("--no-rescale", args.no_rescale or None)) if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply when fine-tuning: give the starting model with --from")
        if args.init_from == "sample":
            from ._sample_data import sample_model_path

            if Path("sample").exists() and ctx.is_main:
                print("napari-unet: --from sample is the packaged model; for the file named sample give ./sample",
                      file=sys.stderr)
            if sample_model_path() is None:
                raise FileNotFoundError("this installation has no packaged sample model (--from sample)")
            args.init_from = str(sample_model_path())
        if args.init_from is not None and not Path(args.init_from).exists():  # a folder: load_model says so
            raise FileNotFoundError(f"{args.init_from}: no such model file")
        config = _config(args)
        images, labels = [], []
        for img_path, lab_path in pairs:
            img, info = read_image(img_path)
            lab, _ = read_image(lab_path)
            images.append(img)
            labels.append(lab)
            if config.side_views and config.voxel_size is None and info.voxel_size() is not None:
                import dataclasses

                config = dataclasses.replace(config, voxel_size=info.voxel_size())

    from .data import TrainingDataError
    from .distributed import DistributedError
    from .io import save_model
    from .training import default_model_config, train

    model_config = None
    if args.init_from is None:
        base = default_model_config()
        changes = {k: v for k, v in (("depth", args.depth), ("base_filters", args.width),
                                     ("padding", args.padding)) if v is not None}
        if changes.get("padding") == "valid" or args.no_batch_norm:
            changes["batch_norm"] = False
        import dataclasses

        model_config = dataclasses.replace(base, **changes)
    stop_requests: list[int] = []
    if catch_signals and ctx.distributed:
        # Ctrl-C reaches every rank (and torchrun forwards it once more); a KeyboardInterrupt would
        # leave each rank at a different point, some waiting in a collective for ever. A flag
        # instead, which train() all-reduces: all ranks stop after the same step. SIGTERM (a
        # batch system's time limit or scancel, torchrun passing it on) the same way.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop_requests.append(signum))
    elif catch_signals:
        def _terminated(signum, frame):  # SIGTERM as Ctrl-C: stop at this point, save the weights so far
            stop_requests.append(signum)
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _terminated)
    gen = train(images, labels, config, init_from=args.init_from, model_config=model_config,
                channel_axis=args.channel_axis, distributed=ctx, stop=lambda: bool(stop_requests))
    show = ctx.is_main
    bar = None
    event = None
    interrupted = False
    log_file = open(log, "w", encoding="utf-8") if (log is not None and show) else None  # noqa: SIM115
    try:
        if log_file is not None:
            log_file.write("iteration,elapsed_s,loss,val_loss,val_iou\n")
        for event in gen:
            if log_file is not None and event.loss is not None:
                cells = [event.iteration, round(event.elapsed, 4), event.loss, event.val_loss, event.val_iou]
                log_file.write(",".join("" if v is None else repr(v) for v in cells) + "\n")
                log_file.flush()  # a live log: `tail -f` it on a cluster
            if not show:
                continue
            if bar is None and not args.quiet:
                from tqdm import tqdm

                bar = tqdm(total=1000, file=sys.stderr, desc="training",
                           bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
            if event.message:
                msg = f"napari-unet train: {event.message}"
                bar.write(msg, file=sys.stderr) if bar is not None else print(msg, file=sys.stderr)
            if bar is not None:
                bar.n = int(round(event.fraction * 1000))
                post = f"step {event.iteration}"
                if event.loss is not None:
                    post += f" loss {event.loss:.3f}"
                if event.best_val_iou is not None:
                    post += f" val IoU {event.best_val_iou:.2f}"
                bar.set_postfix_str(post, refresh=False)
                bar.refresh()
    except KeyboardInterrupt:
        interrupted = True  # stop here, but keep what was learnt: save the weights so far
    except TrainingDataError as e:
        # Name the files: the message says what is wrong with "image 2" / "labels" (or the image).
        raise TrainingDataError(_name_inputs(str(e), pairs)) from None
    except DistributedError as e:  # the same, agreed between the ranks
        raise e.reworded(lambda m: _name_inputs(m, pairs), ("TrainingDataError",)) from None
    finally:
        gen.close()  # on Ctrl-C as well: the finally inside train() loads the kept weights
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    interrupted = interrupted or bool(stop_requests)
    result = event.result if event is not None else None
    if result is None or result.model is None:
        if interrupted:  # Ctrl-C before the first step: nothing to save
            raise KeyboardInterrupt
        raise ValueError("training produced no model")
    if show:
        if interrupted and catch_signals:  # a second Ctrl-C (or torchrun passing the first one on) must not
            for sig in (signal.SIGINT, signal.SIGTERM):  # cut the save short
                signal.signal(sig, signal.SIG_IGN)
        save_model(out, result.model, result.metadata, overwrite=args.overwrite)
        t = result.metadata.get("training", {})
        iou = t.get("best_val_iou")
        procs = f" on {ctx.world_size} processes" if ctx.distributed else ""
        print(f"{'interrupted: ' if interrupted else ''}wrote {out} ({t.get('iterations')} steps in "
              f"{t.get('elapsed')} s{procs}" + (f", held-out IoU {iou:.3f}" if iou is not None else "") + ")",
              file=sys.stderr)
    if interrupted:
        from .errors import EXIT_INTERRUPTED, EXIT_TERMINATED

        return EXIT_TERMINATED if signal.SIGTERM in stop_requests else EXIT_INTERRUPTED
    return 0


def _quietly(fn, *args):
    """``fn(*args)`` with its stderr notes dropped (the other ranks would repeat rank 0's)."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)
