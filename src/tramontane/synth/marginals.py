"""Measured marginals that calibrate what the language model samples.

A DP language model learns the joint of a table's columns, but its low-order marginals carry the error of a
short, noisy optimisation. Marginal-based synthesizers (MST, AIM: McKenna, Miklau, Sheldon 2021; McKenna et
al. 2022) are the reverse: accurate low-order marginals, no higher-order structure beyond their model. This
module combines the two, AIM's way with the language model as the base distribution:

1. **Group** (free): from rows sampled from the trained model (a DP release, so anything computed from them
   is post-processing) group each column's values into groups of similar mass for 1-, 2- and 3-way
   marginals (an ordered column into contiguous runs of bins, a categorical one into its most frequent
   values plus one group for the rest), coarser for higher orders so that no cell drowns in the noise.
2. **Measure and select** (`select_adaptive`): every column's 1-way marginal, then a number of rounds that
   each draw one 2- or 3-way marginal by the exponential mechanism, where the calibrated model is furthest
   from the private rows, and measure it. Every measurement is a sensitivity-1 count vector (one row adds
   one to one cell) with Gaussian noise, the 1-way ones optionally at a smaller standard deviation of their
   own (`plan_budget`'s `one_way_weight`): `GaussianEvent`s for the 1-way and for the chosen marginals (one
   where the noises are equal) and one `ExponentialMechanismEvent(epsilon, rounds)` on the ledger.
3. **Tilt** (post-processing, at every `sample`): weights exp(sum_q lambda_q[cell_q(row)]) over a pool of
   rows freshly sampled from the model, lambda the maximum a posteriori fit of the noisy marginals (the
   exponential-family change of the model's distribution that best explains the measurements; `fit_tilt`),
   then n rows drawn from the pool with probability proportional to their weight (`resample`, stratified
   over the sorted pool). The tilt is fitted on the very pool it weights: an additive tilt over overlapping
   marginals extrapolates badly to cell combinations a different pool did not contain.

The noise standard deviation is planned before training from a share of the budget in zCDP terms
(`plan_budget`), so that DP-SGD's noise is calibrated for the whole ledger, marginals included.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tramontane.accounting import ExponentialMechanismEvent, GaussianEvent, PrivacyEvent, budget_rho
from tramontane.dp.noise import SecureRandom
from tramontane.synth.schema import Schema

MARGINALS_LABEL = "marginals"
SELECTION_LABEL = "marginal selection"


@dataclass(frozen=True)
class MarginalBudget:
    """How a share of the budget is spent on marginals: every column's 1-way marginal, then `rounds` rounds
    that each choose one more marginal with the exponential mechanism at `selection_epsilon` and measure it;
    every measurement is a sensitivity-1 count vector with Gaussian noise per cell, `one_way_sigma` for the
    1-way marginals (0: `sigma` too) and `sigma` for the chosen ones."""

    sigma: float
    selection_epsilon: float
    n_columns: int
    rounds: int
    one_way_sigma: float = 0.0

    @property
    def measurements(self) -> int:
        return self.n_columns + self.rounds

    def events(self) -> list[PrivacyEvent]:
        return _events(self.one_way_sigma or self.sigma, self.n_columns, self.sigma, self.rounds, self.rounds,
                       self.selection_epsilon)


def _events(sigma_1: float, one_way: int, sigma: float, others: int, rounds: int,
            selection_epsilon: float) -> list[PrivacyEvent]:
    """The ledger events of `one_way` 1-way measurements at noise std `sigma_1` and `others` more at
    `sigma` (one Gaussian event where the two are equal), and of `rounds` choices by the exponential
    mechanism at `selection_epsilon`."""
    if sigma_1 == sigma:
        out: list[PrivacyEvent] = [GaussianEvent(sigma, one_way + others, label=MARGINALS_LABEL)]
    else:
        out = [GaussianEvent(sigma_1, one_way, label=MARGINALS_LABEL)]
        if others:
            out.append(GaussianEvent(sigma, others, label=MARGINALS_LABEL))
    if rounds:
        out.append(ExponentialMechanismEvent(selection_epsilon, rounds, label=SELECTION_LABEL))
    return out


def plan_budget(epsilon: float, delta: float, share: float, n_columns: int, rounds: int,
                selection_share: float = 0.1, one_way_weight: float = 1.0) -> MarginalBudget:
    """Split `share` of the budget's rho (`accounting.budget_rho`): each chosen measurement costs
    c = 1 / (2 sigma^2), each 1-way one `one_way_weight` x c (noise std sigma / sqrt(one_way_weight)), each
    round's selection `selection_share` of its round (epsilon_sel^2 / 8, the exponential mechanism's zCDP
    cost), so d w c + rounds c / (1 - selection_share) = share x rho (AIM's split of a round, McKenna et al.
    2022)."""
    rho = share * budget_rho(epsilon, delta)
    per_measurement = rho / (n_columns * one_way_weight + rounds / (1.0 - selection_share))
    selection_rho = per_measurement * selection_share / (1.0 - selection_share)
    sigma = math.sqrt(1.0 / (2.0 * per_measurement))
    return MarginalBudget(sigma, math.sqrt(8.0 * selection_rho) if rounds else 0.0, n_columns, rounds,
                          sigma / math.sqrt(one_way_weight) if one_way_weight != 1.0 else 0.0)


# -- grouping (post-processing of model samples) ---------------------------------------------------------

def column_groups(ids: np.ndarray, n_values: int, ordered: bool, max_groups: int,
                  missing_id: int | None = None, min_mass: float = 0.0) -> np.ndarray:
    """Group id of every value id [n_values], from the value ids `ids` of sampled rows.

    ordered: contiguous runs of values with about max(1/max_groups, min_mass) of the mass each (a value
    heavier than that is a group of its own); the missing value, if any, is a group of its own. Unordered:
    the most frequent values each alone (at most max_groups - 1, each with at least `min_mass`), the rest
    together (values never sampled join the rest). `min_mass` keeps the noise of a measured cell small
    next to what it counts.
    """
    counts = np.bincount(ids, minlength=n_values).astype(np.float64)
    share = counts / max(counts.sum(), 1.0)
    max_groups = max(1, min(max_groups, int(1.0 / min_mass) if min_mass > 0 else max_groups))
    if n_values <= max_groups and (share[share > 0] >= min_mass).all():
        return np.arange(n_values, dtype=np.int64)
    groups = np.zeros(n_values, dtype=np.int64)
    if not ordered:
        order = np.argsort(-counts, kind="stable")
        order = order[share[order] >= min_mass]
        top = order[: max_groups - 1]
        groups[:] = max_groups - 1
        groups[top] = np.arange(len(top))
        return _renumber(groups)
    values = np.arange(n_values)
    if missing_id is not None:
        values = values[values != missing_id]
    budget = max_groups - (1 if missing_id is not None else 0)
    mass = counts[values] / max(counts[values].sum(), 1.0)
    target = max(1.0 / budget, min_mass)
    group, acc = 0, 0.0
    for i, v in enumerate(values):
        if acc > 0 and acc + mass[i] > target * 1.0001 and group < budget - 1:
            group, acc = group + 1, 0.0
        groups[v] = group
        acc += mass[i]
    if missing_id is not None:
        groups[missing_id] = group + 1
    return _renumber(groups)


def _renumber(groups: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(groups, return_inverse=True)
    return inverse.astype(np.int64)


@dataclass
class MarginalSet:
    """The measured marginals: which, over which groups, and their noisy counts (DP).

    queries: column-index tuples (schema order); groups_1/2/3: per column, the group of each value id in
    1-way marginals, in pairs (coarser) and in triples (coarser still); counts: noisy cell counts per query
    (row-major over the query's columns' groups); sigma: the noise std of every cell of a 2- or 3-way
    query, sigma_1 of a 1-way one (0: sigma too); total: the DP row count the counts are compared with;
    rounds and selection_epsilon: how many queries were chosen by the exponential mechanism on the private
    rows (`select_adaptive`), at which epsilon each (0: none).
    """

    queries: list[tuple[int, ...]]
    groups_1: list[np.ndarray]
    groups_2: list[np.ndarray]
    sigma: float
    total: float
    counts: list[np.ndarray] = field(default_factory=list)
    groups_3: list[np.ndarray] = field(default_factory=list)
    rounds: int = 0
    selection_epsilon: float = 0.0
    sigma_1: float = 0.0

    def noise_std(self, query: tuple[int, ...]) -> float:
        return (self.sigma_1 or self.sigma) if len(query) == 1 else self.sigma

    def grouping(self, query: tuple[int, ...]) -> list[np.ndarray]:
        g = (self.groups_1, self.groups_2, self.groups_3)[len(query) - 1]
        return [g[c] for c in query]

    def sizes(self, query: tuple[int, ...]) -> list[int]:
        return [int(g.max()) + 1 for g in self.grouping(query)]

    def cells(self, ids: np.ndarray, query: tuple[int, ...]) -> np.ndarray:
        """Cell index [N] of every row of value ids [N, d] in `query`'s marginal."""
        out = np.zeros(len(ids), dtype=np.int64)
        for c, g, size in zip(query, self.grouping(query), self.sizes(query)):
            out = out * size + g[ids[:, c]]
        return out

    def n_cells(self, query: tuple[int, ...]) -> int:
        return int(np.prod(self.sizes(query)))

    def events(self) -> list[PrivacyEvent]:
        """What measuring (and choosing) these marginals spent, for the ledger."""
        one_way = sum(len(q) == 1 for q in self.queries)
        return _events(self.sigma_1 or self.sigma, one_way, self.sigma, len(self.queries) - one_way, self.rounds,
                       self.selection_epsilon)

    def to_dict(self) -> dict[str, Any]:
        lists = lambda gs: [g.tolist() for g in gs]
        return {"queries": [list(q) for q in self.queries], "groups_1": lists(self.groups_1),
                "groups_2": lists(self.groups_2), "groups_3": lists(self.groups_3), "sigma": self.sigma,
                "total": self.total, "counts": [c.tolist() for c in self.counts], "rounds": self.rounds,
                "selection_epsilon": self.selection_epsilon, "sigma_1": self.sigma_1}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MarginalSet:
        arr = lambda xs, dtype: [np.asarray(x, dtype=dtype) for x in xs]
        return cls([tuple(q) for q in data["queries"]], arr(data["groups_1"], np.int64),
                   arr(data["groups_2"], np.int64), float(data["sigma"]), float(data["total"]),
                   arr(data["counts"], np.float64), arr(data.get("groups_3", []), np.int64),
                   int(data.get("rounds", 0)), float(data.get("selection_epsilon", 0.0)),
                   float(data.get("sigma_1", 0.0)))


# -- measurement and selection (spend) --------------------------------------------------------------------

def measure(marginals: MarginalSet, query: tuple[int, ...], private_ids: np.ndarray,
            noise: SecureRandom) -> np.ndarray:
    """Noisy counts of one query's cells on the private rows: the Gaussian mechanism at the query's
    `marginals.noise_std` (one of the releases `marginals.events()` records, which the caller puts on the
    ledger before anything derived from them is released)."""
    exact = np.bincount(marginals.cells(private_ids, query), minlength=marginals.n_cells(query))
    draw = noise.normal(torch.Size([len(exact)]), marginals.noise_std(query), torch.device("cpu"),
                        torch.float64)
    return exact.astype(np.float64) + draw.numpy()


def exponential_mechanism(quality: np.ndarray, epsilon: float, random: SecureRandom,
                          sensitivity: float = 1.0) -> int:
    """Index i drawn with probability proportional to exp(epsilon quality_i / (2 sensitivity)) (McSherry and
    Talwar 2007): epsilon-DP when one row moves every quality by at most `sensitivity`. Drawn as the argmax
    of the scaled qualities plus independent Gumbel noise (the Gumbel-max trick), from a new step of
    `random` (securely seeded unless it was given a seed)."""
    random.next_step()
    u = torch.rand(len(quality), generator=random.generator(), dtype=torch.float64).numpy()
    gumbel = -np.log(-np.log(np.clip(u, np.finfo(np.float64).tiny, 1.0 - 1e-16)))
    return int(np.argmax(epsilon / (2.0 * sensitivity) * np.asarray(quality, dtype=np.float64) + gumbel))


def _groupings(schema: Schema, sample_ids: np.ndarray, sigmas: tuple[float, ...], rows: float,
               max_groups: tuple[int, ...], cell_noise_ratio: float) -> list[list[np.ndarray]]:
    """Per order k = 1, 2, 3, every column's grouping for k-way marginals, from sampled rows (free): a group
    holds at least `cell_noise_ratio` x sigmas[k - 1] (the k-way marginals' noise std) of the rows, to the
    k-th root, so a k-way cell of independent columns holds about that much; at most max_groups[k - 1]
    groups."""
    return [[column_groups(sample_ids[:, j], spec.n_values, spec.is_numeric, cap, spec.missing_id,
                           min(1.0, cell_noise_ratio * sigma / max(rows, 1.0)) ** (1.0 / k))
             for j, spec in enumerate(schema.columns)]
            for k, (cap, sigma) in enumerate(zip(max_groups, sigmas), start=1)]


def select_adaptive(schema: Schema, budget: MarginalBudget, pool_ids: np.ndarray, private_ids: np.ndarray,
                    rows: float, noise_seed: int | None = None, max_groups: tuple[int, int, int] = (64, 16, 6),
                    cell_noise_ratio: float = 3.0, iterations: int = 30) -> MarginalSet:
    """Measure every column's 1-way marginal, then choose and measure `budget.rounds` more, AIM's way
    (McKenna et al. 2022) with the language model as the base distribution: each round the candidate 2- and
    3-way marginal whose error under the current calibrated model is largest, net of the noise
    its measurement would add, is drawn by the exponential mechanism, measured, and the tilt refitted.

    The calibrated model is the pool of model samples `pool_ids` weighted by the tilt of what is measured so
    far (`fit_tilt`), so the candidates' model marginals are post-processing. A candidate r's quality is
    ||x_r - m_r||_1 - sqrt(2 / pi) sigma n_r: x_r the private counts, m_r the model's, n_r its cells; one
    row changes it by at most 1 (sensitivity 1). Groupings are chosen from the pool (free).
    """
    sigma_1 = budget.one_way_sigma or budget.sigma
    groups_1, groups_2, groups_3 = _groupings(schema, pool_ids, (sigma_1, budget.sigma, budget.sigma), rows,
                                              max_groups, cell_noise_ratio)
    d = len(schema)
    ms = MarginalSet([(j,) for j in range(d)], groups_1, groups_2, budget.sigma, float(rows),
                     groups_3=groups_3, rounds=budget.rounds, selection_epsilon=budget.selection_epsilon,
                     sigma_1=budget.one_way_sigma)
    noise = SecureRandom(noise_seed, "marginal noise")
    choice = SecureRandom(noise_seed, "marginal selection")
    ms.counts = [measure(ms, q, private_ids, noise) for q in ms.queries]
    candidates = [c for k in (2, 3) for c in itertools.combinations(range(d), k)]
    private = [np.bincount(ms.cells(private_ids, c), minlength=ms.n_cells(c)).astype(np.float64)
               for c in candidates]
    penalty = np.array([math.sqrt(2.0 / math.pi) * budget.sigma * ms.n_cells(c) for c in candidates])
    pool_cells = _CellCache(ms, pool_ids, candidates) if budget.rounds else None
    tilt = fit_tilt(ms, pool_ids, iterations=iterations)
    for _ in range(budget.rounds):
        assert pool_cells is not None
        logw = log_weights(ms, pool_ids, tilt)
        w = np.exp(logw - logw.max())
        w *= rows / w.sum()
        error = np.array([np.abs(x - np.bincount(pool_cells[i], weights=w, minlength=len(x))).sum()
                          for i, x in enumerate(private)])
        picked = candidates[exponential_mechanism(error - penalty, budget.selection_epsilon, choice)]
        ms.queries.append(picked)
        ms.counts.append(measure(ms, picked, private_ids, noise))
        tilt = fit_tilt(ms, pool_ids, iterations=iterations, init=[*tilt, np.zeros(ms.n_cells(picked))])
    return ms


class _CellCache:
    """Every candidate query's cell index of every pool row, computed once for all the selection rounds
    (the rounds change only the weights), in the smallest integer type that holds the query's cells; past
    `max_bytes` the remaining candidates' cells are computed again when asked for."""

    def __init__(self, marginals: MarginalSet, pool_ids: np.ndarray, queries: list[tuple[int, ...]],
                 max_bytes: int = 512 << 20) -> None:
        self._marginals, self._pool_ids, self._queries = marginals, pool_ids, queries
        self._cells: list[np.ndarray] = []
        used = 0
        for q in queries:
            n = marginals.n_cells(q)
            dtype = np.uint8 if n <= 1 << 8 else np.uint16 if n <= 1 << 16 else np.int64
            used += len(pool_ids) * np.dtype(dtype).itemsize
            if used > max_bytes:
                break
            self._cells.append(marginals.cells(pool_ids, q).astype(dtype))

    def __getitem__(self, i: int) -> np.ndarray:
        if i < len(self._cells):
            return self._cells[i]
        return self._marginals.cells(self._pool_ids, self._queries[i])


# -- tilt (post-processing) -------------------------------------------------------------------------------

def fit_tilt(marginals: MarginalSet, pool_ids: np.ndarray, iterations: int = 100,
             prior_std: float = 1.0, init: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Fit lambda, the tilt of the pool's weights exp(sum_q lambda_q[cell]): the maximum a posteriori
    estimate under the measurements' Gaussian likelihood, sum (total p - y)^2 / (2 sigma^2) with p the
    weighted pool's cell shares, y the noisy counts and total the DP row count, and a N(0, prior_std^2)
    prior on every lambda (the model's own distribution is the prior's centre). Where the noise is large
    next to the counts, the tilt stays near zero rather than chase the noise."""
    sizes = [marginals.n_cells(q) for q in marginals.queries]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    cells = np.stack([marginals.cells(pool_ids, q) + o for q, o in zip(marginals.queries, offsets)], axis=1)
    flat = torch.as_tensor(cells.reshape(-1))  # M*Q: every row's cell in every query, one flat index
    target = torch.as_tensor(np.concatenate(marginals.counts))
    precision = torch.as_tensor(np.repeat([1.0 / marginals.noise_std(q) ** 2 for q in marginals.queries], sizes))
    start = np.concatenate(init) if init else np.zeros(int(sum(sizes)))
    lam = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([lam], lr=1.0, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-14)
    n_queries = len(sizes)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        w = torch.softmax(lam[flat].view(-1, n_queries).sum(1), dim=0)
        p = torch.zeros_like(target).scatter_add(0, flat, w.repeat_interleave(n_queries))
        loss = 0.5 * (precision * (total * p - target) ** 2).sum() + 0.5 * (lam ** 2).sum() / prior_std ** 2
        loss.backward()
        return loss

    total = marginals.total
    optimizer.step(closure)
    values = lam.detach().numpy()
    return [values[o:o + size].copy() for o, size in zip(offsets, sizes)]


def resample(marginals: MarginalSet, ids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n rows of `ids` (a pool of model samples) drawn with probability proportional to the weight of the
    tilt fitted on that pool (`stratified_draw`): rows that follow the calibrated distribution."""
    if n == 0 or len(ids) == 0:
        return ids[:0]
    return stratified_draw(ids, log_weights(marginals, ids, fit_tilt(marginals, ids)), n, rng)


def stratified_draw(ids: np.ndarray, logw: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n rows of `ids` [N, d] (value ids), row i drawn an expected n w_i / sum(w) times (w = exp(logw)), in
    random order.

    The draw is systematic resampling over the rows sorted by their columns (fewest distinct values first):
    every row keeps its expected count, but the sorted rows' runs act as nested strata, so the sample's 1-way
    marginals, and the joint ones of the leading columns, match the weighted rows' within a row or two where
    i.i.d. draws would add their sampling noise to every cell. (On CPS 1988 at epsilon 1 this took the 3-way
    TVD of the schema's bins from 0.112 to 0.108, at unchanged ML efficacy.)"""
    order = sorted(range(ids.shape[1]), key=lambda c: (len(np.unique(ids[:, c])), c))
    strata = np.lexsort([ids[:, c] for c in reversed(order)])  # lexsort's last key is the primary one
    ids, logw = ids[strata], logw[strata]
    w = np.exp(logw - logw.max())
    u = (rng.random() + np.arange(n)) / n
    picked = np.searchsorted(np.cumsum(w) / w.sum(), u).clip(0, len(ids) - 1)
    return ids[rng.permutation(picked)]


def log_weights(marginals: MarginalSet, ids: np.ndarray, tilt: list[np.ndarray]) -> np.ndarray:
    """sum_q lambda_q[cell_q(row)] for every row of value ids [N, d]."""
    out = np.zeros(len(ids))
    for q, lam in zip(marginals.queries, tilt):
        out += lam[marginals.cells(ids, q)]
    return out
