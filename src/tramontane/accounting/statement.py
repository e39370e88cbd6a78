"""`PrivacyStatement`: what a run's privacy ledger amounts to, computed once and read everywhere.

A run's guarantee is its ledger composed at one delta: epsilon under the "rdp" accountant and under the
"pld" accountant (`accountants.privacy_spent`, which says how each is computed and what it assumes), next to
the accountant that calibrated the run's noise (its epsilon is the guarantee; the other is shown beside it).
The synthesizer computes its statement once when a fit ends (or on first use after loading), and the CLI,
the release report and the privacy card read that one value instead of composing the ledger again.

Where the caller has a DP-SGD setting (Poisson rate q, noise multiplier sigma, S steps) the statement also
carries its TAN figures (Sander, Stock and Sablayrolles, arXiv 2210.03403, `tan.py`): eta, the total amount
of noise 1 / eta and eps_TAN. eps_TAN is a heuristic, never the guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tramontane.accounting.accountants import (
    ACCOUNTANTS,
    DEFAULT_PLD_DISCRETIZATION,
    Accountant,
    LedgerLike,
    ledger_events,
    privacy_spent,
)
from tramontane.accounting.events import LEDGER_FORMAT, LEDGER_VERSION, DpSgdEvent, PrivacyEvent, check_delta
from tramontane.accounting.tan import eps_tan, eta, total_amount_of_noise
from tramontane.errors import PrivacyParameterError


@dataclass(frozen=True)
class PrivacyStatement:
    """The (epsilon, delta) guarantee of a ledger under both accountants, and how it was obtained.

    Build it with `PrivacyStatement.of`. `events` is a snapshot of the ledger (a ledger that grows later is
    not reflected: compare `events` with `ledger.events` to tell). `accountant` is the one the run's noise
    was calibrated with; `epsilon` is the epsilon under it, the run's guarantee.
    """

    events: tuple[PrivacyEvent, ...]
    delta: float
    accountant: str
    epsilon_rdp: float  # the whole ledger under the RDP accountant
    epsilon_pld: float  # the whole ledger under the PLD accountant (usually tighter)
    target_epsilon: float | None = None  # the budget the run was asked to stay within, when there was one
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION  # of the PLD accountant that gave epsilon_pld
    # TAN figures of the run's DP-SGD setting (arXiv 2210.03403), when the caller gave one: heuristics
    eta: float | None = None
    total_amount_of_noise: float | None = None
    epsilon_tan: float | None = None

    @classmethod
    def of(cls, ledger: LedgerLike, delta: float, accountant: Accountant = "rdp", *,
           target_epsilon: float | None = None, dp_sgd: DpSgdEvent | None = None,
           pld_discretization: float = DEFAULT_PLD_DISCRETIZATION) -> PrivacyStatement:
        """Compose `ledger` (a ledger, an event or events) at `delta` under both accountants, once.

        Args:
            accountant: the accountant the run's noise was calibrated with ("rdp" or "pld").
            target_epsilon: the run's budget, stated beside what was spent.
            dp_sgd: the run's DP-SGD setting (q, sigma, steps; the label is ignored) for the TAN figures.

        Raises `PldTooLargeError` when the ledger's PLD would exceed `PLD_MAX_POINTS` grid points, and
        `PrivacyParameterError` for a delta that the ledger's (epsilon, delta) events already exceed.
        """
        if accountant not in ACCOUNTANTS:
            raise PrivacyParameterError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        delta = check_delta(delta)
        events = ledger_events(ledger)
        tan: dict[str, float] = {}
        if dp_sgd is not None:
            q, sigma, steps = dp_sgd.sample_rate, dp_sgd.noise_multiplier, dp_sgd.steps
            tan["eta"] = eta(q, sigma, steps)
            tan["total_amount_of_noise"] = total_amount_of_noise(q, sigma, steps)
            tan["epsilon_tan"] = eps_tan(tan["eta"], delta)
        return cls(events=events, delta=delta, accountant=accountant,
                   epsilon_rdp=privacy_spent(events, delta, "rdp").epsilon,
                   epsilon_pld=privacy_spent(events, delta, "pld", pld_discretization=pld_discretization).epsilon,
                   target_epsilon=target_epsilon, pld_discretization=pld_discretization, **tan)

    @property
    def epsilon(self) -> float:
        """Epsilon under the accountant the run was calibrated with: the guarantee."""
        return self.epsilon_rdp if self.accountant == "rdp" else self.epsilon_pld

    def ledger_dict(self) -> dict[str, Any]:
        """The events as `PrivacyLedger.to_dict` writes a ledger (in the order recorded, none merged)."""
        return {"format": LEDGER_FORMAT, "version": LEDGER_VERSION,
                "events": [event.to_dict() for event in self.events]}

    def to_dict(self) -> dict[str, Any]:
        """The statement as the release report's "privacy" section and `Synthesizer.privacy()` give it, in
        that order: target_epsilon, delta, accountant, epsilon_rdp, epsilon_pld, ledger."""
        return {"target_epsilon": self.target_epsilon, "delta": self.delta, "accountant": self.accountant,
                "epsilon_rdp": self.epsilon_rdp, "epsilon_pld": self.epsilon_pld, "ledger": self.ledger_dict()}
