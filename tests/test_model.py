from dataclasses import astuple

import pytest
import torch
from torch import nn

import effnetv2.model
from effnetv2 import VARIANTS, EfficientNetV2
from effnetv2.configs import round_channels
from effnetv2.layers import Conv2dSame, FusedMBConv, MBConv

# With 1000 classes: the parameter counts of timm's tf_efficientnetv2_{b0..b3,s,m,l,xl} and of torchvision's
# EfficientNet_V2_{S,M,L}_Weights.IMAGENET1K_V1.meta["num_params"] (the same architecture, counted by them).
PARAM_COUNTS = {"b0": 7_139_704, "b1": 8_141_052, "b2": 10_096_086, "b3": 14_358_406,
                "s": 21_458_488, "m": 54_139_356, "l": 118_515_272, "xl": 208_119_808}


@pytest.mark.parametrize("variant", list(PARAM_COUNTS))
def test_parameter_count(variant):
    with torch.device("meta"):
        model = EfficientNetV2(variant)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[variant]


# SPEC.md's stage rows (repeats, kernel, stride, expansion, in_ch, out_ch, block, se_ratio), copied verbatim.
SPEC_STAGES = {
    "s": "(2,3,1,1,24,24,F,0) (4,3,2,4,24,48,F,0) (4,3,2,4,48,64,F,0) (6,3,2,4,64,128,M,.25) (9,3,1,6,128,160,M,.25) "
         "(15,3,2,6,160,256,M,.25)",
    "m": "(3,3,1,1,24,24,F,0) (5,3,2,4,24,48,F,0) (5,3,2,4,48,80,F,0) (7,3,2,4,80,160,M,.25) (14,3,1,6,160,176,M,.25) "
         "(18,3,2,6,176,304,M,.25) (5,3,1,6,304,512,M,.25)",
    "l": "(4,3,1,1,32,32,F,0) (7,3,2,4,32,64,F,0) (7,3,2,4,64,96,F,0) (10,3,2,4,96,192,M,.25) (19,3,1,6,192,224,M,.25) "
         "(25,3,2,6,224,384,M,.25) (7,3,1,6,384,640,M,.25)",
    "xl": "(4,3,1,1,32,32,F,0) (8,3,2,4,32,64,F,0) (8,3,2,4,64,96,F,0) (16,3,2,4,96,192,M,.25) (24,3,1,6,192,256,M,.25) "
          "(32,3,2,6,256,512,M,.25) (8,3,1,6,512,640,M,.25)",
    "b0": "(1,3,1,1,32,16,F,0) (2,3,2,4,16,32,F,0) (2,3,2,4,32,48,F,0) (3,3,2,4,48,96,M,.25) (5,3,1,6,96,112,M,.25) "
          "(8,3,2,6,112,192,M,.25)",
}


@pytest.mark.parametrize("variant", list(SPEC_STAGES))
def test_stage_tables_are_the_spec(variant):
    rows = [row.strip("()").split(",") for row in SPEC_STAGES[variant].split()]
    expected = [(int(r), int(k), int(s), int(e), int(i), int(o), b, float(se)) for r, k, s, e, i, o, b, se in rows]
    assert [astuple(stage) for stage in VARIANTS[variant].stages] == expected


def test_width_rounding_has_no_upward_bump():
    assert round_channels(32 * 1.1) == 32  # 35.2 → 32
    assert round_channels(1280 * 1.1) == 1408
    assert round_channels(16 * 1.2) == 16  # 19.2 → 16
    assert round_channels(3) == 8


def test_b3_scaling():
    stages = VARIANTS["b3"].scaled_stages()
    assert [s.repeats for s in stages] == [2, 3, 3, 5, 7, 12]  # ceil(r * 1.4)
    assert [s.out_chs for s in stages] == [16, 40, 56, 112, 136, 232]
    assert VARIANTS["b3"].head_chs == 1536


def test_block_layout_and_reference_keys():
    model = EfficientNetV2("s", num_classes=10)
    blocks = list(model.blocks)
    assert len(blocks) == 2 + 4 + 4 + 6 + 9 + 15
    assert all(isinstance(b, FusedMBConv) for b in blocks[:10])
    assert all(isinstance(b, MBConv) for b in blocks[10:])
    keys = set(model.state_dict())
    for key in ["stem.conv.weight", "stem.bn.running_mean", "blocks.0.project_conv.conv.weight",
                "blocks.2.expand_conv.conv.weight", "blocks.2.project_conv.bn.weight",
                "blocks.10.expand_conv.conv.weight", "blocks.10.dwconv.conv.weight",
                "blocks.10.se.conv_reduce.weight", "blocks.10.se.conv_expand.bias",
                "blocks.10.project_conv.conv.weight", "head.project_conv.conv.weight",
                "head.classifier.weight"]:
        assert key in keys, key
    # Fused expansion 1: a single conv keeps its activation; no expand conv parameters.
    assert not any(k.startswith("blocks.0.expand_conv") for k in keys)
    assert isinstance(blocks[0].project_conv.act, nn.SiLU)
    assert isinstance(blocks[2].project_conv.act, nn.Identity)
    # SE reduces to int(block_in * 0.25) from the expanded width.
    se = blocks[10].se
    assert se.conv_reduce.in_channels == 64 * 4 and se.conv_reduce.out_channels == 16
    # Only SE convs have a bias.
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert (m.bias is not None) == (".se." in name), name
        if isinstance(m, nn.BatchNorm2d):
            assert m.eps == 1e-3 and m.momentum == 0.1


def test_residual_only_when_shapes_match():
    model = EfficientNetV2("b0")
    for block in model.blocks:
        conv = block.project_conv.conv
        in_chs = (block.expand_conv.conv if hasattr(block.expand_conv, "conv") else conv).in_channels
        stride = max(m.stride[0] for m in block.modules() if isinstance(m, nn.Conv2d))
        assert block.has_residual == (stride == 1 and in_chs == conv.out_channels)


@pytest.mark.numerics
def test_stochastic_depth_rule():
    model = EfficientNetV2("b0", drop_path_rate=0.2)
    rates = [b.drop_path.p for b in model.blocks]
    n = len(rates)
    assert rates == pytest.approx([0.2 * i / n for i in range(n)])


@pytest.mark.numerics
def test_drop_path_statistics():
    """Each sample's branch is kept with probability 1 - p and kept ones are divided by 1 - p."""
    drop = EfficientNetV2("b0", drop_path_rate=0.2).blocks[-1].drop_path
    x = torch.ones(20000, 1, 1, 1)
    drop.p = 0.25
    assert torch.equal(drop.eval()(x), x)
    out = drop.train()(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.75))
    drop.p = 0.0
    assert torch.equal(drop(x), x)


def test_init_scheme():
    model = EfficientNetV2("b0", num_classes=10)
    conv = model.blocks[3].project_conv.conv
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(conv.weight.std().item() - (2 / fan_out) ** 0.5) / (2 / fan_out) ** 0.5 < 0.1
    assert torch.all(model.blocks[5].se.conv_reduce.bias == 0)
    assert torch.all(model.stem.bn.weight == 1) and torch.all(model.stem.bn.bias == 0)
    w = model.head.classifier.weight
    assert abs(w.std().item() - 0.01) < 0.001 and torch.all(model.head.classifier.bias == 0)


@pytest.mark.parametrize("size", [(64, 64), (67, 45)])
@pytest.mark.numerics
def test_forward_shapes(size):
    model = EfficientNetV2("b0", num_classes=7).eval()
    x = torch.randn(2, 3, *size)
    feats = model.forward_features(x)
    h, w = -(-size[0] // 32), -(-size[1] // 32)
    assert feats.shape == (2, 1280, h, w)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, 1280)
    assert torch.allclose(pooled, feats.mean((2, 3)))
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.allclose(logits, model.head.classifier(pooled), atol=1e-6)


def test_same_padding_puts_extra_pixel_right_and_bottom():
    conv = Conv2dSame(1, 1, 3, stride=2, bias=False)
    nn.init.ones_(conv.weight)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 1.0  # top-left pixel: with TF SAME (pad 0 top/left) the first window sees it
    out = conv(x)
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0, 0, 0] == 1.0
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 3, 3] = 1.0  # bottom-right: inside the last window, next to the padded pixel
    assert conv(x)[0, 0, 1, 1] == 1.0
    # Symmetric padding would have included a padded row on top instead.
    sym = nn.Conv2d(1, 1, 3, 2, 1, bias=False)
    nn.init.ones_(sym.weight)
    assert sym(x)[0, 0, 1, 1] == 1.0 and not torch.equal(sym(torch.ones(1, 1, 4, 4)), conv(torch.ones(1, 1, 4, 4)))


@pytest.mark.numerics
def test_same_padding_model_differs_from_symmetric_on_even_input():
    a = EfficientNetV2("b0", padding="same").eval()
    b = EfficientNetV2("b0", padding="symmetric").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert a(x).shape == b(x).shape
    assert not torch.allclose(a.forward_features(x), b.forward_features(x))


def test_reset_classifier_keeps_backbone():
    model = EfficientNetV2("b0", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    feats = model.forward_features(x)
    model.reset_classifier(3, id2label={0: "a", 1: "b", 2: "c"})
    assert model(x).shape == (1, 3)
    assert torch.equal(model.forward_features(x), feats)
    assert model.config["id2label"] == {"0": "a", "1": "b", "2": "c"}
    assert model.config["label2id"] == {"a": 0, "b": 1, "c": 2}
    model.reset_classifier(0)
    assert model(x).shape == (1, 1280)


def test_config_is_json_and_complete():
    import json

    model = EfficientNetV2("b1", num_classes=2, id2label={0: "cat", 1: "dog"})
    cfg = json.loads(json.dumps(model.config))
    assert cfg["id2label"] == {"0": "cat", "1": "dog"} and cfg["label2id"] == {"cat": 0, "dog": 1}
    assert cfg["image_size"] == 240 and cfg["train_image_size"] == 192
    assert cfg["dropout"] == 0.2 and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 1.0
    rebuilt = EfficientNetV2(**cfg)
    assert rebuilt.config == model.config


@pytest.mark.parametrize("kwargs, words", [
    ({"variant": "q"}, "unknown EfficientNetV2 variant"),
    ({"num_classes": "10"}, "num_classes"),
    ({"pool": "max"}, "pool"),
    ({"padding": "valid"}, "padding"),
    ({"num_classes": 2, "id2label": {0: "a"}}, "id2label"),
    ({"image_size": 100000}, "image_size"),
    ({"mean": [0.5, 0.5]}, "mean"),
])
def test_bad_arguments_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        EfficientNetV2(**{"variant": "b0", **kwargs})


@pytest.mark.parametrize("kwargs, words", [
    ({"pool": "attention", "attn_dim": 16000}, "attn_dim must be an integer between 8 and 2048, got 16000"),
    ({"pool": "attention", "attn_dim": 8_000_000}, "attn_dim"),
    ({"pool": "attention", "attn_dim": -8}, "attn_dim .* got -8"),
    ({"pool": "attention", "attn_dim": 12}, "attn_dim must be a multiple of num_heads=8"),
    ({"pool": "attention", "num_heads": 3}, "num_heads=3 must divide the attention width 1280"),
    ({"num_classes": 10**6}, "num_classes must be an integer between 0 and 50000"),
    ({"num_heads": 10**9}, "num_heads must be an integer between 1 and 128"),
    ({"num_heads": True}, "num_heads"),
    ({"mean": [0.5, float("nan"), 0.5]}, "mean must be a list of 3 finite numbers"),
    ({"std": [0.2, float("inf"), 0.2]}, "std must be a list of 3 finite numbers"),
    ({"std": [0.2, 0.0, 0.2]}, "std values must be positive"),
    ({"mean": [True, 0.5, 0.5]}, "mean"),
])
def test_sizes_are_checked_before_anything_is_built(kwargs, words, monkeypatch):
    """A config.json may come from anyone: oversized or nonsensical sizes are refused by name
    before a single layer (and its memory) is created."""
    def built(*args, **kwargs):
        raise AssertionError("a layer was built before the arguments were checked")

    monkeypatch.setattr(effnetv2.model, "ConvBNAct", built)
    with pytest.raises(ValueError, match=words):
        EfficientNetV2(**{"variant": "b0", **kwargs})


def test_save_load_round_trip(tmp_path):
    model = EfficientNetV2("b0", num_classes=3, id2label={0: "x", 1: "y", 2: "z"}).eval()
    for m in model.modules():  # make BN statistics matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    loaded = EfficientNetV2.from_pretrained(tmp_path)
    assert not loaded.training
    assert loaded.config == model.config
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))
    card = (tmp_path / "README.md").read_text()
    assert "library_name: effnetv2" in card and "pipeline_tag: image-classification" in card
    assert "`x`, `y`, `z`" in card
