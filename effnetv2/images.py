"""Opening user images safely: any file format and colour mode in, an RGB ``PIL.Image`` out.

Memory follows the pixel count, not the bit depth: 16-bit, 32-bit and float images are brought to 8 bits
a strip of rows at a time, so :func:`open_image` holds at most the decoded source plus its 8-bit copy,
then that copy plus the RGB result (PIL keeps RGB at 4 bytes a pixel): about 5 bytes a pixel for a
16-bit PNG (``benchmarks/memory.py`` measures it).
"""
from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Larger than any photo a phone takes (~200 MP). This is the limit: PIL's own guard (Image.MAX_IMAGE_PIXELS,
# which refuses above 179 MP by default and only warns above 89 MP) is off, process-wide, while we decode.
MAX_IMAGE_PIXELS = 200_000_000
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
BYTES_PER_PIXEL = 4  # the most PIL keeps a decoded pixel in, any mode (RGB is stored as RGBX)
_STRIP_PIXELS = 1 << 20  # converted a strip of rows at a time: the float temporaries stay a few MB

try:  # glibc's; elsewhere freed memory goes back to the OS without being asked
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (AttributeError, OSError, TypeError):
    _malloc_trim = None

_pil_guard_lock = threading.Lock()
_pil_guard_users = 0
_pil_guard_saved: int | None = None


# What a server (app.py, effnetv2.serve) accepts from a request: an upload over MAX_UPLOAD_BYTES is refused
# unread; a small file can still decode to a gigapixel; resizing the short side of a 1x5000 strip would
# make a huge tensor; below SMALL_SIDE the answer says little (warned, but answered).
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_REQUEST_PIXELS = 40_000_000
MAX_ASPECT = 20
SMALL_SIDE = 16


class ImageLoadError(ValueError):
    """An input could not be turned into an RGB image: ``path`` (the file, or "image" for a PIL image)
    and ``reason`` (why, in words); the message is ``"{path}: {reason}"``."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):  # picklable across worker processes despite the two-argument constructor
        return type(self), (self.path, self.reason)


@contextmanager
def _our_pixel_limit() -> Iterator[None]:
    """Turn PIL's global decompression-bomb guard off while we open and decode (our size check comes first).

    Counted, so that concurrent decodes (threads) restore the user's ``Image.MAX_IMAGE_PIXELS`` only when
    the last one ends.
    """
    global _pil_guard_users, _pil_guard_saved
    with _pil_guard_lock:
        if _pil_guard_users == 0:
            _pil_guard_saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _pil_guard_users += 1
    try:
        yield
    finally:
        with _pil_guard_lock:
            _pil_guard_users -= 1
            if _pil_guard_users == 0:
                Image.MAX_IMAGE_PIXELS = _pil_guard_saved


def _release_freed_memory() -> None:
    """Hand the memory a decode freed back to the OS.

    glibc raises its mmap threshold to the size of freed blocks, so after the first large image Pillow's
    16 MB blocks come from the decoding thread's heap and stay there when freed: threads taking turns
    (check_images, a web server's workers) would each keep an image's worth resident.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says; the same object when there is nothing to turn."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
        return ImageOps.exif_transpose(image)
    return image  # exif_transpose would return a full copy


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float image as 8-bit ``L`` by the rule of :func:`to_rgb`; other modes unchanged."""
    if image.mode not in HIGH_DEPTH_MODES:
        return image
    high = 65535 if image.mode.startswith("I;16") else image.getextrema()[1]
    offset = 0.0
    if image.mode == "F":  # 0..1, or 0..max when max > 1, to 0..255, rounded half up
        top = float(high) if high > 1 else 1.0  # also when high is NaN
        scale, offset = 255.0 / top, 0.5
    elif high > 255:  # 16-bit values (I;16, or I holding them): the high byte
        top, scale = 65535, 1 / 256
    else:  # I holding 8-bit values
        top, scale = 255, 1.0
    width, height = image.size
    out = np.empty((height, width), np.uint8)
    rows = max(1, _STRIP_PIXELS // width)
    for y in range(0, height, rows):
        strip = np.asarray(image.crop((0, y, width, min(y + rows, height))), np.float64)
        out[y:y + rows] = np.floor(np.clip(np.nan_to_num(strip, nan=0.0), 0, top) * scale + offset)
    return Image.fromarray(out)  # [H, W] uint8: mode L


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (1, L, LA, P, RGBA, CMYK, I;16, I, F, ...) → 8-bit RGB, EXIF orientation applied.

    Transparent pixels are composited over white. High bit depths keep their top 8 bits, as PIL itself
    reads 16-bit RGB PNGs: 16-bit ``I;16`` values become ``v // 256`` (65535 → 255, 32768 → 128,
    32767 → 127); ``I`` (32-bit) the same when any value is above 255, else its values clipped to 0..255,
    negatives 0 and anything above 65535 255; ``F`` (float) maps 0..1, or 0..max when its max is above 1,
    to 0..255 rounded half up (0.5 → 128), negatives and NaN 0. May return ``image`` itself when it is
    already upright RGB.
    """
    image = _eight_bit(_upright(image))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba)  # alpha-composited over white, without an RGBA copy of the result
    return image if image.mode == "RGB" else image.convert("RGB")


def image_pixels(path: str | os.PathLike) -> int:
    """Width x height of the image file at ``path`` from its header (nothing decoded); 0 when unreadable."""
    try:
        with _our_pixel_limit(), Image.open(path) as image:
            return image.width * image.height
    except (OSError, SyntaxError, ValueError):
        return 0


@contextmanager
def _errors_named(name: str) -> Iterator[None]:
    """PIL's and numpy's exceptions while reading ``name`` as one :class:`ImageLoadError` naming it."""
    try:
        yield
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(name, f"unreadable or truncated image ({err})") from None


def _load(source: str | os.PathLike | Image.Image, name: str, max_pixels: int) -> Image.Image:
    """``source`` opened, its size checked against ``max_pixels``, then every pixel decoded."""
    if not isinstance(source, Image.Image) and not Path(source).is_file():
        raise ImageLoadError(name, "no such file")
    with _our_pixel_limit():
        image = source if isinstance(source, Image.Image) else Image.open(source)
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageLoadError(name, f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageLoadError(name, f"{width}x{height} pixels is more than the {max_pixels:,} "
                                 f"allowed (possible decompression bomb); downscale it first")
        image.load()
    return image


def open_image(source: str | os.PathLike | Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load ``source`` (a path or a PIL image) fully into memory as RGB (see :func:`to_rgb`).

    Raises :class:`ImageLoadError` naming the file for missing, unreadable, truncated, empty, or oversized
    inputs: more than ``max_pixels`` pixels (a decompression bomb) is refused before decoding, whatever
    PIL's ``Image.MAX_IMAGE_PIXELS`` says.
    """
    name = "image" if isinstance(source, Image.Image) else str(source)
    with _errors_named(name):
        image = _load(source, name, max_pixels)
        image = _upright(image)  # each step drops the image before it: one full-size copy alive at a time
        image = _eight_bit(image)
        image = to_rgb(image)
    _release_freed_memory()
    return image


def verify_image(source: str | os.PathLike | Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Raise :class:`ImageLoadError` exactly where :func:`open_image` would, holding only the decoded pixels.

    Every pixel is decoded (truncation and corruption show there); the colour conversion, which depends on
    the mode alone, runs on the first row instead of the whole image.
    """
    name = "image" if isinstance(source, Image.Image) else str(source)
    with _errors_named(name):
        image = _load(source, name, max_pixels)
        to_rgb(image.crop((0, 0, image.width, 1)))
        del image
    _release_freed_memory()


def confined_file(path: str | os.PathLike, folders: Iterable[str | os.PathLike],
                  files: Iterable[str | os.PathLike] = ()) -> Path | None:
    """``path`` with every link and ``..`` resolved, when that is an existing regular file inside one of
    ``folders`` or one of ``files`` (also resolved); else ``None``.

    A server opens only what this returns: ``None`` is the same for a file elsewhere, a missing one, a
    link out, a folder or a device, so a refusal built on it says nothing about the server's files.
    """
    try:
        real = Path(os.path.realpath(path))
        allowed = (any(real.is_relative_to(os.path.realpath(folder)) for folder in folders)
                   or any(real == Path(os.path.realpath(file)) for file in files))
        return real if allowed and real.is_file() else None  # nothing outside is even looked at
    except (TypeError, ValueError, OSError):  # not a path at all, a NUL byte, a name too long
        return None


class UnusableImageError(ValueError):
    """A request's image that a server refuses; the message is for the sender as is."""


def open_request_image(source: str | os.PathLike | Image.Image, name: str) -> tuple[Image.Image, str | None]:
    """A request's image (``name``: how the sender knows it) under the serving limits → the RGB image
    and a warning (``None``, or why the answer says little). Raises :class:`UnusableImageError` with one
    sentence saying what was wrong and what to send."""
    try:
        image = open_image(source, max_pixels=MAX_REQUEST_PIXELS)
    except ImageLoadError as err:
        raise UnusableImageError(f"Could not read {name}: {err.reason}. Try a PNG, JPEG or WebP photo.") from None
    width, height = image.size
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise UnusableImageError(f"{name} is {width}x{height} pixels, more elongated than {MAX_ASPECT}:1: "
                                 f"crop it closer to a square and try again.")
    if min(width, height) < SMALL_SIDE:
        return image, (f"{name} is only {width}x{height} pixels: it is scaled up to the model's input "
                       f"size, so the answer says little.")
    return image, None
