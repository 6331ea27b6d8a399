"""The effnetv2 demo: classify an image, and see where each attention head looks.

    python app.py                                  # the bundled shapes model (assets/model), no network
    python app.py --model org/name@v1.0            # a Hub repo, optionally at a revision
    python app.py --model torchvision:s            # torchvision's ImageNet weights (downloaded once)
    EFFNETV2_MODEL=./my-model python app.py --port 7861

Tab "Classify" gives the top-5 labels; tab "Attention" draws each head's attention over the image,
the query-by-key score matrix and the maths with this image's real tensor shapes. Both are named API
endpoints (`/classify`, `/attention`) that `gradio_client` can call. Everything reusable lives in the
`effnetv2` package; this file only wires it to the UI, so copy it and change what you like.
"""
from __future__ import annotations

import argparse
import os
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
CONCURRENCY = 1              # requests of one event computed at once: the runtime already uses every
                             # core for one image, and an OpenVINO infer request serves one thread
QUEUE_SIZE = 64              # requests waiting beyond that are turned away with a message
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
    except (TypeError, ValueError):
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

def playground(tokens: float, width: float, heads: float, seed: float):
    """The textbook example: ``tokens`` random tokens of ``width`` channels in ``heads`` heads →
    each head's score matrix (gallery) and the shapes at each step (Markdown)."""
    try:
        example = textbook_example(int(tokens), int(width), int(heads), seed=int(seed))
    except ValueError as err:
        raise user_error(str(err), title="Check the sizes") from None
    return viz.textbook_gallery(example), viz.textbook_markdown(example)


# ---- The page -----------------------------------------------------------------------------------

def build_demo(predictor: Predictor, header: str) -> gr.Blocks:
    """The two-tab app around ``predictor``; the events with an ``api_name`` are the public API.

    Image events run with ``preprocess=False``: the handlers get the raw upload and decode it with
    ``read_image``, so a bad file is a message for the user, never a Gradio processing error.
    """
    def run_classify(image):
        return classify(predictor, image)

    def run_attention(image, query, row, col):
        return attention(predictor, image, query, row, col)

    def run_attention_example(image):
        return *attention(predictor, image), POOLED

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
                button.click(run_classify, image, labels, api_name="classify", preprocess=False)
                if EXAMPLES:
                    gr.Examples(EXAMPLES, inputs=image, outputs=labels, fn=run_classify,
                                run_on_click=True, cache_examples=False)

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
                                 api_name="attention", preprocess=False)
                grid_view.select(run_pick, None, [query, row, col], api_visibility="private").then(
                    run_attention, [att_image, query, row, col], att_outputs, preprocess=False,
                    api_visibility="private")
                if EXAMPLES:
                    gr.Examples(EXAMPLES, inputs=att_image, outputs=att_outputs + [query],
                                fn=run_attention_example, run_on_click=True, cache_examples=False)

                with gr.Accordion("Playground: the textbook example", open=False):
                    gr.Markdown("A sequence of tokens of some width, split into heads: each head scores "
                                "every token against every other. Change the sizes.")
                    with gr.Row():
                        n_tokens = gr.Number(3, label="tokens", precision=0, minimum=1, maximum=64)
                        n_width = gr.Number(768, label="width", precision=0, minimum=1, maximum=4096)
                        n_heads = gr.Number(12, label="heads", precision=0, minimum=1, maximum=64)
                        n_seed = gr.Number(0, label="seed", precision=0)
                        play = gr.Button("Run")
                    play_gallery = gr.Gallery(label="Score matrix of each head", columns=6, format="png")
                    play_maths = gr.Markdown(latex_delimiters=LATEX)
                    play.click(playground, [n_tokens, n_width, n_heads, n_seed], [play_gallery, play_maths],
                               api_name="textbook")
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    predictor, header = load(args.model, args.backend)
    demo = build_demo(predictor, header)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False,
                max_file_size=MAX_FILE_SIZE, footer_links=["api"])


if __name__ == "__main__":
    main()
