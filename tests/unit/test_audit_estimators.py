"""CANIFE's empirical-epsilon estimator, its composition over a run, and the membership-attack toolkit."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import stats

from tramontane import accounting
from tramontane.accounting import DpSgdEvent, GaussianEvent
from tramontane.audit.estimators import (
    clopper_pearson,
    compose_estimates,
    empirical_epsilon,
    epsilon_from_rates,
    gaussian_epsilon,
    noise_for_step_epsilon,
)
from tramontane.audit.membership import attack_summary, auc, exposure, lira_scores, roc_curve, tpr_at_fpr
from tramontane.errors import PrivacyParameterError

logging.getLogger("absl").setLevel(logging.ERROR)


def test_epsilon_from_rates_by_hand() -> None:
    d = 0.01
    assert epsilon_from_rates(0.1, 0.2, d) == pytest.approx(math.log((1 - d - 0.2) / 0.1))
    assert epsilon_from_rates(0.0, 0.5, d) == pytest.approx(math.log((1 - d) / 0.5))  # one term dropped
    assert epsilon_from_rates(0.0, 0.0, d) == math.inf  # perfect separation only
    assert epsilon_from_rates(0.5, 0.5, d) == 0.0  # chance: clamped at 0
    np.testing.assert_allclose(epsilon_from_rates(np.array([0.1, 0.3]), np.array([0.2, 0.3]), d),
                               [math.log(0.79 / 0.1), math.log(0.69 / 0.3)])


def test_clopper_pearson_matches_scipy_binomtest() -> None:
    for k, n in [(0, 20), (3, 50), (17, 17), (40, 100)]:
        lo, hi = clopper_pearson(k, n, 0.95)
        ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
        assert float(lo) == pytest.approx(ci.low, abs=1e-12)
        assert float(hi) == pytest.approx(ci.high, abs=1e-12)


def test_estimator_on_two_point_scores_with_known_rates() -> None:
    # threshold "score >= 2": TPR 0.8 (FNR 0.2), FPR 0.1 -> eps = log((1 - delta - 0.2) / 0.1)
    positives, negatives = [2.0] * 80 + [0.0] * 20, [2.0] * 10 + [0.0] * 90
    est = empirical_epsilon(positives, negatives, delta=0.01)
    assert est.epsilon == pytest.approx(math.log(0.79 / 0.1))
    assert (est.threshold, est.fpr, est.fnr) == (2.0, 0.1, 0.2)
    fpr_ci = stats.binomtest(10, 100).proportion_ci(0.95, method="exact")
    fnr_ci = stats.binomtest(20, 100).proportion_ci(0.95, method="exact")
    assert est.low == pytest.approx(float(epsilon_from_rates(fpr_ci.high, fnr_ci.high, 0.01)))
    assert est.high == pytest.approx(float(epsilon_from_rates(fpr_ci.low, fnr_ci.low, 0.01)))
    assert est.low < est.epsilon < est.high
    # CANIFE's default delta: 1 / (number of scores)
    assert empirical_epsilon(positives, negatives).delta == pytest.approx(1 / 200)


def test_estimator_is_infinite_only_with_perfect_separation() -> None:
    est = empirical_epsilon([1.0] * 50, [0.0] * 50)
    assert est.epsilon == math.inf and est.high == math.inf
    assert 2.0 < est.low < math.log(50)  # 0 errors in 50: Clopper-Pearson caps the rates near 7%
    one_error = empirical_epsilon([1.0] * 49 + [0.0], [0.0] * 50, zero_error="finite")
    assert math.isfinite(one_error.epsilon) and one_error.epsilon > 3.0
    same = empirical_epsilon(np.zeros(100), np.zeros(100))
    assert same.epsilon == 0.0 and same.low == 0.0
    with pytest.raises(PrivacyParameterError):
        empirical_epsilon([], [1.0])


def test_zero_error_rules_pick_different_thresholds_on_small_score_sets() -> None:
    # 49 of 50 positives above 50 tied negatives, delta = 1/100. Thresholds: +inf (flag nothing), 1 (no false
    # positive, one miss), 0 (flag everything). "finite" keeps the one-sided t = 1 with its finite term
    # log((1 - delta - 0) / (1/50)); "canife" gives it CANIFE's infinite estimate, accepted only at perfect
    # accuracy, so no threshold is left: 0, with an interval that says nothing.
    positives, negatives = [1.0] * 49 + [0.0], [0.0] * 50
    finite = empirical_epsilon(positives, negatives, zero_error="finite")
    assert (finite.threshold, finite.fpr, finite.fnr) == (1.0, 0.0, 0.02)
    assert finite.epsilon == pytest.approx(math.log(0.99 / 0.02))
    canife = empirical_epsilon(positives, negatives)  # the default
    assert canife == empirical_epsilon(positives, negatives, zero_error="canife")
    assert (canife.epsilon, canife.threshold, canife.low, canife.high) == (0.0, math.inf, 0.0, math.inf)

    # With a two-sided threshold available, "canife" takes it; "finite" prefers the one-sided t = 3 whose
    # finite term is larger. Scores: positives 3, 3, 3, 3, 0; negatives 2, 0, 0, 0, 0 (delta = 1/10).
    positives, negatives = [3.0, 3.0, 3.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0]
    d = 0.1
    finite = empirical_epsilon(positives, negatives, zero_error="finite")
    canife = empirical_epsilon(positives, negatives)
    assert (finite.threshold, finite.fpr, finite.fnr) == (3.0, 0.0, 0.2)
    assert finite.epsilon == pytest.approx(math.log((1 - d) / 0.2))
    assert (canife.threshold, canife.fpr, canife.fnr) == (2.0, 0.2, 0.2)
    assert canife.epsilon == pytest.approx(math.log((1 - d - 0.2) / 0.2))
    assert canife.epsilon != finite.epsilon
    # CANIFE's interval rule: an end computed from a zero lower rate is infinite; at a two-sided threshold
    # both lower Clopper-Pearson rates are positive and the upper end is finite
    assert math.isfinite(canife.high) and canife.low <= canife.epsilon <= canife.high
    assert epsilon_from_rates(0.0, 0.3, d, "canife") == math.inf
    assert epsilon_from_rates(0.0, 0.3, d, "finite") == pytest.approx(math.log(0.9 / 0.3))
    with pytest.raises(PrivacyParameterError):
        empirical_epsilon(positives, negatives, zero_error="lenient")


def test_estimator_on_gaussian_scores_approaches_the_true_rate_curve() -> None:
    # Scores of the ideal canary: N(1, sigma^2) with, N(0, sigma^2) without. The population value of the
    # estimator is max_t eps(FPR(t), FNR(t)), itself a lower bound on the mechanism's epsilon at delta.
    sigma, delta, n = 1.0, 0.05, 20_000
    rng = np.random.default_rng(0)
    est = empirical_epsilon(rng.normal(1, sigma, n), rng.normal(0, sigma, n), delta=delta)
    t = np.linspace(-3, 4, 20_001)
    curve = epsilon_from_rates(stats.norm.sf(t / sigma), stats.norm.cdf((t - 1) / sigma), delta)
    population = float(curve.max())
    assert abs(est.epsilon - population) < 0.1
    assert est.low <= population <= est.high
    assert population <= accounting.epsilon(GaussianEvent(sigma), delta, "pld") + 1e-6
    # identical distributions: a small estimate whose interval starts at 0
    null = empirical_epsilon(rng.normal(0, 1, 2000), rng.normal(0, 1, 2000), delta=delta)
    assert null.epsilon < 0.15 and null.low == 0.0


def test_point_estimate_is_biased_upwards_and_the_lower_end_is_not() -> None:
    # The caveat documented in estimators.py, measured: ideal canary scores at sigma = 3 (true epsilon at
    # delta = 1/60 about 0.6), 30 + 30 scores per run.
    rng = np.random.default_rng(5)
    sigma, n = 3.0, 30
    truth = accounting.epsilon(GaussianEvent(sigma), 1 / (2 * n), "pld")
    runs = [empirical_epsilon(rng.normal(1, sigma, n), rng.normal(0, sigma, n)) for _ in range(150)]
    assert np.mean([r.epsilon > truth for r in runs]) > 0.7
    assert np.mean([r.low > truth for r in runs]) < 0.05


def test_composition_round_trips_the_theoretical_noise() -> None:
    sigma, q, steps, delta = 1.5, 0.02, 500, 1e-5
    est_delta = 0.01
    step_eps = gaussian_epsilon(sigma, est_delta)  # an estimate exactly at the one-step theory
    assert noise_for_step_epsilon(step_eps, est_delta) == pytest.approx(sigma, rel=1e-3)
    est = empirical_epsilon([1.0] * 10 + [0.0] * 90, [0.0] * 100, delta=est_delta)
    est = type(est)(**{**est.__dict__, "epsilon": step_eps, "low": step_eps / 2, "high": step_eps * 2})
    composed = compose_estimates([(est, steps)], q, delta, sigma)
    theory = accounting.epsilon(DpSgdEvent(q, sigma, steps), delta)
    assert composed.epsilon == pytest.approx(theory, rel=2e-3)
    assert composed.low < composed.epsilon < composed.high
    assert composed.noise_multipliers[0] == pytest.approx(sigma, rel=1e-3)
    # two segments: the second one's steps add up
    two = compose_estimates([(est, steps // 2), (est, steps - steps // 2)], q, delta, sigma)
    assert two.epsilon == pytest.approx(composed.epsilon, rel=1e-6)


def test_composition_of_infinite_and_tiny_estimates() -> None:
    perfect = empirical_epsilon([1.0] * 20, [0.0] * 20)
    assert compose_estimates([(perfect, 100)], 0.01, 1e-5, None).epsilon == math.inf  # no noise: infinite
    theory = accounting.epsilon(DpSgdEvent(0.01, 2.0, 100), 1e-5)
    assert compose_estimates([(perfect, 100)], 0.01, 1e-5, 2.0).epsilon == pytest.approx(theory)
    null = empirical_epsilon(np.zeros(50), np.zeros(50))
    floor = compose_estimates([(null, 100)], 0.01, 1e-5, 2.0)  # raised to CANIFE's 0.15 ...
    assert 0 < floor.epsilon < theory
    assert floor.low == 0.0  # ... but a lower end of 0 certifies nothing and stays 0


def test_roc_auc_and_tpr_at_fpr_match_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(0.5, 1, 300), np.concatenate([rng.normal(0, 1, 300), [0.5, 0.5]])
    members[:5] = 0.5  # ties across the two sets
    fpr, tpr, _ = roc_curve(members, nonmembers)
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    assert auc(fpr, tpr) == pytest.approx(roc_auc_score(labels, np.r_[members, nonmembers]), abs=1e-12)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    tenth = np.sort(nonmembers)[::-1][30]  # about 10% of the non-members score above it
    assert tpr_at_fpr(fpr, tpr, 0.1) == pytest.approx((members >= tenth).mean(), abs=0.01)
    summary = attack_summary(members, nonmembers, delta=0.01)
    assert summary.advantage == pytest.approx(float((tpr - fpr).max()))
    d = summary.to_dict(curve_points=20)
    assert len(d["roc"]["fpr"]) <= 22 and d["epsilon"]["delta"] == 0.01


def _toy_mean_model(data: np.ndarray, inside: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 'model' that memorises: the mean of its few training points plus noise; the score of a point is
    minus its squared distance to the model (its 'loss')."""
    center = data[inside].mean(0) + rng.normal(0, 0.05, data.shape[1])
    return -((data - center) ** 2).sum(1)


def test_lira_beats_the_loss_threshold_attack_when_examples_differ_in_difficulty() -> None:
    rng = np.random.default_rng(2)
    n, dim, k = 60, 50, 16
    scale = rng.uniform(0.2, 2.0, n)[:, None]  # some points are far out (hard), some central (easy)
    data = rng.normal(0, 1, (n, dim)) * scale
    target_in = rng.random(n) < 0.5
    target = _toy_mean_model(data, target_in, rng)
    shadow_in = rng.random((k, n)) < 0.5
    shadow = np.stack([_toy_mean_model(data, shadow_in[j], rng) for j in range(k)])
    loss = attack_summary(target[target_in], target[~target_in])
    online = lira_scores(target, shadow, shadow_in)
    offline = lira_scores(target, shadow, shadow_in, online=False)
    lira_on = attack_summary(online[target_in], online[~target_in])
    lira_off = attack_summary(offline[target_in], offline[~target_in])
    assert lira_on.auc > loss.auc + 0.15 and lira_on.auc > 0.7  # measured 0.85 against 0.49
    assert lira_off.auc > loss.auc + 0.1
    with pytest.raises(PrivacyParameterError):
        lira_scores(target, shadow[:, :5], shadow_in[:, :5])


def test_exposure_of_inserted_canaries() -> None:
    candidates = np.arange(1023, dtype=float)  # 1023 others + the canary = 1024 = 2^10
    assert exposure(5000.0, candidates) == pytest.approx(10.0)  # ranked first: log2 |R|
    assert exposure(-1.0, candidates) == pytest.approx(0.0)  # ranked last
    assert exposure(1022.0, candidates) == pytest.approx(10.0 - 1.0)  # a tie counts against the canary
