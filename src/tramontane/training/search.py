"""Hyper-parameter search at constant TAN: choose a private run's learning rate and steps from cheap,
NON-PRIVATE simulations at a small batch.

Sander, Stock and Sablayrolles, "TAN without a burn: scaling laws of DP-SGD" (ICML 2023, arXiv 2210.03403),
section 3.4. At a fixed number of steps S, DP-SGD's noise on the averaged gradient is sigma C / B, and the
privacy of the run depends (above the privacy wall, sigma >= 2) almost only on the Total Amount of Noise
TAN = sqrt(2) sigma / (q sqrt(S)), q = B / N. A run at a small batch B_sim with sigma_sim = sigma_ref * B_sim /
B_ref and the same S keeps sigma / B, hence eta = 1 / TAN, equal to the private reference run at (B_ref,
sigma_ref, S): it sees the same noise on every averaged gradient, only fewer clipped gradients are averaged.
The paper's Table 2 finds the same best hyper-parameters at B = 128..1024 as at B = 16384, for B_ref / B_sim
times less compute per trial.

`search_constant_tan(train, config)`:
1. for each step count S of the grid, plans the private run with `accounting.plan_constant_tan`: B_ref (given,
   or the TAN rule's batch at sigma near 3) and sigma_ref calibrated with the accountant so that the S steps
   are (epsilon, delta)-DP; then its simulation at B_sim (`accounting.simulated_setting`), checked to have
   the reference's eta;
2. calls the task's training function `train(TrialConfig) -> metric` at every (learning rate, S) of the grid,
   `repeats` times, in parallel processes (or Ray Tune when asked and installed). Every grid point gets the
   same seeds (common random numbers: the comparison between learning rates is not blurred by the draws);
3. ranks the grid points by their mean metric and recommends the best one as the private run: (B_ref,
   sigma_ref(S), S, lr), with the epsilon the accountant gives it.

Privacy. The trials are NOT differentially private: sigma_sim is far behind the privacy wall, nothing is put
on any ledger, and their metrics, ranking and the chosen learning rate are functions of the data they ran on
(tuning on private data leaks through the choice too; Papernot and Steinke, "Hyperparameter tuning with Renyi
differential privacy", ICLR 2022). Run the search on public or proxy data, or keep its output with the data
holder (the JSON is written with the holder's file mode). Every trial is labelled so (`Trial.private` is
always False), and only the recommended private run, once trained with its own budget, is (epsilon, delta)-DP.

The training function must be picklable to reach worker processes: a module-level function, or an instance
of a module-level class (`tramontane.finetune.search.FinetuneTask`). Workers are started with "spawn" (no
fork of a process that already runs torch threads) and limited to `threads_per_worker` threads each.
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tramontane import accounting
from tramontane.accounting import DpSgdSetting, SimulatedSetting
from tramontane.errors import ConfigError
from tramontane.files import HOLDER_MODE, write_json_atomic
from tramontane.seeding import seed_for

logger = logging.getLogger(__name__)

SEARCH_FORMAT = "tramontane.tan_search"
SEARCH_VERSION = 1
DEFAULT_SIMULATED_BATCH = 128  # the paper's simulation batch
BACKENDS = ("processes", "ray")
NOT_PRIVATE_NOTE = (
    "NOT PRIVATE: the trials are simulations at a reduced batch with the private run's total amount of noise "
    "(TAN), for choosing hyper-parameters only. They are not differentially private and nothing of them is "
    "on a privacy ledger: their metrics, their ranking and the recommended learning rate and steps are "
    "functions of the data they ran on. Run the search on public or proxy data, or keep this output with the "
    "data holder. Only the recommended private run, trained with its own budget, is (epsilon, delta)-DP."
)
ETA_RTOL = 1e-9  # the simulation must keep eta (sigma / B at fixed S) up to rounding


@dataclass(frozen=True)
class TrialConfig:
    """What a task's training function gets for one run: DP-SGD with Poisson sampling at expected batch
    `batch_size` over `dataset_size` examples (q = batch_size / dataset_size), noise multiplier
    `noise_multiplier`, `steps` steps at learning rate `lr`. `seed` fixes initialisation, sampling and noise
    (None: fresh entropy). The function returns the metric (e.g. a held-out loss) of the trained model."""

    lr: float
    steps: int
    batch_size: int
    noise_multiplier: float
    dataset_size: int
    seed: int | None = None

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.dataset_size


TrainFunction = Callable[[TrialConfig], float]


@dataclass(frozen=True)
class GridPoint:
    """One (learning rate, steps) of the grid."""

    lr: float
    steps: int


def expand_grid(learning_rates: Sequence[float], steps: Sequence[int]) -> list[GridPoint]:
    """Every (lr, steps) pair, steps-major, both ascending. Refuses an empty axis, a learning rate that is not
    a finite number > 0, a step count that is not a whole number >= 1, and repeated values."""
    lrs, counts = list(learning_rates), list(steps)
    if not lrs or not counts:
        raise ConfigError("the search grid needs at least one learning rate and one step count")
    for lr in lrs:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"learning rates must be finite numbers > 0, got {lr!r}")
    for s in counts:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError(f"step counts must be whole numbers >= 1, got {s!r}")
    for name, values in (("learning rate", [float(v) for v in lrs]), ("step count", [float(s) for s in counts])):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"the {name} {repeated[0]:g} is in the grid more than once: give each value "
                              "once")
    return [GridPoint(float(lr), s) for s in sorted(counts) for lr in sorted(lrs)]


def default_simulated_batch(dataset_size: int, reference_batch: int) -> int:
    """The paper's 128, or N / 16 on a smaller data set, never above the reference batch."""
    return max(1, min(DEFAULT_SIMULATED_BATCH, dataset_size // 16, reference_batch))


@dataclass(frozen=True)
class SearchConfig:
    """The private target, the grid, and how the trials run.

    Args:
        target_epsilon, delta: the budget of the private run to plan (its DP-SGD steps alone).
        dataset_size: N, the number of privacy units the private run samples from.
        learning_rates, steps: the grid (`expand_grid`).
        reference_batch_size: B_ref of the private run; None: the TAN rule's batch for each step count at
            noise multiplier `noise_multiplier_guess` (the paper's section 4.3: B ~ 1 / sqrt(S) at fixed sigma).
        simulated_batch_size: B_sim; None: `default_simulated_batch`. Above B_ref is refused; equal to B_ref
            runs the trials at full batch (no saving, still not private).
        accountant: calibrates sigma_ref ("rdp" or "pld").
        repeats: runs per grid point (seeds shared by all points); the metric is their mean.
        seed: derives the repeats' seeds; None draws them from the OS (they are recorded in the result).
        mode: "min" when a lower metric is better (a loss), "max" otherwise (an accuracy).
        metric: the metric's name, for the outputs.
        workers: trials at once; 1 runs them one after the other in this process.
        threads_per_worker: torch threads in each worker process; None: the CPUs shared among the workers.
        backend: "processes" (`concurrent.futures`, needs nothing more) or "ray" (Ray Tune, if installed).
    """

    target_epsilon: float
    delta: float
    dataset_size: int
    learning_rates: tuple[float, ...]
    steps: tuple[int, ...]
    reference_batch_size: int | None = None
    simulated_batch_size: int | None = None
    noise_multiplier_guess: float = 3.0
    accountant: accounting.Accountant = "rdp"
    repeats: int = 1
    seed: int | None = 0
    mode: Literal["min", "max"] = "min"
    metric: str = "validation loss"
    workers: int = 1
    threads_per_worker: int | None = None
    backend: str = "processes"

    def __post_init__(self) -> None:
        accounting.events.check_epsilon(self.target_epsilon, "target_epsilon", positive=True)
        accounting.events.check_delta(self.delta, "delta")
        accounting.events.check_count(self.dataset_size, "dataset_size", minimum=1)
        object.__setattr__(self, "learning_rates", tuple(self.learning_rates))
        object.__setattr__(self, "steps", tuple(self.steps))
        expand_grid(self.learning_rates, self.steps)
        for name in ("reference_batch_size", "simulated_batch_size", "threads_per_worker"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a whole number >= 1 or None, got {value!r}")
        if self.reference_batch_size is not None and self.reference_batch_size > self.dataset_size:
            raise ConfigError(f"reference_batch_size {self.reference_batch_size} exceeds dataset_size "
                              f"{self.dataset_size}: the sample rate would be above 1")
        if (self.reference_batch_size is not None and self.simulated_batch_size is not None
                and self.simulated_batch_size > self.reference_batch_size):
            raise ConfigError(f"simulated_batch_size {self.simulated_batch_size} is above the reference batch "
                              f"{self.reference_batch_size}: a simulation is meant to be cheaper; lower it")
        for name in ("repeats", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise ConfigError(f"seed must be a whole number >= 0 or None, got {self.seed!r}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' (lower is better) or 'max', got {self.mode!r}")
        if self.accountant not in accounting.ACCOUNTANTS:
            raise ConfigError(f"accountant must be one of {list(accounting.ACCOUNTANTS)}, got "
                              f"{self.accountant!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")


# -- planning ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepPlan:
    """The private run planned for one step count, and its simulation (NOT private)."""

    reference: DpSgdSetting
    epsilon: float  # the accountant's, <= target_epsilon
    epsilon_tan: float
    simulated: SimulatedSetting


def check_same_tan(simulated: SimulatedSetting, reference: DpSgdSetting) -> None:
    """Assert that the simulation keeps the reference's eta (sigma / B and S equal): the premise of the
    search. A simulation that does not scale sigma with the batch would rank learning rates under B_ref /
    B_sim times more noise than the private run will see."""
    sim_eta = accounting.eta(simulated.batch_size / simulated.dataset_size, simulated.noise_multiplier,
                             simulated.steps)
    if simulated.steps != reference.steps or not math.isclose(sim_eta, reference.eta, rel_tol=ETA_RTOL):
        raise AssertionError(
            f"the simulation at batch {simulated.batch_size}, sigma {simulated.noise_multiplier:.6g}, "
            f"{simulated.steps} steps has eta {sim_eta:.6g}; the private run at batch {reference.batch_size}, "
            f"sigma {reference.noise_multiplier:.6g}, {reference.steps} steps has {reference.eta:.6g}")


def plan_search(config: SearchConfig) -> dict[int, StepPlan]:
    """The private run and its simulation for each step count of the grid (see the module docstring)."""
    plans = {}
    for steps in sorted(config.steps):
        plan = accounting.plan_constant_tan(
            config.dataset_size, config.target_epsilon, config.delta, steps,
            batch_size_ref=config.reference_batch_size, noise_multiplier_guess=config.noise_multiplier_guess,
            simulated_batch_size=None, accountant=config.accountant)
        reference = plan.reference
        b_sim = config.simulated_batch_size
        if b_sim is None:
            b_sim = default_simulated_batch(config.dataset_size, reference.batch_size)
        elif b_sim > reference.batch_size:
            raise ConfigError(
                f"the simulated batch {b_sim} is above the private run's batch {reference.batch_size} for "
                f"{steps} steps (the TAN rule's at this budget): lower the simulated batch, or give the "
                "reference batch")
        simulated = accounting.simulated_setting(reference, b_sim)
        check_same_tan(simulated, reference)
        plans[steps] = StepPlan(reference, plan.epsilon, plan.epsilon_tan, simulated)
        logger.info("%d steps: private run B_ref=%d sigma_ref=%.4g (epsilon %.4g); simulation B_sim=%d "
                    "sigma_sim=%.4g (NOT private)", steps, reference.batch_size, reference.noise_multiplier,
                    plan.epsilon, simulated.batch_size, simulated.noise_multiplier)
    return plans


# -- results -----------------------------------------------------------------------------------------------

def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Trial:
    """One grid point's simulated runs. NOT PRIVATE (`private` is always False; see the module docstring).
    `metric` is the mean of `metrics` over the repeats, NaN when a run diverged (ranked last)."""

    lr: float
    steps: int
    batch_size: int
    noise_multiplier: float
    reference_batch_size: int
    reference_noise_multiplier: float
    seeds: tuple[int, ...]
    metrics: tuple[float, ...]
    seconds: float
    private: Literal[False] = field(default=False, init=False)
    label: str = field(default=accounting.SIMULATION_LABEL, init=False)

    def __post_init__(self) -> None:
        assert self.private is False

    @property
    def metric(self) -> float:
        if not self.metrics or not all(math.isfinite(m) for m in self.metrics):
            return math.nan
        return math.fsum(self.metrics) / len(self.metrics)

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "steps": self.steps, "batch_size": self.batch_size,
                "noise_multiplier": self.noise_multiplier, "metric": _finite_or_none(self.metric),
                "metrics": [_finite_or_none(m) for m in self.metrics], "seeds": list(self.seeds),
                "seconds": self.seconds, "private": self.private, "label": self.label,
                "reference": {"batch_size": self.reference_batch_size,
                              "noise_multiplier": self.reference_noise_multiplier}}


@dataclass(frozen=True)
class Recommendation:
    """The private run to train: the best grid point's lr and steps at (B_ref, sigma_ref). Its epsilon is the
    accountant's for these DP-SGD steps; `simulated_metric` is the trial's, NOT private."""

    lr: float
    steps: int
    batch_size: int
    noise_multiplier: float
    sample_rate: float
    epsilon: float
    delta: float
    accountant: str
    eta: float
    epsilon_tan: float
    simulated_metric: float

    def to_dict(self) -> dict[str, Any]:
        return {"private": True, "lr": self.lr, "steps": self.steps, "batch_size": self.batch_size,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "epsilon": self.epsilon, "delta": self.delta, "accountant": self.accountant, "eta": self.eta,
                "epsilon_tan": self.epsilon_tan, "simulated_metric": _finite_or_none(self.simulated_metric),
                "simulated_metric_label": accounting.SIMULATION_LABEL}


@dataclass(frozen=True)
class SearchResult:
    """The trials (best first) and the recommended private run."""

    config: SearchConfig
    trials: tuple[Trial, ...]  # ranked: best first, diverged last
    recommendation: Recommendation
    plans: dict[int, StepPlan]
    seconds: float

    @property
    def private(self) -> Literal[False]:
        """The search's outputs are never private (module docstring); only the recommended run will be."""
        return False

    def to_dict(self, complete: bool = True) -> dict[str, Any]:
        c = self.config
        return {
            "format": SEARCH_FORMAT, "version": SEARCH_VERSION, "complete": complete,
            "private": self.private, "note": NOT_PRIVATE_NOTE,
            "target": {"epsilon": c.target_epsilon, "delta": c.delta, "dataset_size": c.dataset_size,
                       "accountant": c.accountant},
            "metric": {"name": c.metric, "mode": c.mode},
            "grid": {"learning_rates": sorted(c.learning_rates), "steps": sorted(c.steps),
                     "repeats": c.repeats},
            "plans": {str(s): {"batch_size": p.reference.batch_size,
                               "noise_multiplier": p.reference.noise_multiplier, "epsilon": p.epsilon,
                               "simulated_batch_size": p.simulated.batch_size,
                               "simulated_noise_multiplier": p.simulated.noise_multiplier,
                               "compute_saving": p.reference.batch_size / p.simulated.batch_size}
                      for s, p in sorted(self.plans.items())},
            "trials": [t.to_dict() for t in self.trials],
            "recommendation": self.recommendation.to_dict(),
            "seconds": self.seconds,
        }


def rank_trials(trials: Sequence[Trial], mode: Literal["min", "max"]) -> list[Trial]:
    """Best first by mean metric (`mode`); a diverged trial (NaN) last; ties to fewer steps, then lower lr."""
    sign = 1.0 if mode == "min" else -1.0
    return sorted(trials, key=lambda t: (not math.isfinite(t.metric),
                                         sign * t.metric if math.isfinite(t.metric) else 0.0, t.steps, t.lr))


def recommend(trials: Sequence[Trial], plans: dict[int, StepPlan], config: SearchConfig) -> Recommendation:
    """The private run of the best trial (`rank_trials`); refuses when every trial diverged."""
    best = rank_trials(trials, config.mode)[0]
    if not math.isfinite(best.metric):
        raise ConfigError(f"every trial's {config.metric} is not a finite number (all runs diverged): try "
                          "smaller learning rates")
    plan = plans[best.steps]
    ref = plan.reference
    return Recommendation(lr=best.lr, steps=best.steps, batch_size=ref.batch_size,
                          noise_multiplier=ref.noise_multiplier, sample_rate=ref.sample_rate,
                          epsilon=plan.epsilon, delta=config.delta, accountant=config.accountant, eta=ref.eta,
                          epsilon_tan=plan.epsilon_tan, simulated_metric=best.metric)


# -- running the trials ------------------------------------------------------------------------------------

_Job = tuple[int, int, TrialConfig]  # (grid point, repeat, the trial's run)
_Done = tuple[int, int, float, float]  # (grid point, repeat, metric, seconds)


def _init_worker(threads: int) -> None:
    """Worker set-up: one worker's share of the CPUs, so that parallel trials do not oversubscribe; and
    dp-accounting's per-order convergence notes silenced, as the CLI does (a trainer accounts its run at the
    end, and a simulation's small sigma makes dp-accounting skip orders it need not report)."""
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("absl").setLevel(logging.ERROR)


def _timed(train: TrainFunction, trial: TrialConfig) -> tuple[float, float]:
    start = time.perf_counter()
    metric = float(train(trial))
    return metric, time.perf_counter() - start


def _check_picklable(train: TrainFunction) -> None:
    try:
        pickle.dumps(train)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise ConfigError(
            f"the training function {train!r} cannot be sent to worker processes ({err}): pass a module-level "
            "function or an instance of a module-level class (not a lambda or a local function), or run the "
            "trials in this process with workers=1") from None


def _in_process(train: TrainFunction, jobs: Sequence[_Job]) -> Iterator[_Done]:
    for point, repeat, trial in jobs:
        yield (point, repeat, *_timed(train, trial))


def _in_processes(train: TrainFunction, jobs: Sequence[_Job], workers: int, threads: int) -> Iterator[_Done]:
    _check_picklable(train)
    context = multiprocessing.get_context("spawn")  # no fork of a process running torch threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        pending: dict[Future[tuple[float, float]], tuple[int, int]] = {
            pool.submit(_timed, train, trial): (point, repeat) for point, repeat, trial in jobs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    point, repeat = pending.pop(future)
                    yield (point, repeat, *future.result())  # a trial's exception stops the search here
        finally:
            for future in pending:
                future.cancel()


def _with_ray(train: TrainFunction, jobs: Sequence[_Job], workers: int, threads: int) -> Iterator[_Done]:
    """The trials as a Ray Tune grid (its public Tuner API); results come back when every trial is done."""
    try:
        tune = importlib.import_module("ray.tune")
    except ImportError:
        raise ConfigError("backend='ray' needs Ray Tune: pip install 'ray[tune]' (the default "
                          "backend='processes' needs nothing more)") from None
    trials = [trial for _, _, trial in jobs]

    def trainable(params: dict[str, Any]) -> dict[str, float]:
        _init_worker(threads)
        metric, seconds = _timed(train, trials[params["job"]])
        return {"metric": metric, "trial_seconds": seconds}

    run_config_type = getattr(tune, "RunConfig", None) or importlib.import_module("ray.train").RunConfig
    with tempfile.TemporaryDirectory(prefix="tramontane-tan-search-") as storage:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": threads}),
            param_space={"job": tune.grid_search(list(range(len(jobs))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=workers),
            run_config=run_config_type(storage_path=storage, name="tan-search", verbose=0))
        grid = tuner.fit()
        outcomes = [grid[i] for i in range(len(grid))]
    for outcome in outcomes:
        if outcome.error is not None:
            raise outcome.error
        point, repeat, _ = jobs[outcome.config["job"]]
        yield point, repeat, float(outcome.metrics["metric"]), float(outcome.metrics["trial_seconds"])


# -- the search --------------------------------------------------------------------------------------------

def _trials_of(points: Sequence[GridPoint], plans: dict[int, StepPlan], seeds: Sequence[int],
               metrics: dict[int, dict[int, float]], seconds: dict[int, float]) -> list[Trial]:
    """The grid points whose every repeat is done."""
    trials = []
    for i, point in enumerate(points):
        if len(metrics[i]) < len(seeds):
            continue
        plan = plans[point.steps]
        trials.append(Trial(lr=point.lr, steps=point.steps, batch_size=plan.simulated.batch_size,
                            noise_multiplier=plan.simulated.noise_multiplier,
                            reference_batch_size=plan.reference.batch_size,
                            reference_noise_multiplier=plan.reference.noise_multiplier, seeds=tuple(seeds),
                            metrics=tuple(metrics[i][r] for r in range(len(seeds))), seconds=seconds[i]))
    return trials


def search_constant_tan(train: TrainFunction, config: SearchConfig, *, out: str | Path | None = None,
                        on_trial: Callable[[Trial, int, int], None] | None = None) -> SearchResult:
    """Run the grid at the reduced batch with the private run's TAN and recommend the private run (see the
    module docstring). NOT PRIVATE: the trials read the data `train` uses without any accounting.

    Args:
        train: the task: a TrialConfig in, the trained model's metric out (module-level and picklable when
            `config.workers` > 1). A non-finite metric counts as diverged; an exception stops the search.
        config: target, grid and execution (`SearchConfig`).
        out: a JSON file (written atomically with the holder's mode): rewritten after every finished grid
            point with `"complete": false`, and at the end with the recommendation.
        on_trial: called with (trial, grid points done, grid points in all) when a grid point's repeats are
            all done (a progress display).
    """
    start = time.perf_counter()
    points = expand_grid(config.learning_rates, config.steps)
    plans = plan_search(config)
    seeds = [seed_for(config.seed, "tan search", "repeat", r) for r in range(config.repeats)]
    jobs: list[_Job] = []
    for i, point in enumerate(points):
        sim = plans[point.steps].simulated
        for r, seed in enumerate(seeds):
            jobs.append((i, r, TrialConfig(lr=point.lr, steps=point.steps, batch_size=sim.batch_size,
                                           noise_multiplier=sim.noise_multiplier,
                                           dataset_size=config.dataset_size, seed=seed)))
    workers = min(config.workers, len(jobs))
    threads = config.threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    logger.info("TAN search: %d grid points x %d repeats = %d trials (NOT private), %d at a time",
                len(points), len(seeds), len(jobs), workers)
    if config.backend == "ray":
        done_iter = _with_ray(train, jobs, workers, threads)
    elif workers == 1:
        done_iter = _in_process(train, jobs)
    else:
        done_iter = _in_processes(train, jobs, workers, threads)
    metrics: dict[int, dict[int, float]] = {i: {} for i in range(len(points))}
    seconds = dict.fromkeys(range(len(points)), 0.0)
    finished = 0
    for point_index, repeat, metric, took in done_iter:
        metrics[point_index][repeat] = metric
        seconds[point_index] += took
        if len(metrics[point_index]) < len(seeds):
            continue
        finished += 1
        trial = _trials_of([points[point_index]], plans, seeds, {0: metrics[point_index]},
                           {0: seconds[point_index]})[0]
        logger.info("trial %d/%d (NOT private): lr=%g steps=%d batch=%d sigma=%.4g -> %s %.6g", finished,
                    len(points), trial.lr, trial.steps, trial.batch_size, trial.noise_multiplier,
                    config.metric, trial.metric)
        if on_trial is not None:
            on_trial(trial, finished, len(points))
        if out is not None and finished < len(points):  # what is done so far, should the search stop here
            done = rank_trials(_trials_of(points, plans, seeds, metrics, seconds), config.mode)
            if any(math.isfinite(t.metric) for t in done):
                partial = SearchResult(config, tuple(done), recommend(done, plans, config), plans,
                                       time.perf_counter() - start)
                write_json_atomic(out, partial.to_dict(complete=False), HOLDER_MODE)
    trials = rank_trials(_trials_of(points, plans, seeds, metrics, seconds), config.mode)
    assert len(trials) == len(points), "every grid point must have run"
    result = SearchResult(config, tuple(trials), recommend(trials, plans, config), plans,
                          time.perf_counter() - start)
    rec = result.recommendation
    logger.info("recommended private run: lr=%g steps=%d batch=%d sigma=%.4g (epsilon %.4g at delta %g)",
                rec.lr, rec.steps, rec.batch_size, rec.noise_multiplier, rec.epsilon, rec.delta)
    if out is not None:
        write_json_atomic(out, result.to_dict(), HOLDER_MODE)
    return result


__all__ = ["BACKENDS", "NOT_PRIVATE_NOTE", "SEARCH_FORMAT", "GridPoint", "Recommendation", "SearchConfig",
           "SearchResult", "StepPlan", "Trial", "TrialConfig", "check_same_tan", "default_simulated_batch",
           "expand_grid", "plan_search", "rank_trials", "recommend", "search_constant_tan"]
