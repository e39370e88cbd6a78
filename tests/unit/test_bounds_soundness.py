"""Soundness by simulation: optimal attackers (likelihood ratio, MAP) never beat the bounds, and come close.

Each simulation draws the mechanism's outputs with and without the target (numpy, seeded) and runs the
optimal attacker for that pair; the bound must hold against the upper end of a 4-sigma interval of the
empirical figure, and for the single Gaussian (where the bound is exact) the empirical figure must also
reach it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from tramontane.accounting import DpSgdEvent, GaussianEvent
from tramontane.audit import bounds, reconstruction
from tramontane.audit.reconstruction import reconstruction_bound

logging.getLogger("absl").setLevel(logging.ERROR)
COARSE = 1e-3


def _advantage(flag_p: np.ndarray, flag_q: np.ndarray) -> tuple[float, float]:
    """(TPR - FPR, its standard error) of flags raised on outputs drawn with (p) and without (q) target."""
    tpr, fpr = flag_p.mean(), flag_q.mean()
    se = math.sqrt(tpr * (1 - tpr) / len(flag_p) + fpr * (1 - fpr) / len(flag_q))
    return float(tpr - fpr), se


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_likelihood_ratio_attack_on_the_gaussian_reaches_but_never_exceeds_the_bound(sigma: float) -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    with_target, without = rng.normal(1.0, sigma, n), rng.normal(0.0, sigma, n)
    adv, se = _advantage(with_target > 0.5, without > 0.5)  # LR test at threshold mu / 2
    bound = bounds.mi_advantage_gaussian(sigma)
    assert adv <= bound + 4 * se
    assert adv >= bound - 4 * se  # tight: the bound is attained
    # a weaker attacker (wrong threshold) stays below too
    weak, _ = _advantage(with_target > 1.5, without > 1.5)
    assert weak < bound


@pytest.mark.parametrize("q,sigma,steps", [(0.2, 1.0, 10), (0.05, 0.6, 40), (1.0, 2.0, 4)])
def test_likelihood_ratio_attack_on_subsampled_gaussians_never_exceeds_the_bound(q: float, sigma: float,
                                                                                 steps: int) -> None:
    rng = np.random.default_rng(1)
    n = 100_000
    noise_p, noise_q = rng.normal(0, sigma, (n, steps)), rng.normal(0, sigma, (n, steps))
    x_p = noise_p + (rng.random((n, steps)) < q)  # the target joins each step's batch with probability q

    def log_lr(x: np.ndarray) -> np.ndarray:  # Neyman-Pearson: the likelihood ratio of the composed pair
        log_keep = math.log1p(-q) if q < 1 else -math.inf
        return np.logaddexp(log_keep, math.log(q) + (2 * x - 1) / (2 * sigma**2)).sum(1)

    adv, se = _advantage(log_lr(x_p) > 0, log_lr(noise_q) > 0)
    bound = bounds.mi_advantage_bound(DpSgdEvent(q, sigma, steps), pld_discretization=COARSE)
    assert adv <= bound + 4 * se
    assert adv >= bound - 4 * se - 2e-3  # the LR test attains TV of this pair (up to discretisation)
    # the sum of the outputs (what a naive attacker would threshold) is weaker
    s_p, s_q = x_p.sum(1), noise_q.sum(1)
    t = q * steps / 2
    assert _advantage(s_p > t, s_q > t)[0] <= bound + 4 * se


def test_map_reconstruction_against_the_gaussian_simplex_stays_below_the_bounds() -> None:
    rng = np.random.default_rng(2)
    n, m, sigma = 100_000, 10, 0.8
    z = rng.integers(m, size=n)
    h = rng.normal(0, sigma, (n, m))
    h[np.arange(n), z] += 1.0  # h = e_Z + N(0, sigma^2 I): candidates at distance 1 from the run without Z
    success = (h.argmax(1) == z).mean()
    se = math.sqrt(success * (1 - success) / n)
    exact = reconstruction.gaussian_simplex_success(sigma, m)
    assert abs(success - exact) < 4 * se  # the simulation is the mechanism of the exact formula
    bound = reconstruction_bound(GaussianEvent(sigma), m, delta=1e-5).bound
    assert success <= bound + 4 * se
    assert exact < bound < 1.0


@pytest.mark.parametrize("q,sigma,steps,m", [(0.3, 1.0, 5, 8), (0.1, 0.7, 20, 4)])
def test_map_reconstruction_against_subsampled_gaussians_stays_below_the_bound(q: float, sigma: float,
                                                                               steps: int, m: int) -> None:
    rng = np.random.default_rng(3)
    n = 30_000
    z = rng.integers(m, size=n)
    h = rng.normal(0, sigma, (n, steps, m))
    h[np.arange(n), :, z] += rng.random((n, steps)) < q  # candidate Z's coordinate gets the sampled signal
    log_keep = math.log1p(-q)
    # MAP under a uniform prior: the candidate with the largest likelihood ratio against "no target"
    score = np.logaddexp(log_keep, math.log(q) + (2 * h - 1) / (2 * sigma**2)).sum(1)  # n m
    success = (score.argmax(1) == z).mean()
    se = math.sqrt(success * (1 - success) / n)
    bound = reconstruction_bound(DpSgdEvent(q, sigma, steps), m).bound
    assert 1 / m < success <= bound + 4 * se


@pytest.mark.parametrize("eps,m", [(1.0, 5), (3.0, 20)])
def test_randomized_response_attains_the_pure_dp_bound(eps: float, m: int) -> None:
    # M-ary randomized response: report Z w.p. e^eps / (e^eps + M - 1), else one of the others uniformly;
    # eps-DP under replace-one neighbours, and the MAP guess (the report) succeeds exactly at the bound.
    rng = np.random.default_rng(4)
    n = 100_000
    keep = rng.random(n) < math.exp(eps) / (math.exp(eps) + m - 1)
    success = keep.mean()
    se = math.sqrt(success * (1 - success) / n)
    bound = reconstruction.pure_dp_bound(eps, m)
    assert abs(success - bound) < 4 * se
