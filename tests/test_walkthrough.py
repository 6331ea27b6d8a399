"""effnetv2.walkthrough: each step of the demo's attention lesson equals the layers it retells."""
import pytest
import torch
import torch.nn.functional as F
from test_attention import _pair

from effnetv2 import EfficientNetV2
from effnetv2.attention import MultiHeadSelfAttention, merge_heads, self_attention_maps, split_heads, standardised_tokens
from effnetv2.walkthrough import attention_steps, attention_walkthrough, textbook_example

pytestmark = pytest.mark.numerics  # compares floating-point results or trains: see CONTRIBUTING.md

STEP_NAMES = ["queries, keys, values", "split into heads", "scaled scores", "softmax", "weighted sum",
              "merge heads", "output"]


def test_attention_steps_match_the_module():
    ours, _ = _pair(48, 6)
    x = torch.randn(2, 5, 48)
    walk = attention_steps(x, x, 6, ours)
    expected, weights = ours(x, return_attention=True)
    torch.testing.assert_close(walk["output"], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(walk["weights"], weights)
    torch.testing.assert_close(walk["scores"].softmax(-1), weights)
    assert [s["name"] for s in walk["steps"]] == STEP_NAMES
    shapes = {s["name"]: s["shape"] for s in walk["steps"]}
    assert shapes["queries, keys, values"] == {"Q": [2, 5, 48], "K": [2, 5, 48], "V": [2, 5, 48]}
    assert shapes["split into heads"]["V"] == [2, 6, 5, 8]
    assert shapes["scaled scores"] == shapes["softmax"] == [2, 6, 5, 5]
    assert shapes["weighted sum"] == [2, 6, 5, 8]
    assert shapes["merge heads"] == shapes["output"] == [2, 5, 48]
    softmax = next(s for s in walk["steps"] if s["name"] == "softmax")
    assert softmax["sample"] == [round(float(v), 4) for v in weights.detach()[0, 0, 0, :4]]
    one = attention_steps(x[:, 3:4], x, 6, ours)  # one token the query, as a query cell
    torch.testing.assert_close(one["output"], expected[:, 3:4], atol=1e-6, rtol=1e-5)
    assert one["weights"].shape == (2, 6, 1, 5)
    with pytest.raises(ValueError, match="does not match the module's 6 heads"):
        attention_steps(x, x, 4, ours)


def test_parameter_free_walkthrough_is_plain_softmax_attention():
    x = torch.randn(1, 4, 12)
    walk = attention_steps(x, x, 3)
    heads = split_heads(x, 3)
    expected = merge_heads(F.scaled_dot_product_attention(heads, heads, heads))
    torch.testing.assert_close(walk["output"], expected, atol=1e-6, rtol=1e-5)


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
    with torch.no_grad():
        given = attention_walkthrough(model, x, query=(0, 2), feats=model.forward_features(x))  # the app's kept map
    torch.testing.assert_close(given["maps"], cell["maps"])
    torch.testing.assert_close(given["all_weights"], cell["all_weights"])
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
    torch.testing.assert_close(walk["output"], attention_steps(tokens, tokens, 4)["output"][0, row * 2 + col])
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
