"""app.py's endpoint functions called in-process: answers, the maths shown, and bad inputs."""
from __future__ import annotations

import struct
import zlib

import gradio as gr
import pytest
import torch
from PIL import Image

import app
from effnetv2 import EfficientNetV2, transforms_for

LABELS = ["circle", "hexagon", "square", "star", "triangle", "ring", "cross"]
HEADS, WIDTH, SIZE = 4, 64, 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = EfficientNetV2("b0", num_classes=len(LABELS), id2label=dict(enumerate(LABELS)),
                           pool="attention", num_heads=HEADS, attn_dim=WIDTH, image_size=SIZE,
                           train_image_size=SIZE)
    with torch.no_grad():  # a classifier of realistic scale, so the probabilities differ visibly
        model.head.classifier.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return app.load(str(model_dir), backend="torch")  # the e2e test covers the default runtime


@pytest.fixture(scope="module")
def predictor(loaded):
    return loaded[0]


@pytest.fixture()
def photo(tmp_path):
    torch.manual_seed(1)
    pixels = (torch.rand(90, 120, 3) * 255).byte().numpy()
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def test_header_says_what_is_loaded(loaded, model_dir):
    _, header = loaded
    for text in ("EfficientNetV2-B0", f"{len(LABELS)} classes", "circle", f"{SIZE}×{SIZE}",
                 f"{HEADS} heads", str(model_dir)):
        assert text in header


def test_classify_gives_top5_matching_the_model(predictor, model_dir, photo):
    result = app.classify(predictor, str(photo))
    assert len(result) == app.TOP_K and set(result) <= set(LABELS)
    probs = list(result.values())
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    model = EfficientNetV2.from_pretrained(model_dir)
    with torch.no_grad():
        expected = model(transforms_for(model)(Image.open(photo).convert("RGB"))[None]).softmax(-1)[0]
    for label, prob in result.items():
        assert prob == pytest.approx(expected[LABELS.index(label)].item(), abs=1e-4)


def test_classify_takes_upload_payload_path_and_pil(predictor, photo):
    by_path = app.classify(predictor, str(photo))
    assert app.classify(predictor, {"path": str(photo), "orig_name": "photo.png"}) == by_path
    by_pil = app.classify(predictor, Image.open(photo))
    assert list(by_pil) == list(by_path)


def _png_header_only(path, width, height):
    """A PNG that claims ``width`` x ``height`` pixels in a few dozen bytes (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("fn", ["classify", "attention"])
@pytest.mark.parametrize("case, message", [
    ("text", "not an image"), ("bomb", "decompression bomb"), ("truncated", "truncated"),
    ("strip", "elongated"), ("none", "No image"), ("missing", "no such file")])
def test_bad_inputs_give_clear_errors(predictor, tmp_path, photo, fn, case, message):
    if case == "text":
        value = tmp_path / "notes.png"
        value.write_text("this is not a picture")
    elif case == "bomb":
        value = _png_header_only(tmp_path / "bomb.png", 60_000, 60_000)
    elif case == "truncated":
        value = tmp_path / "cut.png"
        value.write_bytes(photo.read_bytes()[:300])
    elif case == "strip":
        value = tmp_path / "strip.png"
        Image.new("RGB", (2000, 20)).save(value)
    elif case == "missing":
        value = tmp_path / "gone.png"
    else:
        value = None
    with pytest.raises(gr.Error, match=message) as caught:
        getattr(app, fn)(predictor, None if value is None else str(value))
    assert "Traceback" not in str(caught.value) and "File \"" not in str(caught.value)
    assert app.classify(predictor, str(photo))  # and the next request is served as usual


def test_one_pixel_image_is_answered_with_a_warning(predictor, tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    with pytest.warns(UserWarning, match="only 1x1 pixels"):
        result = app.classify(predictor, str(path))
    assert len(result) == app.TOP_K


@pytest.mark.parametrize("mode, suffix", [("1", ".png"), ("L", ".png"), ("LA", ".png"), ("P", ".gif"),
                                          ("RGBA", ".webp"), ("CMYK", ".jpg"), ("I;16", ".png"),
                                          ("F", ".tif"), ("I", ".tif")])
def test_any_colour_mode_is_classified(predictor, tmp_path, mode, suffix):
    path = tmp_path / f"image{suffix}"
    gradient = Image.linear_gradient("L").resize((48, 40))
    (gradient.convert(mode) if mode not in ("I;16", "F", "I") else
     gradient.convert("I").point(lambda v: v * 200).convert(mode) if mode != "F" else
     gradient.convert("F")).save(path)
    assert Image.open(path).mode.startswith(mode[0])
    result = app.classify(predictor, str(path))
    assert len(result) == app.TOP_K and sum(result.values()) <= 1 + 1e-6


def test_attention_gives_each_head_the_mean_the_matrix_and_the_maths(predictor, photo):
    gallery, matrix, maths, grid = app.attention(predictor, str(photo), app.POOLED)
    captions = [caption for _, caption in gallery]
    assert len(gallery) == HEADS + 1
    assert all(f"head {i + 1}" in captions[i] for i in range(HEADS)) and "mean" in captions[-1]
    assert all(isinstance(image, Image.Image) and image.size[0] >= SIZE for image, _ in gallery)
    assert isinstance(matrix, Image.Image) and isinstance(grid, Image.Image)
    cells = (SIZE // 32) ** 2  # the feature grid of a SIZE x SIZE input
    for shape in (f"{cells}, {WIDTH}", f"{HEADS}, {cells}, {WIDTH // HEADS}"):  # tokens; K split in heads
        assert shape in maths
    assert "softmax" in maths


def test_attention_from_a_clicked_cell(predictor, photo):
    pooled = app.attention(predictor, str(photo), app.POOLED)
    cell = app.attention(predictor, str(photo), app.CELL, 1, 0)
    assert cell[2] != pooled[2]
    for row, col in ((5, 0), (0, -1), ("x", 0), (None, 1)):
        with pytest.raises(gr.Error, match="outside the 2x2 feature grid"):
            app.attention(predictor, str(photo), app.CELL, row, col)


def test_click_on_the_grid_picture_picks_that_cell(predictor, photo):
    *_, grid = app.attention(predictor, str(photo), app.POOLED)
    assert grid.size == (app.VIEW_PX, app.VIEW_PX)  # the picture the clicks are measured on
    top_right = gr.SelectData(None, {"index": [app.VIEW_PX - 1, app.VIEW_PX // 4], "value": None})
    assert app.pick_cell(predictor, top_right) == (app.CELL, 0, 1)
    bottom_left = gr.SelectData(None, {"index": [0, app.VIEW_PX - 1], "value": None})
    assert app.pick_cell(predictor, bottom_left) == (app.CELL, 1, 0)


def test_playground_textbook_example(predictor):
    gallery, maths = app.playground(3, 768, 12, 0)
    assert len(gallery) == 12 and "head 12" in gallery[-1][1]
    assert "64" in maths  # 768 / 12 channels per head
    with pytest.raises(gr.Error, match="divisible"):
        app.playground(3, 768, 7, 0)


def test_demo_builds_with_the_named_endpoints(loaded):
    demo = app.build_demo(*loaded)
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"classify", "attention"} <= names


def test_main_limits_uploads_queue_and_sharing(monkeypatch, model_dir):
    seen = {}

    def fake_launch(self, **kwargs):
        seen.update(kwargs, queue=self._queue)
    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    app.main(["--model", str(model_dir), "--port", "7999", "--backend", "torch"])
    assert seen["share"] is False and seen["show_error"] is False
    assert seen["max_file_size"] == app.MAX_FILE_SIZE and seen["server_name"] == "127.0.0.1"
    assert seen["queue"].max_size == app.QUEUE_SIZE
    assert seen["queue"].default_concurrency_limit == app.CONCURRENCY


def test_model_comes_from_flag_env_or_the_bundled_default(monkeypatch):
    monkeypatch.delenv("EFFNETV2_MODEL", raising=False)
    assert app.parse_args([]).model == app.DEFAULT_MODEL
    monkeypatch.setenv("EFFNETV2_MODEL", "org/name@v1")
    assert app.parse_args([]).model == "org/name@v1"
    assert app.parse_args(["--model", "torchvision:s"]).model == "torchvision:s"
