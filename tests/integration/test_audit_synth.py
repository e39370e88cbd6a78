"""End to end: a tiny DP synthesizer on Adult rows, audited (CANIFE, membership inference), card, CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tramontane import accounting
from tramontane.audit.bounds import mi_advantage_bound
from tramontane.audit.card import ledger_bounds, privacy_card, read_ledger
from tramontane.audit.synth_audit import (
    AuditConfig,
    SynthAudit,
    audit_synthesizer,
    random_rows,
    secret_exposure,
    soft_row_loss,
    value_token_table,
)
from tramontane.cli import main
from tramontane.datasets import adult_schema, load_adult
from tramontane.synth.synthesizer import RowObjective, SynthConfig, Synthesizer

COLUMNS = ["age", "workclass", "education", "marital-status", "relationship", "sex", "hours-per-week",
           "income"]
logging.getLogger("absl").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame]:
    train = load_adult("train")[COLUMNS].sample(800, random_state=1).reset_index(drop=True)
    test = load_adult("test")[COLUMNS].sample(800, random_state=1).reset_index(drop=True)
    return train, test


@pytest.fixture(scope="module")
def fitted(data) -> Synthesizer:
    torch.set_num_threads(1)
    # DP-SGD alone (no measured marginals): the audit replays its steps and compares with its epsilon
    config = SynthConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, steps=12, lr=1e-2,
                         marginal_share=0.0, warmup_steps=2, noise_multiplier_target=2.0, max_batch_fraction=0.1,
                         micro_batch_size=512, accountant="rdp")  # the audit and the card compare RDP figures
    synth = Synthesizer(adult_schema().select(COLUMNS), epsilon=4.0, delta=1e-5, config=config, seed=0)
    return synth.fit(data[0])


@pytest.fixture(scope="module")
def audit(fitted: Synthesizer, data) -> SynthAudit:
    config = AuditConfig(rounds=60, design_pool=12, craft_steps=15, membership_rows=400, seed=0)
    return audit_synthesizer(fitted, data[0], data[1], config)


def test_soft_row_loss_is_the_training_loss_on_one_hot_rows(fitted: Synthesizer, data) -> None:
    codec, model = fitted.codec, fitted.model
    vids = fitted.schema.value_ids(fitted.schema.conform(data[0].iloc[:3]))
    # the synthesizer's own objective, in schema order and without augmentations: one sequence per row
    one_order = dataclasses.replace(fitted.config, permute_columns=False, augmentations=1)
    objective = RowObjective(codec, vids, one_order, np.random.default_rng(0))
    _, mask = value_token_table(codec)
    loss = soft_row_loss(model, codec)
    with torch.no_grad():
        for i in range(3):
            weights = torch.zeros(mask.shape)
            weights[torch.arange(len(COLUMNS)), torch.as_tensor(vids[i])] = 1.0
            expected = objective.losses(model, objective.rows([i])[0])
            assert float(loss(weights)) == pytest.approx(float(expected), rel=1e-5)


def test_end_to_end_audit_reports_empirical_and_theoretical_epsilon(fitted: Synthesizer,
                                                                     audit: SynthAudit) -> None:
    # The audit replays the DP-SGD steps: its theory is theirs alone, a little under the whole ledger's
    # (which also holds the DP row count).
    steps = [e for e in fitted.ledger.events if isinstance(e, accounting.DpSgdEvent)]
    theory = accounting.epsilon(steps, 1e-5)
    assert audit.theoretical_epsilon == pytest.approx(theory)
    assert theory < accounting.epsilon(fitted.ledger, 1e-5) == pytest.approx(4.0, rel=1e-3)
    step = audit.step
    assert step.noise_multiplier == fitted.summary.noise_multiplier
    assert step.sample_rate == fitted.summary.sample_rate
    # the crafted row is visible in the replayed steps, the noise is there
    assert step.signal > 0.3
    assert step.scores_without.std() > 0.7 * step.noise_multiplier
    assert math.isfinite(step.estimate.epsilon)
    assert step.estimate.low <= step.theoretical_epsilon_at_estimator_delta
    # over the run: an interval whose lower end stays below the accountant, and the ratios the report shows
    assert 0 <= audit.composed.low < theory
    assert audit.ratio_low > 1.0 and math.isfinite(audit.ratio) and audit.ratio > 0
    assert audit.canary_health is not None and audit.canary_row is not None
    assert 0 < audit.canary_expected_signal <= 1 + 1e-6  # column permutations spread the row's gradient
    assert set(audit.canary_row) == set(COLUMNS)
    # membership inference on a DP model: not far from chance, and below the MI bound (+ sampling slack)
    mi = audit.membership
    assert mi is not None and 0.35 < mi.auc < 0.7
    assert mi.advantage <= mi_advantage_bound(fitted.ledger, pld_discretization=1e-3) + 0.15
    json.dumps(audit.to_dict())


def test_report_card_shows_bounds_and_the_audit(fitted: Synthesizer, audit: SynthAudit) -> None:
    card = privacy_card(fitted.ledger, fitted.delta, fitted.schema, audit, pld_discretization=1e-3)
    json.dumps(card)
    assert card["audit_theoretical_epsilon"] == pytest.approx(4.0, rel=1e-2)  # DP-SGD alone, no row count
    low, point, high = (card[f"audit_empirical_epsilon{k}"] for k in ("_low", "", "_high"))
    assert low <= point <= high
    assert card["reconstruction_bound[sex] (M=2)"] >= card["reconstruction_bound[age] (M=74)"] >= 1 / 74
    assert card["mi_advantage_bound"] < card["mi_advantage_naive_epsilon_delta"]


def test_secret_exposure_ranks_every_value_of_a_column(fitted: Synthesizer) -> None:
    canaries = random_rows(fitted.schema, 5, np.random.default_rng(0))
    exp = secret_exposure(fitted, canaries, "education")
    assert exp.num_values == 16 and exp.ranks.shape == (5,)
    assert ((1 <= exp.ranks) & (exp.ranks <= 16)).all()
    assert np.allclose(exp.exposure, np.log2(16) - np.log2(exp.ranks))


def test_cli_bounds(capsys, fitted: Synthesizer, tmp_path: Path) -> None:
    assert main(["bounds", "--sample-rate", "1", "--noise-multiplier", "1.0811618", "--steps", "1",
                 "--values", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon_pld"] == pytest.approx(4.0, abs=1e-3)
    assert out["mi_advantage_bound"] == pytest.approx(0.356, abs=1e-3)  # the Gaussian mechanism at (4, 1e-5)
    assert 0.1 < out["reconstruction_bound"] < 1 and out["num_values"] == 10
    path = fitted.save(tmp_path / "synth")
    assert main(["bounds", "--ledger", str(path), "--json"]) == 0
    from_dir = json.loads(capsys.readouterr().out)
    expected = ledger_bounds(fitted.ledger, fitted.delta)
    assert from_dir["mi_advantage_bound"] == pytest.approx(expected["mi_advantage_bound"])
    assert from_dir["delta"] == fitted.delta and "reconstruction_bound" not in from_dir
    (tmp_path / "ledger.json").write_text(json.dumps(fitted.ledger.to_dict()))
    assert read_ledger(tmp_path / "ledger.json") == (fitted.ledger, None)
    assert main(["bounds", "--sample-rate", "0.1"]) == 2  # incomplete setting
    assert "error" in capsys.readouterr().err


def test_cli_audit_writes_the_report_files(capsys, fitted: Synthesizer, data, tmp_path: Path) -> None:
    path = fitted.save(tmp_path / "synth")
    train_csv, test_csv = tmp_path / "train.csv", tmp_path / "test.csv"
    data[0].to_csv(train_csv, index=False)
    data[1].to_csv(test_csv, index=False)
    out = tmp_path / "audit"
    assert main(["audit", "--model", str(path), "--data", str(train_csv), "--holdout", str(test_csv),
                 "--rounds", "8", "--craft-steps", "2", "--design-pool", "4", "--membership-rows", "100",
                 "--canary", "gradient", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["card"]["audit_method"].startswith("CANIFE (gradient canary, 4+4")
    assert result["audit"]["membership"]["members"] == 100
    for name in ("audit.json", "roc_canary.png", "roc_membership.png", "bounds.png"):
        assert (out / name).stat().st_size > 0
