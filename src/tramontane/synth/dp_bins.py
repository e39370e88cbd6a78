"""Numeric bins from a noisy histogram over a PUBLIC grid: a DP range and DP quantile bin edges.

Everything here is post-processing. The caller (`dp_schema`) counts a column's values in the cells of a public
grid (`search_edges`: under- and overflow cells, and a cell for missing entries, around it), adds noise to
every cell, empty or not, and passes the noisy counts here; nothing here reads a row.

- Range (as ApproxBounds in Google's differential-privacy library): lo is the lower edge of the lowest cell
  whose noisy count exceeds tau, hi the upper edge of the highest; tau is set by the caller so that noise
  alone lifts any empty cell over it with a small probability beta (a utility choice). The range then grows
  outwards over a thin tail, block by block: the next at most EXTEND_CELLS cells beyond an end join when
  their noisy sum exceeds EXTEND_Z * sigma * sqrt(cells) (pure noise does that within EXTEND_CELLS cells with
  probability under EXTEND_CELLS * P[Z > EXTEND_Z] = 0.2%). What is left beyond is cut off, and
  `Schema.conform` clips it into [lo, hi].
- Bins: an integer column with at most `n_bins` integers in [lo, hi] keeps one bin per integer. Any other
  column gets its bin edges at quantiles of the noisy histogram, so that a heavy-tailed column (an income,
  a sampling weight) spends its bins where its rows are instead of on empty stretches of an equal-width
  grid. The noisy CDF is piecewise linear (values spread evenly inside a cell). Two refinements:
  * Cells under tau are mostly noise: a run of them is cut, left to right, into blocks that are each kept
    with their summed noisy count once that sum exceeds BLOCK_Z standard deviations of its noise
    (BLOCK_Z * sigma * sqrt(cells)), and get no weight otherwise. Sparse stretches then weigh what they
    hold instead of the positive bias of clipped noise (about 0.4 sigma per empty cell).
  * Bins are handed out in proportion to weight, but a cell takes at most as many bins as it has room for
    (CELL_SPLITS, and no more than the integers an integer cell holds), by water-filling: a value
    that holds most rows (capital gain 0) becomes one bin of its own and the others go to the rest of the
    distribution, instead of quantiles piling up on it.
  Edges of integer columns sit on half-integers, so every bin holds an integer and decoding rounds nothing.

The grids are public constants: `DEFAULT_SEARCH_EDGES` (+-1e-3 to +-1e9, 32 cells per decade) for floats,
the same with its edges moved down to half-integers for integers (one cell per integer up to about 13, where
the log cells get wider than 1), or a coarse public range the user gives, in RANGE_SEARCH_BINS cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tramontane.tables.schema import DEFAULT_N_BINS, float_edges, integer_edges

RANGE_SEARCH_BINS = 1000  # cells of a user-given coarse public range
BLOCK_Z = 3.0  # a block of sub-threshold cells weighs in once its noisy sum exceeds this many sigmas
EXTEND_Z = 4.0  # the range grows over a block of cells beyond its ends whose noisy sum exceeds this many sigmas
EXTEND_CELLS = 64  # the longest such block
CELL_SPLITS = 16  # at most this many quantile bins inside one cell of the grid


def _default_search_edges() -> np.ndarray:
    magnitudes = 10.0 ** (np.arange(-3 * 32, 9 * 32 + 1) / 32)  # 1e-3 .. 1e9, ratio 1.075
    return np.concatenate([-magnitudes[::-1], magnitudes])


DEFAULT_SEARCH_EDGES = _default_search_edges()


INTEGER_SEARCH_EDGES = np.unique(np.floor(DEFAULT_SEARCH_EDGES) + 0.5)  # every cell holds an integer


def search_edges(kind: str, public_range: tuple[float, float] | None = None) -> np.ndarray:
    """The public grid a numeric column of `kind` is counted in: a coarse public range in RANGE_SEARCH_BINS
    cells, or the default grid of the kind (module docstring). Integer grids have half-integer edges."""
    if public_range is not None:
        lo, hi = public_range
        if kind == "integer":
            return np.asarray(integer_edges(math.ceil(lo), math.floor(hi), RANGE_SEARCH_BINS))
        return np.asarray(float_edges(lo, hi, RANGE_SEARCH_BINS))
    return INTEGER_SEARCH_EDGES if kind == "integer" else DEFAULT_SEARCH_EDGES


def cell_counts(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Exact counts [len(edges) + 2] of `x` (NaN: missing): below edges[0], each cell [edges[i], edges[i+1]),
    at or above edges[-1], missing. One row moves one cell by one (sensitivity 1 in every norm)."""
    x = np.asarray(x, dtype=np.float64)
    nan = np.isnan(x)
    cell = np.searchsorted(edges, x[~nan], side="right")  # 0: below edges[0]; len(edges): at/above edges[-1]
    counts = np.bincount(cell, minlength=len(edges) + 1).astype(np.float64)
    return np.append(counts, nan.sum())


def noisy_range(noisy: np.ndarray, edges: np.ndarray, tau: float) -> tuple[int, int] | None:
    """(first, last) cell (indices into `noisy` without its missing cell) whose noisy count exceeds tau, or
    None when no cell does."""
    kept = np.flatnonzero(noisy[:-1] > tau)
    if len(kept) == 0:
        return None
    return int(kept[0]), int(kept[-1])


def extend_range(noisy: np.ndarray, first: int, last: int, sigma: float) -> tuple[int, int]:
    """(first, last) grown outwards over blocks of at most EXTEND_CELLS cells whose noisy sum exceeds
    EXTEND_Z * sigma * sqrt(cells) (module docstring); `noisy` without its missing cell."""

    def grow(end: int, step: int) -> int:
        j, total, k = end + step, 0.0, 0
        while 0 <= j < len(noisy) and k < EXTEND_CELLS:
            total, k = total + noisy[j], k + 1
            if total > EXTEND_Z * sigma * math.sqrt(k):
                end, total, k = j, 0.0, 0
            j += step
        return end

    return grow(first, -1), grow(last, 1)


def range_edges(first: int, last: int, edges: np.ndarray) -> tuple[float, float]:
    """[lo, hi] spanned by cells first..last (an under- or overflow cell counts as the grid's end)."""
    return float(edges[max(first - 1, 0)]), float(edges[min(last, len(edges) - 1)])


def smoothed_weights(noisy: np.ndarray, widths: np.ndarray, tau: float, sigma: float) -> np.ndarray:
    """Cell weights for the noisy CDF (module docstring): a cell over tau weighs its noisy count; runs of
    cells under it are cut into blocks that weigh their noisy sum, spread by width, once it exceeds
    BLOCK_Z * sigma * sqrt(cells), and nothing otherwise."""
    w = np.where(noisy > tau, noisy, 0.0)
    start, total = None, 0.0
    for j, v in enumerate(noisy):
        if v > tau:
            start, total = None, 0.0
            continue
        if start is None:
            start = j
        total += v
        if total > BLOCK_Z * sigma * math.sqrt(j - start + 1):
            w[start:j + 1] = total * widths[start:j + 1] / widths[start:j + 1].sum()
            start, total = None, 0.0
    return w


def _water_fill(weights: np.ndarray, capacity: np.ndarray, n_bins: int) -> np.ndarray:
    """Bins per cell: min(capacity, lam * weight), lam chosen so they add up to n_bins (or every cell with
    weight is full)."""
    live = weights > 0
    if capacity[live].sum() <= n_bins:
        return np.where(live, capacity, 0.0)
    lo, hi = 0.0, float((capacity[live] / weights[live]).max())
    for _ in range(100):
        lam = 0.5 * (lo + hi)
        if np.minimum(capacity, lam * weights).sum() < n_bins:
            lo = lam
        else:
            hi = lam
    return np.minimum(capacity, hi * weights)


def quantile_edges(lower: np.ndarray, upper: np.ndarray, weights: np.ndarray, kind: str, lo: float, hi: float,
                   n_bins: int = DEFAULT_N_BINS) -> tuple[float, ...] | None:
    """Bin edges over [lo, hi] at quantiles of the piecewise-linear CDF of `weights` on cells
    [lower, upper), at most `n_bins` bins (fewer where cells run out of room); None when no cell weighs
    anything. Integer columns: edges on half-integers, [lo - 0.5, ..., hi + 0.5]."""
    weights = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    if not weights.any():
        return None
    integer = kind == "integer"
    start, stop = (lo - 0.5, hi + 0.5) if integer else (lo, hi)
    a, b = np.clip(lower, start, stop), np.clip(upper, start, stop)
    widths = b - a
    capacity = np.minimum(np.round(widths), CELL_SPLITS) if integer else np.full(len(a), float(CELL_SPLITS))
    weights = np.where(widths > 0, weights, 0.0)
    bins = _water_fill(weights, capacity, n_bins)
    cumulative = np.concatenate([[0.0], np.cumsum(bins)])
    cuts = []
    for t in range(1, round(float(cumulative[-1]))):
        j = min(int(np.searchsorted(cumulative, t, side="left")) - 1, len(bins) - 1)
        if bins[j] <= 0:
            continue
        x = a[j] + (t - cumulative[j]) / bins[j] * widths[j]
        cuts.append(math.floor(x) + 0.5 if integer else float(x))
    inner = sorted({c for c in cuts if start < c < stop})
    return (float(start), *inner, float(stop))


def numeric_bins(noisy: np.ndarray, edges: np.ndarray, kind: str, tau: float, sigma: float,
                 n_bins: int = DEFAULT_N_BINS) -> tuple[float, float, tuple[float, ...] | None] | None:
    """(lo, hi, bin edges) from the noisy counts of `cell_counts` over `edges` (module docstring); edges None
    means one bin per integer (an integer column with at most `n_bins` integers in [lo, hi], or a single
    value). None when no cell passed tau."""
    found = noisy_range(noisy, edges, tau)
    if found is None:
        return None
    first, last = extend_range(noisy[:-1], *found, sigma)
    lo, hi = range_edges(first, last, edges)
    if kind == "integer":
        lo, hi = float(math.ceil(lo)), float(math.floor(hi))
        if hi - lo + 1 <= n_bins:
            return lo, hi, None
    elif lo == hi:
        return lo, hi, None
    # the cells first..last, an under/overflow cell folded into its neighbour inside the grid
    inner = np.arange(max(first, 1), min(last, len(edges) - 1) + 1)
    values = noisy[inner].copy()
    if len(inner) == 0:
        return lo, hi, None
    if first == 0:
        values[0] += noisy[0]
    if last == len(edges):
        values[-1] += noisy[len(edges)]
    lower, upper = edges[inner - 1], edges[inner]
    weights = smoothed_weights(values, upper - lower, tau, sigma)
    return lo, hi, quantile_edges(lower, upper, weights, kind, lo, hi, n_bins)


def edges_summary(edges: Sequence[float] | None) -> int:
    """Number of bins of an edges tuple (0 for None)."""
    return 0 if edges is None else len(edges) - 1
