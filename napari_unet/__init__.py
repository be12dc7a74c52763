"""napari-unet: paint a few cells, train a U-Net, segment images and stacks in napari.

The core (model, data, training, inference, post-processing, files) is plain Python with
no Qt or napari import; the napari widgets live in ``napari_unet._widgets``.
"""

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("napari-unet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
