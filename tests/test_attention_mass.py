"""An attention-pool model trained for a few steps puts its attention on the object.

The data: 128 px images of grey noise with one filled square whose colour is the class (red, green,
blue) at a random place and size, so the object's box is known and only its pixels carry the label.
The model: EfficientNetV2-b0 with an attention pool (4 heads), trained from scratch end to end for
80 AdamW steps at 64 px (a 2x2 feature grid). The measure, ``viz.attention_mass_in_box``, gives a
uniform map exactly the box's share of the image area; before training the pooled query's mass in
the box is that share, after training it is clearly more, on held-out images.
"""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from effnetv2 import EfficientNetV2, transforms_for
from effnetv2.training import recalibrate_batchnorm
from effnetv2.viz import attention_mass_in_box

SIZE = 128
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 40), "blue": (40, 40, 220)}


def colour_squares(count: int, seed: int):
    """``count`` (image, label, box) triples; the box ``[x0, y0, x1, y1]`` is in pixels, ends exclusive."""
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    items = []
    for i in range(count):
        label = i % len(COLOURS)
        image = Image.fromarray(noise.integers(70, 190, (SIZE, SIZE, 1)).repeat(3, 2).astype(np.uint8))
        side = rng.randint(SIZE // 5, SIZE // 3)
        x, y = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
        ImageDraw.Draw(image).rectangle([x, y, x + side - 1, y + side - 1], fill=list(COLOURS.values())[label])
        items.append((image, label, [x, y, x + side, y + side]))
    return items


def evaluate(model, x_train, x_test, y_test, test_items):
    """Accuracy, mean attention mass in the box and mean box area share on the held-out images."""
    recalibrate_batchnorm(model, x_train.split(32))  # BatchNorm statistics of these weights
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x_test)
        accuracy = (model.forward_head(feats).argmax(-1) == y_test).float().mean().item()
        _, maps = model.head.attn_pool(feats, return_attention=True)
    mass = np.mean([attention_mass_in_box(m, box, (SIZE, SIZE)) for m, (_, _, box) in zip(maps, test_items)])
    share = np.mean([(b[2] - b[0]) * (b[3] - b[1]) / SIZE**2 for _, _, b in test_items])
    return accuracy, float(mass), float(share)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = EfficientNetV2("b0", num_classes=3, pool="attention", num_heads=4, attn_dim=64, image_size=64,
                           drop_path_rate=0.0, dropout=0.0, id2label=dict(enumerate(COLOURS)))
    train_items, test_items = colour_squares(96, seed=0), colour_squares(48, seed=1)
    transform = transforms_for(model, train=False)
    x_train = torch.stack([transform(image) for image, _, _ in train_items])
    y_train = torch.tensor([label for _, label, _ in train_items])
    x_test = torch.stack([transform(image) for image, _, _ in test_items])
    y_test = torch.tensor([label for _, label, _ in test_items])
    before = evaluate(model, x_train, x_test, y_test, test_items)

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(80):
        model.train()
        batch = torch.randint(0, len(train_items), (16,), generator=generator)
        loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"before": before, "after": evaluate(model, x_train, x_test, y_test, test_items)}


def test_the_trained_model_classifies_held_out_images(trained):
    assert trained["before"][0] < 0.5 and trained["after"][0] >= 0.9, trained


def test_attention_mass_inside_the_box_beats_its_area_share(trained):
    (_, mass_before, share), (_, mass_after, _) = trained["before"], trained["after"]
    print(f"\nattention mass inside the object box (48 held-out images): {mass_before:.3f} before training, "
          f"{mass_after:.3f} after 80 steps; the box's area share is {share:.3f}")
    assert abs(mass_before - share) < 0.01  # untrained: as good as a uniform map
    assert mass_after > 1.25 * share  # trained: the object's cells get more than their area share
    assert mass_after > mass_before + 0.02
