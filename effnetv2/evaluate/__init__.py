"""Evaluate a model on a `shapes` set: accuracy, and whether its attention finds the object; or on a
split of a Hub dataset (or ``save_to_disk`` folder): accuracy, overall and per class.

    python -m effnetv2.data shapes /tmp/shapes_eval --num-per-class 200 --image-size 128 --seed 2
    python -m effnetv2.evaluate --model assets/model --data /tmp/shapes_eval [--json out.json] [--update-card]
    python -m effnetv2.evaluate --model org/name --dataset beans [--split test]

The attention mass of ``model.attention_maps`` (mean over heads) inside each object's box
(``annotations.json``, mapped through the eval resize and crop) is compared with the box's share of the
image, what a uniform map would put there. Every map kind (attention, class attribution, Grad-CAM, random
and uniform baselines; ``effnetv2.explain``) is scored on the predicted class: deletion AUC (lower is
better), insertion AUC (higher is better), mass in the box (of its positive part). ``--update-card``
writes the figures and the command into the model folder's README.md (replaced on a re-run).
"""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..explain import class_attribution, curve_auc, gradcam, removal_curves
from ..data import DatasetError
from ..hub_data import RowImages
from ..images import ImageLoadError, open_image
from ..transforms import transforms_for

MAP_KINDS = ("attention", "class attribution", "Grad-CAM", "random", "uniform")


def attention_mass_in_box(maps: torch.Tensor | np.ndarray, box: list[float], image_size: tuple[int, int]) -> float:
    """Fraction of the attention ``maps`` (``[h, w]``, or ``[heads, h, w]``: their mean) inside ``box = [x0, y0,
    x1, y1]`` (pixels) of an image of ``image_size = (width, height)`` over which the grid is laid; each cell
    counts with the share of its area inside the box, so a uniform map gives the box's area share."""
    attn = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps).detach().double().cpu()
    if attn.dim() == 3:
        attn = attn.mean(0)
    if attn.dim() != 2:
        raise ValueError(f"maps must be [h, w] or [heads, h, w], got shape {list(attn.shape)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x0 <= x1 and y0 <= y1):
        raise ValueError(f"box must be [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1, got {list(box)}")
    rows, cols = attn.shape
    width, height = image_size
    ys = torch.arange(rows + 1, dtype=torch.float64) * height / rows
    xs = torch.arange(cols + 1, dtype=torch.float64) * width / cols
    overlap_y = (ys[1:].clamp(max=y1) - ys[:-1].clamp(min=y0)).clamp(min=0) / (height / rows)
    overlap_x = (xs[1:].clamp(max=x1) - xs[:-1].clamp(min=x0)).clamp(min=0) / (width / cols)
    return float((attn * overlap_y[:, None] * overlap_x[None, :]).sum() / attn.sum())


def explanation_maps(model, x: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every map kind for images ``x`` ``[B, 3, H, W]``, each ``[B, heads, h, w]``, on the predicted class."""
    attention = model.attention_maps(x)
    return {"attention": attention, "class attribution": class_attribution(model, x), "Grad-CAM": gradcam(model, x),
            "random": torch.rand(attention[:, :1].shape, generator=generator),
            "uniform": torch.ones_like(attention[:, :1])}


def box_in_view(box: list[float], image_size: tuple[int, int], cfg: dict) -> list[float]:
    """``[x0, y0, x1, y1]`` in the original image → the box in the model's eval view (short side resized to
    ``image_size / crop_pct``, centre crop ``image_size``), clipped to the view."""
    width, height = image_size
    size = cfg["image_size"]
    scale = int(size / cfg["crop_pct"]) / min(width, height)
    left, top = round((width * scale - size) / 2), round((height * scale - size) / 2)
    x0, y0, x1, y1 = box
    return [min(max(v, 0.0), size) for v in (x0 * scale - left, y0 * scale - top, x1 * scale - left, y1 * scale - top)]


def accuracy(hits: list[tuple[str, bool]]) -> dict:
    """``images``, ``accuracy`` and ``per_class_accuracy`` of ``(true label, predicted right)`` pairs."""
    seen, right = Counter(label for label, _ in hits), Counter(label for label, hit in hits if hit)
    return {"images": len(hits), "accuracy": sum(right.values()) / len(hits),
            "per_class_accuracy": {label: right[label] / seen[label] for label in sorted(seen)}}


@torch.no_grad()
def evaluate(model, root: Path, batch_size: int = 64) -> dict:
    """Accuracy and attention-in-box figures of ``model`` on the shapes set at ``root``."""
    annotations = json.loads((root / "annotations.json").read_text())
    transform, cfg = transforms_for(model), model.config
    size = cfg["image_size"]
    names = sorted(annotations)
    hits, masses, shares, head_masses = [], [], [], []
    faithfulness = {kind: {"deletion_auc": [], "insertion_auc": [], "mass_in_box": []} for kind in MAP_KINDS}
    generator = torch.Generator().manual_seed(0)  # the random baseline is the same on every run
    for start in tqdm(range(0, len(names), batch_size), desc=f"evaluating on {root.name}", unit="batch"):
        chunk = names[start:start + batch_size]
        images = [open_image(root / name) for name in chunk]
        boxes = [box_in_view(annotations[name]["box"], image.size, cfg) for name, image in zip(chunk, images)]
        x = torch.stack([transform(image) for image in images])
        predictions = model(x).argmax(-1).tolist()
        kinds = explanation_maps(model, x, generator)
        maps = kinds["attention"]  # [B, heads, h, w]
        curves = removal_curves(model, x, kinds)  # one forward pass for every kind and both directions
        for kind, kind_maps in kinds.items():
            faithfulness[kind]["deletion_auc"] += curve_auc(curves[kind]["deletion"]).tolist()
            faithfulness[kind]["insertion_auc"] += curve_auc(curves[kind]["insertion"]).tolist()
            for box, one in zip(boxes, kind_maps):
                positive = one.double().sum(0).clamp(min=0)
                faithfulness[kind]["mass_in_box"].append(
                    attention_mass_in_box(positive, box, (size, size)) if positive.sum() > 0 else 0.0)
        for name, box, prediction, attn in zip(chunk, boxes, predictions, maps):
            label = annotations[name]["label"]
            hits.append((label, model.id2label[str(prediction)] == label))
            masses.append(attention_mass_in_box(attn, box, (size, size)))
            shares.append((box[2] - box[0]) * (box[3] - box[1]) / size ** 2)
            head_masses.append([attention_mass_in_box(head, box, (size, size)) for head in attn])
    count = len(names)
    heads = torch.tensor(head_masses).mean(0).tolist()
    return {
        **accuracy(hits),
        "attention_mass_in_box": sum(masses) / count,
        "box_area_share": sum(shares) / count,
        "mass_over_share": sum(masses) / sum(shares),
        "images_with_mass_above_share": sum(m > s for m, s in zip(masses, shares)) / count,
        "attention_mass_in_box_per_head": [round(m, 4) for m in heads],
        "maps": {kind: {metric: sum(values) / count for metric, values in figures.items()}
                 for kind, figures in faithfulness.items()},
    }


@torch.no_grad()
def evaluate_split(model, rows: RowImages, labels: list[int], classes: list[str], batch_size: int = 64) -> dict:
    """Accuracy, overall and per class, of ``model`` on a dataset split (``rows`` reads row ``i``'s image,
    ``labels[i]`` indexes ``classes``); a class counts as predicted when the model's label has its name.
    Unreadable rows are warned about and left out."""
    transform, bad, hits = transforms_for(model), [], []
    for start in tqdm(range(0, len(labels), batch_size), desc=f"evaluating on {rows.name}", unit="batch"):
        images, truth = [], []
        for index in range(start, min(start + batch_size, len(labels))):
            try:
                images.append(transform(rows(index)))
                truth.append(classes[labels[index]])
            except ImageLoadError as err:
                bad.append(f"  {err}")
        if not images:
            continue
        for prediction, label in zip(model(torch.stack(images)).argmax(-1).tolist(), truth):
            hits.append((label, model.id2label[str(prediction)] == label))
    if bad:
        warnings.warn(f"skipping {len(bad)} unreadable image(s):\n" + "\n".join(bad), stacklevel=2)
    if not hits:
        raise DatasetError(f"{rows.name}: no readable image to evaluate on")
    return accuracy(hits)
