"""``napari-unet train``: train or fine-tune a U-Net on painted labels and write one model file.

Drains :func:`napari_unet.training.train` (the generator the napari widget runs in a
worker thread) with a tqdm progress bar on stderr. Bad input raises ``ValueError`` /
``OSError``, which :func:`napari_unet.cli.main` turns into one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train or fine-tune a U-Net on painted labels",
        description="Train (or fine-tune with --from) a U-Net on images with painted labels: 0 unlabelled, "
                    "1 background, 2, 3, ... objects. Writes exactly the file --out names.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", action="append", required=True, metavar="IMG",
                   help="image file (TIFF, PNG, ...); repeat for several images, each followed by its --labels")
    p.add_argument("--labels", action="append", required=True, metavar="LAB",
                   help="painted labels of the same shape as the image; one per --image")
    p.add_argument("--out", required=True, metavar="MODEL", help="model file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--mode", choices=("instances", "semantic"), default="instances",
                   help="instances: each label >= 2 is one cell; semantic: label k is class k - 1")
    p.add_argument("--max-time", type=float, default=None, metavar="SEC",
                   help="time budget in seconds (default 60 when --iterations is not given)")
    p.add_argument("--iterations", type=int, default=None, metavar="N", help="number of optimiser steps")
    p.add_argument("--from", dest="init_from", default=None, metavar="MODEL", help="model file to fine-tune")
    p.add_argument("--seed", type=int, default=0, help="random seed (repeatable runs on the CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="compute precision (auto: bf16 only where it is measured faster)")
    p.add_argument("--channel-axis", type=int, default=None, help="channel axis of the images (RGB is detected)")
    p.add_argument("--depth", type=int, default=None, help="U-Net depth of a new model (default: 4)")
    p.add_argument("--width", type=int, default=None, help="base filters of a new model (default: 16)")
    p.add_argument("--padding", choices=("same", "valid"), default=None,
                   help="padded convs (same) or the paper's unpadded ones (valid) for a new model")
    p.add_argument("--patch-size", type=int, default=None, help="training patch side in pixels")
    p.add_argument("--batch-size", type=int, default=None, help="patches per step")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=None, help="adam, or sgd with momentum 0.99")
    p.add_argument("--no-augment", action="store_true", help="no geometric or intensity augmentation")
    p.add_argument("--val-fraction", type=float, default=None, help="fraction of painted objects held out")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _config(args):
    from .config import TrainConfig

    kw = {"mode": args.mode, "seed": args.seed, "device": args.device, "precision": args.precision,
          "iterations": args.iterations, "max_time": args.max_time, "augment": not args.no_augment,
          "threads": args.threads}
    if args.iterations is None and args.max_time is None:
        kw["max_time"] = 60.0
    for name, value in (("patch_size", args.patch_size), ("batch_size", args.batch_size),
                        ("learning_rate", args.lr), ("optimizer", args.optimizer),
                        ("val_fraction", args.val_fraction)):
        if value is not None:
            kw[name] = value
    return TrainConfig(**kw)


def run(args) -> int:
    from .io import OutputPathError, check_output_path, read_image

    if len(args.image) != len(args.labels):
        raise ValueError(f"{len(args.image)} --image but {len(args.labels)} --labels; give one --labels per --image")
    out = Path(args.out)
    # Check the output before minutes of training, not after: check_output_path also creates
    # (and removes) a file beside it, which finds read-only places that permission bits miss.
    if out.exists() and not out.is_dir() and not args.overwrite:
        raise OutputPathError(f"{out} already exists; use --overwrite to replace it")
    check_output_path(out, overwrite=True)
    if args.init_from is not None and not Path(args.init_from).exists():  # a folder: load_model says so
        raise FileNotFoundError(f"{args.init_from}: no such model file")
    config = _config(args)
    images, labels = [], []
    for img_path, lab_path in zip(args.image, args.labels):
        img, _ = read_image(img_path)
        lab, _ = read_image(lab_path)
        images.append(img)
        labels.append(lab)

    from .data import TrainingDataError
    from .io import save_model
    from .training import default_model_config, train

    model_config = None
    if args.init_from is None:
        base = default_model_config()
        changes = {k: v for k, v in (("depth", args.depth), ("base_filters", args.width),
                                     ("padding", args.padding)) if v is not None}
        if changes.get("padding") == "valid":
            changes["batch_norm"] = False
        import dataclasses

        model_config = dataclasses.replace(base, **changes)
    gen = train(images, labels, config, init_from=args.init_from, model_config=model_config,
                channel_axis=args.channel_axis)
    bar = None
    event = None
    interrupted = False
    try:
        for event in gen:
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
        interrupted = True  # stop here, but keep what was learnt: save the best weights so far
    except TrainingDataError as e:
        # Name the files: the message says what is wrong with "image 2" / "labels" (or the image).
        files = f"--image {args.image[0]} --labels {args.labels[0]}" if len(args.labels) == 1 else "the inputs"
        raise TrainingDataError(f"{files}: {e}") from None
    finally:
        gen.close()  # on Ctrl-C as well: the finally inside train() loads the best weights
        if bar is not None:
            bar.close()
    result = event.result if event is not None else None
    if result is None or result.model is None:
        if interrupted:  # Ctrl-C before the first step: nothing to save
            raise KeyboardInterrupt
        raise ValueError("training produced no model")
    save_model(out, result.model, result.metadata, overwrite=args.overwrite)
    t = result.metadata.get("training", {})
    iou = t.get("best_val_iou")
    print(f"{'interrupted: ' if interrupted else ''}wrote {out} ({t.get('iterations')} steps in "
          f"{t.get('elapsed')} s" + (f", held-out IoU {iou:.3f}" if iou is not None else "") + ")", file=sys.stderr)
    if interrupted:
        from .cli import EXIT_INTERRUPTED

        return EXIT_INTERRUPTED
    return 0
