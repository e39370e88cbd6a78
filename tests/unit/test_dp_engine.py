"""The engine's privacy mechanics, tested statistically and at their edges: noise std and mean, independence
of noise across steps and parameters, seeds, the clipping bound, empty batches, refused modules, misuse."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import random_model, tiny_args
from tramontane.dp import CLIP_EPS, DPEngine, find_unsupported, validate_model
from tramontane.errors import (
    ConfigError,
    DPInputError,
    DPUsageError,
    PrivacyParameterError,
    TramontaneError,
    TramontaneWarning,
    UnsupportedModuleError,
)

Z = 6.0  # two-sided windows at 6 standard deviations: a correct engine fails once in ~5e8 runs


def _noise_only_grads(model: nn.Module, sigma: float, clip: float, expected: float, seed: int | None) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        engine = DPEngine(model, max_grad_norm=clip, noise_multiplier=sigma, seed=seed)
    engine.add_noise_and_set_grads(expected_batch_size=expected)  # an empty logical batch
    assert engine.steps == 1
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _std_window(n: int, std: float) -> tuple[float, float]:
    """Bounds on the sample std of n N(0, std^2) draws: (n-1) s^2 / std^2 ~ chi2(n-1) ~ N(n-1, 2(n-1))."""
    half = Z * math.sqrt(2 * (n - 1)) / (n - 1)
    return std * math.sqrt(1 - half), std * math.sqrt(1 + half)


@pytest.mark.parametrize("seed", [0, None])
def test_noise_has_std_sigma_c_and_mean_zero(seed: int | None) -> None:
    model = nn.Linear(500, 400, bias=True)  # 200,400 coordinates
    sigma, clip, expected = 1.3, 0.7, 8.0
    grads = _noise_only_grads(model, sigma, clip, expected, seed)
    noise = torch.cat([g.flatten() for g in grads.values()]).double() * expected  # undo the normalisation
    n, std = noise.numel(), sigma * clip
    low, high = _std_window(n, std)
    assert low < noise.std().item() < high, (noise.std().item(), low, high)
    assert abs(noise.mean().item()) < Z * std / math.sqrt(n)
    # Coordinates independent: neighbouring coordinates uncorrelated, the bias not a copy of the weight.
    corr = torch.corrcoef(torch.stack([noise[:-1], noise[1:]]))[0, 1].item()
    assert abs(corr) < Z / math.sqrt(n)
    assert not torch.equal(grads["bias"], grads["weight"][0])


def test_first_step_continues_the_seeded_noise() -> None:
    """A resumed engine (first_step=k) draws the uninterrupted engine's noise of step k, not of step 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        model = nn.Linear(20, 10)
        whole = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0, seed=3)
        draws = []
        for _ in range(3):
            whole.add_noise_and_set_grads(1.0)
            draws.append(model.weight.grad.clone())
        resumed = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0, seed=3, first_step=2)
        resumed.add_noise_and_set_grads(1.0)
    assert torch.equal(model.weight.grad, draws[2])
    assert not torch.equal(model.weight.grad, draws[0])


def _lm_losses(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    losses = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return losses.view(tokens.shape[0], tokens.shape[1] - 1).sum(1)


def _loop_clipped_sum(model: nn.Module, tokens: torch.Tensor,
                      clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent of the engine: each example's gradient alone by autograd, clipped, summed. Returns the
    flat sum (parameters in model.parameters() order) and the per-example norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    total, norms = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64), []
    for i in range(tokens.shape[0]):
        grads = torch.autograd.grad(_lm_losses(model, tokens[i:i + 1]).sum(), params)
        flat = torch.cat([g.flatten() for g in grads]).double()
        norms.append(flat.norm().item())
        total += flat * min(1.0, clip / (norms[-1] + CLIP_EPS))
    return total, torch.tensor(norms)


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def test_noise_is_added_to_the_clipped_sum() -> None:
    """R noisy steps on one batch: their mean is the per-example loop's clipped sum (seen along its own
    direction, where it stands out of the noise), and what is left is noise of std sigma C."""
    model = random_model(tiny_args(), seed=0)
    tokens = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(0))
    sigma, clip, expected, draws = 0.25, 0.5, 3.0, 16
    signal, _ = _loop_clipped_sum(model, tokens, clip)
    engine = DPEngine(model, max_grad_norm=clip, noise_multiplier=sigma)
    noisy = []
    for _ in range(draws):
        with engine.record():
            engine.backward(_lm_losses(model, tokens))
        assert all(p.grad is None for p in model.parameters())  # nothing set before the noise
        engine.add_noise_and_set_grads(expected_batch_size=expected)
        assert engine.clipped_grad_sum()["norm.weight"].abs().sum() == 0  # the next step starts from zero
        noisy.append(_flat_grad(model) * expected)  # undo the normalisation
        for p in model.parameters():
            p.grad = None
    noisy = torch.stack(noisy)  # [R, P]
    std, se = sigma * clip, sigma * clip / math.sqrt(draws)
    direction = signal / signal.norm()
    along = (noisy @ direction).mean().item()  # ~ N(|signal|, se^2); 0 if the clipped sum were dropped
    assert signal.norm().item() > 20 * se  # so the window below cannot pass without it
    assert abs(along - signal.norm().item()) < Z * se, (along, signal.norm().item())
    # The residual of the mean: R ||mean - signal||^2 / (sigma C)^2 ~ chi2(P).
    p = signal.numel()
    chi2 = ((noisy.mean(0) - signal).pow(2).sum() / se**2).item()
    assert abs(chi2 - p) < Z * math.sqrt(2 * p), (chi2, p)
    low, high = _std_window(noisy.numel(), std)
    assert low < (noisy - signal).std().item() < high


def test_seed_warns_and_reproduces_no_seed_does_not() -> None:
    model = nn.Linear(20, 10)
    with pytest.warns(TramontaneWarning, match="NOT secure"):
        DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0, seed=7)
    a = _noise_only_grads(model, 1.0, 1.0, 1.0, seed=7)
    b = _noise_only_grads(model, 1.0, 1.0, 1.0, seed=7)
    assert all(torch.equal(a[n], b[n]) for n in a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without a seed
        c = _noise_only_grads(model, 1.0, 1.0, 1.0, seed=None)
        d = _noise_only_grads(model, 1.0, 1.0, 1.0, seed=None)
    assert not torch.equal(c["weight"], d["weight"])


def test_noise_differs_across_steps() -> None:
    for seed in (3, None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TramontaneWarning)
            model = nn.Linear(20, 10)
            engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0, seed=seed)
        engine.add_noise_and_set_grads(1.0)
        first = model.weight.grad.clone()
        engine.add_noise_and_set_grads(1.0)
        assert not torch.equal(first, model.weight.grad)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_every_example_is_clipped_to_the_bound(moe: bool) -> None:
    """Each example alone through the engine (no noise): its clipped gradient has norm <= C."""
    model = random_model(tiny_args(moe=moe, tied_embeddings=True), seed=2)
    tokens = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(3))
    clip = 0.25
    with pytest.warns(TramontaneWarning, match="NOT differentially private"):
        engine = DPEngine(model, max_grad_norm=clip, noise_multiplier=0.0)
    for i in range(tokens.shape[0]):
        with engine.record():
            engine.backward(_lm_losses(model, tokens[i:i + 1]))
        assert engine.per_example_norms.item() > 10 * clip  # clipping is active
        total = torch.sqrt(sum(g.double().pow(2).sum() for g in engine.clipped_grad_sum().values()))
        assert total.item() <= clip * (1 + 1e-5)
        assert total.item() >= clip * (1 - 1e-4)  # ... and not clipped to much less
        engine.reset()


def test_empty_micro_batch_and_empty_step() -> None:
    model = random_model(tiny_args(), seed=0)
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0)
    with engine.record():  # a zero-example micro-batch through the model
        engine.backward(_lm_losses(model, torch.zeros(0, 9, dtype=torch.long)))
    assert engine.per_example_norms.shape == (0,) and engine.examples_in_step == 0
    with engine.record():  # nothing at all
        pass
    engine.add_noise_and_set_grads(expected_batch_size=2.0)
    assert engine.steps == 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


class MixesExamples(nn.Module):
    """A custom layer fed time-major: dim 0 is not the example axis."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.transpose(0, 1)).transpose(0, 1)


def test_unsupported_modules_are_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Sequential(nn.LSTM(4, 4)),
                          nn.Embedding(5, 4, scale_grad_by_freq=True), nn.MultiheadAttention(4, 2),
                          nn.InstanceNorm1d(4, track_running_stats=True), nn.Embedding(5, 4, max_norm=1.0))
    names = [name for name, _, _ in find_unsupported(model)]
    assert names == ["1", "2.0", "3", "4", "5", "6"]
    expected = r"6 module\(s\)[\s\S]*1 \(BatchNorm1d\)[\s\S]*2.0 \(LSTM\)"
    with pytest.raises(UnsupportedModuleError, match=expected):
        DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0)
    validate_model(nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4),
                                 nn.MultiheadAttention(4, 2, batch_first=True)))
    engine = DPEngine(MixesExamples(), max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(UnsupportedModuleError, match="dim 0 must be the example axis"), engine.record():
        engine.backward(engine.model(torch.randn(3, 5, 4)).sum((1, 2)))
    assert all(p.requires_grad for p in engine.model.parameters())  # restored after the error


def test_parameter_and_usage_errors() -> None:
    model = nn.Linear(3, 2)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(PrivacyParameterError):
            DPEngine(model, max_grad_norm=bad, noise_multiplier=1.0)
    for bad in (-0.1, float("nan")):
        with pytest.raises(PrivacyParameterError):
            DPEngine(model, max_grad_norm=1.0, noise_multiplier=bad)
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(PrivacyParameterError):
        engine.add_noise_and_set_grads(expected_batch_size=0)
    with pytest.raises(ConfigError, match="linear_strategy"):
        DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0, linear_strategy="fast")
    x = torch.randn(4, 3)
    with pytest.raises(DPInputError, match="one loss per example"), engine.record():
        engine.backward(model(x))  # [B, 2]: not per-example losses
    with pytest.raises(DPInputError, match="1-D"), engine.record(example_ids=[[0, 1], [2, 3]]):
        pass
    with pytest.raises(DPUsageError, match="no gradient reached"), engine.record():
        model(x)
    with pytest.raises(DPUsageError, match="inside"):
        engine.backward(model(x).sum(1))
    with pytest.raises(DPUsageError, match="ran twice"), engine.record():
        model(x)
        model(x)
    with pytest.raises(DPInputError, match="4 examples"), engine.record(example_ids=[0, 1, 2]):
        model(x)
    with pytest.raises(DPUsageError, match="nested"), engine.record(), engine.record():
        pass
    with pytest.raises(DPUsageError, match="inside"), engine.record():
        engine.add_noise_and_set_grads(1.0)
    # The CLI catches TramontaneError; the old built-in types still match (existing callers keep working).
    assert issubclass(DPInputError, TramontaneError) and issubclass(DPInputError, ValueError)
    assert issubclass(DPUsageError, TramontaneError) and issubclass(DPUsageError, RuntimeError)
    assert model.weight.requires_grad and model.weight.grad is None


def test_compute_noisy_grads_is_the_clipped_sum_plus_noise() -> None:
    """The one-call step over two micro-batches, against an independent per-example loop: without noise
    the .grad is the loop's clipped sum / expected batch size; with noise, the rest has std sigma C."""
    tokens = torch.randint(0, 97, (5, 9), generator=torch.Generator().manual_seed(4))
    micro = [tokens[:2], tokens[2:]]
    model = random_model(tiny_args(), seed=0)
    _, norms = _loop_clipped_sum(model, tokens, 1.0)
    clip = norms.median().item()  # some examples clipped, some not
    signal, _ = _loop_clipped_sum(model, tokens, clip)
    with pytest.warns(TramontaneWarning, match="NOT differentially private"):
        engine = DPEngine(model, max_grad_norm=clip, noise_multiplier=0.0)
    engine.compute_noisy_grads(_lm_losses, micro, expected_batch_size=5.0)
    assert 0 < (engine.clip_factors < 1).sum() < 3  # the last micro-batch: clipping active for some only
    torch.testing.assert_close(_flat_grad(model) * 5.0, signal, rtol=1e-4,
                               atol=1e-4 * signal.abs().max().item())

    sigma = 0.3
    for p in model.parameters():
        p.grad = None
    engine = DPEngine(model, max_grad_norm=clip, noise_multiplier=sigma)
    engine.compute_noisy_grads(_lm_losses, micro, expected_batch_size=5.0)
    noise = _flat_grad(model) * 5.0 - signal
    low, high = _std_window(noise.numel(), sigma * clip)
    assert low < noise.std().item() < high
    assert abs(noise.mean().item()) < Z * sigma * clip / math.sqrt(noise.numel())


class LoggedTokens:
    """An objective over fixed token rows that logs which rows it is asked for, in order."""

    def __init__(self, tokens: torch.Tensor, fail_at: int | None = None) -> None:
        self.tokens, self.fail_at, self.log = tokens, fail_at, []

    def rows(self, indices) -> tuple[torch.Tensor, None]:
        self.log.append(list(indices))
        return self.tokens[list(indices)], None

    def losses(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if len(self.log) == self.fail_at:
            raise KeyError("a broken objective")
        return _lm_losses(model, batch)


def test_step_is_the_batch_and_extra_rows_clipped_plus_noise() -> None:
    """`step`: each micro-batch's rows looked up just before it is recorded, the extra batch (a canary) built
    only after them, and .grad = (the per-example loop's clipped sum over all of them + noise) / q N."""
    tokens = torch.randint(0, 97, (6, 9), generator=torch.Generator().manual_seed(5))
    model = random_model(tiny_args(), seed=0)
    clip = _loop_clipped_sum(model, tokens, 1.0)[1].median().item()  # some examples clipped, some not
    indices = [0, 2, 3, 4, 5]
    signal, _ = _loop_clipped_sum(model, tokens[indices + [1]], clip)  # the batch, then row 1 as the extra
    objective = LoggedTokens(tokens)

    def canary():
        objective.log.append("canary")
        yield tokens[1:2], None

    with pytest.warns(TramontaneWarning, match="NOT differentially private"):
        engine = DPEngine(model, max_grad_norm=clip, noise_multiplier=0.0)
    out = engine.step(objective, indices, expected_batch_size=4.0, micro_batch_size=2, extra_batches=canary())
    assert objective.log == [[0, 2], [3, 4], [5], "canary"]
    assert engine.steps == 1 and engine.examples_in_step == 0  # the step is taken, the next starts empty
    scale = signal.abs().max().item()
    torch.testing.assert_close(_flat_grad(model) * 4.0, signal, rtol=1e-4, atol=1e-4 * scale)
    with torch.no_grad():
        mean = _lm_losses(model, tokens[indices + [1]]).mean().item()
    assert out.rows == 6 and out.mean == pytest.approx(mean)

    sigma = 0.3  # with noise: the rest has std sigma C
    engine = DPEngine(model, max_grad_norm=clip, noise_multiplier=sigma)
    engine.step(objective, indices, expected_batch_size=4.0, micro_batch_size=4, extra_batches=canary())
    noise = _flat_grad(model) * 4.0 - signal
    low, high = _std_window(noise.numel(), sigma * clip)
    assert low < noise.std().item() < high


def test_step_failure_leaves_nothing_behind() -> None:
    """A step that fails half-way drops what it recorded (a later step must not add it), and refuses bad
    arguments before looking at any example."""
    tokens = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(6))
    model = random_model(tiny_args(), seed=0)
    with pytest.warns(TramontaneWarning, match="NOT differentially private"):
        engine = DPEngine(model, max_grad_norm=0.5, noise_multiplier=0.0)
    broken = LoggedTokens(tokens, fail_at=2)
    with pytest.raises(KeyError):
        engine.step(broken, [0, 1, 2, 3], expected_batch_size=4.0, micro_batch_size=2)
    assert broken.log == [[0, 1], [2, 3]] and engine.examples_in_step == 0 and engine.steps == 0
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    objective = LoggedTokens(tokens)
    with pytest.raises(PrivacyParameterError, match="expected_batch_size"):
        engine.step(objective, [0], expected_batch_size=0.0, micro_batch_size=2)
    with pytest.raises(ConfigError, match="max_size"):
        engine.step(objective, [0], expected_batch_size=1.0, micro_batch_size=0)
    with pytest.raises(DPUsageError, match="inside"), engine.record():
        engine.step(objective, [0], expected_batch_size=1.0, micro_batch_size=1)
    assert objective.log == []
    engine.step(objective, [3], expected_batch_size=1.0, micro_batch_size=2)  # only example 3 counts
    signal, _ = _loop_clipped_sum(model, tokens[3:4], 0.5)
    torch.testing.assert_close(_flat_grad(model), signal, rtol=1e-4, atol=1e-4 * signal.abs().max().item())


class UsesWeightOutsideForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.mid(self.emb(tokens))), self.emb.weight)  # head tied by hand


class CentresOverBatch(nn.Module):
    """Mixes examples without any parameter of its own: invisible to the validator."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.out = nn.Linear(6, 11)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        return self.out(h - h.mean(0, keepdim=True))


@pytest.mark.parametrize(("make", "match"), [(UsesWeightOutsideForward, "outside their module's forward"),
                                              (CentresOverBatch, "mixes examples")])
def test_verify_catches_what_hooks_cannot_see(make, match: str) -> None:
    torch.manual_seed(0)
    model = make()
    tokens = torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(0))
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(UnsupportedModuleError, match=match):
        engine.verify(_lm_losses, tokens)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_verify_passes_on_the_models(moe: bool) -> None:
    model = random_model(tiny_args(moe=moe, tied_embeddings=True), seed=0)
    model.layers[0].attention.wq = nn.Sequential(nn.Dropout(0.3), model.layers[0].attention.wq)
    model.train()  # dropout active: verify must replay the same masks
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0)
    engine.verify(_lm_losses, torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(0)))
    assert engine.examples_in_step == 0 and all(p.grad is None for p in model.parameters())


def test_activation_checkpointing_is_refused() -> None:
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(checkpoint(lambda h: torch.tanh(self.a(h)), x, use_reentrant=False))

    engine = DPEngine(Checkpointed(), max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(UnsupportedModuleError, match="checkpointing"), engine.record():
        engine.backward(engine.model(torch.randn(3, 4, requires_grad=True)).sum(1))
