"""The effnetv2 demo: give an image, get the answer and why at once, then dig into the attention.

    python app.py                                  # the bundled shapes model (assets/model), no network
    python app.py --model org/name@v1.0            # a Hub repo, optionally at a revision
    python app.py --model torchvision:s            # torchvision's ImageNet weights (downloaded once)
    EFFNETV2_MODEL=./my-model python app.py --port 7861
    gradio app.py                                  # reload mode: edits re-run this file ($EFFNETV2_MODEL)

The endpoints `/answer`, `/classify`, `/attention`, `/explain` and `/textbook` serve `gradio_client`, and MCP
clients with Gradio's `mcp` extra. The computing lives in the `effnetv2` package; this file wires it to the page.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import hashlib
import importlib.util
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr
from gradio import FileData
from gradio.utils import get_upload_folder
from PIL import Image

from effnetv2 import explain as why
from effnetv2 import viz
from effnetv2.attention import check_cell
from effnetv2.images import MAX_UPLOAD_BYTES, UnusableImageError, confined_file, open_request_image
from effnetv2.inference import BACKENDS, Predictor
from effnetv2.loading import IMAGENET, LOAD_TIMEOUT_S, Models, ModelUnavailable
from effnetv2.walkthrough import attention_walkthrough, textbook_example

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = str(HERE / "assets" / "model")
NAMES = {DEFAULT_MODEL: "Shapes — bundled, {} classes", IMAGENET: "ImageNet — EfficientNetV2-S, {} classes"}
EXAMPLES = [str(p) for p in sorted((HERE / "assets" / "examples").glob("*"),
                                   key=lambda p: (p.name.startswith("photo_"), p.name))  # shapes first
            if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}]
PHOTOS = [path for path in EXAMPLES if Path(path).name.startswith("photo_")]  # out of the bundled model's world
TOP_K = 5
COMPUTE = "compute"          # the one concurrency group of every event that computes (model, playground)
CONCURRENCY = 2              # computed at once: one forward runs while another request decodes or encodes
LOAD_WAITERS = CONCURRENCY - 1  # computing requests that may wait for a model's load: one slot serves loaded ones
QUEUE_SIZE = 64              # requests waiting beyond that are turned away with a message
CACHE_AGE_S = 3600           # visitors' uploads and pictures are deleted after an hour (hourly)
SWEEP_S = 60                 # the app's own pictures are swept for old ones at most this often
next_sweep = 0.0             # time.monotonic() of the next sweep
PLAYGROUND = {"tokens": (1, 64), "width": (1, 4096), "heads": (1, 64), "seed": (0, 2**32 - 1)}  # inclusive
VIEW_PX = 320                # the clickable grid picture: what the model sees, drawn at this size
MAP_PX = 224                 # each map of a gallery: two in a row on a phone, colour-bar labels >= 10 px
UNSURE_BELOW = 0.95          # a top probability under this gets "this model knows only ..." (README)
BEST = "best"                # the map picker's "the map that explains this image best"
PREDICTED = ""               # the class picker's "the predicted class"
POOLED, CELL = "pooled", "cell"
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]
MCP_AVAILABLE = importlib.util.find_spec("mcp") is not None  # Gradio's `mcp` extra: serve the API as MCP tools


NOT_UPLOADED = "This app reads only images uploaded to it: upload the image (or give its URL) and try again."


def user_error(message: str, title: str = "Error") -> gr.Error:
    """An error shown to the user as is (no stack trace in the page or the server log)."""
    return gr.Error(message, title=title, print_exception=False)


def read_image(value) -> Image.Image:
    """What the page or an API client sent (upload payload, path, PIL image) → an RGB image, or a message. Events
    run with ``preprocess=False`` (Gradio checks nothing), so only uploads and ``EXAMPLES`` are opened here."""
    if isinstance(value, FileData):
        value = value.path
    if isinstance(value, dict):
        value = value.get("path")
    if value is None:
        raise user_error("No image yet: upload one, paste one, take a photo, or click an example.",
                         title="No image")
    name = Path(value).name if isinstance(value, (str, os.PathLike)) else "the image"
    if not isinstance(value, Image.Image):  # an in-process caller's picture opens no file
        value = confined_file(value, [get_upload_folder()], EXAMPLES)
        if value is None:
            raise user_error(NOT_UPLOADED, title="Image not uploaded")
    try:
        image, warning = open_request_image(value, name)  # the limits of effnetv2.images, as effnetv2.serve's
    except UnusableImageError as err:
        raise user_error(str(err), title="Not a usable image") from None
    if warning:
        gr.Warning(warning)
    return image


MODELS = Models(os.environ.get("EFFNETV2_MODEL") or DEFAULT_MODEL, NAMES, LOAD_WAITERS)


def predictor_for(name: str | None) -> Predictor:
    """``MODELS.get(name)``, its refusals shown to the visitor."""
    try:
        return MODELS.get(name)
    except ModelUnavailable as err:
        raise user_error(str(err), err.title) from None


# ---- Computation for the page and the API ----------------------------------------------------------

def unsure_note(top_prob: float, labels: list[str]) -> str:
    """A warning in Markdown (the image is likely none of the model's few classes), else ``""``."""
    if top_prob >= UNSURE_BELOW or len(labels) > why.LISTED_CLASSES:
        return ""
    return (f"**Unsure ({top_prob:.0%}).** This model knows only {len(labels)} classes: "
            f"{', '.join(labels)}. An image of anything else still gets one of them.")


def look(predictor: Predictor, image) -> dict:
    """One image, seen once: the model's input, its view (as the model sees it) and its feature map."""
    x, view = viz.model_input(predictor.model, read_image(image))
    return {"x": x, "view": view, "feats": why.features(predictor.model, x)}


def reason(predictor: Predictor, seen: dict, class_name: str | None = PREDICTED) -> why.Why:
    """Why ``class_name`` (empty: the predicted class) for an image :func:`look` saw, kept in ``seen``."""
    labels = list(predictor.id2label.values())
    if class_name and class_name not in labels:
        raise user_error(f"Unknown class {class_name!r}: choose one of {', '.join(labels)}, "
                         f"or leave it empty for the predicted class.", title="Unknown class")
    known = seen.setdefault("why", {})
    if not known:  # the predicted class first: it tells which one that is
        first = why.why(predictor.model, seen["feats"])
        known[first.target] = first
    target = labels.index(class_name) if class_name else next(iter(known))
    if target not in known:
        known[target] = why.why(predictor.model, seen["feats"], target)
    return known[target]


def answer_parts(predictor: Predictor, seen: dict, class_name: str | None = PREDICTED, view: str = BEST):
    """The first screen: the top labels, the explanation picture, the sentence, the verdict, the unsure note."""
    labels = list(predictor.id2label.values())
    result = reason(predictor, seen, class_name)
    kinds = why.map_kinds(predictor.model)
    kind = min(kinds, key=result.aucs.get) if view == BEST or view not in kinds else view  # BEST: lowest deletion
    label, prob = labels[result.target], float(result.probs[result.target])
    picture = viz.explanation_picture(seen["view"], result.maps[kind], why.region_cells(result.maps[kind].numel()),
                                      signed=kind in (why.ATTRIBUTION, why.CAM))
    top = result.probs.topk(min(TOP_K, len(labels)))
    scores = {labels[i]: float(p) for p, i in zip(top.values, top.indices)}
    sentence = f"**{why.answer_sentence(label, prob, result.deletion[kind])}** The map: {kind}" + (
        " (chosen: the best by the deletion test)." if view == BEST else ".")
    return (scores, picture, sentence, why.verdict(result.deletion),
            unsure_note(float(result.probs.max()), labels))


def explain_parts(predictor: Predictor, seen: dict, class_name: str | None = PREDICTED):
    """"Why this class?" in depth: attribution gallery, head totals (table), faithfulness, Grad-CAM pair, bar chart."""
    labels = list(predictor.id2label.values())
    result = reason(predictor, seen, class_name)
    label = labels[result.target]
    small = seen["view"].resize((MAP_PX, MAP_PX), Image.BICUBIC)
    heads = [f"head {i + 1}" for i in range(len(result.shares))] if len(result.shares) > 1 else ["all cells"]
    values = result.shares.sum((1, 2)).tolist()
    totals = {"columns": ["head", "contribution"], "data": [[h, float(v)] for h, v in zip(heads, values)],
              "datatypes": {"head": "nominal", "contribution": "quantitative"}, "mark": "bar"}
    region = why.region_cells(result.shares[0].numel())
    pair = (viz.explanation_picture(seen["view"], result.maps[why.GRADCAM], region, signed=False),
            viz.explanation_picture(seen["view"], result.shares.sum(0), region, signed=True))
    predicted = labels[int(result.probs.argmax())]
    choice = "predicted" if predicted == label else f"chosen; predicted: {predicted}"
    table = "\n\n".join([f"**Why {label}?** P({label}) = {float(result.probs[result.target]):.2f} ({choice}).",
                         why.verdict(result.deletion), why.faithfulness_table(result, label)])
    return (viz.attribution_gallery(small, result.shares, label), totals, table, pair,
            viz.bar_chart(heads, values, f"adds to {label}'s score"))


def parse_query(query: str, row, col, grid: tuple[int, int]) -> tuple[int, int] | None:
    """The query choice → ``None`` (pooled query) or a checked ``(row, col)`` grid cell."""
    if query == POOLED:
        return None
    if query != CELL:
        raise user_error(f"Unknown query {query!r}: use {POOLED!r} or {CELL!r}.")
    height, width = grid
    try:
        cell = int(float(row)), int(float(col))
        check_cell(cell, grid)  # the library's bounds, in the app's words below
    except (TypeError, ValueError, OverflowError):  # None, text, NaN, infinity, off the grid
        raise user_error(f"Query cell ({row}, {col}) is outside the {height}x{width} feature grid: "
                         f"click a cell on the grid picture, or pick a row in 0..{height - 1} and a "
                         f"column in 0..{width - 1}.") from None
    return cell


def attention_parts(predictor: Predictor, seen: dict, query: str = POOLED, row=0, col=0):
    """Each head's attention (their mean first), the score matrix, the maths, the query's attention on the grid."""
    grid = tuple(seen["feats"].shape[-2:])
    walk = attention_walkthrough(predictor.model, seen["x"], parse_query(query, row, col, grid), seen["feats"])
    view = seen["view"].resize((VIEW_PX, VIEW_PX), Image.BICUBIC)
    return (viz.head_gallery(view.resize((MAP_PX, MAP_PX), Image.BICUBIC), walk["maps"]),
            viz.score_matrix_image(walk["all_weights"], walk["query"], grid), viz.walkthrough_markdown(walk),
            viz.grid_image(view, grid, walk["query"], walk["maps"].mean(0)))


def whole_number(value, name: str) -> int:
    """A playground field's raw value → a whole number within ``PLAYGROUND[name]``, else a message."""
    low, high = PLAYGROUND[name]
    try:
        number = round(float(value))
    except (TypeError, ValueError, OverflowError):  # None, text, NaN, infinity
        number = None
    if number is None or not low <= number <= high:
        raise user_error(f"{name} must be a whole number from {low} to {high}, got {value}.",
                         title="Check the sizes")
    return number


def playground(tokens: float, width: float, heads: float, seed: float):
    """The textbook example → each head's score matrix (gallery) and the shapes at each step (Markdown)."""
    sizes = [whole_number(value, name) for value, name in zip((tokens, width, heads, seed), PLAYGROUND)]
    try:
        example = textbook_example(*sizes[:3], seed=sizes[3])
    except ValueError as err:
        raise user_error(str(err), title="Check the sizes") from None
    return viz.textbook_gallery(example), viz.textbook_markdown(example)


@functools.cache
def picture_dir() -> Path:
    """This process's folder of served pictures (in the system temp folder, where Gradio may read)."""
    folder = Path(tempfile.mkdtemp(prefix="effnetv2-app-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def prune_pictures() -> None:
    """Delete the pictures older than ``CACHE_AGE_S`` (as Gradio's copies of them), at most every ``SWEEP_S``."""
    global next_sweep
    if time.monotonic() < next_sweep:
        return
    next_sweep = time.monotonic() + SWEEP_S
    for old in picture_dir().glob("*.png"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > CACHE_AGE_S:
                old.unlink()


def picture_file(image: Image.Image) -> str:
    """``image`` as a PNG file in :func:`picture_dir`, named by its content and never rewritten (Gradio's
    ``save_pil_to_cache`` rewrites a file in place while another request may be streaming it)."""
    buffer = io.BytesIO()
    image.save(buffer, format="png", compress_level=1)  # 4x faster than the default 6, files 20% larger
    data = buffer.getvalue()
    path = picture_dir() / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    prune_pictures()
    if not path.exists():
        fd, staging = tempfile.mkstemp(dir=path.parent, suffix=".part")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(staging, path)
    return str(path)


def captioned(gallery) -> list[dict]:
    """An API endpoint's gallery: its (picture, caption) pairs as Gallery's {"image", "caption"} dicts."""
    return [{"image": picture, "caption": caption} for picture, caption in gallery]


def as_files(outputs, wrap=str):
    """Outputs with every PIL image (also inside lists of (image, caption)) → a :func:`picture_file` path,
    passed through ``wrap`` (``FileData`` for the API endpoints, which Gradio does not postprocess)."""
    if isinstance(outputs, Image.Image):
        return wrap(picture_file(outputs)) if wrap is str else wrap(path=picture_file(outputs))
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(as_files(value, wrap) for value in outputs)
    return outputs


# ---- The API (also MCP tools): these docstrings are their descriptions ---------------------------------

def answer(image: FileData, class_name: str = "", model: str = "") -> tuple[dict, FileData, str, str]:
    """Classify an image and say why in one step: the top labels, one explanation picture and one sentence.

    Args:
        image: the image (PNG, JPEG or WebP; URL or file).
        class_name: one of the model's class names, or "" for the predicted class.
        model: the app's own model (the default), or "torchvision:s" for ImageNet EfficientNetV2-S.
    Returns:
        the top-5 labels with their probabilities, the image with the map that explains it best over it
        (its top quarter of cells outlined), the answer in one sentence, and which map wins the deletion test.
    """
    predictor = predictor_for(model)
    return as_files(answer_parts(predictor, look(predictor, image), class_name)[:4], FileData)


def classify(image: FileData, model: str = "") -> dict:
    """Classify an image with EfficientNetV2: the top-5 labels with their probabilities.

    Args:
        image: the image to classify (PNG, JPEG or WebP; URL or file).
        model: the app's own model (the default), or "torchvision:s" for ImageNet EfficientNetV2-S.
    Returns:
        the most likely label and the top-5 labels with their probabilities (they sum to at most 1).
    """
    [top] = predictor_for(model).predict([read_image(image)], top_k=TOP_K)
    return {"label": top[0][0], "confidences": [{"label": label, "confidence": float(p)} for label, p in top]}


def attention(image: FileData, query: str = POOLED, row: float = 0, col: float = 0,
              model: str = "") -> tuple[list[dict], FileData, str, FileData]:
    """Where each attention head of the model looks in an image.

    Args:
        image: the image (PNG, JPEG or WebP; URL or file).
        query: "pooled" for the classifier's query, or "cell" for the token at grid cell (row, col).
        row: the query cell's row in the feature grid (used when query is "cell").
        col: the query cell's column in the feature grid (used when query is "cell").
        model: the app's own model (the default), or "torchvision:s" for ImageNet EfficientNetV2-S.
    Returns:
        the mean of the heads' attention maps, then one per head (with peak weights), the query-by-key
        weight matrix, the maths with this image's tensor shapes, and the feature grid drawn on the image.
    """
    predictor = predictor_for(model)
    gallery, matrix, maths, grid = as_files(attention_parts(predictor, look(predictor, image), query, row, col),
                                            FileData)
    return captioned(gallery), matrix, maths, grid


def explain(image: FileData, class_name: str = "", model: str = "") -> tuple[list[dict], dict, str, tuple[FileData, FileData]]:
    """Why the model gives an image a class: each attention head's exact signed share of the class
    score over the image, and how faithful each map is.

    Args:
        image: the image (PNG, JPEG or WebP; URL or file).
        class_name: one of the model's class names, or "" for the predicted class.
        model: the app's own model (the default), or "torchvision:s" for ImageNet EfficientNetV2-S.
    Returns:
        the attribution pictures (their sum, then one per head; red pushes towards the class, blue
        against), each head's total contribution to the class score, the verdict and faithfulness table
        (deletion area of each map kind against a random map's, lower is better), and the Grad-CAM /
        attribution pair.
    """
    predictor = predictor_for(model)
    gallery, totals, table, pair, _ = as_files(explain_parts(predictor, look(predictor, image), class_name),
                                               FileData)
    return captioned(gallery), totals, table, pair


def textbook(tokens: float = 3, width: float = 768, heads: float = 12, seed: float = 0) -> tuple[list[dict], str]:
    """The textbook multi-head attention example: random tokens split into heads.

    Args:
        tokens: number of tokens (1 to 64).
        width: channels per token (1 to 4096, divisible by heads).
        heads: number of heads (1 to 64).
        seed: random seed (0 to 4294967295).
    Returns:
        each head's score matrix, and the tensor shapes at each step.
    """
    gallery, maths = as_files(playground(tokens, width, heads, seed), FileData)
    return captioned(gallery), maths


# ---- The page's handlers ----------------------------------------------------------------------------
NO_ANSWER = (None, None, "", "", "")  # the first screen, empty

def open_page():
    """A visit starts: what the app's model knows, the picker, the controls that follow the model."""
    predictor = predictor_for(MODELS.main)
    return (*follow(MODELS.main, predictor),
            gr.Dropdown(choices=MODELS.choices(), value=MODELS.main, visible=len(MODELS.names()) > 1))


def follow(name: str, predictor: Predictor) -> list:
    """What model ``name`` knows (the header), then its classes, its maps, its query choices."""
    kinds = why.map_kinds(predictor.model)
    other = MODELS.title(IMAGENET).split(" — ")[0] if name != IMAGENET else None
    return [why.describe_model(list(predictor.id2label.values()), other),
            gr.Dropdown(choices=[("the predicted class", PREDICTED), *((c, c) for c in predictor.id2label.values())],
                        value=PREDICTED),
            gr.Radio(choices=[("the best one", BEST), *((k, k) for k in kinds)], value=BEST),
            gr.Radio(choices=[("pooled query" if predictor.model.pool_type == "attention" else "most attended cell",
                               POOLED), ("the clicked cell", CELL)], value=POOLED)]


def switch(name: str):
    """Another model picked: its header and controls; back to the app's own if it cannot be had."""
    try:
        predictor = MODELS.get(name, wait_s=LOAD_TIMEOUT_S)  # its own event: no compute slot held
    except ModelUnavailable as err:
        gr.Warning(str(err), title=err.title)
        name, predictor = MODELS.main, predictor_for(MODELS.main)
    return name, *follow(name, predictor)


def show_answer(image, view, model):
    """A new image (or model): the first screen for the predicted class, and the image seen (kept for changes)."""
    if image is None:
        return *NO_ANSWER, None
    predictor = predictor_for(model)
    seen = {**look(predictor, image), "model": model}
    return (*as_files(answer_parts(predictor, seen, PREDICTED, view)), seen)


def clear():
    """A new image: the old answer goes at once (no queue), before the new one is computed."""
    return *NO_ANSWER, PREDICTED


def redraw(seen, class_name, view):
    """Another class or map: the first screen again from the kept image (the head only)."""
    if not seen:
        return NO_ANSWER
    return as_files(answer_parts(predictor_for(seen["model"]), seen, class_name, view))


def show_depth(seen, class_name, query, row, col):
    """The sections below the answer, for the kept image."""
    if not seen:
        return [None] * 8
    predictor = predictor_for(seen["model"])
    gallery, _, table, pair, bars = explain_parts(predictor, seen, class_name)
    return as_files((gallery, table, pair, bars, *attention_parts(predictor, seen, query, row, col)))


def show_attention(seen, query, row, col):
    return as_files(attention_parts(predictor_for(seen["model"]), seen, query, row, col)) if seen else [None] * 4


def pick_cell(seen, evt: gr.SelectData):
    """A click at pixel ``evt.index = (x, y)`` of the grid picture → query "cell" and its (row, col)."""
    grid = tuple(seen["feats"].shape[-2:]) if seen else (1, 1)
    return CELL, *viz.cell_from_click(evt.index, (VIEW_PX, VIEW_PX), grid)


# ---- The page ---------------------------------------------------------------------------------------
# Computing events run with ``preprocess=False`` (a bad input is a message, never a Gradio processing
# error) in the concurrency group ``COMPUTE``: at most ``CONCURRENCY`` requests compute at once.

INTO_VIEW = """() => { let tries = 0; const go = () => {  // once the picture is drawn (a phone scrolls to it)
  const picture = document.querySelector('#answer-picture img');
  if ((!picture || !picture.complete) && tries++ < 100) return setTimeout(go, 50);
  document.querySelector('#answer')?.scrollIntoView({block: 'nearest', behavior: 'instant'}); }; go(); }"""
CSS = """
#title h1 {margin: 0; font-size: clamp(1.4rem, 4vw, 2rem);}
#answer-picture img, #gradcam-slider img {object-fit: contain;}
.grid-wrap {height: auto !important; max-height: none !important;}
.grid-wrap .thumbnail-item {aspect-ratio: auto !important; height: auto !important; display: flex; flex-direction: column;}
.grid-wrap .caption-label {position: static !important; white-space: normal; max-width: 100%; border: none;}
.grid-wrap img {object-fit: contain !important; height: auto !important;}
#faithfulness td, #faithfulness th {word-break: normal !important; overflow-wrap: normal !important; hyphens: none;}
@media (max-width: 640px) {
  .gallery .grid-container, .grid-wrap .grid-container {grid-template-columns: repeat(2, minmax(0, 1fr)) !important;}
  #answer {scroll-margin-top: 8px;}
  #answer-row {margin-inline: -24px; width: calc(100% + 48px);}  /* the page's 32 px side padding, less 8 */
}
"""
SOURCES = ["upload", "webcam", "clipboard"]
GALLERY = dict(columns=5, format="png", object_fit="contain", height="auto", buttons=["download", "fullscreen"])
PICTURE = dict(type="filepath", format="png", interactive=False, buttons=["download", "fullscreen"])

with gr.Blocks(title="EfficientNetV2 demo", analytics_enabled=False, delete_cache=(CACHE_AGE_S, CACHE_AGE_S)) as demo:
    gr.Markdown("# EfficientNetV2: what is in your image, and why", elem_id="title")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            header = gr.Markdown(elem_id="model-header")
        picker = gr.Dropdown(MODELS.choices(), value=MODELS.main, label="Model", elem_id="model-choice",
                             scale=0, min_width=300)
    with gr.Row(equal_height=False, elem_id="answer-row"):
        with gr.Column(min_width=300):
            image = gr.Image(label="Your image", type="filepath", image_mode=None, sources=SOURCES,
                             elem_id="image", height=240)
        with gr.Column(min_width=300, elem_id="answer"):
            sentence = gr.Markdown(elem_id="answer-sentence")
            picture = gr.Image(label="Why: where the answer comes from", elem_id="answer-picture", show_label=False,
                               **PICTURE)
        with gr.Column(min_width=300):
            labels = gr.Label(num_top_classes=TOP_K, label="Top 5", elem_id="answer-label")
            note = gr.Markdown(elem_id="unsure-note")
            target = gr.Dropdown(label="Why this class?", elem_id="class-choice")
            view = gr.Radio(label="Map", elem_id="view-choice")
            verdict = gr.Markdown(elem_id="verdict")
    gr.Examples([p for p in EXAMPLES if p not in PHOTOS], image, label="Shapes: what the bundled model knows")
    gr.Examples(PHOTOS, image, label="Photos: outside the bundled model's five shapes")
    seen = gr.State()
    with gr.Accordion("How the attention works: each head, Grad-CAM, the deletion test", open=False):
        gr.Markdown("What each head adds to the class score, cell by cell: red pushes towards the class, "
                    "blue against (one colour scale for all); the first picture sums the heads.")
        shares = gr.Gallery(label="What each head adds to the class", elem_id="attribution-gallery", **GALLERY)
        with gr.Row():
            bars = gr.Image(label="Each head's total", elem_id="head-totals", **PICTURE)
            slider = gr.ImageSlider(label="Grad-CAM (left) against the class attribution (right)", type="filepath",
                                    format="png", elem_id="gradcam-slider")
        faithfulness = gr.Markdown(elem_id="faithfulness")
        heads = gr.Gallery(label="Where each head looks (their mean first)", elem_id="head-gallery", **GALLERY)
    with gr.Accordion("How a head scores the cells: query, score matrix, the maths", open=False):
        with gr.Row():
            with gr.Column():
                query = gr.Radio(label="Query", elem_id="query-mode")
                with gr.Row():
                    row = gr.Number(0, label="row", precision=0, minimum=0, elem_id="query-row")
                    col = gr.Number(0, label="column", precision=0, minimum=0, elem_id="query-col")
                grid_view = gr.Image(label="The query's attention on the feature grid: click a cell",
                                     elem_id="grid-view", **PICTURE)
            matrix = gr.Image(label="Query-by-key weights (mean over heads)", elem_id="score-matrix", **PICTURE)
        maths = gr.Markdown(latex_delimiters=LATEX, elem_id="maths")
    with gr.Accordion("Playground: the textbook example", open=False) as play_section:
        gr.Markdown("A sequence of tokens of some width, split into heads: each head scores every token "
                    "against every other. Change the sizes.")
        with gr.Row():
            numbers = [gr.Number(value, label=name, precision=0, minimum=low, maximum=high)
                       for value, (name, (low, high)) in zip((3, 768, 12, 0), PLAYGROUND.items())]
            play = gr.Button("Run")
        play_gallery = gr.Gallery(label="Score matrix of each head", elem_id="play-gallery", **GALLERY)
        play_maths = gr.Markdown(latex_delimiters=LATEX)

    first = [labels, picture, sentence, verdict, note]
    compute = dict(concurrency_id=COMPUTE, api_visibility="private")
    answer_event = dict(fn=show_answer, inputs=[image, view, picker], outputs=[*first, seen], preprocess=False,
                        **compute)
    depth_event = dict(fn=show_depth, inputs=[seen, target, query, row, col], **compute,
                     outputs=[shares, faithfulness, slider, bars, heads, matrix, maths, grid_view])
    attention_event = dict(fn=show_attention, inputs=[seen, query, row, col], outputs=[heads, matrix, maths, grid_view],
                     **compute)
    demo.load(open_page, None, [header, target, view, query, picker], queue=False, api_visibility="private")
    image.change(clear, None, [*first, target], queue=False, show_progress="hidden", api_visibility="private")
    image.change(**answer_event).then(None, js=INTO_VIEW).then(**depth_event)
    picker.input(switch, picker, [picker, header, target, view, query], api_visibility="private").then(
        **answer_event).then(**depth_event)
    gr.on([target.input, view.input], redraw, [seen, target, view], first, **compute).then(**depth_event)
    gr.on([query.input, row.submit, col.submit], **attention_event)
    grid_view.select(pick_cell, seen, [query, row, col], api_visibility="private").then(**attention_event)
    gr.on([play.click, play_section.expand], lambda *sizes: as_files(playground(*sizes)), numbers,
          [play_gallery, play_maths], preprocess=False, **compute)  # opened: the example is there
    for endpoint in (answer, classify, attention, explain, textbook):
        gr.api(endpoint, api_name=endpoint.__name__, concurrency_id=COMPUTE)
demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE, api_open=False)  # no route around the queue


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("EFFNETV2_MODEL") or DEFAULT_MODEL,
                        help="local folder, Hub id org/name[@revision], or torchvision:<variant> "
                             "(default: $EFFNETV2_MODEL, else the bundled assets/model)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on: 0.0.0.0 serves your network (a Space sets it)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                        help="inference runtime for classification (auto: the fastest installed)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    print(f"loading {args.model} and warming up its runtime ({args.backend}) ...", flush=True)
    try:
        MODELS.start(args.model, args.backend)
    except (ValueError, OSError, ImportError) as err:  # the library's messages say what to do
        print(f"error: --model {args.model}: {err}", file=sys.stderr)
        return 2
    print(f"model ready in {time.perf_counter() - started:.1f} s; starting the web server ...", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False,
                max_file_size=MAX_UPLOAD_BYTES, footer_links=["api"], css=CSS, mcp_server=MCP_AVAILABLE,
                allowed_paths=[str(picture_dir())])
    return 0


if __name__ == "__main__":
    status = main()
    if status:  # a clean return must not raise SystemExit: `gradio app.py` re-runs this file in a thread
        sys.exit(status)
