"""Membership-inference and reconstruction bounds: closed forms, dp-accounting, pinned values, orderings."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import integrate, stats

from tramontane import accounting
from tramontane.accounting import DpSgdEvent, EpsilonDeltaEvent, GaussianEvent, PrivacyLedger
from tramontane.audit import bounds, reconstruction
from tramontane.audit.bounds import PrivacyProfile, mi_advantage_bound, naive_advantage_bounds
from tramontane.audit.card import ledger_bounds, privacy_card
from tramontane.audit.reconstruction import reconstruction_bound
from tramontane.errors import PrivacyParameterError

logging.getLogger("absl").setLevel(logging.ERROR)
COARSE = 1e-3  # PLD discretisation where a 1e-4 change does not matter (5-8x faster)


def _tv_by_quadrature(sigma: float) -> float:
    """TV(N(1, sigma^2), N(0, sigma^2)) = 1/2 int |p - q|, integrated numerically (no closed form used)."""
    f = lambda x: abs(stats.norm.pdf(x, 1, sigma) - stats.norm.pdf(x, 0, sigma)) / 2  # noqa: E731
    left = integrate.quad(f, -40 * sigma, 0.5, limit=200)[0]
    return left + integrate.quad(f, 0.5, 1 + 40 * sigma, limit=200)[0]


@pytest.mark.parametrize("sigma", [0.3, 1.0, 10.0])
def test_single_gaussian_tv_closed_form_quadrature_and_pld(sigma: float) -> None:
    closed = bounds.mi_advantage_gaussian(sigma)
    assert closed == pytest.approx(2 * stats.norm.cdf(1 / (2 * sigma)) - 1, abs=1e-15)
    assert closed == pytest.approx(_tv_by_quadrature(sigma), abs=1e-8)
    # dp-accounting's privacy profile at epsilon 0 (PLD) is the same number
    assert mi_advantage_bound(GaussianEvent(sigma)) == pytest.approx(closed, abs=1e-6)


def test_composed_gaussian_releases_follow_gdp_composition() -> None:
    # three releases: mu = sqrt(3) / sigma
    assert mi_advantage_bound(GaussianEvent(1.5, count=3), pld_discretization=COARSE) == pytest.approx(
        bounds.gaussian_tv(math.sqrt(3) / 1.5), abs=2e-4)


@pytest.mark.parametrize("q,sigma", [(0.01, 1.0), (1.0, 2.0)])
def test_one_step_closed_form_matches_pld(q: float, sigma: float) -> None:
    exact = bounds.mi_advantage_one_step(q, sigma)
    assert exact == pytest.approx(q * (2 * stats.norm.cdf(1 / (2 * sigma)) - 1))
    pld = mi_advantage_bound(DpSgdEvent(q, sigma, 1))
    assert pld >= exact - 1e-9  # pessimistic discretisation: never below the truth
    assert pld == pytest.approx(exact, rel=1e-3, abs=1e-6)


def test_profile_agrees_with_dp_accounting_and_the_ledger_accountants() -> None:
    ledger = PrivacyLedger([DpSgdEvent(0.02, 1.1, 100), GaussianEvent(5.0, 2)])
    profile = PrivacyProfile(ledger, pld_discretization=COARSE)
    for eps in (0.0, 1.0):
        expected = accounting.delta(ledger, eps, "pld", pld_discretization=COARSE)
        assert profile.delta(eps) == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert profile.epsilon(1e-5) == pytest.approx(
        accounting.epsilon(ledger, 1e-5, "pld", pld_discretization=COARSE), rel=1e-9)
    assert profile.tv == pytest.approx(profile.delta(0.0), rel=1e-12)


def test_gaussian_mechanism_at_epsilon_4_gives_the_abstracts_036() -> None:
    sigma = bounds.gaussian_noise_for_epsilon(4.0, 1e-5)
    # calibrated exactly: dp-accounting's profile of that Gaussian has delta(4) = 1e-5
    assert accounting.delta(GaussianEvent(sigma), 4.0, "pld") == pytest.approx(1e-5, rel=1e-3)
    tv = mi_advantage_bound(GaussianEvent(sigma))
    assert tv == pytest.approx(0.36, abs=0.01)  # arXiv 2204.06106's abstract: ~0.36 ...
    assert tv == pytest.approx(0.3563, abs=2e-4)
    naive = naive_advantage_bounds(4.0, 1e-5)
    assert naive["epsilon_delta"] == pytest.approx(0.964, abs=1e-3)  # ... against ~0.97 from epsilon alone
    assert naive["yeom"] == 1.0


SETTINGS = [(0.001, 0.8, 1000), (0.01, 0.778, 1000), (0.2, 3.0, 50), (0.5, 1.0, 10), (1.0, 2.0, 1)]


@pytest.mark.parametrize("q,sigma,steps", SETTINGS)
def test_bounds_are_never_looser_than_their_naive_counterparts(q: float, sigma: float, steps: int) -> None:
    delta = 1e-5
    event = DpSgdEvent(q, sigma, steps)
    profile = PrivacyProfile(event, pld_discretization=COARSE)
    tv = profile.tv
    fprs = np.array([1e-4, 1e-3, 1e-2, 0.1])
    for eps in (profile.epsilon(delta), accounting.epsilon(event, delta, "rdp")):
        naive = naive_advantage_bounds(eps, delta)
        assert tv <= naive["epsilon_delta"] + 1e-12
        assert tv <= naive["yeom"] + 1e-12 and tv <= naive["one_minus_exp"] + 1e-12
        # the trade-off curve (hence the confidence bound) at every FPR, on a grid holding eps
        tpr = profile.tpr_bound(fprs, np.unique(np.concatenate([profile.epsilon_grid(20), [eps]])))
        assert np.all(tpr <= bounds.tradeoff_epsilon_delta(fprs, eps, delta) + 1e-12)
        assert np.all(bounds.posterior_from_rates(tpr, fprs, 0.5)
                      <= [bounds.confidence_from_epsilon_delta(eps, delta, f) + 1e-12 for f in fprs])
    for m in (2, 1000):
        rb = reconstruction_bound(event, m, delta)
        assert rb.bound <= rb.epsilon_delta_bound + 1e-12
        assert rb.rdp_bound <= rb.fano_bound + 1e-12  # classic Fano
        assert rb.rdp_bound <= rb.probability_preservation_bound + 1e-12
        assert rb.bound >= 1 / m - 1e-12


def test_mi_bound_is_monotone_in_sigma_q_and_steps() -> None:
    tv = lambda q, s, n: mi_advantage_bound(DpSgdEvent(q, s, n), pld_discretization=COARSE)  # noqa: E731
    by_sigma = [tv(0.05, s, 100) for s in (0.6, 0.9, 1.5, 3.0, 8.0)]
    by_q = [tv(q, 1.0, 100) for q in (0.001, 0.01, 0.05, 0.2, 1.0)]
    by_steps = [tv(0.05, 1.0, n) for n in (1, 10, 100, 1000)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))
    assert all(a < b for a, b in zip(by_q, by_q[1:]))
    assert all(a < b for a, b in zip(by_steps, by_steps[1:]))
    assert mi_advantage_bound(DpSgdEvent(0.0, 1.0, 100)) == 0.0  # q = 0 spends nothing
    assert mi_advantage_bound(PrivacyLedger()) == 0.0


def test_reconstruction_bound_is_monotone_in_sigma_q_steps_and_values() -> None:
    rb = lambda q, s, n, m: reconstruction_bound(DpSgdEvent(q, s, n), m).bound  # noqa: E731
    by_sigma = [rb(0.05, s, 100, 10) for s in (0.6, 0.9, 1.5, 3.0, 8.0)]
    by_q = [rb(q, 1.0, 100, 10) for q in (0.001, 0.005, 0.02, 0.05, 0.08)]
    by_steps = [rb(0.05, 1.0, n, 10) for n in (1, 10, 100, 1000)]
    by_m = [rb(0.05, 1.0, 100, m) for m in (2, 5, 10, 100, 10_000)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))
    assert all(a < b for a, b in zip(by_q, by_q[1:]))
    assert all(a < b for a, b in zip(by_steps, by_steps[1:]))
    assert all(a > b for a, b in zip(by_m, by_m[1:]))
    assert rb(0.0, 1.0, 100, 7) == pytest.approx(1 / 7)  # nothing spent: chance


def test_fano_bound_pins_the_notes_worked_configuration() -> None:
    # q = 0.01, sigma = 0.778, T = 1000 (RDP epsilon 4 at delta 1e-5): p* = 0.318 (M = 10), 0.0125 (M = 1000)
    event = DpSgdEvent(0.01, 0.778, 1000)
    assert accounting.epsilon(event, 1e-5) == pytest.approx(4.0, abs=0.01)
    assert reconstruction_bound(event, 10).rdp_bound == pytest.approx(0.318, abs=0.002)
    assert reconstruction_bound(event, 1000).rdp_bound == pytest.approx(0.0125, abs=1e-4)


def test_pure_and_approximate_dp_reconstruction_closed_forms() -> None:
    eps, m = 1.0, 10
    assert reconstruction.pure_dp_bound(eps, m) == pytest.approx(math.e / (math.e + 9))
    # add-or-remove is weaker per epsilon: the replace-one bound at 2 eps sits above it
    ar = reconstruction.pure_dp_bound(eps, m, "add_remove")
    assert ar == pytest.approx(min(math.e / 10, 1 - math.exp(-1) * 0.9))
    assert reconstruction.epsilon_delta_bound(eps, 0.0, m) == ar
    assert reconstruction.epsilon_delta_bound(eps, 1e-3, m) == pytest.approx(ar + 1e-3)
    assert reconstruction.pure_dp_bound(0.0, m) == pytest.approx(0.1)
    assert reconstruction.pure_dp_bound(50.0, m) == pytest.approx(1.0)
    # epsilon = O(log M): p = 1/2 needs exactly log(M - 1) under pure replace-one DP
    for m in (10, 1000, 10**6):
        assert reconstruction.pure_dp_bound(math.log(m - 1), m) == pytest.approx(0.5)
    with pytest.raises(PrivacyParameterError):
        reconstruction.pure_dp_bound(1.0, 0)


def test_bernoulli_renyi_in_log_space_and_its_root() -> None:
    p, r, a = 0.3, 0.1, 2.5
    direct = math.log(p**a * r ** (1 - a) + (1 - p) ** a * (1 - r) ** (1 - a)) / (a - 1)
    assert float(reconstruction.bernoulli_renyi(p, r, a)) == pytest.approx(direct, rel=1e-12)
    big = reconstruction.bernoulli_renyi(0.5, 1e-4, 1024.0)  # naive evaluation overflows here
    assert np.isfinite(big) and float(big) < math.log(1e4)
    orders, rdp = np.array([1.5, 2.0, 8.0, 64.0, 1024.0]), np.array([0.05, 0.08, 0.4, 3.0, 40.0])
    p_star = reconstruction.rdp_bound_per_order(orders, rdp, 100)
    d = reconstruction.bernoulli_renyi(p_star, 0.01, orders)
    below = reconstruction.bernoulli_renyi(np.maximum(p_star - 1e-9, 0.01), 0.01, orders)
    assert np.all((d >= rdp - 1e-9) | (p_star == 1.0)) and np.all(below <= rdp + 1e-9)
    assert p_star[-1] == 1.0  # rdp >= log M: nothing bounded


def test_monte_carlo_estimate_agrees_with_the_pld_bound() -> None:
    event = DpSgdEvent(0.05, 1.0, 60)
    tv = mi_advantage_bound(event)
    under_p = bounds.mi_advantage_monte_carlo(event, 40_000, seed=0)
    under_q = bounds.mi_advantage_monte_carlo(event, 40_000, seed=1, under="Q")
    for est in (under_p, under_q):
        assert abs(est.value - tv) < 4 * est.std_error + 1e-3
    assert under_p.std_error < under_q.std_error  # the notes' observation: sampling under P is cheaper
    one = bounds.mi_advantage_monte_carlo(DpSgdEvent(0.3, 0.7, 1), 40_000, seed=2)
    assert abs(one.value - bounds.mi_advantage_one_step(0.3, 0.7)) < 4 * one.std_error


def test_gdp_closed_form_exact_for_gaussians_approximate_for_dp_sgd() -> None:
    mu, exact = bounds.gdp_mu([GaussianEvent(2.0, 4), DpSgdEvent(1.0, 1.0, 5)])
    assert exact and mu == pytest.approx(math.sqrt(4 / 4 + 5))
    event = DpSgdEvent(0.01, 2.0, 2000)
    mu, exact = bounds.gdp_mu(event)
    assert not exact
    assert bounds.gaussian_tv(mu) == pytest.approx(mi_advantage_bound(event), abs=0.01)  # CLT regime


def test_confidence_bound_matches_the_gaussian_tradeoff_curve() -> None:
    sigma = 1.0
    profile = PrivacyProfile(GaussianEvent(sigma))
    for fpr in (1e-3, 1e-2, 0.1):
        exact_tpr = 1 - stats.norm.cdf(stats.norm.ppf(1 - fpr) - 1 / sigma)  # Neyman-Pearson, mu-GDP
        bound = float(profile.tpr_bound(fpr))
        assert exact_tpr - 1e-9 <= bound <= exact_tpr * 1.05
        for prior in (0.1, 0.5):
            exact = prior * exact_tpr / (prior * exact_tpr + (1 - prior) * fpr)
            got = bounds.confidence_bound(profile, fpr, prior)
            assert exact - 1e-9 <= got <= exact + 0.02
    assert bounds.confidence_bound(profile, 1e-3, 0.1) < bounds.confidence_bound(profile, 1e-3, 0.5)


def test_declared_events_compose_by_coupling_and_basic_composition() -> None:
    mech = DpSgdEvent(0.05, 1.0, 20)
    ledger = PrivacyLedger([EpsilonDeltaEvent(0.2, 0.0, "schema"), mech])
    tv_mech = mi_advantage_bound(mech, pld_discretization=COARSE)
    expected = 1 - (1 - tv_mech) * (1 - bounds.advantage_from_epsilon_delta(0.2, 0.0))
    profile = PrivacyProfile(ledger, pld_discretization=COARSE)
    assert profile.tv == pytest.approx(expected)
    assert profile.epsilon(1e-5) == pytest.approx(
        accounting.epsilon(ledger, 1e-5, "pld", pld_discretization=COARSE), rel=1e-9)
    assert profile.delta(0.1) == 1.0  # below the declared epsilon basic composition says nothing
    # a pure declared event shifts the RDP curve; one with delta > 0 leaves only the (epsilon, delta) bound
    pure = reconstruction_bound(ledger, 10, 1e-5)
    assert pure.rdp_bound is not None and pure.rdp_bound > reconstruction_bound(mech, 10).rdp_bound
    approx = reconstruction_bound(PrivacyLedger([EpsilonDeltaEvent(0.2, 1e-7, "schema"), mech]), 10, 1e-5)
    assert approx.rdp_bound is None and approx.bound == approx.epsilon_delta_bound
    with pytest.raises(PrivacyParameterError):
        reconstruction_bound(PrivacyLedger([EpsilonDeltaEvent(0.2, 1e-7, "schema")]), 10)


def test_privacy_card_and_ledger_bounds_hold_json_scalars() -> None:
    import json

    from tramontane.datasets import adult_schema

    ledger = PrivacyLedger([DpSgdEvent(0.05, 2.0, 150)])
    schema = adult_schema().select(["age", "sex", "education"])
    card = privacy_card(ledger, 1e-5, schema, audit={"empirical_epsilon": 1.0, "empirical_epsilon_low": 0.5,
                                                      "empirical_epsilon_high": 2.0, "method": "test"},
                        pld_discretization=COARSE)
    json.dumps(card)
    assert all(isinstance(v, (int, float, str)) for v in card.values())
    assert card["epsilon_pld"] <= card["epsilon_rdp"]
    assert card["mi_advantage_bound"] < card["mi_advantage_naive_epsilon_delta"]
    assert card["reconstruction_bound[sex] (M=2)"] > card["reconstruction_bound[education] (M=16)"] > 1 / 16
    assert card["audit_empirical_epsilon"] == 1.0 and card["audit_method"] == "test"
    out = ledger_bounds(PrivacyLedger([GaussianEvent(2.0)]), 1e-5, 10)
    expected = reconstruction_bound(GaussianEvent(2.0), 10, 1e-5).bound
    assert out["reconstruction_bound"] == pytest.approx(expected)
    assert out["mi_advantage_bound"] == pytest.approx(bounds.mi_advantage_gaussian(2.0), abs=1e-6)
    assert out["mi_advantage_gdp"] == pytest.approx(out["mi_advantage_bound"], abs=1e-6)


def test_bound_curves_end_at_the_bounds_of_the_whole_run() -> None:
    from tramontane.audit.card import bound_curves

    event = DpSgdEvent(0.05, 1.0, 40)
    curves = bound_curves(0.05, 1.0, 40, 1e-5, num_values=(10,), points=2, pld_discretization=COARSE)
    assert curves["steps"] == [20, 40]
    profile = PrivacyProfile(event, pld_discretization=COARSE)
    assert curves["mi_advantage_bound"][-1] == pytest.approx(profile.tv, rel=1e-6)
    assert curves["epsilon"][-1] == pytest.approx(profile.epsilon(1e-5), rel=1e-6)
    assert curves["reconstruction"]["10"][-1] == pytest.approx(reconstruction_bound(event, 10).rdp_bound)
    assert curves["mi_advantage_bound"][0] < curves["mi_advantage_bound"][1] < curves["mi_advantage_naive"][1]
