"""How many more DP-SGD steps a privacy budget allows, given what a ledger has already spent."""

from __future__ import annotations

import math

from tramontane.accounting.accountants import Accountant, PldTooLargeError, epsilon
from tramontane.accounting.events import DpSgdEvent, PrivacyLedger


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
