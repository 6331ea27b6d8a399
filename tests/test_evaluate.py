"""effnetv2.evaluate: boxes through the eval transform, accuracy and attention-in-box on shapes."""
from __future__ import annotations

import pytest
import torch

from effnetv2 import EfficientNetV2
from effnetv2.data import make_shapes_dataset
from effnetv2.evaluate import CARD_BEGIN, box_in_view, card_section, evaluate, update_card
from effnetv2.shapes import SHAPES


def test_box_follows_the_resize_and_centre_crop():
    cfg = {"image_size": 64, "crop_pct": 1.0}
    assert box_in_view([10, 20, 30, 40], (64, 64), cfg) == [10, 20, 30, 40]
    # 256x128 → short side to 64 (scale 0.5) → 128x64, centre crop drops 32 px on the left
    assert box_in_view([64, 0, 192, 128], (256, 128), cfg) == [0, 0, 64, 64]
    assert box_in_view([0, 0, 40, 128], (256, 128), cfg) == [0, 0, 0, 64]  # cropped away: empty
    # crop_pct 0.8: resize to 80, crop 64 → 8 px off each side
    assert box_in_view([0, 0, 80, 80], (80, 80), {"image_size": 64, "crop_pct": 0.8}) == [0, 0, 64, 64]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_per_class=2, image_size=64, seed=5)


def test_attention_mass_follows_the_maps(shapes, monkeypatch):
    model = EfficientNetV2("b0", num_classes=len(SHAPES), id2label=dict(enumerate(SHAPES)), pool="attention",
                           num_heads=2, attn_dim=32, image_size=64).eval()
    uniform = evaluate(model, shapes, batch_size=4)
    assert uniform["images"] == 2 * len(SHAPES) and 0 <= uniform["accuracy"] <= 1
    assert set(uniform["per_class_accuracy"]) == set(SHAPES)

    def everything_on_one_cell(x, query=None):  # all attention on the top-left cell (32x32 px)
        maps = torch.zeros(len(x), 2, 2, 2)
        maps[:, :, 0, 0] = 1
        return maps
    monkeypatch.setattr(model, "attention_maps", everything_on_one_cell)
    corner = evaluate(model, shapes, batch_size=4)
    assert corner["box_area_share"] == pytest.approx(uniform["box_area_share"])
    assert corner["attention_mass_in_box"] != pytest.approx(uniform["attention_mass_in_box"])
    assert 0 <= corner["attention_mass_in_box"] <= 1


def test_card_section_is_inserted_once(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# Model\n\n## Architecture\n\nblocks\n")
    result = {"images": 10, "accuracy": 0.98, "per_class_accuracy": {"circle": 1.0}, "attention_mass_in_box": 0.5,
              "box_area_share": 0.2, "mass_over_share": 2.5, "images_with_mass_above_share": 0.9,
              "attention_mass_in_box_per_head": [0.4, 0.6]}
    for _ in range(2):
        update_card(card, card_section(result, tmp_path, "python -m effnetv2.evaluate ..."))
    text = card.read_text()
    assert text.count(CARD_BEGIN) == 1 and "| accuracy | 0.9800 |" in text
    assert text.index(CARD_BEGIN) < text.index("## Architecture")
