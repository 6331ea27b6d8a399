"""``shapes``: a synthetic folder-per-class data set that needs no download.

Each image shows one shape (circle, square, triangle, star, hexagon) at a random position, size,
rotation and colour over a cluttered background (gradient, noise, distractor lines and blobs), and
``annotations.json`` gives every object's box, so attention maps can be checked against it.
Deterministic per seed.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "hexagon")


def _polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    if kind == "star":
        points = [(radius if i % 2 == 0 else radius * 0.45, math.pi * i / 5) for i in range(10)]
    else:
        sides = {"square": 4, "triangle": 3, "hexagon": 6}[kind]
        points = [(radius, 2 * math.pi * i / sides) for i in range(sides)]
    return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for r, a in points]


def _background(rng: random.Random, size: int) -> Image.Image:
    nrng = np.random.default_rng(rng.getrandbits(32))
    c0, c1 = nrng.uniform(0, 255, 3), nrng.uniform(0, 255, 3)
    t = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
    array = c0 * (1 - t) + c1 * t + nrng.normal(0, 18, (size, size, 3))
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 5)):  # distractors: lines and small soft blobs, never a class shape
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        if rng.random() < 0.6:
            draw.line([(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)], fill=colour,
                      width=rng.randint(1, max(1, size // 40)))
        else:
            r = rng.uniform(size * 0.02, size * 0.06)
            x, y = rng.uniform(0, size), rng.uniform(0, size)
            draw.ellipse([x - r, y - r * 0.5, x + r, y + r * 0.5], fill=colour)
    return image


def render_shape(kind: str, rng: random.Random, size: int) -> tuple[Image.Image, list[int]]:
    """One ``size``x``size`` RGB image of ``kind`` and the object's box ``[x0, y0, x1, y1]`` (pixels)."""
    image = _background(rng, size)
    radius = rng.uniform(0.14, 0.3) * size
    cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
    colour = tuple(rng.randint(0, 255) for _ in range(3))
    outline = tuple(255 - c for c in colour)
    draw = ImageDraw.Draw(image)
    if kind == "circle":
        points = [(cx - radius, cy - radius), (cx + radius, cy + radius)]
        draw.ellipse(points, fill=colour, outline=outline, width=max(1, size // 64))
        xs, ys = (cx - radius, cx + radius), (cy - radius, cy + radius)
    else:
        points = _polygon(kind, cx, cy, radius, rng.uniform(0, 2 * math.pi))
        draw.polygon(points, fill=colour, outline=outline, width=max(1, size // 64))
        xs, ys = [p[0] for p in points], [p[1] for p in points]
    box = [max(0, math.floor(min(xs))), max(0, math.floor(min(ys))),
           min(size, math.ceil(max(xs)) + 1), min(size, math.ceil(max(ys)) + 1)]
    return image.filter(ImageFilter.GaussianBlur(0.5)), box


def make_shapes_dataset(root: str | Path, num_per_class: int = 60, image_size: int = 96, seed: int = 0,
                        classes: tuple[str, ...] = SHAPES) -> Path:
    """Write ``root/<class>/<class>_NNNN.png`` and ``root/annotations.json``; return ``root``.

    ``annotations.json`` maps each image's path relative to ``root`` to ``{"label", "box"}`` with
    ``box = [x0, y0, x1, y1]`` in pixels. The same arguments always give the same bytes.
    """
    unknown = set(classes) - set(SHAPES)
    if unknown:
        raise ValueError(f"unknown shape classes {sorted(unknown)}: choose from {', '.join(SHAPES)}")
    if num_per_class < 1 or image_size < 16:
        raise ValueError("num_per_class must be >= 1 and image_size >= 16")
    root = Path(root)
    annotations = {}
    for class_index, kind in enumerate(classes):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(num_per_class):
            rng = random.Random(f"{seed}-{kind}-{i}")
            image, box = render_shape(kind, rng, image_size)
            name = f"{kind}/{kind}_{i:04d}.png"
            image.save(root / name, optimize=False)
            annotations[name] = {"label": kind, "box": box}
    (root / "annotations.json").write_text(json.dumps(annotations, indent=1, sort_keys=True))
    return root
