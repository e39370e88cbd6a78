"""The release for each schema source, on a stand-in synthesizer (no fit): a DP schema's cost and ledger
events are shown, a non-private schema is flagged and excluded from the guarantee's wording, and every key
is registered and shareable."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tramontane.accounting import (
    DpSgdEvent,
    EpsilonDeltaEvent,
    GaussianEvent,
    PrivacyLedger,
    PrivacyStatement,
)
from tramontane.datasets import adult_schema
from tramontane.report.page import key_paths
from tramontane.report.release import FIELDS, OPAQUE, release_report, render_release
from tramontane.synth.synthesizer import FitSummary, SynthConfig

pytest.importorskip("matplotlib")


def _synth(source: str):
    schema = adult_schema().select(["age", "sex", "income"])
    events = [EpsilonDeltaEvent(0.1, 1e-7, label=f"schema inference: column {c!r}") for c in schema.names]
    training = [GaussianEvent(20.0, label="row count"), DpSgdEvent(0.01, 2.5, 50, "synth dp-sgd")]
    ledger = PrivacyLedger((events if source == "dp" else []) + training)
    summary = FitSummary(rows_dp=31990, row_count_noise=20.0, steps=50, batch_size=320, sample_rate=0.01,
                         noise_multiplier=2.5, max_grad_norm=1.0, accountant="rdp", epsilon_rdp=0.9,
                         epsilon_pld=0.8, delta=1e-5, schema_source=source,
                         schema_epsilon=0.3 if source == "dp" else 0.0,
                         schema_delta=3e-7 if source == "dp" else 0.0,
                         schema_notes=["column 'age': used the public range"] if source == "dp" else [])
    model = SimpleNamespace(args=SimpleNamespace(num_parameters=lambda: 1234))
    statement = PrivacyStatement.of(ledger, 1e-5, "rdp", target_epsilon=1.0, dp_sgd=DpSgdEvent(0.01, 2.5, 50))
    return SimpleNamespace(ledger=ledger, epsilon=1.0, delta=1e-5, config=SynthConfig(), schema=schema,
                           summary=summary, model=model, statement=statement)


@pytest.mark.parametrize("source", ["public", "dp", "non-private"])
def test_release_for_each_schema_source(source):
    synth = _synth(source)
    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, c.n_values, 50) for c in synth.schema.columns], axis=1)
    synthetic = synth.schema.frame_from_value_ids(ids)
    report = release_report(synth, synthetic)
    assert key_paths(report, opaque=OPAQUE) <= set(FIELDS)
    assert all(FIELDS[p].status != "holder-only" for p in key_paths(report, opaque=OPAQUE))
    assert report["schema"]["source"] == source and report["synthetic"]["rows"] == 50
    assert report["row_count"]["rows_dp"] == 31990 and report["model"]["parameters"] == 1234
    # the guarantee is the synthesizer's privacy statement, read, not recomputed
    statement = synth.statement
    assert report["privacy"] == statement.to_dict()
    assert report["summary"]["epsilon"] == statement.epsilon_rdp and report["summary"]["delta"] == 1e-5
    assert (report["dp_sgd"]["eta"], report["dp_sgd"]["epsilon_tan"]) == (statement.eta, statement.epsilon_tan)
    page = render_release(report, synthetic, synth.schema)
    text = " ".join(report["summary"]["statements"])
    if source == "dp":
        assert "spending epsilon 0.3 and delta 3e-7" in text
        assert "schema inference: column &#x27;age&#x27;" in page and "used the public range" in page
    elif source == "non-private":
        assert text.count("WARNING") == 1 and "released here but the schema" in text
        assert "<li class='warn'>WARNING" in page and "<b>Warning:</b>" in page
    else:
        assert "given as a public input" in text and "WARNING" not in page
    assert "row count" in page and "synth dp-sgd" in page and "31,990" in page
