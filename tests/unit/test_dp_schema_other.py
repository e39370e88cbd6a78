"""The catch-all value "other" (`ColumnSpec.other`): what a schema file says, how `conform`, `value_index` and
validation read values outside the categories, and DP inference merging rare values into it instead of
dropping their rows."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from tramontane.errors import SchemaError, TramontaneWarning
from tramontane.synth.dp_schema import infer_schema
from tramontane.synth.schema import OTHER, ColumnSpec, Schema


def _color(other: bool = True, missing: bool = False) -> ColumnSpec:
    return ColumnSpec.categorical("color", ["red", "blue"], missing=missing, other=other)


def test_other_is_the_last_category_and_files_write_it_as_a_flag() -> None:
    spec = _color()
    assert spec.categories == ("red", "blue", OTHER) and spec.other_id == 2 and spec.n_values == 3
    assert ColumnSpec.categorical("c", [OTHER, "a"], other=True).categories == ("a", OTHER)  # listed: moved last
    data = spec.to_dict()
    assert data["categories"] == ["red", "blue"] and data["other"] is True
    assert ColumnSpec.from_dict(json.loads(json.dumps(data))) == spec
    # without other, a file is written and read exactly as before (no "other" key)
    plain = _color(other=False)
    assert "other" not in plain.to_dict() and plain.other_id is None
    old = {"name": "color", "kind": "categorical", "categories": ["red", "blue"], "missing": False}
    assert ColumnSpec.from_dict(old) == plain
    schema = Schema((spec, ColumnSpec.numeric("n", 0, 9, "integer")))
    assert Schema.from_dict(json.loads(json.dumps(schema.to_dict()))) == schema


def test_only_categorical_columns_take_other() -> None:
    with pytest.raises(SchemaError, match="only a categorical column takes other"):
        ColumnSpec("n", "integer", lo=0, hi=3, other=True)
    with pytest.raises(SchemaError, match="only a categorical column takes other"):
        ColumnSpec.from_dict({"name": "n", "kind": "integer", "lo": 0, "hi": 3, "other": True})
    with pytest.raises(SchemaError, match="true or false"):
        ColumnSpec("c", "categorical", ("a",), other="yes")  # type: ignore[arg-type]


def test_values_outside_the_categories_read_as_other() -> None:
    s = pd.Series(["red", "green", None, "blue", OTHER], dtype=object)
    assert _color().value_index(s).tolist() == [0, 2, 2, 1, 2]  # a missing value too, as missing is not allowed
    assert _color(missing=True).value_index(s).tolist() == [0, 2, 3, 1, 2]
    assert _color(other=False).value_index(s).tolist() == [0, -1, -1, 1, -1]


def test_conform_maps_unseen_values_to_other_and_keeps_their_rows() -> None:
    df = pd.DataFrame({"color": ["red", "green", "violet", None, "blue"], "n": [1, 2, 3, 4, 5]})
    schema = Schema((_color(), ColumnSpec.numeric("n", 0, 9, "integer")))
    schema.validate(df)  # nothing outside the schema: unseen values are "other"
    out = schema.conform(df)
    assert out["color"].tolist() == ["red", OTHER, OTHER, OTHER, "blue"] and out["n"].tolist() == [1, 2, 3, 4, 5]
    ids = schema.value_ids(out)
    assert ids[:, 0].tolist() == [0, 2, 2, 2, 1]
    assert schema.frame_from_value_ids(ids)["color"].tolist() == out["color"].tolist()
    strict = Schema((_color(other=False), ColumnSpec.numeric("n", 0, 9, "integer")))
    assert strict.conform(df)["color"].tolist() == ["red", "blue"]  # without other: rows dropped as before
    with pytest.raises(SchemaError, match="not among the schema's categories"):
        strict.validate(df)


def test_dp_inference_merges_rare_values_into_other() -> None:
    """Five frequent values and 300 rare ones (two rows each): the rare ones never pass the threshold; their
    600 rows make "other" (its count is far over OTHER_Z sigma) and conform keeps every row. A column with
    nothing left out gets no "other"."""
    rng = np.random.default_rng(0)
    frequent = rng.choice([f"f{i}" for i in range(5)], 6000)
    rare = np.repeat([f"r{i}" for i in range(300)], 2)
    df = pd.DataFrame({"c": np.concatenate([frequent, rare]), "full": rng.choice(["a", "b"], 6600)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        r = infer_schema(df, rho=0.05, delta=1e-6, seed=1)
    c = r.schema["c"]
    assert c.other and set(c.categories) == {*(f"f{i}" for i in range(5)), OTHER}
    assert not r.schema["full"].other and r.schema["full"].categories == ("a", "b")
    out = r.schema.conform(df)
    assert len(out) == len(df) and (out["c"] == OTHER).sum() == 600
    assert [n.other for n in r.columns] == [True, False]
    assert "5 categories kept + other" in r.notes[0]
