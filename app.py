"""The effnetv2 demo: classify an image, and see where each attention head looks.

    python app.py                                  # the bundled shapes model (assets/model), no network
    python app.py --model org/name@v1.0            # a Hub repo, optionally at a revision
    python app.py --model torchvision:s            # torchvision's ImageNet weights (downloaded once)
    EFFNETV2_MODEL=./my-model python app.py --port 7861

Tab "Classify" gives the top-5 labels; tab "Attention" draws each head's attention over the image,
the query-by-key score matrix and the maths with this image's real tensor shapes, and a playground
with the textbook example. All three are named API endpoints (`/classify`, `/attention`, `/textbook`)
that `gradio_client` can call. Everything reusable lives in the
`effnetv2` package; this file only wires it to the UI, so copy it and change what you like.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import hashlib
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from effnetv2 import viz
from effnetv2.attention import attention_walkthrough, textbook_example
from effnetv2.images import ImageLoadError, open_image
from effnetv2.inference import BACKENDS, Predictor
from effnetv2.sources import load_model

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = str(HERE / "assets" / "model")
EXAMPLES = [str(p) for p in sorted((HERE / "assets" / "examples").glob("*"),
                                   key=lambda p: (p.name.startswith("photo_"), p.name))  # shapes first
            if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}]
TOP_K = 5
MAX_FILE_SIZE = "10mb"       # the server refuses bigger uploads before anything reads them
MAX_PIXELS = 40_000_000      # a small file can still decode to a gigapixel ("decompression bomb")
MAX_ASPECT = 20              # resizing the short side of a 1x5000 strip would make a huge tensor
SMALL_SIDE = 16              # below this the answer says little: warn, but answer
COMPUTE = "compute"          # the one concurrency group of every event that computes (model, playground)
CONCURRENCY = 2              # requests of that group computed at once: one request's forward runs while
                             # another's image decodes or its pictures encode (single-threaded work), and
                             # memory stays bounded: at most two images of MAX_PIXELS are decoded at once
QUEUE_SIZE = 64              # requests waiting beyond that are turned away with a message
PLAYGROUND = {"tokens": (1, 64), "width": (1, 4096), "heads": (1, 64), "seed": (0, 2**32 - 1)}  # inclusive
VIEW_PX = 320                # what the model sees is drawn at this size (maps and clickable grid)
POOLED, CELL = "pooled", "cell"
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]


def user_error(message: str, title: str = "Error") -> gr.Error:
    """An error shown to the user as is (no stack trace in the page or the server log)."""
    return gr.Error(message, title=title, print_exception=False)


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
    try:
        image = open_image(value, max_pixels=MAX_PIXELS)
    except ImageLoadError as err:
        reason = str(err).removeprefix(f"{value}: ")
        raise user_error(f"Could not read {name}: {reason}. Try a PNG, JPEG or WebP photo.",
                         title="Not a usable image") from None
    width, height = image.size
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise user_error(f"{name} is {width}x{height} pixels, more elongated than {MAX_ASPECT}:1: "
                         f"crop it closer to a square and try again.", title="Not a usable image")
    if min(width, height) < SMALL_SIDE:
        gr.Warning(f"{name} is only {width}x{height} pixels: it is scaled up to the model's input "
                   f"size, so the answer says little.")
    return image


def load(source: str, backend: str = "auto") -> tuple[Predictor, str]:
    """Load the model from ``source`` (see ``effnetv2.sources``) and warm up its inference backend;
    also return a one-line Markdown description of it for the page header."""
    predictor = Predictor(load_model(source), backend=backend)
    model, size = predictor.model, predictor.config["image_size"]
    predictor(torch.zeros(1, 3, size, size))  # builds the runtime's session now, not on the first request
    if source == DEFAULT_MODEL:
        source = "assets/model (bundled)"
    labels = list(predictor.id2label.values())
    shown = ", ".join(labels[:6]) + (f", … ({len(labels)} in all)" if len(labels) > 6 else "")
    pool = (f"attention pooling, {model.num_heads} heads" if model.pool_type == "attention"
            else f"average pooling (maps: {model.num_heads}-head self-attention of the features)")
    header = (f"**EfficientNetV2-{model.variant.upper()}** · {len(labels)} classes: {shown} · "
              f"input {size}×{size} · {pool} · source `{source}` · backend `{predictor.backend}`")
    return predictor, header


# ---- Classify -----------------------------------------------------------------------------------

def classify(predictor: Predictor, image) -> dict[str, float]:
    """Top-``TOP_K`` labels → probabilities for one image (what ``gr.Label`` shows)."""
    [top] = predictor.predict([read_image(image)], top_k=TOP_K)
    return {label: float(prob) for label, prob in top}


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
    except (TypeError, ValueError, OverflowError):  # None, text, NaN, infinity
        cell = None
    if cell is None or not (0 <= cell[0] < height and 0 <= cell[1] < width):
        raise user_error(f"Query cell ({row}, {col}) is outside the {height}x{width} feature grid: "
                         f"click a cell on the grid picture, or pick a row in 0..{height - 1} and a "
                         f"column in 0..{width - 1}.")
    return cell


def attention(predictor: Predictor, image, query: str = POOLED, row: float = 0, col: float = 0):
    """Per-head attention for one image: the gallery (each head and the mean, over what the model
    sees), the query-by-key score matrix as a heat map, the walk-through as Markdown, and the
    model's view with the feature grid (click it to choose a query cell)."""
    model = predictor.model
    x, view = viz.model_input(model, read_image(image))
    grid = viz.feature_grid(model, x)
    walk = attention_walkthrough(model, x, query=parse_query(query, row, col, grid))
    view = view.resize((VIEW_PX, VIEW_PX), Image.BICUBIC)
    return (viz.head_gallery(view, walk["maps"]),
            viz.score_matrix_image(walk["all_weights"], walk["query"], grid),
            viz.walkthrough_markdown(walk),
            viz.grid_image(view, grid, walk["query"]))


def pick_cell(predictor: Predictor, evt: gr.SelectData) -> tuple[str, int, int]:
    """A click at pixel ``evt.index = (x, y)`` of the grid picture → query "cell" and its (row, col)."""
    row, col = viz.cell_from_click(evt.index, (VIEW_PX, VIEW_PX), viz.feature_grid(predictor.model))
    return CELL, row, col


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

def build_demo(predictor: Predictor, header: str) -> gr.Blocks:
    """The two-tab app around ``predictor``, queue set up; the events with an ``api_name`` are the
    public API.

    Computing events run with ``preprocess=False``: the handlers get the raw upload and decode it
    with ``read_image`` (raw numbers: ``whole_number``), so a bad input is a message for the user,
    never a Gradio processing error. They share the concurrency group ``COMPUTE``, so button and
    example clicks of both tabs together compute at most ``CONCURRENCY`` requests at once.
    """
    def run_classify(image):
        return classify(predictor, image)

    def run_attention(image, query, row, col):
        return as_files(attention(predictor, image, query, row, col))

    def run_attention_example(image):
        return *as_files(attention(predictor, image)), POOLED

    def run_playground(tokens, width, heads, seed):
        return as_files(playground(tokens, width, heads, seed))

    def run_pick(evt: gr.SelectData):
        return pick_cell(predictor, evt)

    sources = ["upload", "webcam", "clipboard"]
    if predictor.model.pool_type == "attention":
        pooled_name, intro = "pooled query", (
            "The attention pool's heads each score every cell of the feature grid against a query, "
            "$\\mathrm{softmax}(QK^T/\\sqrt{d})$, and take that weighted mean of the values. The maps "
            "show those weights (they sum to 1 per head) over what the model sees. Use the pooled query "
            "(what the classifier uses), or click a cell of the grid picture to see from there.")
    else:
        pooled_name, intro = "most attended cell", (
            "This model pools by averaging, so the maps show parameter-free multi-head self-attention "
            "of its feature cells, $\\mathrm{softmax}(QK^T/\\sqrt{d})$ with Q = K = V = the "
            "standardised features: the weights (they sum to 1 per head) from one query cell. Start "
            "from the most attended cell, or click a cell of the grid picture.")
    with gr.Blocks(title="EfficientNetV2 demo", analytics_enabled=False) as demo:
        gr.Markdown("# EfficientNetV2: classify an image and see its attention")
        gr.Markdown(header, elem_id="model-header")
        with gr.Tabs():
            with gr.Tab("Classify", id="classify"):
                with gr.Row():
                    with gr.Column():
                        image = gr.Image(label="Image", type="filepath", image_mode=None, sources=sources,
                                         elem_id="classify-image")
                        button = gr.Button("Classify", variant="primary", elem_id="classify-button")
                    labels = gr.Label(num_top_classes=TOP_K, label=f"Top {TOP_K}", elem_id="classify-label")
                button.click(run_classify, image, labels, api_name="classify", preprocess=False,
                             concurrency_id=COMPUTE)
                if EXAMPLES:  # gr.Examples(fn=...) cannot join a concurrency group: run it as a next step
                    gr.Examples(EXAMPLES, inputs=image).load_input_event.then(
                        run_classify, image, labels, preprocess=False, concurrency_id=COMPUTE,
                        api_visibility="private")

            with gr.Tab("Attention", id="attention"):
                gr.Markdown(intro, latex_delimiters=LATEX)
                with gr.Row():
                    with gr.Column():
                        att_image = gr.Image(label="Image", type="filepath", image_mode=None, sources=sources,
                                             elem_id="attention-image")
                        query = gr.Radio([(pooled_name, POOLED), ("the clicked cell", CELL)], value=POOLED,
                                         label="Query", elem_id="query-mode")
                        with gr.Row():
                            row = gr.Number(0, label="row", precision=0, minimum=0, elem_id="query-row")
                            col = gr.Number(0, label="column", precision=0, minimum=0, elem_id="query-col")
                        att_button = gr.Button("Show attention", variant="primary", elem_id="attention-button")
                    grid_view = gr.Image(label="What the model sees, and its feature grid: click a cell",
                                         type="filepath", format="png", interactive=False, elem_id="grid-view")
                heads = gr.Gallery(label="Attention of each head, and their mean", columns=5, format="png",
                                   object_fit="contain", height="auto", elem_id="head-gallery")
                with gr.Row():
                    matrix = gr.Image(label="Query-by-key weights (mean over heads; rows: queries, columns: keys)",
                                      format="png", interactive=False, elem_id="score-matrix")
                    maths = gr.Markdown(latex_delimiters=LATEX, elem_id="maths")
                att_outputs = [heads, matrix, maths, grid_view]
                att_button.click(run_attention, [att_image, query, row, col], att_outputs,
                                 api_name="attention", preprocess=False, concurrency_id=COMPUTE)
                grid_view.select(run_pick, None, [query, row, col], api_visibility="private").then(
                    run_attention, [att_image, query, row, col], att_outputs, preprocess=False,
                    concurrency_id=COMPUTE, api_visibility="private")
                if EXAMPLES:
                    gr.Examples(EXAMPLES, inputs=att_image).load_input_event.then(
                        run_attention_example, att_image, att_outputs + [query], preprocess=False,
                        concurrency_id=COMPUTE, api_visibility="private")

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
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return demo


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
    demo = build_demo(predictor, header)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False,
                max_file_size=MAX_FILE_SIZE, footer_links=["api"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
