"""Evaluate a model on a `shapes` set: accuracy, and whether its attention finds the object; or on a
split of a Hub dataset (or ``save_to_disk`` folder): accuracy, overall and per class.

    python -m effnetv2.data shapes /tmp/shapes_eval --num-per-class 200 --image-size 128 --seed 2
    python -m effnetv2.evaluate --model assets/model --data /tmp/shapes_eval [--json out.json] [--update-card]
    python -m effnetv2.evaluate --model org/name --dataset beans [--split test]

For each image, the attention maps of ``model.attention_maps`` (the pooled query, mean over heads)
give the attention mass inside the object's box (``annotations.json``, mapped through the eval
resize and crop); the box's share of the image area is what a uniform map would put there. A model
that looks at the object has mass well above share.

Every kind of map (raw attention, exact class attribution, Grad-CAM, and a random and a uniform map
as baselines; see ``effnetv2.explain``) is also scored for faithfulness on the predicted class:
deletion AUC (lower is better), insertion AUC (higher is better) and mass in the box (signed maps
count their positive part). ``--update-card`` writes the figures and the command into the model
folder's README.md (``effnetv2.card.update_card``: replaced on a re-run).
"""
from __future__ import annotations

import json
from pathlib import Path

import warnings

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
    """Fraction of the attention that falls inside the object's ``box = [x0, y0, x1, y1]`` (pixels) of
    an image of ``image_size = (width, height)`` over which the ``[h, w]`` grid is laid.

    ``maps`` is ``[h, w]`` or ``[heads, h, w]`` (then the mean over heads). Each cell counts with the
    fraction of its area inside the box, so a uniform map gives the box's area share: a model that
    looks at the object scores above ``box area / image area``.
    """
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
    """``[x0, y0, x1, y1]`` in the original image → the same box in the model's eval view (resize the
    short side to ``image_size / crop_pct``, centre crop ``image_size``), clipped to the view."""
    width, height = image_size
    size = cfg["image_size"]
    scale = int(size / cfg["crop_pct"]) / min(width, height)
    left, top = round((width * scale - size) / 2), round((height * scale - size) / 2)
    x0, y0, x1, y1 = box
    return [min(max(v, 0.0), size) for v in (x0 * scale - left, y0 * scale - top, x1 * scale - left, y1 * scale - top)]


@torch.no_grad()
def evaluate(model, root: Path, batch_size: int = 64) -> dict:
    """Accuracy and attention-in-box figures of ``model`` on the shapes set at ``root``."""
    annotations = json.loads((root / "annotations.json").read_text())
    transform, cfg = transforms_for(model), model.config
    size = cfg["image_size"]
    names = sorted(annotations)
    correct, per_class, masses, shares, head_masses = 0, {}, [], [], []
    faithfulness = {kind: {"deletion_auc": [], "insertion_auc": [], "mass_in_box": []} for kind in MAP_KINDS}
    generator = torch.Generator().manual_seed(0)  # the random baseline is the same on every run
    for start in tqdm(range(0, len(names), batch_size), desc=f"evaluating on {root.name}", unit="batch"):
        chunk = names[start:start + batch_size]
        images = [open_image(root / name) for name in chunk]
        x = torch.stack([transform(image) for image in images])
        predictions = model(x).argmax(-1).tolist()
        kinds = explanation_maps(model, x, generator)
        maps = kinds["attention"]  # [B, heads, h, w]
        curves = removal_curves(model, x, kinds)  # one forward pass for every kind and both directions
        for kind, kind_maps in kinds.items():
            faithfulness[kind]["deletion_auc"] += curve_auc(curves[kind]["deletion"]).tolist()
            faithfulness[kind]["insertion_auc"] += curve_auc(curves[kind]["insertion"]).tolist()
            for image, name, one in zip(images, chunk, kind_maps):
                box = box_in_view(annotations[name]["box"], image.size, cfg)
                positive = one.double().sum(0).clamp(min=0)
                faithfulness[kind]["mass_in_box"].append(
                    attention_mass_in_box(positive, box, (size, size)) if positive.sum() > 0 else 0.0)
        for name, image, prediction, attn in zip(chunk, images, predictions, maps):
            label = annotations[name]["label"]
            hit = model.id2label[str(prediction)] == label
            correct += hit
            seen, right = per_class.get(label, (0, 0))
            per_class[label] = (seen + 1, right + hit)
            box = box_in_view(annotations[name]["box"], image.size, cfg)
            masses.append(attention_mass_in_box(attn, box, (size, size)))
            shares.append((box[2] - box[0]) * (box[3] - box[1]) / size ** 2)
            head_masses.append([attention_mass_in_box(head, box, (size, size)) for head in attn])
    count = len(names)
    heads = torch.tensor(head_masses).mean(0).tolist()
    return {
        "images": count,
        "accuracy": correct / count,
        "per_class_accuracy": {label: right / seen for label, (seen, right) in sorted(per_class.items())},
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
    transform, bad = transforms_for(model), []
    correct, per_class = 0, {}
    for start in tqdm(range(0, len(labels), batch_size), desc=f"evaluating on {rows.name}", unit="batch"):
        images, truth = [], []
        for index in range(start, min(start + batch_size, len(labels))):
            try:
                images.append(transform(rows(index)))
            except ImageLoadError as err:
                bad.append(f"  {err}")
                continue
            truth.append(classes[labels[index]])
        if not images:
            continue
        for prediction, label in zip(model(torch.stack(images)).argmax(-1).tolist(), truth):
            hit = model.id2label[str(prediction)] == label
            correct += hit
            seen, right = per_class.get(label, (0, 0))
            per_class[label] = (seen + 1, right + hit)
    if bad:
        warnings.warn(f"skipping {len(bad)} unreadable image(s):\n" + "\n".join(bad), stacklevel=2)
    count = sum(seen for seen, _ in per_class.values())
    if not count:
        raise DatasetError(f"{rows.name}: no readable image to evaluate on")
    return {"images": count, "accuracy": correct / count,
            "per_class_accuracy": {label: right / seen for label, (seen, right) in sorted(per_class.items())}}
