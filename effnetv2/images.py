"""Opening user images safely: any file format and colour mode in, an RGB ``PIL.Image`` out."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Larger than any photo a phone takes (~200 MP); past it PIL's decompression-bomb guard refuses.
MAX_IMAGE_PIXELS = 200_000_000


class ImageLoadError(ValueError):
    """An input could not be turned into an RGB image; the message says which file and why."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (1, L, LA, P, RGBA, CMYK, I;16, I, F, ...) → 8-bit RGB, EXIF orientation applied.

    Transparent pixels are composited over white; 16-bit and float images are rescaled to 0..255.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F":
            top = max(float(array.max()), 1e-12) if array.max() > 1 else 1.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def open_image(source: str | os.PathLike | Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load ``source`` (a path or a PIL image) fully into memory as RGB.

    Raises :class:`ImageLoadError` naming the file for unreadable, truncated, empty, or oversized
    (decompression bomb) inputs.
    """
    name = "image" if isinstance(source, Image.Image) else str(source)
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            if not Path(source).is_file():
                raise ImageLoadError(f"{name}: no such file")
            image = Image.open(source)
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageLoadError(f"{name}: image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageLoadError(f"{name}: {width}x{height} pixels is more than the {max_pixels:,} "
                                 f"allowed (possible decompression bomb); downscale it first")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        return to_rgb(image)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(f"{name}: refused as a possible decompression bomb ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"{name}: unreadable or truncated image ({err})") from None
