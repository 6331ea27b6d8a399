"""A freshly initialised attention pool, trained to classify shapes, puts its attention on the object.

The data: ``shapes`` images (192 px, the bundled model's size; class = the outline, colour random, clutter and distractors), so
no colour or global statistic gives the class away; each image's object box is in its annotations.
The features: the bundled model's frozen backbone (``forward_features``, a 6x6 grid at 192 px),
computed once. The pool: a new ``AttentionPool2d`` (4 heads, 64 channels) and linear classifier,
trained for 100 AdamW steps on 150 images, from three initialisations. The measure,
``evaluate.attention_mass_in_box`` on 100 held-out images, gives a uniform map exactly the box's share of
the image area: the untrained pools put that share in the box, the trained ones three to four and a half
times more, and more than the same maps transposed.

Why not a whole network from scratch: it needs thousands of steps to tell shapes apart, and on a task
it learns in a few dozen (the colour of a square) it needs no attention to the object, so the mass
after such a short run depends on float summation order (CPU kernels, thread count). Here every
initialisation is far from the threshold. The seed of the data and initialisations is
``EFFNETV2_TEST_SEED`` (default 0), for ``benchmarks/training_test_margins.py``.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effnetv2 import EfficientNetV2, transforms_for
from effnetv2.attention import AttentionPool2d
from effnetv2.data import make_shapes_dataset
from effnetv2.evaluate import attention_mass_in_box, box_in_view
from effnetv2.images import open_image

BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "model"
SEED = int(os.environ.get("EFFNETV2_TEST_SEED", "0"))
INITS = 3  # pool initialisations per run, each checked on its own
# trained pools put 4.2-4.6x the box's area share in the box (seed 0; 3.2x the lowest over seeds 0-2,
# 1 and 2 threads, AVX-512/AVX2/SSE4.1 kernels); maps read upside down give 1.2-1.3x, scores that get no
# gradient 1.3x. Maps read transposed still give 2.4-2.7x (the objects are large), so the orientation is
# checked on its own: the true maps put 1.7x the mass of their transposes in the box.
MIN_MEAN_MASS_OVER_SHARE = 2.0
MIN_MASS_OVER_SHARE = 1.5  # for each init
MIN_MASS_OVER_TRANSPOSED = 1.3  # for each init: mass of the maps / mass of the same maps transposed
MIN_ACCURACY = 0.85  # on 100 held-out images of 5 classes (chance: 0.2)
MAX_UNTRAINED_OFFSET = 0.02  # untrained pools: |mass - share|, as a uniform map would give
pytestmark = pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(), reason="no bundled model in this checkout")


def frozen_features(backbone: EfficientNetV2, root: Path):
    """Features ``[N, C, h, w]``, labels ``[N]`` and object boxes (in the model's view) of a shapes set."""
    annotations = json.loads((root / "annotations.json").read_text())
    names, transform, classes = sorted(annotations), transforms_for(backbone), sorted(backbone.label2id)
    images = [open_image(root / name) for name in names]
    with torch.no_grad():
        feats = torch.cat([backbone.forward_features(torch.stack([transform(i) for i in images[s:s + 50]]))
                           for s in range(0, len(images), 50)])
    labels = torch.tensor([classes.index(annotations[name]["label"]) for name in names])
    boxes = [box_in_view(annotations[name]["box"], image.size, backbone.config) for name, image in zip(names, images)]
    return feats, labels, boxes


def held_out_figures(pool, classifier, feats, labels, boxes, size: int) -> tuple[float, float, float]:
    """Accuracy, mean attention mass in the object box (pooled query, mean over heads), and the same
    mass for the maps transposed (rows read as columns)."""
    with torch.no_grad():
        pooled, maps = pool(feats, return_attention=True)  # maps [N, heads, h, w]
        accuracy = (classifier(pooled).argmax(-1) == labels).float().mean().item()
    mass, transposed = (float(np.mean([attention_mass_in_box(m, box, (size, size)) for m, box in zip(grid, boxes)]))
                        for grid in (maps, maps.transpose(-1, -2)))
    return accuracy, mass, transposed


def shapes_features(root: Path, seed: int):
    """The bundled backbone's features of 150 training and 100 held-out shapes images of data seeds
    derived from ``seed`` (none used anywhere else), and the image size."""
    backbone = EfficientNetV2.from_pretrained(BUNDLED).float().eval()
    size = backbone.config["image_size"]
    train, test = (frozen_features(backbone, make_shapes_dataset(root / name, num_per_class=count, image_size=size,
                                                                 seed=base + seed))
                   for name, count, base in (("train", 30, 530_000), ("test", 20, 540_000)))
    return train, test, size


def train_pools(train, test, size: int, seed: int, steps: int = 100) -> dict:
    """``INITS`` fresh pools and classifiers trained on ``train`` features; their held-out figures
    (accuracy, mass in the box) before and after training, and the mean box share."""
    (train_feats, train_labels, _), runs = train, []
    for init in range(INITS):
        torch.manual_seed(INITS * seed + init)
        pool = AttentionPool2d(train_feats.shape[1], dim=64, num_heads=4)
        classifier = torch.nn.Linear(64, int(train_labels.max()) + 1)
        before = held_out_figures(pool, classifier, *test, size)
        optimizer = torch.optim.AdamW([*pool.parameters(), *classifier.parameters()], lr=2e-3, weight_decay=0.0)
        for _ in range(steps):
            batch = torch.randint(0, len(train_labels), (32,))
            loss = F.cross_entropy(classifier(pool(train_feats[batch])), train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        runs.append({"before": before, "after": held_out_figures(pool, classifier, *test, size)})
    share = float(np.mean([(b[2] - b[0]) * (b[3] - b[1]) / size ** 2 for b in test[2]]))
    return {"share": share, "runs": runs}


def measure(root: Path, seed: int = SEED) -> dict:
    """What the tests below check, for ``seed``: ``train_pools`` on the bundled backbone's features."""
    return train_pools(*shapes_features(root, seed), seed)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return measure(tmp_path_factory.mktemp("shapes"))


@pytest.mark.numerics
def test_the_trained_pool_classifies_held_out_images(trained):
    # Only the trained accuracy is a verdict: on the bundled backbone's features, an untrained pool and
    # classifier are sometimes far above chance by luck (0.52 for one init of seed 2, under AVX2 emulation).
    for run in trained["runs"]:
        assert run["after"][0] >= MIN_ACCURACY, trained


@pytest.mark.numerics
def test_attention_mass_inside_the_box_beats_its_area_share(trained):
    share = trained["share"]
    print(f"\nattention mass inside the object box (100 held-out images), box area share {share:.3f}: "
          + ", ".join(f"{r['before'][1]:.3f} -> {r['after'][1]:.3f}" for r in trained["runs"]))
    for run in trained["runs"]:
        (_, mass_before, _), (_, mass_after, transposed) = run["before"], run["after"]
        assert abs(mass_before - share) < MAX_UNTRAINED_OFFSET, trained  # untrained: like a uniform map
        assert mass_after > MIN_MASS_OVER_SHARE * share, trained  # trained: the object's cells get more
        assert mass_after > MIN_MASS_OVER_TRANSPOSED * transposed, trained  # rows and columns not swapped
    assert np.mean([run["after"][1] for run in trained["runs"]]) > MIN_MEAN_MASS_OVER_SHARE * share, trained
