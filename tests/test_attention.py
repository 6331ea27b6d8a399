"""effnetv2.attention: the multi-head attention module against PyTorch's, and the walk-throughs."""
import pytest
import torch
import torch.nn.functional as F

from effnetv2 import EfficientNetV2
from effnetv2.attention import (MultiHeadSelfAttention, attention_walkthrough, check_cell, merge_heads,
                                self_attention_maps, self_attention_walkthrough, split_heads, standardised_tokens,
                                textbook_example)

STEP_NAMES = ["queries, keys, values", "split into heads", "scaled scores", "softmax", "weighted sum",
              "merge heads", "output"]


def _pair(dim=32, heads=4):
    """Our module (with non-zero biases) and ``nn.MultiheadAttention`` holding the same weights."""
    ours = MultiHeadSelfAttention(dim, heads)
    with torch.no_grad():
        for linear in (ours.q_proj, ours.k_proj, ours.v_proj, ours.out_proj):
            linear.bias.normal_()
    ref = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ours.eval(), ref.eval()


def test_split_merge_round_trip_exactly():
    x = torch.randn(2, 5, 24)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 8)
    for i in range(3):  # head i holds channels i*d .. (i+1)*d - 1
        assert torch.equal(heads[:, i], x[:, :, 8 * i:8 * (i + 1)])
    assert torch.equal(merge_heads(heads), x)
    h = torch.randn(3, 6, 7, 5)
    assert torch.equal(split_heads(merge_heads(h), 6), h)


def test_widths_that_heads_do_not_divide_are_refused():
    with pytest.raises(ValueError, match=r"width 24 is not divisible by num_heads=5.*\[1, 2, 3, 4, 6, 8, 12, 24\]"):
        split_heads(torch.randn(1, 2, 24), 5)
    with pytest.raises(ValueError, match="dim 30 is not divisible by num_heads=4"):
        MultiHeadSelfAttention(30, 4)
    with pytest.raises(ValueError, match="positive integer"):
        MultiHeadSelfAttention(32, 0)
    with pytest.raises(ValueError, match="tokens \\[B, L, D\\]"):
        split_heads(torch.randn(2, 24), 4)


def test_equals_torch_multihead_attention():
    ours, ref = _pair()
    x = torch.randn(3, 7, 32)
    out, weights = ours(x, return_attention=True)
    ref_out, ref_weights = ref(x, x, x, average_attn_weights=False)
    assert weights.shape == (3, 4, 7, 7)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    assert torch.equal(ours(x), out)
    # the gradients flow the same way too
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(x1).square().sum().backward()
    ref(x2, x2, x2)[0].square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)


def test_equals_scaled_dot_product_attention():
    ours, _ = _pair()
    x = torch.randn(2, 6, 32)
    q, k, v = (split_heads(p(x), 4) for p in (ours.q_proj, ours.k_proj, ours.v_proj))
    expected = ours.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_rows_of_the_weights_sum_to_one():
    ours, _ = _pair(48, 6)
    _, weights = ours(torch.randn(2, 9, 48) * 5, return_attention=True)
    assert torch.all(weights >= 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 6, 9))


def test_key_padding_mask():
    ours, ref = _pair()
    x = torch.randn(2, 6, 32)
    lengths = [4, 6]  # the first sequence is padded with two tokens
    mask = torch.arange(6)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding
    out, weights = ours(x, return_attention=True, key_padding_mask=mask)
    assert torch.all(weights[0, ..., 4:] == 0) and torch.all(weights[1] > 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))
    ref_out, ref_weights = ref(x, x, x, key_padding_mask=mask, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    for i, length in enumerate(lengths):  # real tokens see exactly what the unpadded sequence gives
        short = ours(x[i:i + 1, :length])
        torch.testing.assert_close(out[i:i + 1, :length], short, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        ours(x, key_padding_mask=mask.float())


def test_self_attention_walkthrough_matches_the_module():
    ours, _ = _pair(48, 6)
    x = torch.randn(2, 5, 48)
    walk = self_attention_walkthrough(x, ours)
    expected, weights = ours(x, return_attention=True)
    torch.testing.assert_close(walk["output"], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(walk["weights"], weights)
    torch.testing.assert_close(walk["scores"].softmax(-1), weights)
    assert [s["name"] for s in walk["steps"]] == ["tokens"] + STEP_NAMES
    shapes = {s["name"]: s["shape"] for s in walk["steps"]}
    assert shapes["tokens"] == [2, 5, 48]
    assert shapes["queries, keys, values"] == {"Q": [2, 5, 48], "K": [2, 5, 48], "V": [2, 5, 48]}
    assert shapes["split into heads"]["V"] == [2, 6, 5, 8]
    assert shapes["scaled scores"] == shapes["softmax"] == [2, 6, 5, 5]
    assert shapes["weighted sum"] == [2, 6, 5, 8]
    assert shapes["merge heads"] == shapes["output"] == [2, 5, 48]
    softmax = next(s for s in walk["steps"] if s["name"] == "softmax")
    assert softmax["sample"] == [round(float(v), 4) for v in weights.detach()[0, 0, 0, :4]]
    assert softmax["sample_at"] == "[0, 0, 0, :4]"
    one = self_attention_walkthrough(x, ours, query_index=3)
    torch.testing.assert_close(one["output"], expected[:, 3:4], atol=1e-6, rtol=1e-5)
    assert one["weights"].shape == (2, 6, 1, 5)
    with pytest.raises(ValueError, match="query_index 5 is outside the 5 tokens"):
        self_attention_walkthrough(x, ours, query_index=5)


def test_parameter_free_walkthrough_is_plain_softmax_attention():
    x = torch.randn(1, 4, 12)
    walk = self_attention_walkthrough(x, num_heads=3)
    heads = split_heads(x, 3)
    expected = merge_heads(F.scaled_dot_product_attention(heads, heads, heads))
    torch.testing.assert_close(walk["output"], expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="num_heads"):
        self_attention_walkthrough(x)


def test_query_cells_are_checked_against_the_grid():
    assert check_cell((1, 2), (2, 3)) == 5 and check_cell((0, 0), (1, 1)) == 0
    with pytest.raises(ValueError, match=r"outside the 2x3 feature grid: use a row in 0..1 and a column in 0..2"):
        check_cell((0, 3), (2, 3))
    with pytest.raises(ValueError, match=r"\(row, col\) pair"):
        check_cell("centre", (2, 3))
    feats = torch.randn(1, 8, 2, 3)
    with pytest.raises(ValueError, match="outside the 2x3 feature grid"):
        self_attention_maps(feats, 2, query=(-1, 0))


def _walk_model(pool):
    model = EfficientNetV2("b0", num_classes=3, pool=pool, num_heads=4, attn_dim=64 if pool == "attention" else None)
    for bn in model.modules():  # BatchNorm statistics of real activations, so eval features are not ~0
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 64, 96))
    return model.eval()


def test_model_walkthrough_matches_the_attention_pool():
    model = _walk_model("attention")
    x = torch.randn(1, 3, 64, 96)  # feature grid 2 x 3
    walk = attention_walkthrough(model, x)
    with torch.no_grad():
        pooled = model.head.attn_pool(model.forward_features(x))
    torch.testing.assert_close(walk["output"], pooled[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(walk["maps"], model.attention_maps(x)[0])
    assert [s["name"] for s in walk["steps"]] == ["feature map", "tokens"] + STEP_NAMES
    shapes = {s["name"]: s["shape"] for s in walk["steps"]}
    assert shapes["feature map"] == [1, 1280, 2, 3] and shapes["tokens"] == [1, 6, 64]
    assert shapes["queries, keys, values"] == {"Q": [1, 1, 64], "K": [1, 6, 64], "V": [1, 6, 64]}
    assert shapes["split into heads"]["K"] == [1, 4, 6, 16] and shapes["scaled scores"] == [1, 4, 1, 6]
    assert shapes["output"] == [1, 1, 64]
    assert walk["all_weights"].shape == (4, 6, 6) and walk["grid"] == (2, 3) and walk["query"] is None
    cell = attention_walkthrough(model, x, query=(0, 2))
    torch.testing.assert_close(cell["maps"], model.attention_maps(x, query=(0, 2))[0])
    torch.testing.assert_close(cell["all_weights"][:, 2], cell["maps"].flatten(1))  # the query's row
    with pytest.raises(ValueError, match="outside the 2x3 feature grid"):
        attention_walkthrough(model, x, query=(2, 0))


def test_model_walkthrough_for_average_pooled_models():
    model = _walk_model("avg")
    x = torch.randn(1, 3, 96, 64)  # feature grid 3 x 2
    walk = attention_walkthrough(model, x)
    with torch.no_grad():
        feats = model.forward_features(x)
    torch.testing.assert_close(walk["maps"], self_attention_maps(feats, 4)[0])
    row, col = walk["query"]
    tokens = standardised_tokens(feats)
    torch.testing.assert_close(walk["output"], self_attention_walkthrough(tokens, num_heads=4)["output"][0, row * 2 + col])
    assert walk["grid"] == (3, 2) and walk["head_dim"] == 320


def test_textbook_example():
    example = textbook_example(3, 768, 12)
    assert example["scores"].shape == example["weights"].shape == (12, 3, 3) and example["head_dim"] == 64
    torch.testing.assert_close(example["scores"].softmax(-1), example["weights"])
    torch.testing.assert_close(example["weights"].sum(-1), torch.ones(12, 3))
    assert example["output"].shape == (1, 3, 768)
    torch.manual_seed(0)  # the example's module is built from the seed alone
    attn = MultiHeadSelfAttention(768, 12)
    torch.testing.assert_close(example["output"], attn(example["tokens"]), atol=1e-5, rtol=1e-5)
    assert torch.equal(textbook_example(3, 768, 12)["scores"], example["scores"])
    small = textbook_example(5, 64, 4, seed=1)
    assert small["weights"].shape == (4, 5, 5) and small["shapes"]["split heads"] == [1, 4, 5, 16]
    with pytest.raises(ValueError, match="divisible"):
        textbook_example(3, 770, 12)
    with pytest.raises(ValueError, match="tokens must be 1..256"):
        textbook_example(0, 768, 12)
