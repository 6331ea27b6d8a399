import io
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from effnetv2.data import (DatasetError, ImageFolderDataset, check_images, report_bad_files, save_class_indices,
                           scan_folder, split_samples, write_split)
from effnetv2.images import ImageLoadError, open_image
from effnetv2.shapes import make_shapes_dataset


def _image(path, mode="RGB", size=(20, 16), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128 if mode in ("L", "I;16", "1", "P") else None).save(path, format=fmt)
    return path


@pytest.fixture
def tree(tmp_path):
    for cls in ("a", "b"):
        for i in range(5):
            _image(tmp_path / cls / f"{i}.png")
    _image(tmp_path / "a" / "UPPER.JPG")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    _image(tmp_path / "b" / ".hidden.png")
    _image(tmp_path / ".cache" / "x.png")
    return tmp_path


def test_scan_folder(tree):
    samples, classes = scan_folder(tree)
    assert classes == ["a", "b"]
    names = sorted(p.split("/")[-2] + "/" + p.split("/")[-1] for p, _ in samples)
    assert "a/UPPER.JPG" in names and "a/notes.txt" not in names and "b/.hidden.png" not in names
    assert len(samples) == 11 and {label for _, label in samples} == {0, 1}


@pytest.mark.parametrize("layout, words", [
    ({}, "no class sub-folders"),
    ({"only": 2}, "single class"),
    ({"a": 2, "empty": 0}, "has no images"),
])
def test_scan_errors(tmp_path, layout, words):
    for cls, n in layout.items():
        (tmp_path / cls).mkdir()
        for i in range(n):
            _image(tmp_path / cls / f"{i}.png")
    with pytest.raises(DatasetError, match=words):
        scan_folder(tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        scan_folder(tmp_path / "missing")


def test_split_is_stratified_disjoint_and_seeded():
    samples = [(f"/d/{c}/{i}.png", c) for c in range(3) for i in range(10 + 5 * c)]
    train, val = split_samples(samples, 0.2, seed=1)
    assert not set(train) & set(val) and sorted(train + val) == sorted(samples)
    assert [sum(1 for _, l in val if l == c) for c in range(3)] == [2, 3, 4]
    assert split_samples(samples, 0.2, seed=1) == (train, val)
    assert split_samples(samples, 0.2, seed=2)[1] != val
    assert split_samples(samples, 0.0)[1] == []
    with pytest.raises(DatasetError, match="too few"):
        split_samples([("/d/x/0.png", 0), ("/d/y/0.png", 1), ("/d/y/1.png", 1)], 0.2)


def test_split_and_class_files(tmp_path):
    save_class_indices(tmp_path / "class_indices.json", ["daisy", "rose"])
    assert json.loads((tmp_path / "class_indices.json").read_text()) == {"0": "daisy", "1": "rose"}
    write_split(tmp_path / "split.json", [(str(tmp_path / "daisy/1.png"), 0)], [(str(tmp_path / "rose/2.png"), 1)],
                ["daisy", "rose"], tmp_path)
    record = json.loads((tmp_path / "split.json").read_text())
    assert record["train"] == [["daisy/1.png", 0]] and record["val"] == [["rose/2.png", 1]]


def _bad_files(tmp_path):
    bad = {}
    (tmp_path / "empty.jpg").write_bytes(b"")
    bad["empty.jpg"] = "not an image"
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG")
    bad["text.jpg"] = "not an image"
    buf = io.BytesIO()
    Image.fromarray(np.random.randint(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad["truncated.jpg"] = "truncated"
    buf = io.BytesIO()
    Image.fromarray(np.random.randint(0, 255, (64, 64, 3), np.uint8)).save(buf, "PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad["truncated.png"] = "truncated"
    return bad


def test_every_bad_file_kind_is_reported_and_skipped(tmp_path):
    bad = _bad_files(tmp_path)
    good = _image(tmp_path / "good.png")
    samples = [(str(tmp_path / name), 0) for name in bad] + [(str(good), 0)]
    kept, rejected = check_images(samples, num_workers=2)
    assert kept == [(str(good), 0)]
    reasons = dict(rejected)
    for name, word in bad.items():
        assert word in reasons[str(tmp_path / name)], (name, reasons[str(tmp_path / name)])
    with pytest.warns(UserWarning, match="skipping 4 unreadable") as record:
        report_bad_files(rejected)
    assert all(str(tmp_path / name) in str(record[0].message) for name in bad)


def test_decompression_bomb_is_refused(tmp_path):
    path = _image(tmp_path / "bomb.png", "L", (3000, 3000))  # small file, many pixels
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        open_image(path, max_pixels=1_000_000)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_colour_mode_becomes_rgb(tmp_path, mode):
    fmt, suffix = ("TIFF", ".tif") if mode in ("CMYK", "I;16", "I", "F") else ("PNG", ".png")
    path = _image(tmp_path / f"x{suffix}", mode, (20, 16), fmt)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (20, 16)


def test_sixteen_bit_is_rescaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16))
    assert abs(np.asarray(open_image(image))[0, 0, 0] - 127) <= 1


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((10, 30, 3), np.uint8)  # 30 wide, 10 high
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° when displayed
    image.save(tmp_path / "rot.jpg", exif=exif)
    assert open_image(tmp_path / "rot.jpg").size == (10, 30)


def test_dataset_survives_a_file_that_breaks_after_checking(tmp_path):
    paths = [_image(tmp_path / "a" / f"{i}.png", size=(8, 8)) for i in range(3)]
    ds = ImageFolderDataset([(str(p), 0) for p in paths], ["a"], transform=lambda im: torch.tensor(im.size))
    paths[1].write_bytes(b"broken")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        x, y = ds[1]
    assert torch.equal(x, torch.tensor([8, 8])) and y == 0
    assert str(paths[1]) in ds.bad_files
    ds.set_transform(lambda im: im.size[0] * 2)
    assert ds[0][0] == 16


def test_shapes_dataset_is_deterministic_with_boxes(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", num_per_class=3, image_size=64, seed=7)
    b = make_shapes_dataset(tmp_path / "b", num_per_class=3, image_size=64, seed=7)
    c = make_shapes_dataset(tmp_path / "c", num_per_class=3, image_size=64, seed=8)
    ann = json.loads((a / "annotations.json").read_text())
    assert len(ann) == 15 and ann == json.loads((b / "annotations.json").read_text())
    for rel, entry in ann.items():
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
        assert (a / rel).read_bytes() != (c / rel).read_bytes()
        x0, y0, x1, y1 = entry["box"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and entry["label"] == rel.split("/")[0]
        pixels = np.asarray(Image.open(a / rel)).astype(float)
        centre = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
        # the object is one flat colour: its centre differs from the background's corners
        corners = [pixels[1, 1], pixels[1, -2], pixels[-2, 1], pixels[-2, -2]]
        inside = [pixels[y, x] for y in (y0, y1 - 1) for x in (x0, x1 - 1)]
        assert any(np.abs(centre - c).sum() > 30 for c in corners + inside)


def test_shapes_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "effnetv2.data", "shapes", str(tmp_path / "s"),
                          "--num-per-class", "2", "--image-size", "32", "--seed", "3"],
                         capture_output=True, text=True, check=True)
    assert "wrote 10 images" in out.stdout
    samples, classes = scan_folder(tmp_path / "s")
    assert len(samples) == 10 and len(classes) == 5
