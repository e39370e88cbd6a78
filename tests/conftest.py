"""Shared fixtures: tiny random Mistral and Mixtral configurations."""

from __future__ import annotations

import pytest
import torch

from tramontane.models import ModelArgs, MoeArgs, Transformer

torch.set_num_threads(2)


def tiny_args(moe: bool = False, sliding_window: int | None = 8, **overrides) -> ModelArgs:
    """A 2-layer GQA model small enough for slow reference checks (window 8 unless told otherwise)."""
    params = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                  vocab_size=97, rope_theta=10_000.0, sliding_window=sliding_window,
                  moe=MoeArgs(num_experts=4, num_experts_per_tok=2) if moe else None)
    params.update(overrides)
    return ModelArgs(**params)


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """A model with random weights, norms included (ones would hide a swapped norm weight)."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.08)
    return model.eval()


@pytest.fixture(params=["dense", "moe"])
def tiny_model(request) -> Transformer:
    args = tiny_args(moe=request.param == "moe")
    return random_model(args)
