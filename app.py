"""The effnetv2 demo: classify an image, see where each attention head looks and why it chose a class.

    python app.py                                  # the bundled shapes model (assets/model), no network
    python app.py --model org/name@v1.0            # a Hub repo, optionally at a revision
    python app.py --model torchvision:s            # torchvision's ImageNet weights (downloaded once)
    EFFNETV2_MODEL=./my-model python app.py --port 7861
    gradio app.py                                  # reload mode: edits re-run this file ($EFFNETV2_MODEL)

Tab "Classify" gives the top-5 labels; tab "Attention" answers "why this class?": where each head
looks, what each head adds to the chosen class (signed, exact), Grad-CAM beside it, how faithful each
map is (deletion AUC), the query-by-key score matrix, the maths with this image's real tensor shapes,
and a playground with the textbook example. The named API endpoints (`/classify`, `/attention`,
`/explain`, `/textbook`) can be called with `gradio_client`, and with Gradio's `mcp` extra installed
`python app.py` is also an MCP server (tools `classify`, `attention`, `explain`, `textbook`).
Everything reusable lives in the `effnetv2` package; this file only wires it to the UI, so copy it
and change what you like.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import hashlib
import importlib.util
import io
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Callable

import gradio as gr
import torch
from gradio.utils import get_upload_folder
from PIL import Image

from effnetv2 import explain as attribution
from effnetv2 import viz
from effnetv2.attention import check_cell
from effnetv2.images import MAX_UPLOAD_BYTES, UnusableImageError, confined_file, open_request_image
from effnetv2.inference import BACKENDS, Predictor
from effnetv2.sources import load_model
from effnetv2.walkthrough import attention_walkthrough, textbook_example

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = str(HERE / "assets" / "model")
IMAGENET = "torchvision:s"   # the model picker's second model, for real photos: loaded on first use
EXAMPLES = [str(p) for p in sorted((HERE / "assets" / "examples").glob("*"),
                                   key=lambda p: (p.name.startswith("photo_"), p.name))  # shapes first
            if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}]
PHOTOS = [path for path in EXAMPLES if Path(path).name.startswith("photo_")]  # out of the bundled model's world
TOP_K = 5
COMPUTE = "compute"          # the one concurrency group of every event that computes (model, playground)
CONCURRENCY = 2              # requests of that group computed at once: one request's forward runs while
                             # another's image decodes or its pictures encode (single-threaded work), and
                             # memory stays bounded: at most two images of MAX_REQUEST_PIXELS (effnetv2.images) at once
QUEUE_SIZE = 64              # requests waiting beyond that are turned away with a message
PLAYGROUND = {"tokens": (1, 64), "width": (1, 4096), "heads": (1, 64), "seed": (0, 2**32 - 1)}  # inclusive
VIEW_PX = 320                # the clickable grid picture: what the model sees, drawn at this size
MAP_PX = 176                 # each map of a gallery: five in a row at 1280 px keep labels >= 10 px
UNSURE_BELOW = 0.95          # a top probability under this gets "this model knows only ...":
                             # benchmarks/ood_threshold.py, bundled model: 3.1% of 1000 shapes of an unseen
                             # seed fall under it, and 100% of noise, 63% of smooth colour fields, both photos
LISTED_CLASSES = 20          # ... for a model of at most this many classes (ImageNet's 1000 cover most photos,
                             # and a list of them would say nothing)
ATTENTION, ATTRIBUTION, GRADCAM = "attention", "attribution", "gradcam"  # the tab's views
PREDICTED = ""               # the class selector's "the predicted class"
LEGENDS = {ATTENTION: "Each head's attention weights over the image (each map sums to 1; its own scale).",
           ATTRIBUTION: "What each head adds to the class score, cell by cell: red pushes towards the class, "
                        "blue against (one colour scale for all).",
           GRADCAM: "Grad-CAM (left) against the class attribution of all heads (right): drag the slider."}
MCP_AVAILABLE = importlib.util.find_spec("mcp") is not None  # Gradio's `mcp` extra: serve the API as MCP tools
POOLED, CELL = "pooled", "cell"
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]


def user_error(message: str, title: str = "Error") -> gr.Error:
    """An error shown to the user as is (no stack trace in the page or the server log)."""
    return gr.Error(message, title=title, print_exception=False)


NOT_UPLOADED = "This app reads only images uploaded to it: upload the image (or give its URL) and try again."


def uploaded_file(path) -> Path:
    """The file a request names, resolved, if it is an upload (in Gradio's upload folder) or one of
    ``EXAMPLES``. With ``preprocess=False`` Gradio checks only values marked as files (``"meta"``), so
    this is the check for every value: anything else, existing or not, gets the one ``NOT_UPLOADED``."""
    file = confined_file(path, [get_upload_folder()], EXAMPLES)
    if file is None:
        raise user_error(NOT_UPLOADED, title="Image not uploaded")
    return file


def read_image(value) -> Image.Image:
    """Whatever the UI or an API client sent (upload payload, path, PIL image) → an RGB PIL image.

    The image events run with ``preprocess=False`` so that Gradio never decodes an upload itself:
    every problem goes through ``effnetv2.images.open_image`` and becomes a message for the user.
    """
    if isinstance(value, dict):
        value = value.get("path")
    if value is None:
        raise user_error("No image yet: upload one, paste one, take a photo, or click an example.",
                         title="No image")
    name = Path(value).name if isinstance(value, (str, os.PathLike)) else "the image"
    if not isinstance(value, Image.Image):  # an in-process caller's picture opens no file
        value = uploaded_file(value)
    try:
        image, warning = open_request_image(value, name)  # the limits of effnetv2.images, as effnetv2.serve's
    except UnusableImageError as err:
        raise user_error(str(err), title="Not a usable image") from None
    if warning:
        gr.Warning(warning)
    return image


def load(source: str, backend: str = "auto") -> tuple[Predictor, str]:
    """Load the model from ``source`` (see ``effnetv2.sources``) and warm up its inference backend;
    also return a one-line Markdown description of it for the page header."""
    predictor = Predictor(load_model(source), backend=backend)
    model, size = predictor.model, predictor.config["image_size"]
    predictor(torch.zeros(1, 3, size, size))  # builds the runtime's session now, not on the first request
    if source == DEFAULT_MODEL:
        source = "assets/model (bundled)"
    elif source == IMAGENET:
        source = f"{IMAGENET} (ImageNet weights of torchvision)"
    labels = list(predictor.id2label.values())
    shown = ", ".join(labels[:6]) + (f", … ({len(labels)} in all)" if len(labels) > 6 else "")
    pool = (f"attention pooling, {model.num_heads} heads" if model.pool_type == "attention"
            else f"average pooling (maps: {model.num_heads}-head self-attention of the features)")
    header = (f"**EfficientNetV2-{model.variant.upper()}** · {len(labels)} classes: {shown} · "
              f"input {size}×{size} · {pool} · source `{source}` · backend `{predictor.backend}`")
    return predictor, header


LOAD_TIMEOUT_S = 180   # the longest wait for another model to load; a load that takes longer counts as failed
LOAD_WAITERS = CONCURRENCY - 1  # computing requests that may wait for a load: the other slot serves loaded models
RETRY_AFTER_S = 60     # a failed load is remembered this long: requests meanwhile are answered without a retry
logger = logging.getLogger("effnetv2.app")


class Models:
    """The app's models by the picker's value: the one it started with (``main``), and ImageNet
    EfficientNetV2-S, loaded on the first request for it (torch backend: no export to wait for).

    A load runs in a thread of its own, so a slow or hung download never holds up the loaded models: the
    picker (an event of its own) waits for it, and of the computing requests only ``LOAD_WAITERS`` at a
    time, each in its compute slot; the others are told at once to come back. A load is given up after
    ``LOAD_TIMEOUT_S``; a failure is logged with its details (paths, settings) and remembered for
    ``RETRY_AFTER_S``; visitors are told that it failed, not why.
    """

    def __init__(self, predictor: Predictor, header: str, source: str | None = None):
        self.main = "assets/model" if source in (None, DEFAULT_MODEL) else source
        classes = len(predictor.id2label)
        self.choices = [(f"{self.main} ({classes} classes)", self.main)]
        if self.main != IMAGENET:
            self.choices.append(("ImageNet EfficientNetV2-S (torchvision weights, 1000 classes; "
                                 "downloaded on first use)", IMAGENET))
        self._loaded = {self.main: (predictor, header)}
        self._loading: dict[str, tuple[Future, float]] = {}  # name → its load, and when it started
        self._failed: dict[str, float] = {}  # name → when its last load failed
        self._lock = threading.Lock()  # two first requests at once start one load
        self._waiters = threading.BoundedSemaphore(max(0, LOAD_WAITERS))

    def get(self, name: str | None, wait_s: float | None = None) -> tuple[Predictor, str]:
        """The predictor and header of model ``name`` (empty: ``main``), waiting up to ``wait_s`` for it
        to load (``None``: a computing request's wait, see the class); a message if it cannot be had now."""
        name = name or self.main
        if name in self._loaded:
            return self._loaded[name]
        if name not in [value for _, value in self.choices]:
            raise user_error(f"Unknown model {name!r}: choose "
                             f"{' or '.join(repr(value) for _, value in self.choices)}.", title="Unknown model")
        future, started = self._start(name)
        left = max(0.0, started + LOAD_TIMEOUT_S - time.monotonic())
        if wait_s is not None:
            wait([future], timeout=min(wait_s, left))
        elif self._waiters.acquire(blocking=False):
            try:
                wait([future], timeout=left)
            finally:
                self._waiters.release()
        done = future.done()
        if done and future.exception() is None:
            return future.result()
        if not done and time.monotonic() - started < LOAD_TIMEOUT_S:
            raise user_error(f"{name} is loading (its weights are downloaded on first use): try again in a minute.",
                             title="Model loading")
        raise self._unavailable(name)

    def _start(self, name: str) -> tuple[Future, float]:
        """The load of ``name`` under way, started now unless one runs; refused while a failure is remembered."""
        with self._lock:
            failed = self._failed.get(name)
            if failed is not None and time.monotonic() - failed < RETRY_AFTER_S:
                raise self._unavailable(name)
            if name not in self._loading:
                future = Future()
                threading.Thread(target=self._load, args=(name, future), name=f"load {name}", daemon=True).start()
                self._loading[name] = future, time.monotonic()
            return self._loading[name]

    def _load(self, name: str, future: Future) -> None:
        try:
            loaded = load(name, backend="torch")
        except Exception as err:  # noqa: BLE001 -- whatever broke, the server keeps serving its own model
            logger.error("could not load model %s: %s", name, err,  # the why, for whoever runs the server
                         exc_info=not isinstance(err, (ValueError, OSError, ImportError)))  # unforeseen: where
            with self._lock:
                self._failed[name] = time.monotonic()
                del self._loading[name]
            future.set_exception(err)
            return
        with self._lock:
            self._loaded[name] = loaded
            del self._loading[name]
        future.set_result(loaded)

    @staticmethod
    def _unavailable(name: str) -> gr.Error:
        return user_error(f"{name} could not be loaded on this server (its log says why); it is tried again "
                          f"in a minute. Meanwhile use the app's own model.", title="Model not available")


# ---- Classify -----------------------------------------------------------------------------------

def classify(predictor: Predictor, image) -> dict[str, float]:
    """Top-``TOP_K`` labels → probabilities for one image (what ``gr.Label`` shows)."""
    [top] = predictor.predict([read_image(image)], top_k=TOP_K)
    return {label: float(prob) for label, prob in top}


def unsure_note(top_prob: float, labels: list[str]) -> str:
    """A warning in Markdown when the top probability is under ``UNSURE_BELOW`` (the image is likely
    none of the model's classes, listed when there are at most ``LISTED_CLASSES``), else ``""``."""
    if top_prob >= UNSURE_BELOW or len(labels) > LISTED_CLASSES:
        return ""
    return (f"**Unsure ({top_prob:.0%}).** This model knows only {len(labels)} classes: "
            f"{', '.join(labels)}. An image of anything else still gets one of them.")


# ---- Attention ----------------------------------------------------------------------------------

def parse_query(query: str, row, col, grid: tuple[int, int]) -> tuple[int, int] | None:
    """The UI's query choice → ``None`` (pooled query) or a checked ``(row, col)`` grid cell."""
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


def attention(predictor: Predictor, image, query: str = POOLED, row: float = 0, col: float = 0):
    """Per-head attention for one image: the gallery (each head and the mean, over what the model
    sees), the query-by-key score matrix as a heat map, the walk-through as Markdown, and the
    model's view with the feature grid (click it to choose a query cell)."""
    model = predictor.model
    x, view = viz.model_input(model, read_image(image))
    grid = viz.feature_grid(model, x)
    walk = attention_walkthrough(model, x, query=parse_query(query, row, col, grid))
    return (viz.head_gallery(view.resize((MAP_PX, MAP_PX), Image.BICUBIC), walk["maps"]),
            viz.score_matrix_image(walk["all_weights"], walk["query"], grid),
            viz.walkthrough_markdown(walk),
            viz.grid_image(view.resize((VIEW_PX, VIEW_PX), Image.BICUBIC), grid, walk["query"]))


def pick_cell(predictor: Predictor, evt: gr.SelectData) -> tuple[str, int, int]:
    """A click at pixel ``evt.index = (x, y)`` of the grid picture → query "cell" and its (row, col)."""
    row, col = viz.cell_from_click(evt.index, (VIEW_PX, VIEW_PX), viz.feature_grid(predictor.model))
    return CELL, row, col


# ---- Why this class? ----------------------------------------------------------------------------

def target_class(labels: list[str], class_name: str | None, probs: torch.Tensor) -> int:
    """The class selector's value (a label, or empty for the predicted class) → its index."""
    if not class_name:
        return int(probs.argmax())
    if class_name not in labels:
        raise user_error(f"Unknown class {class_name!r}: choose one of {', '.join(labels)}, "
                         f"or leave it empty for the predicted class.", title="Unknown class")
    return labels.index(class_name)


def explain(predictor: Predictor, image, class_name: str | None = PREDICTED):
    """Why ``class_name`` (default: the predicted class) for one image.

    Returns the attribution gallery (each head's signed share of the class logit, and their sum),
    the per-head totals (a bar chart's table: head, contribution), the faithfulness of each map kind in Markdown
    (deletion AUC against a random map's, and what removing the top cells does, in words), the
    (Grad-CAM, attribution) pair for the slider, and the class explained.
    """
    model = predictor.model
    labels = list(predictor.id2label.values())
    x, view = viz.model_input(model, read_image(image))
    with torch.no_grad():
        probs = model.eval()(x).softmax(-1)[0]
    target = target_class(labels, class_name, probs)
    label = labels[target]
    shares = attribution.class_attribution(model, x, target)[0]  # [heads, h, w]
    with torch.no_grad():
        looks = model.attention_maps(x)[0]
    cam = attribution.gradcam(model, x, target)[0]  # [1, h, w]
    random = torch.rand(shares.shape[-2:], generator=torch.Generator().manual_seed(0))
    kinds = {"class attribution": shares.sum(0), "attention (mean of heads)": looks.mean(0),
             "Grad-CAM": cam[0], "random map": random}
    found = attribution.removal_curves(model, x, {kind: m[None, None] for kind, m in kinds.items()}, target)
    curves = [found[kind]["deletion"][0] for kind in kinds]  # one forward pass for every map
    aucs = [attribution.curve_auc(curve) for curve in curves]
    small = view.resize((MAP_PX, MAP_PX), Image.BICUBIC)
    gallery = viz.attribution_gallery(small, shares, label)
    heads = [f"head {i + 1}" for i in range(len(shares))] if len(shares) > 1 else ["all cells"]
    totals = bar_chart(heads, shares.sum((1, 2)).tolist(), "head", "contribution")
    random_auc = float(aucs[-1])
    quarter = max(1, curves[0].shape[-1] // 4)  # a quarter of the cells: a tenth of a small grid changes little
    rows = [f"| {kind} | {float(auc):.3f} | {attribution.deletion_summary(curve, label, quarter)} |"
            for kind, auc, curve in zip(kinds, aucs, curves)]
    choice = "predicted" if target == int(probs.argmax()) else f"chosen; predicted: {labels[int(probs.argmax())]}"
    note = unsure_note(float(probs.max()), labels)
    faithfulness = "\n".join([
        f"**Why {label}?** P({label}) = {float(probs[target]):.2f} ({choice}).", *([note] if note else []),
        "", f"Deletion AUC: the mean P({label}) as the cells each map ranks first are removed; lower "
        f"is more faithful. The random map's {random_auc:.3f} is the bar to beat.", "",
        "| map | deletion AUC | removing its top cells |", "|---|---|---|", *rows])
    pair = (viz.with_colorbar(viz.overlay(small, cam[0].numpy()), 0.0, float(cam.max())), gallery[-1][0])
    return gallery, totals, faithfulness, pair, label


def bar_chart(names: list[str], values: list[float], x: str, y: str) -> dict:
    """A ``gr.BarPlot`` value of one bar per name, in Gradio's wire format (what it makes of a pandas
    DataFrame, so this file needs no pandas): API clients get the numbers as a table."""
    return {"columns": [x, y], "data": [[name, float(value)] for name, value in zip(names, values)],
            "datatypes": {x: "nominal", y: "quantitative"}, "mark": "bar"}


def view_choices(label: str | None = None) -> list[tuple[str, str]]:
    """The view switch's choices, naming the class once one is explained."""
    name = label or "the class"
    return [("where each head looks", ATTENTION), (f"what each head adds to {name}", ATTRIBUTION),
            ("Grad-CAM against the attribution (slider)", GRADCAM)]


# ---- Textbook playground ------------------------------------------------------------------------

def whole_number(value, name: str) -> int:
    """A playground field's raw value (the event skips Gradio's preprocessing, which fails on
    infinity) → a whole number within ``PLAYGROUND[name]``, else a message naming the field."""
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
    """The textbook example: ``tokens`` random tokens of ``width`` channels in ``heads`` heads →
    each head's score matrix (gallery) and the shapes at each step (Markdown)."""
    tokens, width, heads, seed = (whole_number(value, name)
                                  for value, name in zip((tokens, width, heads, seed), PLAYGROUND))
    try:
        example = textbook_example(tokens, width, heads, seed=seed)
    except ValueError as err:
        raise user_error(str(err), title="Check the sizes") from None
    return viz.textbook_gallery(example), viz.textbook_markdown(example)


# ---- Pictures to serve --------------------------------------------------------------------------

@functools.cache
def picture_dir() -> Path:
    """This process's folder of served pictures (in the system temp folder, where Gradio may read)."""
    folder = Path(tempfile.mkdtemp(prefix="effnetv2-app-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def picture_file(image: Image.Image) -> str:
    """``image`` as a PNG file in :func:`picture_dir`, named by its content and never rewritten.

    Returned PIL images would go through Gradio's ``save_pil_to_cache``, which rewrites the cached
    file in place (truncate, then write) while another request for the same picture may be streaming
    it: that response ends short. A new file is written under a temporary name and renamed into
    place, so whoever opens the name gets a complete file; Gradio copies a returned path into its
    cache the same way.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="png", compress_level=1)  # 4x faster than the default 6, files 20% larger
    data = buffer.getvalue()
    path = picture_dir() / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not path.exists():
        fd, staging = tempfile.mkstemp(dir=path.parent, suffix=".part")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(staging, path)
    return str(path)


def as_files(outputs):
    """An event's outputs with every PIL image (also inside gallery lists of (image, caption)) → a
    :func:`picture_file` path."""
    if isinstance(outputs, Image.Image):
        return picture_file(outputs)
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(as_files(value) for value in outputs)
    return outputs


# ---- The page -----------------------------------------------------------------------------------
# Computing events run with ``preprocess=False``: the handlers get the raw upload and decode it with
# ``read_image`` (raw numbers: ``whole_number``), so a bad input is a message for the user, never a
# Gradio processing error. They share the concurrency group ``COMPUTE``, so button and example clicks
# of all tabs together compute at most ``CONCURRENCY`` requests at once. Events with an ``api_name``
# are the public API (and MCP tools, named after their handler); the rest are private.

SOURCES = ["upload", "webcam", "clipboard"]
CSS = """
#head-gallery .gallery-item, #attribution-gallery .gallery-item {height: auto !important;}
#head-gallery .thumbnail-item, #attribution-gallery .thumbnail-item {aspect-ratio: auto !important;
  height: auto !important; display: flex; flex-direction: column;}
#head-gallery .caption-label, #attribution-gallery .caption-label {position: static !important;
  white-space: normal; max-width: 100%; border: none;}
#head-gallery img, #attribution-gallery img {object-fit: contain !important; height: auto !important;}
"""


def named(name: str):
    """Name a handler: Gradio's MCP server lists an endpoint as a tool named after its function."""
    def rename(fn):
        fn.__name__ = fn.__qualname__ = name
        return fn
    return rename


def examples(image: gr.Image) -> list:
    """The example images under ``image``, shapes and photos apart; returns their load events, to chain
    the computing step on (gr.Examples(fn=...) cannot join a concurrency group)."""
    sets = (("Shapes: what the bundled model knows", [p for p in EXAMPLES if p not in PHOTOS]),
            ("Photos: outside the bundled model's five shapes", PHOTOS))
    return [gr.Examples(paths, inputs=image, label=label).load_input_event for label, paths in sets if paths]


def classify_tab(models: Models, picker: gr.Dropdown) -> gr.Image:
    """Tab "Classify": an image → the top-``TOP_K`` labels, and a note when the model is unsure.
    Returns its image input."""
    @named("classify")
    def run_classify(image, model):
        """Classify an image with EfficientNetV2: the top-5 labels with their probabilities.

        Args:
            image: the image to classify (PNG, JPEG or WebP; URL or file).
            model: the app's own model (the default), or "torchvision:s" for ImageNet EfficientNetV2-S.
        Returns:
            the most likely label and the top-5 labels with their probabilities (they sum to at most 1).
        """
        return classify(models.get(model)[0], image)

    def note(result, model):
        return unsure_note(max(result.values(), default=1.0), list(models.get(model)[0].id2label.values()))

    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Image", type="filepath", image_mode=None, sources=SOURCES,
                             elem_id="classify-image", height=300)
            button = gr.Button("Classify", variant="primary", elem_id="classify-button")
        with gr.Column():
            labels = gr.Label(num_top_classes=TOP_K, label=f"Top {TOP_K}", elem_id="classify-label")
            warning = gr.Markdown(elem_id="classify-note")
    button.click(run_classify, [image, picker], labels, api_name="classify", preprocess=False,
                 concurrency_id=COMPUTE)
    for loaded in examples(image):
        loaded.then(run_classify, [image, picker], labels, preprocess=False, concurrency_id=COMPUTE,
                    api_visibility="private")
    # No progress timer on the note: it would flash "0.0s" under every answer.
    labels.change(note, [labels, picker], warning, queue=False, show_progress="hidden", api_visibility="private")
    return image


def class_choices(predictor: Predictor) -> list[tuple[str, str]]:
    """The class selector's choices: the predicted class, then every label of the model."""
    return [("the predicted class", PREDICTED), *((label, label) for label in predictor.id2label.values())]


def query_choices(model) -> list[tuple[str, str]]:
    """The query switch's choices: the pooled query (attention pool) or the most attended cell, and a clicked cell."""
    return [("pooled query" if model.pool_type == "attention" else "most attended cell", POOLED),
            ("the clicked cell", CELL)]


def attention_tab(models: Models, picker: gr.Dropdown) -> tuple[gr.Image, list, Callable]:
    """Tab "Attention": why this class? The views (where each head looks, what each head adds to the
    class, Grad-CAM on a slider), faithfulness, per-head totals, then the score matrix and the maths
    from a query cell picked on the grid. Returns its image input, and the components that follow
    the picked model with the function giving their new values (from a predictor)."""
    predictor = models.get(models.main)[0]

    @named("attention")
    def run_attention(image, query, row, col, model):
        """Where each attention head of the model looks in an image.

        Args:
            image: the image (PNG, JPEG or WebP; URL or file).
            query: "pooled" for the classifier's query, or "cell" for the token at grid cell (row, col).
            row: the query cell's row in the feature grid (used when query is "cell").
            col: the query cell's column in the feature grid (used when query is "cell").
            model: the app's own model (the default), or "torchvision:s" for ImageNet EfficientNetV2-S.
        Returns:
            one attention map per head and their mean (with peak weights), the query-by-key weight
            matrix, the maths with this image's tensor shapes, and the feature grid drawn on the image.
        """
        return as_files(attention(models.get(model)[0], image, query, row, col))

    def run_attention_example(image, model):
        return *as_files(attention(models.get(model)[0], image)), POOLED

    @named("explain")
    def run_explain(image, class_name, model):
        """Why the model gives an image a class: each attention head's exact signed share of the
        class score over the image, and how faithful that map is.

        Args:
            image: the image (PNG, JPEG or WebP; URL or file).
            class_name: one of the model's class names, or "" for the predicted class.
            model: the app's own model (the default), or "torchvision:s" for ImageNet EfficientNetV2-S.
        Returns:
            the attribution pictures (one per head and their sum; red pushes towards the class, blue
            against), each head's total contribution to the class score, the faithfulness table
            (deletion AUC of each map kind against a random map's, lower is better), and the
            Grad-CAM / attribution pair.
        """
        return explain_and_name(image, class_name, model)[:4]

    def explain_and_name(image, class_name, model):  # the UI's: also the class, to name the view after it
        gallery, totals, faithfulness, pair, label = explain(models.get(model)[0], image, class_name)
        return as_files(gallery), totals, faithfulness, as_files(pair), label

    def show_view(view):
        return LEGENDS[view], *(gr.update(visible=view == name) for name in (ATTENTION, ATTRIBUTION, GRADCAM))

    def name_views(label, view):
        return gr.Radio(choices=view_choices(label), value=view)

    def pick(model, evt: gr.SelectData):
        return pick_cell(models.get(model)[0], evt)

    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            image = gr.Image(label="Image", type="filepath", image_mode=None, sources=SOURCES,
                             elem_id="attention-image", height=200)
            target = gr.Dropdown(class_choices(predictor), value=PREDICTED, label="Why this class?",
                                 elem_id="class-choice")
            view = gr.Radio(view_choices(), value=ATTRIBUTION, label="View", elem_id="view-choice")
            button = gr.Button("Explain", variant="primary", elem_id="attention-button")
            example_loads = examples(image)
        with gr.Column(scale=3):
            legend = gr.Markdown(LEGENDS[ATTRIBUTION], elem_id="view-legend")
            gallery = dict(columns=5, format="png", object_fit="contain", height=360, show_label=False,
                           buttons=["fullscreen"])
            heads = gr.Gallery(label="Attention of each head, and their mean", elem_id="head-gallery",
                               visible=False, **gallery)
            shares = gr.Gallery(label="What each head adds to the class", elem_id="attribution-gallery", **gallery)
            slider = gr.ImageSlider(label="Grad-CAM (left) against the class attribution of all heads (right)",
                                    type="filepath", format="png", elem_id="gradcam-slider", visible=False,
                                    max_height=360, show_label=False)
            with gr.Row():
                with gr.Column(scale=3):
                    faithfulness = gr.Markdown(elem_id="faithfulness")
                with gr.Column(scale=2):
                    totals = gr.BarPlot(x="head", y="contribution", label="Each head's total contribution",
                                        height=220, elem_id="head-totals", sort=None)
    explained = gr.State()
    with gr.Accordion("How the attention is computed: query cell, score matrix, maths", open=True):
        intro = gr.Markdown(intro_text(predictor.model), latex_delimiters=LATEX)
        with gr.Row():
            with gr.Column(scale=1):
                query = gr.Radio(query_choices(predictor.model), value=POOLED, label="Query", elem_id="query-mode")
                with gr.Row(visible=False) as cell_inputs:
                    row = gr.Number(0, label="row", precision=0, minimum=0, elem_id="query-row")
                    col = gr.Number(0, label="column", precision=0, minimum=0, elem_id="query-col")
                gr.Markdown("**What the model sees, and its feature grid**: click a cell")
                grid_view = gr.Image(show_label=False, type="filepath", format="png", interactive=False,
                                     elem_id="grid-view", buttons=[])
            with gr.Column(scale=1):
                gr.Markdown("**Query-by-key weights** (mean over heads)")
                matrix = gr.Image(show_label=False, format="png", interactive=False, elem_id="score-matrix",
                                  buttons=[])
            maths = gr.Markdown(latex_delimiters=LATEX, elem_id="maths")

    att_outputs = [heads, matrix, maths, grid_view]
    explain_outputs = [shares, totals, faithfulness, slider]  # no State: Gradio's MCP server mishandles one

    def then_explain(event):
        return event.then(explain_and_name, [image, target, picker], [*explain_outputs, explained], preprocess=False,
                          concurrency_id=COMPUTE, api_visibility="private").then(
            name_views, [explained, view], view, queue=False, api_visibility="private")

    explain_button = gr.Button(visible=False)  # /explain on its own: image and class → why (registered first: it gets the name)
    explain_button.click(run_explain, [image, target, picker], explain_outputs, api_name="explain",
                         preprocess=False, concurrency_id=COMPUTE)
    then_explain(button.click(run_attention, [image, query, row, col, picker], att_outputs, api_name="attention",
                              preprocess=False, concurrency_id=COMPUTE))
    view.change(show_view, view, [legend, heads, shares, slider], queue=False, api_visibility="private")
    query.change(lambda q: gr.Row(visible=q == CELL), query, cell_inputs, queue=False,
                 api_visibility="private")
    grid_view.select(pick, picker, [query, row, col], api_visibility="private").then(
        run_attention, [image, query, row, col, picker], att_outputs, preprocess=False,
        concurrency_id=COMPUTE, api_visibility="private")
    for loaded in example_loads:
        then_explain(loaded.then(run_attention_example, [image, picker], att_outputs + [query], preprocess=False,
                                 concurrency_id=COMPUTE, api_visibility="private"))

    def follow(picked: Predictor) -> list:  # another model: its classes, its query, its maths
        return [gr.Dropdown(choices=class_choices(picked), value=PREDICTED),
                gr.Radio(choices=query_choices(picked.model), value=POOLED), intro_text(picked.model)]
    return image, [target, query, intro], follow


def intro_text(model) -> str:
    """What the attention maps show, for this model's pool type (Markdown with LaTeX)."""
    if model.pool_type == "attention":
        return ("The attention pool's heads each score every cell of the feature grid against a query, "
                "$\\mathrm{softmax}(QK^T/\\sqrt{d})$, and take that weighted mean of the values. The maps "
                "show those weights (they sum to 1 per head) over what the model sees. Use the pooled query "
                "(what the classifier uses), or click a cell of the grid picture to see from there.")
    return ("This model pools by averaging, so the maps show parameter-free multi-head self-attention "
            "of its feature cells, $\\mathrm{softmax}(QK^T/\\sqrt{d})$ with Q = K = V = the "
            "standardised features: the weights (they sum to 1 per head) from one query cell. Start "
            "from the most attended cell, or click a cell of the grid picture.")


def playground_section() -> None:
    """The textbook example, in an accordion: token count, width, heads and seed → each head's scores."""
    @named("textbook")
    def run_playground(tokens, width, heads, seed):
        """The textbook multi-head attention example: random tokens split into heads.

        Args:
            tokens: number of tokens (1 to 64).
            width: channels per token (1 to 4096, divisible by heads).
            heads: number of heads (1 to 64).
            seed: random seed (0 to 4294967295).
        Returns:
            each head's score matrix, and the tensor shapes at each step.
        """
        return as_files(playground(tokens, width, heads, seed))

    with gr.Accordion("Playground: the textbook example", open=False):
        gr.Markdown("A sequence of tokens of some width, split into heads: each head scores "
                    "every token against every other. Change the sizes.")
        with gr.Row():
            numbers = [gr.Number(value, label=name, precision=0, minimum=low, maximum=high)
                       for value, (name, (low, high)) in zip((3, 768, 12, 0), PLAYGROUND.items())]
            play = gr.Button("Run")
        play_gallery = gr.Gallery(label="Score matrix of each head", columns=6, format="png")
        play_maths = gr.Markdown(latex_delimiters=LATEX)
    play.click(run_playground, numbers, [play_gallery, play_maths], api_name="textbook",
               preprocess=False, concurrency_id=COMPUTE)


def build_demo(predictor: Predictor, header: str, source: str | None = None) -> gr.Blocks:
    """The app around ``predictor`` (loaded from ``source``) and the model picker: the tabs, an image
    given in one tab shown in the other, and the queue set up."""
    models = Models(predictor, header, source)

    def switch(name):
        """The picked model (loaded now if need be; back to the app's own if it cannot be had)."""
        try:
            picked, text = models.get(name, wait_s=LOAD_TIMEOUT_S)  # its own event: no compute slot held
        except gr.Error as err:
            gr.Warning(err.message, title=err.title)
            name, (picked, text) = models.main, models.get(models.main)
        return name, text, *follow(picked)

    with gr.Blocks(title="EfficientNetV2 demo", analytics_enabled=False) as demo:
        gr.Markdown("# EfficientNetV2: classify an image and see why")
        with gr.Row():
            model_header = gr.Markdown(header, elem_id="model-header")
            picker = gr.Dropdown(models.choices, value=models.main, label="Model", elem_id="model-choice",
                                 visible=len(models.choices) > 1, scale=0, min_width=360)
        with gr.Tabs():
            with gr.Tab("Classify", id="classify"):
                classify_image = classify_tab(models, picker)
            with gr.Tab("Attention", id="attention"):
                attention_image, following, follow = attention_tab(models, picker)
                playground_section()
        for image, other in ((classify_image, attention_image), (attention_image, classify_image)):
            image.input(None, image, other, js="(image) => image", api_visibility="private")
        picker.input(switch, picker, [picker, model_header, *following], api_visibility="private")
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return demo


@functools.cache
def default_demo() -> gr.Blocks:
    """The app around $EFFNETV2_MODEL, else the bundled model (built once, on first use)."""
    source = os.environ.get("EFFNETV2_MODEL") or DEFAULT_MODEL
    return build_demo(*load(source), source)


def __getattr__(name: str):
    """``app.demo`` is :func:`default_demo`, built on first access: `gradio app.py` (reload mode) finds
    it as in Gradio's examples, and importing this module (tests) loads no model."""
    if name == "demo":
        return default_demo()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    try:
        predictor, header = load(args.model, args.backend)
    except (ValueError, OSError, ImportError) as err:  # the library's messages say what to do
        print(f"error: --model {args.model}: {err}", file=sys.stderr)
        return 2
    global demo  # what `gradio app.py` (reload mode) swaps in when this file runs again
    demo = build_demo(predictor, header, args.model)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False,
                max_file_size=MAX_UPLOAD_BYTES, footer_links=["api"], css=CSS,
                mcp_server=MCP_AVAILABLE)
    return 0


if __name__ == "__main__":
    status = main()
    if status:  # a clean return must not raise SystemExit: `gradio app.py` re-runs this file in a thread
        sys.exit(status)
