"""The demo's attention lesson: ``effnetv2.attention``'s maths redone one step at a time, each step's formula,
shape and first values returned (for ``viz.walkthrough_markdown``)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .attention import (MultiHeadSelfAttention, _check_heads, check_cell, merge_heads, split_heads,
                        standardised_tokens)


def _step(name: str, formula: str, tensors: torch.Tensor | dict[str, torch.Tensor]) -> dict:
    """A step: its name, LaTeX formula, shape(s), and the first 4 values of the first row."""
    main = tensors if isinstance(tensors, torch.Tensor) else next(iter(tensors.values()))
    shape = list(main.shape) if isinstance(tensors, torch.Tensor) else {k: list(v.shape) for k, v in tensors.items()}
    row = main.detach()[(0,) * (main.dim() - 1)]
    return {"name": name, "formula": formula, "shape": shape,
            "sample": [round(float(v), 4) for v in row[:4]]}


def attention_steps(queries: torch.Tensor, tokens: torch.Tensor, num_heads: int,
                    attn: MultiHeadSelfAttention | None = None, query_of: str = "X") -> dict:
    """The steps of ``queries`` ``[B, Lq, D]`` (``query_of`` in LaTeX) over ``tokens`` ``[B, L, D]`` with ``attn``
    (None: K = V = tokens): ``steps``, ``scores``/``weights`` ``[B, h, Lq, L]`` and ``output`` ``[B, Lq, D]``."""
    learned = attn is not None
    if learned and attn.num_heads != num_heads:
        raise ValueError(f"num_heads={num_heads} does not match the module's {attn.num_heads} heads")
    project_q, project_k, project_v, project_out = (
        (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj) if learned else (nn.Identity(),) * 4)
    q, k, v = project_q(queries), project_k(tokens), project_v(tokens)
    kv_formula = r" W_Q,\; K = X W_K,\; V = X W_V" if learned else r",\; K = V = X"
    steps = [_step("queries, keys, values", f"Q = {query_of}" + kv_formula, {"Q": q, "K": k, "V": v})]
    qh, kh, vh = (split_heads(t, num_heads) for t in (q, k, v))
    d = qh.shape[-1]
    steps.append(_step("split into heads", rf"Q_i, K_i, V_i = \text{{channels }} [{d}i, {d}(i+1))\ "
                       rf"\text{{of }} Q, K, V,\; i = 0..{num_heads - 1}", {"Q": qh, "K": kh, "V": vh}))
    scores = qh @ kh.transpose(-2, -1) / math.sqrt(d)
    steps.append(_step("scaled scores", rf"S_i = Q_i K_i^T / \sqrt{{{d}}}", scores))
    weights = scores.softmax(dim=-1)
    steps.append(_step("softmax", r"A_i = \mathrm{softmax}(S_i)\ \text{(each row sums to 1)}", weights))
    mixed = weights @ vh
    steps.append(_step("weighted sum", r"O_i = A_i V_i", mixed))
    merged = merge_heads(mixed)
    steps.append(_step("merge heads", rf"O = [O_0, \dots, O_{{{num_heads - 1}}}]", merged))
    output = project_out(merged)
    steps.append(_step("output", r"Y = O W_O + b_O" if learned else r"Y = O", output))
    return {"steps": steps, "scores": scores, "weights": weights, "output": output}


@torch.no_grad()
def attention_walkthrough(model: nn.Module, x: torch.Tensor, query: tuple[int, int] | None = None,
                          feats: torch.Tensor | None = None) -> dict:
    """Every step of ``model.attention_maps`` for the first image of ``x`` (query: grid cell ``query``, else the
    pooled one or, average pool, the most attended cell): ``steps``, ``maps`` ``[h, H, W]``, ``all_weights``
    ``[h, L, L]`` (every token a query), ``grid``, ``query``, ``num_heads``, ``head_dim`` and ``output`` ``[D]``.
    ``feats``: ``x``'s eval-mode feature map when the caller has it (no second backbone forward)."""
    feats = model.forward_features(x[:1]) if feats is None else feats[:1]
    height, width = feats.shape[-2:]
    num_heads = model.num_heads
    pool = getattr(model.head, "attn_pool", None)
    if pool is not None:
        tokens, attn, made = pool.tokens(feats), pool.attn, r"\mathrm{flatten}(W_p F + P)"
    else:
        tokens, attn, made = standardised_tokens(feats), None, r"\mathrm{standardise}(\mathrm{flatten}(F))"
    steps = [_step("feature map", r"F = \mathrm{backbone}(x)", feats), _step("tokens", f"X = {made}", tokens)]
    all_weights = attention_steps(tokens, tokens, num_heads, attn)["weights"][0]
    if query is None and pool is not None:
        queries, query_of = pool.pooled_query(tokens), r"(\bar{X} + q_0)"
    else:
        if query is None:  # parameter-free: the most attended cell, as self_attention_maps
            query = divmod(int(all_weights.sum(dim=(0, 1)).argmax()), int(width))
        cell = check_cell(query, (height, width))
        query = (int(query[0]), int(query[1]))
        queries, query_of = tokens[:, cell:cell + 1], f"X_{{{cell}}}"
    result = attention_steps(queries, tokens, num_heads, attn, query_of)
    return {"steps": steps + result["steps"], "maps": result["weights"][0, :, 0].unflatten(-1, (height, width)),
            "all_weights": all_weights, "grid": (int(height), int(width)), "query": query,
            "num_heads": num_heads, "head_dim": tokens.shape[-1] // num_heads, "output": result["output"][0, 0]}


@torch.no_grad()
def textbook_example(num_tokens: int = 3, width: int = 768, num_heads: int = 12, seed: int = 0) -> dict:
    """Seeded random ``tokens`` ``[1, L, D]`` through a new ``MultiHeadSelfAttention``: ``scores`` and ``weights``
    ``[h, L, L]``, ``output`` ``[1, L, D]``, ``shapes`` (step → shape), ``num_heads`` and ``head_dim``."""
    if not (1 <= num_tokens <= 256 and 1 <= width <= 8192 and 1 <= num_heads <= 256):
        raise ValueError(f"tokens must be 1..256, width 1..8192 and heads 1..256, "
                         f"got {num_tokens}, {width}, {num_heads}")
    _check_heads(width, num_heads, "width")
    tokens = torch.randn(1, num_tokens, width, generator=torch.Generator().manual_seed(seed))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        attn = MultiHeadSelfAttention(width, num_heads)
    walk = attention_steps(tokens, tokens, num_heads, attn)
    d = width // num_heads
    shapes = {"X": [1, num_tokens, width], "Q, K, V": [1, num_tokens, width],
              "split heads": [1, num_heads, num_tokens, d], "scores / softmax": [1, num_heads, num_tokens, num_tokens],
              "weighted sum": [1, num_heads, num_tokens, d], "merged / output": [1, num_tokens, width]}
    return {"tokens": tokens, "scores": walk["scores"][0], "weights": walk["weights"][0], "output": walk["output"],
            "shapes": shapes, "num_heads": num_heads, "head_dim": d}
