"""effnetv2.finetune: initial weights from state-dict files (ours and torchvision's) for a new set of classes."""
import pytest
import torch

from effnetv2 import EfficientNetV2
from effnetv2.errors import UsageError
from effnetv2.finetune import build_model


def test_initial_weights_from_pth_files(tmp_path):
    source = EfficientNetV2("b0", num_classes=7, pool="attention", num_heads=4, attn_dim=64)
    torch.save(source.state_dict(), tmp_path / "ours.pth")
    model = build_model(str(tmp_path / "ours.pth"), "b0", ["a", "b"])
    assert model.pool_type == "attention" and model.num_classes == 2 and model.id2label == {"0": "a", "1": "b"}
    state, src = model.state_dict(), source.state_dict()
    assert all(torch.equal(state[k], src[k]) for k in state if not k.startswith("head.classifier."))
    with pytest.raises(UsageError, match="--weights .*not an EfficientNetV2-s state dict"):
        build_model(str(tmp_path / "ours.pth"), "s", ["a", "b"])


def test_initial_weights_from_a_torchvision_pth(tmp_path):
    from torchvision.models import efficientnet_v2_s

    tv = efficientnet_v2_s()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    model = build_model(str(tmp_path / "tv.pth"), "s", ["a", "b", "c"])
    assert model.variant == "s" and model.num_classes == 3
    assert torch.equal(model.stem.conv.weight, tv.features[0][0].weight)
    assert torch.equal(model.head.project_conv.conv.weight, tv.features[7][0].weight)
