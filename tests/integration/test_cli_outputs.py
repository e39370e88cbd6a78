"""`synth` never destroys an existing output, and refuses bad options and unwritable or clobbering outputs
before it reads a single private value (so nothing is spent)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tramontane.cli import main
from tramontane.datasets import load_adult

logging.getLogger("absl").setLevel(logging.ERROR)
COLUMNS = ["age", "workclass", "sex", "income"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "r600.csv"
    load_adult("train")[COLUMNS].sample(600, random_state=0).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def saved_model(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small fitted synthesizer (each test works on its own copy)."""
    model = tmp_path_factory.mktemp("saved") / "model"
    assert main(["synth", "fit", "--data", str(data), "--epsilon", "50", "--steps", "2", "--accountant", "rdp",
                 "--out-model", str(model)]) == 0
    return model


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def _refused_before_reading(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "training a DP synthesizer" not in err and "spent epsilon" not in err  # nothing was read
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_existing_outputs_are_refused_and_kept(data: Path, tmp_path: Path, capsys) -> None:
    fit = ["synth", "fit", "--data", str(data), "--epsilon", "50", "--steps", "2", "--accountant", "rdp"]
    existing = tmp_path / "existing_dir"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    _refused_before_reading(*_run(capsys, *fit, "--out-model", str(existing)), "already exists", "--overwrite")
    assert (existing / "keep.txt").read_text() == "mine"

    afile = tmp_path / "afile"
    afile.write_text("a file")
    _refused_before_reading(*_run(capsys, *fit, "--out-model", str(afile)), "is a file")
    assert afile.read_text() == "a file"

    folder = tmp_path / "folder"
    folder.mkdir()
    one_go = ["synth", "--data", str(data), "--epsilon", "50", "--steps", "2", "--accountant", "rdp"]
    _refused_before_reading(*_run(capsys, *one_go, "--out", str(folder)), "is a folder")
    csv = tmp_path / "old.csv"
    csv.write_text("x\n1\n")
    _refused_before_reading(*_run(capsys, *one_go, "--out", str(csv)), "already exists")
    assert csv.read_text() == "x\n1\n"
    _refused_before_reading(*_run(capsys, *one_go, "--out", str(tmp_path / "new.csv"), "--report", str(afile)),
                            "is a file")
    assert not (tmp_path / "new.csv").exists()
    assert _listing(tmp_path) == ["afile", "existing_dir", "folder", "old.csv"]  # nothing hidden left

    # --overwrite replaces the whole folder, atomically, keeping nothing of it (hidden or not).
    code, err = _run(capsys, *fit, "--out-model", str(existing), "--overwrite")
    assert code == 0, err
    assert "keep.txt" not in _listing(existing) and "synthesizer.json" in _listing(existing)
    assert _listing(tmp_path) == ["afile", "existing_dir", "folder", "old.csv"]


@pytest.mark.parametrize("option", [["--rows", "-5"], ["--steps", "0"], ["--steps", "-3"], ["--seed", "-1"],
                                    ["--epsilon", "inf"], ["--delta", "1.5"]])
def test_bad_options_are_refused_before_any_private_read(data: Path, tmp_path: Path, capsys,
                                                        option: list[str]) -> None:
    argv = ["synth", "--data", str(data), "--epsilon", "5", "--out", str(tmp_path / "s.csv"), *option]
    code, err = _run(capsys, *argv)
    _refused_before_reading(code, err, option[0].lstrip("-").split("-")[0])
    assert _listing(tmp_path) == []


def test_an_unwritable_folder_is_refused_before_any_private_read(data: Path, tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        code, err = _run(capsys, "synth", "fit", "--data", str(data), "--epsilon", "50", "--steps", "2",
                         "--accountant", "rdp", "--out-model", str(locked / "model"))
        _refused_before_reading(code, err, "cannot write")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_damaged_or_missing_models_get_one_line_errors(saved_model: Path, tmp_path: Path, capsys) -> None:
    sample = ["synth", "sample", "--rows", "5", "--out", str(tmp_path / "s.csv"), "--model"]
    code, err = _run(capsys, *sample, str(tmp_path / "does_not_exist"))
    assert code == 2 and "does not exist" in err
    model = shutil.copytree(saved_model, tmp_path / "model")
    state = model / "synthesizer.json"
    text = state.read_text()
    for damaged in (text[: len(text) // 2], json.dumps({**json.loads(text), "config": {"dim": 8, "bogus": 1}}),
                    json.dumps({k: v for k, v in json.loads(text).items() if k != "ledger"})):
        state.write_text(damaged)
        code, err = _run(capsys, *sample, str(model))
        assert code == 2 and "damaged" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.csv").exists()


def test_sample_writes_the_rows_the_synthesizer_draws(saved_model: Path, tmp_path: Path, capsys) -> None:
    from tramontane.datasets import read_csv
    from tramontane.synth.synthesizer import Synthesizer

    out = tmp_path / "new" / "s.csv"  # a missing folder is made
    old = os.umask(0o022)
    try:
        assert main(["synth", "sample", "--model", str(saved_model), "--rows", "7", "--seed", "3",
                     "--out", str(out)]) == 0
    finally:
        os.umask(old)
    synth = Synthesizer.load(saved_model)
    expected = synth.sample(7, seed=3)  # the same seed draws the same rows
    assert out.read_bytes() == expected.to_csv(index=False).encode("utf-8")
    assert len(read_csv(out, schema=synth.schema)) == 7  # and they fit the model's schema
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 and _listing(out.parent) == ["s.csv"]  # shareable
    assert main(["synth", "sample", "--model", str(saved_model), "--rows", "2", "--seed", "3",
                 "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() == synth.sample(2, seed=3).to_csv(index=False).encode("utf-8")


@pytest.mark.parametrize("case", ["semicolons", "repeated", "blank"])
def test_malformed_tables_are_refused_before_any_private_read(tmp_path: Path, capsys, case: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text({"semicolons": "age;workclass\n39;Private\n50;Self-emp\n",
                     "repeated": "age,age,sex\n39,40,Male\n50,51,Female\n",
                     "blank": "age,note,sex\n39,,Male\n50,,Female\n"}[case])
    code, err = _run(capsys, "synth", "--data", str(path), "--epsilon", "5", "--out", str(tmp_path / "s.csv"))
    _refused_before_reading(code, err, {"semicolons": "semicolons", "repeated": "repeated column names",
                                        "blank": "empty in every row"}[case])
    assert "39" not in err and "Private" not in err  # no value from the rows


def test_ctrl_c_says_what_was_spent(data: Path, tmp_path: Path) -> None:
    import os
    import signal
    import sys
    import time

    model = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-m", "tramontane.cli", "synth", "fit", "--data", str(data),
                             "--epsilon", "50", "--steps", "100000", "--accountant", "rdp", "--out-model",
                             str(model)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # Ctrl-C's default action in the child whatever the test process inherited or
                            # set: Python raises KeyboardInterrupt only for a SIGINT it did not start ignoring
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "training a DP synthesizer" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        time.sleep(3)  # well into the DP-SGD steps
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: spent epsilon" in err and "it counts" in err and "Traceback" not in err
    assert not model.exists() and _listing(tmp_path) == []


def test_a_save_killed_midway_leaves_no_debris_after_the_next_save(saved_model: Path, tmp_path: Path) -> None:
    from tramontane.synth.synthesizer import Synthesizer

    model = shutil.copytree(saved_model, tmp_path / "model")
    stale = tmp_path / ".model2.tmp-abcd1234"  # what a SIGKILL during a save leaves behind
    stale.mkdir()
    (stale / "schema.json").write_text("{")
    Synthesizer.load(model).save(tmp_path / "model2")
    assert _listing(tmp_path) == ["model", "model2"]


def test_a_delta_above_one_over_the_rows_is_warned_about(data: Path, tmp_path: Path, capsys) -> None:
    code, err = _run(capsys, "synth", "fit", "--data", str(data), "--epsilon", "50", "--delta", "0.5",
                     "--steps", "2", "--accountant", "rdp", "--out-model", str(tmp_path / "m"))
    assert code == 0, err
    assert "warning: delta 0.5 is above 1 / rows" in err


@pytest.mark.parametrize("command", ["synth", "synth fit", "synth sample", "audit"])
def test_every_command_reading_private_rows_refuses_bad_outputs_first(data: Path, saved_model: Path,
                                                                     tmp_path: Path, capsys, command: str) -> None:
    """Clobbering or unwritable outputs and invalid options are refused with nothing read or written."""
    model = shutil.copytree(saved_model, tmp_path / "model")
    state = (model / "synthesizer.json").read_text()
    work = tmp_path / "work"
    work.mkdir()
    taken = work / "taken.csv"
    taken.write_text("mine")
    blocker = work / "blocker"  # a file where a folder would have to be created
    blocker.write_text("mine")
    fit = ["--data", str(data), "--epsilon", "5"]
    cases = {
        "synth": [["synth", *fit, "--out", str(taken)], ["synth", *fit, "--out", str(work / "s.csv"),
                                                          "--rows", "-1"],
                  ["synth", *fit, "--out", str(blocker / "s.csv")]],
        "synth fit": [["synth", "fit", *fit, "--out-model", str(model)],
                      ["synth", "fit", *fit, "--out-model", str(work / "m"), "--steps", "0"],
                      ["synth", "fit", *fit, "--out-model", str(blocker / "m")]],
        "synth sample": [["synth", "sample", "--model", str(model), "--rows", "5", "--out", str(taken)],
                         ["synth", "sample", "--model", str(model), "--rows", "-5", "--out", str(work / "s.csv")],
                         ["synth", "sample", "--model", str(model), "--rows", "5", "--out", str(work)]],
        "audit": [["audit", "--model", str(model), "--data", str(data), "--out", str(blocker / "a")],
                  ["audit", "--model", str(model), "--data", str(data), "--out", str(taken)]],
    }[command]
    for argv in cases:
        code, err = _run(capsys, *argv)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert "spent epsilon" not in err and "training a DP synthesizer" not in err
    assert _listing(work) == ["blocker", "taken.csv"] and taken.read_text() == "mine"
    assert (model / "synthesizer.json").read_text() == state  # the saved model and its ledger untouched
