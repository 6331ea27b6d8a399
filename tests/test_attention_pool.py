"""The attention-pooling head: other input sizes, Hub round trip, reset_classifier, attention_maps,
and that a briefly trained model looks at the object."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effnetv2 import EfficientNetV2
from effnetv2.attention import AttentionPool2d, split_heads, standardised_tokens
from effnetv2.training import recalibrate_batchnorm

pytestmark = pytest.mark.numerics  # compares floating-point results or trains: see CONTRIBUTING.md

HEADS, WIDTH = 4, 64


def _recalibrate_batchnorm(model: EfficientNetV2, x: torch.Tensor) -> EfficientNetV2:
    """Set every BatchNorm's running statistics to those of ``x`` (a "precise BN" pass), then eval.

    A freshly built or briefly trained model still carries running statistics far from its
    activations (a fresh one gives features ~1e-7 in eval mode), which would hide what it learned.
    """
    recalibrate_batchnorm(model, [x])
    return model.eval()


@pytest.fixture(scope="module")
def pooled_model():
    torch.manual_seed(0)
    model = EfficientNetV2("b0", num_classes=3, pool="attention", num_heads=HEADS, attn_dim=WIDTH)
    return _recalibrate_batchnorm(model, torch.randn(4, 3, 64, 64))


def test_position_embedding_is_resampled_to_the_grid():
    pool = AttentionPool2d(32, dim=16, num_heads=4, grid_size=7)
    assert pool.resampled_pos_embed((7, 7)) is pool.pos_embed
    assert pool.resampled_pos_embed((3, 5)).shape == (1, 16, 3, 5)
    with torch.no_grad():
        pool.pos_embed.copy_(torch.arange(16.0).view(1, 16, 1, 1).expand(1, 16, 7, 7))
    torch.testing.assert_close(pool.resampled_pos_embed((2, 9)), torch.arange(16.0).view(1, 16, 1, 1).expand(1, 16, 2, 9))
    x = torch.randn(2, 32, 3, 5)
    tokens = pool.tokens(x)
    assert tokens.shape == (2, 15, 16)
    torch.testing.assert_close(tokens, (pool.proj(x) + pool.resampled_pos_embed((3, 5))).flatten(2).transpose(1, 2))


def test_pool_weights_equal_torch_multihead_attention_from_the_pooled_query():
    pool = AttentionPool2d(32, dim=16, num_heads=4).eval()
    ref = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        attn = pool.attn
        ref.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        ref.out_proj.load_state_dict(attn.out_proj.state_dict())
        pool.query.normal_()
    x = torch.randn(2, 32, 3, 4)
    out, maps = pool(x, return_attention=True)
    tokens = pool.tokens(x)
    ref_out, ref_weights = ref(pool.pooled_query(tokens), tokens, tokens, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps, ref_weights[:, :, 0].reshape(2, 4, 3, 4))


def test_pool_init_gives_order_one_scores():
    """Scores that vary at the start: neither uniform (with N(0, 0.01) projections the scores are
    ~1e-4, the maps uniform to 1e-4 and Q, K get almost no gradient) nor one-hot."""
    pool = EfficientNetV2("b0", num_classes=3, pool="attention", num_heads=HEADS, attn_dim=WIDTH).head.attn_pool
    feats = torch.randn(4, 1280, 4, 4).relu()  # like the head's SiLU activations
    _, maps = pool(feats, return_attention=True)
    peaks = maps.flatten(2).amax(-1)
    assert peaks.min() > 1.05 / 16 and peaks.max() < 0.9


def test_runs_at_other_input_sizes(pooled_model):
    assert pooled_model.head.attn_pool.pos_embed.shape == (1, WIDTH, 7, 7)
    for size, grid in [((64, 64), (2, 2)), ((96, 160), (3, 5)), ((130, 40), (5, 2))]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            logits = pooled_model(x)
        assert logits.shape == (1, 3) and torch.isfinite(logits).all()
        maps = pooled_model.attention_maps(x)
        assert maps.shape == (1, HEADS, *grid)
        torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(1, HEADS))


def test_save_and_load_through_the_hub_mixin(pooled_model, tmp_path):
    pooled_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["pool"], config["num_heads"], config["attn_dim"]) == ("attention", HEADS, WIDTH)
    loaded = EfficientNetV2.from_pretrained(tmp_path)
    assert not loaded.training
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), pooled_model(x))
    assert torch.equal(loaded.attention_maps(x), pooled_model.attention_maps(x))
    assert torch.equal(loaded.head.attn_pool.pos_embed, pooled_model.head.attn_pool.pos_embed)


def test_reset_classifier_keeps_the_pool(pooled_model):
    model = EfficientNetV2("b0", num_classes=3, pool="attention", num_heads=HEADS, attn_dim=WIDTH)
    model.load_state_dict(pooled_model.state_dict())
    model.eval()
    x = torch.randn(1, 3, 64, 96)
    before = model.attention_maps(x)
    pool_state = {k: v.clone() for k, v in model.head.attn_pool.state_dict().items()}
    model.reset_classifier(7, id2label={i: f"c{i}" for i in range(7)})
    assert all(torch.equal(pool_state[k], v) for k, v in model.head.attn_pool.state_dict().items())
    assert torch.equal(model.attention_maps(x), before)
    assert model.head.classifier.in_features == WIDTH
    with torch.no_grad():
        assert model(x).shape == (1, 7)


@pytest.mark.parametrize("pool", ["attention", "avg"])
def test_attention_maps_for_a_query_cell_on_non_square_inputs(pool, pooled_model):
    if pool == "attention":
        model, heads = pooled_model, HEADS
    else:
        model, heads = _recalibrate_batchnorm(EfficientNetV2("b0", num_classes=3, num_heads=8), torch.randn(4, 3, 64, 64)), 8
    x = torch.randn(2, 3, 64, 96)  # grid 2 x 3
    for query in (None, (1, 2), (0, 0)):
        maps = model.attention_maps(x, query=query)
        assert maps.shape == (2, heads, 2, 3)
        assert torch.all(maps >= 0)
        torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, heads))
    assert not torch.allclose(model.attention_maps(x, query=(1, 2)), model.attention_maps(x, query=(0, 0)))
    with torch.no_grad():
        feats = model.forward_features(x)
    if pool == "attention":  # the token at (1, 2) through the pool's own projections
        attn = model.head.attn_pool.attn
        tokens = model.head.attn_pool.tokens(feats)
        q, k = split_heads(attn.q_proj(tokens[:, 5:6]), heads), split_heads(attn.k_proj(tokens), heads)
    else:  # parameter-free: standardised tokens, Q = K
        q = k = split_heads(standardised_tokens(feats), heads)
        q = q[:, :, 5:6]
    expected = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1).reshape(2, heads, 2, 3)
    torch.testing.assert_close(model.attention_maps(x, query=(1, 2)), expected, atol=1e-5, rtol=1e-4)
    for bad in [(2, 0), (0, 3), (-1, 1)]:
        with pytest.raises(ValueError, match="outside the 2x3 feature grid"):
            model.attention_maps(x, query=bad)
