"""hubconf.py: torch.hub loads every variant, with and without weights, from a local checkout."""
import importlib.util
from pathlib import Path

import pytest
import torch

from effnetv2 import EfficientNetV2

REPO = str(Path(__file__).resolve().parents[1])


def test_every_variant_has_an_entry():
    spec = importlib.util.spec_from_file_location("hubconf", Path(REPO) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert {"efficientnetv2", "efficientnetv2_b0", "efficientnetv2_b1", "efficientnetv2_b2", "efficientnetv2_b3",
            "efficientnetv2_s", "efficientnetv2_m", "efficientnetv2_l", "efficientnetv2_xl"} == entries
    assert hubconf.dependencies == ["torch", "torchvision", "huggingface_hub", "safetensors"]


def test_random_init_with_options():
    model = torch.hub.load(REPO, "efficientnetv2_b0", source="local", num_classes=5)
    assert isinstance(model, EfficientNetV2) and model.variant == "b0" and model.num_classes == 5
    assert sum(p.numel() for p in torch.hub.load(REPO, "efficientnetv2", source="local", variant="b0").parameters()) \
        == 7_139_704  # timm's tf_efficientnetv2_b0 with 1000 classes


def test_weights_from_a_saved_folder(tmp_path):
    saved = EfficientNetV2("b0", num_classes=3, id2label={0: "a", 1: "b", 2: "c"}, image_size=64)
    saved.save_pretrained(tmp_path / "mine")
    model = torch.hub.load(REPO, "efficientnetv2", source="local", weights=str(tmp_path / "mine"))
    assert not model.training and model.id2label == {"0": "a", "1": "b", "2": "c"}
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())
    fresh = torch.hub.load(REPO, "efficientnetv2_b0", source="local", weights=str(tmp_path / "mine"), num_classes=7)
    assert fresh.num_classes == 7
    assert torch.equal(fresh.stem.conv.weight, saved.stem.conv.weight)
    with pytest.raises(ValueError, match="are EfficientNetV2-b0, not s"):
        torch.hub.load(REPO, "efficientnetv2_s", source="local", weights=str(tmp_path / "mine"))
    with pytest.raises(ValueError, match="only num_classes can change"):
        torch.hub.load(REPO, "efficientnetv2", source="local", weights=str(tmp_path / "mine"), pool="attention")
