"""Measured marginals (`tramontane.synth.marginals`): the budget split against its closed form, the noise
against its standard deviation, the selection against slow references, and the tilt against the
distribution it must reproduce."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tramontane import accounting
from tramontane.accounting import GaussianEvent
from tramontane.dp.noise import SecureRandom
from tramontane.synth import marginals as M
from tramontane.synth.schema import ColumnSpec, Schema


def test_budget_rho_is_the_one_gaussian_release_that_spends_the_budget():
    """Closed-form checks of the accountant's currency: one Gaussian release of the budget's rho spends
    exactly (epsilon, delta), and rho lies between the zCDP conversion's (Bun and Steinke 2016, Prop. 1.3:
    epsilon = rho + 2 sqrt(rho ln 1/delta), looser than the RDP conversion) and epsilon^2 / 2."""
    for eps, delta in ((0.5, 1e-6), (1.0, 1e-5), (10.0, 1e-5)):
        rho = accounting.budget_rho(eps, delta)
        one = GaussianEvent(accounting.gaussian_sigma_for_rho(rho))
        assert accounting.epsilon(one, delta, "rdp") == pytest.approx(eps, rel=1e-3)
        assert accounting.epsilon_of_rho(rho, delta) == pytest.approx(eps, rel=1e-3)
        log_inv = math.log(1 / delta)
        zcdp = (math.sqrt(log_inv + eps) - math.sqrt(log_inv)) ** 2
        assert zcdp < rho < eps ** 2 / 2 + eps


def test_noise_has_the_planned_standard_deviation_and_no_bias():
    schema = Schema([ColumnSpec.categorical("a", list(range(50))), ColumnSpec.categorical("b", list(range(40)))])
    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, 50, 5000), rng.integers(0, 40, 5000)], axis=1)
    ms = M.MarginalSet([(0,), (1,), (0, 1)], [np.arange(50), np.arange(40)], [np.arange(50), np.arange(40)],
                       sigma=7.0, total=5000.0)
    noise = SecureRandom(3, "test noise")
    residuals = []
    for q in ms.queries:
        exact = np.bincount(ms.cells(ids, q), minlength=ms.n_cells(q))
        residuals.append(M.measure(ms, q, ids, noise) - exact)
    r = np.concatenate(residuals)  # 2,090 draws of N(0, 7^2)
    assert len(r) == 50 + 40 + 2000
    assert abs(r.mean()) < 4 * 7 / math.sqrt(len(r))
    assert r.std() == pytest.approx(7.0, rel=0.06)
    assert ms.events() == [GaussianEvent(7.0, 3, label=M.MARGINALS_LABEL)]
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


def _two_column_problem(sigma: float, total: float, rng: np.random.Generator):
    """A pool from independent uniform columns; the truth couples them (b = a most of the time)."""
    pool = rng.integers(0, 4, (40_000, 2))
    a = rng.integers(0, 4, int(total))
    b = np.where(rng.random(len(a)) < 0.7, a, rng.integers(0, 4, len(a)))
    truth = np.stack([a, b], axis=1)
    g = [np.arange(4), np.arange(4)]
    ms = M.MarginalSet([(0,), (1,), (0, 1)], g, g, sigma=sigma, total=float(total))
    noise = SecureRandom(4, "test noise")
    ms.counts = [M.measure(ms, q, truth, noise) for q in ms.queries]
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


# -- adaptive selection (AIM's rounds over the model's samples) ------------------------------------------

def test_planned_rounds_spend_exactly_the_share_in_zcdp():
    for eps, rounds, sel, weight in ((1.0, 30, 0.1, 1.0), (10.0, 5, 0.25, 1.0), (3.0, 0, 0.1, 1.0),
                                     (1.0, 30, 0.1, 4.0), (3.0, 0, 0.1, 2.5)):
        b = M.plan_budget(eps, 1e-5, 0.3, 15, rounds, sel, weight)
        rho = sum(e.count / (2 * e.noise_multiplier ** 2) if isinstance(e, GaussianEvent) else e.rho
                  for e in b.events())
        assert rho == pytest.approx(0.3 * accounting.budget_rho(eps, 1e-5), rel=1e-12)
        assert b.measurements == 15 + rounds
        gaussians = [e for e in b.events() if isinstance(e, GaussianEvent)]
        assert sum(e.count for e in gaussians) == 15 + rounds
        if weight != 1.0:  # each 1-way measurement costs `weight` chosen ones: its noise std 1 / sqrt(weight)
            assert gaussians[0].count == 15
            assert b.one_way_sigma == pytest.approx(b.sigma / math.sqrt(weight), rel=1e-12)
        if rounds:  # each round's selection costs `sel` of the round
            select = b.selection_epsilon ** 2 / 8
            assert select / (select + 1 / (2 * b.sigma ** 2)) == pytest.approx(sel, rel=1e-12)
        # rho composes exactly under the rdp accountant: the events cost what one release of their rho does
        assert accounting.epsilon(b.events(), 1e-5, "rdp") == pytest.approx(
            accounting.epsilon_of_rho(0.3 * accounting.budget_rho(eps, 1e-5), 1e-5), rel=1e-9)


def test_one_way_and_chosen_marginals_get_their_own_noise_and_ledger_events():
    """A set with a cheaper noise on its 1-way marginals: each query's measured noise has its order's
    standard deviation, its events are the plan's (two Gaussian releases, one selection event), and both
    survive the JSON round trip."""
    schema = Schema([ColumnSpec.categorical("a", list(range(40))), ColumnSpec.categorical("b", list(range(30)))])
    rng = np.random.default_rng(5)
    ids = np.stack([rng.integers(0, 40, 3000), rng.integers(0, 30, 3000)], axis=1)
    groups = [np.arange(40), np.arange(30)]
    budget = M.MarginalBudget(sigma=9.0, selection_epsilon=0.5, n_columns=2, rounds=1, one_way_sigma=3.0)
    ms = M.MarginalSet([(0,), (1,), (0, 1)], groups, groups, sigma=9.0, total=3000.0, rounds=1,
                       selection_epsilon=0.5, sigma_1=3.0)
    assert ms.events() == budget.events()
    assert [e.noise_multiplier for e in ms.events() if isinstance(e, GaussianEvent)] == [3.0, 9.0]
    noise = SecureRandom(6, "test noise")
    for query, std in (((0,), 3.0), ((1,), 3.0), ((0, 1), 9.0)):
        exact = np.bincount(ms.cells(ids, query), minlength=ms.n_cells(query))
        draws = np.concatenate([M.measure(ms, query, ids, noise) - exact for _ in range(40)])
        assert np.std(draws) == pytest.approx(std, rel=0.05)
    back = M.MarginalSet.from_dict(json.loads(json.dumps(ms.to_dict())))
    assert back.sigma_1 == 3.0 and back.events() == ms.events()


def test_exponential_mechanism_draws_the_softmax_of_its_qualities():
    """20,000 draws against exp(epsilon q / 2) normalised: a chi-square test, and the scale of epsilon is
    checked by a second, flatter setting."""
    from scipy import stats

    quality = np.array([0.0, 1.0, 2.0, 4.0, -3.0])
    for epsilon in (1.0, 0.2):
        random = SecureRandom(11, "test selection")
        picks = np.bincount([M.exponential_mechanism(quality, epsilon, random) for _ in range(20_000)],
                            minlength=len(quality))
        p = np.exp(epsilon * quality / 2)
        p /= p.sum()
        assert stats.chisquare(picks, 20_000 * p).pvalue > 1e-3


def _xor_table(n: int, rng: np.random.Generator) -> np.ndarray:
    """Four binary columns: c2 = c0 xor c1 (every pair independent, the triple not), c3 independent."""
    a, b, noise = rng.integers(0, 2, (3, n))
    return np.stack([a, b, a ^ b, noise], axis=1)


def test_adaptive_rounds_find_an_interaction_no_pair_shows_and_the_tilt_reproduces_it():
    """Private rows with c2 = c0 xor c1; the model (pool) has the right 1-way marginals but independent
    columns. Every pair is independent in both, so only the triple (0, 1, 2) has an error: the first round
    must pick it, and the tilted pool must then reproduce the xor."""
    rng = np.random.default_rng(12)
    schema = Schema([ColumnSpec.categorical(f"c{i}", [0, 1]) for i in range(4)])
    private = _xor_table(20_000, rng)
    pool = rng.integers(0, 2, (40_000, 4))
    budget = M.plan_budget(20.0, 1e-5, 0.5, 4, 1)
    ms = M.select_adaptive(schema, budget, pool, private, rows=20_000, noise_seed=13)
    assert ms.queries == [(0,), (1,), (2,), (3,), (0, 1, 2)]
    assert ms.events() == budget.events()
    out = M.resample(ms, pool, 20_000, rng)
    assert np.mean(out[:, 2] != out[:, 0] ^ out[:, 1]) < 0.03  # the pool itself: 0.5
    back = M.MarginalSet.from_dict(json.loads(json.dumps(ms.to_dict())))
    assert back.queries == ms.queries and back.events() == ms.events()


def test_the_selection_rounds_cell_cache_gives_every_candidates_cells_past_its_memory_cap():
    """The cache of the pool's cells the rounds reuse against `MarginalSet.cells`, the slow reference, with
    a cap that holds only some candidates (the rest computed when asked for)."""
    rng = np.random.default_rng(15)
    schema = Schema([ColumnSpec.categorical(f"c{i}", list(range(k))) for i, k in enumerate((3, 300, 5, 2))])
    pool = np.stack([rng.integers(0, spec.n_values, 1000) for spec in schema.columns], axis=1)
    groups = [np.arange(spec.n_values) for spec in schema.columns]
    ms = M.MarginalSet([], groups, groups, sigma=1.0, total=1000.0, groups_3=groups)
    queries = [(0, 2), (1, 3), (0, 1, 2), (0, 2, 3)]  # 15, 600, 4500 and 30 cells
    cache = M._CellCache(ms, pool, queries, max_bytes=1000 + 2000 + 2000)
    assert [c.dtype for c in cache._cells] == [np.uint8, np.uint16, np.uint16]  # the fourth past the cap
    for i, q in enumerate(queries):
        np.testing.assert_array_equal(cache[i], ms.cells(pool, q))


def test_adaptive_selection_is_blind_when_its_epsilon_is_tiny():
    """At a vanishing selection epsilon the chosen marginal no longer depends on the data: over seeds the
    xor triple is picked about as often as any other of the 10 candidates (6 pairs, 4 triples)."""
    rng = np.random.default_rng(14)
    schema = Schema([ColumnSpec.categorical(f"c{i}", [0, 1]) for i in range(4)])
    private, pool = _xor_table(2_000, rng), rng.integers(0, 2, (4_000, 4))
    budget = M.MarginalBudget(sigma=1.0, selection_epsilon=1e-9, n_columns=4, rounds=1)
    picks = [M.select_adaptive(schema, budget, pool, private, rows=2_000, noise_seed=s, iterations=2).queries[-1]
             for s in range(60)]
    assert picks.count((0, 1, 2)) < 20  # 6 expected; an informed choice would take all 60


def test_the_stratified_draw_keeps_each_rows_expected_count_and_the_weighted_marginals():
    """Against closed forms: over repeated draws each row's mean count is n w_i / sum(w) (unbiased, like an
    i.i.d. draw); within one draw every value's count of the column with the fewest values is its weighted
    share of n within one row, and the other column's within a few, where an i.i.d. draw of the same weights
    is off by tens of rows (its binomial standard deviation)."""
    rng = np.random.default_rng(11)
    pool = np.stack([rng.integers(0, 3, 600), rng.integers(0, 40, 600)], axis=1)
    logw = rng.normal(0.0, 1.0, 600)
    w = np.exp(logw) / np.exp(logw).sum()
    n = 3000
    # the rows' identities: every pool row is distinct once its index is a third column of many values
    tagged = np.concatenate([pool, np.arange(600)[:, None]], axis=1)
    counts = np.zeros(600)
    draws = 400
    for _ in range(draws):
        counts += np.bincount(M.stratified_draw(tagged, logw, n, rng)[:, 2], minlength=600)
    expected = n * w
    # systematic resampling: a row's count is floor or ceil of n w_i, so its mean over draws is within
    # 4 standard errors (the count's variance is at most 1/4) of n w_i
    assert np.all(np.abs(counts / draws - expected) <= 4 * 0.5 / math.sqrt(draws) + 1e-9)
    out = M.stratified_draw(pool, logw, n, rng)
    for column, tolerance in ((0, 1.0), (1, 3.0)):
        weighted = n * np.bincount(pool[:, column], weights=w, minlength=pool[:, column].max() + 1)
        drawn = np.bincount(out[:, column], minlength=len(weighted))
        assert np.abs(drawn - weighted).max() <= tolerance + 1e-9, column
    iid = pool[rng.choice(600, size=n, p=w)]
    weighted = n * np.bincount(pool[:, 0], weights=w, minlength=3)
    assert np.abs(np.bincount(iid[:, 0], minlength=3) - weighted).max() > 3.0  # the noise the strata remove
