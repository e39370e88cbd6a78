"""TAN (arXiv 2210.03403): formulas, the paper's configurations, the privacy-wall warning, the non-private
simulation rule, constant-TAN transforms and the planner."""

from __future__ import annotations

import math
import warnings

import dp_accounting
import pytest

from tramontane.accounting import (
    RDP_ORDERS,
    SIMULATION_LABEL,
    DpSgdEvent,
    DpSgdSetting,
    SimulatedSetting,
    epochs_for_steps,
    eps_tan,
    epsilon,
    eta,
    eta_for_eps_tan,
    eta_step,
    noise_multiplier_for_batch,
    plan_constant_tan,
    privacy_spent,
    scale_batch_and_noise,
    scale_batch_and_steps,
    simulated_setting,
    tan_report,
    total_amount_of_noise,
)
from tramontane.errors import PrivacyParameterError, TramontaneWarning

IMAGENET_N = 1_281_167

# (N, B, sigma, S, delta, epsilon printed by the paper, our RDP epsilon, our PLD epsilon), q = B / N.
# Measured with dp-accounting 0.6 (RDP orders RDP_ORDERS, PLD discretisation 1e-4). The paper reports RDP
# epsilons (Opacus, Balle et al. conversion); PLD is 6-8% lower and reproduces none of them.
PAPER_CONFIGS = {
    "imagenet_18k_table1": (IMAGENET_N, 32768, 2.5, 18_000, 8e-7, 8.00, 7.97981, 7.48564),
    "imagenet_72k_table4": (IMAGENET_N, 16384, 2.5, 72_000, 8e-7, 7.97, 7.95366, 7.46524),
    "half_imagenet_72k_table6": (640_584, 16384, 2.5, 72_000, 1.6e-6, 17.98, 17.87469, 16.83632),
    "cifar10_table5": (50_000, 4096, 3.0, 2_500, 1e-5, 7.1, 7.09849, 6.57890),
}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_configurations(name) -> None:
    n, b, sigma, steps, delta_, printed, ours_rdp, ours_pld = PAPER_CONFIGS[name]
    event = DpSgdEvent(b / n, sigma, steps)
    rdp_eps = epsilon(event, delta_, "rdp")
    pld_eps = epsilon(event, delta_, "pld")
    assert rdp_eps == pytest.approx(ours_rdp, abs=1e-4)
    assert pld_eps == pytest.approx(ours_pld, abs=1e-3)
    assert pld_eps < 0.95 * printed  # PLD is not what the paper used
    if name == "cifar10_table5":
        assert round(rdp_eps, 1) == printed  # reproduces to the printed accuracy (RDP)
    elif name.startswith("imagenet"):
        # Does NOT reproduce to the printed 2 decimals with q = B/N: 7.98 vs 8.00 and 7.95 vs 7.97.
        assert 0.01 < printed - rdp_eps < 0.03
    else:
        assert 0.10 < printed - rdp_eps < 0.11  # 17.87 vs 17.98: does not reproduce either


def test_imagenet_table1_reproduces_with_sample_rate_one_over_steps_per_epoch() -> None:
    # With q = 1 / floor(N / B) (39 batches per epoch) instead of B / N the RDP epsilon prints as the
    # paper's 8.00 (8.0028), and the 72k setting gives 7.977 (paper 7.97 in Table 4, 8.00 in Table 6).
    # This convention does not explain the other tables (CIFAR-10 would give 7.24, not 7.1).
    assert round(epsilon(DpSgdEvent(1 / (IMAGENET_N // 32768), 2.5, 18_000), 8e-7), 2) == 8.00
    assert epsilon(DpSgdEvent(1 / (IMAGENET_N // 16384), 2.5, 72_000), 8e-7) == pytest.approx(7.977, abs=1e-3)
    assert round(epsilon(DpSgdEvent(1 / (50_000 // 4096), 3.0, 2_500), 1e-5), 1) == 7.2


def test_eps_tan_formula_and_paper_values() -> None:
    # Eq. 4 written out, and the minimiser of the RDP bound S*a*eta_step^2 + log(1/delta)/(a-1) over a > 1.
    for e, d in ((0.13, 8e-7), (0.95, 8e-7), (2.0, 1e-5)):
        assert eps_tan(e, d) == pytest.approx(e * e + 2 * e * math.sqrt(math.log(1 / d)), rel=1e-15)
        a_star = 1 + math.sqrt(math.log(1 / d)) / e
        assert eps_tan(e, d) == pytest.approx(a_star * e * e + math.log(1 / d) / (a_star - 1), rel=1e-12)
        assert eta_for_eps_tan(eps_tan(e, d), d) == pytest.approx(e, rel=1e-12)
    # Fig. 2's pairs (eta, eps_TAN) = (0.13, 1) and (0.95, 8) at delta = 8e-7, to the figure's precision.
    assert eps_tan(0.13, 8e-7) == pytest.approx(1.0, abs=0.01)
    assert eps_tan(0.95, 8e-7) == pytest.approx(8.0, abs=0.03)
    # Table 6 prints eps_TAN 8.26 (1.2M) and 18.06 (0.6M); with q = B/N we get 8.215 and 17.950, i.e. the
    # paper's eta is ~0.5% larger than q sqrt(S/2)/sigma in both rows. Does not reproduce; pinned here.
    assert eps_tan(eta(16384 / IMAGENET_N, 2.5, 72_000), 8e-7) == pytest.approx(8.21508, abs=1e-4)
    assert eps_tan(eta(16384 / 640_584, 2.5, 72_000), 1.6e-6) == pytest.approx(17.95049, abs=1e-4)


def test_eta_definitions() -> None:
    q, sigma, steps = 16384 / IMAGENET_N, 2.5, 72_000
    assert eta(q, sigma, steps) == pytest.approx(math.sqrt(q * q * steps / (2 * sigma * sigma)), rel=1e-14)
    assert total_amount_of_noise(q, sigma, steps) * eta(q, sigma, steps) == pytest.approx(1.0, rel=1e-14)
    assert eta(q, sigma, steps) ** 2 == pytest.approx(steps * eta_step(q, sigma) ** 2, rel=1e-14)
    assert eta_step(q, sigma) == pytest.approx(16384 / IMAGENET_N / (math.sqrt(2) * 2.5), rel=1e-14)
    assert total_amount_of_noise(0.0, 1.0, 10) == math.inf
    with pytest.raises(PrivacyParameterError):
        eta(0.1, 0.0, 10)
    with pytest.raises(PrivacyParameterError):
        eps_tan(-1.0, 1e-5)


def test_epsilon_close_to_eps_tan_above_the_wall_and_far_below() -> None:
    # Fig. 2: at fixed eta, epsilon ~ eps_TAN for sigma >= 2 and surges below.
    steps, delta_, target_eta = 10_000, 1e-6, 0.95
    ratios = {}
    for sigma in (0.5, 1.0, 2.0, 4.0):
        q = target_eta * sigma * math.sqrt(2 / steps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TramontaneWarning)
            report = tan_report(q, sigma, steps, delta_)
        assert report.eta == pytest.approx(target_eta, rel=1e-12)
        ratios[sigma] = report.ratio
    # Measured: 0.940, 1.0007, 1.31, 4.36.
    assert 0.9 < ratios[4.0] < 0.98 and 0.98 < ratios[2.0] < 1.02
    assert 1.2 < ratios[1.0] < 1.4 and ratios[0.5] > 4.0


def test_privacy_wall_warning() -> None:
    with pytest.warns(TramontaneWarning, match=r"privacy wall.*x eps_TAN") as record:
        report = tan_report(0.04, 1.5, 2250, 1e-5)
    assert len(record) == 1 and report.overcharged
    assert report.ratio == pytest.approx(report.epsilon / report.epsilon_tan)
    assert report.epsilon == epsilon(DpSgdEvent(0.04, 1.5, 2250), 1e-5) and report.accountant == "rdp"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = tan_report(32768 / IMAGENET_N, 2.5, 18_000, 8e-7)
    assert not report.overcharged


def test_simulated_setting_keeps_eta_and_is_not_private() -> None:
    reference = DpSgdSetting(IMAGENET_N, 16384, 2.5, 72_000)
    sim = simulated_setting(reference, 128)
    assert sim.private is False and sim.label == SIMULATION_LABEL == "simulation, not private"
    assert sim.noise_multiplier == pytest.approx(2.5 * 128 / 16384, rel=1e-15)  # get_noise_from_bs
    assert sim.steps == reference.steps
    assert eta(128 / IMAGENET_N, sim.noise_multiplier, sim.steps) == pytest.approx(reference.eta, rel=1e-12)
    assert sim.epochs == math.ceil(72_000 * 128 / IMAGENET_N) == 8
    with pytest.raises(TypeError):
        SimulatedSetting(IMAGENET_N, 128, 0.02, 72_000, reference, private=True)  # type: ignore[call-arg]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        report = tan_report(128 / IMAGENET_N, sim.noise_multiplier, sim.steps, 8e-7)
    assert report.epsilon > 1e3  # really not private


def test_epochs_for_steps_and_noise_for_batch() -> None:
    assert epochs_for_steps(18_000, 32768, IMAGENET_N) == 461  # ceil(460.38)
    assert epochs_for_steps(2_500, 4096, 50_000) == 205  # ceil(204.8)
    assert epochs_for_steps(10, 100, 1000) == 1
    assert noise_multiplier_for_batch(512, 4096, 3.0) == 3.0 / 8  # Fig. 5's (512, 3/8) simulation
    with pytest.raises(PrivacyParameterError):
        epochs_for_steps(-1, 10, 100)
    with pytest.raises(PrivacyParameterError):
        noise_multiplier_for_batch(0, 4096, 3.0)


def test_constant_tan_transforms() -> None:
    base = DpSgdSetting(50_000, 256, 1.0, 2_500)
    doubled = scale_batch_and_noise(base, 2)
    assert (doubled.batch_size, doubled.noise_multiplier, doubled.steps) == (512, 2.0, 2_500)
    assert doubled.eta == pytest.approx(base.eta, rel=1e-14)
    # Below the wall, doubling q and sigma together cuts epsilon sharply (paper §3.2).
    assert epsilon(doubled.to_event(), 1e-5) < 0.8 * epsilon(base.to_event(), 1e-5)
    # Above it, halving q and sigma keeps epsilon (and halves compute).
    high = DpSgdSetting(50_000, 2048, 8.0, 2_500)
    halved = scale_batch_and_noise(high, 0.5)
    assert epsilon(halved.to_event(), 1e-5) == pytest.approx(epsilon(high.to_event(), 1e-5), rel=0.05)
    # Doubling q and dividing S by 4 keeps eta and (at sigma >= 2) epsilon.
    ref = DpSgdSetting(IMAGENET_N, 16384, 2.5, 72_000)
    fewer = scale_batch_and_steps(ref, 2)
    assert (fewer.batch_size, fewer.steps) == (32768, 18_000)
    assert fewer.eta == pytest.approx(ref.eta, rel=1e-12)
    assert epsilon(fewer.to_event(), 8e-7) == pytest.approx(epsilon(ref.to_event(), 8e-7), rel=0.01)
    # Table 3 (sigma fixed, reference B = 256 at 72K): constant eta at 9K steps gives B = 724, not 756.
    table3 = scale_batch_and_steps(DpSgdSetting(IMAGENET_N, 256, 2.5, 72_000), math.sqrt(8))
    assert table3.batch_size == 724
    assert table3.eta == pytest.approx(256 * math.sqrt(36_000) / 2.5 / IMAGENET_N, rel=1e-3)


def test_planner_imagenet() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sweet-spot plan must not warn
        plan = plan_constant_tan(IMAGENET_N, 8.0, 8e-7, 18_000)
    ref = plan.reference
    assert 2.0 <= ref.noise_multiplier <= 4.0 and plan.accountant == "rdp"
    oracle = dp_accounting.rdp.RdpAccountant()
    oracle.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        ref.batch_size / IMAGENET_N, dp_accounting.GaussianDpEvent(ref.noise_multiplier)), 18_000))
    assert plan.epsilon <= 8.0 and oracle.get_epsilon(8e-7) == pytest.approx(plan.epsilon, abs=1e-6)
    assert plan.epsilon >= 8.0 * (1 - 1e-4)
    assert plan.epsilon_tan == pytest.approx(eps_tan(ref.eta, 8e-7))
    sim = plan.simulated
    assert sim is not None and sim.private is False and sim.batch_size == 128
    assert eta(128 / IMAGENET_N, sim.noise_multiplier, 18_000) == pytest.approx(ref.eta, rel=1e-12)


def test_planner_with_reference_batch_recovers_paper_sigma() -> None:
    plan = plan_constant_tan(IMAGENET_N, 8.0, 8e-7, 18_000, batch_size_ref=32768, simulated_batch_size=256)
    # sigma = 2.5 gives 7.98 (see test_paper_configurations), so the exact calibration lands just below 2.5.
    assert plan.reference.batch_size == 32768
    assert 2.49 < plan.reference.noise_multiplier < 2.5
    assert privacy_spent(plan.reference.to_event(), 8e-7).epsilon == plan.epsilon
    assert plan.simulated is not None and plan.simulated.batch_size == 256


def test_planner_warns_behind_the_wall_and_refuses_impossible_plans() -> None:
    with pytest.warns(TramontaneWarning, match="privacy wall"):
        plan = plan_constant_tan(50_000, 8.0, 1e-5, 2_500, batch_size_ref=256)
    assert plan.reference.noise_multiplier < 2.0 and plan.epsilon <= 8.0
    with pytest.raises(PrivacyParameterError, match=r"raise the target epsilon \(--epsilon"):
        plan_constant_tan(100, 0.01, 1e-5, 100_000)
    with pytest.raises(PrivacyParameterError):
        plan_constant_tan(1000, 8.0, 1e-5, 100, batch_size_ref=2000)
    no_simulation = plan_constant_tan(50_000, 8.0, 1e-5, 2_500, batch_size_ref=4096,
                                      simulated_batch_size=None)
    assert no_simulation.simulated is None


def test_report_to_dict_holds_the_accounted_and_closed_form_values() -> None:
    q, sigma, steps, delta = 0.04, 1.5, 2250, 1e-5
    with pytest.warns(TramontaneWarning):
        d = tan_report(q, sigma, steps, delta).to_dict()
    assert list(d) == ["epsilon", "delta", "accountant", "sample_rate", "noise_multiplier", "steps", "eta",
                       "total_amount_of_noise", "epsilon_tan", "epsilon_over_epsilon_tan", "overcharged"]
    oracle = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    oracle.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(sigma)), steps))
    closed_eta = q * math.sqrt(steps / 2) / sigma  # Definition 3.1
    closed_eps_tan = closed_eta**2 + 2 * closed_eta * math.sqrt(math.log(1 / delta))  # Eq. 4
    assert d["epsilon"] == pytest.approx(oracle.get_epsilon(delta), rel=1e-9)
    assert (d["delta"], d["accountant"], d["sample_rate"], d["noise_multiplier"], d["steps"]) == \
        (delta, "rdp", q, sigma, steps)
    assert d["eta"] == pytest.approx(closed_eta) and d["total_amount_of_noise"] == pytest.approx(1 / closed_eta)
    assert d["epsilon_tan"] == pytest.approx(closed_eps_tan)
    assert d["epsilon_over_epsilon_tan"] == pytest.approx(d["epsilon"] / closed_eps_tan)
    assert d["overcharged"] is True
    nothing = tan_report(0.0, sigma, steps, delta).to_dict()  # nothing spent: 0 / 0 is no ratio
    assert nothing["epsilon"] == 0.0 and nothing["epsilon_over_epsilon_tan"] is None
    assert nothing["overcharged"] is False and nothing["total_amount_of_noise"] == math.inf


def test_plan_to_dict_names_the_private_run_and_the_simulation() -> None:
    n, delta, steps = 50_000, 1e-5, 2_500
    plan = plan_constant_tan(n, 8.0, delta, steps, batch_size_ref=4096, simulated_batch_size=128)
    d = plan.to_dict()
    run, sim = d["private_run"], d["simulation"]
    assert list(d) == ["private_run", "simulation"]
    assert list(run) == ["batch_size", "noise_multiplier", "steps", "sample_rate", "epochs", "epsilon", "delta",
                         "accountant", "eta", "epsilon_tan"]
    sigma = run["noise_multiplier"]
    oracle = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    oracle.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        4096 / n, dp_accounting.GaussianDpEvent(sigma)), steps))
    assert run["epsilon"] == pytest.approx(oracle.get_epsilon(delta), rel=1e-9) and run["epsilon"] <= 8.0
    assert (run["batch_size"], run["steps"], run["sample_rate"], run["delta"], run["accountant"]) == \
        (4096, steps, 4096 / n, delta, "rdp")
    assert run["epochs"] == math.ceil(steps * 4096 / n)
    assert run["eta"] == pytest.approx(4096 / n * math.sqrt(steps / 2) / sigma)
    assert run["epsilon_tan"] == pytest.approx(run["eta"]**2 + 2 * run["eta"] * math.sqrt(math.log(1 / delta)))
    assert sim == {"batch_size": 128, "noise_multiplier": pytest.approx(sigma * 128 / 4096), "steps": steps,
                   "epochs": math.ceil(steps * 128 / n), "private": False, "label": SIMULATION_LABEL}
    no_simulation = plan_constant_tan(n, 8.0, delta, steps, batch_size_ref=4096, simulated_batch_size=None)
    assert list(no_simulation.to_dict()) == ["private_run"]
