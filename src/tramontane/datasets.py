"""Bundled data sets and reading tables from CSV.

Two real public tables ship gzip-compressed inside the package, each with a public schema written from its
documentation rather than from the rows (provenance in `tramontane/data/*_PROVENANCE.md`):
- `load_adult` / `adult_schema`: UCI Adult (Becker & Kohavi 1996, CC BY 4.0), 15 columns, the standard
  32,561 / 16,281 train/test split;
- `load_cps1988` / `cps1988_schema`: CPS 1988 wages (AER's `CPS1988`, Kleiber & Zeileis 2008, from the March
  1988 Current Population Survey, a US government work), 7 columns with a heavy-tailed weekly wage, split
  at random (seed 0) into 18,770 / 9,385 rows.
`BUNDLED` registers them by name with their default target column; `bundled_table` resolves the names the
CLI accepts in place of a CSV path (`adult`, `adult-train`, `adult-test`, `cps1988`, ...), and `read_table`,
`schema_for` and `default_holdout` answer for a name or a path alike: the rows, the public schema that goes
with them, and the held-out split an audit compares them with.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import pandas as pd

from tramontane.errors import DataError
from tramontane.tables.schema import Schema

SPLITS = ("train", "test")
ADULT_TARGET = "income"
CPS1988_TARGET = "parttime"


def _data_file(name: str) -> Traversable:
    return resources.files("tramontane") / "data" / name


def _read_bundled(stem: str, split: str) -> pd.DataFrame:
    if split not in SPLITS:
        raise DataError(f"split must be one of {list(SPLITS)}, got {split!r}")
    with _data_file(f"{stem}_{split}.csv.gz").open("rb") as f:
        return pd.read_csv(f, compression="gzip", keep_default_na=False, na_values=[])


def _bundled_schema(stem: str) -> Schema:
    with resources.as_file(_data_file(f"{stem}_schema.json")) as path:
        return Schema.load(path)


def load_adult(split: str = "train") -> pd.DataFrame:
    """UCI Adult, `split` "train" (32,561 rows: the private data) or "test" (16,281: held out).

    Values are read literally: `?` (missing in UCI's coding) is a category string; integer columns are
    int64 and text columns pandas' default string dtype.
    """
    return _read_bundled("adult", split)


def adult_schema() -> Schema:
    """The public schema of Adult (categories from UCI's documentation, public census ranges)."""
    return _bundled_schema("adult")


def load_cps1988(split: str = "train") -> pd.DataFrame:
    """CPS 1988 wages, `split` "train" (18,770 rows: the private data) or "test" (9,385: held out).

    Columns wage (dollars per week, 1992 prices; float64), education and experience (years; int64),
    ethnicity, smsa, region, parttime (text). The split is a seeded random 2/3 : 1/3 one of AER's 28,155
    rows (`CPS1988_PROVENANCE.md`); it has no missing values.
    """
    return _read_bundled("cps1988", split)


def cps1988_schema() -> Schema:
    """The public schema of CPS 1988 (categories from AER's documentation, ranges from the documented
    definitions of the sample; wage in log-spaced bins)."""
    return _bundled_schema("cps1988")


@dataclass(frozen=True)
class BundledTable:
    """A table shipped in the package: `load(split)` for "train" (the private rows) and "test" (held
    out), its public `schema()`, and the `target` column a utility evaluation predicts by default."""

    name: str
    title: str
    load: Callable[[str], pd.DataFrame]
    schema: Callable[[], Schema]
    target: str


BUNDLED: dict[str, BundledTable] = {
    "adult": BundledTable("adult", "UCI Adult", load_adult, adult_schema, ADULT_TARGET),
    "cps1988": BundledTable("cps1988", "CPS 1988 wages", load_cps1988, cps1988_schema, CPS1988_TARGET),
}


def bundled_table(name: str) -> tuple[BundledTable, str] | None:
    """(table, split) for a bundled table's name: `NAME` or `NAME-train` is its train split, `NAME-test` its
    test split; None for anything else (a CSV path)."""
    base, _, split = name.rpartition("-")
    if base in BUNDLED and split in SPLITS:
        return BUNDLED[base], split
    if name in BUNDLED:
        return BUNDLED[name], "train"
    return None


def read_table(name: str | Path, schema: Schema | None = None) -> pd.DataFrame:
    """The rows of a bundled table's split by name (`adult`, `adult-test`, `cps1988`, `cps1988-test`, as
    `bundled_table` reads it), else of the CSV file at `name` (`read_csv`, checked against `schema`)."""
    bundled = bundled_table(str(name))
    if bundled is not None:
        table, split = bundled
        return table.load(split)
    return read_csv(name, schema=schema)


def schema_for(data: str | Path | None, schema_path: str | Path | None = None) -> Schema | None:
    """The public schema of the table `data`: the file `schema_path` when given (`Schema.load`), else the
    bundled schema when `data` names a bundled table's train split, else None (the caller infers one)."""
    if schema_path is not None:
        return Schema.load(schema_path)
    bundled = bundled_table(str(data)) if data is not None else None
    if bundled is not None and bundled[1] == "train":
        return bundled[0].schema()  # public: written from the data set's documentation
    return None


def default_holdout(data: str | Path) -> str | None:
    """The held-out table that goes with `data` by default: `NAME-test` when `data` names a bundled table's
    train split (`adult` -> `adult-test`), else None (a CSV has no known hold-out)."""
    bundled = bundled_table(str(data))
    if bundled is not None and bundled[1] == "train":
        return f"{bundled[0].name}-test"
    return None


def read_csv(path: str | Path, schema: Schema | None = None) -> pd.DataFrame:
    """Read a table from CSV, raising `DataError` for a missing, empty, header-only or undecodable file.

    An empty field is the only missing value. Without a schema every column is read as text: a dtype
    guessed from the rows would let one row (an `unknown` among integers) change how a whole column reads,
    and the kinds are decided from the values later (`synth.dp_schema.infer_schema`, `Schema.conform` read
    numbers from text). With a schema, categorical columns are read as text (so "007" stays "007") and the result is
    checked against the schema (`SchemaError` if it does not fit).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a CSV file")
    _check_header(path)
    kwargs: dict = {"dtype": str, "keep_default_na": False, "na_values": [""]}
    if schema is not None:
        kwargs = dict(dtype={c.name: str for c in schema.columns if c.kind == "categorical"},
                      keep_default_na=False, na_values=[""])
    try:
        df = pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty: expected a header line and at least one row") from None
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8"
        ) from None
    except (pd.errors.ParserError, csv.Error) as err:
        raise DataError(f"{path} is not a readable CSV file: {err}") from None
    if len(df) == 0:
        raise DataError(f"{path} has a header but no rows")
    blank = [str(name) for name in df.columns if df[name].isna().all()]
    if blank and schema is None:
        raise DataError(f"{path}: column(s) {blank} are empty in every row: drop them, or declare them in a "
                        "public schema (--schema)")
    if schema is not None:
        schema.validate(df)
    return df


_SEPARATORS = {";": "semicolons", "\t": "tabs", "|": "vertical bars"}


def _check_header(path: Path) -> None:
    """The header alone (column names are public): repeated names, and a file separated by something other
    than commas, are refused before any row is read."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8") from None
    except csv.Error as err:
        raise DataError(f"{path} is not a readable CSV file: {err}") from None
    if not header:
        return  # empty file: pandas says so
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{path} has repeated column names {repeated}: rename them so each column has its own")
    if len(header) == 1:
        for sep, name in _SEPARATORS.items():
            if sep in header[0]:
                raise DataError(f"{path} has one column whose name contains {name}: the file seems to be "
                                f"separated by {name}, not commas; save it as comma-separated CSV")
