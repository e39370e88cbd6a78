"""Empirical epsilon from attack scores, with Clopper-Pearson intervals, and its composition over a run.

The estimator is CANIFE's (Maddock, Sablayrolles and Stock, arXiv 2210.02912; facebookresearch/canife
`canary_analyser.py`): given scores of outputs produced with the canary (positives) and without it
(negatives), higher meaning "canary present", every threshold t defines a test "flag when score >= t"
with false-positive rate FPR and false-negative rate FNR. An (epsilon, delta)-DP mechanism forces
FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta, hence

    epsilon >= eps(t) = log max{ (1 - delta - FPR) / FNR, (1 - delta - FNR) / FPR },

and the estimate is max(0, max_t eps(t)) at a stated delta (CANIFE's default delta = 1 / (n_pos + n_neg)).
95% Clopper-Pearson intervals on the FPR and FNR at the chosen threshold give the interval
[eps(upper FPR, upper FNR), eps(lower FPR, lower FNR)] (each rate's interval at `confidence`).

Zero error rates (`zero_error`). A test with FNR = 0 or FPR = 0 leaves one term with a zero denominator.
CANIFE's `CanaryAnalyser.empirical_eps` (facebookresearch/canife, canife/canary_analyser.py) keeps a term
only when its denominator is positive and returns infinity as soon as fewer than two terms remain
(`if len(x) <= 1 ...: x = [inf]`); its `ci_eps` applies the same rule to the Clopper-Pearson ends, so an
upper end whose lower rate is 0 is infinite too. CANIFE evaluates a single threshold (the one of maximum
accuracy, privacy_lint's `get_max_accuracy_threshold`); an estimator that maximises over all thresholds
cannot take the infinity literally (the threshold that flags nothing has FPR = 0 and would always win), so:
- "canife" (default): a threshold with exactly one zero error rate has an infinite point estimate under
  CANIFE's rule and is not a candidate; infinity is accepted only at perfect accuracy (FPR = FNR = 0). The
  interval ends follow `ci_eps`. With no candidate at all the estimate is 0 at t = +inf ("flag nothing").
- "finite": the former rule of this module: the term with a zero denominator is dropped and the other one
  kept, infinite only at perfect accuracy. Also a valid lower bound, never below "canife" on the same
  scores; on small score sets it picks one-sided thresholds that "canife" skips. E.g. 49 of 50 positives
  above 50 tied negatives, delta = 1/100: "finite" takes t = 1 (no false positive, one miss) and reports
  log(0.99 / 0.02) = 3.90; "canife" has no two-sided threshold left and reports 0 (interval [0, inf]);
  CANIFE's own code, which looks only at its maximum-accuracy threshold (that same t = 1), reports inf.
  With a few hundred scores per side, as in audits, both rules nearly always pick the same threshold.
One deviation in both: when both terms are negative (a test worse than chance both ways) the estimate is
0, where CANIFE's code takes the logarithm of infinity.

Caveats. The threshold is chosen on the same scores, so even the lower end is not a certified bound
(optimistic by the selection). With n scores the finite estimate cannot exceed about log(n / 2), however
leaky the mechanism. And the point estimate is biased UPWARDS by the maximum over thresholds of noisy
count ratios, strongly so when the true epsilon is small. Measured on ideal canary scores N(1, sigma^2) vs
N(0, sigma^2), 30 + 30 scores, delta = 1/60 (tests/unit/test_audit_estimators.py reproduces the trend):
the estimate exceeds the true epsilon at the same delta in 0% of runs for sigma = 0.7, 25% for sigma = 1,
84% for sigma = 2 and 92% for sigma = 3 (mean 1.60 against 1.02 at sigma = 2), while the Clopper-Pearson
lower end exceeded it in none of 200 runs at any sigma (both zero-error rules gave the same estimates in
every one of these runs). After composition (below) the point estimate of
a whole run at sigma = 2 exceeds the accountant's epsilon in most runs. So: the lower end is the figure to
compare with theory; the point estimate is CANIFE's headline number, reported as such.

Composition (CANIFE `calculate_global_eps`): each per-step estimate eps_hat becomes the noise multiplier
sigma_hat of a single unsampled Gaussian step that is eps_hat-DP at the estimator's delta (RDP accountant,
as CANIFE via Opacus); the measured steps are then re-accounted as DP-SGD with the run's real sampling
rate, sigma_hat and their number of steps, and converted at the run's delta. Point estimates below
`min_epsilon` (CANIFE: 0.15) are raised to it, since no finite noise reaches epsilon 0; lower ends are
not (one below `NO_LEAKAGE` = 0.01 contributes nothing, so a composed lower end can be 0). An infinite
estimate falls back to the run's real noise multiplier. Finite estimates are never capped by theory: a
lower end above the accountant's epsilon is the symptom of a broken implementation an audit must show.
Imports no torch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from tramontane import accounting
from tramontane.accounting import DpSgdEvent, PrivacyLedger
from tramontane.errors import PrivacyParameterError

NO_LEAKAGE = 0.01  # per-step lower ends below this are composed as no leakage at all


def clopper_pearson(k: np.ndarray | int, n: np.ndarray | int,
                    confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) two-sided interval of a binomial proportion k / n (vectorised), the one
    `scipy.stats.binomtest(k, n).proportion_ci(confidence, "exact")` gives."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    a = 1.0 - confidence
    with np.errstate(invalid="ignore"):
        lo = np.where(k > 0, stats.beta.ppf(a / 2, k, n - k + 1), 0.0)
        hi = np.where(k < n, stats.beta.ppf(1 - a / 2, k + 1, n - k), 1.0)
    return np.nan_to_num(lo), np.nan_to_num(hi, nan=1.0)


ZERO_ERROR_RULES = ("canife", "finite")


def _check_zero_error(zero_error: str) -> None:
    if zero_error not in ZERO_ERROR_RULES:
        raise PrivacyParameterError(f"zero_error must be one of {list(ZERO_ERROR_RULES)}, got {zero_error!r}")


def epsilon_from_rates(fpr: np.ndarray | float, fnr: np.ndarray | float, delta: float,
                       zero_error: str = "finite") -> np.ndarray:
    """log max{(1 - delta - FPR) / FNR, (1 - delta - FNR) / FPR} (vectorised), clamped at 0; inf when both
    rates are zero. With exactly one zero rate, "finite" drops the term with the zero denominator and keeps
    the other; "canife" gives inf, as CANIFE's `empirical_eps` does (see the module docstring)."""
    _check_zero_error(zero_error)
    fpr, fnr = np.asarray(fpr, dtype=float), np.asarray(fnr, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(fnr > 0, (1 - delta - fpr) / np.where(fnr > 0, fnr, 1.0), -np.inf)
        t2 = np.where(fpr > 0, (1 - delta - fnr) / np.where(fpr > 0, fpr, 1.0), -np.inf)
        best = np.maximum(t1, t2)
        eps = np.where(best > 1.0, np.log(np.where(best > 1.0, best, 1.0)), 0.0)
    infinite = (fpr == 0) | (fnr == 0) if zero_error == "canife" else (fpr == 0) & (fnr == 0)
    return np.where(infinite, np.inf, eps)


@dataclass(frozen=True)
class EpsilonEstimate:
    """An empirical epsilon at `delta` from two score sets, with its interval (see the module docstring)."""

    epsilon: float
    low: float
    high: float
    delta: float
    confidence: float
    threshold: float  # flag "with canary / member" when score >= threshold
    fpr: float
    fnr: float
    positives: int
    negatives: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else ("inf" if v > 0 else "-inf"))
                for k, v in asdict(self).items()}


def rates_at_thresholds(positives: np.ndarray,
                        negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, false positives, false negatives) of every test "score >= t", t over the distinct
    scores in decreasing order, plus t = +inf (flag nothing) first."""
    pos, neg = np.asarray(positives, dtype=float), np.asarray(negatives, dtype=float)
    scores = np.concatenate([pos, neg])
    thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
    # counts of scores >= t for each t, via sorted arrays
    tp = len(pos) - np.searchsorted(np.sort(pos), thresholds, side="left")
    fp = len(neg) - np.searchsorted(np.sort(neg), thresholds, side="left")
    return thresholds, fp, len(pos) - tp


def empirical_epsilon(positives: Sequence[float] | np.ndarray, negatives: Sequence[float] | np.ndarray,
                      delta: float | None = None, confidence: float = 0.95, *,
                      zero_error: str = "canife") -> EpsilonEstimate:
    """CANIFE's epsilon estimate from scores with (positives) and without (negatives) the canary.

    Args:
        positives, negatives: attack scores, higher meaning "present"; at least one of each.
        delta: the delta of the (FPR, FNR) -> epsilon conversion; default 1 / (n_pos + n_neg) as CANIFE.
        confidence: level of each Clopper-Pearson interval.
        zero_error: "canife" (default) or "finite": the rule for thresholds with a zero error rate (module
            docstring, "Zero error rates").
    """
    _check_zero_error(zero_error)
    pos, neg = np.asarray(positives, dtype=float).ravel(), np.asarray(negatives, dtype=float).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise PrivacyParameterError("need at least one score with and one without the canary")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise PrivacyParameterError("scores must be finite numbers")
    if delta is None:
        delta = 1.0 / (len(pos) + len(neg))
    if not 0.0 <= delta < 1.0:
        raise PrivacyParameterError(f"delta must be in [0, 1), got {delta}")
    thresholds, fp, fn = rates_at_thresholds(pos, neg)
    fpr, fnr = fp / len(neg), fn / len(pos)
    eps = epsilon_from_rates(fpr, fnr, delta, "finite")
    if zero_error == "canife":
        # one-sided thresholds are infinite under CANIFE's rule: candidates only at perfect accuracy
        one_sided = (fp == 0) != (fn == 0)
        eps = np.where(one_sided, -np.inf, eps)
    i = int(np.argmax(eps))
    point = max(float(eps[i]), 0.0)  # no candidate at all: 0 at t = +inf (flag nothing), index 0
    fpr_lo, fpr_hi = clopper_pearson(fp[i], len(neg), confidence)
    fnr_lo, fnr_hi = clopper_pearson(fn[i], len(pos), confidence)
    low = float(epsilon_from_rates(fpr_hi, fnr_hi, delta, zero_error))
    high = float(epsilon_from_rates(fpr_lo, fnr_lo, delta, zero_error))
    return EpsilonEstimate(epsilon=point, low=low, high=max(high, point), delta=float(delta),
                           confidence=confidence, threshold=float(thresholds[i]), fpr=float(fpr[i]),
                           fnr=float(fnr[i]), positives=len(pos), negatives=len(neg))


def gaussian_epsilon(noise_multiplier: float, delta: float,
                     accountant: accounting.Accountant = "rdp") -> float:
    """Epsilon of one unsampled Gaussian step with noise `noise_multiplier` (CANIFE's "one-step epsilon")."""
    return accounting.epsilon(accounting.GaussianEvent(noise_multiplier), delta, accountant)


def noise_for_step_epsilon(epsilon: float, delta: float) -> float:
    """sigma_hat: the noise multiplier of one unsampled Gaussian step that is (epsilon, delta)-DP
    (RDP accountant, as CANIFE's Opacus `get_noise_multiplier(sample_rate=1, steps=1)`)."""
    return accounting.calibrate_noise_multiplier(epsilon, delta, 1.0, 1, sigma_min=0.01).noise_multiplier


@dataclass(frozen=True)
class ComposedEstimate:
    """An empirical epsilon for a whole run, from per-step estimates (CANIFE's compounding)."""

    epsilon: float
    low: float
    high: float
    delta: float
    noise_multipliers: tuple[float, ...]  # sigma_hat of each measured segment (point estimate)
    ledger: dict[str, Any]  # the empirical ledger the point estimate was accounted with

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("epsilon", "low", "high"):
            if not math.isfinite(out[key]):
                out[key] = "inf"
        return out


def compose_estimates(segments: Sequence[tuple[EpsilonEstimate, int]], sample_rate: float, delta: float,
                      noise_multiplier: float | None, *, min_epsilon: float = 0.15) -> ComposedEstimate:
    """Compose per-step estimates over a run: each (estimate, steps) segment says the next `steps` steps
    leaked like `estimate`; see the module docstring for the procedure (CANIFE `calculate_global_eps`).

    Args:
        segments: (per-step estimate, number of steps it stands for), in training order.
        sample_rate: the run's real Poisson sampling rate q.
        delta: the delta to report the run's epsilon at.
        noise_multiplier: the run's real sigma, used for infinite estimates (None or 0: a non-private run,
            whose infinite estimates stay infinite).
    """
    if not segments:
        raise PrivacyParameterError("need at least one (estimate, steps) segment")

    def compose(pick: str, floor: float) -> tuple[float, tuple[float, ...], PrivacyLedger]:
        ledger = PrivacyLedger()
        sigmas: list[float] = []
        for est, steps in segments:
            eps = getattr(est, pick)
            if math.isinf(eps):
                if not noise_multiplier:
                    return math.inf, tuple(sigmas), ledger
                sigma = noise_multiplier
            elif max(eps, floor) < NO_LEAKAGE:
                continue  # the lower end certifies no leakage for these steps
            else:
                sigma = noise_for_step_epsilon(max(eps, floor), est.delta)
            sigmas.append(sigma)
            ledger.append(DpSgdEvent(sample_rate, sigma, steps, label="empirical"))
        if not len(ledger):
            return 0.0, tuple(sigmas), ledger
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return accounting.epsilon(ledger, delta), tuple(sigmas), ledger

    eps, sigmas, ledger = compose("epsilon", min_epsilon)
    low, _, _ = compose("low", 0.0)  # a lower end is never raised: 0 means nothing was shown
    high, _, _ = compose("high", min_epsilon)
    return ComposedEstimate(epsilon=eps, low=low, high=max(high, eps), delta=delta, noise_multipliers=sigmas,
                            ledger=ledger.to_dict())
