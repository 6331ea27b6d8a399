"""Why did the model choose this class? Exact class attribution, Grad-CAM, and how faithful a map is.

The head is linear after pooling, so the target logit splits exactly into a signed share per cell and head plus
a rest: ``b_c + w_c·b_O + Σ_h Σ_j a_hj w_c·W_O^h v_hj`` (attention pool), ``b_c + (1/HW) Σ_j w_c·f_j`` (average
pool: the class activation map). Faithfulness is measured in feature space, where removing a cell is exact.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import self_attention_maps, split_heads
from .model import EfficientNetV2
from .shapes import SHAPES


@contextlib.contextmanager
def _eval_mode(model: EfficientNetV2):
    """Eval mode (BatchNorm running statistics, no dropout) for the duration, then as it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _targets(logits: torch.Tensor, target) -> torch.Tensor:
    """Target class per image ``[B]``: the predicted class by default, else an int or ``[B]`` ints."""
    batch, classes = logits.shape
    if target is None:
        return logits.argmax(-1)
    target = torch.as_tensor(target, device=logits.device).long().reshape(-1).expand(batch)
    if ((target < 0) | (target >= classes)).any():
        raise ValueError(f"target must be class indices in 0..{classes - 1}, got {target.tolist()}")
    return target


def _terms(model: EfficientNetV2, feats: torch.Tensor, target):
    """For ``feats`` ``[B, D, h, w]``, in float64: the pooled query's scores ``[B, h, L]`` (None: average pool), each
    cell's addition to each logit at full weight ``[B, h, L, C]``, the rest ``[C]`` and the targets ``[B]``."""
    classifier = model.head.classifier
    if not isinstance(classifier, torch.nn.Linear):
        raise ValueError("the model has no classifier (num_classes=0): attribution needs class logits")
    with _eval_mode(model):
        target = _targets(model.forward_head(feats), target)
    weight, bias = classifier.weight.double(), classifier.bias.double()  # [C, D], [C]
    pool = model.head.attn_pool
    if pool is None:
        cells = feats.flatten(2).transpose(1, 2).double()  # [B, L, D]
        return None, (cells @ weight.T / cells.shape[1]).unsqueeze(1), bias, target
    attn = pool.attn
    tokens = pool.tokens(feats).double()
    q = split_heads(F.linear(pool.pooled_query(tokens), attn.q_proj.weight.double(), attn.q_proj.bias.double()),
                    attn.num_heads)
    k = split_heads(F.linear(tokens, attn.k_proj.weight.double(), attn.k_proj.bias.double()), attn.num_heads)
    v = split_heads(F.linear(tokens, attn.v_proj.weight.double(), attn.v_proj.bias.double()), attn.num_heads)
    scores = (q @ k.transpose(-1, -2))[:, :, 0] / k.shape[-1] ** 0.5  # [B, h, L]
    head_dim = v.shape[-1]
    # W_cls @ W_O, split by the heads' column blocks: [C, h, D/h]
    through = (weight @ attn.out_proj.weight.double()).reshape(len(weight), attn.num_heads, head_dim)
    contributions = torch.einsum("bhld,chd->bhlc", v, through)
    rest = bias + weight @ attn.out_proj.bias.double()
    return scores, contributions, rest, target


@torch.no_grad()
def class_attribution(model: EfficientNetV2, images: torch.Tensor, target=None,
                      return_rest: bool = False):
    """Each head's and cell's share of the target logit (an index, one per image, default the predicted class),
    float64: ``images`` ``[B, 3, H, W]`` → ``[B, heads, h, w]`` (average pool: 1 head), whose sum plus the
    image-independent ``rest`` ``[B]`` (``return_rest=True`` returns it too) is the logit."""
    feats = features(model, images)
    scores, contributions, rest, target = _terms(model, feats, target)
    maps = _shares(scores, contributions, target, feats.shape[-2:])
    return (maps, rest[target]) if return_rest else maps


def gradcam(model: EfficientNetV2, images: torch.Tensor, target=None) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) on the last feature map: ``images`` ``[B, 3, H, W]`` → ``[B, 1, h, w]``,
    ReLU of the channels weighted by the target logit's mean gradient. ``target`` as in :func:`class_attribution`."""
    return _gradcam_of_features(model, features(model, images), target)


def _gradcam_of_features(model: EfficientNetV2, feats: torch.Tensor, target=None) -> torch.Tensor:
    """:func:`gradcam` from the feature map ``[B, D, h, w]`` (a backward through the head only)."""
    with _eval_mode(model), torch.enable_grad():
        feats = feats.detach().requires_grad_(True)
        logits = model.forward_head(feats)
        target = _targets(logits.detach(), target)
        (grads,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), feats)
    weights = grads.mean((2, 3), keepdim=True)
    return F.relu((weights * feats.detach()).sum(1, keepdim=True))


def _ranked_keep_masks(maps: torch.Tensor, cells: int, delete: bool) -> torch.Tensor:
    """``[B, L+1, L]`` masks, step k keeping all but (deletion) or only (insertion) the k cells that rank first by
    the maps' sum over heads; ties by position."""
    ranking = maps.flatten(2).sum(1) if maps.dim() == 4 else maps.flatten(1)
    if ranking.shape[-1] != cells:
        raise ValueError(f"maps cover {ranking.shape[-1]} cells but the model's feature grid has {cells}: "
                         f"give maps [B, heads, h, w] on the grid of these images")
    order = torch.sort(ranking.double(), dim=-1, descending=True, stable=True).indices  # [B, L]
    position = torch.empty_like(order).scatter_(1, order, torch.arange(cells).expand_as(order))  # rank of each cell
    steps = torch.arange(cells + 1)[None, :, None]  # [1, L+1, 1]
    chosen = position[:, None, :] < steps  # the k best cells at step k
    return ~chosen if delete else chosen


@torch.no_grad()
def removal_curves(model: EfficientNetV2, images: torch.Tensor, maps: dict[str, torch.Tensor],
                   target=None) -> dict[str, dict[str, torch.Tensor]]:
    """Target probability ``[B, L+1]`` as the k cells each of ``maps = {name: [B, heads, h, w]}`` ranks first are
    removed (``"deletion"``) or alone present (``"insertion"``): masked out of the attention pool's keys (the query
    stays the whole image's) or zeroed in the average, with no cell present the logits are the rest; from one forward
    pass ``{name: {"deletion": [B, L+1], "insertion": [B, L+1]}}``."""
    feats = features(model, images)
    return _curves(feats, *_terms(model, feats, target), maps)


def _curves(feats, scores, contributions, rest, target, maps: dict[str, torch.Tensor]) -> dict:
    cells = feats.shape[-2] * feats.shape[-1]

    def curve(keep: torch.Tensor) -> torch.Tensor:
        if scores is None:
            weights = keep.double()[:, :, None, :]  # [B, K, 1, L]
        else:
            masked = scores[:, None].masked_fill(~keep[:, :, None, :], float("-inf"))  # [B, K, h, L]
            weights = masked.softmax(-1).nan_to_num(0.0)  # no key left: no contribution
        probs = (torch.einsum("bkhl,bhlc->bkc", weights, contributions) + rest).softmax(-1)
        return probs.gather(2, target[:, None, None].expand(-1, probs.shape[1], 1))[..., 0]

    return {name: {mode: curve(_ranked_keep_masks(m.to(feats.device), cells, mode == "deletion"))
                   for mode in ("deletion", "insertion")} for name, m in maps.items()}


def curve_auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under ``[B, L+1]`` values over the fraction 0..1 of cells → ``[B]``."""
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[-1] - 1), dim=-1)


def deletion_auc(model: EfficientNetV2, images: torch.Tensor, maps: torch.Tensor, target=None) -> torch.Tensor:
    """Per image ``[B]``, the area under :func:`removal_curves`' deletion curve: lower is better."""
    return curve_auc(removal_curves(model, images, {"map": maps}, target)["map"]["deletion"])


def insertion_auc(model: EfficientNetV2, images: torch.Tensor, maps: torch.Tensor, target=None) -> torch.Tensor:
    """Per image ``[B]``, the area under :func:`removal_curves`' insertion curve: higher is better."""
    return curve_auc(removal_curves(model, images, {"map": maps}, target)["map"]["insertion"])


def deletion_summary(curve: torch.Tensor, label: str, cells: int | None = None) -> str:
    """One image's deletion curve ``[L+1]`` after ``cells`` (default: a tenth) in words, e.g. "removing the 3 cells
    this map ranks first drops P(star) from 0.98 to 0.12", with the decimals (up to 6) that tell them apart."""
    steps = curve.shape[-1] - 1
    k = max(1, round(steps / 10)) if cells is None else min(max(1, cells), steps)
    before, after = float(curve[0]), float(curve[k])
    noun = "cell" if k == 1 else f"{k} cells"
    digits = next((d for d in range(2, 7) if f"{before:.{d}f}" != f"{after:.{d}f}"), None)
    if digits is None:
        return f"removing the {noun} this map ranks first leaves P({label}) at {before:.2f}"
    verb = "drops" if after < before else "raises"
    return f"removing the {noun} this map ranks first {verb} P({label}) from {before:.{digits}f} to {after:.{digits}f}"


ATTRIBUTION, ATTENTION, GRADCAM, RANDOM = "class attribution", "attention", "Grad-CAM", "random map"
CAM = "CAM"  # the class attribution of an average pool: the class activation map
FEATURE_ATTENTION = "feature self-attention"  # an average pool's parameter-free attention (no learned weights)
BEATS_RANDOM_BY = 0.01  # a map "beats" a random one when its deletion AUC is at least this much lower
LISTED_CLASSES = 20     # a model of at most this many classes has them listed (ImageNet's 1000 would say nothing)


@dataclass
class Why:
    """What the demo says about one image and class: ``shares`` (:func:`class_attribution`), each map kind
    ``[h, w]`` by name (the random one last) and its ``deletion`` curve ``[L+1]``."""
    target: int
    probs: torch.Tensor
    shares: torch.Tensor
    maps: dict[str, torch.Tensor]
    deletion: dict[str, torch.Tensor]

    @property
    def aucs(self) -> dict[str, float]:
        return {kind: float(curve_auc(curve)) for kind, curve in self.deletion.items()}


def map_kinds(model: EfficientNetV2) -> list[str]:
    """The map kinds worth showing for this model, best known first (an average pool's attention learns nothing)."""
    return [ATTRIBUTION, ATTENTION, GRADCAM] if model.head.attn_pool is not None else [CAM, GRADCAM]


@torch.no_grad()
def features(model: EfficientNetV2, images: torch.Tensor) -> torch.Tensor:
    """The eval-mode feature map ``[B, D, h, w]`` of ``images`` ``[B, 3, H, W]``: what :func:`why` takes."""
    with _eval_mode(model):
        return model.forward_features(images)


def why(model: EfficientNetV2, feats: torch.Tensor, target: int | None = None, seed: int = 0) -> Why:
    """Why class ``target`` (default: the predicted one) for one image's feature map ``feats`` ``[1, D, h, w]``:
    its maps and their deletion curves, from the head alone (another class costs no backbone forward)."""
    feats = feats[:1]
    scores, contributions, rest, targets = _terms(model, feats, target)
    with torch.no_grad():
        probs = model.forward_head(feats)[0].softmax(-1)
    shares = _shares(scores, contributions, targets, feats.shape[-2:])[0]
    cam = _gradcam_of_features(model, feats, targets)[0, 0]
    if scores is not None:
        heads = scores.softmax(-1).unflatten(-1, feats.shape[-2:])[0].float()
        maps = {ATTRIBUTION: shares.sum(0), ATTENTION: heads.mean(0), GRADCAM: cam}
    else:
        heads = self_attention_maps(feats, model.num_heads)[0]
        maps = {CAM: shares.sum(0), GRADCAM: cam, FEATURE_ATTENTION: heads.mean(0)}
    maps[RANDOM] = torch.rand(feats.shape[-2:], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        curves = _curves(feats, scores, contributions, rest, targets, {k: m[None, None] for k, m in maps.items()})
    return Why(int(targets[0]), probs, shares, maps, {k: c["deletion"][0] for k, c in curves.items()})


def _shares(scores, contributions, target, grid) -> torch.Tensor:
    """:func:`class_attribution` from :func:`_terms`' pieces and the targets ``[B]``: ``[B, heads, h, w]``."""
    share = contributions[torch.arange(len(contributions)), :, :, target]  # [B, h, L]
    if scores is not None:
        share = share * scores.softmax(-1)
    return share.unflatten(-1, tuple(grid))


def region_cells(cells: int) -> int:
    """How many cells "the highlighted region" holds: a quarter of the grid (a tenth of a small one changes little)."""
    return max(1, cells // 4)


def answer_sentence(label: str, prob: float, curve: torch.Tensor) -> str:
    """The answer in a line from a map's deletion curve ``[L+1]``: does hiding the highlighted region drop it?"""
    after = float(curve[region_cells(curve.shape[-1] - 1)])
    before = float(curve[0])
    if after < before - BEATS_RANDOM_BY:
        return (f"{label}, {prob:.0%} sure: mostly from the highlighted region; hiding it drops the score "
                f"to {after:.2f}.")
    return (f"{label}, {prob:.0%} sure; hiding the highlighted region leaves the score at {after:.2f}, "
            f"so the answer rests on more than that region.")


def verdict(curves: dict[str, torch.Tensor], random: str = RANDOM) -> str:
    """Which of ``curves`` (each map's deletion curve ``[L+1]``) explains this image best, by how much it beats the
    ``random`` map's area, and the maps that do not beat it, in words."""
    aucs = {kind: float(curve_auc(curve)) for kind, curve in curves.items()}
    if random not in aucs or len(aucs) < 2:
        raise ValueError(f"verdict needs the {random!r} curve and at least one other, got {sorted(aucs)}")
    bar = aucs.pop(random)
    best = min(aucs, key=aucs.get)
    losers = [kind for kind, auc in aucs.items() if auc > bar - BEATS_RANDOM_BY]
    if best in losers:
        return (f"No map beats a random one for this image by the deletion test (best: {best}, "
                f"{aucs[best]:.3f} against {bar:.3f}): no map here shows what the answer depends on.")
    text = (f"By the deletion test, {best} explains this image best: hiding cells in its order lowers the "
            f"score fastest (area {aucs[best]:.3f} against a random map's {bar:.3f}, {bar - aucs[best]:.3f} lower).")
    if losers:
        named = " and ".join(f"{kind} ({aucs[kind]:.3f})" for kind in losers)
        text += f" {named[0].upper() + named[1:]} {'does' if len(losers) == 1 else 'do'} not beat a random map here."
    return text


def faithfulness_table(result: Why, label: str) -> str:
    """Each map's deletion area and what removing its top cells does, as a Markdown table."""
    quarter = region_cells(next(iter(result.deletion.values())).shape[-1] - 1)
    rows = [f"| {kind} | {auc:.3f} | {deletion_summary(result.deletion[kind], label, quarter)} |"
            for kind, auc in result.aucs.items()]
    return "\n".join(["| map | deletion area | removing its top cells |", "|---|---|---|", *rows])


def describe_model(labels: list[str], other_model: str | None = None) -> str:
    """What a model of ``labels`` knows and what to do, in two sentences; ``other_model``: one offered for photos."""
    kind = "shapes" if set(labels) <= set(SHAPES) else "classes"
    if len(labels) > LISTED_CLASSES:
        known = f"This model knows {len(labels)} classes of everyday photos ({', '.join(labels[:3])}, …)."
    else:
        known = f"This model knows {len(labels)} {kind}: {', '.join(labels)}."
    todo = "Upload a photo, paste one or take one with the webcam, or click an example"
    if other_model:
        todo = f"Click an example or upload an image, or pick {other_model} above for your own photos"
    return f"{known} {todo}: the answer and why come at once."
