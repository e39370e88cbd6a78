"""An interrupted fit continues from its last checkpoint: nothing is inferred or counted again, the ledger
goes on, and the run ends with the epsilon of an uninterrupted one; another table or other settings are
refused."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pandas as pd
import pytest

from tramontane import accounting
from tramontane.cli import main
from tramontane.datasets import load_adult
from tramontane.errors import ConfigError, TramontaneWarning
from tramontane.synth.synthesizer import Synthesizer, SynthConfig

logging.getLogger("absl").setLevel(logging.ERROR)
COLUMNS = ["age", "workclass", "sex", "income"]


def _tiny(steps: int = 6) -> SynthConfig:
    return SynthConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, steps=steps, accountant="rdp")


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return load_adult("train")[COLUMNS].sample(1500, random_state=3).reset_index(drop=True)


def _stop_at(step_to_stop: int):
    def on_step(step: int, total: int, info: dict) -> None:
        if step == step_to_stop:
            raise KeyboardInterrupt
    return on_step


def test_an_interrupted_fit_resumes_without_spending_again(table: pd.DataFrame, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        first = Synthesizer(None, epsilon=20, delta=1e-5, config=_tiny(), seed=0)
        with pytest.raises(KeyboardInterrupt):
            first.fit(table, run_dir=run, checkpoint_every=2, on_step=_stop_at(3))
        before = list(first.ledger.events)
        resumed = Synthesizer(None, epsilon=20, delta=1e-5, config=_tiny(), seed=0)
        resumed.fit(table, run_dir=run, checkpoint_every=2)
    events = resumed.ledger.events
    labels = [e.label for e in events]
    assert labels.count("row count") == 1
    schema_events = [e for e in events if e.label.startswith("schema inference")]
    assert schema_events == [e for e in before if e.label.startswith("schema inference")]  # spent once
    steps = [e for e in events if isinstance(e, accounting.DpSgdEvent)]
    assert sum(e.steps for e in steps) == 6 and resumed.summary.steps == 6
    # the epsilon of an uninterrupted run with this plan: all of the budget, none of it twice
    uninterrupted = [e for e in events if not isinstance(e, accounting.DpSgdEvent)]
    uninterrupted.append(accounting.DpSgdEvent(steps[0].sample_rate, steps[0].noise_multiplier, 6, steps[0].label))
    assert accounting.epsilon(resumed.ledger, 1e-5) == pytest.approx(accounting.epsilon(uninterrupted, 1e-5))
    assert accounting.epsilon(resumed.ledger, 1e-5) == pytest.approx(20, rel=1e-3)

    with pytest.raises(ConfigError, match="other settings"):
        Synthesizer(None, epsilon=10, delta=1e-5, config=_tiny(), seed=0).fit(table, run_dir=run)
    with pytest.raises(ConfigError, match="different table"):
        Synthesizer(None, epsilon=20, delta=1e-5, config=_tiny(), seed=0).fit(table.iloc[1:], run_dir=run)


def test_cli_resume(table: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.csv"
    table.to_csv(data, index=False)
    run = tmp_path / "run"
    fit = ["synth", "fit", "--data", str(data), "--epsilon", "6", "--steps", "4", "--seed", "0",
           "--checkpoint-every", "2"]
    assert main([*fit, "--resume", str(run), "--out-model", str(tmp_path / "m")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main([*fit, "--run-dir", str(run), "--out-model", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main([*fit, "--run-dir", str(run), "--out-model", str(tmp_path / "m2")]) == 2  # not a fresh folder
    assert "not empty" in capsys.readouterr().err
    assert main([*fit, "--resume", str(run), "--out-model", str(tmp_path / "m2")]) == 0
    a, b = Synthesizer.load(tmp_path / "m"), Synthesizer.load(tmp_path / "m2")
    assert a.ledger == b.ledger  # the finished run resumed at its last step: nothing more spent
    assert (run.stat().st_mode & 0o077) == 0  # the run folder is the data holder's
