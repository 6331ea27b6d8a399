"""An attention pool trained for a few steps looks at the object.

The data: a tiny ``shapes`` set of a seed the bundled model never saw, where ``annotations.json``
gives each object's box. The model: the bundled model's backbone (frozen, so its features are
computed once) under a freshly initialised attention pool and classifier, trained for 150 Adam
steps on 60 images. Where the pooled query's attention goes is learned here, not inherited: the
fresh pool's mass inside the box is measured before training too. The measure
(``viz.attention_mass_in_box``) gives a uniform map exactly the box's share of the image area.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effnetv2 import EfficientNetV2, transforms_for
from effnetv2.data import make_shapes_dataset
from effnetv2.images import open_image
from effnetv2.viz import attention_mass_in_box

BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "model"
SIZE = 128
CLASSES = ("circle", "square", "triangle", "star", "hexagon")

pytestmark = pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(),
                                reason="the bundled model is not in this checkout")


def load_set(root: Path):
    """(images [N, 3, S, S], labels [N], boxes) of a shapes set written at the model's eval size."""
    annotations = json.loads((root / "annotations.json").read_text())
    names = sorted(annotations)
    return names, [annotations[n]["label"] for n in names], [annotations[n]["box"] for n in names]


@torch.no_grad()
def features(model, root, names):
    transform = transforms_for(model, train=False)
    return model.forward_features(torch.stack([transform(open_image(root / n)) for n in names]))


def mass_and_share(model, feats, boxes):
    with torch.no_grad():
        _, maps = model.head.attn_pool(feats, return_attention=True)
    mass = [attention_mass_in_box(m, box, (SIZE, SIZE)) for m, box in zip(maps, boxes)]
    share = [(b[2] - b[0]) * (b[3] - b[1]) / SIZE**2 for b in boxes]
    return float(np.mean(mass)), float(np.mean(share))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    model = EfficientNetV2.from_pretrained(BUNDLED).float()
    assert model.pool_type == "attention" and model.config["image_size"] == SIZE
    model.head.attn_pool.reset_parameters()  # a fresh pool: what it attends to must be learned
    model.reset_classifier(len(CLASSES), id2label=dict(enumerate(CLASSES)))
    root = tmp_path_factory.mktemp("data")
    train_root = make_shapes_dataset(root / "train", num_per_class=12, image_size=SIZE, seed=4321)
    test_root = make_shapes_dataset(root / "test", num_per_class=6, image_size=SIZE, seed=8765)
    (train_names, train_labels, _), (test_names, test_labels, test_boxes) = load_set(train_root), load_set(test_root)
    train_feats, test_feats = features(model, train_root, train_names), features(model, test_root, test_names)
    train_y = torch.tensor([CLASSES.index(c) for c in train_labels])
    test_y = torch.tensor([CLASSES.index(c) for c in test_labels])
    before = mass_and_share(model, test_feats, test_boxes)

    head = [*model.head.attn_pool.parameters(), *model.head.classifier.parameters()]
    optimizer = torch.optim.Adam(head, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = torch.randint(0, len(train_names), (16,), generator=generator)
        loss = F.cross_entropy(model.forward_head(train_feats[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model.forward_head(test_feats).argmax(-1) == test_y).float().mean().item()
    return {"before": before, "after": mass_and_share(model, test_feats, test_boxes), "accuracy": accuracy}


def test_the_trained_pool_classifies_held_out_images(trained):
    assert trained["accuracy"] >= 0.8, trained


def test_attention_mass_inside_the_box_beats_its_area_share(trained):
    (mass_before, share), (mass_after, _) = trained["before"], trained["after"]
    print(f"\nattention mass inside the object box (30 held-out images): {mass_before:.3f} with a fresh pool, "
          f"{mass_after:.3f} after 150 steps; the box's area share is {share:.3f}")
    assert mass_after > 1.5 * share  # the object's cells get far more than a uniform map gives them
    assert mass_after > mass_before + 0.05  # and that was learned in these steps
