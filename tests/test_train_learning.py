"""train.py learns: a short fine-tune of the bundled model on new shapes, and a run from scratch on
an easy task.

A short run's outcome depends on float summation order (CPU kernels, thread count), so each run is
sized to pass with a clear margin for every seed, thread count and CPU instruction set that
``benchmarks/training_test_margins.py`` tries; that script calls ``fine_tune`` and ``from_scratch``
below. Their seed (data, split, initialisation, batches) is ``EFFNETV2_TEST_SEED``, default 0.
"""
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from effnetv2 import EfficientNetV2
from effnetv2.data import make_shapes_dataset

from train_script import fresh_accelerate, train  # noqa: F401  (fresh_accelerate: autouse)

pytestmark = pytest.mark.numerics  # compares floating-point results or trains: see CONTRIBUTING.md

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "assets" / "model"
SEED = int(os.environ.get("EFFNETV2_TEST_SEED", "0"))

MIN_FINE_TUNE_ACCURACY = 0.8  # 30 held-out images of 3 classes (chance: 1/3)
MIN_SCRATCH_ACCURACY = 0.6  # 60 held-out images of 3 classes (chance: 1/3)
MAX_SCRATCH_VAL_LOSS = math.log(3)  # below what a uniform guess scores (SSE4.1, one thread: 1.02 at the seed)


def fine_tune(tmp: Path, seed: int = SEED) -> dict:
    """The bundled model's backbone (frozen, the default with --weights), a new classifier for 3
    classes, 49 steps of the default recipe (SGD, lr 0.01, gradient clipping on for the attention
    pool) on 30 images of a seed the bundled model never saw; 30 more are held out. Crops keep at
    least half the image: smaller ones often miss the object, a label no 49 steps can fit. Returns
    the run's metrics.json."""
    data = make_shapes_dataset(tmp / "shapes", num_per_class=20, image_size=128, seed=1234 + seed,
                               classes=("circle", "star", "triangle"))
    assert train.main(["--data-path", str(data), "--output-dir", str(tmp / "run"), "--weights", str(BUNDLED),
                       "--batch-size", "4", "--workers", "0", "--cpu", "--seed", str(seed), "--epochs", "7",
                       "--val-fraction", "0.5", "--crop-scale", "0.5", "1"]) == 0
    return json.loads((tmp / "run" / "metrics.json").read_text())


@pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(), reason="the bundled model is not in this checkout")
def test_short_fine_tune_on_shapes_learns(tmp_path):
    m = fine_tune(tmp_path)
    assert m["final"]["val_images"] == 30 and m["optimizer_steps"] == 49
    assert m["final"]["val_accuracy"] >= MIN_FINE_TUNE_ACCURACY, [
        (h["train_loss"], h["val_loss"], h["val_accuracy"]) for h in m["history"]]
    tuned = EfficientNetV2.from_pretrained(tmp_path / "run")
    assert list(tuned.id2label.values()) == ["circle", "star", "triangle"] and tuned.pool_type == "attention"
    card = (tmp_path / "run" / "README.md").read_text()
    assert "--weights model" in card and "frozen backbone" in card  # the folder's name, no local path


def colour_squares(root: Path, per_class: int, seed: int, size: int = 40) -> Path:
    """A folder per class (red, green, blue): filled squares of random size and place on grey noise."""
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    for name, colour in {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = Image.fromarray(noise.integers(60, 200, (size, size, 1)).repeat(3, 2).astype(np.uint8))
            side = rng.randint(size // 4, size // 2)
            x, y = rng.randint(0, size - side), rng.randint(0, size - side)
            ImageDraw.Draw(image).rectangle([x, y, x + side, y + side], fill=colour)
            image.save(root / name / f"{i}.png")
    return root


def from_scratch(tmp: Path, seed: int = SEED) -> dict:
    """b0 from random weights, 42 AdamW steps (batch 8, 32 px) on 60 images of an easy task, the
    colour of a square; 60 more are held out. Crops keep at least half the image, so that they
    show the square; no dropout or stochastic depth, whose noise a run this short cannot average
    out. Returns the run's metrics.json."""
    data = colour_squares(tmp / "colours", per_class=40, seed=seed)
    assert train.main(["--data-path", str(data), "--output-dir", str(tmp / "run"), "--variant", "b0",
                       "--image-size", "32", "--workers", "0", "--cpu", "--seed", str(seed), "--epochs", "6",
                       "--val-fraction", "0.5", "--crop-scale", "0.5", "1", "--drop-path-rate", "0", "--dropout", "0",
                       "--batch-size", "8", "--optimizer", "adamw", "--lr", "3e-3",
                       "--weight-decay", "0.05"]) == 0
    return json.loads((tmp / "run" / "metrics.json").read_text())


def test_from_scratch_training_moves_towards_the_labels(tmp_path):
    """The loss falls and the held-out images are classified well above chance. (From scratch,
    EfficientNets need thousands of steps to learn shapes; the fine-tune above is the real learning
    check.)"""
    m = from_scratch(tmp_path)
    assert m["final"]["val_images"] == 60 and m["optimizer_steps"] == 42
    history = [(h["train_loss"], h["val_loss"], h["val_accuracy"]) for h in m["history"]]
    assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"], history
    assert m["final"]["val_loss"] < MAX_SCRATCH_VAL_LOSS, history
    assert m["final"]["val_accuracy"] >= MIN_SCRATCH_ACCURACY, history
