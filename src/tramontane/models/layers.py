"""The dense building blocks of a Mistral decoder layer: RMSNorm, grouped-query attention, SwiGLU FFN.

Module and parameter names follow the consolidated checkpoints (`wq wk wv wo`, `w1 w2 w3`), so weights load
without renaming.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tramontane.models.args import ModelArgs
from tramontane.models.cache import CacheStep, KVCache
from tramontane.models.rope import apply_rotary


class RMSNorm(nn.Module):
    """x / rms(x) * weight; the statistics are computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def attention_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """Boolean mask [B, 1, T, S]: key j is visible to query i iff it is a real token (position >= 0), not
    in the future, and among the `sliding_window` most recent positions (the query itself included).

    Padding queries (position < 0) see nothing real; they are let see themselves (the caller puts the
    chunk's own keys last) so that softmax stays finite. Their outputs are never read.
    """
    q = query_positions[:, :, None]  # B T 1
    k = key_positions[:, None, :]  # B 1 S
    visible = (k >= 0) & (k <= q)
    if sliding_window is not None:
        visible &= k > q - sliding_window
    t = query_positions.shape[1]
    pad_query = (query_positions < 0)[:, :, None] & torch.eye(t, dtype=torch.bool, device=q.device)
    visible[:, :, -t:] |= pad_query
    return visible[:, None]


def _single_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of one query per sequence (decoding): q [B, H, 1, D], k/v [B, K, S, D], mask [B, 1, 1, S].

    Two small matmuls with the query heads grouped under their key/value head; on CPU this is several
    times faster than SDPA's kernel for a single query.
    """
    b, h, _, d = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(b, kv_heads, h // kv_heads, d)  # B K H/K D
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * d**-0.5  # B K H/K S
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).type_as(v)
    return torch.matmul(probs, v).reshape(b, h, 1, d)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional sliding window."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]."""
        b, t, _ = x.shape
        q = apply_rotary(self.wq(x).view(b, t, self.n_heads, self.head_dim), ctx.cos, ctx.sin)
        k = apply_rotary(self.wk(x).view(b, t, self.n_kv_heads, self.head_dim), ctx.cos, ctx.sin)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # B H T D, B K T D
        if ctx.core is not None:
            assert ctx.layer is not None
            out = ctx.core(q, k, v, ctx.layer)
        else:
            out = attention_core(q, k, v, ctx)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v through `ctx`'s cache and mask: q [B, H, T, D], k/v [B, K, T, D] (this
    call's keys and values, already rotated) -> [B, H, T, D]."""
    if ctx.cache is not None:
        assert ctx.cache_step is not None and ctx.layer is not None
        k, v = ctx.cache.update(ctx.layer, k, v, ctx.cache_step)
    if q.shape[2] == 1:
        return _single_query_attention(q, k, v, ctx.mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.causal, enable_gqa=True)


def cache_mask(positions: torch.Tensor, step: CacheStep, sliding_window: int | None
               ) -> tuple[torch.Tensor | None, bool]:
    """(mask, causal) of a forward call over tokens at `positions` [B, T] through a cache planned as `step`:
    no mask where none is needed, SDPA's causal mask where it is exact, else `attention_mask`."""
    t = positions.shape[1]
    within_window = sliding_window is None or t <= sliding_window
    if step.write_first and bool((step.key_positions >= 0).all()):
        # One new token per sequence over a full cache: every cached key is real, in the past and
        # (rolling buffer of size <= window) inside the window, so nothing needs masking.
        return None, False
    if step.read_len == 0 and bool((positions >= 0).all()) and within_window:
        return None, True
    return attention_mask(positions, step.key_positions, sliding_window), False


@dataclass
class AttentionContext:
    """What every attention layer of one forward call shares: rotary tables, mask and cache plan."""

    cos: torch.Tensor  # B T 1 D/2
    sin: torch.Tensor  # B T 1 D/2
    mask: torch.Tensor | None  # B 1 T S boolean, or None when `causal` (or nothing) says it all
    causal: bool = False  # SDPA's own causal mask over the chunk (keys = the chunk's own keys only)
    cache: KVCache | None = None
    cache_step: CacheStep | None = None
    layer: int | None = None
    # Continuous batching (serve/engine.py) flattens the tokens of many sequences into one row set [1, N]
    # so that every per-token op runs on them together; this callable then does the attention core of each
    # sequence against its own cache: (q [1, H, N, D], k [1, K, N, D], v, layer) -> [1, H, N, D].
    core: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
