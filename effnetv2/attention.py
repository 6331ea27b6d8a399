"""Multi-head attention written out so that each step can be inspected, the attention-pooling head built on
it, and parameter-free self-attention of a feature map's cells. ``effnetv2.walkthrough`` retells the steps."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_heads(dim: int, num_heads: int, what: str) -> None:
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    if dim % num_heads:
        divisors = [h for h in range(1, min(dim, 64) + 1) if dim % h == 0]
        raise ValueError(f"{what} {dim} is not divisible by num_heads={num_heads}: every head gets "
                         f"{what} / num_heads channels, so pick num_heads from {divisors} "
                         f"(or change the {what})")


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, L, D]`` → ``[B, h, L, D/h]``: head ``i`` holds channels ``i*D/h .. (i+1)*D/h - 1``."""
    if x.dim() != 3:
        raise ValueError(f"split_heads expects tokens [B, L, D], got a tensor of shape {list(x.shape)}")
    batch, length, dim = x.shape
    _check_heads(dim, num_heads, "width")
    return x.reshape(batch, length, num_heads, dim // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, h, L, D/h]`` → ``[B, L, D]``, the inverse of :func:`split_heads`."""
    if x.dim() != 4:
        raise ValueError(f"merge_heads expects heads [B, h, L, D/h], got a tensor of shape {list(x.shape)}")
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def scaled_dot_product_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention weights ``softmax(q k^T / sqrt(d))`` ``[B, h, Lq, Lk]`` from ``[B, h, L, d]`` inputs."""
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head attention with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``: equal to
    ``torch.nn.MultiheadAttention(dim, num_heads, batch_first=True)`` whose ``in_proj_weight`` stacks the three."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        _check_heads(dim, num_heads, "dim")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def attend(self, query: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``query`` ``[B, Lq, D]`` over ``context`` ``[B, Lk, D]`` → output ``[B, Lq, D]``, weights
        ``[B, h, Lq, Lk]``."""
        q = split_heads(self.q_proj(query), self.num_heads)
        k = split_heads(self.k_proj(context), self.num_heads)
        v = split_heads(self.v_proj(context), self.num_heads)
        weights = scaled_dot_product_weights(q, k)
        return self.out_proj(merge_heads(weights @ v)), weights

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """Self-attention of ``x`` ``[B, L, D]`` → ``[B, L, D]``, or ``(output, weights [B, h, L, L])``
        with ``return_attention=True``."""
        out, weights = self.attend(x, x)
        return (out, weights) if return_attention else out


class AttentionPool2d(nn.Module):
    """Pool ``[B, C, H, W]`` into ``[B, dim]`` by attention over the cells: tokens a 1x1 conv plus a learned position
    embedding (resampled to any grid), the query their mean plus a learned offset (it starts as average pooling)."""

    def __init__(self, in_chs: int, dim: int = 256, num_heads: int = 8, grid_size: int = 7):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.proj = nn.Conv2d(in_chs, dim, 1) if dim != in_chs else nn.Identity()
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, grid_size, grid_size))
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn = MultiHeadSelfAttention(dim, num_heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections std = fan_in^-1/2 (scores of order 1 at the start: the backbone's N(0, 0.01) init gives
        scores ~1e-4 whose Q/K barely learn), zero biases; position embedding N(0, 0.02), query offset 0."""
        if isinstance(self.proj, nn.Conv2d):
            nn.init.normal_(self.proj.weight, std=self.proj.in_channels ** -0.5)
            nn.init.zeros_(self.proj.bias)
        for linear in (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj, self.attn.out_proj):
            nn.init.normal_(linear.weight, std=linear.in_features ** -0.5)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.query)

    def resampled_pos_embed(self, size: tuple[int, int]) -> torch.Tensor:
        """The position embedding ``[1, dim, h, w]`` for a ``size = (h, w)`` grid (bicubic unless it matches)."""
        size = tuple(int(s) for s in size)
        if self.pos_embed.shape[-2:] == size:
            return self.pos_embed
        return F.interpolate(self.pos_embed, size=size, mode="bicubic", align_corners=False)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map ``[B, C, H, W]`` → position-encoded tokens ``[B, H*W, dim]`` (row-major cells)."""
        x = self.proj(x)
        return (x + self.resampled_pos_embed(x.shape[-2:])).flatten(2).transpose(1, 2)

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


def check_cell(query: tuple[int, int], grid: tuple[int, int]) -> int:
    """The flat token index ``row * w + col`` of ``query = (row, col)`` on a ``grid = (h, w)``."""
    height, width = (int(v) for v in grid)
    try:
        row, col = (int(v) for v in query)
    except (TypeError, ValueError):
        raise ValueError(f"query must be a (row, col) pair of integers, got {query!r}") from None
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f"query cell {tuple(query)} is outside the {height}x{width} feature grid: use a row "
                         f"in 0..{height - 1} and a column in 0..{width - 1}, or query=None")
    return row * width + col


def standardised_tokens(feats: torch.Tensor) -> torch.Tensor:
    """Feature map ``[B, C, H, W]`` → tokens ``[B, H*W, C]`` standardised over channels (dot products compare
    directions, not magnitudes)."""
    return F.layer_norm(feats.flatten(2).transpose(1, 2).float(), (feats.shape[1],))


def self_attention_maps(feats: torch.Tensor, num_heads: int,
                        query: tuple[int, int] | None = None) -> torch.Tensor:
    """Parameter-free multi-head self-attention of ``feats`` ``[B, C, H, W]``'s standardised cells (Q = K = V)
    from the cell ``query = (row, col)``, by default the one all cells attend to most. Returns ``[B, h, H, W]``."""
    batch, _, height, width = feats.shape
    heads = split_heads(standardised_tokens(feats), num_heads)
    if query is None:
        cell = scaled_dot_product_weights(heads, heads).sum(dim=(1, 2)).argmax(dim=-1)  # [B]
    else:
        cell = torch.full((batch,), check_cell(query, (height, width)), dtype=torch.long, device=feats.device)
    q = heads[torch.arange(batch), :, cell].unsqueeze(2)  # [B, h, 1, d]
    return scaled_dot_product_weights(q, heads)[:, :, 0].unflatten(-1, (height, width))
