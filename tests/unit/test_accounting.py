"""Accountants and calibration against independent oracles: dp-accounting called directly, Opacus,
closed forms (Gaussian mechanism, exact RDP by quadrature) and Opacus' published test values."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import dp_accounting
import numpy as np
import pytest
from scipy import integrate, optimize, stats

from tramontane.accounting import (
    RDP_ORDERS,
    DpSgdEvent,
    EpsilonDeltaEvent,
    GaussianEvent,
    PrivacyLedger,
    calibrate_noise_multiplier,
    delta,
    epsilon,
    privacy_spent,
    rdp_curve,
)
from tramontane.errors import PrivacyParameterError

CONFIGS = [  # (sample_rate, noise_multiplier, steps, delta)
    (0.04, 1.5, 2250, 1e-5),
    (0.01, 1.0, 10_000, 1e-5),
    (16384 / 1281167, 2.5, 72_000, 8e-7),
    (0.001, 0.8, 500, 1e-6),
    (0.3, 5.0, 50, 1e-5),
]


def _dp_sgd_event(q: float, sigma: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


def _opacus_epsilon(q: float, sigma: float, steps: int, delta_: float, orders) -> tuple[float, float]:
    from opacus.accountants.analysis import rdp as opacus_rdp

    rdp_values = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha" is fine here
        eps, order = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp_values, delta=delta_)
    return float(eps), float(order)


def _gaussian_delta(sigma: float, eps: float) -> float:
    """Exact delta(eps) of the Gaussian mechanism, sensitivity 1 (Balle and Wang 2018, Thm 8)."""
    half = 1 / (2 * sigma)
    return stats.norm.cdf(half - eps * sigma) - math.exp(eps) * stats.norm.cdf(-half - eps * sigma)


# --- agreement with dp-accounting -----------------------------------------------------------------------


@pytest.mark.parametrize("q, sigma, steps, delta_", CONFIGS)
def test_rdp_matches_dp_accounting_default_accountant(q, sigma, steps, delta_) -> None:
    oracle = dp_accounting.rdp.RdpAccountant()  # its own default orders, a subset of ours
    oracle.compose(_dp_sgd_event(q, sigma, steps))
    ours = privacy_spent(DpSgdEvent(q, sigma, steps), delta_)
    assert ours.accountant == "rdp"
    assert ours.epsilon <= oracle.get_epsilon(delta_) + 1e-12  # more orders can only help
    if ours.optimal_order in dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS:
        assert ours.epsilon == pytest.approx(oracle.get_epsilon(delta_), abs=1e-6)


@pytest.mark.parametrize("q, sigma, steps, delta_", [CONFIGS[0], CONFIGS[2]])
def test_pld_matches_dp_accounting_pld_accountant(q, sigma, steps, delta_) -> None:
    oracle = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    oracle.compose(_dp_sgd_event(q, sigma, steps))
    spent = privacy_spent(DpSgdEvent(q, sigma, steps), delta_, "pld")
    assert spent.accountant == "pld" and spent.optimal_order is None
    assert spent.epsilon == pytest.approx(oracle.get_epsilon(delta_), abs=1e-4)
    # PLD is the tighter analysis: below RDP, and not absurdly so.
    assert 0.8 * epsilon(DpSgdEvent(q, sigma, steps), delta_) < spent.epsilon < epsilon(
        DpSgdEvent(q, sigma, steps), delta_)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_a_ledger_accounted_again_or_relabelled_gives_the_oracles_epsilon(accountant) -> None:
    """Repeated accounting is served from memory (`_mechanisms_epsilon`, `_event_pld`); what is remembered
    must be the epsilon of these very events, whatever their labels, and never another ledger's."""
    from tramontane.accounting import accountants

    def ledger(tag: str, sigma: float) -> list:
        return [GaussianEvent(30.0, 3, f"{tag} counts"), DpSgdEvent(0.02, sigma, 300, f"{tag} training")]

    if accountant == "rdp":
        oracle_of = lambda: dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))  # noqa: E731
    else:
        oracle_of = lambda: dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)  # noqa: E731
    for sigma in (1.1, 1.3):
        oracle = oracle_of()
        oracle.compose(dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(30.0), 3), _dp_sgd_event(0.02, sigma, 300)]))
        expected = oracle.get_epsilon(1e-5)
        before = accountants._mechanisms_epsilon.cache_info().hits
        first = epsilon(ledger("a", sigma), 1e-5, accountant)
        again = epsilon(ledger("b", sigma), 1e-5, accountant)  # other labels, the same mechanisms
        assert accountants._mechanisms_epsilon.cache_info().hits == before + 1
        assert first == again == pytest.approx(expected, abs=1e-4)
    assert epsilon(ledger("a", 1.1), 1e-5, accountant) > epsilon(ledger("a", 1.3), 1e-5, accountant)


def test_pld_agrees_with_opacus_published_prv_value() -> None:
    # opacus/tests/accountants_test.py::test_prv_accountant (installed with opacus 1.6): sigma 1.5, q 0.04,
    # int(90 // 0.04) = 2250 steps, delta 1e-5 -> 6.777395712150674. PRV and PLD are two numerical
    # approximations of the same optimal curve (PRV with eps_error 0.01), so they agree to ~0.01.
    assert epsilon(DpSgdEvent(0.04, 1.5, 2250), 1e-5, "pld") == pytest.approx(6.777395712150674, abs=0.02)


# --- agreement with Opacus ------------------------------------------------------------------------------


def test_rdp_orders_contain_opacus_defaults() -> None:
    from opacus.accountants import RDPAccountant

    assert set(RDPAccountant.DEFAULT_ALPHAS) <= set(RDP_ORDERS)
    assert min(RDP_ORDERS) == 1.1 and max(RDP_ORDERS) >= 1024


@pytest.mark.parametrize("q, sigma, steps, delta_", CONFIGS)
def test_rdp_to_dp_conversion_is_opacus_conversion(q, sigma, steps, delta_) -> None:
    from opacus.accountants.analysis import rdp as opacus_rdp

    orders, rdp_values = rdp_curve(DpSgdEvent(q, sigma, steps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opacus_eps, opacus_order = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp_values, delta=delta_)
    spent = privacy_spent(DpSgdEvent(q, sigma, steps), delta_)
    assert spent.epsilon == pytest.approx(opacus_eps, rel=1e-12)
    assert spent.optimal_order == opacus_order
    # ... which is Balle et al. 2020, Thm 21, written out here independently:
    a = np.asarray(orders)
    by_hand = np.min(rdp_values + np.log1p(-1 / a) - (math.log(delta_) + np.log(a)) / (a - 1))
    assert spent.epsilon == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize("q, sigma, steps, delta_", CONFIGS)
def test_rdp_agrees_with_opacus_accountant(q, sigma, steps, delta_) -> None:
    from opacus.accountants.analysis import rdp as opacus_rdp

    orders, ours = rdp_curve(DpSgdEvent(q, sigma, steps))
    theirs = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders))
    integer = np.array([float(a).is_integer() for a in orders])
    # Integer orders: the same closed-form sum, identical.
    np.testing.assert_allclose(ours[integer], theirs[integer], rtol=1e-9)
    # Fractional orders: dp-accounting bounds the alternating series by absolute values (an upper bound;
    # some orders become inf when it does not converge), Opacus sums it exactly.
    assert np.all(ours[~integer] >= theirs[~integer] * (1 - 1e-9))
    opacus_eps, _ = _opacus_epsilon(q, sigma, steps, delta_, list(orders))
    assert opacus_eps - 1e-9 <= epsilon(DpSgdEvent(q, sigma, steps), delta_) <= opacus_eps * (1 + 2e-4)


def test_rdp_reproduces_opacus_published_value() -> None:
    # opacus/tests/accountants_test.py::test_rdp_accountant (installed with opacus 1.6):
    # sigma 1.5, q 0.04, steps int(90 / 0.04) = 2250, delta 1e-5 -> assertAlmostEqual(eps, 7.32911117143).
    # We get 7.329335: the optimal order is 3.9, where dp-accounting's RDP is a slightly looser upper bound
    # than Opacus' exact sum (see accountants.py); equal to 3 decimals, and never below Opacus.
    eps = epsilon(DpSgdEvent(0.04, 1.5, 2250), 1e-5)
    assert 7.32911117143 <= eps <= 7.32911117143 + 5e-4
    assert eps == pytest.approx(7.329335, abs=1e-6)


@pytest.mark.parametrize("q, sigma, order", [(0.04, 1.5, 3.9), (0.8192, 3.0, 2.5), (0.01, 1.0, 7.5)])
def test_fractional_order_rdp_against_exact_quadrature(q, sigma, order) -> None:
    # Exact Renyi divergence D_a((1-q)N(0,s^2) + qN(1,s^2) || N(0,s^2)) (Mironov et al. 2019) by quadrature.
    def integrand(z: float) -> float:
        log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
        return math.exp(stats.norm.logpdf(z, scale=sigma) + order * log_ratio)

    # The integrand is negligible outside [-40 sigma, order + 40 sigma] (it peaks below z = order).
    a_alpha = integrate.quad(integrand, -40 * sigma, order + 40 * sigma, points=[0.0, 0.5, order],
                             epsabs=0, epsrel=1e-12, limit=500)[0]
    exact = math.log(a_alpha) / (order - 1)
    orders, ours = rdp_curve(DpSgdEvent(q, sigma, 1))
    ours_at = ours[list(orders).index(order)]
    from opacus.accountants.analysis import rdp as opacus_rdp

    assert opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[order])[0] == pytest.approx(
        exact, rel=1e-7)
    assert ours_at >= exact * (1 - 1e-9)  # an upper bound: sound, possibly loose
    assert ours_at <= exact * 1.1


# --- closed forms ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.7, 3.0])
def test_unsampled_gaussian_pld_matches_analytic_gaussian_mechanism(sigma) -> None:
    for eps in (0.5, 2.0):
        exact = _gaussian_delta(sigma, eps)
        assert exact - 1e-12 <= delta(GaussianEvent(sigma), eps, "pld") <= exact + 1e-9
    exact_eps = optimize.brentq(lambda e: _gaussian_delta(sigma, e) - 1e-5, 0, 100, xtol=1e-12)
    for event in (GaussianEvent(sigma), DpSgdEvent(1.0, sigma, 1)):  # q = 1, one step: no sampling
        assert epsilon(event, 1e-5, "pld") == pytest.approx(exact_eps, abs=2e-4)
        assert epsilon(event, 1e-5) > exact_eps  # RDP is a valid but looser bound


def test_unsampled_gaussian_rdp_closed_form() -> None:
    sigma, count, delta_ = 4.0, 10, 1e-6
    a = np.asarray(RDP_ORDERS)
    by_hand = np.min(count * a / (2 * sigma**2) + np.log1p(-1 / a) - (math.log(delta_) + np.log(a)) / (a - 1))
    assert epsilon(GaussianEvent(sigma, count), delta_) == pytest.approx(by_hand, rel=1e-12)
    # count releases at sigma == one release at sigma / sqrt(count) (exact for the Gaussian mechanism).
    assert epsilon(GaussianEvent(sigma, count), delta_, "pld") == pytest.approx(
        epsilon(GaussianEvent(sigma / math.sqrt(count)), delta_, "pld"), abs=2e-3)


def test_delta_inverts_epsilon() -> None:
    event = DpSgdEvent(0.01, 1.5, 2_000)
    for accountant in ("rdp", "pld"):
        eps = epsilon(event, 1e-5, accountant)
        assert delta(event, eps * 1.001, accountant) <= 1e-5
        assert delta(event, eps * 0.98, accountant) > 1e-5


# --- declared (epsilon, delta) events -------------------------------------------------------------------


def test_epsilon_delta_events_compose_by_basic_composition() -> None:
    run = DpSgdEvent(0.01, 1.0, 1000)
    ledger = PrivacyLedger([run, EpsilonDeltaEvent(0.5, 1e-6, "schema inference")])
    spent = privacy_spent(ledger, 1e-5)
    assert spent.declared_epsilon == 0.5 and spent.declared_delta == 1e-6
    assert spent.epsilon == pytest.approx(0.5 + epsilon(run, 1e-5 - 1e-6), rel=1e-12)
    assert delta(ledger, 2.0) == pytest.approx(1e-6 + delta(run, 1.5), rel=1e-12)
    assert delta(ledger, 0.4) == 1.0
    with pytest.raises(PrivacyParameterError, match="larger delta"):
        epsilon(ledger, 1e-6)


# --- edge cases -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_nothing_spent_gives_zero(accountant) -> None:
    nothing = (DpSgdEvent(0.0, 1.0, 1000), DpSgdEvent(0.5, 1.0, 0), GaussianEvent(1.0, 0), PrivacyLedger(),
               [])
    for events in nothing:
        assert epsilon(events, 1e-5, accountant) == 0.0
        assert delta(events, 0.0, accountant) == 0.0


def test_bad_arguments_raise_clear_errors() -> None:
    event = DpSgdEvent(0.01, 1.0, 100)
    for bad_delta in (0.0, 1.0, -1e-5, 2.0, math.nan):
        with pytest.raises(PrivacyParameterError, match="delta"):
            epsilon(event, bad_delta)
    with pytest.raises(PrivacyParameterError, match="epsilon"):
        delta(event, -1.0)
    with pytest.raises(PrivacyParameterError, match="accountant"):
        epsilon(event, 1e-5, "prv")  # type: ignore[arg-type]
    with pytest.raises(PrivacyParameterError):
        epsilon([(0.01, 1.0, 100)], 1e-5)  # type: ignore[list-item]


def test_accounting_imports_no_torch() -> None:
    code = "import sys, tramontane.accounting; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- monotonicity ---------------------------------------------------------------------------------------


def test_epsilon_is_monotone_in_noise_rate_and_steps() -> None:
    rng = np.random.default_rng(0)
    for _ in range(3):
        q, sigma, steps = 10 ** rng.uniform(-3, -1), rng.uniform(0.7, 5.0), int(rng.integers(10, 20_000))
        factors = np.array([0.5, 0.8, 1.0, 1.25, 2.0])
        by_sigma = [epsilon(DpSgdEvent(q, s, steps), 1e-5) for s in sigma * factors[1:4]]
        by_rate = [epsilon(DpSgdEvent(r, sigma, steps), 1e-5) for r in q * factors]
        by_steps = [epsilon(DpSgdEvent(q, sigma, n), 1e-5) for n in steps * np.array([1, 2, 3, 5])]
        assert np.all(np.diff(by_sigma) < 0), (q, sigma, steps, by_sigma)
        assert np.all(np.diff(by_rate) > 0), (q, sigma, steps, by_rate)
        assert np.all(np.diff(by_steps) > 0), (q, sigma, steps, by_steps)
    by_sigma_pld = [epsilon(DpSgdEvent(0.02, s, 1000), 1e-5, "pld") for s in (1.0, 1.5)]
    assert np.all(np.diff(by_sigma_pld) < 0)


# --- calibration ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, delta_, q, steps",
    [(8.0, 1e-5, 0.04, 2000), (1.0, 1e-5, 0.01, 10_000), (8.0, 8e-7, 32768 / 1281167, 18_000),
     (0.2, 1e-6, 0.001, 1000), (3.0, 1e-6, 1.0, 1)],
)
def test_calibration_round_trip_is_tight_and_never_over_target(target, delta_, q, steps) -> None:
    calibration = calibrate_noise_multiplier(target, delta_, q, steps)
    sigma = calibration.noise_multiplier
    assert calibration.accountant == "rdp" and calibration.epsilon <= target
    assert epsilon(DpSgdEvent(q, sigma, steps), delta_) == calibration.epsilon
    assert calibration.epsilon >= target * (1 - 1e-4)
    assert epsilon(DpSgdEvent(q, sigma * (1 - 1e-3), steps), delta_) > target  # (nearly) the smallest


def test_calibration_matches_opacus_published_noise_multiplier() -> None:
    # opacus/tests/accountants_test.py::test_get_noise_multiplier_rdp_steps: eps 8, delta 1e-5, q 0.04,
    # 2000 steps -> 1.3562 (places=4). Opacus stops within 0.01 of the target epsilon, we within 1e-4.
    sigma = calibrate_noise_multiplier(8.0, 1e-5, 0.04, 2000).noise_multiplier
    assert sigma == pytest.approx(1.3562, abs=2e-4)


def test_pld_calibration_round_trip() -> None:
    calibration = calibrate_noise_multiplier(1.0, 1e-5, 0.01, 10_000, "pld")
    assert calibration.accountant == "pld"
    assert target_window(calibration.epsilon, 1.0)
    assert calibration.noise_multiplier < calibrate_noise_multiplier(1.0, 1e-5, 0.01, 10_000).noise_multiplier


def target_window(eps: float, target: float) -> bool:
    return target * (1 - 1e-4) <= eps <= target


def test_unreachable_target_says_what_to_change() -> None:
    with pytest.raises(PrivacyParameterError, match=r"Increase the target epsilon \(--epsilon") as info:
        calibrate_noise_multiplier(1e-3, 1e-5, 0.01, 1000)
    assert "accountant='pld'" in str(info.value)  # below what the RDP conversion can certify
    with pytest.raises(PrivacyParameterError, match="raise sigma_max"):
        calibrate_noise_multiplier(0.5, 1e-5, 0.5, 10_000, sigma_max=5.0)
    for args in ((0.0, 1e-5, 0.01, 100), (1.0, 1e-5, 0.0, 100), (1.0, 1e-5, 0.01, 0), (1.0, 0.0, 0.01, 100),
                 (1.0, 1e-5, 1.5, 100), (1.0, 1e-5, 0.01, -3)):
        with pytest.raises(PrivacyParameterError):
            calibrate_noise_multiplier(*args)
