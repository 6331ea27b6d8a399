"""EfficientNetV2 image classification with Hugging Face Hub integration."""
from .configs import VARIANTS
from .model import EfficientNetV2
from .transforms import transforms_for

__all__ = ["EfficientNetV2", "VARIANTS", "transforms_for"]
__version__ = "0.1.0"
