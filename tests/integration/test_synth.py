"""The DP synthesizer end to end on a subsample of Adult: utility windows, budget, persistence, bad input."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tramontane import accounting
from tramontane.cli import main
from tramontane.datasets import adult_schema, load_adult
from tramontane.errors import DataError, PrivacyParameterError, SchemaError
from tramontane.report.metrics import exact_match_rate, independent_marginals_baseline, marginal_tvd
from tramontane.synth.synthesizer import MIN_BATCH, RowObjective, Synthesizer, SynthConfig

COLUMNS = ["age", "workclass", "education", "marital-status", "relationship", "sex", "hours-per-week", "income"]
logging.getLogger("absl").setLevel(logging.ERROR)


def _small_config(steps: int = 40) -> SynthConfig:
    return SynthConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, steps=steps, lr=1e-2,
                       warmup_steps=3, noise_multiplier_target=2.0, micro_batch_size=512,
                       accountant="rdp")  # PLD calibration has its own tests; at epsilon 8 it takes seconds


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame]:
    train = load_adult("train")[COLUMNS].sample(4000, random_state=0).reset_index(drop=True)
    test = load_adult("test")[COLUMNS].sample(2000, random_state=0).reset_index(drop=True)
    return train, test


@pytest.fixture(scope="module")
def fitted(data) -> Synthesizer:
    train, _ = data
    schema = adult_schema().select(COLUMNS)
    return Synthesizer(schema, epsilon=8.0, delta=1e-5, config=_small_config(), seed=0).fit(train)


def test_dp_model_beats_independent_marginals_and_does_not_copy(fitted: Synthesizer, data) -> None:
    train, test = data
    schema = fitted.schema
    synthetic = fitted.sample(len(train), seed=1)
    ours = marginal_tvd(train, synthetic, schema=schema).mean
    independent = marginal_tvd(train, independent_marginals_baseline(train, schema, len(train),
                                                                     np.random.default_rng(0)), schema=schema).mean
    held_out = marginal_tvd(train, test, schema=schema).mean
    # Learned: better pairwise structure than independent columns (which ignore every correlation).
    assert ours[2] < independent[2]
    # Not "too good": a DP model cannot fit the training table much closer than fresh data from the same
    # population does (noise silently skipped or the training rows leaking would break this).
    assert ours[2] > 0.8 * held_out[2]
    copies = exact_match_rate(synthetic, train, schema)
    assert copies < exact_match_rate(test, train, schema) + 0.05


def test_the_default_fills_an_example_with_column_orders_and_the_saved_config_says_how_many(
        fitted: Synthesizer, data, tmp_path: Path) -> None:
    """`augmentations=None`: K = 30 value tokens // columns orders per row, never more than the d! orders
    there are; the fit trains on K sequences per row and saves the K it used."""
    assert SynthConfig().augmentations is None
    assert [SynthConfig().orders_per_row(d) for d in (1, 2, 3, 7, 8, 15, 40)] == [1, 2, 6, 4, 3, 2, 1]
    assert SynthConfig(augmentations=5).orders_per_row(15) == 5
    assert fitted.config.augmentations == 3  # 8 columns
    objective = RowObjective(fitted.codec, fitted.schema.value_ids(data[0].head(4)), SynthConfig(),
                             np.random.default_rng(0))
    batch, example_ids = objective.rows([0, 1, 2])
    assert batch.tokens.shape[0] == 9 and example_ids is not None
    assert example_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    fitted.save(tmp_path / "model")
    assert Synthesizer.load(tmp_path / "model").config.augmentations == 3


def test_every_row_is_valid_and_seeds_reproduce(fitted: Synthesizer) -> None:
    a = fitted.sample(300, seed=5)
    fitted.schema.validate(a)
    assert list(a.columns) == COLUMNS
    pd.testing.assert_frame_equal(a, fitted.sample(300, seed=5))
    assert not a.equals(fitted.sample(300, seed=6))


def test_ledger_spends_exactly_the_budget_and_survives_save_load(fitted: Synthesizer, tmp_path: Path) -> None:
    count, steps, measured, chosen = fitted.ledger.events  # row count, DP-SGD, the marginals, their choice
    assert isinstance(count, accounting.GaussianEvent) and count.label == "row count"
    assert isinstance(steps, accounting.DpSgdEvent) and steps.steps == 40
    assert [measured, chosen] == fitted.marginals.events()
    assert measured.label == "marginals" and chosen.label == "marginal selection"
    assert measured.count == len(fitted.marginals.queries) == fitted.summary.marginal_queries
    assert chosen.count == fitted.summary.marginal_rounds == fitted.config.marginal_rounds > 0
    # the budget is met exactly under the accountant that calibrated the noise (PLD by default); the
    # looser RDP bound of the same ledger lies above it
    eps = accounting.epsilon(fitted.ledger, 1e-5, fitted.config.accountant)
    assert eps <= 8.0 and eps == pytest.approx(8.0, rel=1e-3)
    assert fitted.config.accountant != "pld" or accounting.epsilon(fitted.ledger, 1e-5, "rdp") > eps
    path = fitted.save(tmp_path / "synth")
    loaded = Synthesizer.load(path)
    assert loaded.ledger == fitted.ledger
    pd.testing.assert_frame_equal(loaded.sample(200, seed=9), fitted.sample(200, seed=9))


def test_a_separate_one_way_noise_is_two_gaussian_events_that_still_spend_exactly_the_budget(data,
                                                                                         tmp_path: Path) -> None:
    train, _ = data
    schema = adult_schema().select(COLUMNS)
    config = dataclasses.replace(_small_config(steps=3), one_way_weight=4.0, marginal_rounds=3)
    synth = Synthesizer(schema, epsilon=4.0, delta=1e-5, config=config, seed=0).fit(train)
    one_way, chosen, selection = synth.ledger.events[2:]
    assert [one_way, chosen, selection] == synth.marginals.events()
    assert (one_way.count, chosen.count, selection.count) == (len(COLUMNS), 3, 3)
    # each 1-way measurement bought at 4 times a chosen one's zCDP cost: half its noise std
    assert one_way.noise_multiplier == pytest.approx(chosen.noise_multiplier / 2, rel=1e-12)
    assert synth.summary.marginal_one_way_sigma == one_way.noise_multiplier
    eps = accounting.epsilon(synth.ledger, 1e-5, synth.config.accountant)
    assert eps <= 4.0 and eps == pytest.approx(4.0, rel=1e-3)
    loaded = Synthesizer.load(synth.save(tmp_path / "synth"))
    assert loaded.ledger == synth.ledger and loaded.marginals.events() == synth.marginals.events()


def test_dp_schema_inference_is_charged_to_the_ledger(data) -> None:
    train, _ = data
    synth = Synthesizer(None, epsilon=4.0, delta=1e-5, config=_small_config(steps=3), seed=0)
    synth.fit(train[["workclass", "sex", "income"]])
    inference = [e for e in synth.ledger.events if e.label.startswith("schema inference")]
    # the Gaussian mechanisms as one Gaussian event (composed by the accountant), their thresholds' delta
    assert [type(e) for e in inference] == [accounting.GaussianEvent, accounting.EpsilonDeltaEvent]
    assert inference[1].epsilon == 0 and 0 < inference[1].delta < 1e-5
    assert synth.summary.schema_source == "dp" and 0 < synth.summary.schema_epsilon < 4.0
    assert accounting.epsilon(synth.ledger, 1e-5, synth.config.accountant) <= 4.0 * (1 + 1e-6)


def test_bad_input_is_refused_with_clear_errors(data, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, _ = data
    schema = adult_schema().select(COLUMNS)
    with pytest.raises(SchemaError, match="color"):
        Synthesizer(schema, 3.0).fit(train.assign(color="red"))
    with pytest.raises(SchemaError, match="income"):
        Synthesizer(schema, 3.0).fit(train.drop(columns=["income"]))
    with pytest.raises(SchemaError, match="workclass"):
        Synthesizer(schema, 3.0).fit(train.assign(workclass="Astronaut"))
    with pytest.raises(DataError, match="empty"):
        Synthesizer(schema, 3.0).fit(train.iloc[:0])
    with pytest.raises(SchemaError, match="distinct"):
        Synthesizer(None, 3.0).fit(pd.DataFrame({"id": [f"user{i}" for i in range(100_000)]}))
    with pytest.raises(PrivacyParameterError):
        Synthesizer(schema, 1e-7, config=_small_config()).fit(train)

    # Through the CLI: nothing half-written.
    out = tmp_path / "synthetic.csv"
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("workclass,sex\nPrivé,Male\n".encode("latin-1"))
    for data_file in (empty, latin, tmp_path / "missing.csv"):
        assert main(["synth", "--data", str(data_file), "--epsilon", "3", "--out", str(out)]) == 2
        assert "error:" in capsys.readouterr().err
    assert not out.exists()


def test_the_batch_cap_never_goes_below_the_smallest_batch_that_learns() -> None:
    """A small table at a large epsilon: 1.7% of 300 rows is 5 rows, but the cap keeps MIN_BATCH (8)."""
    schema = adult_schema().select(COLUMNS)
    synth = Synthesizer(schema, epsilon=50.0, delta=1e-3, config=_small_config(steps=10), seed=0)
    batch, q, _ = synth._plan_batch(300, 50.0, 1e-3)
    assert 0.017 * 300 < MIN_BATCH == batch and q == batch / 300
