"""Pictures of attention for the app and notebooks: heat maps over images (each ``[h, w]`` grid cell a visible
block, grids never assumed square), colour bars, galleries, charts, and the maths as Markdown."""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .attention import check_cell
from .transforms import transforms_for


def colormap(values: np.ndarray, name: str = "inferno") -> np.ndarray:
    """Values in [0, 1] ``[...]`` → RGB ``[..., 3]`` uint8 through a matplotlib colour map."""
    from matplotlib import colormaps

    return (colormaps[name](np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def model_input(model, image: Image.Image) -> tuple[torch.Tensor, Image.Image]:
    """The model's eval input ``[1, 3, S, S]`` for ``image`` and the RGB view the model sees (before normalisation)."""
    x = transforms_for(model)(image).unsqueeze(0)
    mean = torch.tensor(model.config["mean"]).view(3, 1, 1)
    std = torch.tensor(model.config["std"]).view(3, 1, 1)
    view = ((x[0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return x, Image.fromarray(view)


def cell_from_click(xy: tuple[float, float], image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """A click at pixel ``(x, y)`` of an image of ``image_size = (width, height)`` → the ``(row, col)`` cell (the
    nearest for clicks outside) of a ``grid = (rows, cols)`` laid over it, as :func:`upsample_nearest` paints."""
    (x, y), (width, height), (rows, cols) = xy, image_size, grid
    row = min(rows - 1, max(0, int(y * rows // height)))
    col = min(cols - 1, max(0, int(x * cols // width)))
    return row, col


def cell_box(cell: tuple[int, int], grid: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The pixels ``[x0, y0, x1, y1)`` of cell ``(row, col)`` in an image of ``(width, height)``, as clicks map them."""
    (row, col), (rows, cols), (width, height) = cell, grid, image_size
    return (-(-col * width // cols), -(-row * height // rows),
            -(-(col + 1) * width // cols), -(-(row + 1) * height // rows))


def upsample_nearest(values: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A ``[h, w]`` map → ``[height, width]`` for ``size = (width, height)``, pixel ``(x, y)`` taking cell
    ``(y * h // height, x * w // width)``: equal blocks, or blocks one pixel apart where sizes do not divide."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"expected a [h, w] map, got shape {list(values.shape)}")
    (width, height), (rows, cols) = size, values.shape
    return values[(np.arange(height) * rows // height)[:, None], (np.arange(width) * cols // width)[None, :]]


def heatmap(attn: torch.Tensor | np.ndarray, size: tuple[int, int], vmax: float | None = None,
            vmin: float = 0.0, cmap: str = "inferno") -> Image.Image:
    """A ``[h, w]`` map → RGB heat map of ``size = (width, height)``, nearest-upsampled
    (:func:`upsample_nearest`), colours scaled from ``vmin`` to ``vmax`` (default: the map's max)."""
    values = np.asarray(attn, dtype=np.float64)
    top = vmax if vmax is not None else float(values.max())
    scaled = (values - vmin) / max(top - vmin, 1e-12)
    return Image.fromarray(colormap(upsample_nearest(scaled, size), cmap))


def overlay(image: Image.Image, attn, alpha: float = 0.55, vmax: float | None = None, vmin: float = 0.0,
            cmap: str = "inferno") -> Image.Image:
    """The heat map of ``attn`` ``[h, w]`` alpha-blended over ``image``: ``(1 - alpha) * image + alpha * heat``."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1] (0: only the image, 1: only the heat map), got {alpha}")
    heat = heatmap(attn, image.size, vmax, vmin, cmap)
    return Image.blend(image.convert("RGB"), heat, alpha)


TICK_FONT_PX = 16  # colour-bar labels: still >= 10 px when a gallery shows the picture at 2/3 size
BAR_PX = 14  # a colour bar's thickness


def _tick(value: float, vmin: float, vmax: float) -> str:
    return f"{0.0 if abs(value) < 1e-9 * max(abs(vmin), abs(vmax)) else value:.3g}"  # no "-0"


def with_colorbar(image: Image.Image, vmin: float, vmax: float, cmap: str = "inferno") -> Image.Image:
    """``image`` with a colour bar on its right: ``vmax`` at the top, ``vmin`` at the bottom, three labelled values."""
    font = ImageFont.load_default(size=TICK_FONT_PX)
    width, height = BAR_PX, image.height
    fracs = [0.0, 0.5, 1.0]  # 0 at the top
    values = [vmax - frac * (vmax - vmin) for frac in fracs]
    labels = [_tick(value, vmin, vmax) for value in values]
    label_w = max(round(font.getlength(label)) for label in labels) + 2
    left = image.width + 4
    canvas = Image.new("RGB", (left + width + 5 + label_w, height), "white")
    canvas.paste(image.convert("RGB"), (0, 0))
    canvas.paste(Image.fromarray(colormap(np.linspace(1, 0, height)[:, None].repeat(width, 1), cmap)), (left, 0))
    draw = ImageDraw.Draw(canvas)
    for frac, label in zip(fracs, labels):
        y = round(frac * (height - 1))
        draw.line([(left + width, y), (left + width + 3, y)], fill="black")
        text_y = min(max(0, y - TICK_FONT_PX // 2), max(0, height - TICK_FONT_PX - 2))
        draw.text((left + width + 5, text_y), label, fill="black", font=font)
    return canvas


def head_gallery(view: Image.Image, maps: torch.Tensor, alpha: float = 0.55) -> list[tuple[Image.Image, str]]:
    """Overlays of the mean of ``maps`` ``[h, rows, cols]``, then each head's, with colour bars from 0 to each
    one's peak and captions saying the peak and where it is."""
    maps = maps.detach().float().cpu()
    entries = [("mean of heads", maps.mean(0))] + [(f"head {i + 1}", maps[i]) for i in range(maps.shape[0])]
    out = []
    for name, attn in entries:
        peak = float(attn.max())
        row, col = divmod(int(attn.argmax()), attn.shape[1])
        picture = with_colorbar(overlay(view, attn.numpy(), alpha, vmax=peak), 0.0, peak)
        out.append((picture, f"{name}: peak {peak:.3f} at cell ({row}, {col})"))
    return out


SIGNED_CMAP = "RdBu_r"  # diverging: red pushes towards the class, blue against it, white is 0


def attribution_gallery(view: Image.Image, shares: torch.Tensor, label: str,
                        alpha: float = 0.6) -> list[tuple[Image.Image, str]]:
    """Overlays of the signed class shares ``[heads, rows, cols]`` summed over heads, then each head's, on one
    diverging scale centred on 0; captions give each one's total share of ``label``'s logit."""
    shares = shares.detach().double().cpu()
    entries = [(f"head {i + 1}", shares[i]) for i in range(shares.shape[0])]
    if shares.shape[0] > 1:
        entries.insert(0, ("all heads", shares.sum(0)))
    top = max(float(max(entry.abs().max() for _, entry in entries)), 1e-12)
    out = []
    for name, values in entries:
        total = float(values.sum())
        row, col = divmod(int(values.abs().argmax()), values.shape[1])
        picture = with_colorbar(overlay(view, values.numpy(), alpha, vmax=top, vmin=-top, cmap=SIGNED_CMAP),
                                -top, top, cmap=SIGNED_CMAP)
        direction = "towards" if total >= 0 else "against"
        out.append((picture, f"{name}: {total:+.2f} {direction} {label} (strongest cell ({row}, {col}))"))
    return out


def region_outline(picture: Image.Image, cells: np.ndarray, colour=(0, 255, 0), width: int = 3) -> Image.Image:
    """``picture`` with the border of the grid cells where ``cells`` ``[rows, cols]`` is True drawn
    ``width`` px inside them, as one region (no line between two chosen cells)."""
    inside = np.pad(upsample_nearest(np.asarray(cells), picture.size).astype(bool), width)
    core = inside.copy()
    for step in range(1, width + 1):
        for axis in (0, 1):
            core &= np.roll(inside, step, axis) & np.roll(inside, -step, axis)
    pixels = np.array(picture.convert("RGB"))
    pixels[(inside & ~core)[width:-width, width:-width]] = colour
    return Image.fromarray(pixels)


def top_cells(values: torch.Tensor | np.ndarray, count: int) -> np.ndarray:
    """The ``count`` highest cells of a ``[rows, cols]`` map as a boolean mask (ties: first in row-major
    order, as ``explain``'s deletion ranks them)."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(-flat, kind="stable")[:count]
    mask = np.zeros(flat.shape, dtype=bool)
    mask[order] = True
    return mask.reshape(np.shape(values))


EXPLANATION_PX = 448  # the main picture: a 6x6 grid's cells are 75 px blocks; a phone shows it at 90% width


def explanation_picture(view: Image.Image, values: torch.Tensor, region: int, signed: bool) -> Image.Image:
    """``view`` at ``EXPLANATION_PX`` with the map ``values`` ``[rows, cols]`` over it, its first ``region`` cells
    outlined, and its colour bar (``signed``: red for the class, blue against; else from 0 to the peak)."""
    values = values.detach().double().cpu()
    top = max(float(values.abs().max() if signed else values.max()), 1e-12)
    low, cmap, alpha = (-top, SIGNED_CMAP, 0.6) if signed else (0.0, "inferno", 0.55)
    picture = overlay(view.resize((EXPLANATION_PX,) * 2, Image.BICUBIC), values.numpy(), alpha,
                      vmax=top, vmin=low, cmap=cmap)
    return with_colorbar_below(region_outline(picture, top_cells(values, region)), low, top, cmap=cmap)


def with_colorbar_below(image: Image.Image, vmin: float, vmax: float, cmap: str = "inferno") -> Image.Image:
    """``image`` with a colour bar of ``[vmin, vmax]`` and five labelled values under it (beside it, it would sit
    under the page's picture buttons and shrink the picture on a phone)."""
    font = ImageFont.load_default(size=TICK_FONT_PX)
    width, height, ticks = image.width, BAR_PX, 5
    canvas = Image.new("RGB", (width, image.height + 6 + height + 4 + TICK_FONT_PX + 4), "white")
    canvas.paste(image.convert("RGB"), (0, 0))
    top = image.height + 6
    canvas.paste(Image.fromarray(colormap(np.linspace(0, 1, width)[None, :].repeat(height, 0), cmap)), (0, top))
    draw = ImageDraw.Draw(canvas)
    for i in range(ticks):
        frac = i / (ticks - 1)
        value = vmin + frac * (vmax - vmin)
        label = _tick(value, vmin, vmax)
        x = round(frac * (width - 1))
        draw.line([(x, top + height), (x, top + height + 3)], fill="black")
        text_x = min(max(0, x - round(font.getlength(label)) // 2), width - round(font.getlength(label)))
        draw.text((text_x, top + height + 4), label, fill="black", font=font)
    return canvas


def _png(figure) -> bytes:
    """A matplotlib ``Figure`` (no pyplot: no backend, nothing to close) as PNG bytes."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def bar_chart(names: list[str], values: list[float], ylabel: str) -> Image.Image:
    """One bar per name, red above 0 (for the class) and blue below (against it), the maps' colours."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    signed = colormaps[SIGNED_CMAP]
    figure = Figure(figsize=(max(4.0, 0.6 * len(names) + 1.5), 3.2), dpi=100)
    ax = figure.subplots()
    ax.bar(names, values, color=[signed(0.85) if v >= 0 else signed(0.15) for v in values])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=45 if len(names) > 4 else 0)
    return Image.open(io.BytesIO(_png(figure))).convert("RGB")


def grid_image(view: Image.Image, grid: tuple[int, int], cell: tuple[int, int] | None = None,
               attn: torch.Tensor | None = None) -> Image.Image:
    """``view`` with the feature grid (:func:`cell_from_click`'s cells) and the query ``cell`` outlined on it, over
    that query's attention ``attn`` ``[rows, cols]`` if given."""
    picture = (overlay(view, np.asarray(attn, dtype=np.float64)) if attn is not None else view).convert("RGB").copy()
    draw = ImageDraw.Draw(picture)
    rows, cols = grid
    width, height = picture.size
    for r in range(1, rows):
        y = cell_box((r, 0), grid, picture.size)[1]
        draw.line([(0, y), (width, y)], fill=(255, 255, 255), width=1)
    for c in range(1, cols):
        x = cell_box((0, c), grid, picture.size)[0]
        draw.line([(x, 0), (x, height)], fill=(255, 255, 255), width=1)
    if cell is not None:
        x0, y0, x1, y1 = cell_box(cell, grid, picture.size)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 255, 255), width=3)
    return picture


def with_axis_ticks(picture: Image.Image, cell_px: int, labels: list[str], row_title: str,
                    col_title: str) -> Image.Image:
    """``picture`` (a square matrix drawn ``cell_px`` pixels per entry) with ``labels`` left of its rows and above
    its columns (every n-th where they would overlap) and the two axis titles."""
    font = ImageFont.load_default(size=TICK_FONT_PX)
    left = max(round(font.getlength(text)) for text in [*labels, row_title]) + 8
    col_w = max(round(font.getlength(text)) for text in labels) + 4
    top = (TICK_FONT_PX + 4) * 2 + 2
    canvas = Image.new("RGB", (left + picture.width, top + picture.height), "white")
    canvas.paste(picture, (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 0), col_title, fill="black", font=font)
    draw.text((0, top - TICK_FONT_PX - 4), row_title, fill="black", font=font)
    for i in range(0, len(labels), math.ceil((TICK_FONT_PX + 2) / cell_px)):
        y = top + i * cell_px + (cell_px - TICK_FONT_PX) // 2
        draw.text((left - 4 - round(font.getlength(labels[i])), y), labels[i], fill="black", font=font)
    for i in range(0, len(labels), math.ceil(col_w / cell_px)):
        x = left + i * cell_px + (cell_px - round(font.getlength(labels[i]))) // 2
        draw.text((x, top - TICK_FONT_PX - 3), labels[i], fill="black", font=font)
    return canvas


def matrix_image(matrix: torch.Tensor | np.ndarray, highlight_row: int | None = None,
                 grid: tuple[int, int] | None = None) -> Image.Image:
    """A ``[rows, cols]`` matrix as a heat map of square blocks with a colour bar from ``min(0, min)`` to ``max``;
    with ``grid``, a query-by-key matrix of its cells, tick-labelled (:func:`with_axis_ticks`)."""
    values = np.asarray(matrix, dtype=np.float64)
    rows, cols = values.shape
    cell_px = max(4, min(48, 384 // max(rows, cols)))
    vmin, vmax = min(0.0, float(values.min())), float(values.max())
    picture = heatmap(values, (cols * cell_px, rows * cell_px), vmax=vmax, vmin=vmin)
    if highlight_row is not None:
        ImageDraw.Draw(picture).rectangle([0, highlight_row * cell_px, cols * cell_px - 1,
                                           (highlight_row + 1) * cell_px - 1], outline=(0, 255, 255), width=2)
    picture = with_colorbar(picture, vmin, vmax)
    if grid is not None:
        cells = [f"{r},{c}" for r in range(grid[0]) for c in range(grid[1])]
        picture = with_axis_ticks(picture, cell_px, cells, "query", "key cell (row,col)")
    return picture


def score_matrix_image(all_weights: torch.Tensor, query: tuple[int, int] | None, grid: tuple[int, int]) -> Image.Image:
    """The query-by-key weights ``[h, L, L]`` averaged over heads, labelled by ``grid``'s cells, the row of
    ``query = (row, col)`` outlined."""
    mean = all_weights.detach().float().mean(0).cpu().numpy()
    return matrix_image(mean, None if query is None else check_cell(query, grid), grid)


def _shape(shape) -> str:
    if isinstance(shape, dict):
        return ", ".join(f"{k} `{v}`" for k, v in shape.items())
    return f"`{shape}`"


def walkthrough_markdown(walk: dict) -> str:
    """The steps of ``walkthrough.attention_walkthrough`` as Markdown with LaTeX and real shapes."""
    rows, cols = walk["grid"]
    query = "the pooled query" if walk["query"] is None else f"the token at cell {tuple(walk['query'])}"
    lines = [f"**The maths for this image**: a {rows}×{cols} feature grid gives L = {rows * cols} tokens; "
             f"{walk['num_heads']} heads of d = {walk['head_dim']} channels; the query is {query}.", ""]
    for i, step in enumerate(walk["steps"], 1):
        sample = ", ".join(f"{v:.4g}" for v in step["sample"])
        lines.append(f"{i}. **{step['name']}**: ${step['formula']}$ — shape {_shape(step['shape'])} — "
                     f"first values [{sample}, …]")
    return "\n".join(lines)


def textbook_gallery(example: dict) -> list[tuple[Image.Image, str]]:
    """One heat map ``[L, L]`` of the weights (row = query, column = key) per head of a ``textbook_example``."""
    weights, d = example["weights"], example["head_dim"]
    return [(matrix_image(weights[i]), f"head {i + 1}: softmax(Q Kᵀ / √{d})") for i in range(weights.shape[0])]


def textbook_markdown(example: dict) -> str:
    """The shapes at each step of the textbook example, as Markdown."""
    lines = [f"{example['tokens'].shape[1]} tokens of width {example['tokens'].shape[2]} in "
             f"{example['num_heads']} heads of $d = {example['head_dim']}$ channels:", ""]
    lines += [f"- {name}: `{shape}`" for name, shape in example["shapes"].items()]
    lines.append("")
    lines.append(r"Per head: $A_i = \mathrm{softmax}(Q_i K_i^T / \sqrt{d})$, $O_i = A_i V_i$; "
                 r"then $[O_1, \dots, O_h] W_O$.")
    return "\n".join(lines)


def confusion_matrix_png(matrix: torch.Tensor, classes: list[str], title: str = "") -> bytes:
    """The ``[C, C]`` confusion matrix (rows true, columns predicted) as PNG bytes, counts in the cells."""
    from matplotlib.figure import Figure

    n = len(classes)
    figure = Figure(figsize=(2.0 + 0.7 * n, 1.6 + 0.6 * n), dpi=100)
    ax = figure.subplots()
    ax.imshow(matrix.numpy(), cmap="Blues", vmin=0)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = int(matrix.max()) if matrix.numel() else 0
    for i in range(n):
        for j in range(n):
            value = int(matrix[i, j])
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    return _png(figure)
