"""Sizing spends inside a budget: how many more DP-SGD steps it allows, and its shares in rho.

Shares of one budget are allocated in the currency Gaussian mechanisms compose in, rho = 1 / (2 sigma^2)
(zCDP, Bun and Steinke 2016; as RDP, rho x alpha at every order): `budget_rho` is the rho of the one
sensitivity-1 Gaussian release that, after what a ledger already holds, spends exactly (epsilon, delta)
under the RDP accountant, so a component may take share x rho and what it releases composes with the rest
exactly; `epsilon_of_rho` goes back from a rho to the epsilon the accountant certifies for it.
"""

from __future__ import annotations

import math

from tramontane.accounting.accountants import (
    Accountant,
    LedgerLike,
    PldTooLargeError,
    calibrate_noise_multiplier,
    epsilon,
    ledger_events,
)
from tramontane.accounting.events import DpSgdEvent, GaussianEvent, PrivacyLedger


def gaussian_sigma_for_rho(rho: float) -> float:
    """The noise std that makes the Gaussian mechanism on a sensitivity-1 query rho-zCDP: rho = 1/(2 sigma^2)
    (Bun and Steinke 2016, Prop. 1.6); as RDP, rho x alpha at every order alpha."""
    return 1.0 / math.sqrt(2.0 * rho)


def budget_rho(epsilon_: float, delta: float, prior: LedgerLike = ()) -> float:
    """rho = 1 / (2 sigma^2) of the one sensitivity-1 Gaussian release that, after `prior`, spends exactly
    (epsilon, delta) under the RDP accountant: the budget in zCDP's currency, to be shared out."""
    sigma = calibrate_noise_multiplier(epsilon_, delta, 1.0, 1, "rdp", prior=prior).noise_multiplier
    return 1.0 / (2.0 * sigma**2)


def epsilon_of_rho(rho: float, delta: float, prior: LedgerLike = ()) -> float:
    """The RDP accountant's epsilon at `delta` of `prior` followed by one Gaussian release of `rho` (0 for 0)."""
    if rho <= 0.0:
        return epsilon(ledger_events(prior), delta, "rdp") if ledger_events(prior) else 0.0
    rest = GaussianEvent(gaussian_sigma_for_rho(rho), 1, label="budget share")
    return epsilon([*ledger_events(prior), rest], delta, "rdp")


def max_steps_within_budget(
    ledger: PrivacyLedger,
    sample_rate: float,
    noise_multiplier: float,
    target_epsilon: float,
    delta: float,
    accountant: Accountant = "rdp",
    upper: int = 10_000_000,
    label: str = "dp-sgd",
) -> int:
    """The largest S such that `ledger` + S steps of DP-SGD(q, sigma) is (target_epsilon, delta)-DP.

    Epsilon grows with S, so a binary search over S with the exact accountant gives the answer; 0 when
    even the ledger alone (or one more step) exceeds the target. With accountant "pld", step counts whose
    PLD would exceed `PLD_MAX_POINTS` count as over budget (safe: the answer can only get smaller).
    """

    def spent(steps: int) -> float:
        events = list(ledger.events)
        if steps:
            events.append(DpSgdEvent(sample_rate, noise_multiplier, steps, label))
        try:
            return epsilon(events, delta, accountant) if events else 0.0
        except PldTooLargeError:
            return math.inf

    if spent(1) > target_epsilon:
        return 0
    lo, hi = 1, 2
    while hi < upper and spent(hi) <= target_epsilon:
        lo, hi = hi, min(2 * hi, upper)
    if hi >= upper and spent(upper) <= target_epsilon:
        return upper
    while hi - lo > 1:  # invariant: spent(lo) <= target < spent(hi)
        mid = (lo + hi) // 2
        if spent(mid) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo
