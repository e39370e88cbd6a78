"""Utility metrics: marginal TVD against a slow pandas crosstab, ML efficacy, NLL, copies, the baseline."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from tramontane.datasets import adult_schema, load_adult
from tramontane.errors import DataError, PrivacyParameterError, SchemaError
from tramontane.report.metrics import (
    MarginalBins,
    exact_match_rate,
    independent_marginals_baseline,
    marginal_tvd,
    ml_efficacy,
    nll_summary,
)


@pytest.fixture(scope="module")
def adult() -> pd.DataFrame:
    return load_adult("train")


@pytest.fixture(scope="module")
def adult_test() -> pd.DataFrame:
    return load_adult("test")


def _slow_tvd(a: pd.DataFrame, b: pd.DataFrame, cols: tuple[str, ...]) -> float:
    """Oracle: normalised crosstabs over the union of cells, summed half absolute difference."""
    text = lambda s: s.astype(object).map(lambda v: "<NA>" if pd.isna(v) else str(v))  # noqa: E731
    key = lambda df: df[list(cols)].apply(text).agg("|".join, axis=1)  # noqa: E731
    p = key(a).value_counts(normalize=True)
    q = key(b).value_counts(normalize=True)
    cells = p.index.union(q.index)
    return 0.5 * float((p.reindex(cells, fill_value=0) - q.reindex(cells, fill_value=0)).abs().sum())


def _random_table(rng: np.random.Generator, n: int, shift: float) -> pd.DataFrame:
    return pd.DataFrame({
        "color": rng.choice(["red", "green", "blue", None], n, p=[0.4 - shift, 0.3, 0.2 + shift, 0.1]),
        "size": rng.choice(["S", "M", "L"], n),
        "count": rng.integers(0, 4 + int(shift * 10), n),  # few values: each gets its own quantile bin
        "kind": rng.choice(["x", "y"], n, p=[0.5 + shift, 0.5 - shift]),
    })


def test_tvd_matches_slow_crosstab_for_all_orders() -> None:
    rng = np.random.default_rng(0)
    real, synth = _random_table(rng, 400, 0.0), _random_table(rng, 300, 0.15)
    result = marginal_tvd(real, synth, n_bins=10, orders=(1, 2, 3))
    assert result.count == {1: 4, 2: 6, 3: 4}
    for k in (1, 2, 3):
        for cols in itertools.combinations(real.columns, k):
            expected = _slow_tvd(real, synth, cols)
            assert result.per_marginal[k][" | ".join(cols)] == pytest.approx(expected, abs=1e-12), cols
        assert result.mean[k] == pytest.approx(np.mean(list(result.per_marginal[k].values())))
    json.dumps(result.to_dict())


def test_tvd_is_zero_for_identical_and_one_for_disjoint_tables(adult: pd.DataFrame) -> None:
    sample = adult.sample(3000, random_state=1)
    same = marginal_tvd(sample, sample.sample(frac=1.0, random_state=2), schema=adult_schema())
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in same.max.values())
    a = pd.DataFrame({"u": ["a", "b"] * 50, "v": [1.0, 2.0] * 50})
    b = pd.DataFrame({"u": ["c", "d"] * 30, "v": [10.0, 20.0] * 30})  # numbers beyond the fitted bins
    apart = marginal_tvd(a, b, orders=(1, 2))
    assert apart.mean == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}


def test_quantile_bins_are_fitted_on_the_training_table(
    adult: pd.DataFrame, adult_test: pd.DataFrame
) -> None:
    bins = MarginalBins.fit(adult, adult_schema(), n_bins=10)
    age = bins.codes(adult["age"], "age")
    shares = np.bincount(age) / len(age)
    assert 8 <= len(shares) <= 12 and shares.max() < 0.2  # close to deciles (ages are integers)
    gain = bins.codes(adult["capital-gain"], "capital-gain")
    assert ((gain == 0) == (adult["capital-gain"] == 0)).all()  # the atom at 0 keeps its own bin
    # Held-out vs synthetic, with the training table's bins: a different, explicit reference.
    own = marginal_tvd(adult_test, adult_test.sample(5000, random_state=3), schema=adult_schema(),
                       orders=(1,))
    fixed = marginal_tvd(adult_test, adult_test.sample(5000, random_state=3), bins=bins, orders=(1,))
    assert own.per_marginal[1]["sex"] == fixed.per_marginal[1]["sex"]
    with pytest.raises(SchemaError, match="differ"):
        marginal_tvd(adult, adult.drop(columns=["age"]))


def test_adult_train_vs_test_marginals_are_close(adult: pd.DataFrame, adult_test: pd.DataFrame) -> None:
    result = marginal_tvd(adult, adult_test, schema=adult_schema())
    assert result.count == {1: 15, 2: 105, 3: 455}
    assert 0 < result.mean[1] < result.mean[2] < result.mean[3] < 0.1  # same population, sampling noise


# -- ML efficacy --------------------------------------------------------------------------------------------

def test_ml_efficacy_train_on_real_beats_chance(adult: pd.DataFrame, adult_test: pd.DataFrame) -> None:
    train = adult.sample(4000, random_state=4).reset_index(drop=True)
    test = adult_test.sample(2000, random_state=5).reset_index(drop=True)
    flipped = train.copy()
    flipped["income"] = np.where(train["income"] == ">50K", "<=50K", ">50K")  # labels inverted
    result = ml_efficacy(train, flipped, test, "income", schema=adult_schema(), threads=1)
    assert result.positive == ">50K" and result.n_test == 2000
    for model in ("hist_gbdt", "logistic"):
        real, syn = result.scores[model]["real"], result.scores[model]["synthetic"]
        assert real.roc_auc > 0.85 and real.accuracy > result.majority_accuracy + 0.04, model
        assert syn.roc_auc < 0.2, model  # trained on inverted labels: ranks test rows backwards
    copy = ml_efficacy(train, train, test, "income", models=("logistic",), threads=1)
    assert copy.scores["logistic"]["real"] == copy.scores["logistic"]["synthetic"]
    json.dumps(result.to_dict())


def test_ml_efficacy_with_a_single_synthetic_class(adult: pd.DataFrame, adult_test: pd.DataFrame) -> None:
    train = adult.head(1000)
    synth = train.assign(income="<=50K")
    result = ml_efficacy(train, synth, adult_test.head(500), "income", models=("logistic",), threads=1)
    scores = result.scores["logistic"]["synthetic"]
    assert scores.roc_auc == pytest.approx(0.5) and scores.accuracy == pytest.approx(result.majority_accuracy)
    with pytest.raises(SchemaError, match="target"):
        ml_efficacy(train, synth, adult_test.head(10), "salary")


# -- NLL, copies --------------------------------------------------------------------------------------------

def test_nll_summary() -> None:
    out = nll_summary([-1.0, -2.0, -3.0])
    assert out["nll_per_row"] == pytest.approx(2.0) and out["n"] == 3
    assert out["stderr"] == pytest.approx(1.0 / np.sqrt(3))
    assert out["nll_per_row_bits"] == pytest.approx(2.0 / np.log(2))
    with pytest.raises(DataError, match="finite"):
        nll_summary([-1.0, -np.inf])
    with pytest.raises(DataError):
        nll_summary([])


def test_exact_match_rate(adult: pd.DataFrame, adult_test: pd.DataFrame) -> None:
    schema = adult_schema()
    train = adult.head(2000)
    assert exact_match_rate(train.sample(300, random_state=6), train) == 1.0
    assert exact_match_rate(train.sample(300, random_state=6), train, schema) == 1.0
    other = train.assign(age=train["age"] + 1000)
    assert exact_match_rate(other, train) == 0.0
    # On the binned representation, a different fnlwgt inside the same bin still matches.
    nudged = train.head(200).assign(fnlwgt=lambda d: d["fnlwgt"] + 1)
    bin_of = schema["fnlwgt"].value_index
    same_bin = bin_of(nudged["fnlwgt"]) == bin_of(train.head(200)["fnlwgt"])
    assert exact_match_rate(nudged, train, schema) == pytest.approx(same_bin.mean())
    assert exact_match_rate(nudged, train) < 0.05
    holdout = exact_match_rate(adult_test, adult, schema)
    assert 0.0 < holdout < 0.1


# -- the independent-marginals baseline ---------------------------------------------------------------------

def test_independent_baseline_keeps_1way_and_breaks_2way(
    adult: pd.DataFrame, adult_test: pd.DataFrame
) -> None:
    schema = adult_schema()
    base = independent_marginals_baseline(adult, schema, 20000, np.random.default_rng(7))
    schema.validate(base)
    assert len(base) == 20000 and base["age"].dtype == np.int64
    bins = MarginalBins.fit(adult, schema)
    fake = marginal_tvd(adult, base, bins=bins, orders=(1, 2))
    real = marginal_tvd(adult, adult_test, bins=bins, orders=(1, 2))
    assert fake.mean[1] < 0.03
    assert fake.mean[2] > 2 * real.mean[2]  # correlations are gone
    again = independent_marginals_baseline(adult, schema, 20000, np.random.default_rng(7))
    pd.testing.assert_frame_equal(base, again)


def test_independent_baseline_noise_is_two_sided(adult: pd.DataFrame) -> None:
    schema = adult_schema()
    bins = MarginalBins.fit(adult, schema)
    tvd = lambda eps: marginal_tvd(  # noqa: E731
        adult, independent_marginals_baseline(adult, schema, 10000, np.random.default_rng(8), epsilon=eps),
        bins=bins, orders=(1,)).mean[1]
    exact, loose, tight = tvd(None), tvd(1000.0), tvd(0.01)
    assert loose < exact + 0.01  # plenty of budget: close to the exact marginals
    assert tight > exact + 0.1  # a tiny budget must show (noise really added)
    with pytest.raises(PrivacyParameterError):
        independent_marginals_baseline(adult, schema, 5, epsilon=0.0)
