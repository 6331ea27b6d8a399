"""EfficientNetV2 image classification with Hugging Face Hub integration."""
from importlib.metadata import PackageNotFoundError, version

from .configs import VARIANTS
from .model import EfficientNetV2
from .transforms import transforms_for

__all__ = ["EfficientNetV2", "VARIANTS", "transforms_for"]
try:
    __version__ = version("effnetv2")  # pyproject.toml's version, once installed (pip install -e .)
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
