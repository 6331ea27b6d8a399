"""effnetv2.images: high-bit-depth conversion values, the pixel limit, and memory bounded by the pixel count."""
import os
import re
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from benchmarks.memory import measure_open_image, ramp, write_png16
from effnetv2.images import (DECODED_FORMATS, MAX_IMAGE_PIXELS, ImageLoadError, confined_file, image_pixels,
                             open_image, verify_image)
from pngs import png_claiming

# 16-bit values and their 8-bit results, worked by hand: the high byte, v // 256.
SIXTEEN_BIT = [0, 255, 256, 32767, 32768, 65535]
HIGH_BYTE = [0, 0, 1, 127, 128, 255]


def _red(image: Image.Image) -> list[int]:
    """The first row's red channel of ``open_image(image)``."""
    return np.asarray(open_image(image))[0, :, 0].tolist()


def test_sixteen_bit_grey_png_keeps_the_high_byte(tmp_path):
    path = write_png16(tmp_path / "grey.png", np.array(SIXTEEN_BIT), height=2)
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
    rgb = np.asarray(open_image(path))
    assert rgb.shape == (2, len(SIXTEEN_BIT), 3)
    assert (rgb == np.array(HIGH_BYTE)[None, :, None]).all(), rgb[0, :, 0]


def test_sixteen_bit_rgb_png_is_read_by_pil_with_the_same_rule(tmp_path):
    # PIL decodes 16-bit-per-channel PNGs to 8-bit "RGB" itself; a grey one must come out the same.
    row = np.array(SIXTEEN_BIT).reshape(-1, 3)
    path = write_png16(tmp_path / "rgb.png", row, height=1)
    with Image.open(path) as raw:
        assert raw.mode == "RGB"
    assert np.asarray(open_image(path))[0].ravel().tolist() == HIGH_BYTE


def test_big_endian_sixteen_bit_image():
    image = Image.fromarray(np.array([SIXTEEN_BIT], ">u2"))
    assert image.mode == "I;16B"
    assert _red(image) == HIGH_BYTE


@pytest.mark.parametrize("values, expected", [
    ([-5, 0, 255, 256, 32768, 65535, 70000], [0, 0, 0, 1, 128, 255, 255]),  # above 255: 16-bit, clipped
    ([-5, 0, 7, 200, 255], [0, 0, 7, 200, 255]),  # nothing above 255: 8-bit values
])
def test_thirty_two_bit_integer_image(values, expected):
    image = Image.fromarray(np.array([values], np.int32))
    assert image.mode == "I"
    assert _red(image) == expected


@pytest.mark.parametrize("values, expected", [
    ([np.nan, -1.0, 0.0, 0.25, 0.5, 1.0], [0, 0, 0, 64, 128, 255]),  # 0.25 * 255 = 63.75, 0.5 * 255 = 127.5
    ([0.0, 1.0, 2.0, 4.0], [0, 64, 128, 255]),  # max 4: x * 255 / 4
])
def test_float_image(values, expected):
    image = Image.fromarray(np.array([values], np.float32))
    assert image.mode == "F"
    assert _red(image) == expected


@pytest.mark.parametrize("pil_limit", [None, 1000])  # PIL's guard off, or refusing above 2000 pixels
def test_the_pixel_limit_is_ours_at_its_edge(tmp_path, monkeypatch, pil_limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    at_limit = tmp_path / "at.png"
    Image.new("L", (100, 30), 7).save(at_limit)  # 3000 pixels
    one_more = tmp_path / "over.png"
    Image.new("L", (3001, 1), 7).save(one_more)
    assert open_image(at_limit, max_pixels=3000).size == (100, 30)
    verify_image(at_limit, max_pixels=3000)
    refusal = rf"^{re.escape(str(one_more))}: 3001x1 pixels is more than the 3,000 allowed"
    for check in (open_image, verify_image):
        with pytest.raises(ImageLoadError, match=refusal):
            check(one_more, max_pixels=3000)
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # PIL's setting is back as it was


def test_load_errors_carry_the_path_and_the_reason(tmp_path):
    import pickle

    (tmp_path / "text.png").write_text("not an image")
    cases = {tmp_path / "gone.png": "no such file",
             tmp_path / "text.png": "not an image file PIL can read as JPEG, PNG, BMP, GIF, WebP or TIFF"}
    for path, reason in cases.items():
        with pytest.raises(ImageLoadError) as caught:
            open_image(path)
        assert (caught.value.path, caught.value.reason) == (str(path), reason)
        assert str(caught.value) == f"{path}: {reason}"
        copy = pickle.loads(pickle.dumps(caught.value))  # crosses process boundaries (data loader workers)
        assert (copy.path, copy.reason, str(copy)) == (str(path), reason, str(caught.value))


def test_the_default_limit_is_ours_not_pils(tmp_path):
    assert Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS / 2  # PIL would refuse before ours: 179 MP by default
    over = tmp_path / "over.png"  # a header claiming one pixel more than our default, almost no data
    over.write_bytes(png_claiming(66_666_667, 3, colour_type=0, idat=zlib.compress(b"\0" * 64)))
    assert 66_666_667 * 3 == MAX_IMAGE_PIXELS + 1 and image_pixels(over) == MAX_IMAGE_PIXELS + 1
    with pytest.raises(ImageLoadError, match="66666667x3 pixels is more than the 200,000,000 allowed"):
        open_image(over)


def test_image_pixels_reads_the_header_only(tmp_path):
    (tmp_path / "claim.png").write_bytes(png_claiming(60_000, 60_000, idat=zlib.compress(b"\0" * 64)))
    (tmp_path / "text.png").write_text("not an image")
    assert image_pixels(tmp_path / "claim.png") == 3_600_000_000
    assert image_pixels(tmp_path / "text.png") == image_pixels(tmp_path / "missing.png") == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the child's /proc/self/status")
def test_decoding_a_16_bit_png_costs_bytes_per_pixel_not_float64(tmp_path):
    # 36 MP: a float64 copy alone is 288 MB and the old conversion made four (measured: +1010 MB); the
    # 16-bit source, its 8-bit copy and the RGB result take about 5 bytes a pixel (measured: +185 MB).
    path = write_png16(tmp_path / "big.png", ramp(6000), 6000)
    result = measure_open_image(path)
    assert result["code"] == 0, result["output"]
    assert result["increase"] < 400e6, f"{result['increase'] / 1e6:.0f} MB"


def test_confined_file_opens_only_files_inside_its_folders(tmp_path):
    """Uploads and named files pass, resolved; anything reached by '..', a link out, a folder, a device,
    a missing name or a non-path is None, the one answer whether or not it exists."""
    uploads, outside = tmp_path / "uploads", tmp_path / "outside"
    (uploads / "abc").mkdir(parents=True)
    outside.mkdir()
    upload, secret, example = uploads / "abc" / "cat.png", outside / "secret.png", outside / "example.png"
    for file in (upload, secret, example):
        file.write_bytes(b"bytes")
    (uploads / "abc" / "out.png").symlink_to(secret)
    (uploads / "abc" / "gone.png").symlink_to(outside / "missing.png")
    (uploads / "abc" / "in.png").symlink_to(upload)
    (outside / "to_upload.png").symlink_to(upload)  # a link from outside to an upload: outside as written
    (tmp_path / "uploads_evil").mkdir()  # a sibling whose name only starts like the folder's
    (tmp_path / "uploads_evil" / "x.png").write_bytes(b"bytes")
    allowed = {upload: upload, uploads / "abc" / "in.png": upload, example: example, f"{uploads}/abc/../abc/cat.png": upload}
    for path, resolved in allowed.items():
        assert confined_file(path, [uploads], [str(example)]) == resolved, path
    refused = [secret, outside / "to_upload.png", uploads / "abc" / "out.png", uploads / "abc" / "gone.png",
               f"{uploads}/abc/../../outside/secret.png", uploads / "abc" / "nothing.png", outside / "missing.png", uploads / "abc", uploads,
               tmp_path / "uploads_evil" / "x.png", "/dev/null", "/proc/self/environ", "/etc/passwd",
               f"{upload}\0", "x" * 5000, 7, None, ["a"], {"path": str(upload)}]
    for path in refused:
        assert confined_file(path, [uploads], [str(example)]) is None, path
    assert confined_file(upload, []) is None and confined_file(example, [], [example]) == example


def test_confined_file_looks_at_nothing_outside_its_folders(tmp_path, monkeypatch):
    """A path outside the folders as written, or longer than any the OS opens, is refused before the file
    system is asked anything (no time oracle), and fast: resolving a huge path is quadratic in its length
    (a 0.5 MB one took 18 s in the app)."""
    uploads = tmp_path / "uploads"
    (uploads / "abc").mkdir(parents=True)
    (uploads / "abc" / "cat.png").write_bytes(b"bytes")
    asked = []
    for name in ("lstat", "stat", "readlink"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda path, *args, _real=real, _name=name, **kwargs:
                            asked.append((_name, path)) or _real(path, *args, **kwargs))
    outside = ["/etc/passwd", "/proc/self/cwd/x.png", f"{uploads}/../outside.png", f"{uploads}/abc/../../x.png",
               f"{uploads}_evil/x.png", "relative/x.png", f"{uploads}/" + "a/" * 3000 + "cat.png"]
    for path in outside:
        assert confined_file(path, [uploads]) is None, path
    folder = [str(uploads), *map(str, uploads.parents)]  # resolving the folder itself is no answer about a path
    assert [path for _, path in asked if str(path) not in folder] == []
    assert confined_file(uploads / "abc" / "cat.png", [uploads]) is not None
    assert [path for _, path in asked if str(path) not in folder]  # the spy does see the lookups of a path
    for huge in ("/tmp/" + "a/" * 250_000, f"{uploads}/" + "a/" * 250_000, f"{uploads}/" + "a/.." * 125_000):
        start = time.perf_counter()
        assert confined_file(huge, [uploads]) is None
        assert time.perf_counter() - start < 1.0  # microseconds now; before, each took seconds to minutes


# The smallest EPS file PIL takes: decoding it means running Ghostscript on its PostScript.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def test_eps_is_refused_without_running_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: ran.append(args))
    for name in ("drawing.eps", "photo.jpg"):  # whatever the file is called
        (tmp_path / name).write_bytes(EPS)
        with Image.open(tmp_path / name) as image:
            assert image.format == "EPS"  # PIL itself would take it, and run Ghostscript on load()
        for read in (open_image, verify_image):
            with pytest.raises(ImageLoadError, match="not an image file PIL can read as JPEG, PNG, BMP, GIF"):
                read(tmp_path / name)
        assert image_pixels(tmp_path / name) == 0
    assert ran == []


def test_the_documented_formats_are_read_and_others_refused(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    written = {"JPEG": "a.jpg", "PNG": "a.png", "BMP": "a.bmp", "GIF": "a.gif", "WEBP": "a.webp", "TIFF": "a.tif"}
    assert set(written) == set(DECODED_FORMATS)
    for fmt, name in written.items():
        image.save(tmp_path / name, fmt)
        assert open_image(tmp_path / name).size == (5, 6), fmt
    image.save(tmp_path / "camera.jpg", "MPO", save_all=True, append_images=[image])  # a phone's JPEG
    with Image.open(tmp_path / "camera.jpg") as raw:
        assert raw.format == "MPO"
    assert open_image(tmp_path / "camera.jpg").size == (5, 6)
    for fmt in ("PPM", "TGA", "PCX", "ICO"):  # formats PIL reads that the product does not document
        image.save(tmp_path / f"other.{fmt.lower()}", fmt)
        with pytest.raises(ImageLoadError, match="not an image file PIL can read as"):
            open_image(tmp_path / f"other.{fmt.lower()}")
