"""ESICA: efficient text-guided 3-D segmentation (similarity-matrix masks, decomposed decoder, two passes)."""

from .config import ESICAConfig
from .decoder import ImageContext
from .model import ESICA

__all__ = ["ESICA", "ESICAConfig", "ImageContext"]
