"""Numeric bins at DP quantiles (`dp_bins`, post-processing of a noisy histogram over a public grid): heavy
tails get bins where their rows are, atoms a bin of their own, small integer ranges one bin per integer;
the range's growth over thin tails and the smoothing of sparse cells against what noise alone does; Adult
without a schema, read as text, at epsilon 1."""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from tramontane.datasets import load_adult
from tramontane.errors import TramontaneWarning
from tramontane.synth import dp_bins
from tramontane.synth.dp_bins import extend_range, quantile_edges, smoothed_weights
from tramontane.synth.dp_schema import gaussian_numeric_bins, infer_schema, schema_budget, schema_share
from tramontane.synth.schema import ColumnSpec, integer_edges
from tramontane.synth.synthesizer import SynthConfig


def _shares(x: np.ndarray, edges) -> np.ndarray:
    counts = np.bincount(np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2),
                         minlength=len(edges) - 1)
    return counts / len(x)


def test_a_heavy_tail_gets_its_bins_where_its_rows_are() -> None:
    """90% zeros and a log-normal tail (capital gain's shape): zero is a bin of its own and the tail is cut at
    quantiles; equal-width bins over the same range would put most of the tail in their first bin."""
    rng = np.random.default_rng(0)
    x = np.where(rng.random(30_000) < 0.9, 0, np.round(rng.lognormal(8, 1.0, 30_000))).astype(float)
    found, missing, _ = gaussian_numeric_bins(x, 3.0, rng, "integer")
    lo, hi, edges = found
    assert not missing and lo == 0 and edges is not None and edges[:2] == (-0.5, 0.5)
    assert 30 <= len(edges) - 1 <= 100
    ColumnSpec.numeric("gain", lo, hi, "integer", edges=edges)  # every bin holds an integer of [lo, hi]
    assert all(e == math.floor(e) + 0.5 for e in edges)
    tail = np.clip(x[x > 0], lo, hi)
    quantile, equal = _shares(tail, edges), _shares(tail, integer_edges(int(lo), int(hi), len(edges) - 1))
    assert quantile.max() < 0.05 and (quantile < 0.002).mean() < 0.05  # about 1% of the tail in each
    assert equal.max() > 0.06 and (equal < 0.002).mean() > 0.4  # half the bins next to empty
    assert np.quantile(x, 0.995) <= hi  # the range reaches far into the tail


def test_few_integers_keep_one_bin_per_integer_and_floats_get_quantiles() -> None:
    rng = np.random.default_rng(1)
    ages = np.clip(np.round(rng.normal(40, 10, 20_000)), 17, 90)
    lo, hi, edges = gaussian_numeric_bins(ages, 3.0, rng, "integer")[0]
    assert edges is None and 17 <= lo <= 20 and 70 <= hi <= 90  # the default: one bin per integer
    x = rng.lognormal(3, 1, 20_000)
    lo, hi, edges = gaussian_numeric_bins(x, 3.0, rng, "float")[0]
    assert edges is not None and len(edges) - 1 == 100 and edges[0] == lo and edges[-1] == hi
    assert _shares(np.clip(x, lo, hi), edges).max() < 0.03  # about 1% each


def test_water_filling_gives_an_atom_one_bin_and_the_rest_to_the_others() -> None:
    lower = np.array([-0.5, *np.arange(10) * 100 + 0.5])
    upper = np.array([0.5, *np.arange(1, 11) * 100 + 0.5])
    weights = np.array([900.0, *[10.0] * 10])
    edges = quantile_edges(lower, upper, weights, "integer", 0, 1000, n_bins=21)
    assert edges[:2] == (-0.5, 0.5) and len(edges) - 1 == 21
    inner = np.diff(edges[1:])
    assert inner.max() <= 1.5 * inner.min() + 1  # the other 20 bins share the uniform tail evenly
    assert quantile_edges(lower, upper, np.zeros(11), "integer", 0, 1000) is None
    # a cell takes at most CELL_SPLITS bins: one heavy cell cannot swallow them all
    heavy = quantile_edges(lower, upper, np.array([0.0, 1e6, *[1.0] * 9]), "integer", 0, 1000, n_bins=100)
    assert sum(1 < e < 100.5 for e in heavy) <= dp_bins.CELL_SPLITS - 1


def test_smoothing_keeps_sparse_mass_and_drops_most_noise() -> None:
    rng = np.random.default_rng(2)
    sigma, tau, n = 1.0, 5.0, 400
    widths = np.ones(n)
    noise_only = [np.count_nonzero(smoothed_weights(rng.normal(0, sigma, n), widths, tau, sigma)) / n
                  for _ in range(200)]
    assert np.mean(noise_only) < 0.05
    sparse = 2.0 + rng.normal(0, sigma, n)  # under tau everywhere, but 800 rows in all
    w = smoothed_weights(sparse, widths, tau, sigma)
    assert w.sum() == pytest.approx(2.0 * n, abs=6 * sigma * math.sqrt(n) + 2 * dp_bins.BLOCK_Z * sigma * 8)
    assert np.count_nonzero(w) > 0.9 * n


def test_the_range_grows_over_noise_alone_as_rarely_as_documented() -> None:
    """Beyond a passing cell, pure noise makes the range grow with probability at most
    EXTEND_CELLS * P[Z > EXTEND_Z] per side (0.2%); a thin real tail is taken in."""
    rng = np.random.default_rng(3)
    trials, n = 5000, 2 * dp_bins.EXTEND_CELLS + 1
    grew = sum(extend_range(rng.normal(0, 1.0, n), n // 2, n // 2, 1.0) != (n // 2, n // 2)
               for _ in range(trials))
    bound = 2 * dp_bins.EXTEND_CELLS * (1 - NormalDist().cdf(dp_bins.EXTEND_Z))
    assert grew / trials <= bound + 4 * math.sqrt(bound / trials)
    tail = np.concatenate([[100.0], np.full(30, 2.0)]) + np.concatenate([[0.0], rng.normal(0, 1.0, 30)])
    assert extend_range(tail, 0, 0, 1.0)[1] >= 25


@pytest.fixture(scope="module")
def adult_text() -> pd.DataFrame:
    """Adult as a user's CSV reads without a schema: every column text."""
    return load_adult("train").astype(str)


def test_adult_read_as_text_at_epsilon_one(adult_text: pd.DataFrame) -> None:
    """The synthesizer's share of epsilon 1 for 15 columns (`schema_share`: 15% of its rho): kinds right,
    frequent categories kept and rare ones merged into "other", heavy tails in quantile bins, nearly every
    row kept."""
    budget = schema_budget(1.0, 1e-5, schema_share(15, SynthConfig().schema_budget_share))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        r = infer_schema(adult_text, rho=budget.rho, delta=budget.delta, seed=4)
    s, real = r.schema, load_adult("train")
    for spec in s:
        assert spec.kind == ("integer" if pd.api.types.is_integer_dtype(real[spec.name]) else "categorical")
    assert set(s["sex"].categories) == {"Male", "Female"} and not s["sex"].other
    assert s["native-country"].other and "United-States" in s["native-country"].categories
    assert "Holand-Netherlands" not in s["native-country"].categories
    assert s["capital-gain"].edges[:2] == (-0.5, 0.5) and s["capital-gain"].n_bins >= 10
    fnlwgt = s["fnlwgt"]
    assert fnlwgt.n_bins >= 50 and _shares(np.clip(real["fnlwgt"], fnlwgt.lo, fnlwgt.hi), fnlwgt.edges).max() < 0.04
    age = s["age"]
    assert age.n_bins == age.hi - age.lo + 1 and age.lo <= 18 and age.hi >= real["age"].quantile(0.98)
    assert len(s.conform(adult_text)) >= 0.99 * len(real)
    assert s["education-num"].n_bins >= 14
