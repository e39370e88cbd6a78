"""Per-example norms and clipped sums of each supported layer, against a one-example-at-a-time autograd loop.

The oracle (`loop_oracle`) knows nothing of the engine: plain backward on one example (or one group of
rows) at a time, norm over all parameters, clip, sum. float64 throughout, so 1e-5 relative is loose.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tramontane.dp import DPEngine
from tramontane.errors import TramontaneWarning
from tramontane.models.layers import RMSNorm

DTYPE = torch.float64
RTOL = 1e-5


def per_example_grads(model: nn.Module, losses_fn: Callable, rows,
                      groups: list[list[int]] | None = None) -> list[dict[str, torch.Tensor]]:
    """Each example's gradient, by plain backward on that example alone.

    `rows` are the input rows (indexable by a list of row indices); `losses_fn(model, rows[idx])` returns
    one loss per row; `groups` lists which rows form one example (default: one row each)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = groups if groups is not None else [[i] for i in range(len(rows))]
    out = []
    for members in groups:
        model.zero_grad(set_to_none=True)
        losses_fn(model, rows[members]).sum().backward()
        out.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in named})
    model.zero_grad(set_to_none=True)
    return out


def clip_and_sum(grads: list[dict[str, torch.Tensor]],
                 max_grad_norm: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example norms over all parameters [G], and sum_i min(1, C / (norm_i + 1e-6)) grad_i."""
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in example.values())) for example in grads])
    total = {n: torch.zeros_like(g) for n, g in grads[0].items()}
    for norm, example in zip(norms, grads):
        clip = min(1.0, max_grad_norm / (norm.item() + 1e-6))
        for n in total:
            total[n] += clip * example[n]
    return norms, total


def loop_oracle(model: nn.Module, losses_fn: Callable, rows, max_grad_norm: float,
                groups: list[list[int]] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example gradient norms [G] and the clipped gradient sum, one example at a time."""
    return clip_and_sum(per_example_grads(model, losses_fn, rows, groups), max_grad_norm)


def engine_run(model: nn.Module, losses_fn: Callable, rows, max_grad_norm: float, example_ids=None,
               **kwargs) -> DPEngine:
    engine = DPEngine(model, max_grad_norm=max_grad_norm, noise_multiplier=1.0, seed=0, **kwargs)
    with engine.record(example_ids=example_ids):
        engine.backward(losses_fn(model, rows))
    return engine


def assert_matches_oracle(model, losses_fn, rows, groups=None, example_ids=None, **kwargs) -> None:
    """Both regimes: clipping inactive (C above every norm) and active (C below most norms)."""
    grads = per_example_grads(model, losses_fn, rows, groups)
    ref_norms, _ = clip_and_sum(grads, 1.0)
    for max_grad_norm in (10 * ref_norms.max().item(), 0.5 * ref_norms.median().item()):
        ref_norms, ref_sum = clip_and_sum(grads, max_grad_norm)
        with pytest.warns(TramontaneWarning):  # the seeded engine warns
            engine = engine_run(model, losses_fn, rows, max_grad_norm, example_ids, **kwargs)
        torch.testing.assert_close(engine.per_example_norms, ref_norms, rtol=RTOL, atol=0)
        got = engine.clipped_grad_sum()
        assert got.keys() == ref_sum.keys()
        for name, ref in ref_sum.items():
            torch.testing.assert_close(got[name], ref, rtol=RTOL, atol=RTOL * ref.abs().max().item(),
                                       msg=f"clipped sum of {name}")
        clipped = (engine.clip_factors < 1).sum().item()
        assert clipped == 0 if max_grad_norm > ref_norms.max() else clipped > 0


def _sin_losses(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A nonlinear per-row loss, so output gradients differ row to row and token to token."""
    out = model(x)
    weights = torch.linspace(0.5, 1.5, out.shape[-1], dtype=out.dtype)
    return (out.sin() * weights).reshape(out.shape[0], -1).sum(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize"])
@pytest.mark.parametrize("shape", [(6, 7), (6, 5, 7), (6, 3, 2, 7)], ids=["BD", "BTD", "BTTD"])
def test_linear(shape: tuple[int, ...], strategy: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(7, 4, bias=True).to(DTYPE)
    x = torch.randn(*shape, dtype=DTYPE, generator=_gen(1))
    assert_matches_oracle(model, _sin_losses, x, linear_strategy=strategy)


def test_linear_auto_strategy_picks_the_cheaper_side() -> None:
    from tramontane.dp.rules import LinearRule
    assert LinearRule.choose(rows=1, fan_in=4096, fan_out=4096) == "ghost"  # [B, d]: norm = |a| |g|
    assert LinearRule.choose(rows=128, fan_in=256, fan_out=64) == "materialize"
    assert LinearRule.choose(rows=128, fan_in=256, fan_out=2000) == "ghost"


def test_embedding_with_repeated_tokens_and_padding_idx() -> None:
    torch.manual_seed(0)
    model = nn.Embedding(11, 5, padding_idx=0).to(DTYPE)
    tokens = torch.tensor([[1, 1, 1, 2, 0, 0], [3, 4, 3, 4, 3, 0], [5, 6, 7, 8, 9, 10], [0, 0, 0, 0, 0, 0],
                           [2, 2, 2, 2, 2, 2]])
    assert_matches_oracle(model, _sin_losses, tokens)


@pytest.mark.parametrize("make", [lambda: RMSNorm(6, 1e-5), lambda: nn.LayerNorm(6), lambda: nn.RMSNorm(6),
                                  lambda: nn.LayerNorm((3, 6))],
                         ids=["RMSNorm", "LayerNorm", "nnRMSNorm", "LN2d"])
def test_norm_layers(make) -> None:
    torch.manual_seed(0)
    model = make().to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    x = torch.randn(5, 3, 6, dtype=DTYPE, generator=_gen(2))
    assert_matches_oracle(model, _sin_losses, x)


class Scale(nn.Module):
    """A custom module with a parameter and no dedicated rule: goes through torch.func."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 2.0, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.gain) + x.pow(2).mean(-1, keepdim=True) * self.gain


@pytest.mark.parametrize("make", [lambda: nn.Conv1d(3, 4, kernel_size=3, padding=1), lambda: Scale(6)],
                         ids=["Conv1d", "custom"])
def test_functorch_fallback(make) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(make(), nn.Flatten(), nn.LazyLinear(3)).to(DTYPE)
    x = torch.randn(5, 3, 6, dtype=DTYPE, generator=_gen(3))
    model(x)  # materialise the lazy layer
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0)
    assert engine.describe()["0"] == "FunctionalRule"
    assert_matches_oracle(model, _sin_losses, x)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over SDPA
def test_multihead_attention_is_one_functorch_unit() -> None:
    torch.manual_seed(0)

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=False)[0]

    model = SelfAttention().to(DTYPE)
    x = torch.randn(4, 5, 8, dtype=DTYPE, generator=_gen(4))
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0)
    assert engine.describe() == {"mha": "FunctionalRule"}  # out_proj is used without being called
    assert_matches_oracle(model, _sin_losses, x)


class TiedLM(nn.Module):
    """Embedding tied to the output head, with a layer in between: the per-example gradient of the shared
    matrix is the sum of both uses'."""

    def __init__(self, vocab: int = 13, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.emb(tokens))))


def _lm_losses(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    losses = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].reshape(-1), reduction="none")
    return losses.view(tokens.shape[0], -1).sum(1)


@pytest.mark.parametrize("strategy", ["auto", "materialize"])
def test_tied_embedding_and_output(strategy: str) -> None:
    torch.manual_seed(0)
    model = TiedLM().to(DTYPE)
    tokens = torch.randint(0, 13, (5, 9), generator=_gen(5))
    assert_matches_oracle(model, _lm_losses, tokens, linear_strategy=strategy)


class Twice(nn.Module):
    """One Linear applied twice in a forward: its per-example gradient is the sum of both calls'."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize"])
def test_layer_called_twice(strategy: str) -> None:
    torch.manual_seed(0)
    model = Twice().to(DTYPE)
    x = torch.randn(5, 4, 5, dtype=DTYPE, generator=_gen(6))
    assert_matches_oracle(model, _sin_losses, x, linear_strategy=strategy)


def test_in_place_activation_after_linear() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).to(DTYPE)
    x = torch.randn(6, 4, 5, dtype=DTYPE, generator=_gen(7))
    assert_matches_oracle(model, _sin_losses, x)


def test_example_ids_share_one_clip() -> None:
    """K=2 rows (augmentations) per example: one norm and one clip per example, over both rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6), RMSNorm(6, 1e-5), nn.Linear(6, 4)).to(DTYPE)
    tokens = torch.randint(0, 11, (6, 5), generator=_gen(8))
    example_ids = [7, 3, 7, 9, 3, 9]  # arbitrary labels, rows of one example not adjacent
    groups = [[1, 4], [0, 2], [3, 5]]  # sorted by label: 3, 7, 9
    assert_matches_oracle(model, _sin_losses, tokens, groups=groups, example_ids=example_ids)


def test_micro_batches_accumulate_to_the_logical_batch() -> None:
    torch.manual_seed(0)
    model = TiedLM().to(DTYPE)
    tokens = torch.randint(0, 13, (7, 9), generator=_gen(9))
    ref_norms, ref_sum = loop_oracle(model, _lm_losses, tokens, 0.5 * 0 + 3.0)
    engine = DPEngine(model, max_grad_norm=3.0, noise_multiplier=1.0)
    norms = []
    for part in (tokens[:3], tokens[3:4], tokens[4:]):
        with engine.record():
            engine.backward(_lm_losses(model, part))
        norms.append(engine.per_example_norms)
    assert engine.examples_in_step == 7
    torch.testing.assert_close(torch.cat(norms), ref_norms, rtol=RTOL, atol=0)
    got = engine.clipped_grad_sum()
    for name, ref in ref_sum.items():
        torch.testing.assert_close(got[name], ref, rtol=RTOL, atol=RTOL * ref.abs().max().item())


@pytest.mark.parametrize("zero_weight", [False, True], ids=["output-clobbered", "zero-weight"])
def test_norm_output_modified_in_place_or_zero_weight(zero_weight: bool) -> None:
    """Both ways of getting normalize(x): from the output (here clobbered by an in-place ReLU, so the rule
    must fall back to the input) and recomputed (a zero weight entry)."""
    torch.manual_seed(0)
    model = nn.Sequential(RMSNorm(6, 1e-5), nn.ReLU(inplace=True), nn.Linear(6, 3)).to(DTYPE)
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        if zero_weight:
            model[0].weight[2] = 0.0
    x = torch.randn(5, 4, 6, dtype=DTYPE, generator=_gen(10))
    assert_matches_oracle(model, _sin_losses, x)
