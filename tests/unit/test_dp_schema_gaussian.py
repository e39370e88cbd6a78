"""The Gaussian (zCDP) schema inference: its calibration against the accountant, its mechanisms' keep rates
against their closed forms, the ledger it charges, and what one added row can change.

Windows are 4 binomial standard deviations on enough draws that a noise scale 1.1x off, a threshold with the
wrong delta, or the split of the budget charged but not drawn fails.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from tramontane import accounting
from tramontane.accounting import DpSgdEvent, EpsilonDeltaEvent, GaussianEvent
from tramontane.errors import PrivacyParameterError, SchemaError, TramontaneWarning
from tramontane.synth import dp_schema
from tramontane.synth.dp_schema import (
    GAUSSIAN_KIND_SHARE,
    OTHER_SHARE,
    OTHER_Z,
    dp_other_count,
    gaussian_category_set,
    gaussian_column_kind,
    gaussian_numeric_bins,
    gaussian_sigma,
    infer_schema,
    schema_budget,
    schema_share,
    threshold_charge,
    threshold_deltas,
)

phi = NormalDist().cdf
inv_phi = NormalDist().inv_cdf


@contextmanager
def _seeded() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        yield


def _window(p: float, n: int, sds: float = 4.0) -> float:
    return sds * math.sqrt(p * (1 - p) / n)


# -- calibration against the accountant -------------------------------------------------------------------

def test_gaussian_sigma_is_the_zcdp_closed_form_the_accountant_composes() -> None:
    """rho = 1/(2 sigma^2): RDP rho * alpha at every order; one event of the summed rho is exactly the
    composition of the per-mechanism Gaussians (the inference charges one)."""
    rho = 0.0123
    sigma = gaussian_sigma(rho)
    assert sigma == pytest.approx(1 / math.sqrt(2 * rho))
    orders, rdp = accounting.rdp_curve([GaussianEvent(sigma)])
    assert rdp == pytest.approx(np.asarray(orders) * rho, rel=1e-9)
    parts = [GaussianEvent(gaussian_sigma(f * rho)) for f in (0.1, 0.765, 0.135)]
    assert accounting.rdp_curve(parts)[1] == pytest.approx(rdp, rel=1e-9)
    one, composed = (accounting.epsilon(e, 1e-5, "pld") for e in ([GaussianEvent(sigma)], parts))
    assert one == pytest.approx(composed, rel=1e-3)


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_the_schema_budget_is_a_share_of_the_whole_ledger(epsilon: float) -> None:
    delta, share = 1e-5, 0.3
    b = schema_budget(epsilon, delta, share)
    rho_total = b.rho / share
    # rho_total is the one Gaussian release that spends exactly (epsilon, delta): the project's calibration
    assert accounting.epsilon([GaussianEvent(gaussian_sigma(rho_total))], delta) == pytest.approx(epsilon, rel=1e-3)
    assert b.delta == pytest.approx(share * delta)
    events = [GaussianEvent(gaussian_sigma(b.rho)), EpsilonDeltaEvent(0.0, b.delta, "schema inference")]
    rest = GaussianEvent(gaussian_sigma(rho_total - b.rho))
    assert accounting.epsilon([rest], delta - b.delta) == pytest.approx(epsilon - b.epsilon_share, rel=1e-9)
    # the whole: the schema's share and the rest compose to the budget (up to the threshold's delta)
    assert accounting.epsilon([*events, rest], delta) == pytest.approx(epsilon, rel=0.03)
    # a share of rho costs far less than the same share of epsilon would under basic composition
    assert 0 < b.epsilon_share < 0.6 * share * epsilon


def test_tight_composition_leaves_dp_sgd_less_noise_than_basic_composition() -> None:
    """The point of the Gaussian inference: DP-SGD calibrated after it needs less noise than after the same
    share charged as an (epsilon, delta) event, and the whole ledger still meets the budget exactly."""
    epsilon, delta, share, q, steps = 1.0, 1e-5, 0.1, 0.02, 500
    b = schema_budget(epsilon, delta, share)
    gaussian = [GaussianEvent(gaussian_sigma(b.rho)), EpsilonDeltaEvent(0.0, b.delta, "schema inference")]
    basic = [EpsilonDeltaEvent(share * epsilon, share * delta, "schema inference")]
    tight = accounting.calibrate_noise_multiplier(epsilon, delta, q, steps, prior=gaussian).noise_multiplier
    loose = accounting.calibrate_noise_multiplier(epsilon, delta, q, steps, prior=basic).noise_multiplier
    assert tight < 0.97 * loose
    spent = accounting.epsilon([*gaussian, DpSgdEvent(q, tight, steps)], delta)
    assert spent <= epsilon and spent == pytest.approx(epsilon, rel=1e-3)


def test_schema_share_grows_per_column_up_to_the_cap() -> None:
    per = dp_schema.SCHEMA_SHARE_PER_COLUMN
    assert schema_share(1, 0.3) == pytest.approx(per)
    assert schema_share(5, 0.3) == pytest.approx(5 * per)
    assert schema_share(1000, 0.3) == 0.3
    with pytest.raises(PrivacyParameterError, match="share"):
        schema_budget(1.0, 1e-5, 1.0)


def test_threshold_deltas_charge_exactly_the_budget() -> None:
    """k thresholds each passing a value seen once with probability d: the hybrid argument of the module
    docstring charges p / (1 - p), 1 - p = (1 - d)^k; the split makes that exactly delta."""
    for delta in (1e-5, 0.2):
        for k in (1, 3, 15):
            d = threshold_deltas(delta, k)
            p = 1 - (1 - d) ** k
            assert threshold_charge([d] * k) == pytest.approx(p / (1 - p), rel=1e-9)
            assert threshold_charge([d] * k) == pytest.approx(delta, rel=1e-9)
            assert delta / (1 + delta) * (1 - 1e-12) <= d * k <= delta


# -- the mechanisms against their closed forms ------------------------------------------------------------

def test_category_keep_rate_matches_the_gaussian_closed_form() -> None:
    sigma, delta, n = 7.0, 1e-4, 200_000
    tau = 1 + sigma * inv_phi(1 - delta)
    c = round(tau - sigma)  # about one sigma below the threshold
    kept, _, scale, threshold = gaussian_category_set({i: c for i in range(n)}, sigma, delta,
                                                      np.random.default_rng(31))
    assert threshold == pytest.approx(tau) and scale == sigma
    p = 1 - phi((tau - c) / sigma)
    assert len(kept) / n == pytest.approx(p, abs=_window(p, n))
    assert abs((1 - phi((tau - c) / (1.1 * sigma))) - p) > 2 * _window(p, n)  # 1.1x the noise would fail


def test_a_value_seen_once_passes_with_probability_delta() -> None:
    """The delta of the threshold: a candidate that only the added row holds is kept with probability
    exactly delta (here large enough to measure)."""
    sigma, delta, n = 3.0, 0.02, 200_000
    kept, missing, _, _ = gaussian_category_set({i: 1 for i in range(n)}, sigma, delta,
                                                np.random.default_rng(32))
    assert len(kept) / n == pytest.approx(delta, abs=_window(delta, n))
    assert not missing


def test_kind_decision_matches_the_gaussian_closed_form() -> None:
    sigma, n = 10.0, 100_000
    tau = sigma * inv_phi(1 - dp_schema.KIND_BETA / 3)
    c = math.ceil(tau) + 5
    rng = np.random.default_rng(33)
    kinds = [gaussian_column_kind((0, c, 0, 0), sigma, rng)[0] for _ in range(n)]
    p = phi((tau - c) / sigma) * phi(tau / sigma) ** 2  # the integral cell under tau, no empty cell over
    assert sum(k is None for k in kinds) / n == pytest.approx(p, abs=_window(p, n))
    wrong = sum(k not in (None, "integer") for k in kinds)  # an empty cell over tau: KIND_BETA per column
    assert wrong <= 3, wrong
    assert abs(phi((tau - c) / (1.1 * sigma)) * phi(tau / (1.1 * sigma)) ** 2 - p) > 2 * _window(p, n)


def test_other_count_matches_its_closed_form() -> None:
    sigma, c, n = 5.0, 8, 100_000
    rng = np.random.default_rng(34)
    draws = [dp_other_count(c, sigma, rng) for _ in range(n)]
    assert {tau for _, tau in draws} == {OTHER_Z * sigma}
    p = 1 - phi((OTHER_Z * sigma - c) / sigma)
    assert sum(kept for kept, _ in draws) / n == pytest.approx(p, abs=_window(p, n))
    assert abs((1 - phi((OTHER_Z * sigma - c) / (1.1 * sigma))) - p) > 2 * _window(p, n)


def test_numeric_range_keep_rate_matches_the_gaussian_closed_form() -> None:
    """One populated cell of a public range and the missing cell, each of count c: each is found with
    probability P[c + N(0, sigma^2) > tau]; beta is tiny, so no empty cell ever passes."""
    sigma, beta, n = 4.0, 1e-9, 20_000
    cells = 1000 + 3  # the public range's cells, under/overflow, missing
    tau = -sigma * inv_phi(beta / cells)
    c = round(tau - 2 * sigma)  # two sigma under the threshold
    values = np.concatenate([np.full(c, 0.5), np.full(c, np.nan)])
    rng = np.random.default_rng(35)
    found = missing = 0
    taus = set()
    for _ in range(n):
        bins, miss, tau = gaussian_numeric_bins(values, sigma, rng, "float", (0.0, 1.0), beta=beta)
        found += bins is not None
        missing += miss
        taus.add(tau)
    assert len(taus) == 1 and taus.pop() == pytest.approx(tau)
    p = 1 - phi((tau - c) / sigma)
    assert found / n == pytest.approx(p, abs=_window(p, n)) and missing / n == pytest.approx(p, abs=_window(p, n))
    assert abs((1 - phi((tau - c) / (1.1 * sigma))) - p) > 2 * _window(p, n)


# -- the inference: wiring, ledger, refusals ---------------------------------------------------------------

def _table(n: int = 4000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": np.clip(np.round(rng.normal(40, 12, n)), 17, 90).astype(np.int64),
                         "color": rng.choice(["red", "green", "blue"], n),
                         "income": np.round(rng.lognormal(10, 1, n), 2),
                         "size": rng.choice(["S", "M", "L"], n)})


def test_each_mechanism_draws_the_noise_its_share_of_rho_says() -> None:
    rho, delta = 0.01, 1e-6
    with _seeded():
        r = infer_schema(_table(), rho=rho, delta=delta, seed=1, kinds={"size": "categorical"})
    assert [s.kind for s in r.schema] == ["integer", "categorical", "float", "categorical"]
    rho_c = rho / 4
    k = 3  # age, color, income may turn out categorical (kinds undeclared); size is declared
    assert k == len([c for c in ("age", "color", "income", "size") if c != "nothing"]) - 1
    delta_c = threshold_deltas(delta, 4)  # age, color, income undecided, size declared: all may be categorical
    by = {(s.column, s.mechanism): s for s in r.spend}
    for column in ("age", "color", "income"):
        kind = by[column, dp_schema.GAUSSIAN_KIND_MECHANISM]
        assert kind.rho == pytest.approx(GAUSSIAN_KIND_SHARE * rho_c)
        assert kind.threshold == pytest.approx(kind.noise_scale * inv_phi(1 - dp_schema.KIND_BETA / 3))
    assert ("size", dp_schema.GAUSSIAN_KIND_MECHANISM) not in by  # a declared kind costs nothing
    for column, rest in (("color", (1 - GAUSSIAN_KIND_SHARE) * rho_c), ("size", rho_c)):
        values = by[column, dp_schema.GAUSSIAN_CATEGORY_MECHANISM]
        other = by[column, dp_schema.GAUSSIAN_OTHER_MECHANISM]
        assert values.rho == pytest.approx((1 - OTHER_SHARE) * rest) and other.rho == pytest.approx(OTHER_SHARE * rest)
        assert values.delta == pytest.approx(delta_c)
        assert values.threshold == pytest.approx(1 + values.noise_scale * inv_phi(1 - delta_c))
    for column in ("age", "income"):
        hist = by[column, dp_schema.GAUSSIAN_NUMERIC_MECHANISM]
        assert hist.rho == pytest.approx((1 - GAUSSIAN_KIND_SHARE) * rho_c)
    for s in r.spend:
        assert s.noise == "gaussian" and s.epsilon == 0.0
        assert s.noise_scale == pytest.approx(gaussian_sigma(s.rho))
    assert sum(s.rho for s in r.spend) == pytest.approx(rho)
    gauss, thresholds = r.ledger_events()
    assert isinstance(gauss, GaussianEvent) and gauss.noise_multiplier == pytest.approx(gaussian_sigma(rho))
    assert isinstance(thresholds, EpsilonDeltaEvent) and thresholds.epsilon == 0
    assert thresholds.delta == pytest.approx(delta, rel=1e-9) and r.delta == pytest.approx(delta, rel=1e-9)
    assert all(e.label.startswith("schema inference") for e in r.ledger_events())
    assert r.epsilon == 0.0 and r.rho == rho  # no epsilon of its own until a caller composes it
    notes = [n for n in r.notes if n.startswith("column 'color'")]
    assert notes == [c.text() for c in r.columns if c.column == "color"] and "rho" in notes[0]


def test_inferred_category_sets_match_the_closed_form_at_a_realistic_rho() -> None:
    """End to end, no spies: 12000 values x 12 rows (two sigma under the threshold) in a declared categorical
    column. The kept share must be the keep rate of the documented split (values (1 - OTHER_SHARE) of rho,
    delta for the threshold)."""
    k, c = 12_000, 12
    df = pd.DataFrame({"a": [f"a{i}" for i in range(k) for _ in range(c)]})
    rho, delta = 0.04, 1e-6
    with _seeded():
        r = infer_schema(df, rho=rho, delta=delta, seed=2, kinds={"a": "categorical"}, max_categories=k)
    sigma = gaussian_sigma((1 - OTHER_SHARE) * rho)
    tau = 1 + sigma * inv_phi(1 - delta)
    assert round(tau - 2 * sigma) == c
    p = 1 - phi((tau - c) / sigma)
    share = len([v for v in r.schema["a"].categories if v != "__other__"]) / k
    assert share == pytest.approx(p, abs=_window(p, k))
    assert abs((1 - phi((tau - c) / (1.1 * sigma))) - p) > 2 * _window(p, k)
    assert r.schema["a"].other  # most rows hold values left out: they go to "other"
    assert len(r.schema.conform(df)) == len(df)


def test_a_failure_charges_the_whole_planned_budget() -> None:
    df = pd.DataFrame({"n": [1, 2, 3, 4, 5, 6], "c": list("abcabc")})
    with _seeded(), pytest.raises(SchemaError, match="'n': too few rows to decide its kind") as info:
        infer_schema(df, rho=0.01, delta=1e-6, seed=3)
    events = info.value.events
    assert [type(e) for e in events] == [GaussianEvent, EpsilonDeltaEvent]
    assert events[0].noise_multiplier == pytest.approx(gaussian_sigma(0.01))
    assert events[1].delta == pytest.approx(1e-6)
    assert "rho=0.01" in str(info.value) and "a" not in [s.column for s in info.value.spend]


def test_the_budget_options_are_checked() -> None:
    df = _table(200)
    with pytest.raises(PrivacyParameterError, match="not both"):
        infer_schema(df, epsilon=1.0, rho=0.1, delta=1e-6)
    with pytest.raises(PrivacyParameterError, match="rho"):
        infer_schema(df, rho=-1.0, delta=1e-6)
    with pytest.raises(PrivacyParameterError, match="Gaussian"):
        infer_schema(df, rho=0.1, delta=1e-6, noise="laplace")
    with pytest.raises(PrivacyParameterError, match="delta"):
        infer_schema(df, rho=0.1)  # text columns may be categorical: the threshold needs delta


# -- neighbouring tables ----------------------------------------------------------------------------------

def test_one_added_row_changes_only_dp_outcomes() -> None:
    """D against D plus a row holding a value of its own, a far-off number and a missing entry: the ledger is
    the same (it depends on the budget and the column names only), the row's value enters the schema with
    the threshold's probability (closed form) and never without it, and the far-off number does not move
    the range more often than on D."""
    base = _table(3000, seed=4)[["color", "income"]]
    extra = pd.DataFrame({"color": ["SECRET"], "income": [3e8]})
    neighbour = pd.concat([base, extra, pd.DataFrame({"color": [None], "income": [np.nan]})], ignore_index=True)
    rho, delta, runs = 0.02, 0.4, 400  # a large delta, so that the threshold's delta can be measured
    d = threshold_deltas(delta, 2)
    secret = {"d": 0, "n": 0}
    far = {"d": 0, "n": 0}
    ledgers = set()
    rng = np.random.default_rng(5)
    with _seeded():
        for _ in range(runs):
            for name, table in (("d", base), ("n", neighbour)):
                r = infer_schema(table, rho=rho, delta=delta, seed=int(rng.integers(2**32)))
                secret[name] += "SECRET" in r.schema["color"].categories
                far[name] += r.schema["income"].hi > 1e7
                ledgers.add(tuple(r.ledger_events()))
    assert len(ledgers) == 1
    assert secret["d"] == 0
    assert secret["n"] / runs == pytest.approx(d, abs=_window(d, runs))
    assert far["d"] == 0 and far["n"] <= 2
