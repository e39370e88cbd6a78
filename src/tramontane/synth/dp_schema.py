"""Infer a table's schema with differential privacy (or, explicitly and loudly, without it).

Privacy unit: one row, neighbouring tables differ by adding or removing one row (the relation DP-SGD is
accounted under). Every row holds exactly one value per column, so each per-column histogram below has
sensitivity 1 (one cell moves by one, in every norm). Two ways to spend, chosen by the budget passed:

- (epsilon, delta): Laplace mechanisms (or the analytic Gaussian) composed by BASIC composition. Every
  inferred column gets an even share epsilon_c of epsilon, delta is shared by the categorical columns, and
  the whole inference is (sum epsilon, sum delta)-DP. `SchemaInference.spend` lists every mechanism's share;
  `ledger_events()` one `EpsilonDeltaEvent` each.
- rho (zCDP) and delta: Gaussian mechanisms only, so that an accountant composes them tightly with the rest
  of a ledger (RDP and PLD compose Gaussians exactly; the synthesizer then calibrates DP-SGD with the ledger
  as its prior). `schema_budget` turns a share of a run's whole (epsilon, delta) into (rho, delta): the
  share of the rho of the one Gaussian release that would spend the whole budget. This is what
  `Synthesizer.fit` uses; see "The Gaussian inference" below.

Column kinds. A kind declared in `kinds` (or a `known` spec) is public and costs nothing. Any other kind is
decided with DP, never from the dtype pandas guessed: one added row (a missing age, the text `unknown` in
an integer column) flips a whole column's dtype, so a kind read off the dtype would publish that row.
Every entry is read from its value (`schema.parse_numbers`) into one of four cells: missing (NaN, None, a
blank string) / a finite integral number / a finite non-integral number / not a number (text, booleans,
infinities, other objects). One row moves one cell by one, and Laplace(b = 1/epsilon_k) noise on all four
cells makes the histogram epsilon_k-DP (pure; Dwork, McSherry, Nissim, Smith 2006); N(0, sigma_k^2) noise
makes it the Gaussian mechanism, 1/(2 sigma_k^2)-zCDP (Bun and Steinke 2016). The kind is a
post-processing of the noisy counts h. With P = h_int + h_frac + h_text: categorical if h_text > tau_k and
h_text > KIND_MIN_SHARE * P; else float if h_frac passes the same two tests; else integer, if some present
cell exceeds tau_k; else the column cannot be inferred (an error that asks for its kind).
tau_k is the noise's (1 - KIND_BETA / 3) quantile (ln(3 / (2 KIND_BETA)) / epsilon_k for Laplace): noise
alone lifts one of the three present cells over tau_k with probability at most KIND_BETA = 1e-6 (a wrong
kind costs far more than a range one bin too wide, and a column's bulk clears even this tau_k easily). A
column given a public range (`ranges`) is numeric: only integer or float is decided. The kind decision gets
`kind_share` of the column's budget, the rest goes to the column's range or category mechanism, chosen by the
kind. In a column decided numeric, entries that are not numbers count as missing (the numeric mechanism's
missing cell holds them; `Schema.conform` later drops their rows).

Categorical columns: a thresholded noisy histogram over the values that occur (the "stability-based
histogram"; Korolova, Kenthapadi, Mishra, Ntoulas 2009, "Releasing search queries and clicks privately";
Bun, Nissim, Stemmer 2016, "Simultaneous private learning of multiple concepts", the stability-based
histogram, also Vadhan 2017, "The complexity of differential privacy", Prop. 3.5; Gopi et al. 2020,
"Differentially private set union", for the Gaussian variant). For each value v with count n_v >= 1 we
release whether n_v + Z_v > tau, and keep the values that pass (sorted, so their order reveals nothing).
- Laplace (default): Z ~ Lap(b = 1/epsilon_c), tau = 1 + ln(1/(2 delta_c)) / epsilon_c.
- Gaussian, (epsilon, delta) budget: Z ~ N(0, sigma^2) with sigma from the analytic Gaussian mechanism (Balle
  and Wang 2018, Thm. 8; `tramontane.accounting.analytic_gaussian_sigma`) at (epsilon_c, delta_c/2),
  tau = 1 + sigma * Phi^-1(1 - delta_c/2).
Why it is (epsilon_c, delta_c)-DP: let D' = D + {x} and v = x's value. If v occurs in D, only n_v changes,
by one; releasing a post-processing of n_v + Z is epsilon_c-DP (Laplace), (epsilon_c, delta_c/2)-DP
(Gaussian). If v does not occur in D, v is no candidate there; on D' it is kept with probability
P[1 + Z > tau] = delta_c (Laplace), delta_c/2 (Gaussian), and otherwise the two outputs have the same
distribution: (0, delta)-DP. The threshold and its delta are needed *because* the candidates come from the
data: a value seen once would otherwise be published with probability close to one half. Here epsilon_c and
delta_c are what the column has left after its kind decision: delta is split evenly among the columns
declared or decided categorical.

Numeric columns, (epsilon, delta) budget: a Laplace histogram over PUBLIC cells (pure epsilon_c-DP: one row
moves one cell by one, and every cell is noised, empty or not), in the manner of ApproxBounds in Google's
differential-privacy library. The cells are a coarse public range the user gives (`ranges`, 1000 cells) or
a wide default grid (+-1e-3 to +-1e9, 32 cells per decade, plus an under- and an overflow cell), and one
more cell counts missing values. lo is the lower edge of the lowest cell whose noisy count exceeds tau, hi
the upper edge of the highest; `missing` is whether the missing cell exceeds tau. tau = ln(m / (2 beta)) /
epsilon_c over m cells makes the chance that noise alone lifts any empty cell over tau at most beta (a
utility, not a privacy, choice). Tails thinner than about tau rows per cell are cut off and later clipped
(`Schema.conform`); the bins are `n_bins` equal-width ones. This replaces the exponential-mechanism quantile
(Smith 2011), which needs the budget split between the two bounds and picks far-off points when a wide
public range leaves many candidates equally good.

Composition, (epsilon, delta) budget. The mechanisms run one after the other and later ones depend on
earlier outputs (a column's second mechanism on its kind; delta_c on how many columns came out categorical).
Basic composition holds for adaptively chosen mechanisms and parameters as long as the shares always sum to
at most the budget (Rogers, Roth, Ullman, Vadhan 2016, "Privacy odometers and filters"), and here they sum
to exactly (epsilon, delta) (or less when a column fails: what was spent is what `spend` lists).

The Gaussian inference (rho, delta). Every inferred column gets rho_c = rho / m, fixed from public inputs
(the column names, the declared kinds and ranges, the budget) before any noise is drawn (`_GaussianPlan`):
- kind decision (undeclared columns): N(0, sigma_k^2) on the four kind cells, rho_k = kind_share x rho_c
  (default GAUSSIAN_KIND_SHARE); the rest r = rho_c - rho_k goes to the values:
- categorical: the Gaussian thresholded histogram with (1 - OTHER_SHARE) r, threshold tau = 1 + sigma *
  Phi^-1(1 - delta_i), then N(0, sigma_o^2) with OTHER_SHARE r on the number of rows whose value was not
  kept (sensitivity 1 once the kept set is released: one row moves it by at most one); the column gets the
  public sentinel value "other" (`schema.OTHER`, to which `Schema.conform` maps every value outside the kept
  ones) when that noisy count exceeds OTHER_Z sigma_o.
- numeric: N(0, sigma^2) with all of r on the cells of a public grid, the missing cell and under/overflow
  cells (`dp_bins.search_edges`: for integers the log grid moved to half-integers); the range and the bin
  edges, at quantiles of the noisy histogram, are post-processing (`dp_bins`). The two parts a categorical
  column splits r into are, for a numeric one, one release of noise 1/(2 r): two Gaussian releases of the
  same counts with independent noise and 1/sigma_1^2 + 1/sigma_2^2 = 1/sigma^2 are worth exactly one of
  sigma (inverse-variance weighting), so every column costs rho_c whatever kind comes out.
Each of these is a Gaussian mechanism on a sensitivity-1 query chosen adaptively from public inputs and
earlier outputs, with its sigma fixed in advance; their adaptive composition is rho-zCDP, and (what the
accountants compute) has the RDP curve, and the privacy loss distribution, of the one Gaussian of
1/(2 sigma^2) = rho (RDP: Mironov 2017, Prop. 3 and 7; GDP: Dong, Roth and Su 2022, Cor. 3.3 and 3.5).
`ledger_events()` therefore charges one `GaussianEvent` with that sigma, in full even when a column failed
before spending its share, so the ledger depends on the public inputs only.

The thresholds (the delta part; Gopi et al. 2020, Thm. 5.1 for one histogram; here composed with the rest
of the ledger). k = the number of columns declared or possibly categorical; each threshold passes a value
seen once with probability delta_i = 1 - (1 + delta)^(-1/k), fixed in advance. Fix neighbours D' = D + {x}
and let B be the set of columns where x's value does not occur in D. Run the whole adaptive pipeline (this
inference, then the row count and DP-SGD) on D'; for a column in B, its output on D' differs from the output
it would have on D only if x's value passes, an event E_i that depends on that value's own noise alone,
P[E_i] = delta_i, independent of everything else. So with p = 1 - prod_B (1 - delta_i),
P' = (1 - p) P'' + p N: P'' is the pipeline that feeds those columns' category mechanisms D (which then do
not see x) and every other mechanism D' (the kind decisions, the "other" counts, the numeric histograms, the
row count, DP-SGD). P and P'' differ only in mechanisms the accountant composes, adaptively, so h(eps), the
larger hockey-stick divergence of (P, P'') and (P'', P) at e^eps, is at most the accountant's delta(eps).
For any set S of outputs:
- P'(S) - e^eps P(S) <= (1 - p) (P''(S) - e^eps P(S)) + p N(S) <= h(eps) + p;
- P(S) - e^eps P'(S) <= P(S) - e^(eps') P''(S) <= h(eps'), with e^(eps') = (1 - p) e^eps; and taking S* =
  {P > e^(eps') P''}, h(eps') - h(eps) <= (e^eps - e^(eps')) P''(S*) <= (e^(eps - eps') - 1) P(S*) <=
  p / (1 - p).
Both are at most delta(eps) + p / (1 - p) <= delta(eps) + 1 / prod_all (1 - delta_i) - 1 = delta(eps) +
delta (removing x is the same pair read the other way). The ledger carries an `EpsilonDeltaEvent(0, delta)`
for the thresholds (`threshold_charge`), which the accountants add to their delta. The delta_i are fixed in
advance, not chosen after the kind decisions, as this argument needs: then E_i depends on one noise draw
alone, and conditioning on no E_i leaves the rest of the randomness, and so P'', as it is.

Assumptions: noise is drawn in floating point by numpy, from a PCG64 generator seeded with 128 bits from
`secrets` (not hardened against floating-point attacks, Mironov 2012). The cap on distinct values (checked
on declared-categorical columns and on the text values of undeclared ones before anything is spent, and on
columns decided categorical after their kind decision) and the refusal of an empty table depend on the data
but publish nothing: they are raised to the data holder, and no error message quotes a value from the rows
or an exact count. A fixed `seed` makes the noise reproducible and is for tests.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from tramontane import accounting
from tramontane.accounting.gaussian import analytic_gaussian_sigma, gaussian_delta  # noqa: F401 - re-exported
from tramontane.errors import DataError, PrivacyParameterError, SchemaError, TramontaneWarning
from tramontane.seeding import numpy_rng
from tramontane.synth.dp_bins import (
    DEFAULT_SEARCH_EDGES,
    cell_counts,
    noisy_range,
    numeric_bins,
    range_edges,
    search_edges,
)
from tramontane.tables.schema import (
    DEFAULT_N_BINS,
    KINDS,
    MAX_CATEGORIES,
    ColumnSpec,
    Schema,
    float_edges,
    integer_edges,
    parse_numbers,
)

DEFAULT_BETA = 1e-3
NOISES = ("laplace", "gaussian")
KIND_CELLS = ("missing", "integral", "non-integral", "not a number")
KIND_BUDGET_SHARE = 0.2  # of a column's epsilon, for deciding its kind (a bulk count: needs far less)
KIND_MIN_SHARE = 0.05  # of the noisy present count: a few odd entries do not make a column text or float
KIND_BETA = 1e-6  # chance that noise alone makes an empty kind cell count (and so a wrong kind)
KIND_MECHANISM = "kind decision (laplace histogram)"
# the Gaussian (zCDP) inference: shares of a column's rho, and its ledger labels
GAUSSIAN_KIND_SHARE = 0.1  # for the kind decision: a bulk count, far less needed than for the values
OTHER_SHARE = 0.15  # of what a categorical column has left, for the count of rows outside its kept values
OTHER_Z = 2.0  # "other" is kept when that noisy count exceeds OTHER_Z sigma
GAUSSIAN_KIND_MECHANISM = "kind decision (gaussian histogram)"
GAUSSIAN_CATEGORY_MECHANISM = "thresholded gaussian histogram"
GAUSSIAN_OTHER_MECHANISM = "gaussian count of the rows outside the kept values"
GAUSSIAN_NUMERIC_MECHANISM = "gaussian histogram over public cells (range and quantile bins)"
GAUSSIAN_LABEL = "schema inference (gaussian mechanisms, every column)"
THRESHOLD_LABEL = "schema inference (thresholds of the category sets)"
SCHEMA_SHARE_PER_COLUMN = 0.01  # of the whole ledger's rho (and delta), per column, up to the configured cap


# -- calibration --------------------------------------------------------------------------------------------

def laplace_threshold(epsilon: float, delta: float) -> float:
    """tau with P[1 + Lap(1/epsilon) > tau] <= delta: 1 + ln(1/(2 delta)) / epsilon (at least 1)."""
    return 1.0 + max(0.0, math.log(1.0 / (2.0 * delta))) / epsilon


def gaussian_threshold(sigma: float, delta: float) -> float:
    """tau with P[1 + N(0, sigma^2) > tau] = delta."""
    return 1.0 - sigma * NormalDist().inv_cdf(delta)


def numeric_threshold(epsilon: float, n_cells: int, beta: float) -> float:
    """tau such that Lap(1/epsilon) noise lifts any of `n_cells` empty cells over it with probability
    at most beta."""
    return math.log(n_cells / (2.0 * beta)) / epsilon


gaussian_sigma = accounting.gaussian_sigma_for_rho  # rho = 1 / (2 sigma^2): the accountants' one home


def gaussian_tail(sigma: float, p: float) -> float:
    """t with P[N(0, sigma^2) > t] = p."""
    return -sigma * NormalDist().inv_cdf(p)


def threshold_deltas(delta: float, k: int) -> float:
    """The per-column threshold delta_i of k category sets whose charged delta `threshold_charge` is
    exactly `delta`: 1 - (1 + delta)^(-1/k)."""
    return -math.expm1(-math.log1p(delta) / k)


def threshold_charge(deltas: Sequence[float]) -> float:
    """The delta a composition charges for thresholds that pass a value seen once with probabilities
    `deltas`: p / (1 - p) with 1 - p = prod(1 - delta_i) (module docstring, Gaussian inference)."""
    return math.expm1(-sum(math.log1p(-d) for d in deltas))


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
    rho: float = 0.0  # the Gaussian inference: zCDP of this mechanism (epsilon is then 0; delta: its threshold)

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
        return gaussian_category_set(counts, analytic_gaussian_sigma(epsilon, delta / 2.0), delta / 2.0, rng)
    else:
        raise PrivacyParameterError(f"noise must be one of {list(NOISES)}, got {noise!r}")
    kept, missing = _passing(items, z, tau)
    return kept, missing, scale, tau


def gaussian_category_set(
    counts: Mapping[Any, int] | pd.Series, sigma: float, delta: float, rng: np.random.Generator
) -> tuple[list[Any], bool, float, float]:
    """The Gaussian thresholded histogram (Gopi et al. 2020): N(0, sigma^2) on the count of every value that
    occurs, kept above tau = 1 + sigma * Phi^-1(1 - delta), so that a value seen once passes with probability
    `delta`. Returns what `dp_category_set` returns; its privacy is in the module docstring."""
    items = list(counts.items())
    tau = gaussian_threshold(sigma, delta)
    kept, missing = _passing(items, rng.normal(0.0, sigma, size=len(items)), tau)
    return kept, missing, sigma, tau


def _passing(items: list[tuple[Any, int]], z: np.ndarray, tau: float) -> tuple[list[Any], bool]:
    """(values whose count + noise exceeds tau, sorted; whether the missing value did)."""
    kept, missing = [], False
    for (value, count), zi in zip(items, z):
        assert count >= 1, "only values that occur are candidates"
        if count + zi > tau:
            if pd.isna(value):
                missing = True
            else:
                kept.append(value.item() if isinstance(value, np.generic) else value)
    return sorted(kept, key=_sort_key), missing


def dp_other_count(count: int, sigma: float, rng: np.random.Generator) -> tuple[bool, float]:
    """Whether count + N(0, sigma^2) exceeds OTHER_Z sigma, and that threshold: the count of rows outside a
    column's kept values has sensitivity 1 once those values are released (module docstring)."""
    tau = OTHER_Z * sigma
    return bool(count + rng.normal(0.0, sigma) > tau), tau


def gaussian_numeric_bins(
    values: np.ndarray,
    sigma: float,
    rng: np.random.Generator,
    kind: str,
    public_range: tuple[float, float] | None = None,
    n_bins: int = DEFAULT_N_BINS,
    beta: float = DEFAULT_BETA,
) -> tuple[tuple[float, float, tuple[float, ...] | None] | None, bool, float]:
    """N(0, sigma^2) on every cell of a public grid (`dp_bins.search_edges`, plus under/overflow and missing
    cells), then `dp_bins.numeric_bins`: ((lo, hi, edges) or None, missing, tau). One row moves one cell by
    one, so this is one sensitivity-1 Gaussian release. tau = sigma * Phi^-1(1 - beta / cells): noise alone
    lifts any empty cell over it with probability at most beta."""
    edges = search_edges(kind, public_range)
    counts = cell_counts(values, edges)
    tau = gaussian_tail(sigma, beta / len(counts))
    noisy = counts + rng.normal(0.0, sigma, size=len(counts))
    return numeric_bins(noisy, edges, kind, tau, sigma, n_bins), bool(noisy[-1] > tau), tau


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
    counts = cell_counts(values, edges)  # the cells of `edges`, under/overflow, then the missing cell
    scale = 1.0 / epsilon
    tau = numeric_threshold(epsilon, len(counts), beta)
    noisy = counts + rng.laplace(0.0, scale, size=len(counts))
    found = noisy_range(noisy, edges, tau)
    missing = bool(noisy[-1] > tau)
    if found is None:
        return None, None, missing, scale, tau
    return (*range_edges(*found, edges), missing, scale, tau)


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


def gaussian_column_kind(
    counts: Sequence[int] | np.ndarray,
    sigma: float,
    rng: np.random.Generator,
    beta: float = KIND_BETA,
    numeric_only: bool = False,
) -> tuple[str | None, float]:
    """N(0, sigma^2) on every cell of a kind histogram (`kind_counts`, sensitivity 1), decided by `decide_kind`
    with tau = sigma * Phi^-1(1 - beta / 3): noise alone lifts one of the three present cells over tau with
    probability at most beta. Returns (kind or None, tau)."""
    c = np.asarray(counts, dtype=np.float64)
    assert c.shape == (len(KIND_CELLS),), "one count per kind cell"
    tau = gaussian_tail(sigma, beta / (len(KIND_CELLS) - 1))
    return decide_kind(c + rng.normal(0.0, sigma, size=len(c)), tau, numeric_only), tau


# -- inference ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ColumnNote:
    """What the inference kept of one column: a post-processing of its DP outputs (kind, how many categories
    or bins passed, whether "other" and missing exist) and its public budget. Never a count of rows."""

    column: str
    kind: str
    kind_source: str  # "declared" (public), "dp" (decided with DP) or "data" (read without DP)
    values: int  # categories kept (not counting "other" and missing) or numeric bins
    binning: str  # "categories", "one bin per integer", "dp quantiles", "equal width", "public range"
    other: bool = False
    missing: bool = False
    rho: float = 0.0  # zCDP of the column's Gaussian mechanisms (the Gaussian inference)
    epsilon: float = 0.0  # the (epsilon, delta) inference: its share of epsilon
    delta: float = 0.0  # its threshold delta (a categorical column)

    def text(self) -> str:
        how = {"declared": "declared", "dp": "kind decided with DP", "data": "read off the rows"}[self.kind_source]
        if self.kind == "categorical":
            what = f"{self.values} categories kept" + (" + other" if self.other else "")
        else:
            what = f"{self.values} bins ({self.binning})"
        spent = (f"rho {self.rho:.3g}" if self.rho else f"epsilon {self.epsilon:.3g}") if (
            self.rho or self.epsilon) else "nothing spent"
        if self.delta:
            spent += f", threshold delta {self.delta:.2g}"
        return (f"column {self.column!r}: {self.kind} ({how}), {what}, missing "
                f"{'allowed' if self.missing else 'not allowed'}; {spent}")


@dataclass(frozen=True)
class SchemaInference:
    """The inferred schema and what it cost (an empty `spend` for a non-private inference).

    Two ways to spend, by how `infer_schema` was called:
    - (epsilon, delta): every mechanism is (epsilon_i, delta_i)-DP and `spend` adds up by basic composition;
      `ledger_events` lists one `EpsilonDeltaEvent` per mechanism.
    - rho (zCDP) and delta: Gaussian mechanisms of total zCDP `rho` plus `threshold_delta` for the category
      thresholds; `ledger_events` is one `GaussianEvent` with rho = 1/(2 sigma^2) (all of them composed,
      exactly, as RDP and PLD compose Gaussians) and one (0, threshold_delta) event, charged in full even
      when a column failed before spending all of its share. Such an inference has no epsilon of its own:
      the accountant composes it with the rest of the ledger. `epsilon_share` is set by a caller that knows
      the whole budget (the synthesizer: the epsilon the rest of its run would have without it).
    `notes`: what fell back on what, then one line per column (`columns`: kind, values kept, "other",
    budget): post-processing of the DP outputs.
    """

    schema: Schema
    spend: tuple[ColumnSpend, ...] = ()
    private: bool = True
    notes: tuple[str, ...] = field(default=())
    columns: tuple[ColumnNote, ...] = ()
    rho: float = 0.0
    threshold_delta: float = 0.0
    epsilon_share: float | None = None

    @property
    def epsilon(self) -> float:
        if self.epsilon_share is not None:
            return float(self.epsilon_share)
        return float(sum(s.epsilon for s in self.spend))

    @property
    def delta(self) -> float:
        if self.rho > 0:
            return float(self.threshold_delta)
        return float(sum(s.delta for s in self.spend))

    def to_dict(self) -> dict[str, Any]:
        return {"private": self.private, "epsilon": self.epsilon, "delta": self.delta, "rho": self.rho,
                "spend": [s.to_dict() for s in self.spend], "notes": list(self.notes),
                "columns": [asdict(c) for c in self.columns]}

    def ledger_events(self) -> list[Any]:
        """What to put on the privacy ledger (see the class docstring)."""
        return _charge(self.spend, self.rho, self.threshold_delta)


def _charge(spend: Sequence[ColumnSpend], rho: float, threshold_delta: float) -> list[Any]:
    from tramontane.accounting.events import EpsilonDeltaEvent, GaussianEvent

    if rho > 0:
        events: list[Any] = [GaussianEvent(gaussian_sigma(rho), 1, label=GAUSSIAN_LABEL)]
        if threshold_delta > 0:
            events.append(EpsilonDeltaEvent(0.0, threshold_delta, label=THRESHOLD_LABEL))
        return events
    return [EpsilonDeltaEvent(s.epsilon, s.delta, label=s.label) for s in spend if s.epsilon > 0 or s.delta > 0]


def schema_share(n_columns: int, cap: float) -> float:
    """The share of a run's budget for inferring the schema of `n_columns` columns: SCHEMA_SHARE_PER_COLUMN
    per column (a fixed rho per column, as a share of the whole ledger), at most `cap`."""
    return min(cap, SCHEMA_SHARE_PER_COLUMN * max(n_columns, 1))


@dataclass(frozen=True)
class SchemaBudget:
    """What `share` of a run's whole budget is for the Gaussian inference (`schema_budget`)."""

    rho: float  # zCDP of its Gaussian mechanisms: share x the rho of the whole budget
    delta: float  # for its thresholds: share x delta
    epsilon_share: float  # epsilon - the epsilon of the rest of the budget alone (its marginal cost)


def schema_budget(epsilon: float, delta: float, share: float, prior: Any = ()) -> SchemaBudget:
    """`share` of a run's budget (epsilon, delta) as a share of the whole ledger, for `infer_schema(rho=...)`.

    The whole budget is measured in the currency Gaussian mechanisms compose in: rho_total = 1/(2 sigma^2) of
    the one Gaussian release that, after `prior` (what the ledger already holds), spends exactly (epsilon,
    delta) under the RDP accountant (`accounting.calibrate_noise_multiplier` with sample rate 1 and one step:
    the project's one noise calibration). The inference gets share x rho_total and share x delta; a later
    DP-SGD run calibrated with the ledger as its prior then composes with it exactly (RDP or PLD), so the
    share is an allocation, not an approximation of the guarantee. `epsilon_share` is what the rest would
    cost without the inference (epsilon minus the epsilon of one Gaussian of rho_total - rho at delta minus
    the threshold delta): the inference's marginal cost, for summaries and for sizing the DP-SGD batch.
    """
    if not 0.0 < share < 1.0:
        raise PrivacyParameterError(f"the schema's share of the budget must be in (0, 1), got {share!r}")
    rho_total = accounting.budget_rho(epsilon, delta, prior)
    rho, threshold = share * rho_total, share * delta
    rest_epsilon = accounting.epsilon_of_rho(rho_total - rho, delta - threshold, prior)
    return SchemaBudget(rho, threshold, max(0.0, epsilon - rest_epsilon))


def _check_budget(epsilon: float | None, delta: float | None, allow_non_private: bool,
                  rho: float | None = None) -> None:
    if epsilon is not None and rho is not None:
        raise PrivacyParameterError("pass either epsilon (basic composition) or rho (Gaussian mechanisms, zCDP), "
                                    "not both")
    if epsilon is None and rho is None:
        if not allow_non_private:
            raise PrivacyParameterError(
                "infer_schema needs a privacy budget: pass epsilon=... (and delta=... for categorical "
                "columns), or write a public schema; allow_non_private=True reads the schema off the "
                "private rows WITHOUT differential privacy"
            )
        return
    if allow_non_private:
        raise PrivacyParameterError("pass either epsilon (DP inference) or allow_non_private=True, not both")
    name, value = ("epsilon", epsilon) if epsilon is not None else ("rho", rho)
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise PrivacyParameterError(f"{name} must be a positive finite number, got {value!r}")
    if delta is not None and not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise PrivacyParameterError(f"delta must be in (0, 1), got {delta!r}; a common choice is delta < 1/n")


def infer_schema(
    df: pd.DataFrame,
    *,
    epsilon: float | None = None,
    delta: float | None = None,
    rho: float | None = None,
    allow_non_private: bool = False,
    kinds: Mapping[str, str] | None = None,
    known: Schema | Sequence[ColumnSpec] | None = None,
    ranges: Mapping[str, tuple[float, float]] | None = None,
    n_bins: int = DEFAULT_N_BINS,
    max_categories: int = MAX_CATEGORIES,
    noise: str | None = None,
    beta: float = DEFAULT_BETA,
    kind_share: float | None = None,
    seed: int | None = None,
) -> SchemaInference:
    """Infer a schema for `df` with DP (module docstring), or without DP if allowed.

    epsilon, delta: the budget of the whole inference (basic composition): every inferred column gets
        epsilon/m; delta is split among the columns declared or decided categorical (numeric ones are
        pure-epsilon). `known` columns are copied as given and cost nothing.
    rho, delta (instead of epsilon): Gaussian mechanisms only, of total zCDP rho (rho/m per inferred column),
        plus delta for the thresholds of the category sets, to compose on a ledger with other mechanisms
        (`SchemaInference.ledger_events`; `schema_budget` turns a share of a run's budget into both). Numeric
        columns then get their bins at DP quantiles, and a categorical column gets the value "other" when
        enough rows hold values that did not pass the threshold.
    allow_non_private: read kinds, category sets and min/max straight off the rows (no DP): warns, and the
        schema records private=False. Kinds then come from the exact kind histograms (values, not dtypes).
    kinds: column -> "categorical" / "integer" / "float", a public declaration that costs nothing. The
        kind of any other column is decided with DP from its values, spending `kind_share` of its epsilon.
    ranges: column -> coarse PUBLIC (lo, hi) searched for the numeric bounds (default: a wide log grid); a
        column with a range is numeric.
    n_bins: bins of the inferred numeric columns. max_categories: a categorical column with more distinct
        values is refused (bin or drop it). beta: chance that noise alone widens a numeric range (the kind
        decision uses KIND_BETA).
    noise: "laplace" (default) or "gaussian" for the (epsilon, delta) inference; the rho one is Gaussian.
    kind_share: of a column's budget for its kind decision (default KIND_BUDGET_SHARE of epsilon,
        GAUSSIAN_KIND_SHARE of rho).
    seed: fixed noise, for tests only (warns); default: 128 bits from `secrets`.

    Raises DataError on an empty table, SchemaError on a column that cannot be inferred (too many distinct
    values before anything is spent; no kind or nothing surviving the threshold after, with `.spend` and
    the ledger `.events` it costs on the error). No message quotes a value from the rows or an exact count.
    """
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame, got {type(df).__name__}")
    if len(df) == 0 or df.shape[1] == 0:
        what = "rows" if len(df) == 0 else "columns"
        raise DataError(f"the table is empty (no {what}): nothing to infer from")
    _check_budget(epsilon, delta, allow_non_private, rho)
    if rho is not None and noise not in (None, "gaussian"):
        raise PrivacyParameterError(f"the rho (zCDP) inference adds Gaussian noise only, got noise={noise!r}")
    noise = noise or ("gaussian" if rho is not None else "laplace")
    if noise not in NOISES:
        raise PrivacyParameterError(f"noise must be one of {list(NOISES)}, got {noise!r}")
    if not 0.0 < beta < 1.0:
        raise PrivacyParameterError(f"beta must be in (0, 1), got {beta!r}")
    if kind_share is None:
        kind_share = GAUSSIAN_KIND_SHARE if rho is not None else KIND_BUDGET_SHARE
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
    for name, given in kinds.items():
        if given not in KINDS:
            raise SchemaError(f"the kind of column {name!r} must be one of {list(KINDS)}, got {given!r}")
    inferred = [n for n in names if n not in known_specs]
    declared = {n: kinds[n] for n in inferred if n in kinds}  # public: costs nothing
    undecided = [n for n in inferred if n not in declared]  # decided from the values (with DP if epsilon)
    for name, (low, high) in ranges.items():
        if declared.get(name) == "categorical" or name in known_specs:
            raise SchemaError(f"column {name!r} has a public range: only inferred numeric columns take one")
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise SchemaError(f"the public range of column {name!r} must be finite (lo, hi) with lo < hi, "
                              f"got {(low, high)!r}")
    _check_cardinality(df, declared, [n for n in undecided if n not in ranges], max_categories)

    if epsilon is None and rho is None:
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
    rng = numpy_rng(seed)
    if rho is not None:
        plan = _GaussianPlan(inferred, declared, ranges, rho, delta or 0.0, kind_share)
        return _infer_gaussian(df, names, plan, known_specs, n_bins, max_categories, beta, rng)
    assert epsilon is not None  # the non-private and the rho inference returned above
    eps_c = epsilon / max(len(inferred), 1)
    eps_kind = kind_share * eps_c
    spend: list[ColumnSpend] = []
    failures: list[str] = []
    notes: list[str] = []
    fell_back: set[str] = set()  # columns given their public range as it is

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
        edges = search_edges(kind, ranges[name]) if name in ranges else DEFAULT_SEARCH_EDGES
        lo, hi, missing, scale, tau = dp_numeric_range(_numbers(df[name]), eps_rest, rng, edges, beta)
        mechanism = "laplace histogram over public bins"
        spend.append(ColumnSpend(name, mechanism, eps_rest, 0.0, "laplace", scale, tau))
        if lo is not None and hi is not None and kind == "integer":  # (lo and hi are None together)
            lo, hi = float(math.ceil(lo)), float(math.ceil(hi) - 1 if hi < edges[-1] else math.floor(hi))
        if lo is None or hi is None or lo > hi:
            if name in ranges:
                lo, hi = ranges[name]
                if kind == "integer":
                    lo, hi = math.ceil(lo), math.floor(hi)
                note = f"column {name!r}: no bin passed the threshold; used the public range {ranges[name]}"
                notes.append(note)
                fell_back.add(name)
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
        err.events = tuple(_charge(spend, 0.0, 0.0))  # type: ignore[attr-defined]
        raise err
    schema = Schema(
        tuple(specs[n] for n in names), private=True,
        provenance=f"inferred with ({total_eps:.4g}, {total_delta:.3g})-differential privacy "
                   f"({noise} noise, tramontane.synth.dp_schema)",
        metadata={"inference": {"mechanism": "dp", "epsilon": total_eps, "delta": total_delta, "noise": noise,
                                "known_columns": sorted(known_specs), "declared_kinds": sorted(declared)}},
    )
    columns = tuple(_column_note(specs[n], "dp" if n in undecided else "declared", epsilon=eps_c,
                                 delta=delta_c if specs[n].kind == "categorical" else 0.0,
                                 binning="public range" if n in fell_back else None)
                    for n in inferred)
    return SchemaInference(schema, tuple(spend), private=True, notes=(*notes, *(c.text() for c in columns)),
                           columns=columns)


def evaluation_schema(real: pd.DataFrame) -> Schema:
    """A schema read off the real rows WITHOUT differential privacy (`infer_schema(allow_non_private=True)`:
    kinds, category sets and min/max as they are), marked `private=False`, for an evaluation that only the
    data holder sees. Never release it, nor anything binned with it. The warning `infer_schema` gives for
    a non-private schema is silenced here because nothing built on this one is published."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return infer_schema(real, allow_non_private=True).schema


def _column_note(spec: ColumnSpec, kind_source: str, binning: str | None = None, **budget: float) -> ColumnNote:
    """The note of one inferred column, read off its spec (post-processing)."""
    if spec.kind == "categorical":
        return ColumnNote(spec.name, spec.kind, kind_source, len(spec.categories) - int(spec.other),
                          "categories", spec.other, spec.missing, **budget)
    assert spec.lo is not None and spec.hi is not None  # a numeric column
    per_integer = spec.kind == "integer" and spec.n_bins == spec.hi - spec.lo + 1  # every bin holds an integer
    if binning is None:
        binning = "one bin per integer" if per_integer else "equal width" if spec.edges == (
            integer_edges(int(spec.lo), int(spec.hi), spec.n_bins) if spec.kind == "integer"
            else float_edges(spec.lo, spec.hi, spec.n_bins)) else "dp quantiles"
    return ColumnNote(spec.name, spec.kind, kind_source, spec.n_bins, binning, False, spec.missing, **budget)


@dataclass(frozen=True)
class _GaussianPlan:
    """The Gaussian inference's budget, fixed from public inputs before any noise is drawn: per column rho/m,
    split into the kind decision (undeclared columns), the values, and (categorical columns) the count of
    rows outside the kept values; the threshold delta of every column that is or may turn out categorical."""

    inferred: Sequence[str]
    declared: Mapping[str, str]
    ranges: Mapping[str, tuple[float, float]]
    rho: float
    delta: float
    kind_share: float

    @property
    def column_rho(self) -> float:
        return self.rho / len(self.inferred)

    @property
    def maybe_categorical(self) -> list[str]:
        return [n for n in self.inferred if self.declared.get(n, "categorical") == "categorical"
                and n not in self.ranges]

    @property
    def column_delta(self) -> float:
        k = len(self.maybe_categorical)
        return threshold_deltas(self.delta, k) if k else 0.0

    @property
    def threshold_delta(self) -> float:
        return threshold_charge([self.column_delta] * len(self.maybe_categorical))

    def kind_rho(self, name: str) -> float:
        return 0.0 if name in self.declared else self.kind_share * self.column_rho

    def values_rho(self, name: str, categorical: bool) -> float:
        rest = self.column_rho - self.kind_rho(name)
        return (1.0 - OTHER_SHARE) * rest if categorical else rest  # numeric: both parts (module docstring)

    def other_rho(self, name: str) -> float:
        return OTHER_SHARE * (self.column_rho - self.kind_rho(name))


def _infer_gaussian(
    df: pd.DataFrame,
    names: list[str],
    plan: _GaussianPlan,
    known_specs: Mapping[str, ColumnSpec],
    n_bins: int,
    max_categories: int,
    beta: float,
    rng: np.random.Generator,
) -> SchemaInference:
    """The rho (zCDP) inference of `infer_schema` (module docstring), column by column."""
    spend: list[ColumnSpend] = []
    failures: list[str] = []
    notes: list[str] = []
    columns: list[ColumnNote] = []
    specs: dict[str, ColumnSpec] = dict(known_specs)
    delta_c = plan.column_delta
    for name in plan.inferred:
        kind = plan.declared.get(name)
        if kind is None:
            sigma = gaussian_sigma(plan.kind_rho(name))
            kind, tau = gaussian_column_kind(kind_counts(df[name]), sigma, rng, KIND_BETA, name in plan.ranges)
            spend.append(ColumnSpend(name, GAUSSIAN_KIND_MECHANISM, 0.0, 0.0, "gaussian", sigma, tau,
                                     plan.kind_rho(name)))
            if kind is None:
                failures.append(f"column {name!r}: too few rows to decide its kind at this budget (no kind "
                                f"passed the threshold tau={tau:.1f}); declare its kind")
                continue
            if kind == "categorical" and df[name].nunique(dropna=True) > max_categories:
                failures.append(f"column {name!r} came out categorical but has more distinct values than "
                                f"max_categories={max_categories}: bin or group its values, or declare its "
                                "kind")
                continue
        fallbacks = len(notes)
        spec = (_gaussian_categorical(df[name], plan, delta_c, rng, spend, failures) if kind == "categorical"
                else _gaussian_numeric(df[name], kind, plan, n_bins, beta, rng, spend, failures, notes))
        if spec is None:
            continue
        specs[name] = spec
        binning = "public range" if len(notes) > fallbacks else None  # it noted a fallback
        columns.append(_column_note(spec, "declared" if name in plan.declared else "dp", binning,
                                    rho=plan.column_rho, delta=delta_c if kind == "categorical" else 0.0))
    if failures:
        err = SchemaError(
            "DP schema inference failed for:\n  - " + "\n  - ".join(failures)
            + f"\nThis attempt spent its whole budget, zCDP rho={plan.rho:.4g} of Gaussian noise and "
            f"delta={plan.threshold_delta:.3g} for the thresholds (listed per mechanism in the error's spend, "
            "charged as its events): count it against the data's budget before retrying with a larger budget "
            "or with public specs for these columns."
        )
        err.spend = tuple(spend)  # type: ignore[attr-defined]
        err.events = tuple(_charge(spend, plan.rho, plan.threshold_delta))  # type: ignore[attr-defined]
        raise err
    schema = Schema(
        tuple(specs[n] for n in names), private=True,
        provenance=f"inferred with differential privacy: Gaussian mechanisms of zCDP rho={plan.rho:.4g} and "
                   f"delta={plan.threshold_delta:.3g} for category thresholds (tramontane.synth.dp_schema)",
        metadata={"inference": {"mechanism": "dp (gaussian, zcdp)", "rho": plan.rho,
                                "delta": plan.threshold_delta, "known_columns": sorted(known_specs),
                                "declared_kinds": sorted(plan.declared)}},
    )
    charged = bool(plan.inferred)  # every column known: nothing was read, nothing is charged
    return SchemaInference(schema, tuple(spend), private=True, notes=(*notes, *(c.text() for c in columns)),
                           columns=tuple(columns), rho=plan.rho if charged else 0.0,
                           threshold_delta=plan.threshold_delta if charged else 0.0)


def _gaussian_categorical(
    s: pd.Series, plan: _GaussianPlan, delta_c: float, rng: np.random.Generator, spend: list[ColumnSpend],
    failures: list[str],
) -> ColumnSpec | None:
    """Thresholded Gaussian histogram of the values, then the Gaussian count of the rows outside them."""
    name = str(s.name)
    counts = s.value_counts(dropna=False, sort=False)
    counts = counts[counts > 0]  # a pandas Categorical lists unused categories: not candidates
    rho = plan.values_rho(name, categorical=True)
    cats, missing, sigma, tau = gaussian_category_set(counts, gaussian_sigma(rho), delta_c, rng)
    spend.append(ColumnSpend(name, GAUSSIAN_CATEGORY_MECHANISM, 0.0, delta_c, "gaussian", sigma, tau, rho))
    if not cats and not missing:
        failures.append(f"column {name!r}: no value passed the threshold tau={tau:.1f} (only values held by "
                        f"more than about {math.ceil(tau)} rows survive at this budget); give its categories "
                        "in a public schema")
        return None
    inside = s.isin(cats).to_numpy() | (s.isna().to_numpy() & missing)
    rho = plan.other_rho(name)
    other, tau = dp_other_count(int((~inside).sum()), gaussian_sigma(rho), rng)
    spend.append(ColumnSpend(name, GAUSSIAN_OTHER_MECHANISM, 0.0, 0.0, "gaussian", gaussian_sigma(rho), tau, rho))
    return ColumnSpec.categorical(name, cats, missing=missing, other=other)


def _gaussian_numeric(
    s: pd.Series, kind: str, plan: _GaussianPlan, n_bins: int, beta: float, rng: np.random.Generator,
    spend: list[ColumnSpend], failures: list[str], notes: list[str],
) -> ColumnSpec | None:
    """Gaussian histogram over the public cells: the range, then quantile bins (`dp_bins`)."""
    name = str(s.name)
    public = plan.ranges.get(name)
    rho = plan.values_rho(name, categorical=False)
    found, missing, tau = gaussian_numeric_bins(_numbers(s), gaussian_sigma(rho), rng, kind, public, n_bins, beta)
    spend.append(ColumnSpend(name, GAUSSIAN_NUMERIC_MECHANISM, 0.0, 0.0, "gaussian", gaussian_sigma(rho), tau,
                             rho))
    if found is not None:
        lo, hi, edges = found
        return ColumnSpec.numeric(name, lo, hi, kind, n_bins=n_bins, edges=edges, missing=missing)
    if public is None:
        failures.append(f"column {name!r}: no cell of the default grid passed the threshold tau={tau:.1f}; "
                        "give a public range for the column, or its spec in a public schema")
        return None
    lo, hi = public
    if kind == "integer":
        lo, hi = math.ceil(lo), math.floor(hi)
    note = f"column {name!r}: no bin passed the threshold; used the public range {public}"
    notes.append(note)
    warnings.warn(note + " (too little data for the budget to narrow it)", TramontaneWarning, stacklevel=3)
    return ColumnSpec.numeric(name, lo, hi, kind, n_bins=n_bins, missing=missing)


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
