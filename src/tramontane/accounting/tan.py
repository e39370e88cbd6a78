"""TAN: the Total Amount of Noise of DP-SGD, its scaling rules, and a constant-TAN planner.

Sander, Stock and Sablayrolles, "TAN without a burn: scaling laws of DP-SGD", ICML 2023, arXiv 2210.03403.
For Poisson sampling rate q, noise multiplier sigma and S steps (Definition 3.1):

    eta^2 = q^2 S / (2 sigma^2),   TAN = 1 / eta,   eta_step = q / (sqrt(2) sigma),   eta^2 = S eta_step^2.

When sigma is not too small (about sigma >= 2) the per-step RDP is close to alpha * eta_step^2, so epsilon
depends on (q, sigma, S) almost only through eta and is close to the closed form (Eq. 4)

    eps_TAN(eta, delta) = eta^2 + 2 eta sqrt(log(1 / delta)).

eps_TAN is a heuristic, never a guarantee: every epsilon this module reports comes from an accountant
(`tramontane.accounting.accountants`). Below sigma = 2 ("privacy wall") epsilon grows far above eps_TAN
and we warn.

The simulation recipe (§3.4): at fixed S, sigma / B constant keeps eta constant, so a run at a small batch
B with sigma = sigma_ref * B / B_ref sees the same noise on the averaged gradient as the reference run at
B_ref. Such a run is NOT private (its sigma is far behind the privacy wall); it only serves to choose
non-privacy hyper-parameters before one private run at (B_ref, sigma_ref, S).

Batch sizes here are expected batch sizes under Poisson sampling: q = batch_size / dataset_size.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

from tramontane.accounting.accountants import Accountant, calibrate_noise_multiplier, epsilon
from tramontane.accounting.events import (
    DpSgdEvent,
    check_count,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sample_rate,
)
from tramontane.errors import PrivacyParameterError, TramontaneWarning

logger = logging.getLogger(__name__)

PRIVACY_WALL_SIGMA = 2.0  # below this, epsilon is far above eps_TAN (paper Fig. 2)
SWEET_SPOT_SIGMA = (2.0, 4.0)  # paper §3.2: cheapest noise levels that are not overcharged
SIMULATION_LABEL = "simulation, not private"


def eta(sample_rate: float, noise_multiplier: float, steps: int) -> float:
    """Individual signal-to-noise ratio eta = q * sqrt(S / 2) / sigma (Definition 3.1)."""
    q = check_sample_rate(sample_rate)
    sigma = check_noise_multiplier(noise_multiplier)
    return q * math.sqrt(check_count(steps, "steps") / 2) / sigma


def total_amount_of_noise(sample_rate: float, noise_multiplier: float, steps: int) -> float:
    """TAN = 1 / eta = sqrt(2) sigma / (q sqrt(S)); infinite when q or S is 0."""
    e = eta(sample_rate, noise_multiplier, steps)
    return math.inf if e == 0.0 else 1.0 / e


def eta_step(sample_rate: float, noise_multiplier: float) -> float:
    """Per-step signal-to-noise ratio q / (sqrt(2) sigma); eta^2 = S * eta_step^2."""
    return check_sample_rate(sample_rate) / (math.sqrt(2) * check_noise_multiplier(noise_multiplier))


def eps_tan(eta: float, delta: float) -> float:
    """eps_TAN = eta^2 + 2 eta sqrt(log(1/delta)) (Eq. 4); a heuristic, not an accounted epsilon."""
    if not (eta >= 0.0 and math.isfinite(eta)):
        raise PrivacyParameterError(f"eta must be a finite number >= 0, got {eta}")
    return eta**2 + 2 * eta * math.sqrt(math.log(1 / check_delta(delta)))


def eta_for_eps_tan(target_epsilon: float, delta: float) -> float:
    """Inverse of `eps_tan` in eta: sqrt(L + eps) - sqrt(L) with L = log(1/delta)."""
    log_inv_delta = math.log(1 / check_delta(delta))
    return math.sqrt(log_inv_delta + check_epsilon(target_epsilon)) - math.sqrt(log_inv_delta)


def tan_batch_size(dataset_size: int, target_epsilon: float, delta: float, steps: int,
                   noise_multiplier: float) -> float:
    """The TAN batch rule (§3.2): the expected batch size B = eta * sigma * sqrt(2 / S) * N at which S steps
    at noise multiplier sigma have eps_TAN = `target_epsilon` (eta from `eta_for_eps_tan`).

    Not rounded, not capped: the caller decides how (`plan_constant_tan` rounds to the nearest batch and
    caps at N; the synthesizer refuses batches too small to learn from, caps and rounds down). eps_TAN is a
    heuristic: calibrate sigma with an accountant at the batch finally chosen.
    """
    n = _check_batch(dataset_size, "dataset_size")
    sigma = check_noise_multiplier(noise_multiplier)
    steps = _check_batch(steps, "steps")
    return eta_for_eps_tan(target_epsilon, delta) * sigma * math.sqrt(2 / steps) * n


def noise_multiplier_for_batch(batch_size: int, batch_size_ref: int, noise_multiplier_ref: float) -> float:
    """sigma = sigma_ref * B / B_ref: keeps eta constant at fixed steps (TAN's `get_noise_from_bs`)."""
    b = _check_batch(batch_size, "batch_size")
    b_ref = _check_batch(batch_size_ref, "batch_size_ref")
    return check_noise_multiplier(noise_multiplier_ref) * b / b_ref


def epochs_for_steps(steps: int, batch_size: int, dataset_size: int) -> int:
    """ceil(S * B / N): epochs to schedule; training must stop on the step count, not on epochs."""
    steps = check_count(steps, "steps")
    batch_size = _check_batch(batch_size, "batch_size")
    return math.ceil(steps * batch_size / _check_batch(dataset_size, "dataset_size"))


def _check_batch(value: int, name: str) -> int:
    return check_count(value, name, minimum=1)


@dataclass(frozen=True)
class DpSgdSetting:
    """A DP-SGD configuration (N, expected batch size B, sigma, S) with its TAN quantities."""

    dataset_size: int
    batch_size: int
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        _check_batch(self.dataset_size, "dataset_size")
        _check_batch(self.batch_size, "batch_size")
        if self.batch_size > self.dataset_size:
            raise PrivacyParameterError(
                f"batch_size={self.batch_size} exceeds dataset_size={self.dataset_size}; sample_rate "
                "would be above 1: use fewer, larger-noise steps or a smaller batch"
            )
        check_noise_multiplier(self.noise_multiplier)
        check_count(self.steps, "steps")

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.dataset_size

    @property
    def eta(self) -> float:
        return eta(self.sample_rate, self.noise_multiplier, self.steps)

    @property
    def total_amount_of_noise(self) -> float:
        return total_amount_of_noise(self.sample_rate, self.noise_multiplier, self.steps)

    @property
    def epochs(self) -> int:
        return epochs_for_steps(self.steps, self.batch_size, self.dataset_size)

    def to_event(self, label: str = "dp-sgd") -> DpSgdEvent:
        return DpSgdEvent(self.sample_rate, self.noise_multiplier, self.steps, label)


def scale_batch_and_noise(setting: DpSgdSetting, factor: float) -> DpSgdSetting:
    """(q, sigma) -> (k q, k sigma) at fixed S: eta unchanged. B is rounded, then sigma = sigma * B' / B."""
    batch = max(1, round(setting.batch_size * factor))
    return DpSgdSetting(setting.dataset_size, batch,
                        noise_multiplier_for_batch(batch, setting.batch_size, setting.noise_multiplier),
                        setting.steps)


def scale_batch_and_steps(setting: DpSgdSetting, factor: float) -> DpSgdSetting:
    """(q, S) -> (k q, S / k^2) at fixed sigma: eta unchanged up to rounding B and S (scale lr by 1/S)."""
    batch = max(1, round(setting.batch_size * factor))
    steps = round(setting.steps * (setting.batch_size / batch) ** 2)
    return DpSgdSetting(setting.dataset_size, batch, setting.noise_multiplier, steps)


@dataclass(frozen=True)
class SimulatedSetting:
    """A small-batch run at the reference's eta, for hyper-parameter search only. NOT PRIVATE."""

    dataset_size: int
    batch_size: int
    noise_multiplier: float
    steps: int
    reference: DpSgdSetting
    private: Literal[False] = field(default=False, init=False)
    label: str = field(default=SIMULATION_LABEL, init=False)

    def __post_init__(self) -> None:
        assert self.private is False

    @property
    def epochs(self) -> int:
        return epochs_for_steps(self.steps, self.batch_size, self.dataset_size)


def simulated_setting(reference: DpSgdSetting, batch_size: int) -> SimulatedSetting:
    """The simulation of `reference` at `batch_size`: sigma = sigma_ref * B / B_ref, same steps."""
    _check_batch(batch_size, "batch_size")
    if batch_size > reference.dataset_size:
        raise PrivacyParameterError(f"batch_size={batch_size} exceeds dataset_size={reference.dataset_size}")
    sigma = noise_multiplier_for_batch(batch_size, reference.batch_size, reference.noise_multiplier)
    return SimulatedSetting(reference.dataset_size, batch_size, sigma, reference.steps, reference)


@dataclass(frozen=True)
class TanReport:
    """Accounted epsilon next to eps_TAN; `overcharged` when sigma < 2 (the privacy wall) and something is
    spent. With sample rate 0 or zero steps nothing is spent: epsilon 0, `ratio` None (0 / 0), and sigma
    overcharges nothing."""

    sample_rate: float
    noise_multiplier: float
    steps: int
    delta: float
    eta: float
    eta_step: float
    total_amount_of_noise: float
    epsilon: float
    epsilon_tan: float
    ratio: float | None  # epsilon / eps_TAN; None when nothing is spent
    overcharged: bool
    accountant: str

    def to_dict(self) -> dict[str, float | int | str | bool | None]:
        """The report as `tramontane account` prints it, in that order: the ratio as
        `epsilon_over_epsilon_tan`; `eta_step` left out (it is eta / sqrt(steps))."""
        return {"epsilon": self.epsilon, "delta": self.delta, "accountant": self.accountant,
                "sample_rate": self.sample_rate, "noise_multiplier": self.noise_multiplier, "steps": self.steps,
                "eta": self.eta, "total_amount_of_noise": self.total_amount_of_noise,
                "epsilon_tan": self.epsilon_tan, "epsilon_over_epsilon_tan": self.ratio,
                "overcharged": self.overcharged}


def tan_report(sample_rate: float, noise_multiplier: float, steps: int, delta: float,
               accountant: Accountant = "rdp") -> TanReport:
    """Accounted epsilon, eps_TAN and their ratio; warns (`TramontaneWarning`) when sigma < 2 and something
    is spent (q > 0 and S > 0)."""
    e = eta(sample_rate, noise_multiplier, steps)
    event = DpSgdEvent(sample_rate, noise_multiplier, steps)
    eps = epsilon(event, delta, accountant)
    e_tan = eps_tan(e, delta)
    ratio = None if event.spends_nothing else eps / e_tan
    overcharged = noise_multiplier < PRIVACY_WALL_SIGMA and not event.spends_nothing
    if overcharged and ratio is not None:
        warnings.warn(
            f"noise multiplier {noise_multiplier} < {PRIVACY_WALL_SIGMA} is behind the privacy wall: epsilon "
            f"{eps:.4g} is {ratio:.3g} x eps_TAN {e_tan:.4g}. Doubling batch size and noise together keeps "
            "eta and usually lowers epsilon at little accuracy cost (TAN paper, section 3.2).",
            TramontaneWarning, stacklevel=2,
        )
    return TanReport(sample_rate=float(sample_rate), noise_multiplier=float(noise_multiplier), steps=steps,
                     delta=float(delta), eta=e, eta_step=eta_step(sample_rate, noise_multiplier),
                     total_amount_of_noise=math.inf if e == 0 else 1 / e, epsilon=eps, epsilon_tan=e_tan,
                     ratio=ratio, overcharged=overcharged, accountant=accountant)


@dataclass(frozen=True)
class TanPlan:
    """A private reference run calibrated with an accountant, and its non-private simulation."""

    reference: DpSgdSetting
    epsilon: float  # accounted, <= target_epsilon
    target_epsilon: float
    delta: float
    epsilon_tan: float
    accountant: str
    simulated: SimulatedSetting | None

    def to_dict(self) -> dict[str, dict[str, float | int | str | bool]]:
        """The plan as `tramontane plan` prints it: `private_run` (the reference setting with its accounted
        epsilon), and `simulation` (NOT private) only when there is one."""
        ref = self.reference
        result: dict[str, dict[str, float | int | str | bool]] = {}
        result["private_run"] = {"batch_size": ref.batch_size, "noise_multiplier": ref.noise_multiplier,
                                 "steps": ref.steps, "sample_rate": ref.sample_rate, "epochs": ref.epochs,
                                 "epsilon": self.epsilon, "delta": self.delta, "accountant": self.accountant,
                                 "eta": ref.eta, "epsilon_tan": self.epsilon_tan}
        if self.simulated is not None:
            sim = self.simulated
            result["simulation"] = {"batch_size": sim.batch_size, "noise_multiplier": sim.noise_multiplier,
                                    "steps": sim.steps, "epochs": sim.epochs, "private": sim.private,
                                    "label": sim.label}
        return result


def plan_constant_tan(
    dataset_size: int,
    target_epsilon: float,
    delta: float,
    steps: int,
    *,
    batch_size_ref: int | None = None,
    noise_multiplier_guess: float = 3.0,
    simulated_batch_size: int | None = 128,
    accountant: Accountant = "rdp",
) -> TanPlan:
    """Propose (B_ref, sigma_ref) for S steps at (target_epsilon, delta), and a small-batch simulation.

    Without `batch_size_ref`, B_ref is the TAN rule's batch (`tan_batch_size`: eps_TAN inverted for eta,
    B_ref = eta * sigma * sqrt(2 / S) * N) for sigma = `noise_multiplier_guess` (default 3, the middle of
    the 2..4 sweet spot), rounded to the nearest batch. In either case sigma_ref is then calibrated exactly
    with `accountant` at q = B_ref / N, so the reference run is (target_epsilon, delta)-DP. The simulation uses `simulated_batch_size` (None, or not below B_ref: no
    simulation) and is labelled not private.
    """
    n = _check_batch(dataset_size, "dataset_size")
    target_epsilon = check_epsilon(target_epsilon, "target_epsilon")
    delta = check_delta(delta)
    steps = _check_batch(steps, "steps")
    if batch_size_ref is None:
        guess = check_noise_multiplier(noise_multiplier_guess)
        batch_size_ref = round(tan_batch_size(n, target_epsilon, delta, steps, guess))
        if batch_size_ref < 1:
            raise PrivacyParameterError(
                f"target epsilon {target_epsilon} over {steps} steps needs an expected batch below one "
                f"example of dataset size {n} at noise multiplier {guess}; raise the target epsilon (--epsilon, "
                "target_epsilon) or use fewer steps (--steps)"
            )
        batch_size_ref = min(batch_size_ref, n)
    b_ref = _check_batch(batch_size_ref, "batch_size_ref")
    if b_ref > n:
        raise PrivacyParameterError(f"the reference batch (--reference-batch, batch_size_ref) {b_ref} exceeds "
                                    f"the dataset size {n}")
    calibration = calibrate_noise_multiplier(target_epsilon, delta, b_ref / n, steps, accountant)
    reference = DpSgdSetting(n, b_ref, calibration.noise_multiplier, steps)
    if reference.noise_multiplier < PRIVACY_WALL_SIGMA:
        warnings.warn(
            f"the calibrated noise_multiplier {reference.noise_multiplier:.3g} for batch {b_ref} is below "
            f"{PRIVACY_WALL_SIGMA} (privacy wall); a larger reference batch (--reference-batch, batch_size_ref) "
            "would spend the budget better",
            TramontaneWarning, stacklevel=2,
        )
    simulated = None
    if simulated_batch_size is not None and simulated_batch_size < b_ref:
        simulated = simulated_setting(reference, simulated_batch_size)
    logger.info("constant-TAN plan: B_ref=%d sigma_ref=%.4g S=%d epsilon=%.4g (%s)", b_ref,
                reference.noise_multiplier, steps, calibration.epsilon, accountant)
    return TanPlan(reference=reference, epsilon=calibration.epsilon, target_epsilon=target_epsilon,
                   delta=delta, epsilon_tan=eps_tan(reference.eta, delta), accountant=accountant,
                   simulated=simulated)
