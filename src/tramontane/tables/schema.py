"""The public schema of a table: what values every column may take, and how numbers are binned.

The schema is the *domain* a synthesizer works in. It must not come from the private rows without privacy:
a category set or a min/max read straight off the data publishes rare values and extremes (a single
person's country, a single person's income). So a schema is either written from public knowledge (a
data set's documentation, a form's list of options) or inferred with differential privacy
(`tramontane.synth.dp_schema.infer_schema`). `Schema.private` records which: False only for a schema read
off the data without DP (allowed, with a loud warning, so that a report can say so).

A column is
- categorical: an ordered list of allowed values (str, int, float or bool). A marker such as Adult's `?` is
  an ordinary category; a real missing value (NaN/None) is its own value when `missing=True`. With
  `other=True` the public sentinel `OTHER` ("__other__") is the last category and every value outside the
  others (a rare value DP inference left out, a value nobody listed) is read as it instead of being refused:
  `conform` maps it there, `value_index` gives it the sentinel's id (a missing value too, unless
  `missing=True`).
- integer / float: a range [lo, hi] and bin edges (default 100 equal-width bins, as in synlm, arXiv
  2306.04803). A number is represented by its bin; decoding returns a representative value inside the bin
  (the bin centre; for integers the centre rounded, clipped to the integers the bin holds). Integer bins
  never split an integer: with at most `n_bins` integers in [lo, hi] every integer gets its own bin, so
  such columns round-trip exactly. NaN is its own value when `missing=True`.

Value ids: each column's values are numbered 0..n_values-1 (categories or bins in order, then missing).
`Schema.value_ids` maps a frame to these ids and `Schema.frame_from_value_ids` maps them back; the token
codec (`codec.py`) and the metrics build on them.

Numbers are read from each entry's value, never from the dtype pandas guessed (`parse_numbers`): a column
read as text ("42", " 3.5") is as numeric as an int64 one, and one odd row cannot change how the others read.

A column still marked `todo` (a placeholder `tramontane schema init` wrote for the user to fill in) is
refused by `from_dict`/`Schema.load` with the column's name and what to fill in.

Rows are private: errors name the column and the rule it breaks (and the fix), never a value from the rows
nor an exact count. `Schema.problems(df, show_values=True)` adds a few examples and their number, for the
data holder debugging their own table. Nothing here logs data.

This module sits below `tramontane.synth` and `tramontane.report` (both use the schema; it imports neither),
as private-pgm keeps its `Domain` at the bottom.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tramontane.errors import DataError, SchemaError

__all__ = ["DEFAULT_N_BINS", "KINDS", "MAX_CATEGORIES", "NUMERIC_KINDS", "OTHER", "SCHEMA_FORMAT", "SCHEMA_VERSION",
           "TODO_KEY", "ColumnSpec", "Schema", "float_edges", "integer_edges", "parse_numbers"]

SCHEMA_FORMAT = "tramontane.schema"
SCHEMA_VERSION = 1
KINDS = ("categorical", "integer", "float")
NUMERIC_KINDS = ("integer", "float")
DEFAULT_N_BINS = 100  # synlm's default (`--nbins 100`)
MAX_CATEGORIES = 1000  # inference refuses columns with more distinct values than this
OTHER = "__other__"  # the catch-all category of a column with other=True (public: a constant of the code)
TODO_KEY = "todo"  # a column carrying it is a placeholder for the user to fill in (`schema init`)
_MAX_EXAMPLES = 3  # offending values quoted in an error message


def _show(values: Iterable[Any]) -> str:
    """At most a few values, each shortened: enough to find the problem, never a row."""
    shown = []
    for v in list(values)[:_MAX_EXAMPLES]:
        text = repr(v.item() if isinstance(v, np.generic) else v)
        shown.append(text if len(text) <= 40 else text[:37] + "...")
    return ", ".join(shown)


def _python_scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def integer_edges(lo: int, hi: int, n_bins: int = DEFAULT_N_BINS) -> tuple[float, ...]:
    """Edges at half-integers splitting the integers lo..hi into min(n_bins, hi-lo+1) near-equal bins."""
    span = hi - lo + 1
    nb = min(n_bins, span)
    # Steps of span/nb >= 1 keep the rounded cuts strictly increasing: no bin is empty of integers.
    cuts = np.round(np.linspace(0, span, nb + 1))
    return tuple(float(lo - 0.5 + c) for c in cuts)


def float_edges(lo: float, hi: float, n_bins: int = DEFAULT_N_BINS) -> tuple[float, ...]:
    """`n_bins` equal-width bins on [lo, hi] (a single unit-width bin around lo when lo == hi)."""
    if lo == hi:
        return (lo - 0.5, hi + 0.5)
    return tuple(float(e) for e in np.linspace(lo, hi, n_bins + 1))


@dataclass(frozen=True)
class ColumnSpec:
    """One column of the public schema (see the module docstring). Build numeric ones with `numeric`."""

    name: str
    kind: str
    categories: tuple[Any, ...] = ()
    lo: float | None = None
    hi: float | None = None
    edges: tuple[float, ...] = ()  # numeric: bin i is [edges[i], edges[i+1]), the last one closed
    missing: bool = False  # NaN/None is a value of its own
    other: bool = False  # categorical: OTHER is the last category and takes every value outside the others

    def __post_init__(self) -> None:
        where = f"column {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise SchemaError(f"a column name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise SchemaError(f"{where}: kind must be one of {list(KINDS)}, got {self.kind!r}")
        if not isinstance(self.missing, bool):
            raise SchemaError(f"{where}: missing must be true or false, got {self.missing!r}")
        if not isinstance(self.other, bool):
            raise SchemaError(f"{where}: other must be true or false, got {self.other!r}")
        if self.other and self.kind != "categorical":
            raise SchemaError(f"{where} is {self.kind}: only a categorical column takes other=true (numbers "
                              "outside [lo, hi] are clipped instead)")
        if self.kind == "categorical":
            self._check_categorical(where)
        else:
            self._check_numeric(where)

    def _check_categorical(self, where: str) -> None:
        if self.lo is not None or self.hi is not None or self.edges:
            raise SchemaError(f"{where} is categorical: it takes categories, not lo/hi/edges")
        cats = tuple(_python_scalar(c) for c in self.categories)
        if self.other:  # the sentinel goes last, whether or not it was listed
            cats = tuple(c for c in cats if not (isinstance(c, str) and c == OTHER)) + (OTHER,)
        for c in cats:
            if not isinstance(c, (str, int, float, bool)) or (isinstance(c, float) and not math.isfinite(c)):
                raise SchemaError(
                    f"{where}: categories must be strings, integers, finite floats or booleans, got {c!r}; "
                    "a missing value is not a category: set missing=true instead"
                )
        if len(set(cats)) != len(cats):
            dupes = sorted({repr(c) for c in cats if cats.count(c) > 1})
            raise SchemaError(f"{where}: categories must be distinct, repeated: {', '.join(dupes[:3])}")
        if not cats and not self.missing:
            raise SchemaError(f"{where} has no categories and missing=false: it could take no value")
        object.__setattr__(self, "categories", cats)

    def _check_numeric(self, where: str) -> None:
        if self.categories:
            raise SchemaError(f"{where} is {self.kind}: it takes lo/hi (and edges), not categories")
        if self.lo is None or self.hi is None:
            raise SchemaError(f"{where} is {self.kind}: give its public range lo and hi")
        try:
            lo, hi = float(self.lo), float(self.hi)
        except (TypeError, ValueError):
            raise SchemaError(f"{where}: lo and hi must be numbers, got {self.lo!r}, {self.hi!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise SchemaError(f"{where}: need finite lo <= hi, got lo={self.lo!r}, hi={self.hi!r}")
        if self.kind == "integer":
            if lo != int(lo) or hi != int(hi):
                raise SchemaError(
                    f"{where} is integer: lo and hi must be integers, got {self.lo!r}, {self.hi!r}"
                )
            object.__setattr__(self, "lo", int(lo))
            object.__setattr__(self, "hi", int(hi))
        else:
            object.__setattr__(self, "lo", lo)
            object.__setattr__(self, "hi", hi)
        if not self.edges:
            edges = integer_edges(int(lo), int(hi)) if self.kind == "integer" else float_edges(lo, hi)
            object.__setattr__(self, "edges", edges)
        edges = tuple(float(e) for e in self.edges)
        fix = "fix the edges (or leave them out for the default equal-width bins)"
        if len(edges) < 2 or not all(math.isfinite(e) for e in edges):
            raise SchemaError(f"{where}: edges must be at least two finite numbers; {fix}")
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise SchemaError(f"{where}: edges must be strictly increasing; {fix}")
        if edges[0] > lo or edges[-1] < hi:
            raise SchemaError(
                f"{where}: edges [{edges[0]}, {edges[-1]}] must cover [lo, hi] = [{lo}, {hi}]; {fix}"
            )
        object.__setattr__(self, "edges", edges)
        reps = self._representatives()
        if self.kind == "integer" and any(r is None for r in reps):
            empty = [i for i, r in enumerate(reps) if r is None]
            raise SchemaError(f"{where}: bin(s) {empty[:3]} hold no integer of [lo, hi]; {fix}")
        if self.kind == "float" and (edges[1] <= lo or edges[-2] >= hi) and len(edges) > 2:
            raise SchemaError(f"{where}: the first and last bins must overlap [lo, hi]; {fix}")

    def _range(self) -> tuple[float, float]:
        """(lo, hi) of a numeric column."""
        assert self.lo is not None and self.hi is not None, "only numeric columns have a range"
        return self.lo, self.hi

    def _representatives(self) -> list[Any]:
        """The decoded value of each bin (None for an integer bin that holds no integer of [lo, hi])."""
        out: list[Any] = []
        lo, hi = self._range()
        nb = len(self.edges) - 1
        for i, (a, b) in enumerate(zip(self.edges, self.edges[1:])):
            if self.kind == "integer":
                first = max(math.ceil(a), lo)
                last = min(math.floor(b) if i == nb - 1 else math.ceil(b) - 1, hi)
                out.append(math.ceil((first + last) / 2) if first <= last else None)
            else:
                out.append((max(a, lo) + min(b, hi)) / 2)
        return out

    @classmethod
    def categorical(cls, name: str, categories: Sequence[Any], missing: bool = False,
                    other: bool = False) -> "ColumnSpec":
        """A categorical column; `other=True` appends the catch-all `OTHER` (module docstring)."""
        return cls(name, "categorical", tuple(categories), missing=missing, other=other)

    @classmethod
    def numeric(
        cls,
        name: str,
        lo: float,
        hi: float,
        kind: str = "float",
        n_bins: int = DEFAULT_N_BINS,
        edges: Sequence[float] | None = None,
        missing: bool = False,
    ) -> "ColumnSpec":
        """A numeric column; default edges: `n_bins` equal-width bins (integer-aligned for integers)."""
        if kind not in NUMERIC_KINDS:
            raise SchemaError(f"column {name!r}: a numeric kind is 'integer' or 'float', got {kind!r}")
        if not isinstance(n_bins, int) or n_bins < 1:
            raise SchemaError(f"column {name!r}: n_bins must be a positive integer, got {n_bins!r}")
        if edges is None:
            if kind == "integer":
                if lo != int(lo) or hi != int(hi) or lo > hi:
                    raise SchemaError(
                        f"column {name!r} is integer: need integers lo <= hi, got {lo!r}, {hi!r}"
                    )
                edges = integer_edges(int(lo), int(hi), n_bins)
            else:
                edges = float_edges(float(lo), float(hi), n_bins)
        return cls(name, kind, lo=lo, hi=hi, edges=tuple(edges), missing=missing)

    # -- value ids --------------------------------------------------------------------------------------

    @property
    def is_numeric(self) -> bool:
        return self.kind in NUMERIC_KINDS

    @property
    def n_bins(self) -> int:
        return len(self.edges) - 1 if self.is_numeric else 0

    @property
    def n_values(self) -> int:
        """Number of value ids: categories or bins, plus one for missing."""
        base = self.n_bins if self.is_numeric else len(self.categories)
        return base + int(self.missing)

    @property
    def missing_id(self) -> int | None:
        return self.n_values - 1 if self.missing else None

    @property
    def other_id(self) -> int | None:
        """Value id of the catch-all `OTHER` category (the last category), None without one."""
        return len(self.categories) - 1 if self.other else None

    def bin_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) of every bin clipped to [lo, hi]: the integers first..last of an integer column's bin
        (low > high for a bin that holds none), the interval [low, high) of a float column's."""
        edges = np.asarray(self.edges, dtype=np.float64)
        a, b = edges[:-1], edges[1:]
        lo, hi = self._range()
        if self.kind == "integer":
            low = np.maximum(np.ceil(a), lo)
            high = np.minimum(np.ceil(b) - 1, hi)
            high[-1] = min(math.floor(b[-1]), hi)
            return low, high
        return np.maximum(a, lo), np.minimum(b, hi)

    def draw_values(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Numbers for value ids [N]: each drawn uniformly inside its bin (NaN for missing), so decoded numbers
        do not pile up on the bins' representatives."""
        if not self.is_numeric:
            raise SchemaError(f"column {self.name!r} is categorical: its values are its categories")
        out = np.full(len(ids), np.nan)
        present = ids != self.missing_id if self.missing else np.ones(len(ids), dtype=bool)
        low, high = self.bin_bounds()
        lo_i, hi_i = low[ids[present]], high[ids[present]]
        u = rng.random(int(present.sum()))
        if self.kind == "integer":
            out[present] = lo_i + np.floor(u * (hi_i - lo_i + 1))
        else:
            out[present] = lo_i + u * (hi_i - lo_i)
        return out

    def values(self) -> list[Any]:
        """The decoded value of every value id (NaN for missing)."""
        base = self._representatives() if self.is_numeric else list(self.categories)
        return base + ([math.nan] if self.missing else [])

    def value_index(self, series: pd.Series, clip: bool = False) -> np.ndarray:
        """Value id of every entry [N] (int64); -1 where the entry is outside the schema.

        With `clip=True` numbers outside [lo, hi] take the first/last bin (and non-integers an integer
        column's bin of their rounded value) instead of -1; unknown categories stay -1, or (`other`) take
        the id of `OTHER` with or without `clip`, like a missing entry when `missing` is false.
        """
        isna = series.isna().to_numpy()
        if self.kind == "categorical":
            ids = pd.Index(list(self.categories), dtype=object).get_indexer(series).astype(np.int64)
            if self.other:
                ids[ids < 0] = self.other_id
        else:
            x = _as_numbers(series)
            if x is None and not clip:  # some entry is not a number: every present entry is invalid
                ids = np.full(len(series), -1, dtype=np.int64)
            else:
                if x is None:  # clip: entries that are not numbers stay invalid (-1)
                    x = parse_numbers(series)[0]
                ok = ~np.isnan(x)
                if clip:
                    x = np.clip(np.round(x) if self.kind == "integer" else x, self.lo, self.hi)
                else:
                    ok &= (x >= self.lo) & (x <= self.hi)
                    if self.kind == "integer":
                        ok &= x == np.round(x)
                bins = np.searchsorted(np.asarray(self.edges), x, side="right") - 1
                bins = np.clip(bins, 0, self.n_bins - 1)
                ids = np.where(ok, bins, -1).astype(np.int64)
        if self.missing:
            ids[isna] = self.n_values - 1
        else:
            ids[isna] = -1 if self.other_id is None else self.other_id
        return ids

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind == "categorical":
            out["categories"] = list(self.categories[:-1] if self.other else self.categories)
        else:
            out.update(lo=self.lo, hi=self.hi, edges=list(self.edges))
        out["missing"] = self.missing
        if self.other:  # written only when set: files without it read as before
            out["other"] = True
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ColumnSpec":
        if not isinstance(data, Mapping):
            raise SchemaError(f"a column must be a mapping with name and kind, got {data!r}")
        known = {"name", "kind", "categories", "lo", "hi", "edges", "n_bins", "missing", "other"}
        name: Any = data.get("name")  # checked by __post_init__
        if TODO_KEY in data:
            raise SchemaError(
                f"column {name!r} is still a placeholder ({TODO_KEY}: {data[TODO_KEY]}). Fix: fill it in from "
                f"public knowledge and delete its {TODO_KEY!r} key, or remove the column from the schema (and "
                "from the data)")
        unknown = sorted(set(data) - known)
        if unknown:
            raise SchemaError(f"column {name!r}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        for key in ("name", "kind"):
            if key not in data:
                raise SchemaError(f"a schema column is missing {key!r}: {dict(data)!r}")
        kind = data["kind"]
        missing = data.get("missing", False)
        if kind == "categorical":
            if "n_bins" in data:
                raise SchemaError(f"column {name!r} is categorical: n_bins does not apply")
            cats = data.get("categories", [])
            if not isinstance(cats, list):
                raise SchemaError(f"column {name!r}: categories must be a list, got {cats!r}")
            return cls(name, kind, tuple(cats), missing=missing, other=data.get("other", False))
        if kind in NUMERIC_KINDS:
            if data.get("other", False) is not False:
                raise SchemaError(f"column {name!r} is {kind}: only a categorical column takes other")
            if "categories" in data:
                raise SchemaError(f"column {name!r} is {kind}: it takes lo/hi, not categories")
            if "lo" not in data or "hi" not in data:
                raise SchemaError(f"column {name!r} is {kind}: give its public range lo and hi")
            edges = data.get("edges")
            if edges is not None and not isinstance(edges, list):
                raise SchemaError(f"column {name!r}: edges must be a list of numbers, got {edges!r}")
            return cls.numeric(name, data["lo"], data["hi"], kind, n_bins=data.get("n_bins", DEFAULT_N_BINS),
                               edges=edges, missing=missing)
        return cls(name, kind)  # raises the kind error


def _parse_value(value: Any) -> float | None:
    """None for a missing entry; the entry's number (+-inf included); NaN when it is not a number."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (bool, np.bool_)):  # True is an int to Python, never a number here
        return math.nan
    if isinstance(value, numbers.Integral):
        try:
            return float(value)
        except OverflowError:
            return math.nan
    if isinstance(value, numbers.Real):
        x = float(value)
        return None if math.isnan(x) else x
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if "_" in text:  # Python's float() reads "1_000"; CSV readers and pandas do not
            return math.nan
        try:
            return float(text)  # "nan" reads as NaN: text that is not a number
        except ValueError:
            return math.nan
    return math.nan


def _parsed(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    parsed = [_parse_value(v) for v in values]
    missing = np.fromiter((p is None for p in parsed), dtype=bool, count=len(parsed))
    x = np.fromiter((math.nan if p is None else p for p in parsed), dtype=np.float64, count=len(parsed))
    return x, missing


def parse_numbers(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each entry's number, read from its value and never from the column's dtype: (x [N], missing [N]).

    missing: NaN, None, pd.NA/NaT or a blank string. x (float64): the number an entry holds (an int, a
    float, or text that reads as one: "42", " 3.5", "1e3", "inf"), NaN where the entry is missing or not a
    number (other text, booleans, other objects). Row by row: no entry changes how another one reads.
    """
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return np.full(len(series), np.nan), series.isna().to_numpy()
    if pd.api.types.is_numeric_dtype(dtype):
        x = series.to_numpy(dtype=np.float64, na_value=np.nan)
        return x, np.isnan(x)
    if isinstance(dtype, pd.CategoricalDtype) or (pd.api.types.is_string_dtype(dtype) and dtype != object):
        # Parse each distinct value once. Not for object columns: factorize takes True, 1 and 1.0 as one.
        codes, uniques = pd.factorize(series, use_na_sentinel=True)
        ux, umissing = _parsed(list(uniques))
        ux, umissing = np.append(ux, np.nan), np.append(umissing, True)  # code -1 (NA) -> the last slot
        return ux[codes], umissing[codes]
    return _parsed(series.to_numpy(dtype=object))


def _as_numbers(series: pd.Series) -> np.ndarray | None:
    """float64 numbers of a numeric column (NaN for missing), or None if a present entry is not a number."""
    x, missing = parse_numbers(series)
    if (np.isnan(x) & ~missing).any():
        return None
    return x


@dataclass(frozen=True)
class Schema:
    """An ordered set of `ColumnSpec`s plus where it came from.

    `private`: True when the schema reveals nothing beyond its DP guarantee (written from public knowledge,
    or inferred with DP); False when it was read off the private rows without DP.
    """

    columns: tuple[ColumnSpec, ...]
    private: bool = True
    provenance: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        cols = tuple(self.columns)
        if not cols:
            raise SchemaError("a schema needs at least one column")
        for c in cols:
            if not isinstance(c, ColumnSpec):
                raise SchemaError(f"schema columns must be ColumnSpec objects, got {type(c).__name__}")
        names = [c.name for c in cols]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SchemaError(f"column names must be unique, repeated: {dupes}")
        if not isinstance(self.private, bool):
            raise SchemaError(f"private must be true or false, got {self.private!r}")
        object.__setattr__(self, "columns", cols)
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def __len__(self) -> int:
        return len(self.columns)

    def __iter__(self) -> Iterator[ColumnSpec]:
        return iter(self.columns)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> ColumnSpec:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"no column {name!r} in the schema; columns: {self.names}")

    def select(self, names: Sequence[str]) -> "Schema":
        """A schema of these columns only, in this order."""
        missing = [n for n in names if n not in self]
        if missing:
            raise SchemaError(f"column(s) {missing} are not in the schema; columns: {self.names}")
        return Schema(tuple(self[n] for n in names), self.private, self.provenance, self.metadata)

    # -- validation -------------------------------------------------------------------------------------

    def check_columns(self, df: pd.DataFrame) -> None:
        """Raise `SchemaError` unless `df` has exactly the schema's columns (in any order)."""
        if not isinstance(df, pd.DataFrame):
            raise DataError(f"expected a pandas DataFrame, got {type(df).__name__}")
        cols = list(df.columns)
        dupes = sorted({str(c) for c in cols if cols.count(c) > 1})
        unknown = [c for c in cols if c not in self.names]
        absent = [n for n in self.names if n not in cols]
        problems = []
        if dupes:
            problems.append(f"the data has repeated column name(s) {dupes}: rename or drop them")
        if unknown:
            problems.append(
                f"the data has column(s) {unknown} that the schema does not describe: drop them from the "
                "data or add them to the schema"
            )
        if absent:
            problems.append(
                f"the schema's column(s) {absent} are missing from the data: add them to the data, or "
                "remove them from the schema"
            )
        if problems:
            raise SchemaError("the data's columns do not match the schema:\n  - " + "\n  - ".join(problems))

    def problems(self, df: pd.DataFrame, *, show_values: bool = False) -> list[str]:
        """Every mismatch between `df`'s values and the schema, one message per column and rule broken.

        Messages name the column, the rule and the fix, never a value from the rows nor an exact count (they
        end up in logs and tracebacks). `show_values=True` adds the number of offending distinct values and
        a few of them: a debug listing for the data holder's own table, not for anything shared.
        """
        self.check_columns(df)
        out = []
        for spec in self.columns:
            out.extend(_column_problems(spec, df[spec.name], show_values))
        return out

    def validate(self, df: pd.DataFrame, *, show_values: bool = False) -> None:
        """Raise `SchemaError` naming every column whose values fall outside the schema, with the rule
        broken and its fix (`problems`; no values unless `show_values`); return None when `df` fits."""
        problems = self.problems(df, show_values=show_values)
        if problems:
            raise SchemaError("the data does not match the schema:\n  - " + "\n  - ".join(problems))

    def conform(self, df: pd.DataFrame) -> pd.DataFrame:
        """Make `df` fit: numbers clipped into [lo, hi] (integers rounded), values outside the categories
        of a column with `other` mapped to `OTHER`, rows holding another unknown category, a non-numeric entry
        in a numeric column or a disallowed missing value dropped; schema column order.

        Each row is mapped or dropped on its own, independently of the other rows, so neighbouring data sets
        stay neighbouring and DP training on the result keeps its guarantee for the original rows. Unknown
        or absent columns still raise: the column set is public.
        """
        self.check_columns(df)
        out = {}
        keep = np.ones(len(df), dtype=bool)
        for spec in self.columns:
            s = df[spec.name]
            ids = spec.value_index(s, clip=True)
            keep &= ids >= 0
            if spec.is_numeric:
                x = parse_numbers(s)[0]  # the rows of entries that are not numbers are dropped above
                x = np.clip(np.round(x) if spec.kind == "integer" else x, spec.lo, spec.hi)
                out[spec.name] = x
            elif spec.other:
                values = s.to_numpy(dtype=object).copy()
                values[ids == spec.other_id] = OTHER
                out[spec.name] = values
            else:
                out[spec.name] = s.to_numpy()
        frame = pd.DataFrame({n: v[keep] for n, v in out.items()})
        for spec in self.columns:
            if spec.kind == "integer" and not frame[spec.name].isna().any():
                frame[spec.name] = frame[spec.name].astype(np.int64)
            elif spec.kind == "categorical":
                frame[spec.name] = pd.Series(frame[spec.name].to_numpy(dtype=object)).infer_objects()
        return frame

    # -- value ids --------------------------------------------------------------------------------------

    def value_ids(self, df: pd.DataFrame) -> np.ndarray:
        """Value id of every cell [N, d] (schema column order); raises `SchemaError` if `df` does not fit."""
        self.validate(df)
        if len(df) == 0:
            return np.zeros((0, len(self)), dtype=np.int64)
        return np.stack([spec.value_index(df[spec.name]) for spec in self.columns], axis=1)

    def frame_from_value_ids(self, ids: np.ndarray, rng: np.random.Generator | None = None) -> pd.DataFrame:
        """Inverse of `value_ids`: numbers come back as their bin's value, or, with `rng`, drawn uniformly
        inside their bin (`ColumnSpec.draw_values`).

        dtypes: integer columns int64 (float64 if a missing value occurs), float columns float64,
        categorical columns pandas' default for their values (strings: `str`), missing as NaN.
        """
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] != len(self):
            raise DataError(f"value ids must have shape [N, {len(self)}], got {list(ids.shape)}")
        out = {}
        for j, spec in enumerate(self.columns):
            col = ids[:, j]
            if len(col) and (col.min() < 0 or col.max() >= spec.n_values):
                raise DataError(f"column {spec.name!r}: value ids must lie in [0, {spec.n_values}), got "
                                f"{_show(np.unique(col[(col < 0) | (col >= spec.n_values)]))}")
            table = spec.values()
            if spec.is_numeric:
                values = spec.draw_values(col, rng) if rng is not None else np.asarray(table, dtype=np.float64)[col]
                if spec.kind == "integer" and not np.isnan(values).any():
                    values = values.astype(np.int64)
                out[spec.name] = values
            else:
                out[spec.name] = pd.Series(np.asarray(table, dtype=object)[col]).infer_objects()
        return pd.DataFrame(out)

    # -- files ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": SCHEMA_FORMAT, "version": SCHEMA_VERSION, "private": self.private,
                "provenance": self.provenance, "metadata": dict(self.metadata),
                "columns": [c.to_dict() for c in self.columns]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Schema":
        if not isinstance(data, Mapping):
            raise SchemaError(f"a schema must be a mapping with a 'columns' list, got {type(data).__name__}")
        fmt = data.get("format", SCHEMA_FORMAT)
        if fmt != SCHEMA_FORMAT:
            raise SchemaError(f"not a tramontane schema: format is {fmt!r}, expected {SCHEMA_FORMAT!r}")
        version = data.get("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise SchemaError(
                f"schema version {version!r} is not supported (this library reads {SCHEMA_VERSION})"
            )
        known = {"format", "version", "private", "provenance", "metadata", "columns"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SchemaError(f"unknown schema key(s) {unknown}; allowed: {sorted(known)}")
        cols = data.get("columns")
        if not isinstance(cols, list):
            raise SchemaError("a schema needs a 'columns' list")
        todo = [c.get("name") for c in cols if isinstance(c, Mapping) and TODO_KEY in c]
        if todo:
            raise SchemaError(
                f"column(s) {todo} are still placeholders to fill in (each says what in its {TODO_KEY!r}). Fix: "
                f"fill them in from public knowledge and delete their {TODO_KEY!r} keys, or remove the columns "
                "from the schema (and from the data)")
        metadata = data.get("metadata", {})
        if not isinstance(metadata, Mapping):
            raise SchemaError(f"schema metadata must be a mapping, got {metadata!r}")
        return cls(tuple(ColumnSpec.from_dict(c) for c in cols), private=data.get("private", True),
                   provenance=str(data.get("provenance", "")), metadata=metadata)

    def save(self, path: str | Path) -> None:
        """Write JSON (`.json`) or YAML (`.yaml`/`.yml`, needs PyYAML)."""
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            yaml = _yaml()
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Schema":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise SchemaError(f"schema file {path} does not exist") from None
        if path.suffix.lower() in (".yaml", ".yml"):
            yaml = _yaml()
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise SchemaError(f"{path} is not valid YAML: {err}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise SchemaError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data)


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        raise SchemaError(
            "YAML schemas need PyYAML (pip install pyyaml); or save/load the schema as .json"
        ) from None
    return yaml


def _column_problems(spec: ColumnSpec, s: pd.Series, show_values: bool = False) -> list[str]:
    """The rules `s` breaks, each with its fix. Only with `show_values` a message quotes values from the
    rows or counts them (`Schema.problems`)."""
    where = f"column {spec.name!r}"

    def examples(values: Sequence[Any] | np.ndarray, count: int | None = None) -> str:
        n = len(values) if count is None else count
        return f" ({n} distinct value(s), e.g. {_show(values)})" if show_values else ""

    out = []
    isna = s.isna().to_numpy()
    if isna.any() and not spec.missing and not spec.other:
        out.append(f"{where} has missing values but the schema says missing: false. Fix: set missing: true "
                   "for the column in the schema, or drop the rows where it is missing")
    present = s[~isna]
    if spec.kind == "categorical":
        bad = present[spec.value_index(present) < 0]
        if len(bad):
            distinct = pd.unique(bad)
            msg = (f"{where} holds values that are not among the schema's categories{examples(distinct)}. "
                   "Fix: add them to the column's categories in the schema, or drop the rows that hold them")
            as_text = {str(c) for c in spec.categories}
            if all(str(_python_scalar(v)) in as_text for v in distinct[:_MAX_EXAMPLES]):
                held = type(spec.categories[0]).__name__
                msg += (f" (types differ: the schema holds {held} categories and the data does not; make "
                        "the two agree, e.g. write the categories as text)")
            out.append(msg)
        return out
    x, _ = parse_numbers(present)
    not_numbers = np.isnan(x)
    if not_numbers.any():
        dtype = f" (dtype {s.dtype})" if show_values else ""
        out.append(f"{where} is {spec.kind} in the schema but holds entries that are not numbers"
                   f"{examples(pd.unique(present[not_numbers]))}{dtype}. Fix: declare the column categorical "
                   "in the schema, or drop the rows that hold them (an empty field is a missing value)")
    x = x[~not_numbers]
    outside = np.unique(x[(x < spec.lo) | (x > spec.hi)])
    if len(outside):
        # The most extreme values first: they tell how far the range is off.
        shown = examples(outside[[0, -1]] if len(outside) > 1 else outside, len(outside))
        out.append(f"{where} holds numbers outside the schema range [{spec.lo}, {spec.hi}]{shown}. "
                   "Fix: widen lo/hi in the schema, or clip the numbers into the range")
    if spec.kind == "integer":
        frac = np.unique(x[np.isfinite(x) & (x != np.round(x))])
        if len(frac):
            out.append(f"{where} is integer in the schema but holds numbers that are not integers"
                       f"{examples(frac)}. Fix: round them, or declare the column float in the schema")
    return out
