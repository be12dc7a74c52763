"""Segmenting images of any size with a U-Net: overlap-tile prediction, blending, post-processing.

``predict(model, image, config)`` is a generator: it yields a :class:`PredictProgress`
after every batch of tiles and returns a :class:`Prediction`. The CLI drains it; the
napari widget runs it in a ``thread_worker`` (``worker.quit()`` stops it at the next tile).
Closing the generator stops at once: no further tile is computed.

Tiling (:func:`tiled_predict`), as in the U-Net paper:

* ``padding="valid"`` models (the paper's): the input tiles are valid sizes of the model
  and their output regions tile the image seamlessly; the context missing at the image
  borders is filled by mirroring. Tiles start on multiples of ``2 ** (depth - 1)`` so
  every max-pool sees the same pixel grid as a whole-image forward: the tiled output
  equals a whole-image forward of the mirror-padded image (up to float rounding).
* ``padding="same"`` models: overlapping tiles (``config.overlap`` pixels) blended with a
  smooth window (Gaussian or cosine), mirrored at the borders.

Images: 2D ``(Y, X)``; with channels (``config.channel_axis``, or detected: a last axis
of size 3/4 is RGB(A), or an axis whose size is the model's ``in_channels``); stacks
``(Z, Y, X)``, ``(T, Y, X)``, ``(T, Z, Y, X)`` processed plane by plane, unless
``config.axes`` has a Z: then each volume is put together in 3D (see :func:`predict`). An RGB(A) image
given to a 1-channel model is converted to grey (luminance, alpha ignored) before
normalisation. Each 2D plane is normalised on its own with the model file's parameters
(:func:`napari_unet.data.normalize_like`), so predicting one plane gives the same result
as that plane of a whole-stack prediction.

Probabilities, when asked for, are float32 with the class axis FIRST: ``(C, ..., Y, X)``
(in napari: ``viewer.add_image(p, channel_axis=0)``).

Speed: tiles run in ``torch.inference_mode`` with channels-last memory format and, where
it is faster (:func:`napari_unet.device.select_precision`), bf16/fp16 autocast. Memory:
outputs accumulate in preallocated float32 arrays (2 maps per pixel for instance labels,
C maps when probabilities are asked for or for semantic labels); tiles are never kept.
Tile size and batch come from the free memory (GPU) or available RAM (CPU); an
out-of-memory error retries with half the batch, then half the tile.
"""

from __future__ import annotations

import copy
import math
import os
import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import PredictConfig
from .data import find_channel_axis, reflect_indices, to_grey
from .jobs import relay

__all__ = [
    "predict", "predict_all", "tiled_predict", "tiled_predict_iter", "PredictProgress", "Prediction",
    "prepare_image", "choose_tile", "is_out_of_memory", "reflect_indices", "instance_size_limits",
]


@dataclass(frozen=True)
class PredictProgress:
    """One progress event of :func:`predict`.

    Attributes
    ----------
    done, total : int
        Tiles computed so far and in the whole job (all planes).
    plane, n_planes : int
        The plane being processed (0-based, among the selected planes) and how many there are.
    device : str
        Where the tiles run (what ``"auto"`` picked, e.g. ``"cpu"``, ``"cuda:0"``).
    precision : str
        ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    message : str
        A short human-readable status line.
    backend : str
        What runs the network: ``"torch"`` or ``"openvino"``.
    """

    done: int
    total: int
    plane: int
    n_planes: int
    device: str
    precision: str
    message: str = ""
    backend: str = "torch"


@dataclass
class Prediction:
    """The result of :func:`predict`.

    Attributes
    ----------
    labels : numpy.ndarray
        Shape of the image without its channel axis. Instances: 0 background, 1..N cells
        (ids unique across a stack), uint16 or uint32. Semantic: class index, 0 background,
        uint8 (uint16 beyond 256 classes).
    probabilities : numpy.ndarray or None
        float32 ``(C, ..., Y, X)``, class axis first; ``None`` unless asked for.
    device, precision : str
        What the tiles ran on and in.
    tile_size : int
        Side of the input tiles finally used (after any out-of-memory retry).
    output : str
        ``"instances"`` or ``"semantic"``.
    backend : str
        What ran the network: ``"torch"`` or ``"openvino"`` (see ``PredictConfig.backend``).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    device: str
    precision: str
    tile_size: int
    output: str = "instances"
    backend: str = "torch"


# ---- tiling core ----------------------------------------------------------------------------

def _positions(size: int, out_tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Starts of the output regions along one axis, covering ``[0, size)``.

    Regions of ``out_tile`` pixels, neighbours overlapping by at least ``overlap``, spread
    evenly with the last one flush with the end where possible (as MONAI does). Starts are
    multiples of ``multiple`` (``2 ** (depth - 1)`` for a U-Net, so every max-pool sees the
    pixel grid of a whole-image forward); then the last region may hang over the end by
    less than ``multiple`` (mirrored context, cropped output). A region larger than the
    image starts at 0 (or is centred when ``multiple == 1``).
    """
    if out_tile >= size:
        return [0 if multiple > 1 else -((out_tile - size) // 2)]
    step = (out_tile - overlap) // multiple * multiple
    if step < 1:
        raise ValueError(f"output tiles of {out_tile} px with overlap {overlap} leave no step that is a multiple "
                         f"of {multiple}; use a larger tile or a smaller overlap")
    last = -(-(size - out_tile) // multiple) * multiple
    n = -(-last // step) + 1
    # floor(k * last / (n - 1)) on the multiple grid: consecutive starts differ by at most step.
    return [k * last // (n - 1) // multiple * multiple for k in range(n - 1)] + [last]


def _window(n: int, blending: str) -> np.ndarray:
    """A 1D blending window, positive everywhere (so any pixel covered once is still defined)."""
    x = (np.arange(n, dtype=np.float64) + 0.5) / n
    if blending == "constant" or n == 1:
        w = np.ones(n)
    elif blending == "gaussian":
        sigma = 1.0 / 8.0  # nnU-Net's choice: sigma = tile / 8
        w = np.exp(-0.5 * ((x - 0.5) / sigma) ** 2)
    elif blending == "cosine":
        w = np.sin(np.pi * x) ** 2
    else:
        raise ValueError(f"blending must be 'gaussian', 'cosine' or 'constant', got {blending!r}")
    return np.maximum(w / w.max(), 1e-6).astype(np.float32)


def _as_chw(image) -> np.ndarray:
    try:
        import torch

        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().float().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"tiled_predict needs a (C, H, W) or (H, W) image, got shape {image.shape}")
    return image


def tiled_predict_iter(predictor: Callable | Sequence[Callable], image, tile: int | tuple[int, int],
                       overlap: int = 0, batch_size: int = 1, blending: str = "gaussian", margin: int = 0,
                       output_channels: int | None = None, *, multiple: int = 1, out: np.ndarray | None = None,
                       transform: Callable[[np.ndarray], np.ndarray] | None = None,
                       ) -> Generator[tuple[int, int], None, np.ndarray]:
    """Sliding-window prediction as a generator: yields ``(tiles_done, tiles_total)``, returns the output.

    Parameters
    ----------
    predictor : callable or sequence of callables
        ``f(x) -> y`` with ``x`` a float32 torch tensor ``(N, C, th, tw)`` on the CPU and
        ``y`` a tensor or array ``(N, K, th - 2 * margin, tw - 2 * margin)``. Several
        predictors (one model replica per GPU) run batches in parallel, one thread each.
    image : numpy.ndarray or torch.Tensor
        ``(C, H, W)`` or ``(H, W)``, any size (smaller than one tile included).
    tile : int or (int, int)
        Input tile size ``(th, tw)``; it must be a size the predictor takes. Along an axis
        where the image (plus margins) is smaller, the tile is used as is and the image
        mirrored to fill it.
    overlap : int
        Minimum overlap of neighbouring output regions, in pixels.
    batch_size : int
        Tiles per predictor call.
    blending : {"gaussian", "cosine", "constant"}
        Weight of each tile's output, as a separable window over its output region;
        overlapping outputs are averaged with these weights. ``"constant"`` is a plain mean
        (exact for valid models, whose overlapping outputs are identical).
    margin : int
        Pixels the predictor loses at each border (``UNet.margin()``; 0 for same-size
        outputs). The missing context at the image borders is mirrored.
    output_channels : int, optional
        ``K``; found from the first batch when not given (then ``out`` is allocated late).
    multiple : int
        Output regions start on multiples of this (``2 ** (depth - 1)`` for U-Nets, so that
        every max-pool sees the grid of a whole-image forward: without it, the outputs of
        neighbouring tiles disagree everywhere, not only near their borders).
    out : numpy.ndarray, optional
        Preallocated float32 ``(K, H, W)`` to accumulate into (e.g. a slice of a bigger array).
    transform : callable, optional
        Applied to each batch of input tiles ``(N, C, th, tw)`` (in the image's dtype) before
        the predictor, returning float32: e.g. the normalisation, so that a huge image is
        never copied whole.

    Returns
    -------
    numpy.ndarray
        float32 ``(K, H, W)``: the blended predictions.
    """
    import torch

    predictors = list(predictor) if isinstance(predictor, (list, tuple)) else [predictor]
    img = _as_chw(image)
    c, h, w = img.shape
    th, tw = (tile, tile) if isinstance(tile, (int, np.integer)) else tuple(int(t) for t in tile)
    oh, ow = th - 2 * margin, tw - 2 * margin
    if oh < 1 or ow < 1:
        raise ValueError(f"tile {th}x{tw} leaves no output with margin {margin}")
    ys = _positions(h, oh, overlap, multiple)
    xs = _positions(w, ow, overlap, multiple)
    wy, wx = _window(oh, blending), _window(ow, blending)
    # The windows are separable and the tiles lie on a grid, so the sum of weights at a pixel
    # is an outer product of two 1D sums: no (H, W) weight image needs to be stored.
    sy, sx = np.zeros(h, np.float64), np.zeros(w, np.float64)
    for y in ys:
        sy[max(y, 0):min(y + oh, h)] += wy[max(-y, 0):min(h - y, oh)]
    for x in xs:
        sx[max(x, 0):min(x + ow, w)] += wx[max(-x, 0):min(w - x, ow)]
    positions = [(y, x) for y in ys for x in xs]
    total = len(positions)
    iy = {y: reflect_indices(y - margin, y - margin + th, h) for y in ys}
    ix = {x: reflect_indices(x - margin, x - margin + tw, w) for x in xs}

    def read(batch):
        arr = np.stack([img[:, iy[y][:, None], ix[x][None, :]] for y, x in batch])
        arr = transform(arr) if transform is not None else arr.astype(np.float32, copy=False)
        return torch.from_numpy(arr)

    def write(batch, pred):
        nonlocal out
        if isinstance(pred, torch.Tensor):
            pred = pred.detach().float().cpu().numpy()
        pred = np.asarray(pred, dtype=np.float32)
        if pred.shape[0] != len(batch) or pred.shape[-2:] != (oh, ow):
            raise ValueError(f"the predictor returned shape {tuple(pred.shape)} for {len(batch)} tiles of "
                             f"{th}x{tw}; expected (N, K, {oh}, {ow})")
        if out is None:
            out = np.zeros((pred.shape[1], h, w), np.float32)
        for (y, x), p in zip(batch, pred):
            y0, y1, x0, x1 = max(y, 0), min(y + oh, h), max(x, 0), min(x + ow, w)
            wt = wy[y0 - y:y1 - y, None] * wx[None, x0 - x:x1 - x]
            out[:, y0:y1, x0:x1] += p[:, y0 - y:y1 - y, x0 - x:x1 - x] * wt

    if out is not None:
        if out.shape[1:] != (h, w) or (output_channels is not None and out.shape[0] != output_channels):
            raise ValueError(f"out has shape {out.shape}, expected ({output_channels}, {h}, {w})")
        out[...] = 0
    elif output_channels is not None:
        out = np.zeros((output_channels, h, w), np.float32)

    batches = [positions[i:i + batch_size] for i in range(0, total, max(int(batch_size), 1))]
    done = 0
    if len(predictors) == 1:
        f = predictors[0]
        for batch in batches:
            write(batch, f(read(batch)))
            done += len(batch)
            yield done, total
    else:
        yield from _run_parallel(predictors, batches, read, write, total)
    if out is None:  # no tiles at all cannot happen (positions is never empty), but be explicit
        raise ValueError("no tiles were predicted")
    # Normalise by the summed weights, a band of rows at a time (no full-size temporary).
    for r0 in range(0, h, 256):
        r1 = min(r0 + 256, h)
        out[:, r0:r1] /= (sy[r0:r1, None] * sx[None, :]).astype(np.float32)
    return out


def _run_parallel(predictors, batches, read, write, total):
    """One thread per predictor (one model replica per GPU), results written in order."""
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()
    slots = list(predictors)
    lock = threading.Lock()

    def call(batch):
        if not hasattr(local, "f"):
            with lock:
                local.f = slots.pop()
        return local.f(read(batch))

    ex = ThreadPoolExecutor(max_workers=len(predictors), thread_name_prefix="napari-unet-tile")
    pending: list = []
    done = 0
    try:
        it = iter(batches)
        for batch in it:
            pending.append((batch, ex.submit(call, batch)))
            if len(pending) < 2 * len(predictors):
                continue
            b, fut = pending.pop(0)
            write(b, fut.result())
            done += len(b)
            yield done, total
        while pending:
            b, fut = pending.pop(0)
            write(b, fut.result())
            done += len(b)
            yield done, total
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def tiled_predict(predictor: Callable | Sequence[Callable], image, tile: int | tuple[int, int], overlap: int = 0,
                  batch_size: int = 1, blending: str = "gaussian", margin: int = 0,
                  output_channels: int | None = None, *, multiple: int = 1, out: np.ndarray | None = None,
                  ) -> np.ndarray:
    """Sliding-window prediction of a whole ``(C, H, W)`` image; see :func:`tiled_predict_iter`.

    In the spirit of MONAI's ``sliding_window_inference(inputs, roi_size, sw_batch_size,
    predictor, overlap, mode)``, with the U-Net's ``margin`` for unpadded models.

    Returns
    -------
    numpy.ndarray
        float32 ``(K, H, W)``.
    """
    from .jobs import drain

    return drain(tiled_predict_iter(predictor, image, tile, overlap, batch_size, blending, margin, output_channels,
                                    multiple=multiple, out=out))


# ---- images: channels, planes --------------------------------------------------------------

@dataclass
class _Prepared:
    image: np.ndarray          # the user's array, channel axis moved last (a view), or no channel axis
    has_channels: bool
    to_grey: bool              # RGB(A) for a 1-channel model
    lead_shape: tuple[int, ...]
    plane_shape: tuple[int, int]

    def raw_plane(self, index: tuple[int, ...]) -> np.ndarray:
        """The plane ``(C, Y, X)`` (C = model channels) without a copy where it can be: a view in the
        image's dtype, or the grey float32 plane of an RGB(A) image for a 1-channel model."""
        p = self.image[index]
        if not self.has_channels:
            return np.asarray(p)[None]
        if self.to_grey:
            return to_grey(p)[..., 0][None]
        return np.moveaxis(np.asarray(p), -1, 0)

    def plane(self, index: tuple[int, ...]) -> np.ndarray:
        """The raw plane ``(C, Y, X)`` (C = model channels), float32."""
        p = self.image[index]
        if not self.has_channels:
            return np.asarray(p, dtype=np.float32)[None]
        if self.to_grey:
            return to_grey(p)[..., 0][None]
        return np.moveaxis(np.asarray(p, dtype=np.float32), -1, 0)


def prepare_image(image: np.ndarray, in_channels: int, channel_axis: int | None = None) -> _Prepared:
    """Find the channel axis and the planes of ``image`` for a model taking ``in_channels``.

    The channel axis is :func:`napari_unet.data.find_channel_axis`'s for the model's
    channels (an explicit ``channel_axis``, else for a 1-channel model a last axis of 3 or
    4 entries as RGB(A), for ``k > 1`` channels an axis of ``k`` entries, the last first).
    An explicit axis must have ``in_channels`` entries, or 3/4 (RGB(A), converted to grey)
    for a 1-channel model. The two last remaining axes are ``(Y, X)``.

    Raises
    ------
    ValueError
        One line naming the image shape and the model's channels when they do not match.
    """
    image = np.asarray(image)
    if image.dtype.kind not in "biuf":
        raise ValueError(f"cannot segment an image of dtype {image.dtype}; use integers or floats")
    ax = find_channel_axis(image.shape, in_channels, channel_axis=channel_axis)
    if channel_axis is not None:
        n = image.shape[ax]
        if n != in_channels and not (in_channels == 1 and n in (3, 4)):
            raise ValueError(f"the image has {n} channels (axis {channel_axis} of shape {image.shape}) but the "
                             f"model takes {in_channels}")
    if ax is not None:
        image = np.moveaxis(image, ax, -1)
        spatial = image.shape[:-1]
    else:
        spatial = image.shape
    if len(spatial) < 2:
        raise ValueError(f"the image needs at least 2 spatial dimensions (Y, X), got shape {spatial}")
    if min(spatial) < 1:  # no pixels, or a stack of no planes (the labels written would be empty)
        raise ValueError(f"the image is empty (shape {image.shape})")
    return _Prepared(image=image, has_channels=ax is not None,
                     to_grey=ax is not None and in_channels == 1 and image.shape[-1] in (3, 4),
                     lead_shape=tuple(spatial[:-2]), plane_shape=tuple(spatial[-2:]))


# ---- memory, tiles, OOM -------------------------------------------------------------------------

def is_out_of_memory(e: BaseException) -> bool:
    """True for torch's CUDA OOM, a RuntimeError saying "out of memory", or MemoryError."""
    if isinstance(e, MemoryError):
        return True
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _available_memory(device) -> int:
    """Free bytes where the tiles run: free GPU memory, or available RAM on the CPU."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with napari; the plain-CPU fallback is POSIX sysconf
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def bytes_per_pixel(model, precision: str = "fp32") -> float:
    """Peak memory of a forward pass per input pixel (whole-image inference was measured
    at about 300 bytes/pixel for width 16 / depth 4 and 600 for width 32 / depth 5)."""
    cfg = model.config
    bpp = 20.0 * cfg.base_filters * (1.3 if cfg.padding == "valid" else 1.0) + 16.0 * cfg.in_channels
    return bpp * (0.6 if precision in ("bf16", "fp16") else 1.0)


def choose_tile(model, device, precision: str = "fp32", tile_size: int | None = None,
                batch_size: int | None = None, available: int | None = None) -> tuple[int, int]:
    """``(tile, batch)``: the input tile side (a valid size of ``model``) and tiles per batch.

    Explicit values are kept (the tile rounded up to a valid size). Otherwise: on the CPU one
    tile per batch (batching never helped on a 2-core CPU) and the largest tile up to 1024
    whose forward fits in a quarter of the available RAM (at most 512 MB, so a huge image
    stays within a bounded memory); on a GPU tiles up to 1024 and as many per batch (up to
    16) as fit in half of the free memory.
    """
    import torch

    device = torch.device(device)
    bpp = bytes_per_pixel(model, precision)
    if available is None:
        available = _available_memory(device)
    gpu = device.type in ("cuda", "mps")
    budget = available * (0.5 if gpu else 0.25)
    if not gpu:
        budget = min(budget, 512e6)
    if tile_size is None:
        side = int(math.sqrt(max(budget, 1) / bpp))
        side = max(min(side, 1024), 64)
        tile = _valid_down(model, side)
    else:
        tile = model.valid_input_size(int(tile_size))
        if model.padding == "valid" and model.output_size(tile) < 2 ** (model.depth - 1):
            tile = model.valid_input_size(2 * model.margin() + 2 ** (model.depth - 1))
    if batch_size is None:
        batch_size = 1 if not gpu else int(max(1, min(16, budget // (bpp * tile * tile))))
    return tile, int(batch_size)


def _valid_down(model, side: int) -> int:
    from .model import InvalidInputSizeError

    try:
        s = model.valid_input_size(side, "down")
    except InvalidInputSizeError:
        s = model.valid_input_size(1)
    if model.padding == "valid" and model.output_size(s) is not None and model.output_size(s) < 2 ** (model.depth - 1):
        s = model.valid_input_size(2 * model.margin() + 2 ** (model.depth - 1))
    return s


def _plane_tile(model, tile: int, plane_shape: tuple[int, int], overlap: int = 0,
                multiple: int = 1) -> tuple[int, int]:
    """The tile for one plane, per axis: ``tile``, or the smallest valid size that needs no more tiles.

    ``tile`` is the largest that fits in memory. A 1024 px image in tiles of 880 needs two
    per axis, which cover 1760 px: tiles of about 512 + overlap cover it in two too, with
    much less computing.
    """
    m = model.margin()
    sizes = []
    for s in plane_shape:
        t = min(tile, model.valid_input_size(s + 2 * m))

        def count(size: int, s: int = s) -> int:
            try:
                return len(_positions(s, size - 2 * m, overlap, multiple))
            except ValueError:  # no step left with this overlap
                return 1 << 30

        n = count(t)
        if n > 1:
            for cand in model.valid_input_sizes(2 * m + overlap + 1, t):
                if count(cand) <= n:
                    t = cand
                    break
        sizes.append(t)
    return tuple(sizes)  # type: ignore[return-value]


# ---- predict ----------------------------------------------------------------------------------

#: Without a size from the model file: the smallest cell kept, in pixels.
DEFAULT_MIN_SIZE = 15
#: With the median area A of the painted cells (model file's ``object_area``): cells smaller
#: than MIN_SIZE_FRACTION * A are removed, seeds smaller than MIN_SEED_FRACTION * A are
#: merged into their neighbours. Chosen with ``benchmarks/fewshot.py`` (see docs/design.md).
MIN_SIZE_FRACTION = 0.15
MIN_SEED_FRACTION = 0.05


def instance_size_limits(min_size: int | None, object_area: float | None) -> tuple[int, int]:
    """``(min_size, min_seed_size)`` for :func:`napari_unet.postprocess.instance_labels`.

    An explicit ``min_size`` is kept; ``None`` derives it from the median area of the cells
    the model was trained on, when the model file has it, else :data:`DEFAULT_MIN_SIZE`.
    Seeds are filtered only when that area is known.
    """
    area = float(object_area) if object_area else 0.0
    if min_size is None:
        min_size = round(MIN_SIZE_FRACTION * area) if area else DEFAULT_MIN_SIZE
    return int(min_size), int(round(MIN_SEED_FRACTION * area))

def _load(model, metadata):
    from .io import default_metadata, load_model

    if isinstance(model, (str, os.PathLike)):
        model, file_meta = load_model(model)
        metadata = file_meta if metadata is None else metadata
    meta = default_metadata()
    meta.update(metadata or {})
    return model, meta


def _device_list(device) -> list:
    """All CUDA GPUs when ``auto`` picked CUDA (tiles spread over them), else the one device."""
    import torch

    if device.type == "cuda" and device.index is None:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


#: The mirror images averaged by test-time augmentation (``PredictConfig.flips``): none,
#: left-right, up-down, both (the dims of an ``(N, C, Y, X)`` tensor).
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def _make_predictor(runner, device, precision: str, fg_pair: bool, flips: bool = False):
    import torch

    from .device import autocast

    # channels-last feeds torch's kernels; another runner (OpenVINO) takes the tensor as it is
    cpu_or_cuda = device.type in ("cpu", "cuda") and isinstance(runner, torch.nn.Module)

    def probabilities(x):
        if cpu_or_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(precision, device):
            logits = runner(x)
        return torch.softmax(logits.float(), dim=1)

    def predictor(x):
        x = x.to(device, non_blocking=True)
        with torch.inference_mode():
            p = probabilities(x)
            if flips:  # a mirrored tile mirrors its output window (valid models crop symmetrically)
                for dims in TTA_FLIPS[1:]:
                    p += torch.flip(probabilities(torch.flip(x, dims)), dims)
                p /= len(TTA_FLIPS)
            if fg_pair:  # instance labels only need interior and interior + boundary
                from .postprocess import BOUNDARY, INTERIOR

                p = torch.stack([p[:, INTERIOR], p[:, INTERIOR] + p[:, BOUNDARY]], dim=1)
            return p.cpu()

    return predictor


def _replica(model, device):
    """An inference copy of ``model`` on ``device``: eval mode, batch norm folded into the
    convolutions, channels-last (CPU/CUDA). The caller's model is left untouched."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    r = copy.deepcopy(model).eval()
    # Folding eval-mode batch norm into the preceding conv removes a full pass over every
    # feature map (a large share of the CPU time in channels-last).
    for m in r.modules():
        if isinstance(m, torch.nn.Sequential):
            for i in range(len(m) - 1):
                if isinstance(m[i], torch.nn.Conv2d) and isinstance(m[i + 1], torch.nn.BatchNorm2d):
                    m[i] = fuse_conv_bn_eval(m[i], m[i + 1])
                    m[i + 1] = torch.nn.Identity()
    r = r.to(device)
    if device.type in ("cpu", "cuda"):
        r = r.to(memory_format=torch.channels_last)
    for p in r.parameters():
        p.requires_grad_(False)
    return r


def predict(model, image: np.ndarray, config: PredictConfig | None = None, metadata: dict[str, Any] | None = None,
            *, planes: Iterable[int | tuple[int, ...]] | None = None,
            ) -> Generator[PredictProgress, None, Prediction]:
    """Segment ``image`` with ``model``: a generator of :class:`PredictProgress`, returning a :class:`Prediction`.

    Parameters
    ----------
    model : napari_unet.model.UNet or path-like
        The network (left unchanged: a copy runs on the device), or a model file.
    image : numpy.ndarray
        ``(Y, X)``, ``(Y, X, C)`` / ``(C, Y, X)`` with channels, or a stack ``(..., Y, X)``
        (with channels anywhere given by ``config.channel_axis``); uint8, uint16 or float
        (NaN/Inf allowed: normalisation sets them to 0).
    config : PredictConfig, optional
        Output kind, tile size, overlap, batch, blending, device, precision, channel axis,
        minimum object size (defaults: ``PredictConfig()``).
    metadata : dict, optional
        The model file's metadata (``normalization``, ``mode``, ``class_names``); from the
        file when ``model`` is a path, else :func:`napari_unet.io.default_metadata`.
    planes : iterable, optional
        Restrict a stack to these planes: flat indices over the leading axes (in C order)
        or index tuples. Other planes get label 0 (and probability 0). Planes are always
        segmented in 2D, even those of a volume (a quick look at one plane).

    Volumes: with a ``Z`` in ``config.axes`` (e.g. ``"ZYX"``, ``"TZYX"``), each volume is
    segmented as one 3D object set (``config.volume``): the network's probabilities of its
    YX planes (and, for ``"orthogonal"``, of its ZX and ZY planes once resampled to cubic
    voxels with ``config.voxel_size``, averaged with them) kept in float16, smoothed in 3D
    (``config.volume_smoothing``), then seeds, watershed, size filter and hole filling in 3D,
    in bands of rows so that memory stays bounded (:func:`napari_unet.postprocess.instance_labels`);
    ids run on across volumes (frames of a time series), so no object spans two frames.

    Yields
    ------
    PredictProgress
        After every batch of tiles (and once at the start of each plane).

    Returns
    -------
    Prediction

    Raises
    ------
    ValueError
        Image channels not matching the model, unknown output mode, an instance output for
        a model without the 3 instance classes, a bad plane index.
    MemoryError
        Out of memory even with the smallest tile.
    """
    job = _PredictJob(model, image, config or PredictConfig(), metadata, planes)
    if job.volumes is None:
        for k, idx in enumerate(job.selected):
            acc = yield from job.plane_probabilities(k, idx)
            if k == len(job.selected) - 1:
                job.release_network()  # no tile left: its buffers go before the last post-processing
            job.store(idx, acc)
            del acc  # before the next plane's: planes can be large
    else:
        for kv, vidx in enumerate(job.volumes):
            yield from job.volume(kv, vidx)
    yield job.progress(job.done, max(job.n_planes - 1, 0), "done")
    return job.prediction()


def _selected_planes(lead: tuple[int, ...], planes) -> list[tuple[int, ...]]:
    """``planes`` (flat indices or index tuples over the leading axes ``lead``) as index tuples; all by default."""
    all_planes = list(np.ndindex(*lead))
    if planes is None:
        return all_planes
    selected = []
    for p in planes:
        idx = tuple(int(i) for i in p) if isinstance(p, (tuple, list)) else None
        if idx is None:
            k = int(p)
            if not 0 <= k < len(all_planes):
                raise ValueError(f"plane {k} is out of range: the image has {len(all_planes)} planes")
            idx = all_planes[k]
        elif len(idx) != len(lead) or not all(0 <= i < s for i, s in zip(idx, lead)):
            raise ValueError(f"plane {idx} is not an index into the leading axes {lead}")
        selected.append(idx)
    return selected


class _PredictJob:
    """One call of :func:`predict`: what is decided once (output, planes, devices, scale, tile and
    precision, size limits, the outputs), then per plane :meth:`plane_probabilities` (tiles, with
    out-of-memory retries) and :meth:`store` (labels, probabilities)."""

    def __init__(self, model, image, config: PredictConfig, metadata, planes):
        from .data import scaled_shape
        from .device import resolve_device, select_precision
        from .postprocess import StackLabels, label_dtype, volume_size_limits

        self.config = config
        model, meta = _load(model, metadata)
        self.model, self.meta = model, meta
        mcfg = model.config
        output = self.output = config.output or meta.get("mode") or "semantic"
        if output not in ("instances", "semantic"):
            raise ValueError(f"unknown output mode {output!r}; use 'instances' or 'semantic'")
        if output == "instances" and mcfg.n_classes != 3:
            raise ValueError(f"instance output needs a model with 3 classes (background, interior, boundary); "
                             f"this one has {mcfg.n_classes}; use semantic output")
        self.prep = prepare_image(image, mcfg.in_channels, config.channel_axis)
        lead = self.prep.lead_shape
        self.selected = _selected_planes(lead, planes)
        self.n_planes = len(self.selected)
        if config.axes is not None and len(config.axes) != len(lead) + 2:
            raise ValueError(f"axes {config.axes!r} do not match the image: it has {len(lead) + 2} axes besides its "
                             f"channels ({(*lead, *self.prep.plane_shape)})")
        # Volumes: the Z axis among the leading axes, and the index tuples of the others.
        self.z = config.axes.index("Z") if config.axes and "Z" in config.axes else None
        self.volumes = None
        if self.z is not None and planes is None:
            self.volumes = list(np.ndindex(*(n for i, n in enumerate(lead) if i != self.z)))
        vs = config.voxel_size or (1.0, 1.0, 1.0)
        self.anisotropy = float(vs[0]) / (0.5 * (float(vs[1]) + float(vs[2])))

        device = resolve_device(config.device)
        self.devices = _device_list(device)
        replicas = [_replica(model, d) for d in self.devices]
        self.dev_name = ", ".join(str(d) for d in self.devices)
        self.margin = model.margin()
        self.valid = mcfg.padding == "valid"
        self.multiple = 2 ** (mcfg.depth - 1)
        self.blending = "constant" if self.valid else config.blending

        # Each plane is resized by `scale` before the network and its probabilities back: the
        # cells then have the size the model was trained on; the size limits are in image pixels.
        scale = self.scale = float(config.scale if config.scale is not None else (meta.get("scale") or 1.0))
        self.plane_shape = self.prep.plane_shape
        self.net_shape = scaled_shape(self.plane_shape, scale) if scale != 1.0 else self.plane_shape
        # The precision is chosen at the tile shape the job will run (an fp32-sized tile), then
        # the tile is sized for that precision.
        tile, batch = choose_tile(replicas[0], self.devices[0], "fp32", config.tile_size, config.batch_size)
        job_shape = (1, mcfg.in_channels, *self.plane_tile(tile))
        self.precision = select_precision(config.precision, self.devices[0], replicas[0], shape=job_shape)
        if self.precision != "fp32":
            tile, batch = choose_tile(replicas[0], self.devices[0], self.precision, config.tile_size,
                                      config.batch_size)
        self.tile, self.batch = tile, batch
        # Unset thresholds: a volume's (any method, and any of its planes alone) are the
        # volume defaults, what volumes were measured with; a plane's are left to instance_labels.
        from .postprocess import VOLUME_FOREGROUND_THRESHOLD, VOLUME_SEED_THRESHOLD

        volume = self.z is not None
        self.seed_threshold = config.seed_threshold if config.seed_threshold is not None else (
            VOLUME_SEED_THRESHOLD if volume else None)
        self.foreground_threshold = config.foreground_threshold if config.foreground_threshold is not None else (
            VOLUME_FOREGROUND_THRESHOLD if volume else None)
        area = meta.get("object_area")
        self.min_size, self.min_seed_size = instance_size_limits(config.min_size, area / scale ** 2 if area else None)
        self.min_volume, self.min_seed_volume = volume_size_limits(self.min_size, self.min_seed_size,
                                                                   self.anisotropy)
        self.want_probs = bool(config.probabilities)
        self.n_out = mcfg.n_classes if (self.want_probs or output == "semantic") else 2
        fg_pair = output == "instances" and not self.want_probs
        self.probs = (np.zeros((mcfg.n_classes, *lead, *self.plane_shape), np.float32) if self.want_probs
                      else None)
        if output == "instances":
            self.stack, self.sem = StackLabels((*lead, *self.plane_shape)), None
        else:
            self.stack = None
            self.sem = np.zeros((*lead, *self.plane_shape), label_dtype(mcfg.n_classes - 1, "semantic"))
        self.done = 0
        self.total = self.n_tiles(tile) * self.n_planes
        if self.volumes is not None and config.volume == "orthogonal":
            n_z = self._iso_depth(lead[self.z])
            h, w = self.plane_shape
            side = h * self.n_tiles(tile, self._net((n_z, w))) + w * self.n_tiles(tile, self._net((n_z, h)))
            self.total += side * len(self.volumes)
            self.n_planes += (h + w) * len(self.volumes)
        self.k = 0  # 2D planes done (YX planes, then the side views' planes)
        self.backend = "torch"
        if config.backend != "torch" and len(self.devices) == 1:
            from .openvino_backend import openvino_runner, select_backend

            shape = (self.batch, mcfg.in_channels, *self.plane_tile(tile))
            n_batches = -(-self.total // max(self.batch, 1))  # every tile of the job, side views included
            self.backend = select_backend(config.backend, self.devices[0], replicas[0], shape, self.precision,
                                          _make_predictor(replicas[0], self.devices[0], self.precision, False),
                                          n_batches=n_batches)
            if self.backend == "openvino":
                replicas = [openvino_runner(replicas[0], mcfg.in_channels, self.precision)]
        self.predictors = [_make_predictor(r, d, self.precision, fg_pair, config.flips)
                           for r, d in zip(replicas, self.devices)]

    def release_network(self) -> None:
        """Drop the network replicas (and OpenVINO's compiled network with its buffers, a few
        hundred MB for a large network) once no tile is left, so that the post-processing of
        the last plane does not hold them too: for one huge image that sets the peak memory."""
        self.predictors = []

    def _net(self, shape: tuple[int, int]) -> tuple[int, int]:
        """A plane's shape as the network sees it (resized by the model's scale)."""
        from .data import scaled_shape

        return scaled_shape(shape, self.scale) if self.scale != 1.0 else tuple(shape)

    def _iso_depth(self, n_z: int) -> int:
        """Planes of a volume of ``n_z`` planes once resampled to cubic voxels."""
        return max(1, int(round(n_z * self.anisotropy)))

    # ---- tiles ------------------------------------------------------------------------------

    def overlap(self, tile: int) -> int:
        """Tile overlap: none for valid models (their outputs tile the image exactly)."""
        if self.valid:
            return 0
        return max(min(int(self.config.overlap), tile - 2 * self.margin - self.multiple), 0)

    def plane_tile(self, tile: int, net_shape: tuple[int, int] | None = None) -> tuple[int, int]:
        return _plane_tile(self.model, tile, net_shape or self.net_shape, self.overlap(tile), self.multiple)

    def n_tiles(self, tile: int, net_shape: tuple[int, int] | None = None) -> int:
        net_shape = net_shape or self.net_shape
        pt = self.plane_tile(tile, net_shape)
        oh, ow = pt[0] - 2 * self.margin, pt[1] - 2 * self.margin
        return len(_positions(net_shape[0], oh, self.overlap(tile), self.multiple)) * len(
            _positions(net_shape[1], ow, self.overlap(tile), self.multiple))

    def progress(self, done: int, k: int, message: str) -> PredictProgress:
        return PredictProgress(done, self.total, k, self.n_planes, self.dev_name, self.precision, message, self.backend)

    # ---- one plane --------------------------------------------------------------------------

    def plane_probabilities(self, k: int, idx: tuple[int, ...]) -> Generator[PredictProgress, None, np.ndarray]:
        """The network's output over plane ``idx`` (the ``k``-th selected), at the image's pixels; a
        generator of progress. Out of memory: retried with half the batch, then smaller tiles."""
        from .data import apply_normalization, normalization_params_like

        label = f"plane {k + 1}/{self.n_planes}" if self.n_planes > 1 else "segmenting"
        yield self.progress(self.done, k, label)
        raw = self.prep.raw_plane(idx)
        params = normalization_params_like(raw, self.meta.get("normalization"), channel_axis=0)
        # Accumulated in place in the returned probabilities, unless they are resized afterwards.
        direct = self.direct = self.want_probs and self.net_shape == self.plane_shape and self.volumes is None
        out = self.probs[(slice(None), *idx)] if direct else None
        if self.net_shape != self.plane_shape:  # resized whole first: normalised whole
            return (yield from self.array_probabilities(apply_normalization(raw, params, 0), k, label, out))
        # Normalised tile by tile: no float32 copy of the whole plane (1 GB for a 16k x 16k image).
        return (yield from self.array_probabilities(raw, k, label, out,
                                                    transform=lambda t: apply_normalization(t, params, 1)))

    def array_probabilities(self, x: np.ndarray, k: int, label: str, out: np.ndarray | None = None,
                            transform: Callable[[np.ndarray], np.ndarray] | None = None,
                            ) -> Generator[PredictProgress, None, np.ndarray]:
        """The network's output ``(n_out, H, W)`` over a normalised plane ``x`` ``(C, H, W)`` (a YX plane,
        or a side view of a volume), resized by the model's scale and back; out-of-memory retries.
        With ``transform``, ``x`` is the raw plane and each batch of tiles is normalised by it."""
        from .data import resize_plane

        shape = tuple(x.shape[-2:])
        net_shape = self._net(shape)
        if net_shape != shape:
            if transform is not None:
                x, transform = transform(x[None])[0], None
            x = resize_plane(x, net_shape, channel_axis=0)
            out = None
        while True:
            gen = tiled_predict_iter(self.predictors, x, self.plane_tile(self.tile, net_shape), self.overlap(self.tile),
                                     self.batch, self.blending, self.margin, self.n_out, multiple=self.multiple,
                                     out=out, transform=transform)
            tiles = [0]  # of this plane, done

            def report(ev, tiles=tiles):
                tiles[0] = ev[0]
                return self.progress(self.done + ev[0], k, f"{label}, tile {ev[0]}" if self.n_planes > 1
                                     else f"tile {ev[0]}")

            try:
                acc = yield from relay(gen, report)
                break
            except Exception as e:  # noqa: BLE001 - only out-of-memory errors are retried
                if not is_out_of_memory(e):
                    raise
                message = self._smaller_job(k)
            finally:
                gen.close()
            yield self.progress(self.done, k, message)
        self.done += tiles[0]
        del x
        if net_shape != shape:  # back to the image's pixels (linear: probabilities stay in [0, 1])
            acc = resize_plane(acc, shape, channel_axis=0)
        return acc

    # ---- volumes ----------------------------------------------------------------------------

    def _volume_index(self, vidx: tuple[int, ...], z) -> tuple:
        return (*vidx[:self.z], z, *vidx[self.z:])

    def volume(self, kv: int, vidx: tuple[int, ...]) -> Generator[PredictProgress, None, None]:
        """Segment volume ``vidx`` (the index over the leading axes other than Z) in 3D."""
        n_z = self.prep.lead_shape[self.z]
        slab = self._volume_index(vidx, slice(None))
        if self.config.volume == "stitch":
            base = self.stack.offset if self.stack is not None else 0
            for z in range(n_z):
                acc = yield from self.plane_probabilities(self.k, self._volume_index(vidx, z))
                self.k += 1
                self.store(self._volume_index(vidx, z), acc)
            if self.stack is not None:
                from .postprocess import stitch_planes

                linked = stitch_planes(self.stack.labels[slab])
                self.stack.offset = base
                self.stack.put(slab, linked)
            return
        maps = None
        for z in range(n_z):
            acc = yield from self.plane_probabilities(self.k, self._volume_index(vidx, z))
            self.k += 1
            if maps is None:  # float16: the probabilities of a whole volume, at half the memory
                maps = np.empty((acc.shape[0], n_z, *self.plane_shape), np.float16)
            maps[:, z] = acc
            del acc
        if self.config.volume == "orthogonal":
            yield from self._side_views(vidx, maps)
        if vidx == self.volumes[-1]:
            self.release_network()  # no tile left: its buffers go before the 3D post-processing
        sigma = float(self.config.volume_smoothing)
        if sigma > 0:  # one map at a time, in float32 (scipy), back into the float16 maps
            from scipy import ndimage as ndi

            for c in range(maps.shape[0]):
                yield self.progress(self.done, self.k, "smoothing the volume's probabilities")
                maps[c] = ndi.gaussian_filter(maps[c].astype(np.float32), (sigma / self.anisotropy, sigma, sigma))
        yield from self._store_volume(slab, maps)

    def _side_views(self, vidx: tuple[int, ...], maps: np.ndarray) -> Generator[PredictProgress, None, None]:
        """Add the ZX and ZY planes' probabilities to ``maps`` (the YX planes'), then average the three.

        The volume is normalised plane by plane as the YX planes were, resampled along Z to
        cubic voxels (linear, scipy), cut into ZX and ZY planes for the network, and each
        plane's output resampled back to the volume's Z step.
        """
        from scipy import ndimage as ndi

        from .data import normalize_like

        n_z, h, w = maps.shape[1:]
        vol = np.empty((self.model.config.in_channels, n_z, h, w), np.float32)
        for z in range(n_z):
            vol[:, z] = normalize_like(self.prep.plane(self._volume_index(vidx, z)), self.meta.get("normalization"),
                                       channel_axis=0)
        n_iso = self._iso_depth(n_z)
        if n_iso != n_z:
            vol = ndi.zoom(vol, (1, n_iso / n_z, 1, 1), order=1, grid_mode=True, mode="nearest")

        def back(acc):
            if n_iso == n_z:
                return acc
            return ndi.zoom(acc, (1, n_z / n_iso, 1), order=1, grid_mode=True, mode="nearest")

        for y in range(h):
            acc = yield from self.array_probabilities(np.ascontiguousarray(vol[:, :, y, :]), self.k,
                                                      f"side view ZX {y + 1}/{h}")
            self.k += 1
            maps[:, :, y, :] += back(acc)
        for x in range(w):
            acc = yield from self.array_probabilities(np.ascontiguousarray(vol[:, :, :, x]), self.k,
                                                      f"side view ZY {x + 1}/{w}")
            self.k += 1
            maps[:, :, :, x] += back(acc)
        del vol
        maps *= np.float16(1.0 / 3.0)

    def _interior_foreground(self, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Interior and foreground (interior + boundary) maps from the network's output over a plane or volume:
        all classes when probabilities are asked for, else the (interior, foreground) pair the predictor made."""
        from .postprocess import BOUNDARY, INTERIOR

        if self.want_probs:
            return maps[INTERIOR], maps[INTERIOR] + maps[BOUNDARY]
        return maps[0], maps[1]

    def _store_volume(self, slab: tuple, maps: np.ndarray) -> Generator[PredictProgress, None, None]:
        """A volume's probabilities ``(n_out, Z, Y, X)`` into the outputs: 3D instances (a progress
        event after every band of the watershed and hole filling), or classes."""
        from .postprocess import iter_instance_labels

        if self.want_probs:
            self.probs[(slice(None), *slab)] = maps
        if self.output == "instances":
            interior, fg = self._interior_foreground(maps)
            yield self.progress(self.done, self.k, "3D seeds and watershed")
            steps = iter_instance_labels(interior, fg, threshold=self.seed_threshold,
                                         foreground_threshold=self.foreground_threshold, min_size=self.min_volume,
                                         min_seed_size=self.min_seed_volume)
            labels = yield from relay(steps, lambda step: self.progress(self.done, self.k, f"3D {step}"))
            self.stack.put(slab, labels)
        else:
            dst = self.sem[slab]
            for z in range(dst.shape[0]):
                dst[z] = maps[:, z].argmax(axis=0)

    def _smaller_job(self, k: int) -> str:
        """After an out-of-memory error on plane ``k``: half the batch, else half the tile; what changed."""
        import torch

        if self.devices[0].type == "cuda":
            torch.cuda.empty_cache()
        if self.batch > 1:
            self.batch //= 2
            return f"out of memory: retrying with {self.batch} tile(s) per batch"
        smaller = _valid_down(self.model, self.tile // 2)
        if smaller >= self.tile:
            raise MemoryError(f"out of memory even with {self.tile}x{self.tile} tiles, one per batch") from None
        self.tile = smaller
        self.total = self.done + self.n_tiles(self.tile) * (self.n_planes - k)
        return f"out of memory: retrying with {self.tile}x{self.tile} tiles"

    def store(self, idx: tuple[int, ...], acc: np.ndarray) -> None:
        """Plane ``idx``'s probabilities into the outputs: labels (and the probabilities asked for)."""
        from .postprocess import instance_labels

        if self.want_probs and not self.direct:  # not written in place by the tiles
            self.probs[(slice(None), *idx)] = acc
        if self.output == "instances":
            interior, fg = self._interior_foreground(acc)
            self.stack.put(idx, instance_labels(interior, fg, threshold=self.seed_threshold,
                                                foreground_threshold=self.foreground_threshold,
                                                min_size=self.min_size, min_seed_size=self.min_seed_size))
        else:
            dst = self.sem[idx]
            for r0 in range(0, dst.shape[0], 256):  # in bands: argmax makes int64 temporaries
                dst[r0:r0 + 256] = acc[:, r0:r0 + 256].argmax(axis=0)

    def prediction(self) -> Prediction:
        labels = self.stack.labels if self.output == "instances" else self.sem
        return Prediction(labels=labels, probabilities=self.probs, device=self.dev_name, precision=self.precision,
                          tile_size=self.tile, output=self.output, backend=self.backend)


def predict_all(model, image: np.ndarray, config: PredictConfig | None = None,
                metadata: dict[str, Any] | None = None, **kwargs) -> Prediction:
    """Run :func:`predict` to the end and return its :class:`Prediction` (scripts, notebooks)."""
    from .jobs import drain

    return drain(predict(model, image, config, metadata, **kwargs))
