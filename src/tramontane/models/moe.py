"""Sparse mixture of experts (Mixtral): a router picks the top-k experts per token and mixes their outputs.

Routing as in mistral-inference: softmax over the top-k router logits (identical to HF's renormalised top-k of
the full softmax). Dispatch groups tokens by expert, so the Python loop runs over experts, not tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from tramontane.models.args import ModelArgs
from tramontane.models.layers import FeedForward


class MoeLayer(nn.Module):
    """`gate` (router, Linear dim -> E, no bias) and `experts` (E SwiGLU FFNs), names as in checkpoints."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        assert args.moe is not None
        self.num_experts_per_tok = args.moe.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(args.dim, args.hidden_dim)
                                     for _ in range(args.moe.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # N dim
        logits = self.gate(tokens)  # N E
        top_logits, top_experts = torch.topk(logits, self.num_experts_per_tok, dim=-1)  # N k
        weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32).to(tokens.dtype)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token_idx, choice = torch.where(top_experts == e)
            if token_idx.numel() == 0:
                continue
            expert_out = expert(tokens[token_idx]) * weights[token_idx, choice, None]
            out.index_add_(0, token_idx, expert_out)
        return out.view(shape)
