"""Measured marginals (`tramontane.synth.marginals`): the budget split against its closed form, the noise
against its standard deviation, the selection against slow references, and the tilt against the
distribution it must reproduce."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.sparse.csgraph import minimum_spanning_tree

from tramontane import accounting
from tramontane.accounting import GaussianEvent
from tramontane.synth import marginals as M
from tramontane.synth.schema import ColumnSpec, Schema


def test_rho_share_converts_back_to_the_budget():
    for eps, delta in ((0.5, 1e-6), (1.0, 1e-5), (10.0, 1e-5)):
        rho = M.zcdp_rho(eps, delta)
        assert rho + 2 * math.sqrt(rho * math.log(1 / delta)) == pytest.approx(eps, rel=1e-12)
        assert M.epsilon_after_share(eps, delta, 0.0) == pytest.approx(eps, rel=1e-12)
        # Q Gaussian releases at the planned sigma cost exactly the share of rho: Q / (2 sigma^2)
        sigma = M.noise_for_share(eps, delta, 0.3, 45)
        assert 45 / (2 * sigma ** 2) == pytest.approx(0.3 * rho, rel=1e-12)


def test_planned_marginals_fit_the_budget_with_the_accountant():
    """The share is planned in zCDP terms; the RDP accountant, which is tighter than the zCDP conversion,
    must find the marginals alone well inside the budget."""
    eps, delta = 1.0, 1e-5
    sigma = M.noise_for_share(eps, delta, 0.3, 45)
    spent = accounting.epsilon([GaussianEvent(sigma, 45)], delta, "rdp")
    assert 0 < spent < M.epsilon_after_share(eps, delta, 0.7) + 1e-9


def test_noise_has_the_planned_standard_deviation_and_no_bias():
    schema = Schema([ColumnSpec.categorical("a", list(range(50))), ColumnSpec.categorical("b", list(range(40)))])
    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, 50, 5000), rng.integers(0, 40, 5000)], axis=1)
    ms = M.MarginalSet([(0,), (1,), (0, 1)], [np.arange(50), np.arange(40)], [np.arange(50), np.arange(40)],
                       sigma=7.0, total=5000.0)
    M.measure(ms, ids, noise_seed=3)
    residuals = []
    for q, noisy in zip(ms.queries, ms.counts):
        exact = np.bincount(ms.cells(ids, q), minlength=ms.n_cells(q))
        residuals.append(noisy - exact)
    r = np.concatenate(residuals)  # 2,090 draws of N(0, 7^2)
    assert len(r) == 50 + 40 + 2000
    assert abs(r.mean()) < 4 * 7 / math.sqrt(len(r))
    assert r.std() == pytest.approx(7.0, rel=0.06)
    assert ms.event() == GaussianEvent(7.0, 3, label=M.MARGINALS_LABEL)
    del schema


def test_ordered_groups_are_contiguous_and_balanced():
    rng = np.random.default_rng(1)
    ids = np.concatenate([np.zeros(5000, dtype=np.int64), rng.integers(1, 100, 5000)])  # an atom at 0
    groups = M.column_groups(ids, 101, ordered=True, max_groups=8, missing_id=100)
    assert (np.diff(groups[:100]) >= 0).all()  # contiguous runs in value order
    assert groups[100] == groups.max() and groups[100] not in groups[:100]  # missing alone
    assert groups[0] not in groups[1:100]  # the atom (half the mass) is a group of its own
    mass = np.bincount(groups[ids], minlength=groups.max() + 1) / len(ids)
    assert mass[1:-1].max() < 2.5 / 8  # no run far above its share


def test_unordered_groups_keep_the_frequent_values_and_merge_the_rest():
    ids = np.repeat(np.arange(10), [400, 300, 100, 50, 50, 40, 30, 20, 5, 5])
    groups = M.column_groups(ids, 12, ordered=False, max_groups=4)
    assert len(set(groups[:3])) == 3  # the three most frequent alone
    assert len(set(groups[3:])) == 1 and groups[3] not in groups[:3]  # the rest (and unseen 10, 11) together
    # min_mass: a value below it is not kept alone, and no more than 1 / min_mass groups
    groups = M.column_groups(ids, 12, ordered=False, max_groups=12, min_mass=0.09)
    assert len(set(groups[:3])) == 3 and len(set(groups[3:])) == 1


def test_spanning_tree_is_the_maximum_one():
    rng = np.random.default_rng(2)
    for d in (2, 5, 9):
        w = rng.random((d, d))
        w = (w + w.T) / 2
        np.fill_diagonal(w, 0)
        edges = M.spanning_tree(w)
        assert len(edges) == d - 1
        reference = -minimum_spanning_tree(-w).toarray()  # scipy's on negated weights
        assert sum(w[i, j] for i, j in edges) == pytest.approx(reference.sum())


def test_mutual_information_matches_the_closed_form():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, 200_000)
    flip = rng.random(len(a)) < 0.1
    b = np.where(flip, 1 - a, a)
    # I(A;B) for a fair bit through a binary symmetric channel with crossover 0.1: ln 2 - H(0.1)
    h = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    assert M.mutual_information(a, b, 2, 2) == pytest.approx(math.log(2) - h, abs=3e-3)


def _two_column_problem(sigma: float, total: float, rng: np.random.Generator):
    """A pool from independent uniform columns; the truth couples them (b = a most of the time)."""
    pool = rng.integers(0, 4, (40_000, 2))
    a = rng.integers(0, 4, int(total))
    b = np.where(rng.random(len(a)) < 0.7, a, rng.integers(0, 4, len(a)))
    truth = np.stack([a, b], axis=1)
    g = [np.arange(4), np.arange(4)]
    ms = M.MarginalSet([(0,), (1,), (0, 1)], g, g, sigma=sigma, total=float(total))
    M.measure(ms, truth, noise_seed=4)
    return pool, truth, ms


def _joint(ids: np.ndarray) -> np.ndarray:
    return np.bincount(ids[:, 0] * 4 + ids[:, 1], minlength=16) / len(ids)


def test_tilt_reproduces_the_measured_joint_when_noise_is_small():
    rng = np.random.default_rng(5)
    pool, truth, ms = _two_column_problem(sigma=1.0, total=20_000, rng=rng)
    out = M.resample(ms, pool, 20_000, rng)
    assert 0.5 * np.abs(_joint(pool) - _joint(truth)).sum() > 0.4  # the pool is far from the truth
    assert 0.5 * np.abs(_joint(out) - _joint(truth)).sum() < 0.03  # the tilted draw is close to it


def test_tilt_stays_near_the_model_when_noise_swamps_the_counts():
    rng = np.random.default_rng(6)
    pool, _, ms = _two_column_problem(sigma=5_000.0, total=200, rng=rng)
    out = M.resample(ms, pool, 20_000, rng)
    assert 0.5 * np.abs(_joint(out) - _joint(pool)).sum() < 0.05


def test_a_marginal_set_survives_its_json_round_trip():
    rng = np.random.default_rng(7)
    pool, _, ms = _two_column_problem(sigma=2.0, total=1000, rng=rng)
    back = M.MarginalSet.from_dict(json.loads(json.dumps(ms.to_dict())))
    assert back.queries == ms.queries and back.sigma == ms.sigma and back.total == ms.total
    for x, y in zip(back.counts, ms.counts):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(M.log_weights(back, pool, M.fit_tilt(back, pool)),
                                  M.log_weights(ms, pool, M.fit_tilt(ms, pool)))


def test_select_measures_every_column_and_the_planned_number_of_pairs():
    schema = Schema([ColumnSpec.categorical(f"c{i}", list(range(5))) for i in range(6)])
    rng = np.random.default_rng(8)
    base = rng.integers(0, 5, 3000)
    ids = np.stack([np.where(rng.random(3000) < 0.8, base, rng.integers(0, 5, 3000)) for _ in range(6)], axis=1)
    for ppc in (1.0, 2.0):
        ms = M.select(schema, ids, sigma=1.0, rows=3000, pairs_per_column=ppc)
        assert ms.queries[:6] == [(i,) for i in range(6)]
        assert len(ms.queries) == M.n_queries(6, ppc)
        pairs = ms.queries[6:]
        assert len(set(pairs)) == len(pairs) and all(i < j for i, j in pairs)
