"""The U-Net of Ronneberger, Fischer and Brox (MICCAI 2015), and its padded variant.

The figure of the paper, read left to right::

    input -> DoubleConv -> Down -> Down -> Down -> Down (bottom)
                 |           |      |      |            |
    logits <- 1x1 conv <-  Up  <-  Up  <-  Up  <-  Up <--+

* ``padding="valid"`` is the paper: unpadded 3x3 convolutions, so every conv loses one
  pixel at each border, and the skip connections are centre-cropped before they are
  concatenated. With ``in_channels=1, n_classes=2, depth=5, base_filters=64`` this maps a
  572x572 tile to 388x388 with 23 convolutional layers and 31,030,658 parameters.
* ``padding="same"`` pads every 3x3 conv by one pixel, so the output has the size of the
  input (for sizes divisible by ``2 ** (depth - 1)``); ``batch_norm=True`` adds batch
  normalisation after each conv, as the padded implementations in the seeds do.

Tensor shapes are ``(N, C, H, W)`` throughout. The network returns logits; apply a softmax
over dimension 1 for per-pixel class probabilities.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

try:
    from .config import ModelConfig
except ImportError:
    # This file alone, without its package: bioimage.io model packages ship it as the
    # architecture's source (napari_unet.bioimageio), and their runners load it as a lone
    # module. The arguments are then kept unvalidated, as attributes.
    from types import SimpleNamespace as ModelConfig  # type: ignore[assignment]

__all__ = ["UNet", "SoftmaxUNet", "DoubleConv", "Down", "Up", "InvalidInputSizeError"]


class InvalidInputSizeError(ValueError):
    """An input tile whose size the U-Net cannot take (message names the nearest valid sizes)."""


class DoubleConv(nn.Sequential):
    """(conv 3x3 => [BN] => ReLU) x 2.

    Shapes: ``(N, in_ch, H, W) -> (N, out_ch, H - 4, W - 4)`` with ``padding="valid"``,
    ``(N, out_ch, H, W)`` with ``padding="same"``.
    """

    def __init__(self, in_ch: int, out_ch: int, padding: str = "valid", batch_norm: bool = False):
        pad = 1 if padding == "same" else 0
        layers: list[nn.Module] = []
        for c_in in (in_ch, out_ch):
            # A conv followed by batch norm needs no bias: BN's shift replaces it.
            layers.append(nn.Conv2d(c_in, out_ch, kernel_size=3, padding=pad, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Down(nn.Sequential):
    """2x2 max-pool (stride 2) => DoubleConv: one step down the contracting path.

    Shapes: ``(N, in_ch, H, W) -> (N, out_ch, H/2 - 4, W/2 - 4)`` (valid) or
    ``(N, out_ch, H/2, W/2)`` (same). ``H`` and ``W`` must be even.
    """

    def __init__(self, in_ch: int, out_ch: int, padding: str = "valid", batch_norm: bool = False,
                 dropout: float = 0.0):
        layers: list[nn.Module] = [nn.MaxPool2d(2), DoubleConv(in_ch, out_ch, padding, batch_norm)]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class Up(nn.Module):
    """Up-convolution halving the channels => concat with the (cropped) skip => DoubleConv.

    ``up_mode="transpose"`` is the paper's 2x2 "up-convolution" (a transposed conv, stride
    2); ``"bilinear"`` upsamples bilinearly and then halves the channels with a 1x1 conv.

    Shapes: ``x (N, in_ch, h, w)`` and ``skip (N, in_ch/2, H, W)`` with ``H >= 2h`` ->
    ``(N, out_ch, 2h - 4, 2w - 4)`` (valid) or ``(N, out_ch, 2h, 2w)`` (same).
    """

    def __init__(self, in_ch: int, out_ch: int, padding: str = "valid", batch_norm: bool = False,
                 up_mode: str = "transpose"):
        super().__init__()
        if up_mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_ch, in_ch // 2, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_ch, in_ch // 2, kernel_size=1),
            )
        self.conv = DoubleConv(in_ch, out_ch, padding, batch_norm)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)
        skip = center_crop(skip, x.shape[-2:])
        return self.conv(torch.cat([skip, x], dim=1))


def center_crop(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Crop the last two dimensions of ``x`` to ``size`` around the centre (the paper's "copy and crop")."""
    h, w = x.shape[-2:]
    th, tw = size[0], size[1]
    if torch.jit.is_tracing():
        # Traced (TorchScript export): sizes are traced values, so the slice follows the
        # input size instead of freezing the one seen while tracing.
        top, left = (h - th) // 2, (w - tw) // 2
        return x[..., top:top + th, left:left + tw]
    th, tw = int(th), int(tw)
    if (h, w) == (th, tw):
        return x
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top:top + th, left:left + tw]


class UNet(nn.Module):
    """U-Net for per-pixel classification of 2D images.

    Parameters
    ----------
    in_channels : int
        Channels of the input image (1 for grey, 3 for RGB, ...).
    n_classes : int
        Classes of the output; the network returns one logit map per class.
    depth : int
        Levels of the U including the bottom one (the paper: 5, i.e. four 2x2 max-pools).
    base_filters : int
        Feature channels of the first level (the paper: 64); doubled at every level down.
    padding : {"valid", "same"}
        ``"valid"``: the paper's unpadded convs, the output is smaller than the input by
        :meth:`margin` pixels at each border (use overlap-tile prediction).
        ``"same"``: padded convs, output size equals input size.
    batch_norm : bool
        Batch normalisation after every 3x3 conv (not in the paper).
    up_mode : {"transpose", "bilinear"}
        The paper's 2x2 transposed "up-convolution", or bilinear upsampling + 1x1 conv.
    dropout : float
        Dropout probability at the end of the contracting path (the paper uses drop-out
        layers there as implicit augmentation); 0 disables it.

    Notes
    -----
    Weights are initialised as the paper prescribes: Gaussian with standard deviation
    ``sqrt(2 / N)``, ``N`` the number of incoming nodes of one neuron (He et al. 2015).
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 2, depth: int = 5, base_filters: int = 64,
                 padding: Literal["valid", "same"] = "valid", batch_norm: bool = False,
                 up_mode: Literal["transpose", "bilinear"] = "transpose", dropout: float = 0.0):
        super().__init__()
        # The config validates every argument and is what a model file stores to rebuild us.
        self.config = ModelConfig(in_channels=in_channels, n_classes=n_classes, depth=depth,
                                  base_filters=base_filters, padding=padding, batch_norm=batch_norm,
                                  up_mode=up_mode, dropout=dropout)
        widths = [base_filters * 2**i for i in range(depth)]
        self.inc = DoubleConv(in_channels, widths[0], padding, batch_norm)
        self.downs = nn.ModuleList(
            Down(widths[i - 1], widths[i], padding, batch_norm, dropout if i >= depth - 2 else 0.0)
            for i in range(1, depth)
        )
        self.ups = nn.ModuleList(
            Up(widths[i], widths[i - 1], padding, batch_norm, up_mode) for i in reversed(range(1, depth))
        )
        self.outc = nn.Conv2d(widths[0], n_classes, kernel_size=1)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: ModelConfig) -> UNet:
        """Build an untrained network from a :class:`~napari_unet.config.ModelConfig`."""
        return cls(**config.to_dict())

    def reset_parameters(self) -> None:
        """He-normal weights (std ``sqrt(2 / fan_in)``), zero biases, unit batch-norm scales.

        Nothing is drawn for a network built on the meta device (the skeleton a model file's
        tensors are assigned to): random draws there go through torch's compiler stack
        (importing ``torch._dynamo``, a second of start-up) for values nobody keeps.
        """
        if any(p.is_meta for p in self.parameters()):
            return
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                # A 2x2 stride-2 transposed conv feeds each output pixel from exactly one
                # kernel tap per input channel: N = in_channels (torch's fan_in would use
                # the output channels for transposed weights, hence the explicit std).
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.in_channels))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_channels, H, W)`` -> logits ``(N, n_classes, H', W')``, ``H' = output_size(H)``."""
        if not torch.jit.is_tracing():
            self.check_input_shape(x.shape[-2:])
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)

    # ---- sizes for the overlap-tile strategy ---------------------------------------------

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def padding(self) -> str:
        return self.config.padding

    @property
    def size_multiple(self) -> int:
        """Valid sizes of a ``padding="same"`` net are multiples of this (``2 ** (depth - 1)``)."""
        return 2 ** (self.depth - 1)

    def output_size(self, size: int) -> int | None:
        """Output size along one axis for an input of ``size`` pixels, or ``None`` if invalid.

        Invalid means a 2x2 max-pool would see an odd size, or the size shrinks to nothing.
        """
        if self.padding == "same":
            return size if size > 0 and size % self.size_multiple == 0 else None
        s = size
        for level in range(self.depth):
            s -= 4  # two unpadded 3x3 convs
            if s <= 0:
                return None
            if level < self.depth - 1:
                if s % 2:
                    return None
                s //= 2
        for _ in range(self.depth - 1):
            s = 2 * s - 4  # up-convolution, then two unpadded 3x3 convs
            if s <= 0:
                return None
        return s

    def is_valid_size(self, size: int) -> bool:
        return self.output_size(size) is not None

    def margin(self) -> int:
        """Pixels lost at each border (0 for ``"same"``; 92 for the paper's network).

        The margin is the same for every valid size: input - output = 2 * margin.
        """
        s = self.valid_input_size(1)
        return (s - self.output_size(s)) // 2

    def valid_input_size(self, size: int, direction: Literal["up", "down"] = "up") -> int:
        """The nearest valid input size ``>= size`` (``"up"``) or ``<= size`` (``"down"``).

        Raises ``InvalidInputSizeError`` when going down finds no valid size.
        """
        step = 1 if direction == "up" else -1
        s = max(int(size), 1)
        while not self.is_valid_size(s):
            s += step
            if s < 1:
                raise InvalidInputSizeError(
                    f"no valid input size <= {size} for this U-Net; the smallest is {self.valid_input_size(1)}")
        return s

    def valid_input_sizes(self, lo: int, hi: int) -> list[int]:
        """All valid input sizes in ``[lo, hi]`` (for ``"valid"``: every ``2 ** (depth - 1)`` pixels)."""
        return [s for s in range(max(lo, 1), hi + 1) if self.is_valid_size(s)]

    def output_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Output ``(H', W')`` for an input ``(H, W)``; raises ``InvalidInputSizeError`` if invalid."""
        self.check_input_shape(shape)
        return tuple(self.output_size(int(s)) for s in shape)  # type: ignore[return-value]

    def check_input_shape(self, shape) -> None:
        """Raise ``InvalidInputSizeError`` naming the nearest valid sizes if ``shape`` is not valid."""
        for axis, s in zip(("height", "width"), shape):
            s = int(s)
            if self.is_valid_size(s):
                continue
            smallest = self.valid_input_size(1)
            up = self.valid_input_size(s, "up")
            if s < smallest:
                hint = f"the smallest valid size is {smallest}"
            else:
                hint = f"the nearest valid sizes are {self.valid_input_size(s, 'down')} and {up}"
            kind = (f"a multiple of {self.size_multiple}" if self.padding == "same"
                    else "a size at which every 2x2 max-pool sees an even size")
            raise InvalidInputSizeError(
                f"input {axis} {s} is not valid for this U-Net (padding={self.padding!r}, depth={self.depth}): "
                f"it needs {kind}; {hint}.")

    def n_conv_layers(self) -> int:
        """Convolutional layers, up-convolutions included (23 for the paper's network)."""
        return sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in self.modules())

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class SoftmaxUNet(UNet):
    """:class:`UNet` returning class probabilities (softmax over the classes) instead of logits.

    The same parameters and state dict as :class:`UNet`; it is the architecture of the
    bioimage.io model packages :mod:`napari_unet.bioimageio` writes, whose output is the
    probabilities the post-processing starts from.
    """

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(super().forward(x), dim=1)
