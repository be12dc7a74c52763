"""Configuration as data: frozen dataclasses with ``to_dict`` / ``from_dict``.

A model file stores these dictionaries next to the weights, so a model reloads without
guessing (see :mod:`napari_unet.io`). Imports neither torch nor Qt.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelConfig", "TrainConfig", "PredictConfig", "ConfigError", "default_model_config"]


class ConfigError(ValueError):
    """A configuration value out of range; the message says which and why."""


class _DictMixin:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Build from a dictionary, ignoring unknown keys (files written by newer versions)."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in names})


def parse_voxel_size(value: Any) -> tuple[float, float, float]:
    """``(Z, Y, X)`` voxel size, from three numbers or a text ``"3, 1, 1"``, as positive floats; else a
    one-line :class:`ConfigError` (the CLI, the widgets and the configs share it)."""
    if isinstance(value, str):
        value = value.replace(";", ",").split(",")
    try:
        vs = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        vs = ()
    if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
        raise ConfigError(f"voxel size {value!r}: give three positive numbers Z, Y, X, e.g. 3, 1, 1")
    return vs  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelConfig(_DictMixin):
    """The arguments of :class:`napari_unet.model.UNet`.

    Attributes
    ----------
    in_channels : int
        Image channels the network takes.
    n_classes : int
        Output classes (3 for instance mode: background, cell interior, cell boundary).
    depth : int
        Levels of the U, bottom included (paper: 5).
    base_filters : int
        Channels of the first level, doubled at each level down (paper: 64).
    padding : str
        ``"valid"`` (paper, unpadded convs) or ``"same"`` (padded convs).
    batch_norm : bool
        Batch normalisation after every 3x3 conv.
    up_mode : str
        ``"transpose"`` (paper's up-convolution) or ``"bilinear"``.
    dropout : float
        Dropout probability at the end of the contracting path, in ``[0, 1)``.
    """

    in_channels: int = 1
    n_classes: int = 2
    depth: int = 5
    base_filters: int = 64
    padding: str = "valid"
    batch_norm: bool = False
    up_mode: str = "transpose"
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("in_channels", "n_classes", "depth", "base_filters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.depth > 8:
            raise ConfigError(f"depth must be at most 8, got {self.depth}")
        if self.padding not in ("valid", "same"):
            raise ConfigError(f"padding must be 'valid' or 'same', got {self.padding!r}")
        if self.up_mode not in ("transpose", "bilinear"):
            raise ConfigError(f"up_mode must be 'transpose' or 'bilinear', got {self.up_mode!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")


#: The training budget when neither iterations nor a time is given (seconds).
DEFAULT_MAX_TIME = 60.0


@dataclass(frozen=True)
class TrainConfig(_DictMixin):
    """How to train (owned by :mod:`napari_unet.training`; see its docstring for details).

    Attributes
    ----------
    mode : str
        ``"instances"`` (each label >= 2 is one cell; targets background / interior /
        boundary) or ``"semantic"`` (label k >= 2 is class k - 1).
    iterations : int or None
        Number of optimiser steps; ``None`` for no limit (then ``max_time`` is the budget).
    max_time : float or None
        Time budget in seconds; training stops at the first iteration past it. Not given:
        60 s when ``iterations`` is not given either, else no time limit (``iterations=N``
        makes N steps however long they take).
    patch_size : int
        Side of the square training patches (adjusted to a valid size of the model).
    batch_size : int
        Patches per optimiser step.
    learning_rate : float
        Optimiser step size.
    lr_schedule : str
        ``"constant"``, or ``"cosine"``: decays from ``learning_rate`` to 5 % of it over the
        budget (``iterations`` or ``max_time``, whichever runs out first).
    optimizer : str
        ``"adam"`` (default, good for fine-tuning) or ``"sgd"`` (the paper: momentum 0.99).
    augment : bool
        Shifts, rotations, flips, elastic deformation and intensity changes.
    border_weights : bool or None
        The paper's border weight map; ``None`` means on for ``"instances"``, off otherwise,
        and off when training continues a model in place (``train(model=...)``, the Train
        widget's Continue): the corrections painted then gather on touching cells, where the
        map put most of the loss, and crowded fields came back in fragments (correction-round
        benchmark, docs/fewshot.md).
    boundary_width : int
        Instance mode: width in pixels of the band along each cell's edge that is the
        boundary class; the rest of the cell is its interior, the seed of the watershed
        that separates touching cells at prediction.
    w0, sigma : float
        Weight-map parameters (paper: 10 and 5 px).
    calibrate : bool
        Instance mode: after training, subtract ``log(w_boundary / w_interior)`` from the
        boundary logit of the output layer, undoing the class balancing between the two
        (where the boundary is the rarer class its weight made it win too often: cells came
        out fat and touching ones merged; where it is the commoner, the shift raises it).
        Validation and previews use the shifted output too.
    class_balance : float
        Class weights ``w_c`` proportional to ``(class frequency) ** -class_balance``:
        1 is full inverse-frequency balancing, 0.5 a softer one, 0 none.
    val_fraction : float
        Fraction of labelled objects held out for validation (0 disables validation).
    val_every : int
        Validate (and keep the weights if they are the best so far) every this many steps.
    val_margin : int
        Pixels around each held-out object that are also kept out of the training loss.
    min_val_objects : int
        With fewer painted objects, none is held out: all train, and the averaged (``ema``)
        or last weights are kept. With 5 painted cells, holding one out was no better on
        average and, on one seed of ten, kept nearly untrained weights (few-shot
        benchmark, see docs/design.md).
    momentum : float
        Momentum of the ``"sgd"`` optimiser (paper: 0.99).
    seed : int or None
        Makes CPU runs repeatable.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    precision : str
        ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast). ``"auto"`` on a CPU
        times training steps in fp32, fp32 channels-last and bf16 channels-last and takes
        the clearly fastest (:func:`napari_unet.device.select_training_setup`); an
        explicit value is used as given (fp32 in the plain layout: bit-for-bit repeatable).
    threads : int or None
        CPU threads for torch during training (``None``: leave torch's setting). On a CPU
        shared with other jobs one thread can be several times faster than two.
    ema : float
        Decay of an exponential moving average of the weights (0 disables it): validation,
        the preview and the result use the averaged weights, which are steadier than the
        last step's. The decay warms up as ``min(ema, (1 + n) / (10 + n))`` after ``n``
        steps, so that short runs are not held back by the starting weights.
    check_painted : bool
        Instance mode: after training, segment the painted planes (up to four) and count
        the painted cells found again (IoU > 0.5); the last progress event says so, and
        warns when fewer than half are (:mod:`napari_unet.quality`). Costs one prediction
        per plane.
    rescale : bool
        Instance mode, starting from existing weights: resize the images so that the
        painted cells have the size of the cells the starting model knows (its file's
        ``object_area``); the trained model's file records the factor (``scale``) and
        prediction resizes images by it. Off: images are used as they are.
    keep_pretrained : float
        When training starts from existing weights (``init_from``, or ``model`` to train
        on), the result keeps this fraction of the starting weights: it is
        ``keep * start + (1 - keep) * trained``, layer by layer (weight-space ensembling of
        the pretrained and the fine-tuned network, "WiSE-FT", Wortsman et al. 2022). A few
        painted cells pull a fine-tuned network far from what pretraining taught it; the
        blend keeps that prior and scored higher on the few-shot benchmark. Validation, the
        preview and the result all use the blend. 0 keeps only the trained weights; a new
        network, or an output layer replaced for other classes, is not blended.
    side_views : bool
        Stacks are volumes (Z = the axis before Y, X): besides the painted YX planes, the
        ZX and ZY planes of each volume resampled to cubic voxels (``voxel_size``) train
        too, where they cross cells painted on two or more planes
        (:func:`napari_unet.training_data.side_planes`). For the ``"orthogonal"`` volume
        prediction, which shows the network those side views.
    voxel_size : (float, float, float) or None
        Voxel size along Z, Y, X for ``side_views`` (``None``: cubic).
    """

    mode: str = "instances"
    iterations: int | None = None
    max_time: float | None = None
    patch_size: int = 128
    batch_size: int = 8
    learning_rate: float = 3e-3
    lr_schedule: str = "constant"
    optimizer: str = "adam"
    augment: bool = True
    border_weights: bool | None = None
    boundary_width: int = 3
    w0: float = 10.0
    sigma: float = 5.0
    class_balance: float = 0.5
    calibrate: bool = True
    val_fraction: float = 0.2
    val_every: int = 10
    val_margin: int = 8
    min_val_objects: int = 8
    momentum: float = 0.99
    seed: int | None = 0
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    ema: float = 0.99
    keep_pretrained: float = 0.3
    check_painted: bool = True
    rescale: bool = True
    side_views: bool = False
    voxel_size: tuple[float, float, float] | None = None

    def __post_init__(self):
        if self.voxel_size is not None:
            object.__setattr__(self, "voxel_size", parse_voxel_size(self.voxel_size))
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {self.threads}")
        if self.mode not in ("instances", "semantic"):
            raise ConfigError(f"mode must be 'instances' or 'semantic', got {self.mode!r}")
        if self.iterations is None and self.max_time is None:
            object.__setattr__(self, "max_time", DEFAULT_MAX_TIME)  # the minute users expect
        if self.iterations is not None and self.iterations < 1:
            raise ConfigError(f"iterations must be at least 1, got {self.iterations}")
        if self.max_time is not None and self.max_time <= 0:
            raise ConfigError(f"max_time must be positive, got {self.max_time}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.batch_size < 1 or self.patch_size < 8:
            raise ConfigError("batch_size must be >= 1 and patch_size >= 8")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if isinstance(self.boundary_width, bool) or not isinstance(self.boundary_width, int) \
                or not 1 <= self.boundary_width <= 32:
            raise ConfigError(f"boundary_width must be an integer from 1 to 32 px, got {self.boundary_width!r}")
        if self.val_every < 1 or self.val_margin < 0 or self.min_val_objects < 2:
            raise ConfigError("val_every must be >= 1, val_margin >= 0 and min_val_objects >= 2")
        if self.learning_rate <= 0 or not 0.0 <= self.momentum < 1.0:
            raise ConfigError("learning_rate must be positive and momentum in [0, 1)")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if not 0.0 <= self.keep_pretrained < 1.0:
            raise ConfigError(f"keep_pretrained must be in [0, 1), got {self.keep_pretrained}")

    @classmethod
    def paper_preset(cls, **overrides) -> TrainConfig:
        """The paper's optimisation: SGD, momentum 0.99, batch 1, 572 px tiles, border weight map.

        Also the paper's targets: full class balancing, a 1 px boundary, no calibration and
        no weight averaging.
        Use it with the paper's unpadded network (``napari_unet.training.paper_preset``
        returns both configs).
        """
        kw: dict[str, Any] = dict(optimizer="sgd", momentum=0.99, batch_size=1, patch_size=572,
                                  learning_rate=0.01, border_weights=True, class_balance=1.0, boundary_width=1,
                                  calibrate=False, ema=0.0)
        kw.update(overrides)
        return cls(**kw)


@dataclass(frozen=True)
class PredictConfig(_DictMixin):
    """How to predict (owned by :mod:`napari_unet.inference`; see its docstring for details).

    Attributes
    ----------
    output : str or None
        ``"instances"`` or ``"semantic"``; ``None`` uses the model's training mode.
    probabilities : bool
        Also return the per-class probability maps.
    tile_size : int or None
        Side of the input tiles; ``None`` chooses from the memory available.
    overlap : int
        Overlap between neighbouring tiles of a ``"same"`` model, in pixels (blended).
    batch_size : int or None
        Tiles per forward pass; ``None`` chooses automatically.
    blending : str
        ``"gaussian"`` or ``"cosine"`` window for ``"same"`` models.
    device : str
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    precision : str
        ``"auto"`` (fastest safe choice for this machine), ``"fp32"``, ``"bf16"``, ``"fp16"``.
    backend : str
        What runs the network on the CPU: ``"torch"``, ``"openvino"`` (the optional
        ``napari-unet[openvino]`` extra) or ``"auto"``: OpenVINO where it is installed, the
        job feeds the network at least 4 megapixels, and the job's batches plus OpenVINO's
        set-up (compiling; converting a network the first time) measure at most 0.8 of
        torch's time on this machine (per-batch times measured once per shape, cached),
        else torch. GPUs always run torch.
    channel_axis : int or None
        Axis of the image's channels; ``None`` detects it (RGB(A) last axis, or none).
    seed_threshold, foreground_threshold : float or None
        Instances: a pixel seeds a cell where the cell-interior probability exceeds
        ``seed_threshold`` (lower finds more cells and splits fewer, higher merges fewer
        touching ones), and belongs to some cell where interior + boundary exceeds
        ``foreground_threshold`` (higher gives tighter outlines). ``None``: 0.4 and 0.6 for
        planes, 0.5 and 0.5 for volumes (``Z`` in ``axes``, whatever ``volume`` method, and
        any plane of one segmented alone; ``napari_unet.postprocess``; docs/design.md says
        how they were chosen).
    min_size : int or None
        Instances smaller than this many pixels are removed. ``None``: a fraction of the
        median area of the cells the model was trained on (its file's ``object_area``),
        or 15 px for models that do not know it.
    flips : bool
        Test-time augmentation: each tile also goes through the network mirrored left-right,
        up-down and both, and the four probability maps (mirrored back) are averaged. Four
        times the compute; smoother cell outlines. Whether it helps depends on the network
        (see docs/design.md); ``benchmarks/fewshot.py --flips`` measures it.
    scale : float or None
        Resize each plane by this factor before the network (the probabilities are resized
        back, so labels have the image's shape). ``None``: the model file's ``scale`` (what
        training chose so that the painted cells had the size the model knew), else 1.
    axes : str or None
        What the image's axes are, channel axis left out: letters ending in ``YX``, e.g.
        ``"ZYX"`` (one volume), ``"TYX"`` (frames), ``"TZYX"`` (a time series of volumes).
        ``Z`` makes the stack a volume segmented in 3D (see ``volume``); every other
        leading axis (``T``, or anything else) holds independent planes or volumes, each
        with ids of its own. ``None``: every leading axis holds independent planes.
    voxel_size : (float, float, float) or None
        Size of a voxel along Z, Y, X (any unit; only the ratios matter): the Z step makes
        the side views isotropic and turns the 2D size limits into volumes. ``None``: cubic.
    volume : str
        How a volume (``Z`` in ``axes``) is segmented: ``"3d"`` (probabilities of every YX
        plane, then seeds and watershed in 3D), ``"orthogonal"`` (also the ZX and ZY planes
        of the volume resampled to cubic voxels, the three averaged, then 3D; about 1 +
        2 x the Z step x the compute) or ``"stitch"`` (2D objects per plane, linked to the
        plane above by overlap: the simple baseline).
    volume_smoothing : float
        ``"3d"`` and ``"orthogonal"``: the standard deviation, in Y/X pixels (Z scaled by the
        voxel size), of a Gaussian over the volume's probabilities before its 3D
        post-processing; 0 for none. Planes predicted one by one disagree a little from
        one to the next (and the side views' planes from their neighbours): unsmoothed,
        that made one-voxel streaks and split seeds. The default was measured on synthetic
        volumes with both methods (``benchmarks/volumes.py``, docs/volumes.md).
    """

    output: str | None = None
    probabilities: bool = False
    tile_size: int | None = None
    overlap: int = 32
    batch_size: int | None = None
    blending: str = "gaussian"
    device: str = "auto"
    precision: str = "auto"
    backend: str = "auto"
    channel_axis: int | None = None
    seed_threshold: float | None = None
    foreground_threshold: float | None = None
    min_size: int | None = None
    flips: bool = False
    scale: float | None = None
    axes: str | None = None
    voxel_size: tuple[float, float, float] | None = None
    volume: str = "3d"
    volume_smoothing: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.volume_smoothing, (int, float)) and 0 <= self.volume_smoothing <= 20):
            raise ConfigError(f"volume_smoothing must be between 0 and 20 pixels, got {self.volume_smoothing!r}")
        if self.axes is not None:
            if not isinstance(self.axes, str):
                raise ConfigError(f"axes must be letters such as 'ZYX' or 'TZYX', got {self.axes!r}")
            axes = self.axes.upper()
            if (not axes.isalpha() or not axes.endswith("YX") or len(set(axes)) != len(axes)
                    or "C" in axes or "S" in axes):
                raise ConfigError(f"axes must be distinct letters ending in YX, without the channel axis (e.g. "
                                  f"'ZYX', 'TYX', 'TZYX'), got {self.axes!r}")
            object.__setattr__(self, "axes", axes)
        if self.voxel_size is not None:
            object.__setattr__(self, "voxel_size", parse_voxel_size(self.voxel_size))
        if self.volume not in ("3d", "orthogonal", "stitch"):
            raise ConfigError(f"volume must be '3d', 'orthogonal' or 'stitch', got {self.volume!r}")
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and 0.05 <= self.scale <= 20):
            raise ConfigError(f"scale must be between 0.05 and 20, or None (the model's), got {self.scale!r}")
        if self.output not in (None, "instances", "semantic"):
            raise ConfigError(f"output must be 'instances' or 'semantic', got {self.output!r}")
        if self.tile_size is not None and self.tile_size < 8:
            raise ConfigError(f"tile_size must be at least 8, got {self.tile_size}")
        if self.min_size is not None and self.min_size < 0:
            raise ConfigError(f"min_size must be >= 0 or None (auto), got {self.min_size}")
        for name in ("seed_threshold", "foreground_threshold"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                                          and 0 < value < 1):
                raise ConfigError(f"{name} must be between 0 and 1 (exclusive), or None (auto), got {value!r}")
        if self.overlap < 0:
            raise ConfigError(f"overlap must be >= 0, got {self.overlap}")
        if self.blending not in ("gaussian", "cosine"):
            raise ConfigError(f"blending must be 'gaussian' or 'cosine', got {self.blending!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.backend not in ("auto", "torch", "openvino"):
            raise ConfigError(f"backend must be auto, torch or openvino, got {self.backend!r}")


def default_model_config(in_channels: int = 1, n_classes: int = 3) -> ModelConfig:
    """The network trained when none is given: depth 4, 8 base filters, padded convs, batch norm.

    Chosen with ``benchmarks/fewshot.py`` (see docs/design.md): on a 2-core CPU it makes
    about 400 steps of 8 patches a minute and reached the best held-out AP of the sizes
    tried (width 16 made fewer, slower steps in the same minute).
    (Here, not in ``training``, so that the widgets show it without importing torch.)
    """
    return ModelConfig(in_channels=in_channels, n_classes=n_classes, depth=4, base_filters=8, padding="same",
                       batch_norm=True, up_mode="transpose", dropout=0.0)
