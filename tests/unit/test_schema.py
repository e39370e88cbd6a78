"""Public schema: bins, files, validation messages, bundled Adult, and DP schema inference.

The DP mechanisms are checked against their documented formulas (keep probabilities at counts around the
threshold, the analytic Gaussian sigma against dp-accounting's PLD), with seeds and windows chosen so that a
wrong noise scale, a wrong threshold or skipped noise fails.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from tramontane.datasets import adult_schema, load_adult, read_csv
from tramontane.errors import DataError, PrivacyParameterError, SchemaError, TramontaneWarning
from tramontane.synth.dp_schema import (
    DEFAULT_SEARCH_EDGES,
    analytic_gaussian_sigma,
    dp_category_set,
    dp_numeric_range,
    gaussian_delta,
    gaussian_threshold,
    infer_schema,
    laplace_threshold,
)
from tramontane.synth.schema import ColumnSpec, Schema


@pytest.fixture(scope="module")
def adult() -> pd.DataFrame:
    return load_adult("train")


@pytest.fixture(scope="module")
def schema() -> Schema:
    return adult_schema()


def _small_schema() -> Schema:
    return Schema((
        ColumnSpec.categorical("color", ["red", "green", "blue"]),
        ColumnSpec.numeric("age", 0, 99, "integer"),  # one bin per integer
        ColumnSpec.numeric("score", 0.0, 1.0, "float", n_bins=10, missing=True),
    ))


def _small_frame() -> pd.DataFrame:
    return pd.DataFrame({"color": ["red", "blue", "green", "red"], "age": [3, 40, 77, 99],
                         "score": [0.05, np.nan, 1.0, 0.5]})


# -- bins ---------------------------------------------------------------------------------------------------

def test_integer_bins_hold_whole_integers_and_decode_inside_their_bin() -> None:
    wide = ColumnSpec.numeric("x", -7, 1000, "integer")
    assert wide.n_bins == 100
    ints = pd.Series(np.arange(-7, 1001))
    ids = wide.value_index(ints)
    assert (np.diff(ids) >= 0).all() and ids[0] == 0 and ids[-1] == 99  # monotone, every bin used
    reps = np.asarray(wide.values())
    for i in range(100):  # the representative is an integer held by the bin
        members = ints[ids == i]
        assert members.min() <= reps[i] <= members.max() and reps[i] == int(reps[i])
    narrow = ColumnSpec.numeric("y", 17, 90, "integer")  # 74 integers <= 100 bins: one bin per integer
    assert narrow.n_bins == 74
    assert narrow.values() == list(range(17, 91))


def test_float_bins_are_equal_width_with_centres() -> None:
    col = ColumnSpec.numeric("x", 0.0, 10.0, "float", n_bins=5)
    assert col.edges == (0.0, 2.0, 4.0, 6.0, 8.0, 10.0)
    assert col.values() == [1.0, 3.0, 5.0, 7.0, 9.0]
    ids = col.value_index(pd.Series([0.0, 1.99, 2.0, 10.0, 10.5, np.nan]))
    assert ids.tolist() == [0, 0, 1, 4, -1, -1]  # out of range and disallowed missing: -1
    assert ColumnSpec.numeric("c", 3.0, 3.0).values() == [3.0]


@pytest.mark.parametrize("bad", [
    dict(name="x", kind="integer", lo=5, hi=1),
    dict(name="x", kind="integer", lo=0.5, hi=3),
    dict(name="x", kind="float", lo=0, hi=1, edges=[0.0, 0.5, 0.4, 1.0]),
    dict(name="x", kind="float", lo=0, hi=1, edges=[0.2, 1.0]),
    dict(name="x", kind="integer", lo=0, hi=3, edges=[-0.5, 0.2, 0.4, 3.5]),
    dict(name="x", kind="categorical", categories=["a", "a"]),
    dict(name="x", kind="categorical", categories=[]),
    dict(name="x", kind="categorical", categories=["a", float("nan")]),
    dict(name="x", kind="text"),
    dict(name="x", kind="float", lo=0, hi=1, colour="blue"),
])
def test_malformed_columns_are_refused_with_the_column_named(bad: dict) -> None:
    with pytest.raises(SchemaError, match="'x'|kind"):
        ColumnSpec.from_dict(bad)


# -- files --------------------------------------------------------------------------------------------------

def test_json_round_trip(tmp_path, schema: Schema) -> None:
    path = tmp_path / "s.json"
    schema.save(path)
    assert Schema.load(path) == schema
    data = json.loads(path.read_text())
    assert data["format"] == "tramontane.schema" and data["private"] is True
    mixed = Schema((ColumnSpec.categorical("flag", [True, False], missing=True),
                    ColumnSpec.categorical("code", [1, 2, "x"])), private=False, metadata={"k": [1]})
    mixed.save(path)
    assert Schema.load(path) == mixed


def test_yaml_round_trip_when_pyyaml_is_installed(tmp_path, schema: Schema) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "s.yaml"
    tricky = Schema((ColumnSpec.categorical("answer", ["yes", "no", "on", "?", "<=50K", "1"]),))
    for s in (schema, tricky):
        s.save(path)
        assert Schema.load(path) == s


def test_malformed_schema_files(tmp_path) -> None:
    path = tmp_path / "s.json"
    path.write_text("{not json")
    with pytest.raises(SchemaError, match="not valid JSON"):
        Schema.load(path)
    path.write_text(json.dumps({"columns": [{"name": "a", "kind": "categorical", "categories": ["x"]}],
                                "colour": 1}))
    with pytest.raises(SchemaError, match="colour"):
        Schema.load(path)
    with pytest.raises(SchemaError, match="does not exist"):
        Schema.load(tmp_path / "absent.json")
    with pytest.raises(SchemaError, match="unique"):
        Schema((ColumnSpec.categorical("a", ["x"]), ColumnSpec.categorical("a", ["y"])))


# -- the bundled Adult --------------------------------------------------------------------------------------

def test_adult_public_schema_fits_both_splits(adult: pd.DataFrame, schema: Schema) -> None:
    test = load_adult("test")
    assert adult.shape == (32561, 15) and test.shape == (16281, 15)
    assert (adult["income"] == ">50K").sum() == 7841 and (test["income"] == ">50K").sum() == 3846
    assert schema.names == list(adult.columns) and schema.private
    schema.validate(adult)
    schema.validate(test)
    for spec in schema:  # the documented category lists are exactly what occurs in train
        if spec.kind == "categorical":
            assert set(spec.categories) == set(adult[spec.name]), spec.name
    with pytest.raises(DataError, match="split"):
        load_adult("validation")


# -- validation messages ------------------------------------------------------------------------------------

def _message(schema: Schema, df: pd.DataFrame, show_values: bool = False) -> str:
    with pytest.raises(SchemaError) as info:
        schema.validate(df, **({"show_values": True} if show_values else {}))  # the default: no values
    return str(info.value)


def test_unknown_and_missing_columns_are_named(adult: pd.DataFrame, schema: Schema) -> None:
    df = adult.head(50).copy()
    df["ssn"] = "x"
    msg = _message(schema, df.drop(columns=["age"]))
    assert "'ssn'" in msg and "drop" in msg
    assert "'age'" in msg and "missing from the data" in msg


def test_out_of_schema_values_name_the_column_and_a_few_values_never_the_row(
    adult: pd.DataFrame, schema: Schema
) -> None:
    df = adult.head(200).copy()
    df.loc[7, "workclass"] = "Astronaut"
    assert "Astronaut" not in _message(schema, df)  # by default: the column and the rule, no value
    msg = _message(schema, df, show_values=True)
    assert "'workclass'" in msg and "'Astronaut'" in msg and "categories in the schema" in msg
    row = df.loc[7]
    for other in ("fnlwgt", "occupation", "native-country"):  # nothing else from that row
        assert str(row[other]) not in msg
    df = adult.head(200).copy()
    df["native-country"] = [f"Place{i}" for i in range(200)]
    assert "200" not in _message(schema, df) and "Place" not in _message(schema, df)
    msg = _message(schema, df, show_values=True)
    assert "200 distinct value(s)" in msg and msg.count("'Place") == 3


@pytest.mark.parametrize("column, value, expected, example", [
    ("age", 150, r"outside the schema range \[17, 90\]\. Fix: widen lo/hi in the schema", "e.g. 150"),
    ("age", 30.5, "numbers that are not integers. Fix: round them", "e.g. 30.5"),
    ("age", "old", "entries that are not numbers. Fix: declare the column categorical in the schema",
     "e.g. 'old'"),
    ("hours-per-week", np.nan, "missing values", None),
    ("sex", np.nan, "missing: false. Fix: set missing: true for the column in the schema", None),
])
def test_each_kind_of_bad_value(
    adult: pd.DataFrame, schema: Schema, column, value, expected, example
) -> None:
    df = adult.head(20).copy()
    df[column] = df[column].astype(object)
    df.loc[3, column] = value
    msg = _message(schema, df)
    assert f"'{column}'" in msg
    assert re.search(expected, msg), msg
    if example is not None:
        assert example not in msg and repr(value) not in msg
        assert example in _message(schema, df, show_values=True)


def test_all_problems_are_reported_at_once(adult: pd.DataFrame, schema: Schema) -> None:
    df = adult.head(20).copy()
    df.loc[0, "age"] = 200
    df.loc[1, "race"] = "Martian"
    msg = _message(schema, df)
    assert "'age'" in msg and "'race'" in msg
    typed = Schema((ColumnSpec.categorical("zip", ["01234", "99999"]),))
    assert "types differ" not in _message(typed, pd.DataFrame({"zip": ["11111"]}))
    int_cats = Schema((ColumnSpec.categorical("code", [1, 2]),))
    assert "types differ" in _message(int_cats, pd.DataFrame({"code": ["1", "2"]}))


def test_messages_quote_no_values_counts_or_python_calls_unless_asked(
    adult: pd.DataFrame, schema: Schema
) -> None:
    df = adult.head(300).astype({"age": object, "capital-gain": object})
    df.loc[3, "age"] = 137  # outside the range
    df.loc[4, "age"] = 33.5  # not an integer
    df.loc[5, "capital-gain"] = "lots"  # not a number
    df.loc[6, "workclass"] = "Astronaut"  # not a category
    df.loc[7, "sex"] = np.nan  # missing where the schema says missing: false
    msg = _message(schema, df)
    assert len(schema.problems(df)) == 5
    for leaked in ("137", "33.5", "lots", "Astronaut", "distinct value", "e.g.", "dtype"):
        assert leaked not in msg, leaked
    for call in ("conform(", "pd.to_numeric", "df.drop", "schema.select", "kinds=", "ranges=", "known="):
        assert call not in msg, call
    for fix in ("widen lo/hi in the schema", "declare the column float in the schema",
                "declare the column categorical in the schema",
                "add them to the column's categories in the schema",
                "set missing: true for the column in the schema"):
        assert fix in msg, fix
    shown = _message(schema, df, show_values=True)  # the data holder's own debug listing
    for example in ("e.g. 137", "e.g. 33.5", "e.g. 'lots'", "e.g. 'Astronaut'"):
        assert example in shown, example
    columns = _message(schema, df.drop(columns=["age"]).assign(ssn="x"))
    assert "df.drop" not in columns and "schema.select" not in columns
    assert "remove them from the schema" in columns


def test_numbers_given_as_text_fit_the_schema() -> None:
    schema = _small_schema()
    df = _small_frame()
    for dtype in (str, object):
        text = pd.DataFrame({c: pd.Series([None if pd.isna(v) else str(v) for v in df[c]], dtype=dtype)
                             for c in df})
        schema.validate(text)
        assert (schema.value_ids(text) == schema.value_ids(df)).all()
        pd.testing.assert_frame_equal(schema.conform(text), schema.conform(df))
        text.loc[1, "age"] = "unknown"  # a non-number among numbers given as text: its row alone goes
        msg = _message(schema, text)
        assert "'age' is integer in the schema but holds entries that are not numbers" in msg
        assert schema.conform(text)["age"].tolist() == [3, 77, 99]


def test_conform_clips_numbers_and_drops_rows_row_by_row() -> None:
    schema = _small_schema()
    df = pd.DataFrame({"color": ["red", "purple", "blue", "green"], "age": [-5, 30, 130, 40.4],
                       "score": [2.0, 0.5, np.nan, -1.0]})
    out = schema.conform(df)
    assert out["color"].tolist() == ["red", "blue", "green"]
    assert out["age"].tolist() == [0, 99, 40] and out["age"].dtype == np.int64
    assert out["score"].tolist()[0] == 1.0 and math.isnan(out["score"].tolist()[1])
    schema.validate(out)
    # Row by row: conforming a row alone gives the same as within the table.
    for i in range(len(df)):
        alone = schema.conform(df.iloc[[i]])
        assert len(alone) == (0 if i == 1 else 1)
    with pytest.raises(SchemaError, match="missing from the data"):
        schema.conform(df.drop(columns=["age"]))


def test_value_ids_round_trip_with_missing() -> None:
    schema = _small_schema()
    df = _small_frame()
    ids = schema.value_ids(df)
    assert ids.shape == (4, 3) and ids[1, 2] == schema["score"].missing_id
    back = schema.frame_from_value_ids(ids)
    assert back["color"].tolist() == df["color"].tolist()
    assert back["age"].tolist() == df["age"].tolist() and back["age"].dtype == np.int64
    assert back["score"].isna().tolist() == [False, True, False, False]
    assert back["score"][0] == pytest.approx(0.05)  # centre of [0, 0.1)
    with pytest.raises(DataError, match="value ids"):
        schema.frame_from_value_ids(np.array([[0, 0, 99]]))


# -- reading files ------------------------------------------------------------------------------------------

def test_read_csv_refuses_empty_and_unreadable_files(tmp_path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_csv(empty)
    header = tmp_path / "header.csv"
    header.write_text("color,age,score\n")
    with pytest.raises(DataError, match="no rows"):
        read_csv(header)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("color\nrouge \xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        read_csv(latin)
    with pytest.raises(DataError, match="does not exist"):
        read_csv(tmp_path / "absent.csv")


def test_read_csv_with_a_schema_keeps_codes_as_text(tmp_path) -> None:
    schema = Schema((ColumnSpec.categorical("zip", ["01234", "NA"]),
                     ColumnSpec.numeric("n", 0, 9, "integer")))
    path = tmp_path / "t.csv"
    path.write_text("zip,n\n01234,3\nNA,4\n")
    df = read_csv(path, schema)
    assert df["zip"].tolist() == ["01234", "NA"]
    path.write_text("zip,n\n01234,3\n55555,4\n")
    with pytest.raises(SchemaError, match="'zip' holds values that are not among") as info:
        read_csv(path, schema)
    assert "55555" not in str(info.value)


# -- inference: refusals ------------------------------------------------------------------------------------

def test_inference_needs_a_budget_or_the_explicit_flag(adult: pd.DataFrame) -> None:
    df = adult.head(100)
    with pytest.raises(PrivacyParameterError, match="allow_non_private"):
        infer_schema(df)
    with pytest.raises(PrivacyParameterError, match="not both"):
        infer_schema(df, epsilon=1.0, delta=1e-6, allow_non_private=True)
    with pytest.raises(PrivacyParameterError, match="delta"):
        infer_schema(df, epsilon=1.0)
    for eps in (0.0, -1.0, math.inf):
        with pytest.raises(PrivacyParameterError, match="epsilon"):
            infer_schema(df, epsilon=eps, delta=1e-6)
    with pytest.raises(PrivacyParameterError, match="delta"):
        infer_schema(df, epsilon=1.0, delta=1.5)


def test_empty_table_is_a_data_error() -> None:
    with pytest.raises(DataError, match="empty"):
        infer_schema(pd.DataFrame({"a": pd.Series([], dtype=str)}), epsilon=1.0, delta=1e-6)
    with pytest.raises(DataError, match="empty"):
        infer_schema(pd.DataFrame(), allow_non_private=True)


@pytest.mark.parametrize("private", [True, False])
def test_too_many_distinct_strings_are_refused_before_spending(private: bool) -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"id": [f"user-{i:06d}" for i in range(100_000)], "n": rng.integers(0, 5, 100_000)})
    kwargs = dict(epsilon=1.0, delta=1e-6) if private else dict(allow_non_private=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        with pytest.raises(SchemaError, match=r"'id' has more distinct values than max_categories=1000") \
                as info:
            infer_schema(df, **kwargs)
    assert "bin" in str(info.value) and "Nothing was spent" in str(info.value)
    assert "user-" not in str(info.value) and "100000" not in str(info.value)  # no values, no counts


def test_cap_is_configurable_and_applies_to_declared_categoricals() -> None:
    df = pd.DataFrame({"code": np.arange(1001) % 1001})
    with pytest.raises(SchemaError, match="'code'"):
        infer_schema(df, epsilon=1.0, delta=1e-6, kinds={"code": "categorical"})
    with pytest.raises(SchemaError, match="'code'"):
        infer_schema(df, epsilon=1.0, delta=1e-6, kinds={"code": "categorical"}, max_categories=10)
    with pytest.warns(TramontaneWarning):  # past the cap; singletons then fail the DP threshold
        with pytest.raises(SchemaError, match="no value passed the threshold"):
            infer_schema(df, epsilon=1.0, delta=1e-6, kinds={"code": "categorical"}, max_categories=2000,
                         seed=0)


# -- inference without DP -----------------------------------------------------------------------------------

def test_non_private_inference_warns_and_is_marked(adult: pd.DataFrame) -> None:
    df = adult.head(2000).copy()
    df.loc[3, "hours-per-week"] = np.nan
    with pytest.warns(TramontaneWarning, match="WITHOUT differential privacy"):
        result = infer_schema(df, allow_non_private=True)
    s = result.schema
    assert not s.private and not result.private and result.spend == () and result.epsilon == 0.0
    assert set(s["native-country"].categories) == set(df["native-country"])
    assert (s["age"].lo, s["age"].hi) == (df["age"].min(), df["age"].max())
    # Kinds come from the values: integers with a missing one stay integer (the float64 dtype does not count).
    assert s["hours-per-week"].kind == "integer" and s["hours-per-week"].missing
    assert not s["age"].missing
    s.validate(df)
    assert Schema.from_dict(json.loads(json.dumps(s.to_dict()))).private is False


# -- inference with DP: utility windows ---------------------------------------------------------------------

def test_large_epsilon_recovers_adult_categories_but_never_singletons(adult: pd.DataFrame) -> None:
    with pytest.warns(TramontaneWarning, match="seed"):
        result = infer_schema(adult, epsilon=1000.0, delta=1e-6, seed=1)
    s = result.schema
    assert s.private
    for spec in s:
        col = adult[spec.name]
        if spec.kind == "categorical":
            counts = col.value_counts()
            assert set(spec.categories) == set(counts.index[counts >= 2]), spec.name
            assert list(spec.categories) == sorted(spec.categories)
        else:  # the range covers the data, within one bin (ratio 10^(1/32)) of the default grid
            assert spec.lo <= col.min() and spec.hi >= col.max(), spec.name
            assert spec.lo >= col.min() / 1.08 - 1 and spec.hi <= col.max() * 1.08 + 1, spec.name
            assert spec.kind == "integer" and spec.n_bins == min(100, spec.hi - spec.lo + 1)
    assert "Holand-Netherlands" not in s["native-country"].categories  # a single row: dropped
    kept = s.conform(adult)
    assert len(kept) == len(adult) - 1


def test_small_epsilon_drops_rare_categories(adult: pd.DataFrame) -> None:
    eps, delta = 0.3, 1e-6
    with pytest.warns(TramontaneWarning):
        r = infer_schema(adult, epsilon=eps, delta=delta, seed=2)
    s = r.schema
    # 15 columns share epsilon, a fifth of each share decides the kind; the 9 categorical ones share delta.
    eps_c, delta_c = 0.8 * eps / 15, delta / 9
    spent = [x for x in r.spend if x.column == "native-country" and x.delta > 0]
    assert len(spent) == 1
    assert spent[0].epsilon == pytest.approx(eps_c) and spent[0].delta == pytest.approx(delta_c)
    tau, b = 1 + math.log(1 / (2 * delta_c)) / eps_c, 1 / eps_c
    counts = adult["native-country"].value_counts()
    kept = set(s["native-country"].categories)
    assert kept <= set(counts.index)
    assert set(counts.index[counts > tau + 12 * b]) <= kept  # far above: kept
    assert not kept & set(counts.index[counts < tau - 12 * b])  # far below: dropped
    assert "United-States" in kept and "Holand-Netherlands" not in kept and len(kept) < 10


def test_dp_values_always_come_from_the_data() -> None:
    df = pd.DataFrame({"c": ["a"] * 1 + ["b"] * 2 + ["c"] * 3})
    union: set = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        for seed in range(200):  # a big delta makes the threshold low: most values pass sometimes
            try:  # a declared kind: 6 rows are far too few to decide one with DP
                r = infer_schema(df, epsilon=0.5, delta=0.4, seed=seed, kinds={"c": "categorical"})
            except SchemaError:  # nothing kept this time
                continue
            union |= set(r.schema["c"].categories)
    assert union == {"a", "b", "c"}


def test_unused_categories_of_a_pandas_categorical_are_no_candidates() -> None:
    col = pd.Categorical(["a"] * 50 + ["b"] * 50, categories=["a", "b", "ghost"])
    with pytest.warns(TramontaneWarning):
        s = infer_schema(pd.DataFrame({"c": col}), epsilon=100.0, delta=0.4, seed=0).schema
    assert s["c"].categories == ("a", "b")


def test_public_ranges_bound_the_search(adult: pd.DataFrame) -> None:
    with pytest.warns(TramontaneWarning):
        s = infer_schema(adult[["age", "fnlwgt", "income"]], epsilon=3.0, delta=1e-6, seed=3,
                         ranges={"age": (20, 200), "fnlwgt": (0, 2_000_000)}).schema
    assert s["age"].lo >= 20 and 60 <= s["age"].hi <= 90
    assert 0 <= s["fnlwgt"].lo <= 100_000 and 400_000 <= s["fnlwgt"].hi <= 2_000_000


def test_known_columns_are_copied_and_cost_nothing(adult: pd.DataFrame, schema: Schema) -> None:
    known = [schema["native-country"], schema["age"]]
    with pytest.warns(TramontaneWarning):
        r = infer_schema(adult, epsilon=2.0, delta=1e-6, known=known, seed=4)
    assert r.schema["native-country"] == schema["native-country"] and r.schema["age"] == schema["age"]
    assert {s.column for s in r.spend} == set(adult.columns) - {"native-country", "age"}
    assert r.epsilon == pytest.approx(2.0) and r.delta == pytest.approx(1e-6)
    per_column = {s.column: s for s in r.spend}  # the last mechanism of each column
    assert sum(s.epsilon for s in r.spend if s.column == "sex") == pytest.approx(2.0 / 13)
    assert per_column["sex"].delta == pytest.approx(1e-6 / 8)
    assert per_column["fnlwgt"].delta == 0.0 and per_column["fnlwgt"].noise == "laplace"
    json.dumps(r.to_dict())


def test_ledger_events_sum_to_the_budget(adult: pd.DataFrame) -> None:
    events_mod = pytest.importorskip("tramontane.accounting.events")
    with pytest.warns(TramontaneWarning):
        r = infer_schema(adult.head(3000), epsilon=1.5, delta=1e-7, seed=5)
    events = r.ledger_events()
    assert all(isinstance(e, events_mod.EpsilonDeltaEvent) for e in events)
    assert len(events) == 30  # a kind decision and a range or category set per column
    assert sum(e.epsilon for e in events) == pytest.approx(1.5)
    assert sum(e.delta for e in events) == pytest.approx(1e-7)


def test_nothing_surviving_the_threshold_is_an_error_that_carries_the_spend() -> None:
    df = pd.DataFrame({"c": [f"v{i}" for i in range(50)], "x": np.linspace(0, 1, 50)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        with pytest.raises(SchemaError, match="'c'.*threshold") as info:
            infer_schema(df, epsilon=0.5, delta=1e-9, seed=6, kinds={"c": "categorical", "x": "float"})
    assert "count it against the data's budget" in str(info.value) and "err.spend" not in str(info.value)
    assert sum(s.epsilon for s in info.value.spend) == pytest.approx(0.5)


def test_seed_reproduces_and_no_seed_draws_fresh_noise() -> None:
    counts = {f"v{i}": 8 for i in range(400)}  # right at the threshold: kept about half the time
    a = dp_category_set(counts, 1.0, 1e-3, np.random.default_rng(7))[0]
    b = dp_category_set(counts, 1.0, 1e-3, np.random.default_rng(7))[0]
    assert a == b
    df = pd.DataFrame({"c": [f"v{i}" for i in range(200) for _ in range(9)]})
    with pytest.warns(TramontaneWarning, match="seed"):
        one = infer_schema(df, epsilon=1.0, delta=1e-3, seed=8).schema
    with pytest.warns(TramontaneWarning, match="seed"):
        two = infer_schema(df, epsilon=1.0, delta=1e-3, seed=8).schema
    assert one == two
    with warnings.catch_warnings():
        warnings.simplefilter("error", TramontaneWarning)  # no seed: no warning
        runs = {infer_schema(df, epsilon=1.0, delta=1e-3).schema["c"].categories for _ in range(3)}
    assert len(runs) > 1


# -- inference with DP: the mechanisms, statistically -------------------------------------------------------

def test_laplace_keep_probability_matches_the_documented_mechanism() -> None:
    eps, delta = 1.0, 1e-3
    tau = 1 + math.log(1 / (2 * delta)) / eps  # the documented threshold, computed independently
    assert laplace_threshold(eps, delta) == pytest.approx(tau)
    rng = np.random.default_rng(11)
    levels = (5, 7, 8, 10)
    counts = {(c, i): c for c in levels for i in range(2000)}
    kept = dp_category_set(counts, eps, delta, rng)[0]
    for c in levels:
        rate = sum(1 for k in kept if k[0] == c) / 2000
        expected = 1 - 0.5 * math.exp(-eps * (c - tau)) if c >= tau else 0.5 * math.exp(-eps * (tau - c))
        assert rate == pytest.approx(expected, abs=0.045), (c, rate, expected)
    # The delta the threshold buys: a value held by one row is kept with probability delta.
    assert 0.5 * math.exp(-eps * (tau - 1)) == pytest.approx(delta)


def test_gaussian_sigma_matches_dp_accounting_and_keep_probability_matches() -> None:
    dp_accounting = pytest.importorskip("dp_accounting")
    for eps, delta in ((1.0, 1e-5), (0.2, 1e-6), (5.0, 1e-9)):
        sigma = analytic_gaussian_sigma(eps, delta)
        accountant = dp_accounting.pld.PLDAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(sigma))
        assert accountant.get_delta(eps) == pytest.approx(delta, rel=0.02)
        assert gaussian_delta(sigma * 1.05, eps) < delta < gaussian_delta(sigma * 0.95, eps)
        if eps <= 1:  # tighter than the classical bound (which only holds for eps <= 1)
            assert sigma < math.sqrt(2 * math.log(1.25 / delta)) / eps
    eps, delta = 1.0, 1e-3
    sigma = analytic_gaussian_sigma(eps, delta / 2)
    tau = gaussian_threshold(sigma, delta / 2)
    assert 1 - NormalDist(1, sigma).cdf(tau) == pytest.approx(delta / 2)
    rng = np.random.default_rng(12)
    levels = (int(tau) - 4, int(tau), int(tau) + 5)
    counts = {(c, i): c for c in levels for i in range(2000)}
    kept = dp_category_set(counts, eps, delta, rng, noise="gaussian")
    assert kept[2] == pytest.approx(sigma) and kept[3] == pytest.approx(tau)
    for c in levels:
        rate = sum(1 for k in kept[0] if k[0] == c) / 2000
        assert rate == pytest.approx(1 - NormalDist(c, sigma).cdf(tau), abs=0.045), c


def test_numeric_histogram_keep_probability_and_false_positives() -> None:
    edges = np.arange(0.0, 11.0)  # public bins [0,1) .. [9,10] + under/overflow + missing: 13 cells
    eps, beta = 1.0, 0.1
    tau = math.log(13 / (2 * beta)) / eps
    rng = np.random.default_rng(13)
    c = round(tau)
    found = []
    for _ in range(2000):
        lo, hi, missing, scale, threshold = dp_numeric_range(np.full(c, 3.5), eps, rng, edges, beta)
        assert threshold == pytest.approx(tau) and scale == pytest.approx(1 / eps)
        found.append(lo == 3.0 and hi == 4.0)
    expected = 1 - 0.5 * math.exp(-eps * (c - tau)) if c >= tau else 0.5 * math.exp(-eps * (tau - c))
    assert np.mean(found) == pytest.approx(expected, abs=0.05)
    # No data at all: noise alone must lift some empty cell over tau, at most beta of the time (and, as
    # the union bound is nearly tight here, not much less: a noise-free implementation would never).
    spurious = np.mean([dp_numeric_range(np.zeros(0), eps, rng, edges, beta)[0] is not None
                        for _ in range(3000)])
    p_cell = 0.5 * math.exp(-eps * tau)
    assert spurious == pytest.approx(1 - (1 - p_cell) ** 12, abs=0.02) and spurious <= beta
    missing_rate = np.mean([dp_numeric_range(np.full(40, np.nan), eps, rng, edges, beta)[2]
                            for _ in range(500)])
    assert missing_rate > 0.99


def test_default_search_grid_is_wide_and_fine() -> None:
    e = DEFAULT_SEARCH_EDGES
    assert e[0] == -1e9 and e[-1] == 1e9 and (np.diff(e) > 0).all()
    pos = e[e > 0]
    assert np.allclose(pos[1:] / pos[:-1], 10 ** (1 / 32))
