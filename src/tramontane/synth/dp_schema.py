"""Infer a table's schema with differential privacy (or, explicitly and loudly, without it).

Privacy unit: one row, neighbouring tables differ by adding or removing one row (the relation DP-SGD is
accounted under). Every row holds exactly one value per column, so each per-column histogram below has
sensitivity 1 (one cell moves by one). Every inferred column gets an even share epsilon_c of epsilon, delta is
shared by the categorical columns, and the mechanisms compose by basic composition: the whole inference is
(sum epsilon, sum delta)-DP.
`SchemaInference.spend` lists every mechanism's share so the caller can put it on the privacy ledger
(`ledger_events()`).

Column kinds. A kind declared in `kinds` (or a `known` spec) is public and costs nothing. Any other kind is
decided with DP, never from the dtype pandas guessed: one added row (a missing age, the text `unknown` in
an integer column) flips a whole column's dtype, so a kind read off the dtype would publish that row.
Every entry is read from its value (`schema.parse_numbers`) into one of four cells: missing (NaN, None, a
blank string) / a finite integral number / a finite non-integral number / not a number (text, booleans,
infinities, other objects). One row moves one cell by one, and Laplace(b = 1/epsilon_k) noise on all four
cells makes the histogram epsilon_k-DP (pure; Dwork, McSherry, Nissim, Smith 2006). The kind is a
post-processing of the noisy counts h. With P = h_int + h_frac + h_text: categorical if h_text > tau_k and
h_text > KIND_MIN_SHARE * P; else float if h_frac passes the same two tests; else integer, if some present
cell exceeds tau_k; else the column cannot be inferred (an error that asks for its kind).
tau_k = ln(3 / (2 KIND_BETA)) / epsilon_k: noise alone lifts one of the three present cells over tau_k with
probability at most KIND_BETA = 1e-6 (a wrong kind costs far more than a range one bin too wide, and a
column's bulk clears even this tau_k easily). A column given a public range (`ranges`) is numeric: only integer or float is decided.
epsilon_k = kind_share * epsilon_c; the rest of epsilon_c goes to the column's range or category mechanism,
chosen by the kind. In a column decided numeric, entries that are not numbers count as missing (the
numeric mechanism's missing cell holds them; `Schema.conform` later drops their rows).

Categorical columns: a thresholded noisy histogram over the values that occur (the "stability-based
histogram"; Korolova, Kenthapadi, Mishra, Ntoulas 2009, "Releasing search queries and clicks privately";
Bun, Nissim, Stemmer 2016, "Simultaneous private learning of multiple concepts", the stability-based
histogram, also Vadhan 2017, "The complexity of differential privacy", Prop. 3.5; Gopi et al. 2020,
"Differentially private set union", for the Gaussian variant). For each value v with count n_v >= 1 we
release whether n_v + Z_v > tau, and keep the values that pass (sorted, so their order reveals nothing).
- Laplace (default): Z ~ Lap(b = 1/epsilon_c), tau = 1 + ln(1/(2 delta_c)) / epsilon_c.
- Gaussian: Z ~ N(0, sigma^2) with sigma from the analytic Gaussian mechanism (Balle and Wang 2018,
  Thm. 8) at (epsilon_c, delta_c/2), tau = 1 + sigma * Phi^-1(1 - delta_c/2).
Why it is (epsilon_c, delta_c)-DP: let D' = D + {x} and v = x's value. If v occurs in D, only n_v changes,
by one; releasing a post-processing of n_v + Z is epsilon_c-DP (Laplace), (epsilon_c, delta_c/2)-DP
(Gaussian). If v does not occur in D, v is no candidate there; on D' it is kept with probability
P[1 + Z > tau] = delta_c (Laplace), delta_c/2 (Gaussian), and otherwise the two outputs have the same
distribution: (0, delta)-DP. The threshold and its delta are needed *because* the candidates come from the
data: a value seen once would otherwise be published with probability close to one half. Here epsilon_c and
delta_c are what the column has left after its kind decision: delta is split evenly among the columns
declared or decided categorical.

Numeric columns: a Laplace histogram over PUBLIC bins (pure epsilon_c-DP: one row moves one cell by one, and
every cell is noised, empty or not), in the manner of ApproxBounds in Google's differential-privacy library.
The bins are a coarse public range the user gives (`ranges`, 1000 bins) or a wide default grid (+-1e-3 to
+-1e9, 32 bins per decade, plus an under- and an overflow cell), and one more cell counts missing values.
lo is the lower edge of the lowest cell whose noisy count exceeds tau, hi the upper edge of the highest;
`missing` is whether the missing cell exceeds tau. tau = ln(m / (2 beta)) / epsilon_c over m cells makes
the chance that noise alone lifts any empty cell over tau at most beta (a utility, not a privacy, choice).
Tails thinner than about tau rows per bin are cut off and later clipped (`Schema.conform`). This replaces
the exponential-mechanism quantile (Smith 2011), which needs the budget split between the two bounds and
picks far-off points when a wide public range leaves many candidates equally good.

Composition. The mechanisms run one after the other and later ones depend on earlier outputs (a column's
second mechanism on its kind; delta_c on how many columns came out categorical). Basic composition holds
for adaptively chosen mechanisms and parameters as long as the shares always sum to at most the budget
(Rogers, Roth, Ullman, Vadhan 2016, "Privacy odometers and filters"), and here they sum to exactly
(epsilon, delta) (or less when a column fails: what was spent is what `spend` lists).

Assumptions: noise is drawn in floating point by numpy, from a PCG64 generator seeded with 128 bits from
`secrets` (not hardened against floating-point attacks, Mironov 2012). The cap on distinct values (checked
on declared-categorical columns and on the text values of undeclared ones before anything is spent, and on
columns decided categorical after their kind decision) and the refusal of an empty table depend on the data
but publish nothing: they are raised to the data holder, and no error message quotes a value from the rows
or an exact count. A fixed `seed` makes the noise reproducible and is for tests.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from tramontane.errors import DataError, PrivacyParameterError, SchemaError, TramontaneWarning
from tramontane.synth.schema import (
    DEFAULT_N_BINS,
    KINDS,
    MAX_CATEGORIES,
    ColumnSpec,
    Schema,
    float_edges,
    integer_edges,
    parse_numbers,
)

RANGE_SEARCH_BINS = 1000  # bins of a user-given coarse public range
DEFAULT_BETA = 1e-3
NOISES = ("laplace", "gaussian")
KIND_CELLS = ("missing", "integral", "non-integral", "not a number")
KIND_BUDGET_SHARE = 0.2  # of a column's epsilon, for deciding its kind (a bulk count: needs far less)
KIND_MIN_SHARE = 0.05  # of the noisy present count: a few odd entries do not make a column text or float
KIND_BETA = 1e-6  # chance that noise alone makes an empty kind cell count (and so a wrong kind)
KIND_MECHANISM = "kind decision (laplace histogram)"


def _default_search_edges() -> np.ndarray:
    magnitudes = 10.0 ** (np.arange(-3 * 32, 9 * 32 + 1) / 32)  # 1e-3 .. 1e9, ratio 1.075
    return np.concatenate([-magnitudes[::-1], magnitudes])


DEFAULT_SEARCH_EDGES = _default_search_edges()


# -- calibration --------------------------------------------------------------------------------------------

def laplace_threshold(epsilon: float, delta: float) -> float:
    """tau with P[1 + Lap(1/epsilon) > tau] <= delta: 1 + ln(1/(2 delta)) / epsilon (at least 1)."""
    return 1.0 + max(0.0, math.log(1.0 / (2.0 * delta))) / epsilon


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(sigma: float, epsilon: float) -> float:
    """The smallest delta for which N(0, sigma^2) on a sensitivity-1 query is (epsilon, delta)-DP
    (Balle and Wang 2018, Theorem 8)."""
    a, b = 1.0 / (2.0 * sigma), epsilon * sigma
    tail = 0.5 * math.erfc((a + b) / math.sqrt(2.0))  # Phi(-a - b), computed without cancellation
    second = 0.0 if tail == 0.0 else math.exp(min(epsilon + math.log(tail), 700.0))
    return max(0.0, _phi(a - b) - second)


def analytic_gaussian_sigma(epsilon: float, delta: float) -> float:
    """Smallest sigma making the Gaussian mechanism on a sensitivity-1 query (epsilon, delta)-DP."""
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, epsilon) > delta:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid == 0.0 or gaussian_delta(mid, epsilon) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def gaussian_threshold(sigma: float, delta: float) -> float:
    """tau with P[1 + N(0, sigma^2) > tau] = delta."""
    return 1.0 - sigma * NormalDist().inv_cdf(delta)


def numeric_threshold(epsilon: float, n_cells: int, beta: float) -> float:
    """tau such that Lap(1/epsilon) noise lifts any of `n_cells` empty cells over it with probability
    at most beta."""
    return math.log(n_cells / (2.0 * beta)) / epsilon


# -- mechanisms ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ColumnSpend:
    """What inferring one column cost, for the privacy ledger."""

    column: str
    mechanism: str
    epsilon: float
    delta: float
    noise: str | None = None  # "laplace" / "gaussian" / None (nothing drawn)
    noise_scale: float | None = None  # Laplace b or Gaussian sigma, on counts of sensitivity 1
    threshold: float | None = None

    @property
    def label(self) -> str:
        return f"schema inference: column {self.column!r} ({self.mechanism})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sort_key(value: Any) -> tuple[str, Any]:
    return (type(value).__name__, value)


def dp_category_set(
    counts: Mapping[Any, int] | pd.Series,
    epsilon: float,
    delta: float,
    rng: np.random.Generator,
    noise: str = "laplace",
) -> tuple[list[Any], bool, float, float]:
    """Thresholded noisy histogram over the values that occur (module docstring): (epsilon, delta)-DP.

    `counts` maps each value that occurs (NaN for missing) to its count >= 1. Returns (kept categories
    sorted, whether the missing value was kept, noise scale, threshold).
    """
    items = list(counts.items())
    if noise == "laplace":
        scale = 1.0 / epsilon
        tau = laplace_threshold(epsilon, delta)
        z = rng.laplace(0.0, scale, size=len(items))
    elif noise == "gaussian":
        scale = analytic_gaussian_sigma(epsilon, delta / 2.0)
        tau = gaussian_threshold(scale, delta / 2.0)
        z = rng.normal(0.0, scale, size=len(items))
    else:
        raise PrivacyParameterError(f"noise must be one of {list(NOISES)}, got {noise!r}")
    kept, missing = [], False
    for (value, count), zi in zip(items, z):
        assert count >= 1, "only values that occur are candidates"
        if count + zi > tau:
            if pd.isna(value):
                missing = True
            else:
                kept.append(value.item() if isinstance(value, np.generic) else value)
    return sorted(kept, key=_sort_key), missing, scale, tau


def dp_numeric_range(
    values: np.ndarray,
    epsilon: float,
    rng: np.random.Generator,
    edges: np.ndarray = DEFAULT_SEARCH_EDGES,
    beta: float = DEFAULT_BETA,
) -> tuple[float | None, float | None, bool, float, float]:
    """Laplace histogram over public `edges` (+ under/overflow + missing cell), thresholded: epsilon-DP.

    Returns (lo, hi, missing, noise scale, threshold); lo and hi are None when no bin passed the threshold.
    lo/hi are bin edges (lo: lower edge of the lowest kept cell, hi: upper edge of the highest).
    """
    x = np.asarray(values, dtype=np.float64)
    nan = np.isnan(x)
    cell = np.searchsorted(edges, x[~nan], side="right")  # 0: below edges[0]; len(edges): at/above edges[-1]
    counts = np.bincount(cell, minlength=len(edges) + 1).astype(np.float64)
    counts = np.append(counts, nan.sum())  # the missing cell
    scale = 1.0 / epsilon
    tau = numeric_threshold(epsilon, len(counts), beta)
    noisy = counts + rng.laplace(0.0, scale, size=len(counts))
    kept = np.flatnonzero(noisy[:-1] > tau)
    missing = bool(noisy[-1] > tau)
    if len(kept) == 0:
        return None, None, missing, scale, tau
    first, last = int(kept[0]), int(kept[-1])
    lo = float(edges[max(first - 1, 0)])
    hi = float(edges[min(last, len(edges) - 1)])
    return lo, hi, missing, scale, tau


def kind_counts(series: pd.Series) -> np.ndarray:
    """A column's exact kind histogram [4] over `KIND_CELLS`, each entry read from its value (never from the
    dtype; `schema.parse_numbers`). One row moves one cell by one."""
    x, missing = parse_numbers(series)
    finite = np.isfinite(x)
    integral = finite & (x == np.floor(x))
    return np.array([missing.sum(), integral.sum(), (finite & ~integral).sum(), (~missing & ~finite).sum()],
                    dtype=np.int64)


def decide_kind(counts: Sequence[float] | np.ndarray, tau: float, numeric_only: bool = False) -> str | None:
    """The kind a (noisy or exact) kind histogram says, by the thresholds of the module docstring; None when
    no present cell exceeds `tau`. `numeric_only`: a column given a public range, integer or float."""
    _, n_int, n_frac, n_text = (float(c) for c in counts)
    if numeric_only:
        n_text = -math.inf  # text counts as missing in a numeric column
    present = n_int + n_frac + max(n_text, 0.0)

    def passes(count: float) -> bool:
        return count > tau and count > KIND_MIN_SHARE * present

    if max(n_int, n_frac, n_text) <= tau:
        return None
    if passes(n_text):
        return "categorical"
    if passes(n_frac):
        return "float"
    return "integer"


def dp_column_kind(
    counts: Sequence[int] | np.ndarray,
    epsilon: float,
    rng: np.random.Generator,
    beta: float = KIND_BETA,
    numeric_only: bool = False,
) -> tuple[str | None, float, float]:
    """Laplace noise on every cell of a kind histogram (`kind_counts`), decided by `decide_kind`: epsilon-DP.

    Sensitivity 1 under adding or removing a row; tau = ln(3 / (2 beta)) / epsilon (module docstring): noise
    alone lifts an empty cell over tau with probability at most beta.
    Returns (kind or None, noise scale, threshold).
    """
    c = np.asarray(counts, dtype=np.float64)
    assert c.shape == (len(KIND_CELLS),), "one count per kind cell"
    scale = 1.0 / epsilon
    tau = numeric_threshold(epsilon, len(KIND_CELLS) - 1, beta)
    noisy = c + rng.laplace(0.0, scale, size=len(c))
    return decide_kind(noisy, tau, numeric_only), scale, tau


# -- inference ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SchemaInference:
    """The inferred schema and what it cost (an empty `spend` for a non-private inference)."""

    schema: Schema
    spend: tuple[ColumnSpend, ...] = ()
    private: bool = True
    notes: tuple[str, ...] = field(default=())

    @property
    def epsilon(self) -> float:
        return float(sum(s.epsilon for s in self.spend))

    @property
    def delta(self) -> float:
        return float(sum(s.delta for s in self.spend))

    def to_dict(self) -> dict[str, Any]:
        return {"private": self.private, "epsilon": self.epsilon, "delta": self.delta,
                "spend": [s.to_dict() for s in self.spend], "notes": list(self.notes)}

    def ledger_events(self) -> list[Any]:
        """One `EpsilonDeltaEvent` per column that spent something (basic composition, as documented)."""
        from tramontane.accounting.events import EpsilonDeltaEvent

        return [EpsilonDeltaEvent(s.epsilon, s.delta, label=s.label) for s in self.spend
                if s.epsilon > 0 or s.delta > 0]


def _check_budget(epsilon: float | None, delta: float | None, allow_non_private: bool) -> None:
    if epsilon is None:
        if not allow_non_private:
            raise PrivacyParameterError(
                "infer_schema needs a privacy budget: pass epsilon=... (and delta=... for categorical "
                "columns), or write a public schema; allow_non_private=True reads the schema off the "
                "private rows WITHOUT differential privacy"
            )
        return
    if allow_non_private:
        raise PrivacyParameterError("pass either epsilon (DP inference) or allow_non_private=True, not both")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise PrivacyParameterError(f"epsilon must be a positive finite number, got {epsilon!r}")
    if delta is not None and not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise PrivacyParameterError(f"delta must be in (0, 1), got {delta!r}; a common choice is delta < 1/n")


def infer_schema(
    df: pd.DataFrame,
    *,
    epsilon: float | None = None,
    delta: float | None = None,
    allow_non_private: bool = False,
    kinds: Mapping[str, str] | None = None,
    known: Schema | Sequence[ColumnSpec] | None = None,
    ranges: Mapping[str, tuple[float, float]] | None = None,
    n_bins: int = DEFAULT_N_BINS,
    max_categories: int = MAX_CATEGORIES,
    noise: str = "laplace",
    beta: float = DEFAULT_BETA,
    kind_share: float = KIND_BUDGET_SHARE,
    seed: int | None = None,
) -> SchemaInference:
    """Infer a schema for `df` with (epsilon, delta)-DP (module docstring), or without DP if allowed.

    epsilon, delta: the budget of the whole inference (basic composition): every inferred column gets
        epsilon/m; delta is split among the columns declared or decided categorical (numeric ones are
        pure-epsilon). `known` columns are copied as given and cost nothing.
    allow_non_private: read kinds, category sets and min/max straight off the rows (no DP): warns, and the
        schema records private=False. Kinds then come from the exact kind histograms (values, not dtypes).
    kinds: column -> "categorical" / "integer" / "float", a public declaration that costs nothing. The
        kind of any other column is decided with DP from its values, spending `kind_share` of its epsilon.
    ranges: column -> coarse PUBLIC (lo, hi) searched for the numeric bounds (default: a wide log grid); a
        column with a range is numeric.
    n_bins: bins of the inferred numeric columns. max_categories: a categorical column with more distinct
        values is refused (bin or drop it). beta: chance that noise alone widens a numeric range (the kind
        decision uses KIND_BETA).
    seed: fixed noise, for tests only (warns); default: 128 bits from `secrets`.

    Raises DataError on an empty table, SchemaError on a column that cannot be inferred (too many distinct
    values before anything is spent; no kind or nothing surviving the threshold after, with `.spend` on the
    error). No message quotes a value from the rows or an exact count.
    """
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame, got {type(df).__name__}")
    if len(df) == 0 or df.shape[1] == 0:
        what = "rows" if len(df) == 0 else "columns"
        raise DataError(f"the table is empty (no {what}): nothing to infer from")
    _check_budget(epsilon, delta, allow_non_private)
    if noise not in NOISES:
        raise PrivacyParameterError(f"noise must be one of {list(NOISES)}, got {noise!r}")
    if not 0.0 < beta < 1.0:
        raise PrivacyParameterError(f"beta must be in (0, 1), got {beta!r}")
    if not (isinstance(kind_share, (int, float)) and 0.0 < kind_share < 1.0):
        raise PrivacyParameterError(f"kind_share must be in (0, 1), got {kind_share!r}")
    names = list(df.columns)
    bad_names = [n for n in names if not isinstance(n, str) or not n]
    if bad_names:
        raise SchemaError(f"column names must be non-empty strings, got {bad_names[:3]}: rename them")
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise SchemaError(f"the table has repeated column names {repeated}: rename or drop them")
    known_specs = {c.name: c for c in (known or ())}
    kinds = dict(kinds or {})
    ranges = dict(ranges or {})
    for label, keys in (("known", known_specs), ("kinds", kinds), ("ranges", ranges)):
        stray = [k for k in keys if k not in names]
        if stray:
            raise SchemaError(
                f"{label} names column(s) {stray} that the table does not have; columns: {names}"
            )
    for name, kind in kinds.items():
        if kind not in KINDS:
            raise SchemaError(f"the kind of column {name!r} must be one of {list(KINDS)}, got {kind!r}")
    inferred = [n for n in names if n not in known_specs]
    declared = {n: kinds[n] for n in inferred if n in kinds}  # public: costs nothing
    undecided = [n for n in inferred if n not in declared]  # decided from the values (with DP if epsilon)
    for name, (lo, hi) in ranges.items():
        if declared.get(name) == "categorical" or name in known_specs:
            raise SchemaError(f"column {name!r} has a public range: only inferred numeric columns take one")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise SchemaError(f"the public range of column {name!r} must be finite (lo, hi) with lo < hi, "
                              f"got {(lo, hi)!r}")
    _check_cardinality(df, declared, [n for n in undecided if n not in ranges], max_categories)

    if epsilon is None:
        return _infer_non_private(df, names, declared, undecided, ranges, known_specs, n_bins, max_categories)

    maybe_categorical = [n for n in inferred if declared.get(n, "categorical") == "categorical"
                         and n not in ranges]
    if maybe_categorical and delta is None:
        raise PrivacyParameterError(
            f"{len(maybe_categorical)} column(s) are or may turn out categorical: their candidate values "
            "come from the data, so the threshold needs a delta > 0; pass delta (e.g. below 1/n), or declare "
            "the kinds of the numeric columns"
        )
    if seed is not None:
        warnings.warn(
            f"infer_schema(seed={seed}) draws reproducible noise: anyone who knows the seed can remove it. "
            "Use a seed only in tests.", TramontaneWarning, stacklevel=2,
        )
        rng = np.random.default_rng(seed)
    else:
        rng = np.random.default_rng(secrets.randbits(128))
    eps_c = epsilon / max(len(inferred), 1)
    eps_kind = kind_share * eps_c
    spend: list[ColumnSpend] = []
    failures: list[str] = []
    notes: list[str] = []

    # 1. Kinds (pure epsilon_kind each); everything after may depend on them (adaptive basic composition).
    resolved = dict(declared)
    for name in undecided:
        numeric_only = name in ranges
        kind, scale, tau = dp_column_kind(kind_counts(df[name]), eps_kind, rng, KIND_BETA, numeric_only)
        spend.append(ColumnSpend(name, KIND_MECHANISM, eps_kind, 0.0, "laplace", scale, tau))
        if kind is None:
            failures.append(f"column {name!r}: too few rows to decide its kind at this budget (no kind "
                            f"passed the threshold tau={tau:.1f} at epsilon={eps_kind:.3g}); declare its "
                            "kind")
            continue
        if kind == "categorical" and df[name].nunique(dropna=True) > max_categories:
            failures.append(f"column {name!r} came out categorical but has more distinct values than "
                            f"max_categories={max_categories}: bin or group its values, or declare its kind")
            continue
        resolved[name] = kind

    # 2. Ranges and category sets with the rest of each column's epsilon; delta over the categorical ones.
    n_cat = sum(k == "categorical" for k in resolved.values())
    assert not n_cat or delta is not None, "checked above: undecided columns may come out categorical"
    delta_c = delta / n_cat if n_cat else 0.0
    specs: dict[str, ColumnSpec] = dict(known_specs)
    for name in names:
        if name not in resolved:
            continue
        kind = resolved[name]
        eps_rest = eps_c - (eps_kind if name in undecided else 0.0)
        if kind == "categorical":
            counts = df[name].value_counts(dropna=False, sort=False)
            counts = counts[counts > 0]  # a pandas Categorical lists unused categories: not candidates
            cats, missing, scale, tau = dp_category_set(counts, eps_rest, delta_c, rng, noise)
            mechanism = f"thresholded {noise} histogram"
            spend.append(ColumnSpend(name, mechanism, eps_rest, delta_c, noise, scale, tau))
            if not cats and not missing:
                failures.append(f"column {name!r}: no value passed the threshold tau={tau:.1f} (only "
                                f"values held by more than about {math.ceil(tau)} rows survive at "
                                f"epsilon={eps_rest:.3g}); give its categories in a public schema")
                continue
            specs[name] = ColumnSpec.categorical(name, cats, missing=missing)
            continue
        if name in ranges:
            lo_pub, hi_pub = ranges[name]
            edges = np.asarray(integer_edges(math.ceil(lo_pub), math.floor(hi_pub), RANGE_SEARCH_BINS)
                               if kind == "integer" else float_edges(lo_pub, hi_pub, RANGE_SEARCH_BINS))
        else:
            edges = DEFAULT_SEARCH_EDGES
        lo, hi, missing, scale, tau = dp_numeric_range(_numbers(df[name]), eps_rest, rng, edges, beta)
        mechanism = "laplace histogram over public bins"
        spend.append(ColumnSpend(name, mechanism, eps_rest, 0.0, "laplace", scale, tau))
        if lo is not None and kind == "integer":
            lo, hi = float(math.ceil(lo)), float(math.ceil(hi) - 1 if hi < edges[-1] else math.floor(hi))
        if lo is None or lo > hi:
            if name in ranges:
                lo, hi = ranges[name]
                if kind == "integer":
                    lo, hi = math.ceil(lo), math.floor(hi)
                note = f"column {name!r}: no bin passed the threshold; used the public range {ranges[name]}"
                notes.append(note)
                warnings.warn(note + " (too little data for the budget to narrow it)", TramontaneWarning,
                              stacklevel=2)
            else:
                failures.append(f"column {name!r}: no bin of the default grid passed the threshold "
                                f"tau={tau:.1f}; give a public range for the column, or its spec in a public "
                                "schema")
                continue
        if name in ranges:  # never leave the public range
            lo, hi = max(lo, ranges[name][0]), min(hi, ranges[name][1])
            if kind == "integer":
                lo, hi = math.ceil(lo), math.floor(hi)
        specs[name] = ColumnSpec.numeric(name, lo, hi, kind, n_bins=n_bins, missing=missing)

    total_eps, total_delta = sum(s.epsilon for s in spend), sum(s.delta for s in spend)
    if failures:
        err = SchemaError(
            "DP schema inference failed for:\n  - " + "\n  - ".join(failures)
            + f"\nThis attempt spent epsilon={total_eps:.4g}, delta={total_delta:.3g} (listed per column in "
            "the error's spend): count it against the data's budget before retrying with a larger epsilon or "
            "with public specs for these columns."
        )
        err.spend = tuple(spend)  # type: ignore[attr-defined]
        raise err
    schema = Schema(
        tuple(specs[n] for n in names), private=True,
        provenance=f"inferred with ({total_eps:.4g}, {total_delta:.3g})-differential privacy "
                   f"({noise} noise, tramontane.synth.dp_schema)",
        metadata={"inference": {"mechanism": "dp", "epsilon": total_eps, "delta": total_delta, "noise": noise,
                                "known_columns": sorted(known_specs), "declared_kinds": sorted(declared)}},
    )
    return SchemaInference(schema, tuple(spend), private=True, notes=tuple(notes))


def _check_cardinality(
    df: pd.DataFrame, declared: Mapping[str, str], undecided: Sequence[str], cap: int
) -> None:
    """Refuse, before anything is spent, columns declared categorical with more than `cap` distinct values
    and undeclared ones with more than `cap` distinct values that are not numbers (identifier-like text)."""
    too_many = [n for n, k in declared.items() if k == "categorical" and df[n].nunique(dropna=True) > cap]
    for name in undecided:
        x, missing = parse_numbers(df[name])
        text = ~missing & np.isnan(x)
        if text.sum() > cap and df[name][text].nunique() > cap:
            too_many.append(name)
    if too_many:
        raise SchemaError(
            "column(s) with too many distinct values for a categorical schema column:\n  - "
            + "\n  - ".join(f"column {n!r} has more distinct values than max_categories={cap}"
                             for n in too_many)
            + "\nFix: drop identifier-like columns, bin or group the values (e.g. keep a prefix or map rare "
            "values to 'other'), declare numeric columns numeric, or raise max_categories. Nothing was spent."
        )


def _numbers(series: pd.Series) -> np.ndarray:
    """A numeric column's values for the range mechanisms: entries that are not finite numbers (text,
    booleans, infinities) count as missing (NaN), like a missing entry."""
    x, _ = parse_numbers(series)
    return np.where(np.isfinite(x), x, np.nan)


def _infer_non_private(
    df: pd.DataFrame,
    names: list[str],
    declared: Mapping[str, str],
    undecided: Sequence[str],
    ranges: Mapping[str, tuple[float, float]],
    known: Mapping[str, ColumnSpec],
    n_bins: int,
    max_categories: int,
) -> SchemaInference:
    warnings.warn(
        "infer_schema(allow_non_private=True) reads the category sets and numeric ranges off the private "
        "rows WITHOUT differential privacy: rare values and extremes are published as they are, and no DP "
        "guarantee covers the schema. It is marked private=False and reports will say so. Pass epsilon=... "
        "(and delta=...) for a DP schema, or write one from public knowledge.",
        TramontaneWarning, stacklevel=3,
    )
    kinds = dict(declared)
    for name in undecided:  # the DP rule on exact counts: from the values, never the dtype
        kind = decide_kind(kind_counts(df[name]), 0.0, numeric_only=name in ranges)
        if kind is None:
            raise SchemaError(f"column {name!r} holds no values to infer a kind from: declare its kind or "
                              "give its spec in a public schema")
        kinds[name] = kind
    _check_cardinality(df, {n: k for n, k in kinds.items() if n in undecided}, (), max_categories)
    specs = dict(known)
    for name in names:
        if name in known:
            continue
        kind = kinds[name]
        s = df[name]
        if kind == "categorical":
            values = (v.item() if isinstance(v, np.generic) else v for v in pd.unique(s.dropna()))
            cats = sorted(values, key=_sort_key)
            specs[name] = ColumnSpec.categorical(name, cats, missing=bool(s.isna().any()))
            continue
        x = _numbers(s)
        present = x[~np.isnan(x)]
        if len(present) == 0:
            raise SchemaError(f"column {name!r} holds no numbers to take a range from: give its range in a "
                              "public schema")
        lo, hi = float(present.min()), float(present.max())
        if kind == "integer":
            lo, hi = math.floor(lo), math.ceil(hi)
        specs[name] = ColumnSpec.numeric(name, lo, hi, kind, n_bins=n_bins, missing=bool(np.isnan(x).any()))
    schema = Schema(tuple(specs[n] for n in names), private=False,
                    provenance="inferred from the private rows WITHOUT differential privacy",
                    metadata={"inference": {"mechanism": "none (non-private)",
                                            "known_columns": sorted(known)}})
    return SchemaInference(schema, (), private=False, notes=("schema read off the data without DP",))
