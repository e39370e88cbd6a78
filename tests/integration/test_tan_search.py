"""The constant-TAN search (`training.search`) on a small real task, against full-batch runs at the same TAN.

The TAN paper (Sander, Stock and Sablayrolles, arXiv 2210.03403, section 3.4, Table 2 and Fig. 4) finds that
DP-SGD runs at a small batch B_sim with sigma_sim = sigma_ref * B_sim / B_ref reach about the accuracy of the
private runs at (B_ref, sigma_ref) and rank hyper-parameters as they do. The task here: DP-SGD (the project's
engine and Poisson sampler, plain SGD as in the paper) of a one-hidden-layer MLP on UCI Adult (bundled,
public), scored by the log-loss on rows of Adult's test split. An MLP rather than a logistic regression: the
premise is that DP noise, not batch sampling, dominates the gradient's error at B_sim, roughly
sigma * sqrt(parameters * B_sim) >> B_ref, which 107 weights do not reach and 7,000 do. The oracle is
independent of the search's planning: full-batch runs with sigma_ref calibrated by the accountant directly,
called one by one here.

What must hold:
- the search at B_sim = B_ref / 16 recommends the learning rate the full-batch runs prefer (up to a tie: the
  full-batch loss of its choice within TIE of the best), ranks the grid as they do (Spearman >= 0.8), and its
  losses predict theirs (within PREDICTED at every learning rate);
- every trial keeps sigma / B of the private run, and is labelled not private in the written JSON;
- a simulation that does not scale sigma with the batch (B_ref / B_sim times more noise on the averaged
  gradient) is caught: its losses miss the full-batch ones by far more and rank the grid worse, so the
  comparison can fail; and the search's own eta check refuses such a simulation.
"""

from __future__ import annotations

import functools
import json
import math
import stat
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from torch import nn

from tramontane import accounting, datasets
from tramontane.dp import DPEngine, PoissonSampler
from tramontane.training.search import SearchConfig, TrialConfig, plan_search, search_constant_tan

EPSILON, DELTA, STEPS = 0.5, 1e-5, 40
B_REF, B_SIM = 4096, 256
LRS = (0.1, 0.3, 1.0, 3.0)
HIDDEN = 64
VALIDATION_ROWS = 4000
TIE = 0.005  # log-loss: closer than this to the full-batch best counts as the same choice
PREDICTED = 0.03  # at constant TAN the simulated log-loss predicts the full-batch one to about this


@functools.cache
def _adult() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adult's train split (features [N, F], labels [N]) and VALIDATION_ROWS rows of its test split:
    standardised numbers and one-hot categories (fnlwgt, a sampling weight, left out)."""
    train, test = datasets.load_adult("train"), datasets.load_adult("test").iloc[:VALIDATION_ROWS]
    both = pd.concat([train, test], ignore_index=True).drop(columns=["fnlwgt"])
    labels = both.pop(datasets.ADULT_TARGET).str.startswith(">").to_numpy(np.float32)
    numbers = both.select_dtypes("number")
    numbers = (numbers - numbers.iloc[:len(train)].mean()) / numbers.iloc[:len(train)].std()
    categories = pd.get_dummies(both.select_dtypes(exclude="number"), dtype=np.float32)
    x = torch.tensor(np.concatenate([numbers.to_numpy(np.float32), categories.to_numpy(np.float32)], axis=1))
    y = torch.tensor(labels)
    n = len(train)
    return x[:n], y[:n], x[n:], y[n:]


def dataset_size() -> int:
    return len(_adult()[0])


def mlp_dp_sgd(trial: TrialConfig) -> float:
    """DP-SGD of the MLP at the trial's setting; the validation log-loss (module-level, so that worker
    processes could import it; the search here runs in this process: a worker's start, importing torch and
    this module, costs more than its trials, and tests/unit/test_tan_search.py and test_cli_plan_search.py
    check that worker processes give the in-process results)."""
    x, y, x_val, y_val = _adult()
    assert trial.dataset_size == len(x)
    torch.manual_seed(trial.seed)
    model = nn.Sequential(nn.Linear(x.shape[1], HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=trial.lr)

    def losses(m: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(m(x[rows]).squeeze(-1), y[rows], reduction="none")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded noise and sampling: reproducible on purpose
        engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=trial.noise_multiplier, seed=trial.seed)
        sampler = PoissonSampler(len(x), trial.sample_rate, steps=trial.steps, seed=trial.seed)
    for indices in sampler:
        batches = [torch.tensor(indices, dtype=torch.long)] if indices else []
        engine.compute_noisy_grads(losses, batches, trial.batch_size)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss = nn.functional.binary_cross_entropy_with_logits(model(x_val).squeeze(-1), y_val)
    return float(loss) if torch.isfinite(loss) else math.nan


def _config(**overrides) -> SearchConfig:
    params = {"target_epsilon": EPSILON, "delta": DELTA, "dataset_size": dataset_size(),
              "learning_rates": LRS, "steps": (STEPS,), "reference_batch_size": B_REF,
              "simulated_batch_size": B_SIM, "repeats": 2, "seed": 0, "metric": "validation log-loss",
              "workers": 1, "threads_per_worker": 1}
    return SearchConfig(**{**params, **overrides})


def _grid(batch: int, sigma: float, seeds: tuple[int, ...]) -> np.ndarray:
    """The mean metric of each learning rate of LRS at (batch, sigma), over `seeds`."""
    n = dataset_size()
    return np.array([np.mean([mlp_dp_sgd(TrialConfig(lr, STEPS, batch, sigma, n, seed)) for seed in seeds])
                     for lr in LRS])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The runs here are small: one thread each (as in the search's workers) is faster than several that
    contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("search") / "search.json"
    return search_constant_tan(mlp_dp_sgd, _config(), out=out), out


@pytest.fixture(scope="module")
def full_batch(search) -> np.ndarray:
    """The oracle: the private-size runs at (B_REF, sigma_ref), sigma_ref from the accountant directly."""
    result, _ = search
    sigma_ref = accounting.calibrate_noise_multiplier(EPSILON, DELTA, B_REF / dataset_size(), STEPS).noise_multiplier
    return _grid(B_REF, sigma_ref, result.trials[0].seeds)


def _by_lr(result) -> np.ndarray:
    metric = {t.lr: t.metric for t in result.trials}
    return np.array([metric[lr] for lr in LRS])


def test_reduced_batch_recommends_what_full_batch_prefers(search, full_batch: np.ndarray) -> None:
    result, _ = search
    simulated = _by_lr(result)
    assert np.isfinite(full_batch).all() and np.isfinite(simulated).all()
    choice = LRS.index(result.recommendation.lr)
    assert full_batch[choice] - full_batch.min() <= TIE, (result.recommendation.lr, simulated, full_batch)
    assert stats.spearmanr(simulated, full_batch).statistic >= 0.8, (simulated, full_batch)
    assert np.abs(simulated - full_batch).max() <= PREDICTED, (simulated, full_batch)
    # The grid brackets the optimum, and the learning rate matters: the search had a real choice to make.
    assert 0 < int(np.argmin(full_batch)) < len(LRS) - 1
    assert full_batch.max() - full_batch.min() > 10 * TIE
    # The recommendation is the private run: B_ref and the calibrated sigma_ref, within the budget.
    rec = result.recommendation
    sigma_ref = accounting.calibrate_noise_multiplier(EPSILON, DELTA, B_REF / dataset_size(), STEPS).noise_multiplier
    assert rec.batch_size == B_REF and rec.steps == STEPS
    assert rec.noise_multiplier == pytest.approx(sigma_ref, rel=1e-9)
    spent = accounting.epsilon(accounting.DpSgdEvent(B_REF / dataset_size(), rec.noise_multiplier, STEPS), DELTA)
    assert spent <= EPSILON * (1 + 1e-9) and rec.epsilon == pytest.approx(spent, rel=1e-6)


def test_trials_keep_sigma_over_batch_and_are_labelled_not_private(search) -> None:
    result, out = search
    sigma_ref = result.recommendation.noise_multiplier
    for trial in result.trials:
        assert trial.batch_size == B_SIM and trial.steps == STEPS
        assert trial.noise_multiplier / trial.batch_size == pytest.approx(sigma_ref / B_REF, rel=1e-12)
        assert trial.private is False
    written = json.loads(out.read_text())
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # the data holder's
    assert written["complete"] is True and written["private"] is False and "NOT PRIVATE" in written["note"]
    assert all(t["private"] is False and "not private" in t["label"] for t in written["trials"])
    assert written["recommendation"]["private"] is True
    assert written["recommendation"]["lr"] == result.recommendation.lr
    assert [t["metric"] for t in written["trials"]] == pytest.approx([t.metric for t in result.trials])
    assert written["plans"][str(STEPS)]["compute_saving"] == B_REF / B_SIM


def test_unscaled_noise_is_caught(search, full_batch: np.ndarray,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    result, _ = search
    sigma_ref = result.recommendation.noise_multiplier
    broken = _grid(B_SIM, sigma_ref, result.trials[0].seeds)  # sigma not scaled with the batch
    simulated = _by_lr(result)
    assert np.abs(broken - full_batch).max() > 2 * PREDICTED > np.abs(simulated - full_batch).max()
    assert stats.spearmanr(broken, full_batch).statistic < stats.spearmanr(simulated, full_batch).statistic
    # The search itself refuses a simulation whose sigma / B differs from the private run's.
    monkeypatch.setattr(accounting.tan, "noise_multiplier_for_batch", lambda b, b_ref, sigma_ref: sigma_ref)
    with pytest.raises(AssertionError, match="eta"):
        plan_search(_config())
