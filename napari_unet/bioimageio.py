"""bioimage.io model packages: a napari-unet model out to the BioImage Model Zoo format, and back (no Qt).

Export (:func:`export_steps`, :func:`export_package`) writes a zip in the current model
format (0.5) with

* ``pytorch_state_dict`` weights whose architecture is this package's ``model.py``, shipped
  as a source file (it runs alone, without napari-unet), the callable
  :class:`~napari_unet.model.SoftmaxUNet` and the model file's ``UNet`` arguments as kwargs;
* ``torchscript`` weights traced from them (runs with torch alone: Fiji/deepImageJ, QuPath);
* the training normalisation as preprocessing (percentiles per sample and channel), the
  valid input sizes as ``min + n * step`` (and, for the paper's unpadded "valid" models, the
  output smaller by the border the network eats), the class probabilities as output;
* a test input and the output this package computes for it, a cover made from them,
  documentation (how the probabilities become instance labels), citations and the training
  provenance, and the whole napari-unet metadata under ``config.napari_unet`` so that
  import gives back the same model.

The finished zip is checked before it is moved to its place: bioimage.io's format
validation (``bioimageio.spec``) and, when ``bioimageio.core`` is installed, its model test,
which reruns the test input through every weight format. A failed check writes nothing.

Import (:func:`import_package`, used by :func:`napari_unet.io.load_model` for ``.zip``
files) takes packages whose architecture is this U-Net: it reads the description (YAML,
no code), builds :class:`~napari_unet.model.UNet` from the kwargs after checking them, and
loads the state dict with ``torch.load(weights_only=True)`` (tensors only, no arbitrary
unpickling). The architecture source in the package is never executed: only its name and
arguments are read. Anything else (another architecture, TorchScript-only packages) is
refused with one line.

Both need the optional dependencies: ``pip install "napari-unet[bioimageio]"``.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._bioimageio_import import (
    ARCH_CALLABLES,
    INSTALL_HINT,
    BioimageioError,
    _require_spec,
    description_name,
    import_package,
    is_package,
)
from .errors import first_line
from .io import atomic_write, check_output_path

__all__ = ["BioimageioError", "export_steps", "export_package", "import_package", "is_package", "package_name",
           "description_name", "INSTALL_HINT", "WEIGHT_FORMATS", "ARCH_CALLABLES"]

#: The weight formats written, in the order of preference the package states.
WEIGHT_FORMATS = ("pytorch_state_dict", "torchscript")
ARCH_FILE = "napari_unet_model.py"
INPUT_ID, OUTPUT_ID = "raw", "probabilities"
#: Side of the test input (the nearest valid size at or above it is used).
TEST_SIDE = 256
UNET_DOI = "10.1007/978-3-319-24574-4_28"
NAPARI_DOI = "10.5281/zenodo.3555620"


# ---- export --------------------------------------------------------------------------------

def _test_input(model, meta: dict[str, Any], image: np.ndarray | None, channel_axis: int | None) -> np.ndarray:
    """``(1, C, S, S)`` float32 raw test input, at the model's scale, ``S`` a valid input size."""
    from .data import resize_plane, scaled_shape
    from .inference import prepare_image

    c = model.config.in_channels
    if image is None:
        from .synthetic import make_nuclei

        grey = make_nuclei((TEST_SIDE, TEST_SIDE), seed=7)[0].astype(np.float32)
        plane = np.repeat(grey[None], c, axis=0)
    else:
        prepared = prepare_image(image, c, channel_axis)
        index = tuple(s // 2 for s in prepared.lead_shape)  # the middle plane of a stack
        plane = prepared.plane(index)
        scale = float(meta.get("scale") or 1.0)
        if scale != 1.0:  # the network saw cells resized by this factor: the package's input must too
            shape = scaled_shape(plane.shape[-2:], scale)
            plane = np.stack([resize_plane(p, shape) for p in plane])
    side = model.valid_input_size(TEST_SIDE)
    h, w = plane.shape[-2:]
    top, left = max((h - side) // 2, 0), max((w - side) // 2, 0)
    plane = plane[:, top:top + side, left:left + side]
    ph, pw = side - plane.shape[1], side - plane.shape[2]
    if ph or pw:  # a small image: mirrored to the size, as overlap-tile prediction does at borders
        plane = np.pad(plane, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode="reflect")
    return np.ascontiguousarray(plane[None], dtype=np.float32)


def _normalised(raw: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """The package's preprocessing, as bioimage.io tools apply it: scale_range per sample and channel."""
    norm = meta.get("normalization") or {}
    low, high = float(norm.get("low", 1.0)), float(norm.get("high", 99.8))
    lo = np.percentile(raw, low, axis=(-2, -1), keepdims=True)
    hi = np.percentile(raw, high, axis=(-2, -1), keepdims=True)
    return ((raw - lo) / (hi - lo + 1e-6)).astype(np.float32)


def _cover(raw: np.ndarray, probs: np.ndarray, meta: dict[str, Any], path: Path) -> None:
    """A 2:1 cover: the test image beside it with the segmentation drawn over it."""
    import imageio.v3 as iio
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    from .data import normalize
    from .postprocess import labels_from_probabilities

    grey = np.clip(normalize(raw[0].mean(axis=0)), 0, 1)
    m = (grey.shape[-1] - probs.shape[-1]) // 2  # the border an unpadded ("valid") network does not predict
    if m:
        grey = grey[m:-m, m:-m]
    mode = meta.get("mode", "semantic")
    if mode == "instances" and probs.shape[1] == 3:
        labels = labels_from_probabilities(probs[0], "instances")
    else:
        labels = labels_from_probabilities(probs[0], "semantic")
    overlay = label2rgb(labels, image=grey, alpha=0.35, bg_label=0, image_alpha=1.0)
    overlay[find_boundaries(labels, mode="inner")] = (1.0, 1.0, 0.0)
    left = np.repeat(grey[..., None], 3, axis=-1)
    cover = (np.concatenate([left, overlay], axis=1) * 255).round().astype(np.uint8)
    iio.imwrite(path, cover)


def _documentation(meta: dict[str, Any], model, name: str) -> str:
    from . import postprocess as pp

    cfg = model.config
    norm = meta.get("normalization") or {}
    mode = meta.get("mode", "semantic")
    scale = float(meta.get("scale") or 1.0)
    training = meta.get("training") or {}
    lines = [
        f"# {package_name(name)}",
        "",
        f"A U-Net (Ronneberger et al. 2015) trained with napari-unet {meta.get('napari_unet_version', '')}: "
        f"depth {cfg.depth}, {cfg.base_filters} filters in the first level, {cfg.padding!r} convolutions"
        f"{', batch norm' if cfg.batch_norm else ''}, {cfg.in_channels} input channel(s), {cfg.n_classes} classes.",
        "",
        "## Input",
        f"- Axes batch, channel, y, x; {cfg.in_channels} channel(s), float32.",
        f"- Preprocessing: per image and channel, the {norm.get('low', 1.0)} percentile maps to 0 and the "
        f"{norm.get('high', 99.8)} percentile to 1 (`scale_range`), as in training.",
    ]
    if abs(scale - 1.0) > 1e-6:
        lines.append(f"- Resize images by a factor {scale:.4g} before prediction (and the result back): training "
                     "resized cells to the size the model was pretrained on. The test input is already resized.")
    if meta.get("object_area"):
        lines.append(f"- Typical object area at that scale: {float(meta['object_area']):.0f} pixels.")
    lines += ["", "## Output", "Class probabilities (softmax over the channel axis), same y/x grid as the input"
              + (" minus the border the unpadded network does not predict." if cfg.padding == "valid" else "."), ""]
    if mode == "instances" and cfg.n_classes == 3:
        lines += [
            "Channels: 0 background, 1 cell interior, 2 cell boundary. napari-unet turns them into instance "
            f"labels: seeds are the connected regions where interior > {pp.SEED_THRESHOLD}, grown by a watershed "
            f"over the foreground (interior + boundary > {pp.FOREGROUND_THRESHOLD}; in a 3D volume "
            f"{pp.VOLUME_SEED_THRESHOLD} and {pp.VOLUME_FOREGROUND_THRESHOLD}); small objects are removed and "
            "enclosed holes filled (`napari_unet.postprocess.instance_labels`). Other tools can threshold the "
            "interior channel and label connected components for a first result.",
        ]
    else:
        names = meta.get("class_names") or []
        lines.append("Channels: " + ", ".join(f"{i} {n}" for i, n in enumerate(names)) if names else
                     "Channel 0 is background, channel k is the class painted with label k + 1; the label image "
                     "is the argmax over channels.")
    if cfg.padding == "same":
        lines += ["", "Predicting in tiles: overlap them (napari-unet overlaps by 32 pixels) and keep their centres, "
                  "as the padded convolutions see less context at tile borders."]
    lines += ["", "## Training", "Trained with napari-unet on painted labels (0 unlabelled, 1 background, 2.. "
              "objects). Provenance:", ""]
    for k, v in training.items():
        if isinstance(v, (str, int, float, bool)):  # the scalars; lists (shapes, losses) stay in the config
            lines.append(f"- {k}: {v}")
    lines += ["", "The full napari-unet metadata is in `config.napari_unet` of the description; napari-unet "
              "reads the package back with `napari-unet predict --model this.zip`."]
    return "\n".join(lines) + "\n"


def export_steps(model_source, out: str | os.PathLike, *, name: str | None = None,
                 description: str | None = None, authors: Sequence[str] | None = None,
                 license: str = "CC-BY-4.0", tags: Sequence[str] | None = None,
                 image: np.ndarray | None = None, channel_axis: int | None = None,
                 weight_formats: Sequence[str] = WEIGHT_FORMATS, test: bool | None = None,
                 overwrite: bool = False) -> Iterator[dict[str, Any]]:
    """Write ``model_source`` as a bioimage.io package at ``out``, yielding progress; stoppable at any yield.

    Parameters
    ----------
    model_source : path-like or (UNet, dict)
        A model file (or a bioimage.io package napari-unet can read), or a network and its metadata.
    out : path-like
        The ``.zip`` to write; nothing is written there unless every check passes.
    name, description, authors, license, tags
        The package's description; defaults: the model file's name, a sentence from the
        metadata, the user's login name, CC-BY-4.0, tags from the label mode.
    image : array, optional
        An image to take the test input from (its middle plane, resized by the model's
        ``scale``, cropped or mirrored to a valid size near 256); default a synthetic nuclei image.
    weight_formats : sequence of str
        Subset of :data:`WEIGHT_FORMATS` (``pytorch_state_dict`` is always written).
    test : bool, optional
        Run bioimage.io's model test on the package (default: when ``bioimageio.core`` is installed).
    overwrite : bool
        Replace an existing ``out``.

    Yields dicts with ``stage`` (a short description) and ``step``/``total``; the last
    one has ``path`` (the written package) and ``checks`` (what was checked).
    """
    _require_spec()
    import torch

    from .io import load_model
    from .model import SoftmaxUNet

    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise BioimageioError(f"{out}: a bioimage.io package is a .zip file; give a name ending in .zip")
    check_output_path(out, overwrite=overwrite)
    unknown = set(weight_formats) - set(WEIGHT_FORMATS)
    if unknown:
        raise BioimageioError(f"unknown weight format(s) {sorted(unknown)}; choose from {list(WEIGHT_FORMATS)}")
    if test is None:
        try:
            import bioimageio.core  # noqa: F401
            test = True
        except ImportError:
            test = False
    total = 5 if test else 4

    if isinstance(model_source, (str, os.PathLike)):
        model, meta = load_model(model_source)
        default_name = Path(model_source).stem
    else:
        model, meta = model_source
        meta = dict(meta or {})
        default_name = "napari-unet model"
    yield {"stage": "model loaded", "step": 1, "total": total}

    cfg = model.config
    net = SoftmaxUNet(**cfg.to_dict())
    net.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    net.eval()
    raw = _test_input(net, meta, image, channel_axis)
    with torch.inference_mode():
        probs = net(torch.from_numpy(_normalised(raw, meta))).numpy()
    yield {"stage": "test output computed", "step": 2, "total": total}

    with tempfile.TemporaryDirectory(prefix="napari-unet-bioimageio-") as tmp:
        d = Path(tmp)
        descr = _describe(net, meta, d, raw, probs, name=name or default_name, description=description,
                          authors=authors, license=license, tags=tags, weight_formats=weight_formats)
        yield {"stage": "package described", "step": 3, "total": total}
        package = d / "package.zip"
        _save_package(descr, package)
        checks = _validate_package(package, test=False)
        yield {"stage": "format validated", "step": 4, "total": total}
        if test:
            checks = _validate_package(package, test=True)
            yield {"stage": "model test passed for " + ", ".join(sorted(set(weight_formats) | {"pytorch_state_dict"})),
                   "step": 5, "total": total}
        with atomic_write(out, overwrite=overwrite) as target:
            shutil.copyfile(package, target)
    yield {"stage": "written", "step": total, "total": total, "path": out, "checks": checks}


def export_package(model_source, out: str | os.PathLike, **kwargs) -> Path:
    """:func:`export_steps` run to the end; returns the written path."""
    *_, last = export_steps(model_source, out, **kwargs)
    return last["path"]


def _save_package(descr, package: Path) -> None:
    from bioimageio.spec import save_bioimageio_package

    try:
        save_bioimageio_package(descr, output_path=package)
    except Exception as e:  # the library raises several types for a description it cannot pack
        raise BioimageioError(f"bioimage.io could not pack the model: {first_line(e)}") from None


def _describe(net, meta: dict[str, Any], d: Path, raw: np.ndarray, probs: np.ndarray, *, name: str,
              description: str | None, authors: Sequence[str] | None, license: str,
              tags: Sequence[str] | None, weight_formats: Sequence[str]):
    """The bioimage.io ModelDescr of the package, its files written into ``d``."""
    import torch
    from bioimageio.spec.model import v0_5 as bio
    from pydantic import ValidationError

    from . import model as model_module

    cfg = net.config
    meta = _public(meta)
    norm = meta.get("normalization") or {}
    mode = meta.get("mode", "semantic")
    np.save(d / "test_input.npy", raw)
    np.save(d / "test_output.npy", probs)
    _cover(raw, probs, meta, d / "cover.png")
    (d / "README.md").write_text(_documentation(meta, net, name), encoding="utf-8")
    shutil.copyfile(model_module.__file__, d / ARCH_FILE)
    torch.save(net.state_dict(), d / "weights.pt")
    if "torchscript" in weight_formats:
        example = torch.from_numpy(_normalised(raw, meta))
        with torch.inference_mode(False), torch.no_grad(), _no_trace_warnings():
            traced = torch.jit.trace(net, example)
        traced.save(str(d / "weights.torchscript.pt"))

    multiple = net.size_multiple
    smallest = net.valid_input_size(1)
    in_axes = [
        bio.BatchAxis(),
        bio.ChannelAxis(channel_names=[bio.Identifier(f"channel{i}") for i in range(cfg.in_channels)]),
        bio.SpaceInputAxis(id=bio.AxisId("y"), size=bio.ParameterizedSize(min=smallest, step=multiple)),
        bio.SpaceInputAxis(id=bio.AxisId("x"), size=bio.ParameterizedSize(min=smallest, step=multiple)),
    ]
    offset = -2 * net.margin()
    names = meta.get("class_names") or []
    if mode == "instances" and cfg.n_classes == 3:
        names = ["background", "interior", "boundary"]
    if len(names) != cfg.n_classes:
        names = [f"class{i}" for i in range(cfg.n_classes)]
    out_axes = [
        bio.BatchAxis(),
        bio.ChannelAxis(channel_names=[bio.Identifier(n) for n in _channel_names(names)]),
        *[bio.SpaceOutputAxis(id=bio.AxisId(a), size=bio.SizeReference(
            tensor_id=bio.TensorId(INPUT_ID), axis_id=bio.AxisId(a), offset=offset)) for a in ("y", "x")],
    ]
    try:
        inputs = [bio.InputTensorDescr(
            id=bio.TensorId(INPUT_ID), axes=in_axes, test_tensor=bio.FileDescr(source=d / "test_input.npy"),
            description="image, normalised by the preprocessing as in training",
            data=bio.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=[bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(
                axes=(bio.AxisId("y"), bio.AxisId("x")), min_percentile=float(norm.get("low", 1.0)),
                max_percentile=float(norm.get("high", 99.8))))],
        )]
        outputs = [bio.OutputTensorDescr(
            id=bio.TensorId(OUTPUT_ID), axes=out_axes, test_tensor=bio.FileDescr(source=d / "test_output.npy"),
            description="class probabilities (softmax over channels)",
            data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        )]
        arch = bio.ArchitectureFromFileDescr(source=d / ARCH_FILE, callable=bio.Identifier("SoftmaxUNet"),
                                             kwargs=cfg.to_dict())
        pytorch_version = bio.Version(torch.__version__.split("+")[0])
        weights = {"pytorch_state_dict": bio.PytorchStateDictWeightsDescr(
            source=d / "weights.pt", architecture=arch, pytorch_version=pytorch_version)}
        if "torchscript" in weight_formats:
            weights["torchscript"] = bio.TorchscriptWeightsDescr(
                source=d / "weights.torchscript.pt", pytorch_version=pytorch_version,
                parent="pytorch_state_dict")
        people = [a.strip() for a in (authors or [getpass.getuser() or "napari-unet user"]) if a.strip()]
        if not people:
            raise BioimageioError("give at least one author name")
        what = "cell/nucleus instance segmentation" if mode == "instances" else "pixel classification"
        kind_tags = ["instance-segmentation", "nuclei", "cells"] if mode == "instances" else ["semantic-segmentation"]
        config = bio.Config(bioimageio=bio.BioimageioConfig(
            architecture_type="U-Net", architecture_description=f"2D U-Net, depth {cfg.depth}, "
            f"{cfg.base_filters} base filters, {cfg.padding} convolutions"), napari_unet=meta)
        descr = bio.ModelDescr(
            name=package_name(name),
            description=description or f"U-Net for {what}, trained in napari-unet on painted labels.",
            authors=[bio.Author(name=p) for p in people],
            cite=[bio.CiteEntry(text="Ronneberger, Fischer, Brox. U-Net: Convolutional Networks for Biomedical "
                                "Image Segmentation. MICCAI 2015", doi=bio.Doi(UNET_DOI)),
                  bio.CiteEntry(text="napari contributors. napari: a multi-dimensional image viewer for Python "
                                "(trained with the napari-unet plugin)", doi=bio.Doi(NAPARI_DOI))],
            license=license,
            tags=list(tags) if tags else ["unet", "2d", "pytorch", "napari-unet", *kind_tags],
            documentation=bio.FileDescr(source=d / "README.md"),
            covers=[bio.FileDescr(source=d / "cover.png")],
            inputs=inputs,
            outputs=outputs,
            weights=bio.WeightsDescr(**weights),
            config=config,
        )
    except ValidationError as e:
        err = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise BioimageioError(f"invalid package description: {where}: {err.get('msg', first_line(e))}") from None
    return descr


def package_name(name: str) -> str:
    """``name`` as bioimage.io accepts it: letters, digits, ``_+- ()`` only, 5 to 64 characters."""
    import re

    s = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", str(name))
    s = re.sub(r"\s+", " ", s).strip()[:64].strip()
    return s if len(s) >= 5 else f"{s} U-Net".strip()


def _channel_names(names: Sequence[str]) -> list[str]:
    """Distinct identifiers for the output channels (a suffix where two names would become one)."""
    out: list[str] = []
    for i, n in enumerate(names):
        ident = _identifier(n, i)
        out.append(ident if ident not in out else f"{ident}_{i}")
    return out


def _identifier(name: str, i: int) -> str:
    """A channel name bioimage.io accepts (letters, digits, underscores; starting with a letter)."""
    import re

    s = re.sub(r"\W+", "_", str(name)).strip("_")
    return s if s and s[0].isalpha() else f"class{i}"


def _public(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata as the package publishes it: JSON values; local paths cut to file names
    (``init_from`` here and in earlier trainings); no ``bioimageio`` import record."""
    import json

    out = json.loads(json.dumps(meta, default=str))
    out.pop("bioimageio", None)
    training = out.get("training")
    while isinstance(training, dict):
        if isinstance(training.get("init_from"), str):
            training["init_from"] = Path(training["init_from"]).name
        training = training.get("previous")
    return out


@contextlib.contextmanager
def _no_trace_warnings():
    """torch.jit.trace warns that it is deprecated: TorchScript is still what bioimage.io's consumers run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated")
        yield


def _validate_package(path: str | os.PathLike, test: bool = True) -> list[str]:
    """Check a package napari-unet has just written: bioimage.io's format validation, then (``test``) its model test.

    Only for our own packages: the model test imports the package's architecture file (ours),
    and the format checks follow file sources wherever they point (ours are all in the zip).

    Returns the names of the checks that passed; raises :class:`BioimageioError` (one line,
    the first failed check) otherwise. The model test reruns the test input through every
    weight format and compares with the test output; it needs ``bioimageio.core``.
    """
    _require_spec()
    from bioimageio.spec import load_description

    path = Path(path)
    try:
        descr = load_description(path, perform_io_checks=True)
    except Exception as e:
        raise BioimageioError(f"{path}: not a readable bioimage.io package ({first_line(e)})") from None
    summary = descr.validation_summary
    if summary.status not in ("passed", "valid-format"):
        raise BioimageioError(f"{path}: bioimage.io format validation failed: {_first_error(summary)}")
    done = [f"format {descr.format_version}"]
    if test:
        try:
            from bioimageio.core import test_model
        except ImportError:
            raise BioimageioError(f"the model test needs bioimageio.core: {INSTALL_HINT}") from None
        summary = test_model(path, devices=["cpu"])
        if summary.status != "passed":
            raise BioimageioError(f"{path}: bioimage.io model test failed: {_first_error(summary)}")
        # The weight formats whose test output the test reproduced (not merely those in the package).
        tested = [str(d.loc[1]) for d in summary.details if d.status == "passed" and len(d.loc) > 1
                  and d.loc[0] == "weights" and d.name.startswith("Reproduce test outputs")]
        missing = set(descr.weights.available_formats) - set(tested)
        if missing:
            raise BioimageioError(f"{path}: bioimage.io's model test did not run the {', '.join(sorted(missing))} "
                                  "weights")
        done.append("model test (" + ", ".join(dict.fromkeys(tested)) + ")")
    return done


def _first_error(summary) -> str:
    for detail in summary.details:
        for err in detail.errors:
            loc = ".".join(str(x) for x in err.loc) if err.loc else ""
            return first_line(f"{detail.name}: {loc + ': ' if loc else ''}{err.msg}")
        if detail.status == "failed":
            return first_line(detail.name)
    return summary.status


