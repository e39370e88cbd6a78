"""Draft a PUBLIC schema from a CSV file's header and the kinds the user declares, never reading a row.

`tramontane schema init --data X.csv --out schema.json --categorical a,b --integer c --float d
--range c=0:120` writes a schema for the user to review, complete and pass with `--schema`. Only the first
line of the file is read, and only it is decoded: the column names, which are public (a fit publishes the
column set). No value of any row is read, so the draft costs no privacy and says nothing about the rows.

What the user must still supply from public knowledge (a form's list of options, a code book, a census
range) is marked in the column by a `todo` key saying what to fill in: the categories of a categorical
column, the range of a numeric one given no `--range`, the kind of an undeclared one. `Schema.load` refuses
the file while any `todo` is left, naming the column and the fix. A complete draft (every column declared,
every numeric one given its range) is checked to load before it is written. Categories are never guessed:
listing them from the rows would publish rare values, the very leak the schema has to avoid.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tramontane.errors import SchemaError
from tramontane.tables.schema import (
    KINDS,
    NUMERIC_KINDS,
    OTHER,
    SCHEMA_FORMAT,
    SCHEMA_VERSION,
    TODO_KEY,
    Schema,
)

MAX_HEADER_BYTES = 1 << 20  # a longer first line is not a header
PLACEHOLDER_KIND = "TODO"
TODO_KIND = ("declare the kind: categorical (and list its categories), integer or float (and give its public "
             "range lo and hi); or remove the column from the schema and from the data")
TODO_CATEGORIES = ("list the column's categories from public knowledge (a code book, a form's options), never "
                   f"from the rows; set other to true to read values you did not list as {OTHER!r} instead of "
                   "refusing them")
TODO_RANGE = "give the column's public range lo and hi (or draft again with --range NAME=LO:HI)"


def read_header(path: str | Path) -> list[str]:
    """The column names on the first line of a CSV file: that line alone is read and decoded (bytes, then
    UTF-8), so whatever follows it, however malformed, is never looked at. Raises `SchemaError`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            line = f.readline(MAX_HEADER_BYTES + 1)
    except FileNotFoundError:
        raise SchemaError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise SchemaError(f"{path} is a folder, not a CSV file") from None
    if len(line) > MAX_HEADER_BYTES:
        raise SchemaError(f"the first line of {path} is longer than {MAX_HEADER_BYTES} bytes: not a CSV header")
    try:
        text = line.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise SchemaError(f"the header of {path} is not UTF-8 text ({err.reason}); re-save the file as UTF-8") \
            from None
    if not text.strip():
        raise SchemaError(f"{path} has no header line: its first line should name the columns")
    try:
        names = next(csv.reader([text], strict=True))
    except csv.Error as err:
        raise SchemaError(f"the header of {path} is not one CSV line ({err}); a column name cannot span lines") \
            from None
    empty = [i + 1 for i, n in enumerate(names) if not n.strip()]
    if empty:
        raise SchemaError(f"the header of {path} has empty column name(s) at position(s) {empty}: name them")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SchemaError(f"the header of {path} repeats column name(s) {repeated}: rename them")
    return names


def parse_range(text: str) -> tuple[str, tuple[float, float]]:
    """`NAME=LO:HI` (as `--range` takes it) -> (NAME, (LO, HI))."""
    name, sep, bounds = text.rpartition("=")
    lo, colon, hi = bounds.partition(":")
    try:
        if not (sep and colon and name):
            raise ValueError
        values = (float(lo), float(hi))
    except ValueError:
        raise SchemaError(f"a range is NAME=LO:HI (e.g. age=0:120), got {text!r}") from None
    return name, values


def draft_schema(
    columns: Iterable[str],
    *,
    categorical: Iterable[str] = (),
    integer: Iterable[str] = (),
    floats: Iterable[str] = (),
    ranges: Mapping[str, tuple[float, float]] | None = None,
    source: str = "",
) -> dict[str, Any]:
    """A schema dict (`Schema.to_dict` layout) for `columns` in their order, from the declared kinds and
    public ranges only; columns left to fill in carry a `todo` (module docstring)."""
    columns = list(columns)
    ranges = dict(ranges or {})
    kinds: dict[str, str] = {}
    for declared, names in (("categorical", categorical), ("integer", integer), ("float", floats)):
        for name in names:
            if name in kinds and kinds[name] != declared:
                raise SchemaError(
                    f"column {name!r} is declared both {kinds[name]} and {declared}: choose one")
            kinds[name] = declared
    unknown = [n for n in [*kinds, *ranges] if n not in columns]
    if unknown:
        raise SchemaError(f"declared column(s) {sorted(set(unknown))} are not in the header; columns: {columns}")
    for name, (lo, hi) in ranges.items():
        if kinds.get(name) not in NUMERIC_KINDS:
            raise SchemaError(f"column {name!r} has a range but no numeric kind: declare it --integer or --float")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise SchemaError(f"the range of column {name!r} needs finite LO <= HI, got {lo}:{hi}")
        if kinds[name] == "integer" and (lo != int(lo) or hi != int(hi)):
            raise SchemaError(f"column {name!r} is integer: its range needs whole numbers, got {lo}:{hi}")
    out: list[dict[str, Any]] = []
    for name in columns:
        kind = kinds.get(name)
        if kind is None:
            out.append({"name": name, "kind": PLACEHOLDER_KIND, TODO_KEY: TODO_KIND})
        elif kind == "categorical":
            out.append({"name": name, "kind": kind, "categories": [], "missing": False, "other": False,
                        TODO_KEY: TODO_CATEGORIES})
        elif name in ranges:
            lo, hi = ranges[name]
            lo, hi = (int(lo), int(hi)) if kind == "integer" else (lo, hi)
            out.append({"name": name, "kind": kind, "lo": lo, "hi": hi, "missing": False})
        else:
            out.append({"name": name, "kind": kind, "lo": None, "hi": None, "missing": False, TODO_KEY: TODO_RANGE})
    assert PLACEHOLDER_KIND not in KINDS
    draft = {"format": SCHEMA_FORMAT, "version": SCHEMA_VERSION, "private": True,
             "provenance": "drafted by `tramontane schema init` from the header" + (f" of {source}" if source else "")
                           + " and declared kinds and ranges (public inputs; no row was read)",
             "metadata": {}, "columns": out}
    if not todo_columns(draft):
        Schema.from_dict(draft)  # complete: it must load as it is
    return draft


def column_lists(values: Iterable[str], columns: Iterable[str]) -> list[str]:
    """Column names from command-line values: a value that is a column's name (commas included) is that
    column, any other is a comma-separated list of names."""
    columns = set(columns)
    return [n for value in values for n in ([value] if value in columns else value.split(",")) if n]


def draft_from_csv(
    path: str | Path,
    *,
    categorical: Iterable[str] = (),
    integer: Iterable[str] = (),
    floats: Iterable[str] = (),
    ranges: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """`draft_schema` over the header of the CSV file at `path` (`read_header`); the kinds are lists of
    column names or comma-separated lists of them (`column_lists`)."""
    columns = read_header(path)
    return draft_schema(columns, categorical=column_lists(categorical, columns),
                        integer=column_lists(integer, columns), floats=column_lists(floats, columns),
                        ranges=ranges, source=Path(path).name)


def todo_columns(draft: Mapping[str, Any]) -> list[str]:
    """Names of the draft's columns still to fill in."""
    return [c["name"] for c in draft["columns"] if TODO_KEY in c]


def draft_json(draft: Mapping[str, Any]) -> str:
    return json.dumps(draft, indent=2, ensure_ascii=False) + "\n"
