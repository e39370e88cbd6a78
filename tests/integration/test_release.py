"""What a fit releases: every written field is in the manifest with a status that holds between
neighbouring tables; no exact row count leaves the data holder; a failed fit keeps what it spent."""

from __future__ import annotations

import csv
import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tramontane import accounting
from tramontane.cli import main
from tramontane.datasets import adult_schema, load_adult
from tramontane.errors import PrivacyParameterError, SchemaError, TramontaneWarning
from tramontane.report.privacy_report import EVALUATION_HTML, EVALUATION_JSON, RELEASE_HTML, RELEASE_JSON
from tramontane.synth import release
from tramontane.synth.release import DP, HOLDER, PUBLIC, manifest
from tramontane.synth.synthesizer import Synthesizer, SynthConfig, dp_row_count

logging.getLogger("absl").setLevel(logging.ERROR)
COLUMNS = ["age", "workclass", "sex", "hours-per-week", "income"]
N_ROWS = 1437  # distinctive, so that an exact count would stand out among the released numbers


def _tiny(steps: int = 3, **kw) -> SynthConfig:
    # RDP unless a test asks otherwise: calibrating under PLD at these large epsilons takes seconds a fit
    kw.setdefault("accountant", "rdp")
    return SynthConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, steps=steps,
                       micro_batch_size=2048, **kw)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return load_adult("train")[COLUMNS].sample(N_ROWS, random_state=1).reset_index(drop=True)


def _adversarial_row() -> dict:
    # A rare category, an out-of-range number, a missing value and a string in a numeric column.
    return {"age": 137, "workclass": "SECRET_OCCUPATION_JDOE", "sex": None, "hours-per-week": "unknown",
            "income": ">50K"}


def _artifact_fields(root: Path, model: Path | None, synthetic: Path | None) -> dict[str, list[tuple[str, object]]]:
    """Every field of the run's files, keyed by manifest artifact name."""
    out: dict[str, list[tuple[str, object]]] = {}
    if model is not None:
        for path in sorted(p for p in model.rglob("*") if p.is_file()):
            name = "model/" + path.relative_to(model).as_posix()
            if path.suffix == ".json":
                out[name] = list(release.json_fields(json.loads(path.read_text())))
            else:
                out[name] = [("", path.read_bytes())]
    if synthetic is not None:
        with open(synthetic, newline="") as f:
            rows = list(csv.reader(f))
        out[release.SYNTHETIC_CSV] = [("header", tuple(rows[0])), ("row_count", len(rows) - 1),
                                      ("rows", tuple(map(tuple, rows[1:])))]
    return out


MANIFEST = manifest()
SHAREABLE = (*release.SHAREABLE_ARTIFACTS, RELEASE_JSON, RELEASE_HTML)


def _check_manifest(fields: dict[str, list[tuple[str, object]]], ledger_labels: list[str]) -> None:
    unlisted, no_event = [], []
    for artifact, items in fields.items():
        for path, _ in items:
            entry = release.lookup(artifact, path, MANIFEST)
            if entry is None:
                unlisted.append(f"{artifact}:{path}")
            elif entry.status == DP:
                # a DP field must come from events that are on this run's ledger
                present = [s for s in entry.source if any(lab.startswith(s) for lab in ledger_labels)]
                if not present:
                    no_event.append(f"{artifact}:{path} (needs {entry.source})")
            elif entry.status == HOLDER:
                assert artifact not in SHAREABLE, f"{artifact}:{path} is holder-only but in a shareable file"
    assert not unlisted, f"fields written but not in tramontane.synth.release.MANIFEST: {unlisted}"
    assert not no_event, f"DP fields without their ledger event: {no_event}"


def test_every_written_field_is_in_the_manifest(table: pd.DataFrame, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "private.csv"
    table.to_csv(data, index=False)
    out = tmp_path / "out"
    code = main(["synth", "--data", str(data), "--epsilon", "20", "--delta", "1e-5", "--steps", "3",
                 "--accountant", "rdp", "--seed", "0", "--out", str(out / "synthetic.csv"), "--save-model", str(out / "model"),
                 "--report", str(out / "report")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    synth = Synthesizer.load(out / "model")
    labels = [e.label for e in synth.ledger.events]
    assert any(lab.startswith(release.SCHEMA_LABEL) for lab in labels)  # no --schema: inferred with DP
    fields = _artifact_fields(out, out / "model", out / "synthetic.csv")
    for path in sorted(p for p in (out / "report").rglob("*") if p.is_file()):
        name = "report/" + path.relative_to(out / "report").as_posix()
        fields[name] = list(release.json_fields(json.loads(path.read_text()))) if path.suffix == ".json" else [("", None)]
    assert set(fields) >= {RELEASE_JSON, RELEASE_HTML, EVALUATION_JSON, EVALUATION_HTML}
    stderr_lines = [line.strip() for line in captured.err.splitlines() if line.strip()]
    fields[release.STDERR] = [(line, None) for line in stderr_lines]
    assert captured.out == ""  # synth prints nothing on stdout
    _check_manifest(fields, labels)
    # Exactly the files the manifest knows, no more.
    expected_files = {a for a in (f.artifact for f in MANIFEST) if a.startswith("model/")}
    assert {a for a in fields if a.startswith("model/")} == expected_files


def test_no_exact_row_count_is_released(table: pd.DataFrame, tmp_path: Path) -> None:
    """N is private (add/remove-one neighbours): only its DP count, and numbers computed from it, appear."""
    rare = table.copy()
    rare.loc[0, "workclass"] = "Only-one-row-has-this"  # the DP schema drops it: exact N - 1 rows used
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        synth = Synthesizer(None, epsilon=20, delta=1e-5, config=_tiny(), seed=0, noise_seed=11).fit(rare)
    assert synth.diagnostics.rows_given == N_ROWS and synth.diagnostics.rows_used < N_ROWS
    assert synth.summary.rows_dp not in (N_ROWS, synth.diagnostics.rows_used)  # this noise draw moved it
    synth.save(tmp_path / "model")
    synthetic = tmp_path / "synthetic.csv"
    synth.sample(synth.summary.rows_dp, seed=0).to_csv(synthetic, index=False)
    exact = {N_ROWS, synth.diagnostics.rows_used}  # (the dropped count, 1, is too common a number to look for)
    for artifact, items in _artifact_fields(tmp_path, tmp_path / "model", synthetic).items():
        for path, value in items:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert value not in exact, f"{artifact}:{path} = {value}"
    # The ledger's q and the expected batch give back the DP count, never N.
    event = next(e for e in synth.ledger.events if e.label == release.DPSGD_LABEL)
    assert round(synth.summary.batch_size / event.sample_rate) == synth.summary.rows_dp
    assert not hasattr(synth.summary, "rows_dropped_by_schema")


def test_the_row_count_is_a_gaussian_mechanism_on_the_ledger(table: pd.DataFrame) -> None:
    draws = np.array([dp_row_count(N_ROWS, 20.0) for _ in range(3000)], dtype=float)
    # Unbiased around N with std 20: mean within 4 standard errors, std within 6% (3000 draws: ~1.3% s.e.).
    assert abs(draws.mean() - N_ROWS) < 4 * 20 / math.sqrt(len(draws))
    assert draws.std(ddof=1) == pytest.approx(20.0, rel=0.06)
    assert len(np.unique(draws)) > 50  # securely seeded: fresh noise every call
    synth = Synthesizer(adult_schema().select(COLUMNS), epsilon=20, delta=1e-5, config=_tiny(steps=1),
                        seed=0).fit(table)
    [count] = [e for e in synth.ledger.events if e.label == release.ROW_COUNT_LABEL]
    assert isinstance(count, accounting.GaussianEvent) and count.noise_multiplier == 20.0 and count.count == 1
    assert abs(synth.summary.rows_dp - N_ROWS) < 6 * 20


def _fit_pair(d: pd.DataFrame, schema, tmp_path: Path, name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        synth = Synthesizer(schema, epsilon=20, delta=1e-5, config=_tiny(), seed=0).fit(d)
    model = tmp_path / name / "model"
    synth.save(model)
    synthetic = tmp_path / name / "synthetic.csv"
    synth.sample(synth.summary.rows_dp, seed=0).to_csv(synthetic, index=False)
    return synth, _artifact_fields(tmp_path / name, model, synthetic)


@pytest.mark.parametrize("schema_given", [False, True], ids=["dp-schema", "public-schema"])
def test_neighbouring_tables_differ_only_in_dp_fields(table: pd.DataFrame, tmp_path: Path,
                                                      schema_given: bool) -> None:
    """Fit on D and on D plus one adversarial row (same seeds for everything but the DP noise): every field
    that differs must be DP with its ledger event on both ledgers; public fields are identical."""
    if schema_given:  # a row the public schema admits, with a rare combination of values
        extra = {"age": 90, "workclass": "Never-worked", "sex": "Female", "hours-per-week": 99,
                 "income": ">50K"}
        schema = adult_schema().select(COLUMNS)
    else:
        extra, schema = _adversarial_row(), None
    neighbour = pd.concat([table, pd.DataFrame([extra])], ignore_index=True)
    synth_d, fields_d = _fit_pair(table, schema, tmp_path, "d")
    synth_n, fields_n = _fit_pair(neighbour, schema, tmp_path, "d-plus-one")
    labels = {e.label for e in synth_d.ledger.events} & {e.label for e in synth_n.ledger.events}
    assert set(fields_d) == set(fields_n)
    differing = []
    for artifact in fields_d:
        a, b = dict(fields_d[artifact]), dict(fields_n[artifact])
        # a key present on one side only differs too, so it must be DP as well (checked below)
        for path in set(a) | set(b):
            if a.get(path) == b.get(path):
                continue
            entry = release.lookup(artifact, path)
            assert entry is not None, f"{artifact}:{path} is not in the manifest"
            assert entry.status != PUBLIC, f"public field {artifact}:{path} differs: {a.get(path)} vs {b.get(path)}"
            assert entry.status == DP and any(lab.startswith(s) for s in entry.source for lab in labels), \
                f"{artifact}:{path} differs without a ledger event covering it"
            differing.append(f"{artifact}:{path}")
    assert f"{release.MODEL_STATE}:summary.rows_dp" in differing or synth_d.summary.rows_dp == synth_n.summary.rows_dp
    assert f"{release.MODEL_WEIGHTS}:" in differing  # the noise differs: the test sees real differences
    if schema_given:
        assert not any(a.startswith(release.MODEL_SCHEMA) for a in differing)


def test_a_failed_fit_keeps_its_spend_and_a_retry_is_charged(table: pd.DataFrame) -> None:
    small = table.iloc[:20].copy()
    small.loc[0, "workclass"] = "SECRET_OCCUPATION_JDOE"
    synth = Synthesizer(None, epsilon=20.0, delta=1e-5, config=_tiny(steps=50), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        with pytest.raises(SchemaError, match="spent epsilon(.|\n)*recorded on this synthesizer's ledger") as err:
            synth.fit(small)  # too few rows for DP schema inference at this budget: fails after spending
    assert "SECRET" not in str(err.value)
    first = [e.label for e in synth.ledger.events]
    assert first and all(lab.startswith(release.SCHEMA_LABEL) for lab in first)
    assert 0 < accounting.epsilon(synth.ledger, 1e-5) < 20.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        synth.fit(table)  # the retry: charged on the same ledger, the whole of it within the budget
    labels = [e.label for e in synth.ledger.events]
    assert labels[:len(first)] == first and labels.count(release.ROW_COUNT_LABEL) == 1
    assert accounting.epsilon(synth.ledger, 1e-5, synth.config.accountant) <= 20.0 * (1 + 1e-9)
    assert synth.summary.epsilon_rdp == pytest.approx(accounting.epsilon(synth.ledger, 1e-5, "rdp"))


def test_a_refusal_after_the_count_keeps_the_count(table: pd.DataFrame) -> None:
    synth = Synthesizer(adult_schema().select(COLUMNS), epsilon=1.0, delta=1e-5, config=_tiny(steps=400),
                        seed=0)
    with pytest.raises(PrivacyParameterError, match="counts"):
        synth.fit(table.iloc[:200])  # the DP count says ~200 rows: batches would be far too small
    assert [e.label for e in synth.ledger.events] == [release.ROW_COUNT_LABEL]
    # Options are checked before anything is read: a bad one spends nothing.
    fresh = Synthesizer(adult_schema().select(COLUMNS), epsilon=1.0, delta=1e-5, config=_tiny(), seed=0)
    with pytest.raises(SchemaError):
        fresh.fit(table.drop(columns=["sex"]))
    assert len(fresh.ledger) == 0


def test_summary_holds_each_accountant_under_its_own_name(table: pd.DataFrame) -> None:
    synth = Synthesizer(adult_schema().select(COLUMNS), epsilon=4, delta=1e-5, config=_tiny(accountant="pld"),
                        seed=0).fit(table)
    s = synth.summary
    assert s.epsilon_rdp == accounting.epsilon(synth.ledger, 1e-5, "rdp")
    assert s.epsilon_pld == accounting.epsilon(synth.ledger, 1e-5, "pld")
    assert s.epsilon_pld < s.epsilon_rdp and s.epsilon_pld <= 4 * (1 + 1e-9)
    assert s.schema_source == "public" and s.schema_epsilon == 0
