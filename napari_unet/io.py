"""Files: model files (weights + everything needed to use them, no pickle) and TIFF in/out.

Model files are `safetensors <https://huggingface.co/docs/safetensors>`_ files: a JSON
header, then raw tensor bytes. Loading one parses JSON and copies numbers; it never
unpickles, so a model file cannot run code. The napari-unet metadata (the ``UNet``
arguments, the normalisation used in training, the label mode, class names, package
version and training provenance) lives as JSON in the header's ``__metadata__``.

Every write is atomic: the bytes go to a temporary file in the target's folder, which is
then renamed over the target, so an interrupted write never leaves a partial file there.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import secrets
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFileError, first_line
from .modelmeta import check_metadata, default_metadata, weights_mismatch

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "ModelFileError", "OutputPathError",
    "save_model", "load_model", "read_model_metadata", "atomic_write", "check_output_path",
    "ImageInfo", "read_image", "write_labels_tiff", "default_metadata", "first_line",
    "IMAGE_SUFFIXES", "LABEL_SUFFIXES", "image_files", "pair_by_name",
]

FORMAT_NAME = "napari-unet-model"
#: Bumped when a model file changes in a way older versions cannot read.
FORMAT_VERSION = 1
_META_KEY = "napari_unet"

#: The file types read as images in folders (training folders, ``predict --image DIR``).
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
#: Accepted differences between an image's name and its labels' name (``cell01.tif`` -> ``cell01_labels.tif``).
LABEL_SUFFIXES = ("", "_labels", "_label", "_mask", "_masks", "_seg", "_gt")


class OutputPathError(OSError):
    """An output path that cannot be written (a folder, a missing folder, read-only, exists)."""


# ---- atomic writes --------------------------------------------------------------------------

def _check_output_path(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise OutputPathError(f"{path} is a folder; give a file name")
    if not path.parent.is_dir():
        if path.parent.exists():
            raise OutputPathError(f"cannot write {path}: {path.parent} is a file, not a folder")
        raise OutputPathError(f"cannot write {path}: the folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise OutputPathError(f"{path} already exists; choose another name or allow overwriting")
    if not os.access(path.parent, os.W_OK):
        raise OutputPathError(f"cannot write {path}: the folder {path.parent} is not writable")


def _temporary_beside(path: Path) -> Path:
    """An empty temporary file in ``path``'s folder, or :class:`OutputPathError` saying why not.

    ``os.access`` cannot tell everything (root ignores permission bits, read-only mounts,
    /proc, a full disk): only creating a file can, so failures to do so get the target's
    name and the system's reason in one line instead of the temporary's errno message.
    """
    # Not tempfile.mkstemp: it creates files readable by their owner only (0600), and the
    # rename would hand that to the model file or TIFF. Mode 0666 lets the umask decide,
    # as for any file the user saves.
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputPathError(f"cannot write {path}: {e.strerror or first_line(e)}") from None
        os.close(fd)
        return tmp
    raise OutputPathError(f"cannot write {path}: no free temporary name beside it")  # pragma: no cover


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check that ``path`` can be written, before hours of work produce what goes there.

    Raises :class:`OutputPathError` (one line) if ``path`` is a folder, its folder is
    missing or not a folder, it exists and ``overwrite`` is false, or a file cannot be
    created beside it (read-only, no permission, full disk); a file created to find out
    is removed at once. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    _check_output_path(path, overwrite)
    _temporary_beside(path).unlink()
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success rename it to ``path``.

    On any error (or interruption) the temporary file is removed and ``path`` is left as
    it was. The rename (``os.replace``) is atomic on POSIX and Windows file systems.
    """
    path = Path(path)
    _check_output_path(path, overwrite)
    tmp_path = _temporary_beside(path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if path.exists() and not overwrite:  # appeared while we were writing
            raise OutputPathError(f"{path} already exists; choose another name or allow overwriting")
        with contextlib.suppress(OSError):  # a replaced file keeps its permissions (where chmod works at all)
            os.chmod(tmp_path, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


# ---- model files ----------------------------------------------------------------------------

def _package_version() -> str:
    from . import __version__
    return __version__


def save_model(path: str | os.PathLike, model, metadata: dict[str, Any] | None = None,
               overwrite: bool = True) -> Path:
    """Write ``model`` and ``metadata`` to one safetensors file, atomically.

    Parameters
    ----------
    path : path-like
        Target file (conventionally ``*.safetensors``). Written via a temporary file.
    model : napari_unet.model.UNet
        The network; its ``config`` (the ``UNet`` arguments) is stored with the weights.
    metadata : dict, optional
        JSON-serialisable information: ``normalization`` (how images were normalised in
        training), ``mode`` (``"instances"`` or ``"semantic"``), ``class_names``,
        ``object_area`` (median area of the painted cells, px, after resizing by ``scale``),
        ``scale`` (the factor training resized images by, and prediction does), ``output_bias_shift`` (what
        training added to the output bias, undone before training on) and ``training``
        (provenance: date, iterations, data shapes, ...). Missing keys get
        :func:`default_metadata`'s values; ``napari_unet_version`` and ``saved`` are added.
    overwrite : bool
        Replace an existing file (default) or raise :class:`OutputPathError`.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    from safetensors.torch import save as st_save

    meta = default_metadata()
    meta.update(metadata or {})
    meta.pop("model", None)
    meta.update({
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "napari_unet_version": _package_version(),
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    try:
        header = json.dumps(meta)
    except TypeError as e:
        raise ValueError(f"model metadata must be JSON-serialisable: {e}") from None
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = st_save(tensors, metadata={_META_KEY: header})
    path = Path(path)
    with atomic_write(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(blob)
    return path


def _read_header(path: Path) -> tuple[dict[str, Any], Any]:
    """Parse the file's header with safetensors (no pickle); return (metadata, safe_open handle)."""
    from safetensors import safe_open

    if not path.exists():
        raise ModelFileError(f"{path}: no such model file")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, not a model file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: the file is empty, not a napari-unet model")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        raw = (handle.metadata() or {}).get(_META_KEY)
    except Exception as e:  # safetensors raises several types for garbage
        raise ModelFileError(
            f"{path}: not a napari-unet model file (not a valid safetensors file: {first_line(e)}); "
            "model files are never unpickled") from None
    if raw is None:
        raise ModelFileError(f"{path}: a safetensors file without napari-unet metadata")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: absurdly nested JSON
        raise ModelFileError(f"{path}: the napari-unet metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path}: not a napari-unet model file")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelFileError(f"{path}: invalid model format version {str(version)[:20]!r} in the file")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: written by a newer napari-unet (model format {version}, this version reads up "
            f"to {FORMAT_VERSION}); upgrade napari-unet")
    check_metadata(meta, path)
    return meta, handle


def _is_package(path: Path) -> bool:
    """A bioimage.io package: named .zip, or a zip archive holding a bioimage.io description.

    (Other zips, such as ``torch.save`` files, go to the safetensors reader, which refuses them.)
    """
    if path.suffix.lower() == ".zip":
        return True
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    from ._bioimageio_import import description_name

    return description_name(path) is not None


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a model file, without building the network or loading torch weights.

    (For a bioimage.io package the network is rebuilt: the metadata sits in its description.)
    """
    if _is_package(Path(path)):
        return load_model(path)[1]
    meta, _ = _read_header(Path(path))
    return meta


def load_model(path: str | os.PathLike, device: str = "cpu"):
    """Rebuild a model saved with :func:`save_model`.

    Returns
    -------
    (UNet, dict)
        The network in eval mode on ``device``, and its metadata.

    Raises
    ------
    ModelFileError
        One line naming the file: missing, empty, truncated, not safetensors (a pickle,
        say: it is refused, never unpickled), not a napari-unet model, from a newer
        format, metadata prediction could not use (label mode, normalisation, class
        names, cell area, output bias shift), or weights that do not fit the stored architecture (compared with the
        header's tensor shapes before anything is allocated).
    """
    path = Path(path)
    if _is_package(path):
        from ._bioimageio_import import import_package

        return import_package(path, device)
    import torch

    from .config import ConfigError, ModelConfig
    from .model import UNet

    meta, handle = _read_header(path)
    try:
        config = ModelConfig.from_dict(meta["model"])
        # Built on the meta device (no memory): the architecture comes from the file, and
        # absurd sizes in a damaged or crafted file must not allocate anything before the
        # stored tensors' shapes (read from the header, no data) are known to match.
        with torch.device("meta"):
            skeleton = UNet.from_config(config)
    except (KeyError, TypeError, ConfigError) as e:
        raise ModelFileError(f"{path}: invalid model architecture in the file ({first_line(e)})") from None
    except (RuntimeError, ValueError, OverflowError) as e:
        raise ModelFileError(f"{path}: impossible model architecture in the file ({first_line(e)})") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    stored = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    what = weights_mismatch(expected, stored)
    if what:
        raise ModelFileError(f"{path}: the weights do not fit the stored architecture ({what})")
    # The stored tensors become the weights (assign): no random initialisation to overwrite
    # (Kaiming draws for every layer cost a second of start-up for the larger models).
    model = skeleton
    try:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
        model.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise ValueError("some weights are not in the file")
    except Exception as e:
        raise ModelFileError(f"{path}: the weights do not fit the stored architecture ({first_line(e)})") from None
    model.to(device).eval()
    return model, meta


# ---- images and TIFF ------------------------------------------------------------------------

@dataclass
class ImageInfo:
    """What an image file says about its pixels, kept so outputs can carry it over.

    ``axes`` uses tifffile's letters (``"YX"``, ``"ZYX"``, ``"TYX"``, ``"YXS"`` for RGB
    samples, ``"CYX"`` ...), or ``None`` if unknown. ``scale`` maps spatial axis letters
    to pixel sizes (e.g. ``{"X": 0.65, "Y": 0.65, "Z": 2.0}``) in ``unit``.
    """

    axes: str | None = None
    scale: dict[str, float] = field(default_factory=dict)
    unit: str | None = None

    def voxel_size(self) -> tuple[float, float, float] | None:
        """``(Z, Y, X)`` from the Z spacing and pixel size; ``None`` without a Z spacing (Y/X default to
        each other, then to 1)."""
        if "Z" not in self.scale:
            return None
        y = self.scale.get("Y", self.scale.get("X", 1.0))
        return float(self.scale["Z"]), float(y), float(self.scale.get("X", y))


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, ImageInfo]:
    """Read an image file: TIFF with tifffile (axes and pixel size kept), others with imageio.

    Raises ``FileNotFoundError`` or ``ValueError`` with a one-line message naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                data = series.asarray()
                info = ImageInfo(axes=series.axes)
                _read_tiff_scale(tif, info)
        except Exception as e:
            raise ValueError(f"{path}: cannot read this TIFF ({first_line(e)})") from None
        return data, info
    try:
        import imageio.v3 as iio

        data = np.asarray(iio.imread(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read this image ({first_line(e)})") from None
    axes = {2: "YX", 3: "YXS"}.get(data.ndim)
    return data, ImageInfo(axes=axes)


def _read_ome_scale(tif, info: ImageInfo) -> bool:
    """OME-TIFF: PhysicalSizeX/Y/Z of the first image (tifffile's XML parser); whether there were any."""
    import tifffile

    try:
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
    except (KeyError, IndexError, TypeError, ValueError):
        return False
    for letter in "XYZ":
        size = pixels.get(f"PhysicalSize{letter}")
        if size:
            info.scale[letter] = float(size)
    unit = pixels.get("PhysicalSizeXUnit", "\u00b5m")
    if info.scale:
        info.unit = "um" if unit in ("\u00b5m", "µm", "um") else str(unit)
    return bool(info.scale)


def _read_tiff_scale(tif, info: ImageInfo) -> None:
    if getattr(tif, "is_ome", False) and tif.ome_metadata and _read_ome_scale(tif, info):
        return
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    ij = tif.imagej_metadata or {}
    for letter, tag in (("X", "XResolution"), ("Y", "YResolution")):
        t = page.tags.get(tag)
        if t is not None:
            num, den = t.value
            if num and den and (num, den) != (1, 1):
                info.scale[letter] = den / num
    if "spacing" in ij:
        info.scale["Z"] = float(ij["spacing"])
    unit = ij.get("unit")
    if unit and unit not in ("pixel", "\\u00B5m"):
        info.unit = unit
    elif unit == "\\u00B5m":
        info.unit = "um"
    if info.unit is None and info.scale:
        info.unit = "um"


_IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)


def _imagej_labels(labels: np.ndarray) -> np.ndarray | None:
    """The labels in a dtype ImageJ can store, without losing a value; ``None`` if impossible.

    ImageJ hyperstacks hold only uint8, uint16 and float32. Labels of those dtypes are
    kept as they are; other integer labels go to the smallest of uint8/uint16 that holds
    them exactly (napari's default int32/int64 labels mostly fit).
    """
    if labels.dtype.type in _IMAGEJ_DTYPES:
        return labels
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        return None
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        return None
    for dt in (np.uint8, np.uint16):
        if hi <= np.iinfo(dt).max:
            return labels.astype(dt)
    return None


def imagej_tiff_kwargs(axes: str | None, scale: dict | None, unit: str | None) -> dict[str, Any]:
    """``tifffile.imwrite`` keywords for an ImageJ TIFF of ``axes`` (``None``: pixel size only).

    The pixel size goes into the resolution tags (X, Y) and the ImageJ metadata (Z spacing,
    unit). A pixel size is a length: a napari layer may have a negative scale (a flipped
    view) or a zero/NaN one; the file gets the size, or none when there is no usable size.
    """
    scale = {k.upper(): abs(float(v)) for k, v in (scale or {}).items() if np.isfinite(float(v)) and float(v) != 0}
    kwargs: dict[str, Any] = {}
    if "X" in scale and "Y" in scale:
        kwargs["resolution"] = (1.0 / scale["X"], 1.0 / scale["Y"])
    if axes is not None:
        meta: dict[str, Any] = {"axes": axes}
        if "Z" in scale:
            meta["spacing"] = scale["Z"]
        if scale and unit:
            meta["unit"] = unit
        kwargs.update(imagej=True, metadata=meta)
    return kwargs


def write_labels_tiff(path: str | os.PathLike, labels: np.ndarray, *, axes: str | None = None,
                      scale: dict[str, float] | None = None, unit: str | None = "um",
                      overwrite: bool = False) -> Path:
    """Write a label image as an ImageJ-compatible TIFF, atomically.

    Parameters
    ----------
    path : path-like
        Target ``.tif`` / ``.tiff`` file.
    labels : numpy.ndarray
        Integer labels, 2D to 5D. uint8 and uint16 are written as they are; other integer
        dtypes are stored losslessly as the smallest of uint8/uint16 holding their values;
        labels above 65535 (or negative) are written as a plain, non-ImageJ TIFF of their
        own dtype, because ImageJ hyperstacks cannot hold them. Boolean masks are written
        as uint8, floats only when every value is a whole number; empty arrays and other
        dtypes raise ``ValueError``.
    axes : str, optional
        Axis letters of ``labels`` (``"YX"``, ``"ZYX"``, ``"TZYX"``...); guessed from ``ndim``.
    scale : dict, optional
        Pixel sizes by axis letter (``{"X": 0.5, "Y": 0.5, "Z": 2.0}``), stored as the
        TIFF resolution and ImageJ spacing.
    overwrite : bool
        Replace an existing file; by default an existing file raises :class:`OutputPathError`.
    """
    import tifffile

    labels = np.asarray(labels)
    if labels.ndim < 2:
        raise ValueError(f"labels must have at least 2 dimensions, got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError(f"the labels are empty (shape {labels.shape}); nothing to write")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    elif np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise ValueError(f"labels must be whole numbers; these are {labels.dtype} with fractional, NaN or "
                             "infinite values")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, not {labels.dtype}")
    if axes is None:
        axes = {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TZCYX"}.get(labels.ndim)
        if axes is None:
            raise ValueError(f"labels with {labels.ndim} dimensions cannot be written to TIFF (2 to 5 are supported)")
    if len(axes) != labels.ndim:
        raise ValueError(f"axes {axes!r} do not match labels of shape {labels.shape}")
    data = _imagej_labels(labels)
    if data is not None:
        kwargs = imagej_tiff_kwargs(axes, scale, unit)
    else:
        data = labels
        kwargs = {**imagej_tiff_kwargs(None, scale, unit), "metadata": {"axes": axes}, "photometric": "minisblack"}
    path = Path(path)
    with atomic_write(path, overwrite=overwrite) as tmp:
        tifffile.imwrite(tmp, data, **kwargs)
    return path


# ---- folders of images ----------------------------------------------------------------------

def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a folder (:data:`IMAGE_SUFFIXES`), sorted; hidden files (macOS
    ``._x.tif`` resource forks, editors' ``.x.tif~``) are not images."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def pair_by_name(images_dir: str | os.PathLike, labels_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Pair the images of one folder with the label files of another, by file name.

    ``cell01.tif`` pairs with ``cell01.tif``, ``cell01_labels.tif``, ``cell01_mask.png``
    ... (see :data:`LABEL_SUFFIXES`) in ``labels_dir``. Images without labels are left
    out (a folder may hold unlabelled images); it is an error when no image has labels,
    when a label file fits several images, or when an image has several label files.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for d, what in ((images_dir, "images"), (labels_dir, "labels")):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such folder (--{what})")
    labels_by_stem: dict[str, list[Path]] = {}
    for p in image_files(labels_dir):
        labels_by_stem.setdefault(p.stem.lower(), []).append(p)
    pairs: list[tuple[Path, Path]] = []
    used: dict[Path, Path] = {}
    for img in image_files(images_dir):
        found = [lab for suffix in LABEL_SUFFIXES for lab in labels_by_stem.get(img.stem.lower() + suffix, [])]
        found = [lab for lab in found if lab.resolve() != img.resolve()]
        if not found:
            continue
        if len(found) > 1:
            raise ValueError(f"{img.name}: several label files fit ({', '.join(p.name for p in found)})")
        lab = found[0]
        if lab in used:
            raise ValueError(f"{lab.name} fits both {used[lab].name} and {img.name}")
        used[lab] = img
        pairs.append((img, lab))
    if not pairs:
        raise ValueError(f"no image in {images_dir} has a label file of the same name in {labels_dir} "
                         f"(accepted: NAME.tif, NAME_labels.tif, NAME_mask.tif, ...)")
    return pairs
