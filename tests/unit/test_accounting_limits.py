"""Where accounting meets its limits: huge step counts, nothing spent, and errors a command-line user can act on.

The pld accountant self-composes large counts by repeated squaring and refuses compositions above
`PLD_MAX_POINTS` grid points (naming the rdp accountant) instead of running for minutes; nothing here may
report a smaller epsilon than dp-accounting's own PLD accountant.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import warnings

import dp_accounting
import pytest

from tramontane import accounting
from tramontane.accounting import (
    PLD_MAX_POINTS,
    DpSgdEvent,
    GaussianEvent,
    PldTooLargeError,
    PrivacyLedger,
    calibrate_noise_multiplier,
    epsilon,
    pld_points,
    tan_report,
)
from tramontane.accounting import accountants as accountants_module
from tramontane.audit.bounds import PrivacyProfile
from tramontane.audit.card import bound_curves, ledger_bounds
from tramontane.errors import PrivacyParameterError, TramontaneWarning

logging.getLogger("absl").setLevel(logging.ERROR)


def _oracle_pld_epsilon(q: float, sigma: float, steps: int, delta_: float) -> float:
    oracle = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    oracle.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return oracle.get_epsilon(delta_)


# --- item 1: large compositions ------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [300_000, 2**19 - 1])  # > 2^18: squared here, one shot in dp-accounting
def test_squaring_beyond_one_shot_is_never_below_dp_accounting(steps: int) -> None:
    q, sigma = 0.02, 2.0
    ours = epsilon(DpSgdEvent(q, sigma, steps), 1e-5, "pld")
    oracle = _oracle_pld_epsilon(q, sigma, steps, 1e-5)
    # Measured: +4.7e-6 and +1.4e-6 relative (2 extra steps, 1 extra step).
    assert oracle < ours <= oracle * (1 + 2e-5)
    assert ours < epsilon(DpSgdEvent(q, sigma, steps), 1e-5, "rdp")  # still tighter than RDP


def test_many_steps_at_large_noise_do_not_hang() -> None:
    # dp-accounting's one-shot self_compose computes size**steps as a Python integer for sparse one-step
    # PLDs: 64 s at these settings. Run in a subprocess so that a regression fails instead of hanging.
    code = ("from tramontane.accounting import DpSgdEvent, epsilon; "
            "print(epsilon(DpSgdEvent(0.01, 20.0, 10**7), 1e-5, 'pld'))")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=40)
    assert out.returncode == 0, out.stderr
    eps = float(out.stdout)
    # dp-accounting's one-shot value (measured, 64 s) is 7.547171; RDP gives 8.0857.
    assert 7.547171 < eps < 7.547171 * (1 + 2e-5)
    assert eps < epsilon(DpSgdEvent(0.01, 20.0, 10**7), 1e-5, "rdp")


def test_oversize_pld_is_refused_before_any_work_naming_the_rdp_accountant() -> None:
    huge = DpSgdEvent(0.01, 1.0, 10**9)
    assert pld_points(huge) > PLD_MAX_POINTS > pld_points(DpSgdEvent(0.01, 1.0, 10**6))
    for compute in (lambda: epsilon(huge, 1e-5, "pld"), lambda: accounting.delta(huge, 1.0, "pld"),
                    lambda: PrivacyProfile(huge), lambda: bound_curves(0.01, 1.0, 10**10, 1e-5)):
        with pytest.raises(PldTooLargeError, match=r"--accountant rdp") as info:
            compute()
        assert "1e+07" in str(info.value) and isinstance(info.value, PrivacyParameterError)
    with pytest.raises(PldTooLargeError, match=r"RDP epsilon at delta=1e-05 is 9\d{4}"):
        ledger_bounds(PrivacyLedger([huge]), 1e-5)
    assert epsilon(huge, 1e-5, "rdp") > 1e4  # the alternative answers


def test_pld_calibration_treats_oversize_noise_levels_as_infeasible(monkeypatch) -> None:
    # With a tiny cap, the walk down from RDP's sigma meets refused (small) sigmas: they count as missing
    # the target, so the answer is still a sigma whose accounted epsilon is <= target.
    uncapped = calibrate_noise_multiplier(1.0, 1e-5, 0.01, 2000, "pld")
    floor = uncapped.noise_multiplier * 0.95
    monkeypatch.setattr(accountants_module, "PLD_MAX_POINTS", pld_points(DpSgdEvent(0.01, floor, 2000)))
    with pytest.raises(PldTooLargeError):
        epsilon(DpSgdEvent(0.01, floor * 0.99, 2000), 1e-5, "pld")
    cal = calibrate_noise_multiplier(1.0, 1e-5, 0.01, 2000, "pld")
    assert 1.0 * (1 - 1e-4) <= cal.epsilon <= 1.0
    assert cal.noise_multiplier == pytest.approx(uncapped.noise_multiplier, rel=1e-3)
    assert epsilon(DpSgdEvent(0.01, cal.noise_multiplier, 2000), 1e-5, "pld") == cal.epsilon


def test_tradeoff_curve_survives_epsilons_beyond_exp_overflow() -> None:
    # A single Gaussian release at sigma 0.02 has epsilon(1e-12) ~ 1600: e^eps overflowed in tpr_bound.
    profile = PrivacyProfile(GaussianEvent(0.02), pld_discretization=1e-2)
    assert profile.epsilon_grid().max() > 710
    tpr = float(profile.tpr_bound(1e-3))
    assert 1e-3 <= tpr <= 1.0 and tpr > 0.99


# --- item 2: nothing spent -----------------------------------------------------------------------------


@pytest.mark.parametrize("q, steps", [(0.0, 100), (0.01, 0)])
def test_nothing_spent_is_not_overcharged_and_does_not_warn(q: float, steps: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", TramontaneWarning)
        report = tan_report(q, 1.0, steps, 1e-5)
    assert report.epsilon == 0.0 and report.overcharged is False and report.ratio is None
    with pytest.warns(TramontaneWarning, match="privacy wall"):  # something spent: still warned
        assert tan_report(0.01, 1.0, 1, 1e-5).overcharged


# --- items 3 and 4: messages name what the user can change -------------------------------------------


def test_check_functions_name_the_option_they_are_given() -> None:
    from tramontane.accounting import events

    cases = [(events.check_sample_rate, math.nan, "--sample-rate"),
             (events.check_noise_multiplier, math.inf, "--noise-multiplier"),
             (events.check_delta, -1.0, "--delta"),
             (events.check_count, -3, "--steps")]
    for check, value, option in cases:
        with pytest.raises(PrivacyParameterError, match=f"^{option} must"):
            check(value, option)
    with pytest.raises(PrivacyParameterError, match="must be finite and positive, got inf"):
        events.check_epsilon(math.inf, "--epsilon", positive=True)
    with pytest.raises(PrivacyParameterError, match="must be finite and positive, got 0"):
        events.check_epsilon(0.0, "--epsilon", positive=True)
    assert events.check_epsilon(0.0) == 0.0  # epsilon 0 stays valid where positive is not asked


def test_hints_name_command_line_options() -> None:
    with pytest.raises(PrivacyParameterError, match=r"tramontane account --epsilon"):
        DpSgdEvent(0.1, 0.0, 10)
    with pytest.raises(PrivacyParameterError, match=r"\(--epsilon, target_epsilon\).*--delta.*--sample-rate"):
        calibrate_noise_multiplier(0.5, 1e-5, 0.5, 10_000, sigma_max=5.0)
    with pytest.raises(PrivacyParameterError, match=r"--accountant pld"):
        calibrate_noise_multiplier(1e-3, 1e-5, 0.01, 1000)
    with pytest.raises(PrivacyParameterError, match=r"--sample-rate and --steps"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.0, 100)
