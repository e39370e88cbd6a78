"""The trainer's privacy wiring, observed from outside: realised batches against the ledger's q and N, each
step's gradient against an independent one-example-at-a-time loop, the ledger across resumes, and the
seeded streams (sampling independent of noise, resumed runs continuing them)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from tramontane import accounting
from tramontane.accounting import DpSgdEvent, EpsilonDeltaEvent, PrivacyLedger
from tramontane.dp import CLIP_EPS
from tramontane.errors import ConfigError, TramontaneWarning
from tramontane.training import TrainConfig, Trainer

Z = 6.0  # two-sided windows at 6 standard deviations, as in the dp tests


class Regression:
    """Squared error of a linear model on fixed random data; `asked` collects the examples of this step."""

    def __init__(self, n: int, dim: int = 6, out: int = 3, signal: bool = True, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=gen)
        self.y = 3 * torch.randn(n, out, generator=gen)
        self.signal = signal
        self.asked: list[int] = []

    def rows(self, indices: Sequence[int]) -> tuple[torch.Tensor, None]:
        self.asked.extend(indices)
        return torch.as_tensor(list(indices), dtype=torch.long), None

    def losses(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        error = (model(self.x[batch]) - self.y[batch]).pow(2).sum(-1)
        return error if self.signal else 0 * error  # no signal: the gradient is the noise alone


class Interrupt(Exception):
    pass


def _trainer(objective: Regression, n: int, config: TrainConfig, model: nn.Module | None = None,
             seed: int = 0, stop_at: int | None = None, **kwargs) -> tuple[Trainer, list[list[int]]]:
    """A trainer on a fresh linear model (same init for the same seed); the list fills with each step's
    examples. `stop_at`: the run dies right after that step (as if killed), before checkpointing it."""
    if model is None:
        torch.manual_seed(seed)
        model = nn.Linear(objective.x.shape[1], objective.y.shape[1])
    batches: list[list[int]] = []

    def on_step(step: int, total: int, info: dict[str, float]) -> None:
        assert info["batch"] == len(objective.asked)
        batches.append(sorted(objective.asked))
        objective.asked.clear()
        if step == stop_at:
            raise Interrupt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)  # seeded runs: deliberate here
        trainer = Trainer(model, objective, n, config, on_step=on_step, **kwargs)
    objective.asked.clear()
    return trainer, batches


def _fit(trainer: Trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        return trainer.fit()


def _capture_grads(trainer: Trainer, on_grads=None) -> list[list[torch.Tensor]]:
    """Every step's `.grad` of every parameter, right before the optimizer uses it."""
    seen: list[list[torch.Tensor]] = []

    def hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        seen.append([p.grad.detach().clone() for p in trainer.params])
        if on_grads is not None:
            on_grads(seen[-1])

    trainer.optimizer.register_step_pre_hook(hook)
    return seen


def _clipped_sum(model: nn.Module, objective: Regression, batch: Sequence[int],
                 clip: float) -> list[torch.Tensor]:
    """sum_i min(1, C / (||g_i|| + eps)) g_i, each g_i from autograd on example i's loss alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    with torch.enable_grad():
        for i in batch:
            grads = torch.autograd.grad(objective.losses(model, torch.tensor([i])).sum(), params)
            norm = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads))
            for t, g in zip(total, grads):
                t.add_(g.double(), alpha=min(1.0, clip / (norm + CLIP_EPS)))
    return total


def _norms(model: nn.Module, objective: Regression, n: int) -> torch.Tensor:
    params = list(model.parameters())
    out = []
    for i in range(n):
        grads = torch.autograd.grad(objective.losses(model, torch.tensor([i])).sum(), params)
        out.append(math.sqrt(sum(g.pow(2).sum().item() for g in grads)))
    return torch.tensor(out)


# -- Poisson sampling as the ledger says -------------------------------------------------------------------
@pytest.mark.parametrize("public_rate", [None, 0.05], ids=["q=B/N", "public q"])
def test_realised_batches_are_binomial_at_the_ledger_rate(public_rate: float | None) -> None:
    """Batch sizes over 200 steps: mean q N and variance q N (1 - q), with q and N those of the ledger."""
    n, steps = 200, 200
    objective = Regression(n)
    config = TrainConfig(steps=steps, batch_size=20 if public_rate is None else 13, noise_multiplier=1.0,
                         delta=1e-5, sample_rate=public_rate, noise_seed=3, micro_batch_size=64)
    trainer, batches = _trainer(objective, n, config)
    result = _fit(trainer)
    (event,) = result.ledger.events
    assert event.steps == steps and len(batches) == steps
    q = event.sample_rate
    assert q == (public_rate if public_rate is not None else 20 / n)
    assert result.sample_rate == q
    assert all(len(set(b)) == len(b) and all(0 <= i < n for i in b) for b in batches)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean().item() - mean) < Z * math.sqrt(var / steps), (sizes.mean().item(), mean)
    sd_var = math.sqrt(2 * var**2 / steps + var * (1 - 6 * q * (1 - q)) / steps)
    assert abs(sizes.var().item() - var) < Z * sd_var, (sizes.var().item(), var)


# -- the gradient the optimizer sees ---------------------------------------------------------------------
@pytest.mark.parametrize("public_rate", [None, 0.2], ids=["q=B/N", "public q"])
def test_step_gradient_is_the_clipped_sum_over_the_expected_batch(public_rate: float | None) -> None:
    """With negligible noise, each step's .grad equals an independent per-example loop's clipped sum over
    the realised batch, divided by q N (or, with a public q, by the public batch_size): not by the realised
    batch size, and not the noise alone."""
    n, batch_size = 64, 16
    objective = Regression(n)
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    clip = _norms(model, objective, n).median().item()  # about half the examples clipped
    config = TrainConfig(steps=8, batch_size=batch_size, noise_multiplier=1e-6, delta=1e-5, lr=1e-2,
                         max_grad_norm=clip, sample_rate=public_rate, noise_seed=0, micro_batch_size=5)
    trainer, batches = _trainer(objective, n, config, model=model)
    divisor = batch_size if public_rate is not None else trainer.sample_rate * n
    expected: list[list[torch.Tensor]] = []
    got = _capture_grads(trainer, lambda grads: expected.append(
        [s / divisor for s in _clipped_sum(model, objective, objective.asked, clip)]))
    result = _fit(trainer)
    assert result.ledger.events[0].sample_rate == (public_rate if public_rate is not None else batch_size / n)
    assert len(got) == len(expected) == len(batches) == 8
    assert any(len(b) != divisor for b in batches)  # a realised-size normalisation would show
    assert sum(len(b) for b in batches) > 0
    for step, (grads, refs) in enumerate(zip(got, expected)):
        scale = max(r.abs().max().item() for r in refs) + 1e-3
        for g, r in zip(grads, refs):
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * scale, msg=f"step {step}")


def test_step_noise_has_std_sigma_c_over_the_expected_batch() -> None:
    """No signal: the .grad the optimizer sees is N(0, (sigma C / q N)^2) per coordinate."""
    n, sigma, clip = 40, 2.0, 0.3
    objective = Regression(n, dim=100, out=50, signal=False)
    config = TrainConfig(steps=2, batch_size=10, noise_multiplier=sigma, delta=1e-5, max_grad_norm=clip)
    trainer, _ = _trainer(objective, n, config)
    got = _capture_grads(trainer)
    _fit(trainer)
    noise = torch.cat([g.flatten() for step in got for g in step]).double() * 10.0  # undo "/ q N" (q N = 10)
    m, std = noise.numel(), sigma * clip
    half = Z * math.sqrt(2 * (m - 1)) / (m - 1)
    assert std * math.sqrt(1 - half) < noise.std().item() < std * math.sqrt(1 + half)
    assert abs(noise.mean().item()) < Z * std / math.sqrt(m)


# -- seeded streams --------------------------------------------------------------------------------------
def test_seeded_sampling_and_noise_are_independent() -> None:
    """One noise_seed seeds both; which examples join the batch must not predict the noise's magnitude."""
    n = 4096
    objective = Regression(n, dim=64, out=64, signal=False)
    config = TrainConfig(steps=1, batch_size=n // 2, noise_multiplier=1.0, delta=1e-5, noise_seed=11,
                         micro_batch_size=n)
    trainer, batches = _trainer(objective, n, config)
    got = _capture_grads(trainer)
    _fit(trainer)
    included = torch.zeros(n, dtype=torch.float64)
    included[batches[0]] = 1.0
    noise = got[0][0].flatten()[:n].double()  # weight [64, 64]: 4096 coordinates
    corr = torch.corrcoef(torch.stack([included, noise.abs()]))[0, 1].item()
    assert abs(corr) < Z / math.sqrt(n), corr


def test_resumed_seeded_run_continues_its_streams(tmp_path: Path) -> None:
    """Killed after step 3 (checkpoint at step 2) and resumed: the resumed steps draw the uninterrupted run's
    batches and noise of steps 2, 3, ..., not a replay of steps 0, 1, ..."""
    n = 64
    config = TrainConfig(steps=6, batch_size=16, noise_multiplier=1.0, delta=1e-5, noise_seed=7,
                         micro_batch_size=8, checkpoint_every=2)
    straight, straight_batches = _trainer(Regression(n), n, config, run_dir=tmp_path / "a")
    straight_grads = _capture_grads(straight)
    _fit(straight)

    killed, _ = _trainer(Regression(n), n, config, run_dir=tmp_path / "b", stop_at=3)
    with pytest.raises(Interrupt):
        _fit(killed)
    resumed, resumed_batches = _trainer(Regression(n), n, config, run_dir=tmp_path / "b")
    assert resumed.step == 2
    resumed_grads = _capture_grads(resumed)
    result = _fit(resumed)
    assert result.steps == 6 and result.ledger == straight.ledger
    assert resumed_batches == straight_batches[2:]
    assert resumed_batches[:2] != straight_batches[:2]
    for mine, theirs in zip(resumed_grads, straight_grads[2:]):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert not torch.equal(resumed_grads[0][0], straight_grads[0][0])


# -- the ledger across a resume --------------------------------------------------------------------------
def _killed_run(tmp_path: Path, config: TrainConfig, ledger: PrivacyLedger | None = None) -> Path:
    run_dir = tmp_path / "run"
    trainer, _ = _trainer(Regression(64), 64, config, run_dir=run_dir, ledger=ledger, stop_at=3)
    with pytest.raises(Interrupt):
        _fit(trainer)
    return run_dir


def test_resume_refuses_a_ledger_with_events_the_checkpoint_lacks(tmp_path: Path) -> None:
    """The run started with an empty ledger; the caller then spent epsilon = 2 elsewhere and resumes with it.
    Replacing the caller's ledger by the checkpoint's would drop that spend from the budget check: the run
    alone spends 3.2 <= 5, but 5.2 with it."""
    config = TrainConfig(steps=6, batch_size=16, noise_multiplier=1.4, target_epsilon=5.0, delta=1e-5,
                         checkpoint_every=2)
    run_dir = _killed_run(tmp_path, config)
    prior = EpsilonDeltaEvent(2.0, 0.0, "prior release")
    ledger = PrivacyLedger([prior])
    with pytest.raises(ConfigError, match="never drops events"):
        _trainer(Regression(64), 64, config, run_dir=run_dir, ledger=ledger)
    assert ledger.events == (prior,)
    # The same ledger plus steps the checkpoint never saw (applied after it was written) is refused too.
    ahead = PrivacyLedger([DpSgdEvent(16 / 64, 1.4, 3, config.label)])
    with pytest.raises(ConfigError, match="never drops events"):
        _trainer(Regression(64), 64, config, run_dir=run_dir, ledger=ahead)


@pytest.mark.parametrize("prior", [EpsilonDeltaEvent(0.5, 0.0, "prior release"),
                                   DpSgdEvent(16 / 64, 1.0, 3, "dp-sgd")], ids=["other", "same-kind"])
def test_resume_extends_the_callers_ledger_in_place(tmp_path: Path, prior) -> None:
    """The caller resumes with the ledger the run started from: it ends holding every event, and the
    budget check counts the prior spend."""
    config = TrainConfig(steps=6, batch_size=16, noise_multiplier=1.0, target_epsilon=20.0, delta=1e-5,
                         checkpoint_every=2)
    run_dir = _killed_run(tmp_path, config, PrivacyLedger([prior]))
    ledger = PrivacyLedger([prior])
    resumed, _ = _trainer(Regression(64), 64, config, run_dir=run_dir, ledger=ledger)
    assert resumed.ledger is ledger and resumed.step == 2
    result = _fit(resumed)
    assert result.ledger is ledger
    run = [DpSgdEvent(16 / 64, 1.0, 6, "dp-sgd")]
    whole = PrivacyLedger([prior, *run])
    assert ledger == whole
    assert result.epsilon == pytest.approx(accounting.epsilon(whole, 1e-5))
    # Resuming with no ledger continues the checkpoint's, prior spend included.
    fresh, _ = _trainer(Regression(64), 64, config, run_dir=tmp_path / "run")
    assert fresh.ledger == whole


# -- a public sample rate --------------------------------------------------------------------------------
def test_sample_rate_is_validated_recorded_and_fixed_across_resumes(tmp_path: Path) -> None:
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="sample_rate"):
            TrainConfig(steps=1, batch_size=4, noise_multiplier=1.0, delta=1e-5, sample_rate=bad)
    with pytest.raises(ConfigError, match="sample_rate"):
        TrainConfig(steps=1, batch_size=4, private=False, sample_rate=0.5)
    TrainConfig(steps=1, batch_size=4, noise_multiplier=1.0, delta=1e-5, sample_rate=1.0)

    config = TrainConfig(steps=2, batch_size=10, noise_multiplier=1.0, delta=1e-5, sample_rate=0.2)
    trainer, _ = _trainer(Regression(40), 40, config, run_dir=tmp_path / "run")
    _fit(trainer)
    other = TrainConfig(steps=4, batch_size=10, noise_multiplier=1.0, delta=1e-5, sample_rate=0.25)
    with pytest.raises(ConfigError, match="sample_rate=0.2"):
        _trainer(Regression(40), 40, other, run_dir=tmp_path / "run")


def test_public_sample_rate_sets_calibration_and_budget() -> None:
    """Calibration and the budget use the public q, not batch_size / N."""
    config = TrainConfig(steps=3, batch_size=5, target_epsilon=3.0, delta=1e-5, sample_rate=0.5)
    trainer, _ = _trainer(Regression(40), 40, config)
    result = _fit(trainer)
    assert result.ledger.events == (DpSgdEvent(0.5, result.noise_multiplier, 3, "dp-sgd"),)
    assert result.epsilon == pytest.approx(3.0, rel=1e-3)
