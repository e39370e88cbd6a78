"""Privacy accounting: events, an append-only ledger, accountants, noise calibration and TAN.

Imports no torch (dp-accounting and numpy only), so checkpoints, reports and the CLI can account without
a GPU stack. `events` records what was released, `accountants` turns it into (epsilon, delta) on top of
dp-accounting (RDP by default, PLD on request) and calibrates noise, `gaussian` calibrates one Gaussian
release exactly (the analytic Gaussian mechanism), `statement` holds what a run's ledger amounts to under
both accountants (`PrivacyStatement`: computed once, read by the CLI, the reports and the card), `tan`
implements Sander, Stock and
Sablayrolles, "TAN without a burn: scaling laws of DP-SGD" (arXiv 2210.03403).
"""

from tramontane.accounting.accountants import (
    ACCOUNTANTS,
    DEFAULT_PLD_DISCRETIZATION,
    PLD_MAX_POINTS,
    RDP_ORDERS,
    Accountant,
    LedgerLike,
    Mechanism,
    NoiseCalibration,
    PldTooLargeError,
    PrivacySpent,
    calibrate_noise_multiplier,
    check_pld_size,
    delta,
    epsilon,
    ledger_events,
    pld_of,
    pld_points,
    pld_self_compose,
    privacy_spent,
    rdp_curve,
)
from tramontane.accounting.budget import max_steps_within_budget
from tramontane.accounting.events import (
    LEDGER_FORMAT,
    LEDGER_VERSION,
    DpSgdEvent,
    EpsilonDeltaEvent,
    ExponentialMechanismEvent,
    GaussianEvent,
    PrivacyEvent,
    PrivacyLedger,
    event_from_dict,
)
from tramontane.accounting.gaussian import analytic_gaussian_sigma, gaussian_delta
from tramontane.accounting.statement import PrivacyStatement
from tramontane.accounting.tan import (
    PRIVACY_WALL_SIGMA,
    SIMULATION_LABEL,
    SWEET_SPOT_SIGMA,
    DpSgdSetting,
    SimulatedSetting,
    TanPlan,
    TanReport,
    epochs_for_steps,
    eps_tan,
    eta,
    eta_for_eps_tan,
    eta_step,
    noise_multiplier_for_batch,
    plan_constant_tan,
    scale_batch_and_noise,
    scale_batch_and_steps,
    simulated_setting,
    tan_batch_size,
    tan_report,
    total_amount_of_noise,
)

__all__ = [
    "ACCOUNTANTS", "DEFAULT_PLD_DISCRETIZATION", "LEDGER_FORMAT", "LEDGER_VERSION", "PLD_MAX_POINTS",
    "PRIVACY_WALL_SIGMA", "RDP_ORDERS", "SIMULATION_LABEL", "SWEET_SPOT_SIGMA",
    "Accountant", "DpSgdEvent", "DpSgdSetting", "EpsilonDeltaEvent", "ExponentialMechanismEvent", "GaussianEvent", "LedgerLike", "Mechanism",
    "NoiseCalibration", "PldTooLargeError", "PrivacyEvent", "PrivacyLedger", "PrivacySpent", "PrivacyStatement",
    "SimulatedSetting",
    "TanPlan", "TanReport",
    "analytic_gaussian_sigma", "calibrate_noise_multiplier", "check_pld_size", "delta", "epochs_for_steps", "eps_tan", "epsilon", "eta", "eta_for_eps_tan",
    "eta_step", "event_from_dict", "gaussian_delta", "ledger_events", "max_steps_within_budget", "noise_multiplier_for_batch",
    "plan_constant_tan", "pld_of", "pld_points", "pld_self_compose", "privacy_spent",
    "rdp_curve", "scale_batch_and_noise", "scale_batch_and_steps", "simulated_setting", "tan_batch_size", "tan_report",
    "total_amount_of_noise",
]
