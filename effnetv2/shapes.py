"""``shapes``: a synthetic folder-per-class data set that needs no download.

One shape per image at a random position, size, rotation and colour (only its outline tells the class)
over clutter: a gradient, noise, and distractors that are none of the classes, some across the object.
``annotations.json`` gives every object's box. The same seed always gives the same bytes.
"""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

SHAPES = ("circle", "square", "triangle", "star", "hexagon")
Colour = tuple[int, int, int]

MIN_CONTRAST = 90.0  # RGB distance between the object and the mean background under it


def shape_outline(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``kind`` at ``(cx, cy)``, circumradius ``radius``, rotated by ``angle`` (a circle: a 64-gon)."""
    if kind == "star":
        points = [(radius if i % 2 == 0 else radius * 0.45, math.pi * i / 5) for i in range(10)]
    else:
        sides = {"circle": 64, "square": 4, "triangle": 3, "hexagon": 6}[kind]
        points = [(radius, 2 * math.pi * i / sides) for i in range(sides)]
    return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for r, a in points]


def _random_colour(rng: random.Random) -> Colour:
    return (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))


def _distractor(draw: ImageDraw.ImageDraw, rng: random.Random, size: int) -> None:
    """One clutter element that is not a class shape: a line, an open arc, a scribble or a blob."""
    colour, width = _random_colour(rng), rng.randint(1, max(1, size // 32))
    kind = rng.choice(("line", "arc", "scribble", "blob"))
    if kind == "line":
        draw.line([(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)], fill=colour, width=width)
    elif kind == "arc":  # at most 3/4 of a circle, so never a closed circle
        r, x, y = rng.uniform(0.05, 0.2) * size, rng.uniform(0, size), rng.uniform(0, size)
        start = rng.uniform(0, 360)
        draw.arc([x - r, y - r, x + r, y + r], start, start + rng.uniform(60, 270), fill=colour, width=width)
    elif kind == "scribble":
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        points = [(x, y)]
        for _ in range(rng.randint(3, 6)):
            x, y = x + rng.uniform(-0.15, 0.15) * size, y + rng.uniform(-0.15, 0.15) * size
            points.append((x, y))
        draw.line(points, fill=colour, width=width, joint="curve")
    else:  # an irregular blob: radii jittered per vertex, so it is neither round nor a regular polygon
        r, x, y = rng.uniform(0.03, 0.09) * size, rng.uniform(0, size), rng.uniform(0, size)
        n = rng.randint(7, 11)
        draw.polygon([(x + r * rng.uniform(0.4, 1.0) * math.cos(2 * math.pi * (i + rng.uniform(-0.3, 0.3)) / n),
                       y + r * rng.uniform(0.4, 1.0) * math.sin(2 * math.pi * (i + rng.uniform(-0.3, 0.3)) / n))
                      for i in range(n)], fill=colour)


def background(rng: random.Random, size: int, clutter: bool = True) -> Image.Image:
    """A ``size``x``size`` RGB clutter image: gradient at a random angle, noise, 2–6 distractors.
    Without ``clutter``: one random colour with mild noise (an easy first curriculum stage)."""
    nrng = np.random.default_rng(rng.getrandbits(32))
    if not clutter:
        array = nrng.uniform(0, 255, 3) + nrng.normal(0, 10, (size, size, 3))
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    c0, c1 = nrng.uniform(0, 255, 3), nrng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    grid = np.linspace(-0.5, 0.5, size)
    t = (grid[None, :] * math.cos(angle) + grid[:, None] * math.sin(angle)) / math.sqrt(0.5) + 0.5
    array = c0 * (1 - t[..., None]) + c1 * t[..., None] + nrng.normal(0, rng.uniform(6, 22), (size, size, 3))
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 6)):
        _distractor(draw, rng, size)
    return image


def draw_shape(image: Image.Image, kind: str, rng: random.Random) -> list[int]:
    """Draw one ``kind`` shape onto the square RGB ``image`` and return its pixel box ``[x0, y0, x1, y1]`` (ends
    exclusive); its colour stands out from the background under it by ``MIN_CONTRAST``, half get an outline."""
    size = image.width
    radius = rng.uniform(0.14, 0.3) * size
    cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
    points = shape_outline(kind, cx, cy, radius, rng.uniform(0, 2 * math.pi))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    under = np.asarray(image)[np.asarray(mask) > 0].mean(0)
    colour = _random_colour(rng)
    while np.linalg.norm(np.subtract(colour, under)) < MIN_CONTRAST:
        colour = _random_colour(rng)
    image.paste(colour, mask=mask)
    if rng.random() < 0.5:
        # draw.polygon(width=...) leaves notches at the corners of rotated polygons; a closed line does not.
        width = rng.randint(1, max(1, size // 40))
        outline = ImageDraw.Draw(mask)
        for target, fill in ((ImageDraw.Draw(image), _random_colour(rng)), (outline, 255)):
            target.line(points + points[:2], fill=fill, width=width, joint="curve")
    return list(mask.getbbox())


def render_shape(kind: str, rng: random.Random, size: int, clutter: bool = True) -> tuple[Image.Image, list[int]]:
    """One ``size``x``size`` RGB image of ``kind`` and the object's box: clutter, the shape, sometimes a
    distractor across it, then a slight blur."""
    image = background(rng, size, clutter)
    box = draw_shape(image, kind, rng)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.choice((0, 0, 1, 2)) if clutter else 0):  # occluders: the shape is not always whole
        _distractor(draw, rng, size)
    return image.filter(ImageFilter.GaussianBlur(0.5)), box


def make_shapes_dataset(root: str | Path, num_per_class: int = 60, image_size: int = 96, seed: int = 0,
                        classes: tuple[str, ...] = SHAPES, clutter: bool = True, progress: bool = False) -> Path:
    """Write ``root/<class>/<class>_NNNN.png`` and ``root/annotations.json``; return ``root``.

    ``annotations.json`` maps ``"star/star_0003.png"`` to ``{"label": "star", "box": [x0, y0, x1, y1]}`` (ends
    exclusive). ``clutter=False``: plain noisy backgrounds, an easy first curriculum stage. Writing again into
    the folder removes the images the earlier call listed and this one does not write, nothing else.
    """
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape classes {unknown}: choose from {', '.join(SHAPES)}")
    if len(set(classes)) < 2:
        raise ValueError(f"give at least two different shape classes, got {list(classes)}")
    if num_per_class < 1 or image_size < 16:
        raise ValueError(f"num_per_class must be >= 1 and image_size >= 16, got {num_per_class} and {image_size}")
    root = Path(root)
    annotations = {}
    kinds = list(dict.fromkeys(classes))
    bar = tqdm(total=len(kinds) * num_per_class, desc=f"writing {root.name}", unit="image", disable=not progress)
    for kind in kinds:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(num_per_class):
            rng = random.Random(f"{seed}-{kind}-{i}")
            image, box = render_shape(kind, rng, image_size, clutter)
            name = f"{kind}/{kind}_{i:04d}.png"
            image.save(root / name)
            annotations[name] = {"label": kind, "box": box}
            bar.update()
    bar.close()
    index = root / "annotations.json"
    if index.is_file():
        ours = re.compile(rf"({'|'.join(SHAPES)})/\1_\d{{4}}\.png")  # only names this function writes
        try:
            earlier = json.loads(index.read_text())
        except ValueError:
            earlier = {}
        for stale in set(earlier if isinstance(earlier, dict) else {}) - set(annotations):
            if ours.fullmatch(stale):
                (root / stale).unlink(missing_ok=True)
    index.write_text(json.dumps(annotations, indent=1, sort_keys=True))
    return root
