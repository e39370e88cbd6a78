"""The constant-TAN search's parts (`training.search`): the grid, the plan per step count, the ranking, the
not-private labels, the JSON, and the trials' execution in this process and in worker processes.

The task used here is a formula, not a training run: its best learning rate is a known function of the noise
on the averaged gradient sigma / B, so the search can be checked against the best learning rate at the
private run's sigma_ref / B_ref computed by hand (the real-task comparison is tests/integration).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import pickle

import pytest

from tramontane import accounting
from tramontane.errors import ConfigError, PrivacyParameterError
from tramontane.training.search import (
    NOT_PRIVATE_NOTE,
    SearchConfig,
    StepPlan,
    Trial,
    TrialConfig,
    default_simulated_batch,
    expand_grid,
    plan_search,
    rank_trials,
    recommend,
    search_constant_tan,
)

N, EPSILON, DELTA = 50_000, 4.0, 1e-5
B_REF, B_SIM = 8192, 128
LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
CALLS: list[TrialConfig] = []


def formula_task(trial: TrialConfig) -> float:
    """A loss whose best learning rate is 5e-4 * B / sigma (more noise per averaged gradient: a smaller
    step), and which more steps lower a little."""
    CALLS.append(trial)
    best = 5e-4 * trial.batch_size / trial.noise_multiplier
    return math.log(trial.lr / best) ** 2 + 1.0 / trial.steps


def diverging_task(trial: TrialConfig) -> float:
    return math.nan if trial.lr > 0.5 else formula_task(trial)


def failing_task(trial: TrialConfig) -> float:
    raise RuntimeError("the task broke")


def _config(**overrides) -> SearchConfig:
    params = {"target_epsilon": EPSILON, "delta": DELTA, "dataset_size": N, "learning_rates": LRS,
              "steps": (500,), "reference_batch_size": B_REF, "simulated_batch_size": B_SIM}
    return SearchConfig(**{**params, **overrides})


# -- the grid ----------------------------------------------------------------------------------------------

def test_grid_is_every_pair_steps_major_and_sorted() -> None:
    grid = expand_grid([0.3, 0.01, 0.1], [200, 50])
    assert [(p.lr, p.steps) for p in grid] == [(lr, s) for s, lr in itertools.product([50, 200], [0.01, 0.1, 0.3])]
    assert len(expand_grid(LRS, (10, 20, 30))) == len(LRS) * 3


@pytest.mark.parametrize(("lrs", "steps", "match"), [
    ([], [10], "at least one"), ([0.1], [], "at least one"),
    ([0.0], [10], "learning rates"), ([-1.0], [10], "learning rates"), ([math.nan], [10], "learning rates"),
    ([math.inf], [10], "learning rates"), ([True], [10], "learning rates"), (["0.1"], [10], "learning rates"),
    ([0.1], [0], "step counts"), ([0.1], [2.5], "step counts"), ([0.1], [True], "step counts"),
    ([0.1, 0.2, 0.1], [10], "learning rate 0.1 is in the grid more than once"),
    ([1e-3, 0.001], [10], "more than once"), ([0.1], [10, 10], "step count 10 is in the grid more than once"),
])
def test_grid_refuses_bad_axes(lrs, steps, match) -> None:
    with pytest.raises(ConfigError, match=match):
        expand_grid(lrs, steps)


def test_default_simulated_batch() -> None:
    assert default_simulated_batch(1_000_000, 16384) == 128  # the paper's
    assert default_simulated_batch(1000, 500) == 62  # N / 16 on a small data set
    assert default_simulated_batch(100_000, 64) == 64  # never above the reference batch
    assert default_simulated_batch(10, 5) == 1


@pytest.mark.parametrize(("overrides", "match"), [
    ({"simulated_batch_size": B_REF + 1}, "above the reference batch"),
    ({"reference_batch_size": N + 1}, "exceeds dataset_size"),
    ({"repeats": 0}, "repeats"), ({"workers": 0}, "workers"), ({"mode": "lowest"}, "mode"),
    ({"backend": "dask"}, "backend"), ({"seed": -1}, "seed"), ({"threads_per_worker": 0}, "threads"),
    ({"learning_rates": ()}, "at least one"), ({"accountant": "gdp"}, "accountant"),
])
def test_config_refuses_bad_settings(overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        _config(**overrides)


def test_config_refuses_bad_privacy_targets() -> None:
    with pytest.raises(PrivacyParameterError, match="target_epsilon"):
        _config(target_epsilon=0.0)
    with pytest.raises(PrivacyParameterError, match="delta"):
        _config(delta=1.5)
    with pytest.raises(PrivacyParameterError, match="dataset_size"):
        _config(dataset_size=0)


# -- planning ----------------------------------------------------------------------------------------------

def test_each_step_count_gets_its_calibrated_run_and_a_simulation_at_its_eta() -> None:
    plans = plan_search(_config(reference_batch_size=None, simulated_batch_size=None, steps=(250, 1000, 4000)))
    assert sorted(plans) == [250, 1000, 4000]
    for steps, plan in plans.items():
        ref, sim = plan.reference, plan.simulated
        # The TAN rule's batch at sigma ~ 3, computed here from eps_TAN directly (eta = sqrt(L + eps) - sqrt(L)).
        log_inv_delta = math.log(1 / DELTA)
        eta = math.sqrt(log_inv_delta + EPSILON) - math.sqrt(log_inv_delta)
        assert ref.batch_size == round(eta * 3.0 * math.sqrt(2 / steps) * N)
        spent = accounting.epsilon(accounting.DpSgdEvent(ref.batch_size / N, ref.noise_multiplier, steps), DELTA)
        assert spent <= EPSILON * (1 + 1e-9) and plan.epsilon == pytest.approx(spent, rel=1e-6)
        assert sim.batch_size == 128 and sim.steps == steps and sim.private is False
        assert sim.noise_multiplier / sim.batch_size == pytest.approx(ref.noise_multiplier / ref.batch_size,
                                                                      rel=1e-12)
        assert accounting.eta(sim.batch_size / N, sim.noise_multiplier, steps) == pytest.approx(ref.eta, rel=1e-12)
    # B ~ 1 / sqrt(S) at fixed sigma (paper section 4.3): four times the steps, half the batch.
    assert plans[1000].reference.batch_size == pytest.approx(plans[250].reference.batch_size / 2, abs=1)


def test_a_simulation_above_some_reference_batch_is_refused() -> None:
    # At epsilon 1 the TAN rule's batch is about 970 for 1,000 steps, but about 150 < 256 for 40,000 steps.
    with pytest.raises(ConfigError, match="above the private run's batch"):
        plan_search(_config(target_epsilon=1.0, reference_batch_size=None, simulated_batch_size=256,
                            steps=(1000, 40_000)))


def test_an_unscaled_simulation_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounting.tan, "noise_multiplier_for_batch", lambda b, b_ref, sigma_ref: sigma_ref)
    with pytest.raises(AssertionError, match="eta"):
        plan_search(_config())


# -- labels, ranking, recommendation -----------------------------------------------------------------------

def _trial(lr: float, steps: int, metrics: tuple[float, ...]) -> Trial:
    return Trial(lr=lr, steps=steps, batch_size=128, noise_multiplier=0.1, reference_batch_size=4096,
                 reference_noise_multiplier=3.2, seeds=tuple(range(len(metrics))), metrics=metrics, seconds=0.0)


def test_trials_are_never_private() -> None:
    trial = _trial(0.1, 100, (1.0, 3.0))
    assert trial.private is False and trial.label == accounting.SIMULATION_LABEL
    with pytest.raises(TypeError):
        Trial(lr=0.1, steps=100, batch_size=128, noise_multiplier=0.1, reference_batch_size=4096,
              reference_noise_multiplier=3.2, seeds=(0,), metrics=(1.0,), seconds=0.0, private=True)
    assert trial.metric == 2.0
    row = trial.to_dict()
    assert row["private"] is False and row["label"] == "simulation, not private" and row["metric"] == 2.0
    assert "epsilon" not in json.dumps(row)  # a trial carries no privacy claim
    assert _trial(0.1, 100, (1.0, math.nan)).to_dict()["metric"] is None  # diverged: no number, valid JSON


def test_ranking_puts_diverged_last_and_breaks_ties_by_cost() -> None:
    trials = [_trial(0.3, 100, (math.nan,)), _trial(0.1, 200, (1.0,)), _trial(0.1, 100, (1.0,)),
              _trial(0.03, 100, (1.5,)), _trial(0.01, 100, (1.0,))]
    low = rank_trials(trials, "min")
    assert [(t.lr, t.steps) for t in low] == [(0.01, 100), (0.1, 100), (0.1, 200), (0.03, 100), (0.3, 100)]
    high = rank_trials(trials, "max")
    assert [(t.lr, t.steps) for t in high][:2] == [(0.03, 100), (0.01, 100)] and high[-1].lr == 0.3


def test_no_recommendation_when_every_trial_diverged() -> None:
    config = _config()
    plans = plan_search(config)
    with pytest.raises(ConfigError, match="diverged"):
        recommend([_trial(0.1, 500, (math.nan,)), _trial(0.3, 500, (math.inf,))], plans, config)


# -- the search --------------------------------------------------------------------------------------------

def _best_lr_at(batch: int, sigma: float) -> float:
    best = 5e-4 * batch / sigma
    return min(LRS, key=lambda lr: math.log(lr / best) ** 2)


def test_search_recommends_the_private_runs_best_and_writes_labelled_json(tmp_path) -> None:
    CALLS.clear()
    out = tmp_path / "search.json"
    seen: list[tuple[int, int, dict]] = []

    def progress(trial: Trial, done: int, total: int) -> None:
        seen.append((done, total, json.loads(out.read_text()) if out.exists() else {}))

    config = _config(steps=(250, 1000), repeats=3, seed=7)
    result = search_constant_tan(formula_task, config, out=out, on_trial=progress)
    plans = plan_search(config)
    # What the private runs prefer, by hand: the formula at (B_ref, sigma_ref), plus the steps' term.
    by_hand = min(((lr, s) for s in (250, 1000) for lr in LRS),
                  key=lambda p: math.log(p[0] / (5e-4 * B_REF / plans[p[1]].reference.noise_multiplier)) ** 2
                  + 1 / p[1])
    rec = result.recommendation
    assert (rec.lr, rec.steps) == by_hand
    assert rec.batch_size == B_REF and rec.noise_multiplier == plans[rec.steps].reference.noise_multiplier
    assert rec.epsilon <= EPSILON * (1 + 1e-9)
    # The search does not merely find the best lr of some noise: without scaling it would choose otherwise.
    assert _best_lr_at(B_SIM, plans[rec.steps].reference.noise_multiplier) != rec.lr
    # Every call ran at the simulation's setting; all grid points saw the same seeds, one per repeat.
    assert len(CALLS) == len(LRS) * 2 * 3
    for call in CALLS:
        sim = plans[call.steps].simulated
        assert (call.batch_size, call.noise_multiplier, call.dataset_size) == (B_SIM, sim.noise_multiplier, N)
    seeds = {(c.lr, c.steps): [] for c in CALLS}
    for c in CALLS:
        seeds[(c.lr, c.steps)].append(c.seed)
    assert len({tuple(s) for s in seeds.values()}) == 1 and len(set(next(iter(seeds.values())))) == 3
    # Progress: one call per grid point; the file is rewritten, incomplete, until the end.
    assert [(d, t) for d, t, _ in seen] == [(i, 12) for i in range(1, 13)]
    assert seen[1][2]["complete"] is False and len(seen[1][2]["trials"]) == 1
    written = json.loads(out.read_text())
    assert written["format"] == "tramontane.tan_search" and written["complete"] is True
    assert written["private"] is False and written["note"] == NOT_PRIVATE_NOTE
    assert [(t["lr"], t["steps"]) for t in written["trials"]] == [(t.lr, t.steps) for t in result.trials]
    assert all(t["private"] is False for t in written["trials"])
    assert written["recommendation"]["private"] is True and written["recommendation"]["lr"] == rec.lr
    assert written["plans"]["250"]["compute_saving"] == B_REF / B_SIM
    assert result.private is False


def test_diverged_trials_rank_last() -> None:
    result = search_constant_tan(diverging_task, _config())
    assert [t.lr for t in result.trials[-2:]] == [1.0, 3.0] and all(math.isnan(t.metric) for t in result.trials[-2:])
    assert result.recommendation.lr < 0.5


def test_a_failing_trial_stops_the_search() -> None:
    with pytest.raises(RuntimeError, match="the task broke"):
        search_constant_tan(failing_task, _config())


def test_worker_processes_give_the_in_process_results() -> None:
    config = _config(learning_rates=(0.03, 0.3), steps=(250, 1000), repeats=2)
    here = search_constant_tan(formula_task, config)
    pooled = search_constant_tan(formula_task, _config(learning_rates=(0.03, 0.3), steps=(250, 1000), repeats=2,
                                                       workers=2, threads_per_worker=1))
    assert [(t.lr, t.steps, t.metrics, t.seeds) for t in pooled.trials] == \
        [(t.lr, t.steps, t.metrics, t.seeds) for t in here.trials]
    assert pooled.recommendation == here.recommendation


def test_worker_processes_need_a_picklable_task() -> None:
    with pytest.raises(ConfigError, match="module-level"):
        search_constant_tan(lambda trial: 0.0, _config(workers=2))
    pickle.dumps(formula_task)


@pytest.mark.slow
def test_ray_tune_gives_the_in_process_results() -> None:
    pytest.importorskip("ray.tune", reason="Ray Tune is an optional backend (pip install 'ray[tune]')")
    config = {"learning_rates": (0.03, 0.3), "steps": (250, 1000), "repeats": 2}
    here = search_constant_tan(formula_task, _config(**config))
    tuned = search_constant_tan(formula_task, _config(**config, backend="ray", workers=2, threads_per_worker=1))
    assert [(t.lr, t.steps, t.metrics, t.seeds) for t in tuned.trials] == \
        [(t.lr, t.steps, t.metrics, t.seeds) for t in here.trials]
    assert tuned.recommendation == here.recommendation


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed")
def test_ray_backend_without_ray_says_how_to_install() -> None:
    with pytest.raises(ConfigError, match=r"pip install 'ray\[tune\]'"):
        search_constant_tan(formula_task, _config(backend="ray"))


def test_step_plan_type_is_exported() -> None:
    assert StepPlan.__dataclass_fields__.keys() >= {"reference", "simulated", "epsilon"}
