"""effnetv2.evaluate: boxes through the eval transform, accuracy and attention-in-box on shapes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from effnetv2 import EfficientNetV2
from effnetv2.data import make_shapes_dataset
from effnetv2.card import CARD_BEGIN, CARD_END
from effnetv2.evaluate import attention_mass_in_box, box_in_view, evaluate
from effnetv2.evaluate.__main__ import main
from effnetv2.shapes import SHAPES

ROOT = Path(__file__).resolve().parents[1]


def test_box_follows_the_resize_and_centre_crop():
    cfg = {"image_size": 64, "crop_pct": 1.0}
    assert box_in_view([10, 20, 30, 40], (64, 64), cfg) == [10, 20, 30, 40]
    # 256x128 → short side to 64 (scale 0.5) → 128x64, centre crop drops 32 px on the left
    assert box_in_view([64, 0, 192, 128], (256, 128), cfg) == [0, 0, 64, 64]
    assert box_in_view([0, 0, 40, 128], (256, 128), cfg) == [0, 0, 0, 64]  # cropped away: empty
    # crop_pct 0.8: resize to 80, crop 64 → 8 px off each side
    assert box_in_view([0, 0, 80, 80], (80, 80), {"image_size": 64, "crop_pct": 0.8}) == [0, 0, 64, 64]


@pytest.mark.numerics
def test_attention_mass_in_box():
    maps = torch.zeros(2, 2, 3)
    maps[0, 1, 2] = 1.0
    maps[1] = 1 / 6
    assert attention_mass_in_box(maps[0], [60, 30, 90, 60], (90, 60)) == pytest.approx(1.0)
    assert attention_mass_in_box(maps[0], [0, 0, 60, 60], (90, 60)) == pytest.approx(0.0)
    assert attention_mass_in_box(maps[0], [75, 45, 90, 60], (90, 60)) == pytest.approx(0.25)  # quarter cell
    # a uniform map gives the box's area share, whatever the box
    for box in ([0, 0, 45, 60], [10, 7, 33, 51], [0, 0, 90, 60]):
        share = (box[2] - box[0]) * (box[3] - box[1]) / (90 * 60)
        assert attention_mass_in_box(maps[1], box, (90, 60)) == pytest.approx(share)
    # [heads, h, w]: the mean over heads; numpy works too
    assert attention_mass_in_box(maps.numpy(), [60, 30, 90, 60], (90, 60)) == pytest.approx((1 + 1 / 6) / 2)
    with pytest.raises(ValueError, match="x0 <= x1"):
        attention_mass_in_box(maps[0], [50, 0, 10, 10], (90, 60))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_per_class=2, image_size=64, seed=5)


def _model() -> EfficientNetV2:
    return EfficientNetV2("b0", num_classes=len(SHAPES), id2label=dict(enumerate(SHAPES)), pool="attention",
                          num_heads=2, attn_dim=32, image_size=64, crop_pct=1.0).eval()


def _always(model, monkeypatch, label: str) -> None:
    """The model answers ``label`` for every image and puts all attention on the top-right cell."""
    def logits(x):
        out = torch.zeros(len(x), len(SHAPES))
        out[:, SHAPES.index(label)] = 1
        return out

    def top_right(x, query=None):  # a 2x2 grid over 64 px: row 0, column 1 is x in [32, 64), y in [0, 32)
        maps = torch.zeros(len(x), 2, 2, 2)
        maps[:, :, 0, 1] = 1
        return maps
    monkeypatch.setattr(model, "forward", logits)
    monkeypatch.setattr(model, "attention_maps", top_right)


@pytest.mark.numerics
def test_figures_match_what_the_annotations_say(shapes, monkeypatch):
    """Every figure worked out from annotations.json by hand: the images are 64 px and the model
    sees them whole (image_size 64, crop_pct 1), so boxes need no mapping."""
    annotations = json.loads((shapes / "annotations.json").read_text())
    model = _model()
    _always(model, monkeypatch, "star")
    result = evaluate(model, shapes, batch_size=3)  # batches that do not divide the 10 images
    masses, shares = [], []
    for item in annotations.values():
        x0, y0, x1, y1 = item["box"]
        masses.append(max(0, x1 - max(x0, 32)) * max(0, min(y1, 32) - y0) / 32 ** 2)
        shares.append((x1 - x0) * (y1 - y0) / 64 ** 2)
    assert result["images"] == len(annotations) == 2 * len(SHAPES)
    assert result["accuracy"] == pytest.approx(sum(a["label"] == "star" for a in annotations.values()) / 10)
    assert result["per_class_accuracy"] == {label: float(label == "star") for label in SHAPES}
    assert result["attention_mass_in_box"] == pytest.approx(np.mean(masses))
    assert result["box_area_share"] == pytest.approx(np.mean(shares))
    assert result["mass_over_share"] == pytest.approx(sum(masses) / sum(shares))
    assert result["images_with_mass_above_share"] == pytest.approx(np.mean(np.array(masses) > np.array(shares)))
    assert result["attention_mass_in_box_per_head"] == pytest.approx([np.mean(masses)] * 2, abs=1e-4)
    # faithfulness table: a uniform map puts exactly the box's share in the box, the attention kind is
    # the attention mass above, and every AUC is a probability integrated over [0, 1]
    assert set(result["maps"]) == {"attention", "class attribution", "Grad-CAM", "random", "uniform"}
    assert result["maps"]["uniform"]["mass_in_box"] == pytest.approx(np.mean(shares))
    assert result["maps"]["attention"]["mass_in_box"] == pytest.approx(np.mean(masses))
    assert all(0 < m["deletion_auc"] < 1 and 0 < m["insertion_auc"] < 1 for m in result["maps"].values())


@pytest.mark.numerics
def test_command_line_prints_writes_json_and_updates_the_card(shapes, tmp_path, capsys):
    folder = tmp_path / "model"
    _model().save_pretrained(folder)
    card_before = (folder / "README.md").read_text()
    assert CARD_BEGIN not in card_before
    out_json = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, "-m", "effnetv2.evaluate", "--model", str(folder), "--data", str(shapes),
                           "--batch-size", "4", "--json", str(out_json), "--update-card"], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    written = json.loads(out_json.read_text())
    assert printed == written and written["images"] == 10
    card = (folder / "README.md").read_text()
    assert card.count(CARD_BEGIN) == 1 and card.count(CARD_END) == 1
    assert f"| accuracy | {written['accuracy']:.4f} |" in card
    assert f"| the box's share of the image (what uniform attention would give) | {written['box_area_share']:.3f} |" in card
    assert f"python -m effnetv2.evaluate --model {folder} --data {shapes}" in card
    attribution = written["maps"]["class attribution"]
    assert (f"| class attribution | {attribution['deletion_auc']:.3f} | {attribution['insertion_auc']:.3f} | "
            f"{attribution['mass_in_box']:.3f} |") in card
    from huggingface_hub import ModelCard

    [recorded] = ModelCard.load(folder / "README.md").data.eval_results  # model-index, for the Hub
    assert (recorded.dataset_name, recorded.dataset_split, recorded.metric_type) == (shapes.name, "test", "accuracy")
    assert recorded.metric_value == written["accuracy"]
    with pytest.raises(SystemExit):  # a folder without annotations.json is a usage error
        main(["--model", str(folder), "--data", str(tmp_path)])
    assert "has no annotations.json" in capsys.readouterr().err
