"""What the CLI accepts in place of a CSV path, resolved by `tramontane.datasets`: the rows (`read_table`),
the public schema that goes with them (`schema_for`), the default hold-out (`default_holdout`), and the
non-private schema an evaluation reads off the real rows (`synth.dp_schema.evaluation_schema`, beside the
one inference: `datasets` sits below the synthesizer)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest

from tramontane import datasets
from tramontane.errors import DataError, SchemaError, TramontaneWarning
from tramontane.synth.dp_schema import evaluation_schema, infer_schema
from tramontane.tables.schema import ColumnSpec, Schema


@pytest.mark.parametrize("name, loader, split", [
    ("adult", datasets.load_adult, "train"), ("adult-train", datasets.load_adult, "train"),
    ("adult-test", datasets.load_adult, "test"), ("cps1988", datasets.load_cps1988, "train"),
    ("cps1988-test", datasets.load_cps1988, "test"),
])
def test_a_bundled_name_reads_that_split(name: str, loader, split: str) -> None:
    pd.testing.assert_frame_equal(datasets.read_table(name), loader(split))


def test_anything_else_is_a_csv_path_checked_against_the_schema(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adult").write_text("a,b\n007,1\n")  # a file named like a bundled table: the name wins...
    assert len(datasets.read_table("adult")) == 32_561
    csv = tmp_path / "t.csv"  # ...and a path is read as `read_csv` reads it
    csv.write_text("a,b\n007,1\nx,2\n")
    pd.testing.assert_frame_equal(datasets.read_table(csv), pd.DataFrame({"a": ["007", "x"], "b": ["1", "2"]}))
    schema = Schema((ColumnSpec.categorical("a", ["007"]), ColumnSpec.numeric("b", 0, 9, "integer")))
    with pytest.raises(SchemaError):  # "x" is not a category: checked, as read_csv does
        datasets.read_table(str(csv), schema)
    with pytest.raises(DataError, match="does not exist"):
        datasets.read_table(tmp_path / "missing.csv")


def test_the_public_schema_goes_with_a_train_split_only(tmp_path: Path) -> None:
    assert datasets.schema_for("adult") == datasets.adult_schema()
    assert datasets.schema_for("adult-train") == datasets.adult_schema()
    assert datasets.schema_for("cps1988") == datasets.cps1988_schema()
    for data in ("adult-test", "cps1988-test", "train.csv", None):
        assert datasets.schema_for(data) is None  # the caller infers one
    given = tmp_path / "schema.json"
    datasets.cps1988_schema().save(given)
    assert datasets.schema_for("adult", given) == datasets.cps1988_schema()  # a given file wins
    assert datasets.schema_for(None, str(given)) == datasets.cps1988_schema()


def test_the_default_holdout_is_the_test_split_of_a_bundled_train_split() -> None:
    assert datasets.default_holdout("adult") == "adult-test"
    assert datasets.default_holdout("adult-train") == "adult-test"
    assert datasets.default_holdout("cps1988") == "cps1988-test"
    for data in ("adult-test", "train.csv", "adult.csv", "cps1988-valid"):
        assert datasets.default_holdout(data) is None
    holdout = datasets.default_holdout("cps1988")
    pd.testing.assert_frame_equal(datasets.read_table(holdout), datasets.load_cps1988("test"))


def test_the_evaluation_schema_is_read_off_the_rows_without_dp_and_without_a_warning() -> None:
    real = pd.DataFrame({"colour": ["red", "blue", "red", None], "age": ["17", "90", "33", "41"],
                         "wage": [0.5, 2.25, 1.0, 3.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing built on it is published: no warning
        schema = evaluation_schema(real)
    assert schema.private is False and schema.names == ["colour", "age", "wage"]
    colour, age, wage = schema["colour"], schema["age"], schema["wage"]
    assert (colour.kind, list(colour.categories), colour.missing) == ("categorical", ["blue", "red"], True)
    assert (age.kind, age.lo, age.hi) == ("integer", 17, 90)  # the exact extremes: not DP
    assert (wage.kind, wage.lo, wage.hi) == ("float", 0.5, 3.0)
    with pytest.warns(TramontaneWarning, match="WITHOUT differential privacy"):
        assert schema == infer_schema(real, allow_non_private=True).schema  # the library's one inference
