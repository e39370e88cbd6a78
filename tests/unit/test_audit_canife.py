"""CANIFE on a tiny Mistral LM: soft canaries, crafting with a double backward, replayed DP-SGD steps."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tests.conftest import random_model, tiny_args
from tramontane import accounting
from tramontane.accounting import DpSgdEvent
from tramontane.audit.canife import (
    CanaryDesign,
    clipped_example_gradients,
    clipped_gradient,
    craft_canary,
    orthogonal_direction,
    replay_dp_steps,
    replayed_scores,
    soft_sequence_loss,
    step_audit,
    trainable,
)
from tramontane.audit.estimators import compose_estimates
from tramontane.models import Transformer
from tramontane.training.objectives import LanguageModelingObjective

logging.getLogger("absl").setLevel(logging.ERROR)
N, T, V = 64, 9, 24  # examples, canary length, vocabulary
Q = 0.1  # Poisson rate of the replayed steps


@dataclass
class Setup:
    model: Transformer
    objective: LanguageModelingObjective  # rows 0..N-1: the data; row N: the crafted canary
    pool: torch.Tensor
    design: CanaryDesign
    direction: torch.Tensor  # unit direction of the canary's clipped gradient


@pytest.fixture(scope="module")
def setup() -> Setup:
    torch.set_num_threads(1)
    args = tiny_args(vocab_size=V, dim=32, n_layers=1, head_dim=8, hidden_dim=48, sliding_window=None)
    model = random_model(args)
    gen = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, V, (N + 1, T), generator=gen)
    objective = LanguageModelingObjective(seqs[:, :-1], seqs[:, 1:])
    pool = clipped_example_gradients(model, objective, list(range(8)), 1.0)
    mask = torch.ones(T, V, dtype=torch.bool)
    mask[:, V // 2:] = False  # e.g. a constrained vocabulary: the canary may only use the first half
    design = craft_canary(soft_sequence_loss(model, T), trainable(model), torch.randn(T, V, generator=gen),
                          pool, max_grad_norm=1.0, mask=mask, steps=12, lr=0.1, generator=gen)
    seqs[N] = design.tokens
    objective = LanguageModelingObjective(seqs[:, :-1], seqs[:, 1:])
    direction = clipped_gradient(model, objective, objective.rows([N])[0], 1.0)
    return Setup(model, objective, pool, design, direction / direction.norm())


def test_soft_sequence_loss_equals_the_training_loss_on_one_hot_inputs(setup: Setup) -> None:
    loss = soft_sequence_loss(setup.model, T)
    for i in (0, 5):
        tokens = torch.cat([setup.objective.inputs[i], setup.objective.labels[i, -1:]])
        one_hot = torch.nn.functional.one_hot(tokens, V).float()
        with torch.no_grad():
            expected = setup.objective.losses(setup.model, setup.objective.rows([i])[0])
            assert float(loss(one_hot)) == pytest.approx(float(expected), rel=1e-5)


def test_crafting_makes_the_canary_gradient_orthogonal_to_the_pool_and_large(setup: Setup) -> None:
    d = setup.design
    assert d.final_loss < d.initial_loss and 0 < d.health <= 1  # CANIFE's canary health
    assert d.tokens.shape == (T,) and int(d.tokens.max()) < V // 2  # the mask was respected
    assert d.grad_norm > 1.0  # saturates the clip norm: a present canary adds its full C
    # the crafted direction is far closer to orthogonal than the pool's own gradients are to each other
    pool_unit = setup.pool / setup.pool.norm(dim=1, keepdim=True)
    mutual = (pool_unit @ pool_unit.T).abs().fill_diagonal_(0).max()
    assert float((pool_unit @ setup.direction).abs().max()) < float(mutual)


def test_orthogonal_gradient_canary(setup: Setup) -> None:
    v = orthogonal_direction(setup.pool, torch.Generator().manual_seed(1))
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float((setup.pool @ v).abs().max()) < 1e-5


def _replay(setup: Setup, sigma: float, canary: str, rounds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    kw = dict(sample_rate=Q, noise_multiplier=sigma, max_grad_norm=1.0, rounds=rounds, noise_seed=seed,
              sampling_seed=seed + 1)
    if canary == "input":
        return replay_dp_steps(setup.model, setup.objective, N, direction=setup.direction,
                               canary_rows=lambda: setup.objective.rows([N]), **kw)
    v = orthogonal_direction(setup.pool, torch.Generator().manual_seed(seed))
    return replay_dp_steps(setup.model, setup.objective, N, direction=v, canary_gradient=v, **kw)


@pytest.mark.parametrize("canary", ["input", "gradient"])
def test_a_non_private_run_reports_a_large_epsilon(setup: Setup, canary: str) -> None:
    before = [p.detach().clone() for p in setup.model.parameters()]
    with_c, without = _replay(setup, 0.0, canary, rounds=60, seed=3)
    audit = step_audit(with_c, without, noise_multiplier=0.0, sample_rate=Q, max_grad_norm=1.0, delta=1e-5,
                       canary=canary)
    assert audit.estimate.epsilon == math.inf  # perfect separation: the canary adds ~1, nothing hides it
    assert audit.estimate.low > 2.0  # 0 errors in 30 + 30: the largest lower end 60 scores allow
    assert audit.signal == pytest.approx(1.0, abs=0.1)
    assert compose_estimates([(audit.estimate, 100)], Q, 1e-5, None).epsilon == math.inf
    # the replay trains nothing and leaves no gradients behind
    assert all(torch.equal(a, b) for a, b in zip(before, setup.model.parameters()))
    assert all(p.grad is None for p in setup.model.parameters())


@pytest.mark.parametrize("canary", ["input", "gradient"])
def test_a_dp_run_stays_below_the_accountant(setup: Setup, canary: str) -> None:
    sigma, steps = 1.0, 100
    with_c, without = _replay(setup, sigma, canary, rounds=60, seed=5)
    audit = step_audit(with_c, without, noise_multiplier=sigma, sample_rate=Q, max_grad_norm=1.0, delta=1e-5,
                       canary=canary)
    est = audit.estimate
    # the noise is really there and of the right size (a run that skipped it would separate perfectly)
    assert 0.7 * sigma < without.std() < 1.5 * sigma
    assert math.isfinite(est.epsilon)
    assert est.epsilon < audit.theoretical_epsilon  # one step, at the run's delta (CANIFE's comparison)
    assert est.low <= audit.theoretical_epsilon_at_estimator_delta  # like for like, at the estimator's delta
    # over the run: the empirical lower bound stays below the accountant (the point estimate is biased
    # upwards, see estimators.py, and is not compared)
    composed = compose_estimates([(est, steps)], Q, 1e-5, sigma)
    assert composed.low < accounting.epsilon(DpSgdEvent(Q, sigma, steps), 1e-5)


def test_replayed_scores_one_round_at_a_time_are_the_replay(setup: Setup) -> None:
    kw = {"sample_rate": Q, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "rounds": 6, "noise_seed": 7,
          "sampling_seed": 8, "direction": setup.direction, "canary_rows": lambda: setup.objective.rows([N])}
    with_c, without = replay_dp_steps(setup.model, setup.objective, N, **kw)
    rounds = list(replayed_scores(setup.model, setup.objective, N, **kw))
    assert [present for present, _ in rounds] == [True, False] * 3
    assert np.allclose([s for p, s in rounds if p], with_c)
    assert np.allclose([s for p, s in rounds if not p], without)
    # stopped after one round (a Ctrl-C between rounds): the generator closes and leaves no gradients behind
    scores = replayed_scores(setup.model, setup.objective, N, **kw)
    next(scores)
    scores.close()
    assert all(p.grad is None for p in setup.model.parameters())


def test_crafting_reports_each_step(setup: Setup) -> None:
    calls = []
    gen = torch.Generator().manual_seed(2)
    craft_canary(soft_sequence_loss(setup.model, T), trainable(setup.model), torch.randn(T, V, generator=gen),
                 setup.pool, max_grad_norm=1.0, steps=3, generator=gen,
                 on_step=lambda k, n: calls.append((k, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
