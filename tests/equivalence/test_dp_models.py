"""Whole tiny Mistral / Mixtral models: per-example norms and clipped sums against a one-example loop, and
per-example norms against Opacus on a model Opacus supports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import random_model, tiny_args
from tests.unit.test_dp_layers import assert_matches_oracle, loop_oracle
from tramontane.dp import DPEngine
from tramontane.models import Transformer


def next_token_losses(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Per-example next-token loss [B]: the sum over each sequence's tokens."""
    logits = model(tokens[:, :-1])
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1),
                             reduction="none")
    return losses.view(tokens.shape[0], -1).sum(1)


CASES = {
    "mistral": {"moe": False, "sliding_window": 8},  # GQA, T=13 > window: the masked path
    "mixtral": {"moe": True, "sliding_window": 8},
    "mistral-tied": {"moe": False, "sliding_window": None, "tied_embeddings": True},
    "mixtral-tied": {"moe": True, "sliding_window": None, "tied_embeddings": True},
}


@pytest.mark.parametrize("case", CASES)
def test_tiny_model_matches_one_example_loop(case: str) -> None:
    args = tiny_args(**CASES[case])
    model = random_model(args, seed=1).double()
    tokens = torch.randint(0, args.vocab_size, (5, 14), generator=torch.Generator().manual_seed(2))
    assert_matches_oracle(model, next_token_losses, tokens)


def test_moe_rows_of_several_examples_share_experts() -> None:
    """The oracle test is only meaningful if experts really receive rows of several examples."""
    args = tiny_args(moe=True)
    model = random_model(args, seed=1)
    tokens = torch.randint(0, args.vocab_size, (5, 14), generator=torch.Generator().manual_seed(2))
    seen = []
    hook = model.layers[0].feed_forward.experts[0].w1.register_forward_hook(
        lambda m, a, o: seen.append(a[0].shape[0]))
    with torch.no_grad():
        model(tokens)
    hook.remove()
    assert seen and seen[0] > 13  # more rows than one sequence has tokens


def test_float32_model_with_example_groups() -> None:
    """float32 (looser tolerance), and K=2 sequences per privacy unit on a Mixtral."""
    args = tiny_args(moe=True)
    model = random_model(args, seed=3)
    tokens = torch.randint(0, args.vocab_size, (6, 10), generator=torch.Generator().manual_seed(4))
    groups = [[0, 3], [1, 4], [2, 5]]
    ref_norms, ref_sum = loop_oracle(model, next_token_losses, tokens, 5.0, groups)
    engine = DPEngine(model, max_grad_norm=5.0, noise_multiplier=1.0)
    with engine.record(example_ids=[0, 1, 2, 0, 1, 2]):
        engine.backward(next_token_losses(model, tokens))
    torch.testing.assert_close(engine.per_example_norms.float(), ref_norms.float(), rtol=1e-4, atol=0)
    for name, ref in engine.clipped_grad_sum().items():
        scale = ref_sum[name].abs().max().item()
        torch.testing.assert_close(ref, ref_sum[name], rtol=1e-3, atol=1e-4 * scale)


class OpacusFriendly(nn.Module):
    """Embedding, Linear, LayerNorm over [B, T]: layers Opacus' hooks support."""

    def __init__(self, vocab: int = 31, dim: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(2 * dim)
        self.fc2 = nn.Linear(2 * dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.tanh(self.fc1(self.emb(tokens)))))


def _lm_losses(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    losses = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].reshape(-1), reduction="none")
    return losses.view(tokens.shape[0], -1).sum(1)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # Opacus on a first layer
@pytest.mark.parametrize("strategy", ["ghost", "materialize"])
def test_per_example_norms_match_opacus(strategy: str) -> None:
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(0)
    model = OpacusFriendly().double()
    tokens = torch.randint(0, 31, (8, 11), generator=torch.Generator().manual_seed(1))

    wrapped = opacus.GradSampleModule(model, batch_first=True, loss_reduction="sum")
    _lm_losses(wrapped, tokens).sum().backward()
    grad_samples = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()}
    wrapped.zero_grad()
    wrapped._close()
    opacus_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grad_samples.values()))

    max_grad_norm = opacus_norms.median().item()
    engine = DPEngine(model, max_grad_norm=max_grad_norm, noise_multiplier=1.0, linear_strategy=strategy)
    with engine.record():
        engine.backward(_lm_losses(model, tokens))
    torch.testing.assert_close(engine.per_example_norms, opacus_norms, rtol=1e-6, atol=0)
    clip = (max_grad_norm / (opacus_norms + 1e-6)).clamp(max=1)
    got = engine.clipped_grad_sum()
    for name, samples in grad_samples.items():
        expected = torch.einsum("b,b...->...", clip, samples)
        torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-9)
