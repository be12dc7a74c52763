"""Reading bioimage.io model packages of napari-unet's U-Net (no Qt; nothing from the package is executed).

The reading half of :mod:`napari_unet.bioimageio`, apart so that :func:`napari_unet.io.load_model`
can hand ``.zip`` files to it (the export half builds on ``io``). See that module's docstring.
"""

from __future__ import annotations

import io as _io
import os
import zipfile
from pathlib import Path

from .errors import ModelFileError, first_line
from .modelmeta import check_metadata, default_metadata, weights_mismatch

__all__ = ["BioimageioError", "import_package", "is_package", "description_name", "INSTALL_HINT", "ARCH_CALLABLES"]

INSTALL_HINT = "pip install 'napari-unet[bioimageio]'"
#: The callables of ``model.py`` import accepts (the same parameters; ``UNet`` returns logits).
ARCH_CALLABLES = ("SoftmaxUNet", "UNet")


class BioimageioError(ValueError):
    """A package that cannot be written or read; the message is one line."""


def _require_spec():
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise BioimageioError(f"bioimage.io packages need the bioimageio.spec package: {INSTALL_HINT}") from None
    _quiet_loguru()


def _quiet_loguru() -> None:
    """bioimage.io logs every step through loguru: silence its modules only (failures are reported
    as one line by this module; other loguru users of the process keep their handlers)."""
    try:
        from loguru import logger
    except ImportError:  # pragma: no cover - a dependency of bioimageio.spec
        return
    logger.disable("bioimageio")


def is_package(path: str | os.PathLike) -> bool:
    """``True`` for a file that is a zip archive (what bioimage.io packages are)."""
    p = Path(path)
    return p.is_file() and zipfile.is_zipfile(p)


#: The names bioimage.io looks for its description under, at the top of the zip.
DESCRIPTION_NAMES = ("rdf.yaml", "bioimageio.yaml", "model.yaml")


def description_name(path: str | os.PathLike) -> str | None:
    """The bioimage.io description file at the top of the zip ``path``, or ``None``."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if "/" not in n]
    except (OSError, zipfile.BadZipFile):
        return None
    for n in names:
        if n in DESCRIPTION_NAMES or n.endswith((".rdf.yaml", ".bioimageio.yaml")):
            return n
    return None


def _weights_bytes(path: Path, sd) -> bytes:
    """The state dict file: a member of the zip itself whose SHA-256 is the one the description gives.

    Read here with :mod:`zipfile`, not through bioimage.io's reader, which would follow a
    source elsewhere (a URL, a path outside the package) and accepts a missing hash.
    """
    import hashlib

    source = str(sd.source)
    if "://" in source or source.startswith(("/", "\\")) or ".." in Path(source).parts:
        raise ModelFileError(f"{path}: the weights must be a file inside the package, not {source[:80]!r}")
    if sd.sha256 is None:
        raise ModelFileError(f"{path}: the package gives no SHA-256 for its weights; napari-unet reads only "
                             "weights it can check")
    try:
        with zipfile.ZipFile(path) as z:
            blob = z.read(source)
    except KeyError:
        raise ModelFileError(f"{path}: the weights file {source!r} is not in the package") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise ModelFileError(f"{path}: cannot read the weights in the package ({first_line(e)})") from None
    if hashlib.sha256(blob).hexdigest() != str(sd.sha256):
        raise ModelFileError(f"{path}: the weights do not match their SHA-256 in the description (damaged or altered)")
    return blob


def import_package(path: str | os.PathLike, device: str = "cpu"):
    """A bioimage.io package of this U-Net -> ``(UNet, metadata)``, as :func:`napari_unet.io.load_model` returns.

    Nothing from the package is executed: the description is YAML, the architecture is
    rebuilt from its name and kwargs, the weights are read with ``weights_only=True``.

    Raises
    ------
    ModelFileError
        One line: not a zip or not a bioimage.io model, another architecture, no
        ``pytorch_state_dict`` weights, weights that do not fit, unusable metadata.
    """
    import torch

    from .config import ConfigError, ModelConfig
    from .model import UNet

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file" if not path.exists() else f"{path}: is not a file")
    if not is_package(path):
        raise ModelFileError(f"{path}: not a zip file (damaged or incomplete?), so not a bioimage.io package")
    if description_name(path) is None:
        raise ModelFileError(f"{path}: a zip without a bioimage.io description (rdf.yaml), so not a model package")
    try:
        _require_spec()
    except BioimageioError as e:
        raise ModelFileError(f"{path}: {e}") from None
    from bioimageio.spec import InvalidDescr, load_model_description

    try:
        descr = load_model_description(path, perform_io_checks=False)
    except Exception as e:
        raise ModelFileError(f"{path}: not a bioimage.io model package ({first_line(e)})") from None
    if isinstance(descr, InvalidDescr):  # pragma: no cover - load_model_description raises instead
        raise ModelFileError(f"{path}: invalid bioimage.io package")
    sd = descr.weights.pytorch_state_dict
    if sd is None:
        raise ModelFileError(f"{path}: the package has no pytorch_state_dict weights (formats: "
                             f"{', '.join(descr.weights.available_formats)}); napari-unet reads only its own U-Net")
    arch = sd.architecture
    callable_name = str(getattr(arch, "callable", ""))
    if callable_name not in ARCH_CALLABLES or getattr(arch, "import_from", "napari_unet.model") != "napari_unet.model":
        raise ModelFileError(f"{path}: the package's architecture is {callable_name!r}, not napari-unet's U-Net "
                             f"({' or '.join(ARCH_CALLABLES)}); it cannot be loaded here")
    kwargs = dict(arch.kwargs)
    names = {f for f in ModelConfig.__dataclass_fields__}
    if set(kwargs) - names:
        raise ModelFileError(f"{path}: unknown U-Net arguments {sorted(set(kwargs) - names)} in the package")
    try:
        config = ModelConfig.from_dict(kwargs)
        with torch.device("meta"):
            skeleton = UNet.from_config(config)
    except (TypeError, ValueError, ConfigError, RuntimeError, OverflowError) as e:
        raise ModelFileError(f"{path}: invalid U-Net arguments in the package ({first_line(e)})") from None

    meta = default_metadata()
    stored = (descr.config.model_extra or {}).get("napari_unet") if descr.config is not None else None
    if isinstance(stored, dict):
        meta.update(stored)
    else:  # a package of this architecture written elsewhere: what the description says
        meta["mode"] = "instances" if config.n_classes == 3 else "semantic"
        for p in descr.inputs[0].preprocessing:
            if getattr(p, "id", None) == "scale_range":
                meta["normalization"] = {"method": "percentile", "low": float(p.kwargs.min_percentile),
                                         "high": float(p.kwargs.max_percentile)}
    meta["model"] = config.to_dict()
    meta["bioimageio"] = {"name": descr.name, "package": path.name}
    try:
        check_metadata(meta, path)
    except ModelFileError as e:
        raise ModelFileError(f"{e} (in the package's config.napari_unet)") from None

    blob = _weights_bytes(path, sd)
    try:
        state = torch.load(_io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ModelFileError(f"{path}: the package's weights are not a plain state dict ({first_line(e)}); "
                             "they are never unpickled beyond tensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: the package's weights are not a state dict of tensors")
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    what = weights_mismatch(expected, got)
    if what:
        raise ModelFileError(f"{path}: the weights do not fit the U-Net described ({what})")
    skeleton.load_state_dict(state, strict=True, assign=True)
    return skeleton.to(device).eval(), meta
