"""The Mistral / Mixtral decoder: token embeddings, n_layers pre-norm blocks, final norm, output head."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from tramontane.models.args import ModelArgs
from tramontane.models.cache import KVCache
from tramontane.models.layers import (
    Attention,
    AttentionContext,
    FeedForward,
    RMSNorm,
    attention_mask,
    cache_mask,
)
from tramontane.models.moe import MoeLayer
from tramontane.models.rope import inverse_frequencies, rotary_angles


class TransformerBlock(nn.Module):
    """h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h))."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward: nn.Module = (MoeLayer(args) if args.moe is not None
                                        else FeedForward(args.dim, args.hidden_dim))
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), ctx)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """A Mistral-family causal language model. Build it on the meta device to load a checkpoint without
    allocating random weights first (see `checkpoint.py`)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._inv_freq: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        # Computed on use rather than stored as a buffer, so meta-device construction needs no re-init.
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = inverse_frequencies(self.args.head_dim, self.args.rope_theta, device)
        return self._inv_freq

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab].

        `positions` [B, T] gives each token's absolute position; negative positions mark left padding,
        which is never attended to. Default 0..T-1; with a cache, pass them explicitly.
        `embeddings` [B, T, dim], when given, replaces the token embeddings (multimodal models splice image
        or audio features into them); `tokens` then only gives the shape.
        """
        return self.output(self.hidden_states(tokens, positions, cache, embeddings))

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states [B, T, dim] (the input of the output head)."""
        b, t = tokens.shape
        if positions is None:
            if cache is not None:
                raise ValueError("pass explicit positions when decoding with a cache")
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        cos, sin = rotary_angles(positions.clamp(min=0), self.inverse_frequencies(tokens.device))
        window = self.args.sliding_window
        if cache is None:
            # Without padding and within the window, SDPA's built-in causal mask is exact and faster.
            causal = bool((positions >= 0).all()) and (window is None or t <= window)
            mask = None if causal else attention_mask(positions, positions, window)
            ctx = AttentionContext(cos, sin, mask, causal)
        else:
            step = cache.plan(positions)
            mask, causal = cache_mask(positions, step, window)
            ctx = AttentionContext(cos, sin, mask, causal, cache, step)
        h = self.tok_embeddings(tokens) if embeddings is None else embeddings
        for i, layer in enumerate(self.layers):
            h = layer(h, replace(ctx, layer=i) if cache is not None else ctx)
        if cache is not None:
            assert ctx.cache_step is not None
            cache.commit(ctx.cache_step)
        return self.norm(h)
