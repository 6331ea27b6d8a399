"""effnetv2.attention: the multi-head attention module against PyTorch's, and the query-cell check."""
import pytest
import torch
import torch.nn.functional as F

from effnetv2 import EfficientNetV2
from effnetv2.attention import MultiHeadSelfAttention, check_cell, merge_heads, self_attention_maps, split_heads

pytestmark = pytest.mark.numerics  # compares floating-point results or trains: see CONTRIBUTING.md


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


def test_query_cells_are_checked_against_the_grid():
    assert check_cell((1, 2), (2, 3)) == 5 and check_cell((0, 0), (1, 1)) == 0
    with pytest.raises(ValueError, match=r"outside the 2x3 feature grid: use a row in 0..1 and a column in 0..2"):
        check_cell((0, 3), (2, 3))
    with pytest.raises(ValueError, match=r"\(row, col\) pair"):
        check_cell("centre", (2, 3))
    feats = torch.randn(1, 8, 2, 3)
    with pytest.raises(ValueError, match="outside the 2x3 feature grid"):
        self_attention_maps(feats, 2, query=(-1, 0))


def test_model_attention_maps_check_the_query_cell():
    model = EfficientNetV2("b0", num_classes=3, pool="attention", num_heads=4, attn_dim=64).eval()
    x = torch.randn(1, 3, 64, 96)  # feature grid 2 x 3
    with pytest.raises(ValueError, match=r"outside the 2x3 feature grid: use a row in 0..1 and a column in 0..2"):
        model.attention_maps(x, query=(1, 3))
    with pytest.raises(ValueError, match=r"\(row, col\) pair"):
        model.attention_maps(x, query="centre")
