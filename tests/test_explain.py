"""effnetv2.explain: exact class attribution, Grad-CAM, deletion/insertion faithfulness curves."""
import pytest
import torch
import torch.nn.functional as F

from effnetv2 import EfficientNetV2
from effnetv2.explain import (ATTENTION, BEATS_RANDOM_BY, CAM, FEATURE_ATTENTION, GRADCAM, RANDOM, answer_sentence,
                              class_attribution, curve_auc, deletion_auc, describe_model, features, gradcam,
                              insertion_auc, map_kinds, region_cells, removal_curves, verdict, why)

pytestmark = pytest.mark.numerics  # compares floating-point results or trains: see CONTRIBUTING.md


def removal_curve(model, images, maps, target=None, mode="deletion"):
    return removal_curves(model, images, {"map": maps}, target)["map"][mode]


def _model(pool: str) -> EfficientNetV2:
    """b0 with non-zero biases everywhere in the head, so that the rest term matters."""
    torch.manual_seed(0)
    model = EfficientNetV2("b0", num_classes=4, pool=pool, num_heads=4, attn_dim=32, image_size=64).eval()
    with torch.no_grad():
        model.head.classifier.weight.normal_(0, 0.5)
        model.head.classifier.bias.normal_(0, 1.0)
        if model.head.attn_pool is not None:
            model.head.attn_pool.attn.out_proj.bias.normal_(0, 1.0)
            model.head.attn_pool.query.normal_(0, 1.0)
    return model


IMAGES = {"square": (2, 3, 64, 64), "odd": (3, 3, 67, 45)}  # grids 2x2 and 3x2


@pytest.mark.parametrize("pool", ["attention", "avg"])
@pytest.mark.parametrize("size", IMAGES)
def test_shares_plus_rest_are_the_logit(pool, size):
    model = _model(pool)
    x = torch.randn(IMAGES[size])
    with torch.no_grad():
        logits = model(x).double()
    grid = model.forward_features(x).shape[-2:]
    for target in (None, 2, torch.tensor([3, 0, 1][: len(x)])):
        maps, rest = class_attribution(model, x, target, return_rest=True)
        assert maps.shape == (len(x), 4 if pool == "attention" else 1, *grid)
        chosen = logits.argmax(-1) if target is None else torch.as_tensor(target).expand(len(x))
        expected = logits.gather(1, chosen[:, None])[:, 0]
        torch.testing.assert_close(maps.sum((1, 2, 3)) + rest, expected, rtol=1e-5, atol=1e-5)
        assert rest.abs().min() > 1e-3  # the biases were made non-zero: the rest is not a no-op
    assert not model.training


def test_a_head_share_is_what_removing_that_head_takes_away():
    """Zero head 1's columns of the output projection: the logit drops by head 1's total share."""
    model, x = _model("attention"), torch.randn(2, 3, 64, 64)
    shares = class_attribution(model, x, target=1)
    head_dim = 32 // 4
    with torch.no_grad():
        before = model(x)[:, 1]
        model.head.attn_pool.attn.out_proj.weight[:, head_dim:2 * head_dim] = 0
        after = model(x)[:, 1]
    torch.testing.assert_close((before - after).double(), shares[:, 1].sum((1, 2)), rtol=1e-4, atol=1e-5)


def test_an_average_pool_cell_share_is_what_zeroing_that_cell_takes_away():
    model, x = _model("avg"), torch.randn(2, 3, 64, 64)
    shares = class_attribution(model, x, target=2)
    with torch.no_grad():
        feats = model.forward_features(x)
        zeroed = feats.clone()
        zeroed[:, :, 1, 0] = 0
        drop = model.forward_head(feats)[:, 2] - model.forward_head(zeroed)[:, 2]
    torch.testing.assert_close(drop.double(), shares[:, 0, 1, 0], rtol=1e-4, atol=1e-5)


def test_gradcam_of_an_average_pool_is_the_rectified_class_activation_map():
    """For global average pooling the gradient of logit c is w_c / HW at every cell, so Grad-CAM is
    ReLU(Σ_k w_ck f_k / HW): the positive part of the class activation map."""
    model, x = _model("avg"), torch.randn(2, 3, 67, 45)
    cam = gradcam(model, x, target=3)
    assert cam.shape == (2, 1, 3, 2) and cam.min() >= 0
    torch.testing.assert_close(cam.double(), F.relu(class_attribution(model, x, target=3)), rtol=1e-4, atol=1e-6)


def test_gradcam_follows_the_gradient_for_an_attention_pool():
    model, x = _model("attention"), torch.randn(1, 3, 64, 64)
    feats = model.forward_features(x).detach().requires_grad_(True)
    model.forward_head(feats)[0, 0].backward()
    expected = F.relu((feats.grad.mean((2, 3), keepdim=True) * feats).sum(1, keepdim=True)).detach()
    torch.testing.assert_close(gradcam(model, x, target=0), expected)


def _attend_without(model, x, removed: list[int]) -> torch.Tensor:
    """Class probabilities with ``removed`` cells taken out of the pool's keys (the query stays the whole
    image's), through the pool's own attention (tested against torch's MultiheadAttention) and the classifier."""
    pool = model.head.attn_pool
    with torch.no_grad():
        tokens = pool.tokens(model.forward_features(x))
        kept = [cell for cell in range(tokens.shape[1]) if cell not in removed]
        out, _ = pool.attn.attend(pool.pooled_query(tokens), tokens[:, kept])
        return model.head.classifier(out[:, 0]).softmax(-1)


def test_deletion_curve_masks_the_best_ranked_keys_first():
    model, x = _model("attention"), torch.randn(1, 3, 96, 96)  # a 3x3 grid
    ranking = torch.tensor([[5.0, 1.0, 9.0], [0.0, 7.0, 3.0], [2.0, 8.0, 4.0]])[None, None]  # best: cells 2, 7, 4
    curve = removal_curve(model, x, ranking, target=1)
    assert curve.shape == (1, 10)
    with torch.no_grad():
        full = model(x).softmax(-1)[0, 1]
    torch.testing.assert_close(curve[0, 0].float(), full, rtol=1e-5, atol=1e-6)
    for k, removed in [(1, [2]), (3, [2, 7, 4])]:
        torch.testing.assert_close(curve[0, k].float(), _attend_without(model, x, removed)[0, 1], rtol=1e-5, atol=1e-6)
    # nothing left: the logits are the biases alone, b + W b_O
    rest = model.head.classifier(model.head.attn_pool.attn.out_proj.bias).softmax(-1)[1]
    torch.testing.assert_close(curve[0, -1].float(), rest.detach(), rtol=1e-5, atol=1e-6)
    insertion = removal_curve(model, x, ranking, target=1, mode="insertion")
    torch.testing.assert_close(insertion[0, 2].float(), _attend_without(model, x, [0, 1, 3, 4, 5, 6, 8])[0, 1],
                               rtol=1e-5, atol=1e-6)  # only the two best (2 and 7) present
    torch.testing.assert_close(insertion[0, -1], curve[0, 0])
    torch.testing.assert_close(insertion[0, 0], curve[0, -1])


def test_deletion_curve_zeroes_average_pool_cells():
    model, x = _model("avg"), torch.randn(2, 3, 64, 64)
    ranking = torch.tensor([[0.1, 0.9], [0.5, 0.3]]).expand(2, 1, 2, 2)  # best: (0, 1), then (1, 0)
    curve = removal_curve(model, x, ranking, target=0)
    with torch.no_grad():
        feats = model.forward_features(x)
        feats[:, :, 0, 1] = 0
        feats[:, :, 1, 0] = 0
        expected = model.forward_head(feats).softmax(-1)[:, 0]  # mean over all 4 cells, two of them zero
    torch.testing.assert_close(curve[:, 2].float(), expected, rtol=1e-5, atol=1e-6)


def test_areas_are_trapezoids_over_the_fraction_removed():
    model, x = _model("avg"), torch.randn(2, 3, 64, 64)
    maps = torch.rand(2, 1, 2, 2)
    curve = removal_curve(model, x, maps).double()
    by_hand = ((curve[:, :-1] + curve[:, 1:]) / 2).sum(-1) / 4  # 4 cells: steps of 1/4
    torch.testing.assert_close(deletion_auc(model, x, maps), by_hand)
    inserted = removal_curve(model, x, maps, mode="insertion").double()
    torch.testing.assert_close(insertion_auc(model, x, maps), ((inserted[:, :-1] + inserted[:, 1:]) / 2).sum(-1) / 4)


def test_exact_attribution_deletes_a_linear_head_fastest():
    """For a linear (average-pooled) head, removing the cells with the largest shares first lowers
    the target logit at every step at least as much as any other order: check against all others."""
    import itertools

    model, x = _model("avg"), torch.randn(1, 3, 64, 64)
    shares = class_attribution(model, x, target=0)[0, 0].flatten()
    with torch.no_grad():
        feats = model.forward_features(x)
    def logit_without(cells):
        kept = feats.clone().flatten(2)
        kept[:, :, list(cells)] = 0
        return model.forward_head(kept.view_as(feats))[0, 0].item()
    best_first = torch.argsort(shares, descending=True).tolist()
    for k in range(1, 4):
        ours = logit_without(best_first[:k])
        assert all(ours <= logit_without(c) + 1e-5 for c in itertools.combinations(range(4), k))


def test_bad_arguments_are_named():
    model, x = _model("avg"), torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"target must be class indices in 0\.\.3"):
        class_attribution(model, x, target=4)
    with pytest.raises(ValueError, match="maps cover 9 cells but the model's feature grid has 4"):
        deletion_auc(model, x, torch.rand(1, 1, 3, 3))
    model.train()
    class_attribution(model, x)
    assert model.training  # restored


def test_deletion_summary_in_plain_words():
    from effnetv2.explain import deletion_summary

    curve = torch.tensor([0.98, 0.5, 0.3, 0.12] + [0.1] * 27)  # 30 cells: a tenth is 3
    assert deletion_summary(curve, "star") == "removing the 3 cells this map ranks first drops P(star) from 0.98 to 0.12"
    assert deletion_summary(curve, "star", cells=1) == "removing the cell this map ranks first drops P(star) from 0.98 to 0.50"
    assert "raises P(circle) from 0.10 to 0.40" in deletion_summary(torch.tensor([0.1, 0.4, 0.2]), "circle")
    # A confident model: two decimals would read "from 1.00 to 1.00"
    assert deletion_summary(torch.tensor([0.99996, 0.9971, 0.5]), "star", cells=1).endswith("drops P(star) from 1.000 to 0.997")
    assert deletion_summary(torch.tensor([0.25, 0.25]), "star").endswith("leaves P(star) at 0.25")


def _curve(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_verdict_names_the_map_that_deletes_fastest_and_its_margin_over_random():
    """Areas by the trapezoid rule over 4 steps (dx 1/4), worked by hand."""
    curves = {"Grad-CAM": _curve(1, 0.5, 0.25, 0.25, 0.25), "attention": _curve(1, 1, 0.95, 0.9, 0.85),
              "class attribution": _curve(1, 1, 1, 0.5, 0.5), "random map": _curve(1, 1, 0.9, 0.9, 0.9)}
    aucs = {kind: float(curve_auc(curve)) for kind, curve in curves.items()}
    assert aucs == pytest.approx({"Grad-CAM": 0.40625, "attention": 0.94375, "class attribution": 0.8125,
                                  "random map": 0.9375})
    text = verdict(curves)
    assert text.startswith("By the deletion test, Grad-CAM explains this image best")
    assert "area 0.406 against a random map's 0.938, 0.531 lower" in text
    assert text.endswith("Attention (0.944) does not beat a random map here.")  # worse than random, named
    assert "class attribution" not in text  # it beats random: not listed as a loser


def test_verdict_says_when_no_map_beats_random():
    curves = {"attention": _curve(1, 0.99, 0.98), "Grad-CAM": _curve(1, 1, 0.99), "random map": _curve(1, 0.99, 0.98)}
    assert verdict(curves).startswith("No map beats a random one for this image by the deletion test "
                                      "(best: attention, 0.990 against 0.990)")


def test_verdict_margin_and_the_losers_plural():
    """A map within BEATS_RANDOM_BY of random does not beat it; two such maps are named together."""
    step = BEATS_RANDOM_BY
    curves = {"a": _curve(0.5, 0.5), "b": _curve(0.9 - step / 2, 0.9 - step / 2), "c": _curve(0.95, 0.95),
              "random map": _curve(0.9, 0.9)}
    assert verdict(curves).endswith("B (0.895) and c (0.950) do not beat a random map here.")
    with pytest.raises(ValueError, match="needs the 'random map' curve"):
        verdict({"a": _curve(1, 0)})


@pytest.mark.parametrize("after, words", [(0.73, "mostly from the highlighted region; hiding it drops the score to 0.73."),
                                          (0.995, "hiding the highlighted region leaves the score at 0.99")])
def test_answer_sentence_reads_the_curve_at_a_quarter_of_the_cells(after, words):
    curve = _curve(1.0, 0.99, after, 0.5, 0.2, 0.1, 0.0, 0.0, 0.0)  # 8 cells: the region is 2 of them
    assert region_cells(8) == 2
    assert answer_sentence("star", 0.999, curve) == f"star, 100% sure{':' if after < 0.9 else ';'} {words}" + (
        "" if after < 0.9 else ", so the answer rests on more than that region.")


def test_why_from_features_matches_the_image_functions():
    """One backbone forward, then the head only: the same attribution, Grad-CAM and deletion areas as the
    functions that take images; another class from the same features."""
    model = _model("attention")
    x = torch.randn(1, 3, 64, 64)
    feats = features(model, x)
    for target in (None, 2):
        result = why(model, feats, target)
        chosen = int(model(x).argmax()) if target is None else target
        assert result.target == chosen
        torch.testing.assert_close(result.shares, class_attribution(model, x, chosen)[0])
        torch.testing.assert_close(result.maps[GRADCAM], gradcam(model, x, chosen)[0, 0])
        torch.testing.assert_close(result.maps[ATTENTION], model.attention_maps(x)[0].detach().mean(0))
        assert list(result.maps) == [*map_kinds(model), RANDOM]
        for kind in map_kinds(model):
            expected = float(deletion_auc(model, x, result.maps[kind][None, None], chosen))
            assert result.aucs[kind] == pytest.approx(expected, abs=1e-9)
    avg = _model("avg")
    assert list(why(avg, features(avg, x)).maps) == [CAM, GRADCAM, FEATURE_ATTENTION, RANDOM]


def test_model_description_in_two_sentences():
    shapes = describe_model(["circle", "hexagon", "square", "star", "triangle"], "ImageNet")
    assert shapes.startswith("This model knows 5 shapes: circle, hexagon, square, star, triangle. ")
    assert "pick ImageNet above for your own photos" in shapes and shapes.count(". ") == 1
    many = describe_model([f"class {i}" for i in range(1000)])
    assert many.startswith("This model knows 1000 classes") and "class 999" not in many
    assert describe_model(["cat", "dog"]).startswith("This model knows 2 classes: cat, dog.")
