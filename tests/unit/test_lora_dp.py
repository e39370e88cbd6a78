"""LoRA adapters under the DP engine: the adapters' per-example gradient norms and clipped sums on tiny
Mistral / Mixtral models (experts adapted: each expert sees token rows of several examples) against a
one-example-at-a-time autograd loop, and on the dense model against Opacus' per-sample gradients; the frozen
base gets no gradient and no update; user-level clipping (several rows per user) against a per-user loop.
Then the adapter itself: PEFT's initialisation, merging, dtypes.

float64 throughout the oracle comparisons, adapters drawn non-zero (B = 0 would give A no gradient at all).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import random_model, tiny_args
from tramontane.dp import DPEngine
from tramontane.errors import UnsupportedModuleError
from tramontane.finetune.lora import (
    LoraConfig,
    LoraLinear,
    add_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
)
from tramontane.models.transformer import Transformer

RTOL = 1e-8
HUGE = 1e9  # a clipping bound above every norm: clipping off
CASES = {  # model kind -> adapter targets
    "mistral": (False, ("attention", "mlp")),
    "mixtral": (True, ("wq", "wv", "experts")),
}


def lora_model(moe: bool, targets: tuple[str, ...], seed: int = 0, **config: object) -> Transformer:
    model = random_model(tiny_args(moe=moe), seed=seed).double()
    add_lora(model, LoraConfig(rank=3, alpha=6, targets=targets, **config))  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.2)
    return model


def next_token_losses(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[B]: each sequence's summed next-token loss."""
    logits = model(tokens[:, :-1])
    losses = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].reshape(-1), reduction="none")
    return losses.view(tokens.shape[0], -1).sum(1)


def tokens_for(batch: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 97, (batch, 11), generator=torch.Generator().manual_seed(seed))


def loop_grads(model: nn.Module, tokens: torch.Tensor,
               groups: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    """Each privacy unit's gradient of the trainable parameters: plain backward on the sum of that unit's
    row losses alone."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = []
    for members in groups:
        model.zero_grad(set_to_none=True)
        next_token_losses(model, tokens[members]).sum().backward()
        out.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in trainable})
    model.zero_grad(set_to_none=True)
    return out


def clipped(grads: list[dict[str, torch.Tensor]], max_grad_norm: float
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Norms [G] over all trainable parameters, and sum_i min(1, C / (norm_i + 1e-6)) g_i."""
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in unit.values())) for unit in grads])
    clips = [min(1.0, max_grad_norm / (norm.item() + 1e-6)) for norm in norms]
    total = {n: sum(clip * unit[n] for clip, unit in zip(clips, grads)) for n in grads[0]}
    return norms, total  # type: ignore[return-value]


def engine_record(model: nn.Module, tokens: torch.Tensor, max_grad_norm: float, example_ids=None,
                  strategy: str = "auto") -> DPEngine:
    engine = DPEngine(model, max_grad_norm=max_grad_norm, noise_multiplier=1.0, linear_strategy=strategy)
    with engine.record(example_ids=example_ids):
        engine.backward(next_token_losses(model, tokens))
    return engine


def assert_engine_matches(model: nn.Module, tokens: torch.Tensor, groups: list[list[int]], example_ids=None,
                          strategy: str = "auto") -> None:
    """Clipping off (the plain per-unit sum) and on (C below most norms): norms and clipped sums."""
    grads = loop_grads(model, tokens, groups)
    ref_norms, _ = clipped(grads, HUGE)
    assert bool((ref_norms > 0).all())
    for max_grad_norm in (HUGE, 0.5 * ref_norms.median().item()):
        ref_norms, ref_sum = clipped(grads, max_grad_norm)
        engine = engine_record(model, tokens, max_grad_norm, example_ids, strategy)
        torch.testing.assert_close(engine.per_example_norms, ref_norms, rtol=RTOL, atol=0)
        got = engine.clipped_grad_sum()
        assert got.keys() == ref_sum.keys() and all("lora_" in n for n in got)
        for name, ref in ref_sum.items():
            torch.testing.assert_close(got[name], ref, rtol=RTOL, atol=RTOL * ref.abs().max().item(),
                                       msg=name)


# ------------------------------------------------------------------------------- per-example gradients

@pytest.mark.parametrize("strategy", ["ghost", "materialize"])
@pytest.mark.parametrize("case", CASES)
def test_adapter_gradients_match_one_example_loop(case: str, strategy: str) -> None:
    moe, targets = CASES[case]
    model = lora_model(moe, targets)
    tokens = tokens_for(4)
    assert_engine_matches(model, tokens, [[i] for i in range(4)], strategy=strategy)


@pytest.mark.parametrize("case", CASES)
def test_user_level_clipping_matches_per_user_loop(case: str) -> None:
    """Rows grouped by example_ids (3 users, 2 sequences each, interleaved): one norm, one clip per user."""
    moe, targets = CASES[case]
    model = lora_model(moe, targets, seed=5)
    tokens = tokens_for(6, seed=6)
    assert_engine_matches(model, tokens, [[0, 3], [1, 4], [2, 5]], example_ids=[10, 11, 12, 10, 11, 12])


def test_experts_see_rows_of_several_examples() -> None:
    """The Mixtral cases are only meaningful if an adapted expert's lora_A is fed rows of several examples."""
    model = lora_model(*CASES["mixtral"])
    seen: list[int] = []
    hooks = []
    for expert in model.layers[0].feed_forward.experts:
        assert isinstance(expert.w1, LoraLinear)
        hooks.append(expert.w1.lora_A.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0])))
    with torch.no_grad():
        model(tokens_for(4)[:, :-1])
    for hook in hooks:
        hook.remove()
    assert len(seen) == 4 and sum(seen) == 4 * 10 * 2  # every token to its top 2
    assert max(seen) > 10  # an expert got more rows than one sequence has tokens


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_dense_per_sample_gradients_match_opacus() -> None:
    opacus = pytest.importorskip("opacus")
    model = lora_model(*CASES["mistral"], seed=7).train()  # Opacus records in training mode only
    tokens = tokens_for(5, seed=8)
    wrapped = opacus.GradSampleModule(model, batch_first=True, loss_reduction="sum")
    next_token_losses(wrapped, tokens).sum().backward()
    samples = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    wrapped.zero_grad()
    wrapped._close()
    assert samples and all("lora_" in n for n in samples)
    # Opacus' per-sample gradients are the loop's (an oracle for the oracle) ...
    for i, unit in enumerate(loop_grads(model, tokens, [[i] for i in range(5)])):
        for name, grad in unit.items():
            torch.testing.assert_close(samples[name][i], grad, rtol=1e-7, atol=1e-10, msg=name)
    # ... and give the engine's norms and clipped sums
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in samples.values()))
    max_grad_norm = norms.median().item()
    engine = engine_record(model, tokens, max_grad_norm)
    torch.testing.assert_close(engine.per_example_norms, norms, rtol=RTOL, atol=0)
    clip = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    for name, got in engine.clipped_grad_sum().items():
        expected = torch.einsum("b,b...->...", clip, samples[name])
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_base_gets_no_gradient_and_no_update(case: str) -> None:
    model = lora_model(*CASES[case])
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0)
    assert engine.describe() and all(rule == "LinearRule" and name.rsplit(".", 1)[1] in ("lora_A", "lora_B")
                                     for name, rule in engine.describe().items())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters.keys() == {n for n, _ in model.named_parameters() if "lora_" in n}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)  # decay would move the base
    tokens = tokens_for(4)
    with engine.record():
        engine.backward(next_token_losses(model, tokens))
    engine.add_noise_and_set_grads(expected_batch_size=4)
    optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert param.grad is None and torch.equal(param, frozen[name]), name
        else:
            assert param.grad is not None and not torch.equal(param, adapters[name]), name


def test_expert_adapters_with_dropout_are_refused_not_misattributed() -> None:
    """Dropout on an expert adapter hides the routed rows from every expert layer: the engine cannot check the
    routing, and refuses (documented in lora.py) rather than charge rows to guessed examples."""
    model = lora_model(True, ("experts",), dropout=0.1).train()
    with pytest.raises(UnsupportedModuleError, match="could not recover the routing"):
        engine_record(model, tokens_for(3), 1.0)


def test_bfloat16_base_with_float32_expert_adapters() -> None:
    """A bfloat16 base with float32 adapters, experts included: the engine's per-example norms and gradient
    sum agree with autograd on the same batch (`verify`), the routing check passing through the cast."""
    model = random_model(tiny_args(moe=True), seed=9)
    add_lora(model, LoraConfig(rank=3, targets=("wq", "experts")), base_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    with torch.no_grad():
        for lora in lora_modules(model).values():
            lora.lora_B.weight.normal_(0, 0.2)
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0)
    engine.verify(lambda m, t: next_token_losses(m, t).float(), tokens_for(4), examples=4)


# ------------------------------------------------------------------------------------ the adapter itself

def test_initialisation_is_peft_s() -> None:
    """A Kaiming-uniform (a = sqrt(5): bound 1 / sqrt(fan_in)), B zero: the adapted model starts as the
    base."""
    base = random_model(tiny_args(), seed=3).double()
    tokens = tokens_for(2)
    with torch.no_grad():
        expected = base(tokens)
    model = add_lora(base, LoraConfig(rank=4, targets=("all",)))
    assert len(lora_modules(model)) == 2 * 7
    for lora in lora_modules(model).values():
        a, b = lora.lora_A.weight, lora.lora_B.weight
        assert a.dtype == torch.float64 and a.abs().max() <= 1 / math.sqrt(lora.in_features) and a.std() > 0
        assert torch.equal(b, torch.zeros_like(b))
    with torch.no_grad():
        assert torch.equal(model(tokens), expected)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in lora_state_dict(model)}


def test_merge_gives_plain_linears_with_the_adapted_logits() -> None:
    model = lora_model(*CASES["mixtral"]).eval()
    tokens = tokens_for(2)
    with torch.no_grad():
        expected = model(tokens)
    names = list(lora_modules(model))
    config = LoraConfig(rank=3, alpha=6, targets=("wq", "wv", "experts"))
    delta = {n: m.delta_weight() for n, m in lora_modules(model).items()}
    bases = {n: m.base.weight.detach().clone() for n, m in lora_modules(model).items()}
    assert delta[names[0]].abs().max() > 0.01 and config.scaling == 2.0
    merged = merge_lora(model)
    assert merged is model and not lora_modules(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    for name in names:
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear
        torch.testing.assert_close(linear.weight, bases[name] + delta[name], rtol=0, atol=1e-15)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, rtol=1e-10, atol=1e-10)


def test_state_dict_round_trip_and_names() -> None:
    model = lora_model(*CASES["mistral"])
    state = lora_state_dict(model)
    assert {"layers.0.attention.wq.lora_A.weight", "layers.1.feed_forward.w2.lora_B.weight"} <= state.keys()
    assert len(state) == 2 * 7 * 2
    other = add_lora(random_model(tiny_args(), seed=0).double(), LoraConfig(rank=3, alpha=6,
                                                                            targets=("attention", "mlp")))
    load_lora_state_dict(other, state)
    assert all(torch.equal(lora_state_dict(other)[k], v) for k, v in state.items())


def test_bfloat16_base_forward_runs_the_adapter_in_float32() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8, bias=True).to(torch.bfloat16)
    lora = LoraLinear(linear, rank=2, alpha=4, use_rslora=True)
    assert lora.lora_A.weight.dtype == torch.float32 and lora.scaling == 4 / math.sqrt(2)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(3, 16).to(torch.bfloat16)
    expected = linear(x) + (x.float() @ lora.lora_A.weight.T @ lora.lora_B.weight.T * lora.scaling).bfloat16()
    out = lora(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
