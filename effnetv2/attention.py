"""Multi-head attention, written out so that each step can be inspected.

Self-attention maps a sequence of ``L`` tokens of width ``D`` ``[B, L, D]`` to a new sequence of
the same shape. Each token is projected to a query, a key and a value (``Q = x W_q``, ...); the
width ``D`` is split into ``h`` heads of ``D/h`` channels (``split_heads``); every head scores each
query against every key, ``softmax(Q K^T / sqrt(D/h))`` ``[B, h, L, L]``, and takes that weighted
mean of the values; the heads are put back side by side (``merge_heads``) and mixed by ``out_proj``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, L, D]`` → ``[B, h, L, D/h]``: head ``i`` holds channels ``i*D/h .. (i+1)*D/h - 1``."""
    batch, length, dim = x.shape
    if dim % num_heads:
        raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
    return x.reshape(batch, length, num_heads, dim // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, h, L, D/h]`` → ``[B, L, D]``, the inverse of :func:`split_heads`."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def scaled_dot_product_weights(q: torch.Tensor, k: torch.Tensor,
                               key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention weights ``softmax(q k^T / sqrt(d))`` ``[B, h, Lq, Lk]`` from ``[B, h, L, d]`` inputs.

    ``key_padding_mask`` ``[B, Lk]`` is True where a key must be ignored.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head attention with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``.

    Numerically equal to ``torch.nn.MultiheadAttention(dim, num_heads, batch_first=True)`` given
    the same weights.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def attend(self, query: torch.Tensor, context: torch.Tensor,
               key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``[B, Lq, D]`` attend over ``context`` ``[B, Lk, D]``.

        Returns the output ``[B, Lq, D]`` and the per-head weights ``[B, h, Lq, Lk]``.
        """
        q = split_heads(self.q_proj(query), self.num_heads)
        k = split_heads(self.k_proj(context), self.num_heads)
        v = split_heads(self.v_proj(context), self.num_heads)
        weights = scaled_dot_product_weights(q, k, key_padding_mask)
        return self.out_proj(merge_heads(weights @ v)), weights

    def forward(self, x: torch.Tensor, return_attention: bool = False,
                key_padding_mask: torch.Tensor | None = None):
        """Self-attention of ``x`` ``[B, L, D]`` → ``[B, L, D]`` (and ``[B, h, L, L]`` weights)."""
        out, weights = self.attend(x, x, key_padding_mask)
        return (out, weights) if return_attention else out


class AttentionPool2d(nn.Module):
    """Pool a feature map ``[B, C, H, W]`` into one vector by multi-head attention.

    The H*W cells become tokens (projected from ``C`` to ``dim`` channels, plus a learned position
    embedding resampled to the input's grid). The query is the tokens' mean plus a learned offset, so
    it starts as average pooling and learns where to look. Output: ``[B, dim]``.
    """

    def __init__(self, in_chs: int, dim: int = 256, num_heads: int = 8, grid_size: int = 7):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.proj = nn.Conv2d(in_chs, dim, 1) if dim != in_chs else nn.Identity()
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, grid_size, grid_size))
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn = MultiHeadSelfAttention(dim, num_heads)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map ``[B, C, H, W]`` → position-encoded tokens ``[B, H*W, dim]``."""
        x = self.proj(x)
        pos = self.pos_embed
        if pos.shape[-2:] != x.shape[-2:]:
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bicubic", align_corners=False)
        return (x + pos).flatten(2).transpose(1, 2)

    def pooled_query(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, dim]`` → the pooling query ``[B, 1, dim]``."""
        return tokens.mean(dim=1, keepdim=True) + self.query

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """``[B, C, H, W]`` → ``[B, dim]`` (and the weights ``[B, h, H, W]`` when asked)."""
        tokens = self.tokens(x)
        out, weights = self.attn.attend(self.pooled_query(tokens), tokens)
        out = out[:, 0]
        if return_attention:
            return out, weights[:, :, 0].unflatten(-1, x.shape[-2:])
        return out


def self_attention_maps(feats: torch.Tensor, num_heads: int,
                        query: tuple[int, int] | None = None) -> torch.Tensor:
    """Parameter-free multi-head self-attention of a feature map's cells, seen from one cell.

    The cells of ``feats`` ``[B, C, H, W]`` are tokens; each is standardised over its channels (so
    the scores compare directions, not magnitudes), split into ``num_heads`` heads of ``C/h``
    channels, and scored with ``softmax(q K^T / sqrt(C/h))`` where ``q`` is the token at
    ``query = (row, col)``. With no query, the cell that receives the most attention from all cells
    (summed over heads) is used. Returns ``[B, h, H, W]``, each map summing to 1.
    """
    batch, chs, height, width = feats.shape
    tokens = F.layer_norm(feats.flatten(2).transpose(1, 2).float(), (chs,))
    heads = split_heads(tokens, num_heads)
    if query is None:
        weights = scaled_dot_product_weights(heads, heads)  # [B, h, L, L]
        cell = weights.sum(dim=(1, 2)).argmax(dim=-1)  # [B]
    else:
        row, col = query
        if not (0 <= row < height and 0 <= col < width):
            raise ValueError(f"query cell {query} is outside the {height}x{width} feature grid")
        cell = torch.full((batch,), row * width + col, dtype=torch.long, device=feats.device)
    q = heads[torch.arange(batch), :, cell].unsqueeze(2)  # [B, h, 1, d]
    return scaled_dot_product_weights(q, heads)[:, :, 0].unflatten(-1, (height, width))


def _sample(t: torch.Tensor, n: int = 4) -> list:
    """A few leading values of a tensor, rounded, for display."""
    flat = t.detach().flatten()[:n].tolist()
    return [round(v, 4) for v in flat]


@torch.no_grad()
def attention_walkthrough(model: nn.Module, x: torch.Tensor, query: tuple[int, int] | None = None) -> dict:
    """Every step of the attention behind ``model.attention_maps`` for the first image of ``x``.

    Attention-pool models use the pool's learned projections (query: the pooled query, or the token
    at grid cell ``query``); average-pooled models use parameter-free attention of the standardised
    feature tokens (Q = K = V = tokens; query: ``query`` or the most attended cell).

    Returns a dict: ``steps`` (list of ``{"name", "formula", "shape", "sample"}`` in order: tokens →
    Q, K, V → split heads → scaled scores → softmax → weighted sum → merged → output), ``maps``
    ``[h, H, W]`` (the query's weights over the grid), ``all_weights`` ``[h, L, L]`` (every token as
    a query), ``grid`` ``(H, W)``, ``query``, ``num_heads``, ``head_dim`` and ``output`` ``[D]``.
    """
    feats = model.forward_features(x[:1])
    height, width = feats.shape[-2:]
    num_heads = model.num_heads
    pool = getattr(model.head, "attn_pool", None)
    steps = [{"name": "feature map", "formula": r"F = \mathrm{backbone}(x)", "shape": list(feats.shape),
              "sample": _sample(feats)}]
    if pool is not None:
        tokens = pool.tokens(feats)
        steps.append({"name": "tokens", "formula": r"X = \mathrm{flatten}(W_p F) + P",
                      "shape": list(tokens.shape), "sample": _sample(tokens)})
        attn = pool.attn
        q_in = pool.pooled_query(tokens) if query is None else None
        project_q, project_k, project_v, project_out = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj
        q_formula = r"Q = (\bar{X} + q_0) W_Q" if query is None else r"Q = X_{query} W_Q"
    else:
        tokens = F.layer_norm(feats.flatten(2).transpose(1, 2), (feats.shape[1],))
        steps.append({"name": "tokens", "formula": r"X = \mathrm{standardise}(\mathrm{flatten}(F))",
                      "shape": list(tokens.shape), "sample": _sample(tokens)})
        q_in = None
        project_q = project_k = project_v = project_out = nn.Identity()
        q_formula = r"Q = X_{query}"
    keys, values = project_k(tokens), project_v(tokens)
    all_queries = project_q(tokens)
    all_weights = scaled_dot_product_weights(split_heads(all_queries, num_heads), split_heads(keys, num_heads))[0]
    if query is None and q_in is None:  # parameter-free: the most attended cell
        cell = int(all_weights.sum(dim=(0, 1)).argmax())
        query = (cell // width, cell % width)
    if q_in is None:
        row, col = query
        if not (0 <= row < height and 0 <= col < width):
            raise ValueError(f"query cell {query} is outside the {height}x{width} feature grid")
        q_in = tokens[:, row * width + col].unsqueeze(1)
    q = project_q(q_in)
    steps.append({"name": "queries, keys, values", "formula": q_formula + r",\; K = X W_K,\; V = X W_V",
                  "shape": {"Q": list(q.shape), "K": list(keys.shape), "V": list(values.shape)},
                  "sample": _sample(q)})
    qh, kh, vh = (split_heads(t, num_heads) for t in (q, keys, values))
    head_dim = qh.shape[-1]
    steps.append({"name": "split into heads", "formula": rf"Q_i, K_i, V_i \in \mathbb{{R}}^{{L \times {head_dim}}},\; i = 1..{num_heads}",
                  "shape": {"Q": list(qh.shape), "K": list(kh.shape), "V": list(vh.shape)}, "sample": _sample(qh)})
    scores = qh @ kh.transpose(-2, -1) / math.sqrt(head_dim)
    steps.append({"name": "scaled scores", "formula": rf"S_i = Q_i K_i^T / \sqrt{{{head_dim}}}",
                  "shape": list(scores.shape), "sample": _sample(scores)})
    weights = scores.softmax(dim=-1)
    steps.append({"name": "softmax", "formula": r"A_i = \mathrm{softmax}(S_i)\ \text{(each row sums to 1)}",
                  "shape": list(weights.shape), "sample": _sample(weights)})
    mixed = weights @ vh
    steps.append({"name": "weighted sum", "formula": r"O_i = A_i V_i", "shape": list(mixed.shape),
                  "sample": _sample(mixed)})
    merged = merge_heads(mixed)
    steps.append({"name": "merge heads", "formula": r"O = [O_1, \dots, O_h]", "shape": list(merged.shape),
                  "sample": _sample(merged)})
    output = project_out(merged)
    steps.append({"name": "output", "formula": r"Y = O W_O" if pool is not None else r"Y = O",
                  "shape": list(output.shape), "sample": _sample(output)})
    return {"steps": steps, "maps": weights[0, :, 0].unflatten(-1, (height, width)), "all_weights": all_weights,
            "grid": (int(height), int(width)), "query": query, "num_heads": num_heads, "head_dim": head_dim,
            "output": output[0, 0]}


def textbook_example(num_tokens: int = 3, width: int = 768, num_heads: int = 12, seed: int = 0) -> dict:
    """The textbook case: ``num_tokens`` random tokens of ``width`` channels through a freshly
    initialised ``MultiHeadSelfAttention`` with ``num_heads`` heads.

    Returns ``{"tokens": [1, L, D], "weights": [h, L, L], "output": [1, L, D], "shapes": {...}}``.
    """
    if not (1 <= num_tokens <= 256 and 1 <= width <= 8192 and 1 <= num_heads <= 256):
        raise ValueError("tokens must be 1..256, width 1..8192 and heads 1..256")
    if width % num_heads:
        raise ValueError(f"width {width} must be divisible by the number of heads {num_heads} "
                         f"(each head gets width / heads channels)")
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(1, num_tokens, width, generator=generator)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        attn = MultiHeadSelfAttention(width, num_heads)
    with torch.no_grad():
        output, weights = attn(tokens, return_attention=True)
    d = width // num_heads
    shapes = {"X": [1, num_tokens, width], "Q, K, V": [1, num_tokens, width],
              "split heads": [1, num_heads, num_tokens, d], "scores / softmax": [1, num_heads, num_tokens, num_tokens],
              "weighted sum": [1, num_heads, num_tokens, d], "merged / output": [1, num_tokens, width]}
    return {"tokens": tokens, "weights": weights[0], "output": output, "shapes": shapes,
            "num_heads": num_heads, "head_dim": d}
