"""The napari dock widgets (npe2 contributions, see ``napari.yaml``).

One small module per widget; torch is imported only when work starts (in the worker).
"""

from .export import ExportWidget
from .segment import SegmentWidget
from .train import TrainWidget

__all__ = ["TrainWidget", "SegmentWidget", "ExportWidget"]
