"""app.py's endpoint functions called in-process: answers, the maths shown, bad inputs, limits,
the pictures it serves, and its concurrency group (one in-process server)."""
from __future__ import annotations

import os
import re
import struct
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

import app
from app_server import free_port
from effnetv2 import EfficientNetV2, explain, transforms_for, viz

LABELS = ["circle", "hexagon", "square", "star", "triangle", "ring", "cross"]
HEADS, WIDTH, SIZE = 4, 64, 64
TOP = 5  # README: tab "Classify" gives the top-5 labels


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


@pytest.mark.numerics
def test_classify_gives_top5_matching_the_model(predictor, model_dir, photo):
    result = app.classify(predictor, str(photo))
    assert len(result) == TOP and set(result) <= set(LABELS)
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


@pytest.mark.parametrize("size, refused", [((8000, 5000), False), ((8001, 5000), True)])
def test_pixel_limit_at_its_edge(predictor, tmp_path, size, refused):
    """40,000,000 pixels are read; 40,005,000 (0.0125% more) are refused before decoding."""
    path = tmp_path / "big.png"
    if refused:
        _png_header_only(path, *size)
        with pytest.raises(gr.Error, match="8001x5000 pixels is more than the 40,000,000 allowed"):
            app.classify(predictor, str(path))
    else:
        Image.new("L", size).save(path, compress_level=1)
        assert len(app.classify(predictor, str(path))) == TOP


@pytest.mark.parametrize("fn", ["classify", "attention"])
@pytest.mark.parametrize("size, refused", [((2000, 100), False), ((100, 2000), False),
                                           ((2001, 100), True), ((100, 2001), True)])
def test_aspect_limit_at_its_edge(predictor, tmp_path, fn, size, refused):
    """20:1 is answered, 20.01:1 refused, lying or standing."""
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (200, 30, 30)).save(path)
    if refused:
        with pytest.raises(gr.Error, match=f"{size[0]}x{size[1]} pixels, more elongated than 20:1"):
            getattr(app, fn)(predictor, str(path))
    else:
        assert getattr(app, fn)(predictor, str(path))


def test_one_pixel_image_is_answered_with_a_warning(predictor, tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    with pytest.warns(UserWarning, match="only 1x1 pixels"):
        result = app.classify(predictor, str(path))
    assert len(result) == TOP


@pytest.mark.parametrize("mode, suffix", [("1", ".png"), ("L", ".png"), ("LA", ".png"), ("P", ".gif"),
                                          ("RGBA", ".webp"), ("CMYK", ".jpg"), ("I;16", ".png"),
                                          ("F", ".tif"), ("I", ".tif")])
@pytest.mark.numerics
def test_any_colour_mode_is_classified(predictor, tmp_path, mode, suffix):
    path = tmp_path / f"image{suffix}"
    gradient = Image.linear_gradient("L").resize((48, 40))
    (gradient.convert(mode) if mode not in ("I;16", "F", "I") else
     gradient.convert("I").point(lambda v: v * 200).convert(mode) if mode != "F" else
     gradient.convert("F")).save(path)
    assert Image.open(path).mode.startswith(mode[0])
    result = app.classify(predictor, str(path))
    assert len(result) == TOP and sum(result.values()) <= 1 + 1e-6


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


@pytest.mark.numerics
def test_attention_from_a_clicked_cell(predictor, model_dir, photo):
    gallery, _, maths, _ = app.attention(predictor, str(photo), app.CELL, 1, 0)
    model = EfficientNetV2.from_pretrained(model_dir)
    image = Image.open(photo).convert("RGB")
    with torch.no_grad():
        maps = model.attention_maps(transforms_for(model)(image)[None], query=(1, 0))[0]  # [heads, 2, 2]
    for (_, caption), attn in zip(gallery, [*maps, maps.mean(0)]):
        peak, row, col = re.search(r"peak ([\d.]+) at cell \((\d+), (\d+)\)", caption).groups()
        assert float(peak) == pytest.approx(float(attn.max()), abs=1e-3)
        assert (int(row), int(col)) == divmod(int(attn.argmax()), 2)
    view = viz.model_input(model, image)[1].resize((app.MAP_PX, app.MAP_PX), Image.BICUBIC)
    for (picture, _), (expected, _) in zip(gallery, viz.head_gallery(view, maps)):  # the same maps drawn
        assert np.abs(np.asarray(picture, int) - np.asarray(expected, int)).max() <= 1
    assert "the token at cell (1, 0)" in maths
    for row, col in ((5, 0), (0, -1), ("x", 0), (None, 1), (float("inf"), 0), (0, float("nan"))):
        with pytest.raises(gr.Error, match="outside the 2x2 feature grid"):
            app.attention(predictor, str(photo), app.CELL, row, col)


def test_click_on_the_grid_picture_picks_that_cell(predictor, photo):
    *_, grid = app.attention(predictor, str(photo), app.POOLED)
    assert grid.size == (app.VIEW_PX, app.VIEW_PX)  # the picture the clicks are measured on
    top_right = gr.SelectData(None, {"index": [app.VIEW_PX - 1, app.VIEW_PX // 4], "value": None})
    assert app.pick_cell(predictor, top_right) == (app.CELL, 0, 1)
    bottom_left = gr.SelectData(None, {"index": [0, app.VIEW_PX - 1], "value": None})
    assert app.pick_cell(predictor, bottom_left) == (app.CELL, 1, 0)


def _logits(model_dir, photo):
    model = EfficientNetV2.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model, model(transforms_for(model)(Image.open(photo).convert("RGB"))[None])[0]


@pytest.mark.parametrize("class_name", ["", "star", "cross"])
@pytest.mark.numerics
def test_explain_splits_the_class_logit_among_the_heads(predictor, model_dir, photo, class_name):
    """The per-head totals and the pooled output's bias through the classifier add up to the class
    logit (the attention pool's output is linear in the values, then one linear classifier)."""
    gallery, totals, faithfulness, pair, label = app.explain(predictor, str(photo), class_name)
    model, logits = _logits(model_dir, photo)
    target = LABELS.index(class_name) if class_name else int(logits.argmax())
    assert label == LABELS[target]
    assert totals["columns"] == ["head", "contribution"]
    names, contributions = zip(*totals["data"])
    assert list(names) == [f"head {i + 1}" for i in range(HEADS)]
    classifier, out_proj = model.head.classifier, model.head.attn_pool.attn.out_proj
    with torch.no_grad():
        rest = classifier.bias[target] + classifier.weight[target] @ out_proj.bias
    assert sum(contributions) + float(rest) == pytest.approx(float(logits[target]), rel=1e-4, abs=1e-5)
    # one picture per head and their sum, captions with each head's total, signed
    assert len(gallery) == HEADS + 1 and "all heads" in gallery[-1][1]
    for (_, caption), total in zip(gallery, contributions):
        assert caption.startswith(f"head") and f"{total:+.2f}" in caption and label in caption
    assert all(isinstance(picture, Image.Image) for picture in pair)
    prob = float(logits.softmax(-1)[target])
    assert f"P({label}) = {prob:.2f}" in faithfulness
    rows = re.findall(r"^\| ([^|]+) \| ([\d.]+) \| removing the (?:cell|\d+ cells) this map ranks first "
                      r"(?:drops|raises) P\(\w+\) from ([\d.]+) to ([\d.]+) \|$", faithfulness, re.M)
    assert [row[0] for row in rows] == ["class attribution", "attention (mean of heads)", "Grad-CAM", "random map"]
    for _, auc, before, after in rows:
        assert 0 <= float(auc) <= 1 and float(before) == pytest.approx(prob, abs=0.006)
    x = transforms_for(model)(Image.open(photo).convert("RGB"))[None]  # each row measures its own map
    own = {"class attribution": explain.class_attribution(model, x, target),
           "attention (mean of heads)": model.attention_maps(x).detach(), "Grad-CAM": explain.gradcam(model, x, target)}
    for kind, auc, _, _ in rows[:3]:
        assert float(auc) == pytest.approx(float(explain.deletion_auc(model, x, own[kind], target)), abs=6e-4), kind
    assert rows[3][1] != rows[0][1]  # the random map is not the attribution


def test_explain_refuses_an_unknown_class_naming_the_classes(predictor, photo):
    with pytest.raises(gr.Error, match="Unknown class 'dog': choose one of circle, hexagon, square, star, "
                                       "triangle, ring, cross, or leave it empty"):
        app.explain(predictor, str(photo), "dog")
    with pytest.raises(gr.Error, match="No image"):
        app.explain(predictor, None, "star")


@pytest.mark.parametrize("prob, warned", [(0.25, True), (0.9499, True), (0.95, False), (1.0, False)])
def test_unsure_answers_say_what_the_model_knows(prob, warned):
    note = app.unsure_note(prob, ["circle", "star"])
    assert bool(note) == warned
    if warned:
        assert f"{prob:.0%}" in note and "only 2 classes: circle, star" in note


def test_playground_textbook_example():
    gallery, maths = app.playground(3, 768, 12, 0)
    assert [caption.split(":")[0] for _, caption in gallery] == [f"head {i}" for i in range(1, 13)]
    # 3 tokens of width 768; 12 heads of 768 / 12 = 64 channels; 3 x 3 scores per head
    for step, shape in [("X", "[1, 3, 768]"), ("split heads", "[1, 12, 3, 64]"),
                        ("scores / softmax", "[1, 12, 3, 3]"), ("weighted sum", "[1, 12, 3, 64]"),
                        ("merged / output", "[1, 3, 768]")]:
        assert f"- {step}: `{shape}`" in maths
    assert all(picture.size[0] > 0 for picture, _ in gallery)
    with pytest.raises(gr.Error, match="divisible"):
        app.playground(3, 768, 7, 0)


@pytest.mark.parametrize("sizes, message", [
    ((3, 768, 12, float("inf")), "seed must be a whole number from 0 to 4294967295, got inf"),
    ((3, 768, 12, float("nan")), "seed must be a whole number from 0 to 4294967295, got nan"),
    ((3, 768, 12, -1), "seed must be"), ((3, 768, 12, 2**32), "seed must be"),
    ((float("inf"), 768, 12, 0), "tokens must be a whole number from 1 to 64, got inf"),
    ((65, 768, 12, 0), "tokens must be"), ((3, 0, 12, 0), "width must be a whole number from 1 to 4096"),
    ((3, 768, None, 0), "heads must be a whole number from 1 to 64, got None"), ((3, "x", 12, 0), "width")])
def test_playground_refuses_bad_sizes_with_a_message(sizes, message):
    with pytest.raises(gr.Error, match=re.escape(message)):
        app.playground(*sizes)


def test_playground_takes_the_edges_of_its_ranges():
    assert len(app.playground(1, 1, 1, 2**32 - 1)[0]) == 1
    assert len(app.playground(64, 4096, 64, 0)[0]) == 64


def test_demo_builds_with_the_named_endpoints(loaded):
    demo = app.build_demo(*loaded)
    named = set(demo.get_api_info()["named_endpoints"])
    assert named == {"/classify", "/attention", "/explain", "/textbook"}  # the UI-only events stay private


def test_every_computing_event_is_in_one_concurrency_group(loaded):
    """Buttons, example clicks (both tabs, shapes and photos), the grid click, /explain and the
    playground share one budget; the UI-only events (view switch, notes, cell inputs) compute nothing."""
    demo = app.build_demo(*loaded)
    computing = {"classify", "attention", "run_attention_example", "explain", "explain_and_name", "textbook"}
    events = [fn for fn in demo.fns.values() if fn.name in computing]
    # classify: button + 2 example sets; attention: button + grid click; examples: 2 sets;
    # explain: after the button, after 2 example sets, and /explain; textbook: 1
    assert sorted(fn.name for fn in events) == sorted(["classify"] * 3 + ["attention"] * 2 +
                                                      ["run_attention_example"] * 2 + ["explain"] + ["explain_and_name"] * 3 + ["textbook"])
    assert {fn.concurrency_id for fn in events} == {"compute"}
    others = [fn for fn in demo.fns.values() if fn not in events]
    assert all(fn.concurrency_id != "compute" for fn in others)


def test_photo_examples_are_marked_apart_from_the_shapes(loaded):
    assert app.PHOTOS and all(Path(path).name.startswith("photo_") for path in app.PHOTOS)
    demo = app.build_demo(*loaded)
    sets = [block for block in demo.blocks.values() if isinstance(block, gr.Dataset)]
    photo_sets = [block for block in sets if "outside" in block.label]
    assert len(sets) == 4 and len(photo_sets) == 2  # one of each per tab
    for block in photo_sets:
        assert [Path(sample[0]["path"]).name for sample in block.samples] == [Path(p).name for p in app.PHOTOS]


def test_module_level_demo_is_built_on_first_use_from_the_environment(model_dir, monkeypatch):
    """`gradio app.py` reads ``app.demo``: the model of $EFFNETV2_MODEL; importing app builds nothing."""
    app.default_demo.cache_clear()
    monkeypatch.delitem(vars(app), "demo", raising=False)  # the one `app.main` sets
    monkeypatch.setenv("EFFNETV2_MODEL", str(model_dir))
    try:
        assert app.default_demo.cache_info().currsize == 0
        demo = app.demo
        assert isinstance(demo, gr.Blocks) and app.demo is demo
        header = next(block.value for block in demo.blocks.values() if getattr(block, "elem_id", None) == "model-header")
        assert str(model_dir) in header
    finally:
        app.default_demo.cache_clear()
    with pytest.raises(AttributeError, match="no attribute 'dmeo'"):
        app.dmeo


def test_classify_and_attention_together_compute_two_at_a_time(loaded, photo, monkeypatch):
    """Four /classify and four /attention requests at once through a real server: at most two are
    inside the model's work at any moment (separate queues would let four in)."""
    active, peak, lock = 0, 0, threading.Lock()
    read_image = app.read_image

    def slow_read_image(value):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.4)  # long enough for every request to be waiting at once
            return read_image(value)
        finally:
            with lock:
                active -= 1
    monkeypatch.setattr(app, "read_image", slow_read_image)
    demo = app.build_demo(*loaded)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        requests = [((handle_file(str(photo)),), "/classify"),
                    ((handle_file(str(photo)), app.POOLED, 0, 0), "/attention")] * 4
        with ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(lambda r: client.predict(*r[0], api_name=r[1]), requests))
    finally:
        demo.close()
    assert len(results) == 8 and all(results)
    assert peak == 2


def test_pictures_are_files_never_rewritten(tmp_path):
    red, blue = Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 255))
    path = Path(app.picture_file(red))
    assert path.parent == app.picture_dir() and path.parent.parent == Path(tempfile.gettempdir())
    assert path.suffix == ".png" and np.array_equal(np.asarray(Image.open(path)), np.asarray(red))
    before = os.stat(path)
    time.sleep(0.01)
    assert app.picture_file(red.copy()) == str(path)  # the same picture is the same file, untouched
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert app.picture_file(blue) != str(path)
    assert not list(path.parent.glob("*.part"))  # no half-written file is left behind
    gallery, matrix, text = app.as_files(([(red, "head 1")], blue, "maths"))
    assert gallery == [(str(path), "head 1")] and matrix == app.picture_file(blue) and text == "maths"


@pytest.fixture()
def launched(monkeypatch):
    """What ``app.main`` passes to ``launch`` (which does not run), with the Blocks' queue."""
    seen = {}

    def fake_launch(self, **kwargs):
        seen.update(kwargs, queue=self._queue)
    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    return seen


def test_main_limits_uploads_queue_and_sharing(launched, model_dir):
    assert app.main(["--model", str(model_dir), "--port", "7999", "--backend", "torch"]) == 0
    assert launched["share"] is False and launched["show_error"] is False
    assert launched["max_file_size"] == 10 * 1024 * 1024  # README: uploads are limited to 10 MB (as Gradio reads "10mb")
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999
    assert launched["queue"].max_size == 64  # README: holds at most 64 waiting
    assert launched["queue"].default_concurrency_limit == 2  # README: computes 2 requests at a time


def test_main_honours_the_server_name_a_space_sets(launched, model_dir, monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    app.main(["--model", str(model_dir), "--backend", "torch"])
    assert (launched["server_name"], launched["server_port"]) == ("0.0.0.0", 7861)
    assert app.parse_args(["--host", "127.0.0.1"]).host == "127.0.0.1"  # the flag wins


def test_main_offline_without_the_model_says_what_to_do(launched, capsys, monkeypatch, tmp_path):
    """Offline, a Hub id that is not in the cache: one line naming it and the way out, exit status 2."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert app.main(["--model", "effnetv2-tests/not-cached"]) == 2
    assert "queue" not in launched  # nothing was started
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("error: --model effnetv2-tests/not-cached: ")
    assert "HF_HUB_OFFLINE=1" in err and "hf download effnetv2-tests/not-cached" in err


def test_model_comes_from_flag_env_or_the_bundled_default(monkeypatch):
    monkeypatch.delenv("EFFNETV2_MODEL", raising=False)
    assert Path(app.parse_args([]).model) == Path(__file__).resolve().parents[1] / "assets" / "model"  # bundled
    monkeypatch.setenv("EFFNETV2_MODEL", "org/name@v1")
    assert app.parse_args([]).model == "org/name@v1"
    assert app.parse_args(["--model", "torchvision:s"]).model == "torchvision:s"


def switch_of(demo: gr.Blocks):
    [fn] = [fn.fn for fn in demo.fns.values() if fn.name == "switch"]
    return fn


def test_model_picker_loads_imagenet_s_on_first_use(loaded, photo, torchvision_home, monkeypatch):
    """The picker's second model: loaded when first asked for, once; classify, explain (CAM: one
    "head") and the class list follow it; the app's own model stays the API's default."""
    monkeypatch.setenv("TORCH_HOME", str(torchvision_home))
    demo = app.build_demo(*loaded)
    [picker] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model-choice"]
    assert [value for _, value in picker.choices] == ["assets/model", "torchvision:s"]
    name, header, classes, query, intro = switch_of(demo)("torchvision:s")
    assert name == "torchvision:s" and "EfficientNetV2-S" in header and "1000 classes" in header
    assert len(classes.choices) == 1001 and ("tench", "tench") in [tuple(c) for c in classes.choices]
    assert query.choices[0][0] == "most attended cell" and "averaging" in intro
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        top5 = client.predict(handle_file(str(photo)), "torchvision:s", api_name="/classify")
        own = client.predict(handle_file(str(photo)), api_name="/classify")  # the default: the app's model
        _, totals, faithfulness, _ = client.predict(handle_file(str(photo)), "tench", "torchvision:s",
                                                    api_name="/explain")
    finally:
        demo.close()
    from torchvision.models import EfficientNet_V2_S_Weights

    imagenet = EfficientNet_V2_S_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(top5["confidences"]) == 5 and {c["label"] for c in top5["confidences"]} <= set(imagenet)
    assert {c["label"] for c in own["confidences"]} <= set(LABELS)
    assert "**Why tench?**" in faithfulness and [row[0] for row in totals["data"]] == ["all cells"]


def test_model_picker_offline_says_why_and_stays_on_the_apps_model(loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no weights there
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = app.Models(*loaded)
    with pytest.raises(gr.Error, match=r"Could not load torchvision:s: the official torchvision EfficientNetV2-S "
                                       r"weights are not in "
                                       r"torch's cache and this machine is offline"):
        models.get("torchvision:s")
    with pytest.raises(gr.Error, match=r"Unknown model 'resnet': choose 'assets/model' or 'torchvision:s'"):
        models.get("resnet")
    with pytest.warns(UserWarning, match="this machine is offline"):  # a toast in the page
        name, header, classes, *_ = switch_of(app.build_demo(*loaded))("torchvision:s")
    assert name == "assets/model" and header == loaded[1] and len(classes.choices) == len(LABELS) + 1
