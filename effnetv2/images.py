"""Opening user images safely: any documented file format and colour mode in, an RGB ``PIL.Image`` out.

High bit depths are brought to 8 bits a strip of rows at a time, so memory follows the pixel count
(``benchmarks/memory.py`` measures it).
"""
from __future__ import annotations

import ctypes
import io
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Larger than any phone's photo; PIL's own guard (Image.MAX_IMAGE_PIXELS) is off while we decode.
MAX_IMAGE_PIXELS = 200_000_000
# The documented formats, the only ones PIL may try: any other is refused unread (EPS would run Ghostscript).
DECODED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
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


# What a server (app.py, effnetv2.serve) accepts from a request: bytes, decoded pixels, elongation (resizing
# the short side of a 1x5000 strip would make a huge tensor); below SMALL_SIDE the answer is only warned.
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_REQUEST_PIXELS = 40_000_000
MAX_ASPECT = 20
SMALL_SIDE = 16
MAX_PATH_BYTES = 4096  # Linux's PATH_MAX: no longer path can be opened, so a request's longer one is refused unread


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
    """PIL's global decompression-bomb guard off while we decode (our check comes first); counted, so that the
    last of concurrent decodes restores the user's ``Image.MAX_IMAGE_PIXELS``."""
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
    """Hand the memory a decode freed back to the OS: glibc's raised mmap threshold would otherwise leave an
    image's worth resident in each decoding thread's heap."""
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
    """Any PIL mode → 8-bit RGB, EXIF orientation applied, transparency composited over white.

    High bit depths keep their top 8 bits, as PIL reads 16-bit RGB PNGs: ``I;16`` → ``v // 256``; ``I`` the
    same when a value is above 255, else clipped to 0..255; ``F`` maps 0..1 (or 0..max when max > 1) to
    0..255 rounded half up, negatives and NaN 0. May return ``image`` itself.
    """
    image = _eight_bit(_upright(image))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba)  # alpha-composited over white, without an RGBA copy of the result
    return image if image.mode == "RGB" else image.convert("RGB")


def _file(source: str | os.PathLike | bytes):
    """What ``Image.open`` takes for a path or an encoded image's bytes (a Hub dataset's cell)."""
    return io.BytesIO(source) if isinstance(source, bytes) else source


def image_pixels(path: str | os.PathLike | bytes) -> int:
    """Width x height of the image file at ``path`` (or in ``bytes``) from its header (nothing decoded); 0 when unreadable."""
    try:
        with _our_pixel_limit(), Image.open(_file(path), formats=DECODED_FORMATS) as image:
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
        raise ImageLoadError(name, "not an image file PIL can read as JPEG, PNG, BMP, GIF, WebP or TIFF") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(name, f"unreadable or truncated image ({err})") from None


def _load(source: str | os.PathLike | bytes | Image.Image, name: str, max_pixels: int) -> Image.Image:
    """``source`` opened, its size checked against ``max_pixels``, then every pixel decoded."""
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():  # never open a FIFO: it would block
        raise ImageLoadError(name, "not a regular file" if Path(source).exists() else "no such file")
    with _our_pixel_limit():
        image = source if isinstance(source, Image.Image) else Image.open(_file(source), formats=DECODED_FORMATS)
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageLoadError(name, f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageLoadError(name, f"{width}x{height} pixels is more than the {max_pixels:,} "
                                 f"allowed (possible decompression bomb); downscale it first")
        image.load()
    return image


def open_image(source: str | os.PathLike | bytes | Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """``source`` (a path, an encoded image's bytes or a PIL image) fully loaded as RGB (:func:`to_rgb`).

    :class:`ImageLoadError` naming the file when it is missing, unreadable, truncated, empty, not in
    :data:`DECODED_FORMATS`, or over ``max_pixels`` (refused before decoding).
    """
    name = str(source) if isinstance(source, (str, os.PathLike)) else "image"
    with _errors_named(name):
        image = _load(source, name, max_pixels)
        image = _upright(image)  # each step drops the image before it: one full-size copy alive at a time
        image = _eight_bit(image)
        image = to_rgb(image)
    _release_freed_memory()
    return image


def verify_image(source: str | os.PathLike | bytes | Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Raise :class:`ImageLoadError` exactly where :func:`open_image` would, holding only the decoded pixels
    (the colour conversion, which depends on the mode alone, runs on the first row)."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else "image"
    with _errors_named(name):
        image = _load(source, name, max_pixels)
        to_rgb(image.crop((0, 0, image.width, 1)))
        del image
    _release_freed_memory()


def confined_file(path: str | os.PathLike, folders: Iterable[str | os.PathLike],
                  files: Iterable[str | os.PathLike] = ()) -> Path | None:
    """``path`` with every link and ``..`` resolved, when it is an existing regular file inside one of ``folders``
    or one of ``files``, both as written (``..`` taken away) and once resolved; else ``None``, alike for every
    refusal. A path outside them as written, or over ``MAX_PATH_BYTES``, is refused before the file system is
    looked at (no time difference, no resolving of a huge path).
    """
    try:
        written = os.path.abspath(path)
        if len(os.fsencode(written)) > MAX_PATH_BYTES:
            return None
        folders = [(os.path.abspath(folder), os.path.realpath(folder)) for folder in folders]
        files = [(os.path.abspath(file), os.path.realpath(file)) for file in files]
        if not _confined(written, folders, files):
            return None
        real = os.path.realpath(written)
        return Path(real) if _confined(real, folders, files) and os.path.isfile(real) else None
    except (TypeError, ValueError, OSError):  # not a path at all, a NUL byte, a name too long
        return None


def _confined(path: str, folders: list[tuple[str, ...]], files: list[tuple[str, ...]]) -> bool:
    """Whether the absolute ``path`` is inside one of ``folders`` or is one of ``files`` (as written, resolved)."""
    return (any(Path(path).is_relative_to(folder) for names in folders for folder in names)
            or any(path == file for names in files for file in names))


class UnusableImageError(ValueError):
    """A request's image that a server refuses; the message is for the sender as is."""


def open_request_image(source: str | os.PathLike | bytes | Image.Image,
                       name: str) -> tuple[Image.Image, str | None]:
    """A request's image (``name``: how the sender knows it) under the serving limits → the RGB image and a
    warning or None; :class:`UnusableImageError` saying what was wrong and what to send."""
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
