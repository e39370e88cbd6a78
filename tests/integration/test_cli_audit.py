"""`tramontane audit` on saved tiny synthesizers: data prepared as the fit prepared it, nothing private in
what it prints or writes, progress per phase, Ctrl-C writes partial results, defaults and their power."""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tramontane.audit import synth_audit
from tramontane.audit.estimators import empirical_epsilon, gaussian_epsilon
from tramontane.audit.synth_audit import (
    AUTO_ROUNDS,
    AuditConfig,
    AuditInterrupted,
    audit_synthesizer,
    auto_rounds,
    training_rows,
)
from tramontane.cli import build_parser, main
from tramontane.datasets import adult_schema, load_adult
from tramontane.synth.release import json_fields
from tramontane.synth.synthesizer import SynthConfig, Synthesizer

COLUMNS = ["age", "workclass", "education", "native-country", "sex", "hours-per-week", "income"]
TINY = SynthConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, steps=3, accountant="rdp")
RARE = 150  # rows with a private value of their own: the DP schema cannot hold them, so fit drops them
FAST = ["--rounds", "6", "--craft-steps", "3", "--design-pool", "4"]
logging.getLogger("absl").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    train = load_adult("train")[COLUMNS].sample(400, random_state=2).reset_index(drop=True)
    rare = train.sample(RARE, random_state=3, replace=True).reset_index(drop=True)
    rare["native-country"] = [f"Atlantis-{i:03d}" for i in range(RARE)]
    test = load_adult("test")[COLUMNS].sample(300, random_state=2).reset_index(drop=True)
    return pd.concat([train, rare], ignore_index=True), test


@pytest.fixture(scope="module")
def files(tables, tmp_path_factory) -> dict[str, Path]:
    """A fit with a DP-inferred schema (no --schema) and one with the public Adult schema, saved; the CSVs."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli-audit")
    train, test = tables
    train.to_csv(root / "train.csv", index=False)
    test.to_csv(root / "test.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a large epsilon, half of it for the schema, so that DP inference works on a few hundred rows
        dp = Synthesizer(None, epsilon=20.0, config=replace(TINY, schema_budget_share=0.5), seed=0).fit(train)
    public_rows = train[~train["native-country"].str.startswith("Atlantis")].reset_index(drop=True)
    public = Synthesizer(adult_schema().select(COLUMNS), epsilon=8.0, config=TINY, seed=0).fit(public_rows)
    public_rows.to_csv(root / "public_train.csv", index=False)
    assert dp.summary.schema_source == "dp" and public.summary.schema_source == "public"
    # the defect's precondition: the fit trained on other rows than the table's (the rare values its DP
    # schema left out are merged into "other" where the column has it; rows it cannot hold are dropped)
    trained = dp.schema.conform(train)
    assert len(trained) < len(train) or not trained["native-country"].astype(str).str.startswith("Atlantis").any()
    (root / "dropped").write_text(str(dp.diagnostics.rows_given - dp.diagnostics.rows_used))
    return {"root": root, "train": root / "train.csv", "test": root / "test.csv",
            "dp": dp.save(root / "dp-model"), "public": public.save(root / "public-model"),
            "public_train": root / "public_train.csv"}


def _row_counts(text: str) -> set[int]:
    """Whole numbers said of rows in `text` ("200 rows", "rows: 200"); other numbers (settings, scores)
    may equal a count by chance."""
    return {int(m) for m in re.findall(r"(?<![\d.])(\d+)(?![\d.])\s+(?:\w+\s+)?rows?\b", text)} | {
        int(m) for m in re.findall(r"\brows?\b\W{0,3}(\d+)(?![\d.])", text)}


# -- 1. the data is prepared as the fit did; nothing private is printed or written --------------------------

def test_audit_runs_on_the_table_a_dp_schema_fit_was_trained_on(files, capsys) -> None:
    out = files["root"] / "audit-dp"
    assert main(["audit", "--model", str(files["dp"]), "--data", str(files["train"]), "--holdout",
                 str(files["test"]), *FAST, "--membership-rows", "100", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    written = (out / "audit.json").read_text()
    result = json.loads(written)
    assert result["partial"] is False and result["audit"]["membership"]["members"] == 100
    assert "rows holding values outside the inferred schema are left out" in captured.err
    assert "a DP count" in captured.err
    # no private value the schema dropped, and not the exact number of rows dropped
    dropped = int((files["root"] / "dropped").read_text())
    for text in (captured.out, captured.err, written):
        assert "Atlantis" not in text
        assert dropped not in _row_counts(text)
    row_fields = [v for path, v in json_fields(result) if "row" in path.lower() or "drop" in path.lower()]
    assert dropped not in row_fields


def test_training_rows_are_the_rows_the_fit_trained_on(files, tables) -> None:
    dp = Synthesizer.load(files["dp"])
    rows = training_rows(dp, tables[0])
    assert len(rows) == len(dp.schema.conform(tables[0]))  # conform only: what fit did without a schema
    assert abs(len(rows) - dp.summary.rows_dp) < 6 * dp.summary.row_count_noise


def test_members_are_capped_by_the_dp_count_not_the_exact_one(files, tables) -> None:
    dp = Synthesizer.load(files["dp"])
    config = AuditConfig(rounds=4, craft_steps=1, design_pool=2, canary="gradient", membership_rows=10**6)
    audit = audit_synthesizer(dp, tables[0], load_adult("test")[COLUMNS].iloc[:2000], config)
    assert audit.membership.members == dp.summary.rows_dp // 2 != len(training_rows(dp, tables[0]))


def test_a_public_schema_model_still_refuses_another_table_without_quoting_it(files, capsys) -> None:
    other = pd.read_csv(files["public_train"])
    other.loc[3, "workclass"] = "Zorblax-Guild"
    other.loc[5, "age"] = 517
    path = files["root"] / "other.csv"
    other.to_csv(path, index=False)
    assert main(["audit", "--model", str(files["public"]), "--data", str(path), *FAST]) == 2
    err = capsys.readouterr().err
    assert "not the table this synthesizer was trained on" in err and "'workclass'" in err
    assert "Zorblax" not in err and "517" not in err


# -- 2. progress per phase, Ctrl-C, defaults ----------------------------------------------------------------

def test_progress_of_every_phase_with_a_time_estimate(files, capsys) -> None:
    assert main(["audit", "--model", str(files["dp"]), "--data", str(files["train"]), "--holdout",
                 str(files["test"]), *FAST, "--membership-rows", "100", "--shadows", "2"]) == 0
    err = capsys.readouterr().err
    for phase in ("crafting the canary", "replaying DP-SGD steps", "membership attack", "LiRA shadow fits"):
        assert f"{phase}: " in err  # announced up front with its size, then as it advances
        assert re.search(rf"{phase}: \d+/\d+, \d+ s, about \d+ s left", err) or f"{phase}: 1/1," in err
        assert re.search(rf"{phase}: (\d+)/\1, \d+ s \(done\)", err)
    assert err.index("crafting the canary: 1/") < err.index("replaying DP-SGD steps: 1/") \
        < err.index("membership attack: 100/") < err.index("LiRA shadow fits: 1/")


def _interrupt_replay_after(monkeypatch, rounds: int) -> None:
    real = synth_audit.replayed_scores

    def stopped(*args, **kwargs):
        scores = real(*args, **kwargs)
        try:
            for i, item in enumerate(scores):
                if i == rounds:
                    raise KeyboardInterrupt
                yield item
        finally:
            scores.close()

    monkeypatch.setattr(synth_audit, "replayed_scores", stopped)


def test_ctrl_c_during_the_replay_writes_the_rounds_so_far_marked_partial(files, capsys, monkeypatch) -> None:
    _interrupt_replay_after(monkeypatch, 5)
    out = files["root"] / "audit-stopped"
    assert main(["audit", "--model", str(files["public"]), "--data", str(files["public_train"]),
                 "--rounds", "40", "--craft-steps", "2", "--design-pool", "4", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"interrupted during replaying DP-SGD steps after 5 of 40 rounds: partial results "
                       f"written to {out / 'audit.json'}")
    assert not any("Traceback" in line for line in err)
    saved = json.loads((out / "audit.json").read_text())
    assert saved["partial"] is True and saved["audit"]["partial"] is True
    audit = saved["audit"]
    assert audit["interrupted_during"] == "replay" and audit["rounds_replayed"] == 5
    assert audit["rounds_planned"] == 40 and audit["canife"]["rounds"] == 5
    assert audit["summary"]["method"] == "CANIFE (input canary, 3+2 replayed steps) (partial: 5 of 40 rounds)"
    assert saved["card"]["audit_method"] == audit["summary"]["method"]
    assert audit["canary_row"] is not None and not (out / "roc_canary.png").exists()


def test_ctrl_c_while_crafting_keeps_what_there_is(files, monkeypatch) -> None:
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth_audit, "craft_canary", stopped)
    public = Synthesizer.load(files["public"])
    with pytest.raises(KeyboardInterrupt) as caught:  # AuditInterrupted is a KeyboardInterrupt
        audit_synthesizer(public, pd.read_csv(files["public_train"]), config=AuditConfig(design_pool=2))
    assert isinstance(caught.value, AuditInterrupted) and caught.value.phase == "canary"
    assert caught.value.partial["rounds_replayed"] == 0 and caught.value.partial["summary"] is None
    assert all(p.grad is None for p in public.model.parameters())


def test_cli_defaults_are_the_library_defaults() -> None:
    args = build_parser().parse_args(["audit", "--model", "m", "--data", "d"])
    config = AuditConfig()
    assert (args.rounds, args.craft_steps, args.design_pool, args.membership_rows, args.shadows) == \
        (config.rounds, config.craft_steps, config.design_pool, config.membership_rows, config.shadows)


def test_default_rounds_follow_the_fits_dp_batch(files) -> None:
    # about REPLAY_BUDGET_ROWS example gradients: 14 rounds for all of Adult (batches of ~8,600 rows)
    assert auto_rounds(8578) == 14 and auto_rounds(3000) == 40 and auto_rounds(931) == 100
    assert auto_rounds(10**6) == AUTO_ROUNDS[0] and auto_rounds(0.5) == AUTO_ROUNDS[1]
    public = Synthesizer.load(files["public"])
    plan = {}

    def progress(phase: str, done: int, total: int) -> None:
        plan.setdefault(phase, total)
        if phase == "replay" and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(AuditInterrupted) as caught:
        audit_synthesizer(public, pd.read_csv(files["public_train"]),
                          config=AuditConfig(canary="gradient", design_pool=2), progress=progress)
    assert plan["replay"] == auto_rounds(public.summary.batch_size) == caught.value.partial["rounds_planned"]
    assert caught.value.partial["rounds_replayed"] == 2 and caught.value.partial["canife"]["rounds"] == 2


def test_the_power_the_default_rounds_buy_as_documented() -> None:
    """The module docstring and --rounds help, at both ends of the default range (ideal canary, 400
    simulated audits, accounted sigma = 2): at 14 rounds the lower end flags only skipped noise; at 100 it
    passes the one-step theory for noise 4x too small, and never for a correct run."""
    rng = np.random.default_rng(0)

    def lows(rounds: int, sigma: float) -> np.ndarray:
        half = rounds // 2
        return np.array([empirical_epsilon(rng.normal(1, sigma, half), rng.normal(0, sigma, half)).low
                         for _ in range(400)])

    few, many = AUTO_ROUNDS
    theory = gaussian_epsilon(2.0, 1.0 / few)
    assert (lows(few, 0.0) > 0).mean() == 1.0
    correct = lows(few, 2.0)
    assert (correct > 0.01).mean() < 0.05 and (correct > theory).mean() == 0.0
    theory = gaussian_epsilon(2.0, 1.0 / many)
    assert (lows(many, 0.25) > theory).mean() >= 0.95
    assert 0.75 < (lows(many, 0.5) > theory).mean() < 0.97
    assert (lows(many, 2.0) > theory).mean() < 0.02
