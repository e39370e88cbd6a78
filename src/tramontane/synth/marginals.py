"""Measured marginals that calibrate what the language model samples.

A DP language model learns the joint of a table's columns, but its low-order marginals carry the error of a
short, noisy optimisation. Marginal-based synthesizers (MST, AIM: McKenna, Miklau, Sheldon 2021; McKenna et
al. 2022) are the reverse: accurate low-order marginals, no higher-order structure beyond their model. This
module combines the two:

1. **Select** (free): from rows sampled from the trained model (a DP release, so anything computed from them
   is post-processing) group each column's values into at most `max_groups` groups of similar mass (an
   ordered column into contiguous runs of bins, a categorical one into its most frequent values plus one
   group for the rest), and pick the column pairs of a maximum spanning tree of the sampled rows' mutual
   information (MST's structure, chosen here without spending anything).
2. **Measure**: every column's 1-way marginal and every tree pair's 2-way marginal over those groups, on the
   private rows, each with Gaussian noise of the same standard deviation. One row adds one to exactly one
   cell of each marginal, so the Q marginals are Q sensitivity-1 Gaussian releases: one
   `GaussianEvent(sigma, Q)` on the ledger.
3. **Tilt** (post-processing, at every `sample`): weights exp(sum_q lambda_q[cell_q(row)]) over a pool of
   rows freshly sampled from the model, lambda the maximum a posteriori fit of the noisy marginals (the
   exponential-family change of the model's distribution that best explains the measurements; `fit_tilt`),
   then n rows drawn from the pool with probability proportional to their weight (`resample`). The tilt is
   fitted on the very pool it weights: an additive tilt over overlapping marginals extrapolates badly to
   cell combinations a different pool did not contain.

The noise standard deviation is planned before training from a share of the budget in zCDP terms
(`noise_for_share`), so that DP-SGD's noise is calibrated for the whole ledger, marginals included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tramontane.accounting import GaussianEvent
from tramontane.dp.noise import SecureRandom
from tramontane.synth.schema import Schema

MARGINALS_LABEL = "marginals"


def zcdp_rho(epsilon: float, delta: float) -> float:
    """The rho whose zCDP guarantee converts to (epsilon, delta): epsilon = rho + 2 sqrt(rho ln(1/delta))
    (Bun and Steinke 2016, Prop. 1.3). Used only to split a budget; the ledger's accountant composes."""
    log_inv = math.log(1.0 / delta)
    return (math.sqrt(log_inv + epsilon) - math.sqrt(log_inv)) ** 2


def noise_for_share(epsilon: float, delta: float, share: float, n_queries: int) -> float:
    """Per-query Gaussian noise std for `n_queries` sensitivity-1 queries spending `share` of the budget's
    rho: Q releases at noise sigma cost Q / (2 sigma^2)."""
    rho = share * zcdp_rho(epsilon, delta)
    return math.sqrt(n_queries / (2.0 * rho))


def epsilon_after_share(epsilon: float, delta: float, share: float) -> float:
    """The epsilon of what is left of (epsilon, delta)'s rho once `share` of it is spent (an estimate for
    planning; the accountant calibrates exactly)."""
    rho = (1.0 - share) * zcdp_rho(epsilon, delta)
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def n_pairs(n_columns: int, pairs_per_column: float = 1.0) -> int:
    """How many column pairs are measured: the d - 1 of a spanning tree, and more up to about
    `pairs_per_column` x d (at most all d (d - 1) / 2)."""
    d = n_columns
    return min(d * (d - 1) // 2, max(d - 1, round(pairs_per_column * d)))


def n_queries(n_columns: int, pairs_per_column: float = 1.0) -> int:
    """How many marginals are measured: every column, and `n_pairs` pairs."""
    return n_columns + n_pairs(n_columns, pairs_per_column)


# -- selection (post-processing of model samples) --------------------------------------------------------

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


def mutual_information(a: np.ndarray, b: np.ndarray, na: int, nb: int) -> float:
    """Empirical mutual information (nats) of two code columns."""
    joint = np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb).astype(np.float64)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def spanning_tree(weights: np.ndarray) -> list[tuple[int, int]]:
    """Edges (i < j) of a maximum spanning tree of a symmetric weight matrix (Prim)."""
    d = weights.shape[0]
    if d < 2:
        return []
    inside = np.zeros(d, dtype=bool)
    inside[0] = True
    best = weights[0].copy()
    parent = np.zeros(d, dtype=np.int64)
    edges = []
    for _ in range(d - 1):
        candidates = np.where(inside, -np.inf, best)
        j = int(np.argmax(candidates))
        i = int(parent[j])
        edges.append((min(i, j), max(i, j)))
        inside[j] = True
        better = (weights[j] > best) & ~inside
        best[better] = weights[j][better]
        parent[better] = j
    return sorted(edges)


@dataclass
class MarginalSet:
    """The measured marginals: which, over which groups, and their noisy counts (DP).

    queries: column-index tuples (schema order); groups: per column, the group of each value id (one grouping
    for 1-way marginals, a coarser one for pairs); counts: noisy cell counts per query (row-major over the
    query's columns' groups); sigma: the noise std of every cell; total: the DP row count the counts are
    compared with.
    """

    queries: list[tuple[int, ...]]
    groups_1: list[np.ndarray]
    groups_2: list[np.ndarray]
    sigma: float
    total: float
    counts: list[np.ndarray] = field(default_factory=list)

    def grouping(self, query: tuple[int, ...]) -> list[np.ndarray]:
        g = self.groups_1 if len(query) == 1 else self.groups_2
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

    def event(self) -> GaussianEvent:
        return GaussianEvent(self.sigma, len(self.queries), label=MARGINALS_LABEL)

    def to_dict(self) -> dict[str, Any]:
        return {"queries": [list(q) for q in self.queries], "groups_1": [g.tolist() for g in self.groups_1],
                "groups_2": [g.tolist() for g in self.groups_2], "sigma": self.sigma,
                "total": self.total, "counts": [c.tolist() for c in self.counts]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MarginalSet:
        arr = lambda xs, dtype: [np.asarray(x, dtype=dtype) for x in xs]
        return cls([tuple(q) for q in data["queries"]], arr(data["groups_1"], np.int64),
                   arr(data["groups_2"], np.int64), float(data["sigma"]), float(data["total"]),
                   arr(data["counts"], np.float64))


def select(schema: Schema, sample_ids: np.ndarray, sigma: float, rows: float, max_groups_1: int = 32,
           max_groups_2: int = 8, pairs_per_column: float = 1.0, cell_noise_ratio: float = 3.0) -> MarginalSet:
    """Which marginals to measure, from value ids of rows sampled from the model (post-processing only).

    A group must hold at least `cell_noise_ratio` x sigma of the `rows` (the DP row count) in a 1-way
    marginal, and a pair's groups at least its square root of the rows each, so that the cells of a pair
    hold about as much when the columns are independent: a cell the noise would swamp is merged instead."""
    d = len(schema)
    min_mass = min(1.0, cell_noise_ratio * sigma / max(rows, 1.0))
    groups_1, groups_2 = [], []
    for j, spec in enumerate(schema.columns):
        col = sample_ids[:, j]
        groups_1.append(column_groups(col, spec.n_values, spec.is_numeric, max_groups_1, spec.missing_id,
                                      min_mass))
        groups_2.append(column_groups(col, spec.n_values, spec.is_numeric, max_groups_2, spec.missing_id,
                                      math.sqrt(min_mass)))
    codes = [g[sample_ids[:, j]] for j, g in enumerate(groups_2)]
    sizes = [int(g.max()) + 1 for g in groups_2]
    mi = np.zeros((d, d))
    for i in range(d):
        for j in range(i + 1, d):
            mi[i, j] = mi[j, i] = mutual_information(codes[i], codes[j], sizes[i], sizes[j])
    tree = spanning_tree(mi)
    rest = sorted(((mi[i, j], (i, j)) for i in range(d) for j in range(i + 1, d) if (i, j) not in tree),
                  reverse=True)
    pairs = tree + [pair for _, pair in rest][: n_pairs(d, pairs_per_column) - len(tree)]
    queries = [(j,) for j in range(d)] + pairs
    return MarginalSet(queries, groups_1, groups_2, sigma, float(rows))


# -- measurement (spends) ---------------------------------------------------------------------------------

def measure(marginals: MarginalSet, private_ids: np.ndarray, noise_seed: int | None = None) -> None:
    """Noisy counts of every query on the private rows (the Gaussian mechanism; `marginals.event()` is what
    it spends, and the caller puts it on the ledger before anything derived from it is released)."""
    rng = SecureRandom(noise_seed, "marginal noise")
    counts = []
    for q in marginals.queries:
        exact = np.bincount(marginals.cells(private_ids, q), minlength=marginals.n_cells(q)).astype(np.float64)
        noise = rng.normal(torch.Size([len(exact)]), marginals.sigma, torch.device("cpu"), torch.float64)
        counts.append(exact + noise.numpy())
    marginals.counts = counts


# -- tilt (post-processing) -------------------------------------------------------------------------------

def fit_tilt(marginals: MarginalSet, pool_ids: np.ndarray, iterations: int = 100,
             prior_std: float = 1.0) -> list[np.ndarray]:
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
    precision = 1.0 / marginals.sigma ** 2
    lam = torch.zeros(int(sum(sizes)), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([lam], lr=1.0, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-14)
    n_queries = len(sizes)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        w = torch.softmax(lam[flat].view(-1, n_queries).sum(1), dim=0)
        p = torch.zeros_like(target).scatter_add(0, flat, w.repeat_interleave(n_queries))
        loss = 0.5 * precision * ((total * p - target) ** 2).sum() + 0.5 * (lam ** 2).sum() / prior_std ** 2
        loss.backward()
        return loss

    total = marginals.total
    optimizer.step(closure)
    values = lam.detach().numpy()
    return [values[o:o + size].copy() for o, size in zip(offsets, sizes)]


def resample(marginals: MarginalSet, ids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n rows of `ids` (a pool of model samples) drawn with probability proportional to the weight of the
    tilt fitted on that pool (systematic resampling, in random order): rows that follow the calibrated
    distribution."""
    if n == 0 or len(ids) == 0:
        return ids[:0]
    logw = log_weights(marginals, ids, fit_tilt(marginals, ids))
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
