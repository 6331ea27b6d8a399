"""effnetv2.data: folder scan, stratified split, split records, bad files, colour modes, robust dataset."""
import io
import json
import random
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import effnetv2.data
from effnetv2.data import (DatasetError, ImageFolderDataset, check_images, read_split, report_bad_files,
                           save_class_indices, scan_folder, split_samples, write_split)
from effnetv2.data.__main__ import main
from effnetv2.images import ImageLoadError, open_image
from pngs import png_claiming


def _image(path, mode="RGB", size=(20, 16), fmt=None, colour=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if colour is None:
        colour = 128 if mode in ("L", "I;16", "1", "P", "I", "F") else None
    Image.new(mode, size, colour).save(path, format=fmt)
    return path


def _noise_bytes(fmt, size=64):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path):
    """Two classes with mixed-case extensions, nested folders and junk that must be ignored."""
    for i in range(4):
        _image(tmp_path / "cat" / f"{i}.png")
        _image(tmp_path / "dog" / f"{i}.jpg")
    _image(tmp_path / "cat" / "UPPER.JPG")
    _image(tmp_path / "cat" / "Mixed.Jpeg", fmt="JPEG")
    _image(tmp_path / "dog" / "scan.TIFF")
    _image(tmp_path / "dog" / "web.WebP")
    _image(tmp_path / "dog" / "nested" / "deep.bmp")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "Thumbs.db").write_bytes(b"\0" * 10)
    (tmp_path / "dog" / "README").write_text("no suffix")
    _image(tmp_path / "dog" / ".hidden.png")
    _image(tmp_path / "dog" / ".thumbnails" / "t.png")
    _image(tmp_path / ".cache" / "x.png")
    _image(tmp_path / "loose.png")  # not in a class folder
    return tmp_path


def test_scan_folder_finds_images_of_any_case_and_ignores_junk(tree):
    samples, classes = scan_folder(tree)
    assert classes == ["cat", "dog"]
    found = {Path(path).relative_to(tree).as_posix() for path, _ in samples}
    assert found == {"cat/0.png", "cat/1.png", "cat/2.png", "cat/3.png", "cat/UPPER.JPG", "cat/Mixed.Jpeg",
                     "dog/0.jpg", "dog/1.jpg", "dog/2.jpg", "dog/3.jpg", "dog/scan.TIFF", "dog/web.WebP",
                     "dog/nested/deep.bmp"}
    assert all(label == classes.index(Path(path).relative_to(tree).parts[0]) for path, label in samples)
    assert scan_folder(tree) == (samples, classes)  # sorted, so repeatable


@pytest.mark.parametrize("layout, words", [
    ({}, "no class sub-folders"),
    ({"only": 2}, "single class \\(only\\)"),
    ({"a": 2, "empty": 0}, "empty has no images"),
    ({"a": 2, "phone": "heic"}, "phone has no images.*\\.heic"),
])
def test_scan_errors_name_the_problem(tmp_path, layout, words):
    for cls, n in layout.items():
        (tmp_path / cls).mkdir()
        if n == "heic":
            (tmp_path / cls / "IMG_1.HEIC").write_bytes(b"....")
            continue
        for i in range(n):
            _image(tmp_path / cls / f"{i}.png")
    with pytest.raises(DatasetError, match=words):
        scan_folder(tmp_path)


def test_scan_errors_for_missing_root_file_root_and_loose_images(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    _image(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="is a file"):
        scan_folder(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="1 loose image"):
        scan_folder(tmp_path)


def _samples(sizes):
    return [(f"/d/c{c}/{i:03d}.png", c) for c, n in enumerate(sizes) for i in range(n)]


def test_split_is_stratified_disjoint_complete_and_seeded():
    samples = _samples([10, 15, 20, 3])
    train, val = split_samples(samples, 0.2, seed=1)
    assert not set(train) & set(val) and sorted(train + val) == sorted(samples)
    assert [sum(1 for _, label in val if label == c) for c in range(4)] == [2, 3, 4, 1]
    assert split_samples(samples, 0.2, seed=1) == (train, val)
    assert split_samples(samples, 0.2, seed=2)[1] != val
    shuffled = samples[:]
    random.Random(5).shuffle(shuffled)
    assert split_samples(shuffled, 0.2, seed=1) == (train, val)  # input order does not matter
    # another class's files do not move this class's split
    fewer = split_samples(_samples([10, 15, 20]), 0.2, seed=1)[1]
    assert [s for s in val if s[1] < 3] == fewer


def test_split_fraction_zero_and_rounding():
    samples = _samples([5, 7])
    train, val = split_samples(samples, 0.0)
    assert val == [] and sorted(train) == sorted(samples)
    _, val = split_samples(samples, 0.5)  # 2.5 -> 3 and 3.5 -> 4: half up, not to even
    assert [sum(1 for _, label in val if label == c) for c in range(2)] == [3, 4]
    with pytest.raises(DatasetError, match="below 1"):
        split_samples(samples, 1.0)


def test_split_error_names_a_class_too_small():
    samples = [("/d/x/0.png", 0), ("/d/y/0.png", 1), ("/d/y/1.png", 1)]
    with pytest.raises(DatasetError, match="class 'x' has 1 image.*too few.*add images"):
        split_samples(samples, 0.2, classes=["x", "y"])
    with pytest.raises(DatasetError, match="class 0 \\(/d/x\\)"):
        split_samples(samples, 0.2)
    with pytest.raises(DatasetError, match="class 'y' has 2.*at least 3.*lower --val-fraction"):
        split_samples(samples + [("/d/x/1.png", 0), ("/d/x/2.png", 0)], 0.8, classes=["x", "y"])


def test_class_indices_and_split_record_round_trip(tmp_path):
    save_class_indices(tmp_path / "class_indices.json", ["daisy", "rose"])
    assert json.loads((tmp_path / "class_indices.json").read_text()) == {"0": "daisy", "1": "rose"}
    train = [(str(tmp_path / "daisy" / "1.png"), 0), (str(tmp_path / "rose" / "a" / "3.png"), 1)]
    val = [(str(tmp_path / "rose" / "2.png"), 1)]
    write_split(tmp_path / "split.json", train, val, ["daisy", "rose"], tmp_path)
    record = json.loads((tmp_path / "split.json").read_text())
    assert record["train"] == [["daisy/1.png", 0], ["rose/a/3.png", 1]] and record["val"] == [["rose/2.png", 1]]
    assert record["counts"] == {"train": {"daisy": 1, "rose": 1}, "val": {"daisy": 0, "rose": 1}}
    assert record["root"] == tmp_path.name  # no local path: split.json is published with the model
    assert read_split(tmp_path / "split.json", root=tmp_path) == (train, val, ["daisy", "rose"])
    moved = read_split(tmp_path / "split.json", root="/elsewhere")
    assert moved[1] == [("/elsewhere/rose/2.png", 1)]


def _bad_files(folder):
    """Every kind of unusable file, with a word its reason must contain."""
    noise_jpeg, noise_png = _noise_bytes("JPEG"), _noise_bytes("PNG")
    kinds = {
        "empty.jpg": (b"", "not an image"),
        "text.jpg": (b"hello, I am a text file with a .jpg name", "not an image"),
        "truncated.jpg": (noise_jpeg[: len(noise_jpeg) // 2], "truncated"),
        "truncated.png": (noise_png[: len(noise_png) // 2], "truncated"),
        "bomb.png": (png_claiming(60_000, 60_000, idat=zlib.compress(b"\0" * 64)), "decompression bomb"),
    }
    for name, (data, _) in kinds.items():
        (folder / name).write_bytes(data)
    return {name: word for name, (_, word) in kinds.items()}


def test_every_bad_file_kind_is_reported_once_and_skipped(tmp_path):
    bad = _bad_files(tmp_path)
    good = [(str(_image(tmp_path / f"good{i}.png")), i % 2) for i in range(3)]
    samples = [good[0]] + [(str(tmp_path / name), 1) for name in bad] + good[1:]
    samples.append((str(tmp_path / "gone.png"), 0))
    assert (tmp_path / "bomb.png").stat().st_size < 200  # tiny file, 3.6 billion pixels claimed
    kept, rejected = check_images(samples, num_workers=2)
    assert kept == good  # the readable ones, in their order
    reasons = dict(rejected)
    assert len(rejected) == len(bad) + 1 and "no such file" in reasons[str(tmp_path / "gone.png")]
    for name, word in bad.items():
        assert word in reasons[str(tmp_path / name)], (name, reasons[str(tmp_path / name)])
    with pytest.warns(UserWarning) as record:
        report_bad_files(rejected)
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(f"skipping {len(rejected)} unreadable image file(s)")
    for path, reason in rejected:
        assert f"{path}: {reason}" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report_bad_files([])  # nothing to say, no warning


def test_check_decodes_only_as_many_images_at_once_as_the_memory_budget_holds(tmp_path, monkeypatch):
    samples = [(str(_image(tmp_path / f"{i}.png", "L", (32, 32))), 0) for i in range(6)]
    lock, running, most = threading.Lock(), [0], [0]

    def slow_verify(path):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)  # long enough for every thread the budget lets in to start its own
        with lock:
            running[0] -= 1

    monkeypatch.setattr(effnetv2.data, "verify_image", slow_verify)
    one = 32 * 32 * 4  # a decode counts 4 bytes a pixel
    for budget, bound in ((2 * one, 2), (one // 2, 1)):  # room for two; less than one: still one at a time
        most[0] = 0
        assert check_images(samples, num_workers=6, memory_budget=budget) == (samples, [])
        assert 1 <= most[0] <= bound, (budget, most[0])


def test_check_applies_our_pixel_limit_not_pils_from_every_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above 1000 pixels, refuses above 2000
    samples = [(str(_image(tmp_path / f"{i}.png", "L", (40 + 20 * (i % 2), 40))), 0) for i in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_images(samples, num_workers=4) == (samples, [])  # 1600 and 2400 pixels: all good
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's setting is back once the last thread is done


def test_decompression_bomb_under_a_small_limit(tmp_path):
    path = _image(tmp_path / "big.png", "L", (3000, 3000))  # a small file with many pixels
    assert path.stat().st_size < 50_000
    with pytest.raises(ImageLoadError, match="more than the 1,000,000 allowed.*decompression bomb"):
        open_image(path, max_pixels=1_000_000)
    assert open_image(path).size == (3000, 3000)


# mode -> (file format, expected RGB value of the pixel we wrote)
MODES = {
    "1": ("PNG", 1, (255, 255, 255)), "L": ("PNG", 128, (128, 128, 128)), "LA": ("PNG", (0, 0), (255, 255, 255)),
    "P": ("PNG", 3, None), "RGBA": ("PNG", (10, 20, 30, 0), (255, 255, 255)),
    "CMYK": ("JPEG", (0, 255, 255, 0), (255, 0, 0)), "I;16": ("PNG", 65535, (255, 255, 255)),
    "I": ("TIFF", 32768, (128, 128, 128)), "F": ("TIFF", 0.5, (128, 128, 128)),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.numerics
def test_every_colour_mode_becomes_an_rgb_tensor(tmp_path, mode):
    fmt, colour, expected = MODES[mode]
    path = _image(tmp_path / "c" / f"x.{fmt.lower()}", mode, (20, 16), fmt, colour)
    with Image.open(path) as raw:
        assert raw.mode != "RGB"  # the file really holds the mode under test
    x, label = ImageFolderDataset([(str(path), 3)], ["a", "b", "c", "d"])[0]
    assert label == 3 and x.dtype == torch.float32 and x.shape == (3, 16, 20)
    assert 0 <= x.min() and x.max() <= 1
    if expected is not None:
        pixel = (x[:, 8, 10] * 255).round()
        assert torch.allclose(pixel, torch.tensor(expected, dtype=torch.float32), atol=4), pixel


def test_sixteen_bit_is_rescaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16))
    assert abs(int(np.asarray(open_image(image))[0, 0, 0]) - 127) <= 1


def test_exif_rotated_jpeg_comes_out_rotated(tmp_path):
    array = np.zeros((10, 30, 3), np.uint8)  # 30 wide, 10 high: red left third, blue right third
    array[:, :10] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    upright = np.asarray(open_image(tmp_path / "rot.jpg")).astype(int)
    assert upright.shape == (30, 10, 3)
    assert upright[2, 5, 0] > 200 and upright[2, 5, 2] < 60  # the left edge is now the top: red
    assert upright[27, 5, 2] > 200 and upright[27, 5, 0] < 60  # the right edge is now the bottom: blue


def _class_set(tmp_path, n=3):
    """Two classes of ``n`` 8x8 images, each image a distinct grey level."""
    paths = [_image(tmp_path / c / f"{i}.png", "L", (8, 8), colour=10 * (k * n + i + 1))
             for k, c in enumerate("ab") for i in range(n)]
    return [(str(p), k) for k in range(2) for p in paths[k * n:(k + 1) * n]]


def test_dataset_survives_files_deleted_or_damaged_after_checking(tmp_path):
    samples = _class_set(tmp_path)
    ds = ImageFolderDataset(samples, ["a", "b"])
    assert len(ds) == 6 and ds.targets == [0, 0, 0, 1, 1, 1]
    assert round(ds[4][0][0, 0, 0].item() * 255) == 50
    (tmp_path / "b" / "1.png").unlink()
    with pytest.warns(UserWarning, match="skipping unreadable image.*b/1.png.*no such file") as record:
        x, y = ds[4]
    assert len(record) == 1 and y == 1
    assert round(x[0, 0, 0].item() * 255) == 60  # the next image of the same class
    (tmp_path / "b" / "2.png").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="b/2.png.*not an image"):
        assert round(ds[5][0][0, 0, 0].item() * 255) == 40  # wraps to the first image of class b
    assert set(ds.bad_files) == {str(tmp_path / "b" / "1.png"), str(tmp_path / "b" / "2.png")}
    assert "no such file" in ds.bad_files[str(tmp_path / "b" / "1.png")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: known bad files are skipped quietly
        assert [round(ds[i][0][0, 0, 0].item() * 255) for i in (3, 4, 5)] == [40, 40, 40]
        assert round(ds[0][0][0, 0, 0].item() * 255) == 10  # class a untouched


def test_dataset_errors_clearly_when_a_whole_class_is_gone(tmp_path):
    samples = _class_set(tmp_path, n=2)
    for path, label in samples:
        if label == 0:
            (tmp_path / path).unlink()
    ds = ImageFolderDataset(samples, ["a", "b"])
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="no readable image left in class 'a'"):
        ds[0]
    with pytest.raises(DatasetError, match="empty"):
        ImageFolderDataset([], ["a"])


def test_set_transform_changes_the_output(tmp_path):
    ds = ImageFolderDataset(_class_set(tmp_path), ["a", "b"], transform=lambda im: torch.tensor(im.size))
    assert torch.equal(ds[0][0], torch.tensor([8, 8]))
    ds.set_transform(lambda im: torch.zeros(3, im.height * 2, im.width * 2))
    assert ds[0][0].shape == (3, 16, 16)
    ds.set_transform(None)
    assert ds[0][0].shape == (3, 8, 8)


def test_without_a_transform_an_image_is_its_pixels_over_255(tmp_path):
    """torchvision's to_tensor took the place of the hand-written conversion: the same numbers, bit for bit."""
    path = tmp_path / "a" / "noise.png"
    path.parent.mkdir()
    path.write_bytes(_noise_bytes("PNG", size=33))
    x = ImageFolderDataset([(str(path), 0)], ["a"])[0][0]
    by_hand = torch.from_numpy(np.array(open_image(path))).permute(2, 0, 1).float().div(255)
    assert x.dtype == torch.float32 and torch.equal(x, by_hand)


def test_check_command_reports_counts_and_bad_files(tree, capsys):
    (tree / "dog" / "broken.jpg").write_bytes(b"nope")
    with pytest.warns(UserWarning, match="broken.jpg"):
        assert main(["check", str(tree), "--val-fraction", "0.25"]) == 1
    out = capsys.readouterr().out
    assert "14 images in 2 classes, 1 unreadable" in out
    assert "cat: 6 (4 train / 2 val)" in out and "dog: 8 (6 train / 2 val)" in out
    (tree / "dog" / "broken.jpg").unlink()
    assert main(["check", str(tree)]) == 0
    assert main(["check", str(tree / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
