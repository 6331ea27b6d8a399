import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from effnetv2 import EfficientNetV2, viz
from effnetv2.attention import (MultiHeadSelfAttention, attention_walkthrough, merge_heads, self_attention_maps,
                                split_heads, textbook_example)


def _pair(dim=32, heads=4):
    ours = MultiHeadSelfAttention(dim, heads)
    ref = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ours.eval(), ref.eval()


def test_split_merge_round_trip():
    x = torch.randn(2, 5, 24)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 8)
    assert torch.equal(heads[:, 1], x[:, :, 8:16])  # head i holds channels i*d..(i+1)*d-1
    assert torch.equal(merge_heads(heads), x)
    with pytest.raises(ValueError, match="divisible"):
        split_heads(x, 5)


def test_equals_torch_multihead_attention():
    ours, ref = _pair()
    x = torch.randn(3, 7, 32)
    out, weights = ours(x, return_attention=True)
    ref_out, ref_weights = ref(x, x, x, average_attn_weights=False)
    assert weights.shape == (3, 4, 7, 7)
    assert torch.allclose(out, ref_out, atol=1e-6)
    assert torch.allclose(weights, ref_weights, atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 4, 7), atol=1e-6)
    assert torch.equal(ours(x), out)


def test_equals_scaled_dot_product_attention():
    ours, _ = _pair()
    x = torch.randn(2, 6, 32)
    q, k, v = (split_heads(p(x), 4) for p in (ours.q_proj, ours.k_proj, ours.v_proj))
    expected = ours.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))
    assert torch.allclose(ours(x), expected, atol=1e-6)


def test_key_padding_mask():
    ours, ref = _pair()
    x = torch.randn(2, 6, 32)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 4:] = True
    out, weights = ours(x, return_attention=True, key_padding_mask=mask)
    assert torch.all(weights[..., 4:] == 0)
    ref_out, _ = ref(x, x, x, key_padding_mask=mask)
    assert torch.allclose(out, ref_out, atol=1e-6)
    short = ours.attend(x[:, :4], x[:, :4])[0]
    assert torch.allclose(out[:, :4], short, atol=1e-6)


def test_attention_pool_runs_at_other_sizes_and_round_trips(tmp_path):
    model = EfficientNetV2("b0", num_classes=3, pool="attention", num_heads=4, attn_dim=64).eval()
    assert model.head.attn_pool.pos_embed.shape == (1, 64, 7, 7)
    for size in [(64, 64), (96, 160)]:
        x = torch.randn(2, 3, *size)
        assert model(x).shape == (2, 3)
        maps = model.attention_maps(x)
        grid = viz.feature_grid(model, x)
        assert maps.shape == (2, 4, *grid)
        assert torch.allclose(maps.sum((-2, -1)), torch.ones(2, 4), atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = EfficientNetV2.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 96, 64)
    assert torch.equal(loaded(x), model(x))
    pool_state = {k: v.clone() for k, v in model.head.attn_pool.state_dict().items()}
    model.reset_classifier(7)
    assert all(torch.equal(pool_state[k], v) for k, v in model.head.attn_pool.state_dict().items())
    assert model(x).shape == (1, 7)


def test_attention_maps_query_cell_and_errors():
    model = EfficientNetV2("b0", num_classes=3, pool="attention", num_heads=4, attn_dim=64).eval()
    avg = EfficientNetV2("b0", num_classes=3, num_heads=8).eval()
    x = torch.randn(1, 3, 64, 96)  # grid 2 x 3
    for m, heads in ((model, 4), (avg, 8)):
        maps = m.attention_maps(x, query=(1, 2))
        assert maps.shape == (1, heads, 2, 3)
        assert torch.allclose(maps.sum((-2, -1)), torch.ones(1, heads), atol=1e-5)
        with pytest.raises(ValueError, match="outside the 2x3 feature grid"):
            m.attention_maps(x, query=(2, 0))
    # parameter-free maps from a cell equal a hand computation
    feats = avg.forward_features(x)
    tokens = F.layer_norm(feats.flatten(2).transpose(1, 2), (feats.shape[1],))
    heads = split_heads(tokens, 8)
    q = heads[:, :, 1 * 3 + 2 : 1 * 3 + 3]
    expected = (q @ heads.transpose(-2, -1) / (heads.shape[-1] ** 0.5)).softmax(-1)[:, :, 0].reshape(1, 8, 2, 3)
    assert torch.allclose(avg.attention_maps(x, query=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(self_attention_maps(feats, 8, (1, 2)), expected, atol=1e-5)


def test_walkthrough_matches_the_module():
    model = EfficientNetV2("b0", num_classes=3, pool="attention", num_heads=4, attn_dim=64).eval()
    x = torch.randn(1, 3, 64, 96)
    walk = attention_walkthrough(model, x)
    with torch.no_grad():
        pooled = model.head.attn_pool(model.forward_features(x))
    assert torch.allclose(walk["output"], pooled[0], atol=1e-6)
    assert torch.allclose(walk["maps"], model.attention_maps(x)[0], atol=1e-6)
    names = [s["name"] for s in walk["steps"]]
    assert names == ["feature map", "tokens", "queries, keys, values", "split into heads", "scaled scores",
                     "softmax", "weighted sum", "merge heads", "output"]
    shapes = {s["name"]: s["shape"] for s in walk["steps"]}
    assert shapes["tokens"] == [1, 6, 64] and shapes["scaled scores"] == [1, 4, 1, 6]
    assert shapes["split into heads"]["K"] == [1, 4, 6, 16]
    assert walk["all_weights"].shape == (4, 6, 6)
    cell = attention_walkthrough(model, x, query=(0, 2))
    assert torch.allclose(cell["maps"], model.attention_maps(x, query=(0, 2))[0], atol=1e-6)


def test_textbook_example():
    example = textbook_example(3, 768, 12)
    assert example["weights"].shape == (12, 3, 3) and example["head_dim"] == 64
    assert torch.allclose(example["weights"].sum(-1), torch.ones(12, 3), atol=1e-6)
    assert example["output"].shape == (1, 3, 768)
    with pytest.raises(ValueError, match="divisible"):
        textbook_example(3, 770, 12)


def test_viz_helpers():
    maps = torch.zeros(2, 2, 3)
    maps[0, 1, 2] = 1.0  # head 1 looks at the bottom-right cell
    maps[1] = 1 / 6
    view = Image.new("RGB", (90, 60), (0, 0, 0))
    heat = viz.heatmap(maps[0], view.size)
    pixels = heat.load()
    assert heat.size == (90, 60)
    assert sum(pixels[80, 50]) > sum(pixels[10, 10])  # brightest where the weight is
    blended = viz.overlay(view, maps[0].numpy(), alpha=0.5)
    assert blended.getpixel((80, 50)) == tuple(v // 2 for v in heat.getpixel((80, 50)))
    gallery = viz.head_gallery(view, maps)
    assert [c.split(":")[0] for _, c in gallery] == ["head 1", "head 2", "mean of heads"]
    assert "peak 1.000 at cell (1, 2)" in gallery[0][1]
    assert viz.cell_from_click((89, 59), (90, 60), (2, 3)) == (1, 2)
    assert viz.cell_from_click((31, 29), (90, 60), (2, 3)) == (0, 1)
    assert viz.attention_mass_in_box(maps[0], [60, 30, 90, 60], (90, 60)) == pytest.approx(1.0)
    assert viz.attention_mass_in_box(maps[1], [0, 0, 45, 60], (90, 60)) == pytest.approx(0.5)
