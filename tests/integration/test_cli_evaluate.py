"""`tramontane evaluate` on small generated CSV tables: bad targets and non-finite numbers are refused with
one clean line, and numeric columns read as text are still binned as numbers."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tramontane.cli import main
from tramontane.datasets import read_csv
from tramontane.errors import DataError
from tramontane.report.metrics import MarginalBins
from tramontane.report.utility import numbers_as_floats
from tramontane.synth.dp_schema import infer_schema


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _table(seed: int, rows: int = 80) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": rng.integers(18, 80, rows), "income": np.round(rng.uniform(0, 1000, rows), 2),
                         "label": rng.choice(["low", "mid", "high"], rows)})


def _write(df: pd.DataFrame, path: Path) -> str:
    df.to_csv(path, index=False)
    return str(path)


@pytest.fixture
def tables(tmp_path: Path) -> dict[str, str]:
    return {name: _write(_table(seed), tmp_path / f"{name}.csv")
            for seed, name in enumerate(["train", "synthetic", "test"])}


@pytest.mark.parametrize("with_test", [False, True])
def test_target_that_is_not_a_column_is_refused(tables: dict[str, str], with_test: bool,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["evaluate", "--real-train", tables["train"], "--synthetic", tables["synthetic"], "--target", "nosuchcol"]
    assert main(argv + (["--real-test", tables["test"]] if with_test else [])) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--target" in line and "nosuchcol" in line and all(c in line for c in ("age", "income", "label"))


def test_target_without_a_test_table_says_it_is_unused(tables: dict[str, str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--real-train", tables["train"], "--synthetic", tables["synthetic"],
                 "--target", "label", "--json"]) == 0
    out = capsys.readouterr()
    assert "ml_efficacy" not in json.loads(out.out) and "--real-test" in out.err


@pytest.mark.parametrize("table", ["train", "synthetic", "test"])
@pytest.mark.parametrize("bad", ["1e999", "-1e999", "-nan"])  # inf, -inf and NaN, spelt so a quote would show
def test_non_finite_number_is_refused_naming_column_and_rule(tables: dict[str, str], table: str, bad: str,
                                                             tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    frame = _table(["train", "synthetic", "test"].index(table)).astype(str)
    frame.loc[3, "income"] = bad
    paths = dict(tables, **{table: _write(frame, tmp_path / "bad.csv")})
    assert main(["evaluate", "--real-train", paths["train"], "--synthetic", paths["synthetic"],
                 "--real-test", paths["test"], "--target", "label"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    option = "--real-train" if table == "train" else f"--{table.replace('test', 'real-test')}"
    assert "'income'" in line and option in line and "finite" in line
    assert bad not in line and not re.search(r"\d", line)  # no value from the rows, no count


def test_numeric_column_read_as_text_gets_quantile_bins(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    real = pd.DataFrame({"income": np.round(np.random.default_rng(1).uniform(0, 1000, 200), 3)})
    train = read_csv(_write(real, tmp_path / "train.csv"))
    assert not pd.api.types.is_numeric_dtype(train["income"].dtype)  # read as text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schema = infer_schema(train, allow_non_private=True).schema
    assert "income" not in MarginalBins.fit(train).cuts  # by dtype alone: categories
    converted = numbers_as_floats(train, schema, "--real-train")
    assert converted["income"].dtype == np.float64
    assert len(MarginalBins.fit(converted).cuts["income"]) > 10  # quantile bins, even without the schema

    # End to end: every synthetic value moved off the real ones, but not out of its bin. As categories the
    # two tables would share no value (TVD 1); as numbers they fall in the same quantile bins.
    shifted = pd.DataFrame({"income": [f"{x + 1e-4:.4f}" for x in real["income"]]})
    assert main(["evaluate", "--real-train", str(tmp_path / "train.csv"),
                 "--synthetic", _write(shifted, tmp_path / "synthetic.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tvd"]["1-way"] < 0.05


def test_numbers_as_floats_refuses_text_in_a_numeric_column(tmp_path: Path) -> None:
    frame = _table(4).astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schema = infer_schema(frame, allow_non_private=True).schema
    frame.loc[5, "age"] = "unknown"
    with pytest.raises(DataError, match=r"\['age'\] of the synthetic table") as info:
        numbers_as_floats(frame, schema, "the synthetic table")
    assert "unknown" not in str(info.value)


def test_multiclass_target_prints_without_auc(tables: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--real-train", tables["train"], "--synthetic", tables["synthetic"],
                 "--real-test", tables["test"], "--target", "label"]) == 0
    assert "n/a" in capsys.readouterr().out


def test_synth_refuses_a_report_target_that_is_not_a_column_before_spending(
        tables: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "s.csv", tmp_path / "report"
    assert main(["synth", "--data", tables["train"], "--epsilon", "1", "--delta", "1e-5", "--out", str(out),
                 "--report", str(report), "--target", "nosuchcol"]) == 2
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert "--target" in line and "nosuchcol" in line and "nothing was spent" in line
    assert not out.exists() and not report.exists()
