"""How sure is the bundled model on what it knows, and on what it does not? Its top probability on
shapes of an unseen seed, against noise, smooth colour fields and the example photos: the figures
behind app.py's ``UNSURE_BELOW`` (below it the app says the model knows only its five shapes).

    HF_HUB_OFFLINE=1 python benchmarks/ood_threshold.py [--per-class 200] [--seed 11]
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from effnetv2.inference import Predictor
from effnetv2.shapes import SHAPES, render_shape

HERE = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def top_probs(predictor: Predictor, images: list[Image.Image]) -> np.ndarray:
    return np.array([top[0][1] for top in predictor.predict(images, top_k=1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11, help="a seed used neither to train nor to evaluate")
    args = parser.parse_args()
    predictor = Predictor(str(HERE / "assets" / "model"), backend="torch")
    size = predictor.config["image_size"]
    rng, np_rng = random.Random(args.seed), np.random.default_rng(args.seed)
    shapes = [render_shape(kind, rng, size)[0] for kind in SHAPES for _ in range(args.per_class)]
    count = len(shapes)
    noise = [Image.fromarray(np_rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count // 2)]
    smooth = [Image.fromarray(np_rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
              .filter(ImageFilter.GaussianBlur(4)) for _ in range(count // 2)]
    photos = sorted((HERE / "assets" / "examples").glob("photo_*"))
    sets = {f"shapes (seed {args.seed})": shapes, "uniform noise": noise, "smooth colour fields": smooth,
            "example photos": [Image.open(p).convert("RGB") for p in photos]}
    print(f"top probability of the bundled model; {count} shapes")
    print(f"{'set':24s} {'n':>5s} {'p1':>6s} {'p5':>6s} {'median':>6s} {'p95':>6s}  share below " + " / ".join(map(str, THRESHOLDS)))
    for name, images in sets.items():
        probs = top_probs(predictor, images)
        q = np.percentile(probs, [1, 5, 50, 95])
        below = " / ".join(f"{(probs < t).mean():.3f}" for t in THRESHOLDS)
        print(f"{name:24s} {len(probs):5d} " + " ".join(f"{v:6.3f}" for v in q) + f"  {below}")


if __name__ == "__main__":
    main()
