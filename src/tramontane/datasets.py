"""Bundled data sets and reading tables from CSV.

`load_adult` reads UCI Adult (Becker & Kohavi 1996, CC BY 4.0; provenance in
`tramontane/data/ADULT_PROVENANCE.md`), shipped gzip-compressed inside the package; `adult_schema` is its
public schema, written from the data set's documentation rather than from the rows.
"""

from __future__ import annotations

import csv
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import pandas as pd

from tramontane.errors import DataError
from tramontane.synth.schema import Schema

ADULT_SPLITS = ("train", "test")
ADULT_TARGET = "income"


def _data_file(name: str) -> Traversable:
    return resources.files("tramontane") / "data" / name


def load_adult(split: str = "train") -> pd.DataFrame:
    """UCI Adult, `split` "train" (32,561 rows: the private data) or "test" (16,281: held out).

    Values are read literally: `?` (missing in UCI's coding) is a category string; integer columns are
    int64 and text columns pandas' default string dtype.
    """
    if split not in ADULT_SPLITS:
        raise DataError(f"split must be one of {list(ADULT_SPLITS)}, got {split!r}")
    with _data_file(f"adult_{split}.csv.gz").open("rb") as f:
        return pd.read_csv(f, compression="gzip", keep_default_na=False, na_values=[])


def adult_schema() -> Schema:
    """The public schema of Adult (categories from UCI's documentation, public census ranges)."""
    with resources.as_file(_data_file("adult_schema.json")) as path:
        return Schema.load(path)


def read_csv(path: str | Path, schema: Schema | None = None) -> pd.DataFrame:
    """Read a table from CSV, raising `DataError` for a missing, empty, header-only or undecodable file.

    An empty field is the only missing value. Without a schema every column is read as text: a dtype
    guessed from the rows would let one row (an `unknown` among integers) change how a whole column reads,
    and the kinds are decided from the values later (`infer_schema`, `Schema.conform` read numbers from
    text). With a schema, categorical columns are read as text (so "007" stays "007") and the result is
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
