"""What DP schema inference releases: kinds decided with DP from the values (never from pandas' dtype guess),
errors that quote no private value, and each mechanism wired to the budget it records.

Wiring is checked twice: spies wrap the real mechanism functions and compare what each one receives with what
`SchemaInference.spend` records (and the documented split of the budget), and the mechanisms' keep rates are
compared with their closed forms on enough draws that a noise scale 1.1x too small fails by many standard
deviations.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tramontane.datasets import load_adult, read_csv
from tramontane.errors import SchemaError, TramontaneWarning
from tramontane.synth import dp_schema
from tramontane.synth.dp_schema import (
    analytic_gaussian_sigma,
    dp_category_set,
    dp_numeric_range,
    gaussian_threshold,
    infer_schema,
    laplace_threshold,
    numeric_threshold,
)

PYTHON_CALLS = ("conform(", "pd.to_numeric", "ranges=", "known=", "err.spend", "kinds=", "df.drop",
                "schema.select")


@pytest.fixture(scope="module")
def adult() -> pd.DataFrame:
    return load_adult("train")


@contextmanager
def _seeded() -> Iterator[None]:
    """Tests fix the seed on purpose: silence the warning that says so."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        yield


def _ages(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": np.clip(np.round(rng.normal(40, 8, n)), 18, 90).astype(np.int64),
                         "color": rng.choice(["red", "green", "blue"], n)})


def _kinds(df: pd.DataFrame, seed: int, **kwargs: Any) -> dict[str, str]:
    with _seeded():
        schema = infer_schema(df, epsilon=kwargs.pop("epsilon", 1.0), delta=1e-6, seed=seed, **kwargs).schema
    return {spec.name: spec.kind for spec in schema}


def _binomial_window(p: float, n: int, sds: float = 4.0) -> float:
    return sds * math.sqrt(p * (1 - p) / n)


# -- finding 1: kinds never come from the dtype -------------------------------------------------------------

def test_one_added_row_does_not_flip_a_column_kind() -> None:
    """D vs D + one row holding `unknown` (object dtype) or a missing age (float64 dtype): at epsilon 1 on
    500 rows the kind is the same with overwhelming probability."""
    base = _ages(500)[["age"]]
    text_row = pd.concat([base.astype(object), pd.DataFrame({"age": ["unknown"]})], ignore_index=True)
    missing_row = pd.concat([base, pd.DataFrame({"age": [np.nan]})], ignore_index=True)
    assert text_row["age"].dtype == object and missing_row["age"].dtype == np.float64  # what pandas flips
    for seed in range(30):
        for table in (base, text_row, missing_row):
            assert _kinds(table, seed) == {"age": "integer"}, seed
    # Why it is overwhelming: the kind histogram gets a fifth of epsilon 1; the one odd row lifts the text
    # cell over tau only with the Laplace tail probability beyond tau - 1.
    eps_k = dp_schema.KIND_BUDGET_SHARE * 1.0
    tau = math.log(3 / (2 * dp_schema.KIND_BETA)) / eps_k
    assert 0.5 * math.exp(-eps_k * (tau - 1)) < 1e-5


@pytest.mark.parametrize("seed", [3, 4])
def test_the_same_values_give_the_same_schema_whatever_their_dtype(seed: int) -> None:
    rng = np.random.default_rng(1)
    ages = _ages(2000)["age"].to_numpy()
    scores = np.round(rng.uniform(0, 10, 2000), 2)
    scores[::50] = np.nan
    colors = rng.choice(["red", "green", "blue"], 2000)

    def as_text(x: np.ndarray) -> pd.Series:
        return pd.Series([None if np.isnan(v) else str(float(v)) for v in x], dtype=str)

    tables = [
        pd.DataFrame({"age": ages, "score": scores, "color": colors}),
        pd.DataFrame({"age": ages.astype(np.float64), "score": scores,
                      "color": pd.Series(colors, dtype=object)}),
        pd.DataFrame({"age": pd.Series([str(a) for a in ages], dtype=str), "score": as_text(scores),
                      "color": pd.Series(colors, dtype=str)}),
        pd.DataFrame({"age": pd.Series([str(a) for a in ages], dtype=object),
                      "score": as_text(scores).astype(object), "color": colors}),
    ]
    with _seeded():
        schemas = [infer_schema(t, epsilon=1.0, delta=1e-6, seed=seed).schema for t in tables]
    assert [s.kind for s in schemas[0]] == ["integer", "float", "categorical"]
    assert all(s == schemas[0] for s in schemas[1:])


def test_read_csv_without_a_schema_reads_text_so_no_row_changes_a_dtype(tmp_path) -> None:
    lines = [f"{18 + i % 70},00{i % 7},{i % 3}.5" for i in range(50)]
    plain, odd = tmp_path / "d.csv", tmp_path / "d_plus_one.csv"
    plain.write_text("age,code,score\n" + "\n".join(lines) + "\n")
    odd.write_text("age,code,score\n" + "\n".join(lines) + "\nunknown,,NA\n")
    a, b = read_csv(plain), read_csv(odd)
    assert list(a.dtypes) == list(b.dtypes)
    assert all(pd.api.types.is_string_dtype(t) for t in a.dtypes)
    assert a["code"][0] == "000" and b["age"].iloc[-1] == "unknown"
    assert b["code"].isna().tolist() == [False] * 50 + [True]  # an empty field is the only missing value
    assert b["score"].iloc[-1] == "NA"


def test_non_private_inference_reads_kinds_from_the_values(tmp_path) -> None:
    path = tmp_path / "t.csv"
    rows = "\n".join(f"{20 + i},{i / 4},c{i % 3}" for i in range(40))
    path.write_text("age,score,color\n" + rows + "\n,,\n")
    df = read_csv(path)  # every column text
    with _seeded():
        s = infer_schema(df, allow_non_private=True).schema
    assert [c.kind for c in s] == ["integer", "float", "categorical"]
    assert (s["age"].lo, s["age"].hi) == (20, 59) and s["score"].hi == 9.75
    assert all(c.missing for c in s)
    s.validate(df)
    assert len(s.conform(df)) == 41


def test_text_in_a_numeric_column_is_missing_not_an_error() -> None:
    df = _ages(2000).astype({"age": object})
    df.loc[:199, "age"] = "unknown"  # a tenth: a declared numeric column holds it as missing
    few = df.copy()
    few.loc[60:199, "age"] = 40  # 3%: under KIND_MIN_SHARE, an undeclared column stays numeric too
    for table, kinds in ((df, {"age": "integer"}), (few, None)):
        with _seeded():
            r = infer_schema(table, epsilon=4.0, delta=1e-6, seed=5, kinds=kinds)
        assert r.schema["age"].kind == "integer" and r.schema["age"].missing
        assert 18 <= r.schema["age"].lo and r.schema["age"].hi <= 90 * 1.08  # within a bin of the data
    with _seeded():  # a tenth is text: categorical when the kind is not declared
        assert infer_schema(df, epsilon=4.0, delta=1e-6, seed=5).schema["age"].kind == "categorical"


def test_the_kind_decision_is_charged_to_the_ledger() -> None:
    pytest.importorskip("tramontane.accounting.events")
    df = _ages(1000)
    df["n"] = np.arange(1000) % 17
    with _seeded():
        r = infer_schema(df, epsilon=1.5, delta=1e-6, seed=6, kinds={"n": "integer"})
    kind = [s for s in r.spend if s.mechanism == dp_schema.KIND_MECHANISM]
    assert [s.column for s in kind] == ["age", "color"]  # a declared kind costs nothing
    eps_c = 1.5 / 3
    assert all(s.epsilon == pytest.approx(dp_schema.KIND_BUDGET_SHARE * eps_c) and s.delta == 0 for s in kind)
    labels = [e.label for e in r.ledger_events()]
    assert sum("kind decision" in label for label in labels) == 2 and len(labels) == 5
    assert sum(e.epsilon for e in r.ledger_events()) == pytest.approx(1.5)


def test_too_few_rows_to_decide_a_kind_is_a_failure_that_carries_the_spend() -> None:
    df = pd.DataFrame({"n": [1, 2, 3, 4, 5, 6], "c": list("abcabc")})
    with _seeded(), pytest.raises(SchemaError, match="'n': too few rows to decide its kind") as info:
        infer_schema(df, epsilon=1.0, delta=1e-6, seed=7)
    spend = info.value.spend
    assert {s.mechanism for s in spend} == {dp_schema.KIND_MECHANISM} and len(spend) == 2
    assert sum(s.epsilon for s in spend) == pytest.approx(dp_schema.KIND_BUDGET_SHARE * 1.0)
    assert "declare its kind" in str(info.value)


# -- finding 2: inference errors quote no values and no counts ----------------------------------------------

def test_inference_errors_quote_no_values_counts_or_python_calls() -> None:
    ids = pd.DataFrame({"id": [f"user-{i:05d}" for i in range(5000)], "n": np.arange(5000) % 9})
    ids["n"] = ids["n"].astype(str)
    with pytest.raises(SchemaError, match="'id' has more distinct values than max_categories=1000") as info:
        infer_schema(ids, epsilon=1.0, delta=1e-6)
    messages = [str(info.value)]
    assert "5000" not in messages[0] and "user-" not in messages[0]
    with pytest.raises(SchemaError, match="'id' has more distinct values") as info:
        infer_schema(ids, epsilon=1.0, delta=1e-6, kinds={"id": "categorical"})
    messages.append(str(info.value))
    rare = pd.DataFrame({"c": [f"v{i}" for i in range(60)], "x": np.linspace(0, 1, 60)})
    with _seeded(), pytest.raises(SchemaError, match="threshold") as info:
        infer_schema(rare, epsilon=0.5, delta=1e-9, seed=8, kinds={"c": "categorical", "x": "float"})
    messages.append(str(info.value))
    assert "give a public range for the column" in messages[-1]
    assert "v1" not in messages[-1]
    for msg in messages:
        assert not [call for call in PYTHON_CALLS if call in msg], msg


# -- the mechanisms receive what the ledger records ---------------------------------------------------------

SPIED = ("dp_column_kind", "dp_category_set", "dp_numeric_range")


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any], tuple]]:
    """Wrap the real mechanisms: record (name, bound arguments, result) of every call, in call order."""
    calls: list[tuple[str, dict[str, Any], tuple]] = []
    for name in SPIED:
        real = getattr(dp_schema, name)
        signature = inspect.signature(real)

        def wrapper(*args: Any, _real: Any = real, _name: str = name, _sig: Any = signature, **kwargs: Any):
            bound = _sig.bind(*args, **kwargs)
            bound.apply_defaults()
            out = _real(*args, **kwargs)
            calls.append((_name, dict(bound.arguments), out))
            return out

        monkeypatch.setattr(dp_schema, name, wrapper)
    return calls


@pytest.mark.parametrize("noise", ["laplace", "gaussian"])
def test_each_mechanism_receives_the_budget_it_records(
    adult: pd.DataFrame, monkeypatch: pytest.MonkeyPatch, noise: str
) -> None:
    columns = ["age", "workclass", "fnlwgt", "education", "sex", "hours-per-week", "income"]
    df = adult[columns].head(5000)
    calls = _spy(monkeypatch)
    eps, delta, share = 1.0, 1e-6, dp_schema.KIND_BUDGET_SHARE
    with _seeded():
        r = infer_schema(df, epsilon=eps, delta=delta, noise=noise, seed=9, kinds={"sex": "categorical"},
                         ranges={"hours-per-week": (0, 168)})
    assert len(calls) == len(r.spend) == 6 + 7  # a kind for each undeclared column, then one mechanism each
    eps_c, delta_c = eps / 7, delta / 4  # 7 columns; workclass, education, sex, income categorical
    for (name, args, out), spent in zip(calls, r.spend):
        assert args["epsilon"] == spent.epsilon, (name, spent)  # what it got is what the ledger says
        scale, tau = out[-2], out[-1]
        assert (spent.noise_scale, spent.threshold) == (scale, tau)
        if name == "dp_column_kind":
            assert spent.mechanism == dp_schema.KIND_MECHANISM and spent.column != "sex"
            assert spent.epsilon == pytest.approx(share * eps_c) and spent.delta == 0.0
            assert scale == pytest.approx(1 / spent.epsilon)
            assert tau == pytest.approx(math.log(3 / (2 * dp_schema.KIND_BETA)) / spent.epsilon)
        elif name == "dp_category_set":
            assert args["delta"] == spent.delta == pytest.approx(delta_c) and args["noise"] == noise
            expected = eps_c if spent.column == "sex" else (1 - share) * eps_c
            assert spent.epsilon == pytest.approx(expected), spent.column
            if noise == "laplace":
                assert scale == pytest.approx(1 / spent.epsilon)
                assert tau == pytest.approx(1 + math.log(1 / (2 * spent.delta)) / spent.epsilon)
            else:
                assert scale == pytest.approx(analytic_gaussian_sigma(spent.epsilon, spent.delta / 2))
                assert tau == pytest.approx(gaussian_threshold(scale, spent.delta / 2))
        else:
            assert spent.delta == 0.0 and spent.epsilon == pytest.approx((1 - share) * eps_c)
            assert scale == pytest.approx(1 / spent.epsilon)
            cells = len(args["edges"]) + 2  # + under/overflow, + missing
            assert tau == pytest.approx(math.log(cells / (2 * args["beta"])) / spent.epsilon)
    assert sum(s.epsilon for s in r.spend) == pytest.approx(eps)
    assert sum(s.delta for s in r.spend) == pytest.approx(delta)
    assert sum(a["epsilon"] for _, a, _ in calls) == pytest.approx(eps)
    assert sum(a.get("delta", 0.0) for _, a, _ in calls) == pytest.approx(delta)


# -- the mechanisms against their closed forms --------------------------------------------------------------

def test_category_keep_rate_matches_the_laplace_closed_form() -> None:
    eps, delta, n = 1.0, 0.5 * math.exp(-6.0), 200_000
    tau = 1 + math.log(1 / (2 * delta)) / eps  # 7, up to rounding
    c = round(tau) - 1  # one below the threshold: kept only when the noise lifts it
    counts = {i: c for i in range(n)}
    kept, _, scale, threshold = dp_category_set(counts, eps, delta, np.random.default_rng(21))
    assert threshold == pytest.approx(tau) and scale == pytest.approx(1 / eps)
    p = 0.5 * math.exp(-eps * (tau - c))  # P[c + Lap(1/eps) > tau]
    assert len(kept) / n == pytest.approx(p, abs=_binomial_window(p, n))
    assert abs(0.5 * math.exp(-1.1 * eps * (tau - c)) - p) > 2 * _binomial_window(p, n)  # 1.1x would fail


def test_category_keep_rate_matches_the_analytic_gaussian_closed_form() -> None:
    eps, delta, n = 1.0, 1e-3, 200_000
    sigma = analytic_gaussian_sigma(eps, delta / 2)
    # Balle and Wang 2018, Thm. 8, written out: sigma makes the sensitivity-1 Gaussian (eps, delta/2)-DP.
    phi = NormalDist().cdf
    balle_wang = phi(0.5 / sigma - eps * sigma) - math.exp(eps) * phi(-0.5 / sigma - eps * sigma)
    assert balle_wang == pytest.approx(delta / 2, rel=1e-6)
    tau = 1 + sigma * NormalDist().inv_cdf(1 - delta / 2)
    c = round(tau - sigma)  # about one sigma below the threshold
    counts = {i: c for i in range(n)}
    rng = np.random.default_rng(22)
    kept, _, scale, threshold = dp_category_set(counts, eps, delta, rng, noise="gaussian")
    assert threshold == pytest.approx(tau) and scale == pytest.approx(sigma)
    p = 1 - phi((tau - c) / sigma)
    assert len(kept) / n == pytest.approx(p, abs=_binomial_window(p, n))
    assert abs((1 - phi(1.1 * (tau - c) / sigma)) - p) > 2 * _binomial_window(p, n)


def test_numeric_range_keep_rate_matches_the_closed_form() -> None:
    """One populated cell and the missing cell, each of count c; beta tiny so no empty cell ever passes."""
    eps, beta, n = 1.0, 1e-9, 100_000
    edges = np.array([0.0, 1.0])  # cells: under, [0, 1], over, missing
    tau = math.log(4 / (2 * beta)) / eps
    c = math.ceil(tau) - 2
    values = np.concatenate([np.full(c, 0.5), np.full(c, np.nan)])
    rng = np.random.default_rng(23)
    found = missing = 0
    for _ in range(n):
        lo, hi, miss, scale, threshold = dp_numeric_range(values, eps, rng, edges, beta)
        found += lo == 0.0 and hi == 1.0
        missing += miss
    assert threshold == pytest.approx(tau) and scale == pytest.approx(1 / eps)
    p = 0.5 * math.exp(-eps * (tau - c))
    window = _binomial_window(p, n)
    assert found / n == pytest.approx(p, abs=window) and missing / n == pytest.approx(p, abs=window)
    assert abs(0.5 * math.exp(-1.1 * eps * (tau - c)) - p) > 2 * window


def test_kind_decision_matches_the_closed_form() -> None:
    """An integer column of c rows just above tau: no kind is decided when the noise pulls it under tau."""
    eps, n = 1.0, 100_000
    tau = numeric_threshold(eps, 3, dp_schema.KIND_BETA)
    c = math.ceil(tau) + 1
    rng = np.random.default_rng(24)
    kinds = [dp_schema.dp_column_kind((0, c, 0, 0), eps, rng)[0] for _ in range(n)]
    empty_stays_under = 1 - 0.5 * math.exp(-eps * tau)
    p = 0.5 * math.exp(-eps * (c - tau)) * empty_stays_under ** 2  # P[nothing passes]
    undecided = sum(k is None for k in kinds) / n
    assert undecided == pytest.approx(p, abs=_binomial_window(p, n))
    assert set(kinds) <= {None, "integer", "float", "categorical"}
    assert sum(k == "integer" for k in kinds) / n == pytest.approx(1 - p, abs=2e-3)
    smaller_scale = 0.5 * math.exp(-1.1 * eps * (c - tau)) * empty_stays_under ** 2
    assert abs(smaller_scale - p) > 2 * _binomial_window(p, n)


def test_inferred_category_sets_match_the_closed_form_at_a_realistic_epsilon() -> None:
    """End to end, no spies: two text columns of 2000 values x 17 rows at epsilon 2, delta 1e-6. The keep
    share must match the documented split (a kind decision, then (1 - share) epsilon/2 and delta/2)."""
    k, c = 2000, 17
    df = pd.DataFrame({"a": [f"a{i}" for i in range(k) for _ in range(c)],
                       "b": [f"b{i}" for i in range(k) for _ in range(c)]})
    eps, delta = 2.0, 1e-6
    with _seeded():
        r = infer_schema(df, epsilon=eps, delta=delta, seed=25, max_categories=5000)
    eps_cat, delta_cat = (1 - dp_schema.KIND_BUDGET_SHARE) * eps / 2, delta / 2
    tau = 1 + math.log(1 / (2 * delta_cat)) / eps_cat
    p = 0.5 * math.exp(-eps_cat * (tau - c)) if c < tau else 1 - 0.5 * math.exp(-eps_cat * (c - tau))
    share = (len(r.schema["a"].categories) + len(r.schema["b"].categories)) / (2 * k)
    assert share == pytest.approx(p, abs=_binomial_window(p, 2 * k))


def test_adult_at_a_realistic_epsilon(adult: pd.DataFrame) -> None:
    """epsilon 1 on Adult: every kind right, frequent categories kept and rare ones dropped (windows from the
    recorded spend), numeric ranges covering the bulk and never wider than the data by more than a bin."""
    with _seeded():
        r = infer_schema(adult, epsilon=1.0, delta=1e-6, seed=26)
    s = r.schema
    assert sum(x.epsilon for x in r.spend) == pytest.approx(1.0)
    for spec in s:
        col = adult[spec.name]
        if pd.api.types.is_integer_dtype(col.dtype):
            assert spec.kind == "integer", spec.name
            assert spec.lo <= col.quantile(0.05) and spec.hi >= col.quantile(0.95), spec.name
            assert spec.lo >= col.min() / 1.08 - 1 and spec.hi <= col.max() * 1.08 + 1, spec.name
            continue
        assert spec.kind == "categorical", spec.name
        kind = dp_schema.KIND_MECHANISM
        (spent,) = [x for x in r.spend if x.column == spec.name and x.mechanism != kind]
        assert spent.threshold == pytest.approx(laplace_threshold(spent.epsilon, spent.delta))
        counts = col.value_counts()
        b = spent.noise_scale
        assert set(counts.index[counts > spent.threshold + 12 * b]) <= set(spec.categories), spec.name
        assert not set(counts.index[counts < spent.threshold - 12 * b]) & set(spec.categories), spec.name
    assert "Holand-Netherlands" not in s["native-country"].categories
    assert 0 < len(s["native-country"].categories) < 10
