"""Pictures of attention: heat maps over images, a colour bar, galleries, and the maths as Markdown.

Pure functions of tensors and PIL images (no UI code): ``app.py`` and notebooks use them alike.
Maps are ``[h, w]`` grids of the feature map, never assumed square, and are upsampled by nearest
neighbour so that each grid cell stays a visible block.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from .transforms import transforms_for


def colormap(values: np.ndarray, name: str = "inferno") -> np.ndarray:
    """Values in [0, 1] ``[...]`` → RGB ``[..., 3]`` uint8 through a matplotlib colour map."""
    from matplotlib import colormaps

    return (colormaps[name](np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def model_input(model, image: Image.Image) -> tuple[torch.Tensor, Image.Image]:
    """The model's eval input ``[1, 3, S, S]`` for ``image`` and the RGB view it corresponds to
    (resized and cropped exactly as the model sees it, before normalisation)."""
    x = transforms_for(model)(image).unsqueeze(0)
    mean = torch.tensor(model.config["mean"]).view(3, 1, 1)
    std = torch.tensor(model.config["std"]).view(3, 1, 1)
    view = ((x[0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return x, Image.fromarray(view)


def feature_grid(model, x: torch.Tensor | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of the feature grid for input ``x`` ``[B, 3, H, W]`` (default: the model's eval
    size): five stride-2 stages, each ``ceil(n / 2)``."""
    height, width = x.shape[-2:] if x is not None else (model.config["image_size"],) * 2
    for _ in range(5):
        height, width = -(-height // 2), -(-width // 2)
    return int(height), int(width)


def cell_from_click(xy: tuple[float, float], image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """A click at pixel ``(x, y)`` of an image of ``(width, height)`` → the ``(row, col)`` grid cell."""
    (x, y), (width, height), (rows, cols) = xy, image_size, grid
    row = min(rows - 1, max(0, int(y * rows / height)))
    col = min(cols - 1, max(0, int(x * cols / width)))
    return row, col


def heatmap(attn: torch.Tensor | np.ndarray, size: tuple[int, int], vmax: float | None = None) -> Image.Image:
    """A ``[h, w]`` map → RGB heat map of ``size = (width, height)``, nearest-upsampled, scaled to
    ``[0, vmax]`` (default: the map's max)."""
    values = np.asarray(attn, dtype=np.float64)
    top = vmax if vmax is not None else max(float(values.max()), 1e-12)
    small = Image.fromarray(colormap(values / top))
    return small.resize(size, Image.NEAREST)


def overlay(image: Image.Image, attn, alpha: float = 0.55, vmax: float | None = None) -> Image.Image:
    """The heat map of ``attn`` ``[h, w]`` alpha-blended over ``image``: ``(1 - alpha) * image + alpha * heat``."""
    heat = heatmap(attn, image.size, vmax)
    return Image.blend(image.convert("RGB"), heat, alpha)


def with_colorbar(image: Image.Image, vmin: float, vmax: float, width: int = 14) -> Image.Image:
    """``image`` with a vertical colour bar on its right, labelled with the value range."""
    height = image.height
    ramp = colormap(np.linspace(1, 0, height)[:, None].repeat(width, 1))
    label_w = 44
    canvas = Image.new("RGB", (image.width + width + label_w + 6, height), "white")
    canvas.paste(image, (0, 0))
    canvas.paste(Image.fromarray(ramp), (image.width + 4, 0))
    draw = ImageDraw.Draw(canvas)
    x = image.width + width + 6
    draw.text((x, 0), f"{vmax:.3f}", fill="black")
    draw.text((x, height - 12), f"{vmin:.3f}", fill="black")
    return canvas


def head_gallery(view: Image.Image, maps: torch.Tensor, alpha: float = 0.55) -> list[tuple[Image.Image, str]]:
    """One overlay per head of ``maps`` ``[h, rows, cols]`` and one of their mean, each with a colour
    bar and a caption giving the head's peak weight and where it is."""
    maps = maps.detach().float().cpu()
    out = []
    entries = [(f"head {i + 1}", maps[i]) for i in range(maps.shape[0])] + [("mean of heads", maps.mean(0))]
    for name, attn in entries:
        peak = float(attn.max())
        row, col = divmod(int(attn.argmax()), attn.shape[1])
        picture = with_colorbar(overlay(view, attn.numpy(), alpha), 0.0, peak)
        out.append((picture, f"{name}: peak {peak:.3f} at cell ({row}, {col})"))
    return out


def grid_image(view: Image.Image, grid: tuple[int, int], cell: tuple[int, int] | None = None) -> Image.Image:
    """``view`` with the feature grid drawn on it and the query ``cell`` outlined."""
    picture = view.convert("RGB").copy()
    draw = ImageDraw.Draw(picture)
    rows, cols = grid
    width, height = picture.size
    for r in range(1, rows):
        draw.line([(0, r * height / rows), (width, r * height / rows)], fill=(255, 255, 255), width=1)
    for c in range(1, cols):
        draw.line([(c * width / cols, 0), (c * width / cols, height)], fill=(255, 255, 255), width=1)
    if cell is not None:
        r, c = cell
        draw.rectangle([c * width / cols, r * height / rows, (c + 1) * width / cols - 1, (r + 1) * height / rows - 1],
                       outline=(0, 255, 255), width=3)
    return picture


def matrix_image(matrix: torch.Tensor | np.ndarray, cell_px: int | None = None,
                 highlight_row: int | None = None) -> Image.Image:
    """A ``[rows, cols]`` matrix as a heat map (each entry a square block) with a colour bar."""
    values = np.asarray(matrix, dtype=np.float64)
    rows, cols = values.shape
    cell_px = cell_px or max(4, min(48, 384 // max(rows, cols)))
    picture = heatmap(values, (cols * cell_px, rows * cell_px))
    if highlight_row is not None:
        ImageDraw.Draw(picture).rectangle([0, highlight_row * cell_px, cols * cell_px - 1,
                                           (highlight_row + 1) * cell_px - 1], outline=(0, 255, 255), width=2)
    return with_colorbar(picture, float(values.min()), float(values.max()))


def score_matrix_image(all_weights: torch.Tensor, query: tuple[int, int] | None = None,
                       grid: tuple[int, int] | None = None) -> Image.Image:
    """The query-by-key weights ``[h, L, L]`` averaged over heads, the query's row outlined."""
    mean = all_weights.detach().float().mean(0).cpu().numpy()
    row = None
    if query is not None:
        cols = grid[1] if grid else int(round(math.sqrt(mean.shape[0])))
        row = query[0] * cols + query[1]
    return matrix_image(mean, highlight_row=row)


def attention_mass_in_box(maps: torch.Tensor, box: list[float], image_size: tuple[int, int]) -> float:
    """Fraction of attention (mean over heads if ``maps`` is ``[h, rows, cols]``) that falls inside
    ``box = [x0, y0, x1, y1]`` of an image of ``(width, height)``, each cell weighted by its overlap."""
    attn = maps.float().mean(0) if maps.dim() == 3 else maps.float()
    rows, cols = attn.shape
    width, height = image_size
    x0, y0, x1, y1 = box
    ys = torch.arange(rows + 1, dtype=torch.float64) * height / rows
    xs = torch.arange(cols + 1, dtype=torch.float64) * width / cols
    overlap_y = (torch.minimum(ys[1:], torch.tensor(float(y1))) - torch.maximum(ys[:-1], torch.tensor(float(y0)))).clamp(min=0)
    overlap_x = (torch.minimum(xs[1:], torch.tensor(float(x1))) - torch.maximum(xs[:-1], torch.tensor(float(x0)))).clamp(min=0)
    share = (overlap_y[:, None] / (height / rows)) * (overlap_x[None, :] / (width / cols))
    return float((attn.double() * share).sum() / attn.double().sum())


def _shape(shape) -> str:
    if isinstance(shape, dict):
        return ", ".join(f"{k} `{v}`" for k, v in shape.items())
    return f"`{shape}`"


def walkthrough_markdown(walk: dict) -> str:
    """The steps of ``attention.attention_walkthrough`` as Markdown with LaTeX and real shapes."""
    rows, cols = walk["grid"]
    query = "the pooled query" if walk["query"] is None else f"the token at cell {tuple(walk['query'])}"
    lines = [f"**The maths for this image**: a {rows}×{cols} feature grid gives L = {rows * cols} tokens; "
             f"{walk['num_heads']} heads of d = {walk['head_dim']} channels; the query is {query}.", ""]
    for i, step in enumerate(walk["steps"], 1):
        sample = ", ".join(f"{v:.4g}" for v in step["sample"])
        lines.append(f"{i}. **{step['name']}**: ${step['formula']}$ — shape {_shape(step['shape'])} — first values [{sample}, …]")
    return "\n".join(lines)


def textbook_gallery(example: dict) -> list[tuple[Image.Image, str]]:
    """One score-matrix heat map per head of ``attention.textbook_example``."""
    weights = example["weights"]
    return [(matrix_image(weights[i]), f"head {i + 1}: softmax(Q Kᵀ / √{example['head_dim']})")
            for i in range(weights.shape[0])]


def textbook_markdown(example: dict) -> str:
    """The shapes at each step of the textbook example, as Markdown."""
    lines = [f"{example['tokens'].shape[1]} tokens of width {example['tokens'].shape[2]} in "
             f"{example['num_heads']} heads of $d = {example['head_dim']}$ channels:", ""]
    lines += [f"- {name}: `{shape}`" for name, shape in example["shapes"].items()]
    lines.append("")
    lines.append(r"Per head: $A_i = \mathrm{softmax}(Q_i K_i^T / \sqrt{d})$, $O_i = A_i V_i$; "
                 r"then $[O_1, \dots, O_h] W_O$.")
    return "\n".join(lines)
