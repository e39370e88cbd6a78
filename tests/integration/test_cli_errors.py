"""`cli.main` turns every error of tramontane's hierarchy raised in the library into one `error:` line and exit
code 2 (those that are also ValueError or RuntimeError included), an OSError into one line unless --verbose,
Ctrl-C into 130; anything else (a bug) keeps its traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tramontane import datasets
from tramontane.cli import main
from tramontane.errors import (
    ConfigError,
    DataError,
    DPUsageError,
    PrivacyBudgetError,
    SchemaError,
    TramontaneError,
)

EVALUATE = ["evaluate", "--real-train", "train.csv", "--synthetic", "synthetic.csv"]


def _failing(error: BaseException):
    def read_table(*args, **kwargs):
        raise error
    return read_table


@pytest.mark.parametrize("error", [
    DataError("train.csv is empty: expected a header line and at least one row"),  # also a ValueError
    SchemaError("column 'age' is numeric: declare it categorical in the schema"),  # also a ValueError
    ConfigError("the config is incomplete: add 'dim'"),  # also a ValueError
    DPUsageError("a backward pass outside record(): call it inside"),  # also a RuntimeError
    PrivacyBudgetError("the budget is spent: nothing was spent"),
    TramontaneError("a plain one"),
])
def test_library_errors_of_the_hierarchy_are_one_line_and_exit_2(monkeypatch, capsys, error: Exception) -> None:
    monkeypatch.setattr(datasets, "read_table", _failing(error))
    assert main(EVALUATE) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {error}\n" and captured.out == ""


def test_a_bug_is_not_hidden_behind_an_error_line(monkeypatch, capsys) -> None:
    # A ValueError outside the hierarchy is a bug, not the user's mistake: it keeps its traceback.
    monkeypatch.setattr(datasets, "read_table", _failing(ValueError("internal")))
    with pytest.raises(ValueError, match="internal"):
        main(EVALUATE)
    assert "error:" not in capsys.readouterr().err


def test_an_os_error_is_one_line_unless_verbose(monkeypatch, capsys) -> None:
    monkeypatch.setattr(datasets, "read_table", _failing(OSError(28, "No space left on device", "out.csv")))
    assert main(EVALUATE) == 2
    assert capsys.readouterr().err == "error: No space left on device: out.csv\n"
    with pytest.raises(OSError):
        main(["--verbose", *EVALUATE])


def test_ctrl_c_exits_130(monkeypatch, capsys) -> None:
    monkeypatch.setattr(datasets, "read_table", _failing(KeyboardInterrupt()))
    assert main(EVALUATE) == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("argv", [
    ["evaluate", "--real-train", "{tmp}/missing.csv", "--synthetic", "{tmp}/missing.csv"],  # DataError
    ["evaluate", "--real-train", "adult", "--synthetic", "adult-test", "--schema", "{tmp}/bad.json"],
    ["schema", "init", "--data", "{tmp}/t.csv", "--out", "{tmp}/s.json", "--range", "a=1"],  # SchemaError
    ["synth", "sample", "--model", "{tmp}", "--rows", "3", "--out", "{tmp}/o.csv"],  # not a synthesizer
])
def test_real_library_errors_reach_the_shell_as_one_line(tmp_path: Path, argv: list[str]) -> None:
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    out = subprocess.run([sys.executable, "-m", "tramontane.cli", *(a.format(tmp=tmp_path) for a in argv)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
