"""`tramontane schema init`: a public schema drafted from a CSV header and declared kinds, never from a row;
placeholders that `Schema.load` refuses until they are filled in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tramontane.cli import main
from tramontane.errors import SchemaError
from tramontane.synth.schema import TODO_KEY, Schema
from tramontane.synth.schema_draft import (
    column_lists,
    draft_from_csv,
    draft_schema,
    parse_range,
    read_header,
    todo_columns,
)

HEADER = b'age,workclass,"fnlwgt, weight",income\r\n'
# what follows the header is never read: undecodable bytes, an unclosed quote, a ragged row
GARBAGE = b'\xff\xfe\x00 not utf-8 "unclosed,,,\n1,2\n' + bytes(range(256)) * 64


@pytest.fixture()
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "private.csv"
    path.write_bytes(HEADER + GARBAGE)
    return path


def test_only_the_header_line_is_read(csv_file: Path, tmp_path: Path) -> None:
    assert read_header(csv_file) == ["age", "workclass", "fnlwgt, weight", "income"]
    only_header = tmp_path / "header.csv"
    only_header.write_bytes(b"\xef\xbb\xbfa,b")  # a byte-order mark, no newline, no rows
    assert read_header(only_header) == ["a", "b"]
    with pytest.raises(UnicodeDecodeError):  # the same bytes would break any reader that went past line 1
        GARBAGE.decode("utf-8")


@pytest.mark.parametrize("first_line, message", [
    (b"\n", "no header line"), (b"a,,b\n", "empty column name"), (b"a,b,a\n", "repeats column name"),
    (b'a,"b\n', "not one CSV line"), (b"\xff,b\n", "not UTF-8"),
])
def test_bad_headers_are_refused(tmp_path: Path, first_line: bytes, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(first_line + b"1,2,3\n")
    with pytest.raises(SchemaError, match=message):
        read_header(path)


def test_declared_columns_become_specs_and_the_rest_placeholders(csv_file: Path) -> None:
    draft = draft_from_csv(csv_file, categorical=["workclass", "income"], integer=["age"],
                           floats=["fnlwgt, weight"], ranges={"age": (0, 120)})
    columns = {c["name"]: c for c in draft["columns"]}
    assert [c["name"] for c in draft["columns"]] == ["age", "workclass", "fnlwgt, weight", "income"]
    assert columns["age"] == {"name": "age", "kind": "integer", "lo": 0, "hi": 120, "missing": False}
    assert columns["workclass"]["categories"] == [] and TODO_KEY in columns["workclass"]
    assert TODO_KEY in columns["fnlwgt, weight"] and columns["fnlwgt, weight"]["lo"] is None
    assert todo_columns(draft) == ["workclass", "fnlwgt, weight", "income"]
    assert "no row was read" in draft["provenance"] and draft["private"] is True
    undeclared = draft_from_csv(csv_file, integer=["age"])
    assert [c["kind"] for c in undeclared["columns"]][1:] == ["TODO"] * 3


def test_a_complete_draft_loads_and_placeholders_are_refused_by_name(tmp_path: Path) -> None:
    draft = draft_schema(["age", "score"], integer=["age"], floats=["score"],
                         ranges={"age": (17, 90), "score": (0.0, 1.0)})
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(draft))
    schema = Schema.load(path)
    assert schema["age"].n_bins == 74 and (schema["score"].lo, schema["score"].hi) == (0.0, 1.0)
    partial = draft_schema(["age", "city"], integer=["age"], ranges={"age": (17, 90)})
    path.write_text(json.dumps(partial))
    with pytest.raises(SchemaError, match=r"\['city'\] are still placeholders") as info:
        Schema.load(path)
    assert "delete their 'todo' keys" in str(info.value)
    # filled in but the todo left behind: still refused, the column named
    partial["columns"][1] = {"name": "city", "kind": "categorical", "categories": ["Paris"], TODO_KEY: "x"}
    with pytest.raises(SchemaError, match="'city'"):
        Schema.from_dict(partial)
    del partial["columns"][1][TODO_KEY]
    assert Schema.from_dict(partial)["city"].categories == ("Paris",)


@pytest.mark.parametrize("declared, message", [
    ({"categorical": ["nope"]}, "not in the header"),
    ({"categorical": ["age"], "integer": ["age"]}, "both categorical and integer"),
    ({"ranges": {"age": (0, 1)}}, "no numeric kind"),
    ({"integer": ["age"], "ranges": {"age": (0.5, 3)}}, "whole numbers"),
    ({"floats": ["age"], "ranges": {"age": (3, 1)}}, "LO <= HI"),
])
def test_inconsistent_declarations_are_refused(declared: dict, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        draft_schema(["age", "city"], **declared)


def test_parse_range() -> None:
    assert parse_range("age=0:120") == ("age", (0.0, 120.0))
    assert parse_range("a=b=-1.5:2e3") == ("a=b", (-1.5, 2000.0))
    for bad in ("age", "age=1", "=1:2", "age=a:b"):
        with pytest.raises(SchemaError, match="NAME=LO:HI"):
            parse_range(bad)


def test_the_command_writes_the_draft_and_names_what_to_fill_in(csv_file: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "schema.json"
    args = ["schema", "init", "--data", str(csv_file), "--out", str(out), "--categorical", "workclass,income",
            "--integer", "age", "--range", "age=0:120"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "wrote a draft schema of 4 columns" in err and "fnlwgt, weight" in err
    draft = json.loads(out.read_text())
    assert draft["columns"][0] == {"name": "age", "kind": "integer", "lo": 0, "hi": 120, "missing": False}
    assert main(args) == 2 and "already exists" in capsys.readouterr().err  # nothing replaced silently
    assert main([*args, "--overwrite", "--float", "fnlwgt, weight", "--range", "fnlwgt, weight=0:2e6"]) == 0
    assert "fill in" in capsys.readouterr().err
    assert main(["schema", "init", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "s.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_command_line_lists_split_on_commas_unless_a_name_holds_one() -> None:
    columns = ["a", "b", "x, y"]
    assert column_lists(["a,b", "x, y"], columns) == ["a", "b", "x, y"]
    assert column_lists(["a,,b,"], columns) == ["a", "b"]
