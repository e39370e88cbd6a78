"""The analytic Gaussian mechanism: the exact (epsilon, delta) of Gaussian noise on a sensitivity-1 query.

Balle and Wang, "Improving the Gaussian mechanism for differential privacy: analytical calibration and
optimal denoising", ICML 2018, Theorem 8: N(0, sigma^2) added to a query of L2 sensitivity 1 is
(epsilon, delta)-DP if and only if

    Phi(1 / (2 sigma) - epsilon sigma) - e^epsilon Phi(-1 / (2 sigma) - epsilon sigma) <= delta.

Unlike the classical sigma = sqrt(2 log(1.25 / delta)) / epsilon, this holds for every epsilon (also >= 1)
and is tight. Used for one-shot releases (the DP schema's category sets) and for the audit's bounds; DP-SGD
and composed ledgers are accounted in `accountants.py` instead.
"""

from __future__ import annotations

import math

from tramontane.accounting.events import check_delta, check_epsilon

_BISECTION_STEPS = 200


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(sigma: float, epsilon: float) -> float:
    """The smallest delta for which N(0, sigma^2) on a sensitivity-1 query is (epsilon, delta)-DP
    (Balle and Wang 2018, Theorem 8), for sigma > 0 and epsilon >= 0."""
    a, b = 1.0 / (2.0 * sigma), epsilon * sigma
    tail = 0.5 * math.erfc((a + b) / math.sqrt(2.0))  # Phi(-a - b), computed without cancellation
    second = 0.0 if tail == 0.0 else math.exp(min(epsilon + math.log(tail), 700.0))
    return max(0.0, _phi(a - b) - second)


def analytic_gaussian_sigma(epsilon: float, delta: float) -> float:
    """The smallest sigma making the Gaussian mechanism on a sensitivity-1 query (epsilon, delta)-DP
    (Balle and Wang 2018, Theorem 8), by bisection on `gaussian_delta`, which decreases in sigma.

    The bisection keeps the upper end, so the sigma returned always satisfies gaussian_delta <= delta: it
    errs (by rounding only) towards more noise, never less. Raises `PrivacyParameterError` for epsilon
    not finite and >= 0 or delta not in (0, 1).
    """
    epsilon, delta = check_epsilon(epsilon), check_delta(delta)
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, epsilon) > delta:
        lo, hi = hi, hi * 2.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if mid == 0.0 or gaussian_delta(mid, epsilon) > delta:
            lo = mid
        else:
            hi = mid
    return hi


__all__ = ["analytic_gaussian_sigma", "gaussian_delta"]
