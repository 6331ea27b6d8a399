"""app.py's endpoint functions called in-process: answers, the maths shown, bad inputs, limits,
the pictures it serves, and its concurrency group (one in-process server)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
from app_server import free_port
from pngs import png_claiming
from effnetv2 import EfficientNetV2, explain, transforms_for, viz

LABELS = ["circle", "hexagon", "square", "star", "triangle", "ring", "cross"]
HEADS, WIDTH, SIZE = 4, 64, 64
TOP = 5  # README: tab "Classify" gives the top-5 labels
IMAGENET_TITLE = "ImageNet — EfficientNetV2-S, 1000 classes"


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
def predictor(model_dir):
    """The app serving the tiny model: ``app.MODELS`` for the module, its predictor returned."""
    models, app.MODELS = app.MODELS, app.Models(str(model_dir), app.NAMES)
    app.MODELS.start(str(model_dir), backend="torch")  # the e2e test covers the default runtime
    yield app.MODELS.get("")
    app.MODELS = models


@pytest.fixture(autouse=True)
def uploads_here(tmp_path_factory, monkeypatch):
    """The tests' files stand in for uploads: Gradio's upload folder is pytest's temporary folder."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.getbasetemp()))


@pytest.fixture()
def photo(tmp_path):
    torch.manual_seed(1)
    pixels = (torch.rand(90, 120, 3) * 255).byte().numpy()
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def _top(result: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in result["confidences"]}


def test_page_says_what_the_model_knows_and_what_to_do(predictor):
    header, classes, views, query, picker = app.open_page()
    assert header.startswith(f"This model knows {len(LABELS)} classes: {', '.join(LABELS)}.")
    assert "pick ImageNet above" in header and header.count(". ") == 1  # two sentences
    assert [value for _, value in picker.choices] == [app.MODELS.main, "torchvision:s"]
    assert picker.choices[1][0] == "ImageNet — EfficientNetV2-S, 1000 classes"
    assert len(classes.choices) == len(LABELS) + 1 and views.value == app.BEST


@pytest.mark.numerics
def test_classify_gives_top5_matching_the_model(predictor, model_dir, photo):
    result = _top(app.classify(str(photo)))
    assert len(result) == TOP and set(result) <= set(LABELS)
    probs = list(result.values())
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    model = EfficientNetV2.from_pretrained(model_dir)
    with torch.no_grad():
        expected = model(transforms_for(model)(Image.open(photo).convert("RGB"))[None]).softmax(-1)[0]
    for label, prob in result.items():
        assert prob == pytest.approx(expected[LABELS.index(label)].item(), abs=1e-4)


def test_classify_takes_upload_payload_path_and_pil(predictor, photo):
    by_path = app.classify(str(photo))
    assert app.classify({"path": str(photo), "orig_name": "photo.png"}) == by_path
    assert list(_top(app.classify(Image.open(photo)))) == list(_top(by_path))


@pytest.mark.parametrize("fn", ["classify", "attention"])
@pytest.mark.parametrize("case, message", [
    ("text", "not an image"), ("bomb", "decompression bomb"), ("truncated", "truncated"),
    ("strip", "elongated"), ("none", "No image"), ("missing", "only images uploaded")])
def test_bad_inputs_give_clear_errors(predictor, tmp_path, photo, fn, case, message):
    if case == "text":
        value = tmp_path / "notes.png"
        value.write_text("this is not a picture")
    elif case == "bomb":
        value = tmp_path / "bomb.png"
        value.write_bytes(png_claiming(60_000, 60_000))
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
        getattr(app, fn)(None if value is None else str(value))
    assert "Traceback" not in str(caught.value) and "File \"" not in str(caught.value)
    assert app.classify(str(photo))  # and the next request is served as usual


@pytest.mark.parametrize("size, refused", [((8000, 5000), False), ((8001, 5000), True)])
def test_pixel_limit_at_its_edge(predictor, tmp_path, size, refused):
    """40,000,000 pixels are read; 40,005,000 (0.0125% more) are refused before decoding."""
    path = tmp_path / "big.png"
    if refused:
        path.write_bytes(png_claiming(*size))
        with pytest.raises(gr.Error, match="8001x5000 pixels is more than the 40,000,000 allowed"):
            app.classify(str(path))
    else:
        Image.new("L", size).save(path, compress_level=1)
        assert len(_top(app.classify(str(path)))) == TOP


@pytest.mark.parametrize("fn", ["classify", "attention"])
@pytest.mark.parametrize("size, refused", [((2000, 100), False), ((100, 2000), False),
                                           ((2001, 100), True), ((100, 2001), True)])
def test_aspect_limit_at_its_edge(predictor, tmp_path, fn, size, refused):
    """20:1 is answered, 20.01:1 refused, lying or standing."""
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (200, 30, 30)).save(path)
    if refused:
        with pytest.raises(gr.Error, match=f"{size[0]}x{size[1]} pixels, more elongated than 20:1"):
            getattr(app, fn)(str(path))
    else:
        assert getattr(app, fn)(str(path))


def test_one_pixel_image_is_answered_with_a_warning(predictor, tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    with pytest.warns(UserWarning, match="only 1x1 pixels"):
        result = _top(app.classify(str(path)))
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
    result = _top(app.classify(str(path)))
    assert len(result) == TOP and sum(result.values()) <= 1 + 1e-6


def _parts(fn, predictor, photo, *args):
    """What the page shows (PIL pictures) for ``photo``: ``app.<fn>_parts`` on a fresh look at it."""
    return getattr(app, f"{fn}_parts")(predictor, app.look(predictor, str(photo)), *args)


def test_attention_gives_the_mean_each_head_the_matrix_and_the_maths(predictor, photo):
    gallery, matrix, maths, grid = _parts("attention", predictor, photo, app.POOLED)
    captions = [caption for _, caption in gallery]
    assert len(gallery) == HEADS + 1 and "mean" in captions[0]  # the summary first
    assert all(f"head {i + 1}" in captions[i + 1] for i in range(HEADS))
    assert all(isinstance(image, Image.Image) and image.size[0] >= SIZE for image, _ in gallery)
    assert isinstance(matrix, Image.Image) and isinstance(grid, Image.Image)
    cells = (SIZE // 32) ** 2  # the feature grid of a SIZE x SIZE input
    for shape in (f"{cells}, {WIDTH}", f"{HEADS}, {cells}, {WIDTH // HEADS}"):  # tokens; K split in heads
        assert shape in maths
    assert "softmax" in maths
    api_gallery, api_matrix, api_maths, _ = app.attention(str(photo))  # the API: the same, as files
    assert [item["caption"] for item in api_gallery] == captions and api_maths == maths
    assert Image.open(api_matrix.path).size == matrix.size


@pytest.mark.numerics
def test_attention_from_a_clicked_cell(predictor, model_dir, photo):
    gallery, _, maths, grid = _parts("attention", predictor, photo, app.CELL, 1, 0)
    model = EfficientNetV2.from_pretrained(model_dir)
    image = Image.open(photo).convert("RGB")
    with torch.no_grad():
        maps = model.attention_maps(transforms_for(model)(image)[None], query=(1, 0))[0]  # [heads, 2, 2]
    for (_, caption), attn in zip(gallery, [maps.mean(0), *maps]):
        peak, row, col = re.search(r"peak ([\d.]+) at cell \((\d+), (\d+)\)", caption).groups()
        assert float(peak) == pytest.approx(float(attn.max()), abs=1e-3)
        assert (int(row), int(col)) == divmod(int(attn.argmax()), 2)
    view = viz.model_input(model, image)[1]
    for (picture, _), (expected, _) in zip(gallery, viz.head_gallery(
            view.resize((app.VIEW_PX,) * 2, Image.BICUBIC).resize((app.MAP_PX,) * 2, Image.BICUBIC), maps)):
        assert np.abs(np.asarray(picture, int) - np.asarray(expected, int)).max() <= 1  # the same maps drawn
    # the grid picture carries the query's attention (the mean of its heads), drawn on the grid itself
    big = view.resize((app.VIEW_PX,) * 2, Image.BICUBIC)
    drawn = np.asarray(viz.grid_image(big, (2, 2), (1, 0), maps.mean(0)), int)
    assert np.abs(np.asarray(grid, int) - drawn).max() <= 1
    assert np.abs(np.asarray(grid, int) - np.asarray(viz.grid_image(big, (2, 2), (1, 0)), int)).max() > 50
    assert "the token at cell (1, 0)" in maths
    for row, col in ((5, 0), (0, -1), ("x", 0), (None, 1), (float("inf"), 0), (0, float("nan"))):
        with pytest.raises(gr.Error, match="outside the 2x2 feature grid"):
            app.attention(str(photo), app.CELL, row, col)


def test_click_on_the_grid_picture_picks_that_cell(predictor, photo):
    seen = {**app.look(predictor, str(photo)), "model": ""}
    *_, grid = app.attention_parts(predictor, seen)
    assert grid.size == (app.VIEW_PX, app.VIEW_PX)  # the picture the clicks are measured on
    top_right = gr.SelectData(None, {"index": [app.VIEW_PX - 1, app.VIEW_PX // 4], "value": None})
    assert app.pick_cell(seen, top_right) == (app.CELL, 0, 1)
    bottom_left = gr.SelectData(None, {"index": [0, app.VIEW_PX - 1], "value": None})
    assert app.pick_cell(seen, bottom_left) == (app.CELL, 1, 0)


def _logits(model_dir, photo):
    model = EfficientNetV2.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model, model(transforms_for(model)(Image.open(photo).convert("RGB"))[None])[0]


@pytest.mark.parametrize("class_name", ["", "star", "cross"])
@pytest.mark.numerics
def test_explain_splits_the_class_logit_among_the_heads(predictor, model_dir, photo, class_name):
    """The per-head totals and the pooled output's bias through the classifier add up to the class
    logit (the attention pool's output is linear in the values, then one linear classifier)."""
    gallery, totals, faithfulness, pair, bars = _parts("explain", predictor, photo, class_name)
    model, logits = _logits(model_dir, photo)
    target = LABELS.index(class_name) if class_name else int(logits.argmax())
    label = LABELS[target]
    assert totals["columns"] == ["head", "contribution"]
    names, contributions = zip(*totals["data"])
    assert list(names) == [f"head {i + 1}" for i in range(HEADS)]
    classifier, out_proj = model.head.classifier, model.head.attn_pool.attn.out_proj
    with torch.no_grad():
        rest = classifier.bias[target] + classifier.weight[target] @ out_proj.bias
    assert sum(contributions) + float(rest) == pytest.approx(float(logits[target]), rel=1e-4, abs=1e-5)
    # their sum first, then one picture per head, captions with each head's total, signed
    assert len(gallery) == HEADS + 1 and "all heads" in gallery[0][1]
    for (_, caption), total in zip(gallery[1:], contributions):
        assert caption.startswith("head") and f"{total:+.2f}" in caption and label in caption
    assert all(isinstance(picture, Image.Image) for picture in (*pair, bars))
    assert pair[0].size == pair[1].size  # the slider's two sides line up
    prob = float(logits.softmax(-1)[target])
    assert f"P({label}) = {prob:.2f}" in faithfulness and "deletion test" in faithfulness
    rows = re.findall(r"^\| ([^|]+) \| ([\d.]+) \| removing the (?:cell|\d+ cells) this map ranks first "
                      r"(?:drops|raises|leaves) P\(\w+\) (?:from|at) ([\d.]+)(?: to ([\d.]+))? \|$", faithfulness, re.M)
    assert [row[0] for row in rows] == ["class attribution", "attention", "Grad-CAM", "random map"]
    for _, auc, before, _ in rows:
        assert 0 <= float(auc) <= 1 and float(before) == pytest.approx(prob, abs=0.006)
    x = transforms_for(model)(Image.open(photo).convert("RGB"))[None]  # each row measures its own map
    own = {"class attribution": explain.class_attribution(model, x, target),
           "attention": model.attention_maps(x).detach(), "Grad-CAM": explain.gradcam(model, x, target)}
    for kind, auc, _, _ in rows[:3]:
        assert float(auc) == pytest.approx(float(explain.deletion_auc(model, x, own[kind], target)), abs=6e-4), kind


def test_explain_refuses_an_unknown_class_naming_the_classes(predictor, photo):
    with pytest.raises(gr.Error, match="Unknown class 'dog': choose one of circle, hexagon, square, star, "
                                       "triangle, ring, cross, or leave it empty"):
        app.explain(str(photo), "dog")
    with pytest.raises(gr.Error, match="No image"):
        app.explain(None, "star")


def test_one_step_answer_labels_picture_sentence_and_verdict(predictor, model_dir, photo):
    scores, picture, sentence, verdict, note = _parts("answer", predictor, photo)
    model, logits = _logits(model_dir, photo)
    probs = logits.softmax(-1)
    best = LABELS[int(probs.argmax())]
    assert list(scores) == [LABELS[i] for i in probs.topk(TOP).indices]
    assert sentence.startswith(f"**{best}, {float(probs.max()):.0%} sure")
    assert isinstance(picture, Image.Image) and picture.size[0] >= 320
    assert "deletion test" in verdict and "random" in verdict
    assert note.startswith("**Unsure")  # a random classifier is never 95% sure here
    _, _, chosen, _, _ = _parts("answer", predictor, photo, "cross", explain.GRADCAM)
    assert chosen.startswith("**cross, ") and "The map: Grad-CAM." in chosen


def test_another_class_or_map_reuses_the_image_seen_once(predictor, photo, monkeypatch):
    """The backbone runs once per image: class and map changes use the kept feature map."""
    seen = app.show_answer(str(photo), app.BEST, "")[-1]
    monkeypatch.setattr(predictor.model, "forward_features", lambda x: pytest.fail("the backbone ran again"))
    for class_name, view in (("cross", app.BEST), ("star", explain.ATTENTION), ("", explain.GRADCAM)):
        labels, picture, sentence, _, _ = app.redraw(seen, class_name, view)
        assert Path(picture).exists() and sentence.startswith(f"**{class_name or next(iter(labels))}, ")
    assert len(seen["why"]) == 3 - ("cross" == next(iter(labels)))  # predicted, cross, star: each computed once


def test_the_sections_and_query_clicks_reuse_the_image_seen_once(predictor, photo, monkeypatch):
    """The heads, the score matrix and every query click use the kept feature map: no second backbone forward."""
    seen = app.show_answer(str(photo), app.BEST, "")[-1]
    monkeypatch.setattr(predictor.model, "forward_features", lambda x: pytest.fail("the backbone ran again"))
    depth = app.show_depth(seen, "", app.POOLED, 0, 0)
    clicked = app.show_attention(seen, app.CELL, 1, 0)
    assert all(part is not None for part in (*depth, *clicked)) and clicked[2] != depth[6]  # another query's maths


def test_no_image_clears_the_answer(predictor):
    assert app.show_answer(None, app.BEST, "") == (None, None, "", "", "", None)
    assert app.redraw(None, "", app.BEST) == (None, None, "", "", "")


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


def test_demo_has_the_named_endpoints():
    named = set(app.demo.get_api_info()["named_endpoints"])
    assert named == {"/answer", "/classify", "/attention", "/explain", "/textbook"}  # the page's events stay private


def test_every_computing_event_is_in_one_concurrency_group():
    """The new-image answer, class and map changes, the sections below, the grid click, the playground and
    the API share one budget; the clearing, the page load and the cell pick compute nothing."""
    computing = {"show_answer", "redraw", "show_depth", "show_attention", "<lambda>",
                 "answer", "classify", "attention", "explain", "textbook"}
    events = [fn for fn in app.demo.fns.values() if fn.name in computing]
    # a new image and a new model: answer + depth each; class/map change: redraw + depth; query: 2 attention
    assert sorted(fn.name for fn in events) == sorted(
        ["show_answer"] * 2 + ["show_depth"] * 3 + ["redraw"] + ["show_attention"] * 2 + ["<lambda>"] +
        ["answer", "classify", "attention", "explain", "textbook"])
    assert {fn.concurrency_id for fn in events} == {"compute"}
    others = [fn for fn in app.demo.fns.values() if fn not in events]
    assert all(fn.concurrency_id != "compute" for fn in others)
    assert {fn.name for fn in others} >= {"open_page", "switch", "pick_cell", "clear"}


def test_a_new_image_clears_the_old_answer_in_the_browser_first():
    """Two listeners of the image's change: one clearing the answer outside the queue (it never waits
    behind another visitor's computing), and the computing one."""
    image = next(b for b in app.demo.blocks.values() if getattr(b, "elem_id", None) == "image")
    listeners = [fn for fn in app.demo.fns.values()
                 if any(t[0] == image._id and t[1] == "change" for t in fn.targets)]
    clear, compute = listeners
    assert clear.name == "clear" and not clear.queue and clear.concurrency_id != app.COMPUTE
    assert app.clear() == (None, None, "", "", "", app.PREDICTED)
    assert compute.name == "show_answer"
    first = {b._id for b in app.demo.blocks.values()
             if getattr(b, "elem_id", None) in ("answer-label", "answer-picture", "answer-sentence", "verdict")}
    assert first <= {b._id for b in clear.outputs} and first <= {b._id for b in compute.outputs}


def test_photo_examples_are_marked_apart_from_the_shapes():
    assert app.PHOTOS and all(Path(path).name.startswith("photo_") for path in app.PHOTOS)
    sets = [block for block in app.demo.blocks.values() if isinstance(block, gr.Dataset)]
    [photos] = [block for block in sets if "outside" in block.label]
    assert len(sets) == 2
    assert [Path(sample[0]["path"]).name for sample in photos.samples] == [Path(p).name for p in app.PHOTOS]


def test_only_uploads_and_examples_are_opened(predictor, photo, tmp_path):
    """A file outside the upload folder, reached directly, by '..' or by a link, is refused with the
    message a missing file gets; an example is read where it lies."""
    with tempfile.TemporaryDirectory() as outside:  # the system's temporary folder, not pytest's
        secret = Path(outside) / "secret.png"
        secret.write_bytes(photo.read_bytes())
        (tmp_path / "link.png").symlink_to(secret)
        dotted = f"{tmp_path}/{'../' * len(tmp_path.parts)}{str(secret).lstrip('/')}"
        messages = set()
        for value in (str(secret), {"path": str(secret)}, str(tmp_path / "link.png"), dotted,
                      str(Path(outside) / "gone.png"), "/etc/passwd", "/proc/self/environ"):
            with pytest.raises(gr.Error) as caught:
                app.classify(value)
            messages.add((caught.value.title, caught.value.message))
        assert messages == {("Image not uploaded", app.NOT_UPLOADED)}
    assert len(_top(app.classify(app.EXAMPLES[0]))) == TOP


def test_importing_app_loads_no_model(model_dir):
    """`gradio app.py` and tests import app: the page is built, the model of $EFFNETV2_MODEL is loaded on the
    first visit (or by ``main``)."""
    code = ("import app, gradio as gr; assert isinstance(app.demo, gr.Blocks); assert not app.MODELS._loaded; "
            "print(app.MODELS.main)")
    env = {**os.environ, "EFFNETV2_MODEL": str(model_dir), "PYTHONPATH": str(Path(app.__file__).parent)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(model_dir)


def test_classify_and_attention_together_compute_two_at_a_time(predictor, photo, monkeypatch):
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
    monkeypatch.delenv("GRADIO_TEMP_DIR")  # the upload folder app.demo was built with, at import
    demo, port = app.demo, free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(app.picture_dir())])
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
    assert app.as_files(red, gr.FileData) == gr.FileData(path=str(path))  # the API's files


@pytest.fixture()
def launched(monkeypatch):
    """What ``app.main`` passes to ``launch`` (which does not run), with the Blocks' queue; ``app.MODELS``
    is the test's."""
    seen = {}

    def fake_launch(self, **kwargs):
        seen.update(kwargs, queue=self._queue)
    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    monkeypatch.setattr(app, "MODELS", app.Models(app.DEFAULT_MODEL, app.NAMES))
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    return seen


def test_main_limits_uploads_queue_and_sharing(launched, model_dir):
    assert app.main(["--model", str(model_dir), "--port", "7999", "--backend", "torch"]) == 0
    assert app.MODELS.main == str(model_dir) and app.MODELS._loaded  # loaded before the server starts
    assert launched["share"] is False and launched["show_error"] is False
    assert launched["max_file_size"] == 10 * 1024 * 1024  # README: uploads are limited to 10 MB (as Gradio reads "10mb")
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999
    assert launched["queue"].max_size == 64  # README: holds at most 64 waiting
    assert launched["queue"].default_concurrency_limit == 2  # README: computes 2 requests at a time
    assert launched["allowed_paths"] == [str(app.picture_dir())]  # the API's pictures, nothing else


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


def test_model_picker_loads_imagenet_s_on_first_use(predictor, photo, torchvision_home, monkeypatch):
    """The picker's second model: loaded when first asked for, once; the answer, explain (CAM: one
    "head") and the class list follow it; the app's own model stays the API's default."""
    monkeypatch.setenv("TORCH_HOME", str(torchvision_home))
    name, header, classes, views, query = app.switch("torchvision:s")
    assert name == "torchvision:s" and header.startswith("This model knows 1000 classes")
    assert len(classes.choices) == 1001 and ("tench", "tench") in [tuple(c) for c in classes.choices]
    assert [value for _, value in views.choices] == [app.BEST, explain.CAM, explain.GRADCAM]  # CAM, Grad-CAM first
    assert query.choices[0][0] == "most attended cell"
    imagenet = app.MODELS.get("torchvision:s")
    assert app.MODELS.get("torchvision:s") is imagenet  # loaded once
    from torchvision.models import EfficientNet_V2_S_Weights

    categories = EfficientNet_V2_S_Weights.IMAGENET1K_V1.meta["categories"]
    assert set(_top(app.classify(str(photo), "torchvision:s"))) <= set(categories)
    assert set(_top(app.classify(str(photo)))) <= set(LABELS)  # the default: the app's model
    _, totals, faithfulness, _ = app.explain(str(photo), "tench", "torchvision:s")
    assert "**Why tench?**" in faithfulness and [row[0] for row in totals["data"]] == ["all cells"]
    assert "feature self-attention" in faithfulness  # the parameter-free maps, named as such
    scores, _, sentence, _ = app.answer(str(photo), "", "torchvision:s")
    assert sentence.startswith(f"**{next(iter(scores))}, ")
    assert "The map: CAM" in sentence or "The map: Grad-CAM" in sentence


@pytest.fixture()
def own_models(predictor, monkeypatch):
    """A fresh ``app.MODELS`` on the tiny model (nothing else loaded, no failure remembered)."""
    models = app.Models(app.MODELS.main, app.NAMES, app.LOAD_WAITERS)
    models.start(models.main, backend="torch")
    monkeypatch.setattr(app, "MODELS", models)
    return models


def test_model_picker_offline_says_so_once_in_a_visitors_words(own_models, tmp_path, monkeypatch):
    """The visitor reads once that the model cannot be had (effnetv2.loading's message) and the page stays;
    an API call gets it as the app's error."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no weights there
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # own_models: ImageNet not loaded yet
    with pytest.warns(UserWarning) as warned:  # a toast in the page, once
        name, header, classes, *_ = app.switch("torchvision:s")
    assert len(warned) == 1 and str(tmp_path) not in str(warned[0].message)
    assert str(warned[0].message).startswith(f"{IMAGENET_TITLE} could not be loaded on this server")
    assert name == app.MODELS.main and len(classes.choices) == len(LABELS) + 1
    with pytest.raises(gr.Error, match=r"Unknown model 'resnet'") as caught:
        app.classify("unused.png", "resnet")
    assert caught.value.title == "Unknown model"


def test_a_hung_model_load_never_holds_up_the_apps_own_model(own_models, photo, hung_load, monkeypatch):
    """The picker's other model hangs while loading (a download that never answers): one request for
    it waits in its compute slot, the others are told at once to come back, and the app's own model
    answers meanwhile (it used to wait behind them for as long as the download hung)."""
    release, calls = hung_load
    monkeypatch.delenv("GRADIO_TEMP_DIR")  # the upload folder app.demo was built with, at import
    demo, port = app.demo, free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    pool = ThreadPoolExecutor(6)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        imagenet = [pool.submit(client.predict, handle_file(str(photo)), "torchvision:s", api_name="/classify")
                    for _ in range(4)]  # twice the compute slots
        time.sleep(1)
        start = time.monotonic()
        own = pool.submit(client.predict, handle_file(str(photo)), api_name="/classify").result(timeout=30)
        seconds = time.monotonic() - start
        release.set()  # the load fails: the request that waited for it says so
        messages = []
        for request in imagenet:
            with pytest.raises(AppError) as caught:
                request.result(timeout=30)
            messages.append(str(caught.value))
    finally:
        release.set()
        pool.shutdown(wait=False, cancel_futures=True)
        demo.close()
    assert own["label"] in LABELS and seconds < 10, seconds
    assert calls == ["torchvision:s"]  # one load for all four requests
    assert app.LOAD_WAITERS == 1 and sorted(message.split(" (")[0] for message in messages) == [
        f"{IMAGENET_TITLE} could not be loaded on this server", *[f"{IMAGENET_TITLE} is loading"] * 3], messages
    assert not any("/" in message for message in messages)
