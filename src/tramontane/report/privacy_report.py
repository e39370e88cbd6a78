"""The synthesizer's reports: a shareable release and the data holder's evaluation, kept apart.

`write_reports(directory, synth, real_train, synthetic, real_test, target)` writes

    DIR/release/report.json, report.html          shareable with the synthetic table (files 0666 minus the
                                                   umask: 0644 as usual)
    DIR/holder-only/evaluation.json, .html        for the data holder only (directory 0700, files 0600)

so that publishing `release/` cannot leak through the evaluation by accident. The release is built by
`release_report` (`tramontane.report.release`) from the run's privacy statement (`Synthesizer.statement`,
computed once per fit or load: the ledger and its epsilons), `Synthesizer.summary` and `.config`, the
schema, bounds from the statement (`tramontane.audit.card.privacy_card`) and the synthetic table; it never
reads real rows or `Synthesizer.diagnostics`. The evaluation is built by
`holder_evaluation` (`tramontane.report.evaluation`) from the real rows and carries a "do not publish"
notice. Each file is written atomically (`tramontane.files.write_atomic`).

Privacy unit: one row of the training table; neighbouring tables differ by adding or removing one row.
The number of rows N is therefore not public: the release shows only the DP count (`row_count.rows_dp`,
Gaussian noise of std `SynthConfig.row_count_noise`, ledger event "row count"), which set the sampling rate
and the default number of synthetic rows.

JSON key paths (dotted; `[]`: the items of a list). Status: public (a public input or a constant), dp
(computed from the ledger or from DP releases: post-processing), schema (public or dp as `schema.source`
says; non-private when the schema was read off the rows without DP, which the report warns about),
holder-only (computed from real rows: not covered by DP, never in the release). Optional parts of the
evaluation are null, not absent. The registries `RELEASE_FIELDS` and `EVALUATION_FIELDS` hold the same
table with each figure's one-line meaning; `model.config` holds every `SynthConfig` field by name.

release/report.json (format "tramontane.release-report", version 1):

    key path                                      status       source
    format                                        public       constant
    version                                       public       constant
    summary                                       dp           ledger, bounds, DP count, schema
    summary.privacy_unit                          public       constant
    summary.neighbouring_relation                 public       constant
    summary.epsilon                               dp           ledger
    summary.delta                                 public       public input
    summary.statements[]                          dp           bounds from the ledger, DP count, schema
    privacy                                       dp           ledger
    privacy.target_epsilon                        public       public input
    privacy.delta                                 public       public input
    privacy.accountant                            public       public input
    privacy.epsilon_rdp                           dp           ledger
    privacy.epsilon_pld                           dp           ledger
    privacy.ledger                                dp           ledger
    privacy.ledger.format                         public       constant
    privacy.ledger.version                        public       constant
    privacy.ledger.events[]                       dp           ledger
    privacy.ledger.events[].type                  public       ledger
    privacy.ledger.events[].label                 public       ledger
    privacy.ledger.events[].noise_multiplier      dp           ledger
    privacy.ledger.events[].count                 public       ledger
    privacy.ledger.events[].sample_rate           dp           ledger
    privacy.ledger.events[].steps                 dp           ledger
    privacy.ledger.events[].epsilon               public       ledger
    privacy.ledger.events[].delta                 public       ledger
    bounds                                        dp           bound from the ledger
    bounds.mi_advantage_bound                     dp           bound from the ledger
    bounds.mi_advantage_naive_epsilon_delta       dp           bound from the ledger
    bounds.mi_advantage_naive_yeom                dp           bound from the ledger
    bounds.confidence_prior                       public       constant
    bounds.confidence_fpr                         public       constant
    bounds.confidence_bound                       dp           bound from the ledger
    bounds.confidence_naive                       dp           bound from the ledger
    bounds.reconstruction[]                       dp           bound from the ledger
    bounds.reconstruction[].column                schema       schema
    bounds.reconstruction[].values                schema       schema
    bounds.reconstruction[].chance                schema       schema
    bounds.reconstruction[].bound                 dp           bound from the ledger
    row_count                                     dp           DP count
    row_count.rows_dp                             dp           DP count
    row_count.noise_std                           public       public input
    row_count.ledger_label                        public       constant
    dp_sgd                                        dp           ledger
    dp_sgd.steps                                  dp           ledger
    dp_sgd.sample_rate                            dp           ledger
    dp_sgd.noise_multiplier                       dp           ledger
    dp_sgd.max_grad_norm                          public       public input
    dp_sgd.expected_batch_size                    dp           DP count
    dp_sgd.eta                                    dp           computed from the ledger
    dp_sgd.total_amount_of_noise                  dp           computed from the ledger
    dp_sgd.epsilon_tan                            dp           computed from the ledger
    schema                                        schema       schema
    schema.source                                 public       schema
    schema.epsilon                                public       ledger
    schema.delta                                  public       ledger
    schema.provenance                             schema       schema
    schema.notes[]                                schema       schema
    schema.columns[]                              schema       schema
    schema.columns[].name                         schema       schema
    schema.columns[].kind                         schema       schema
    schema.columns[].n_values                     schema       schema
    schema.columns[].missing                      schema       schema
    schema.columns[].categories[]                 schema       schema
    schema.columns[].lo                           schema       schema
    schema.columns[].hi                           schema       schema
    synthetic                                     dp           synthetic table
    synthetic.rows                                dp           synthetic table
    synthetic.columns[]                           public       synthetic table
    model                                         public       public input
    model.parameters                              public       public input
    model.config                                  public       public input

holder-only/evaluation.json (format "tramontane.holder-evaluation", version 1):

    key path                                      status       source
    format                                        public       constant
    version                                       public       constant
    notice                                        public       constant
    utility                                       holder-only  real rows and synthetic table
    utility.rows_real                             holder-only  real training rows
    utility.rows_real_test                        holder-only  real held-out rows
    utility.rows_synthetic                        holder-only  synthetic table
    utility.tvd                                   holder-only  real rows and synthetic table
    utility.tvd.1-way                             holder-only  real rows and synthetic table
    utility.tvd.2-way                             holder-only  real rows and synthetic table
    utility.tvd.3-way                             holder-only  real rows and synthetic table
    utility.tvd_real_test_vs_train                holder-only  real held-out rows
    utility.tvd_real_test_vs_train.1-way          holder-only  real held-out rows
    utility.tvd_real_test_vs_train.2-way          holder-only  real held-out rows
    utility.tvd_real_test_vs_train.3-way          holder-only  real held-out rows
    utility.exact_match_share                     holder-only  real rows and synthetic table
    utility.exact_match_share_real_test           holder-only  real held-out rows
    utility.mean_abs_cramers_v_difference         holder-only  real rows and synthetic table
    utility.heldout_nll_per_row                   holder-only  real held-out rows
    utility.heldout_nll_per_row.nll_per_row       holder-only  real held-out rows
    utility.heldout_nll_per_row.stderr            holder-only  real held-out rows
    utility.heldout_nll_per_row.nll_per_row_bits  holder-only  real held-out rows
    utility.heldout_nll_per_row.n                 holder-only  real held-out rows
    utility.ml_efficacy                           holder-only  real rows and synthetic table
    utility.ml_efficacy.target                    holder-only  public input
    utility.ml_efficacy.positive                  holder-only  public input
    utility.ml_efficacy.majority_accuracy         holder-only  real held-out rows
    utility.ml_efficacy.n_train                   holder-only  real training rows
    utility.ml_efficacy.n_synthetic               holder-only  synthetic table
    utility.ml_efficacy.n_test                    holder-only  real held-out rows
    utility.ml_efficacy.scores[]                  holder-only  real rows and synthetic table
    utility.ml_efficacy.scores[].model            holder-only  constant
    utility.ml_efficacy.scores[].trained_on       holder-only  constant
    utility.ml_efficacy.scores[].accuracy         holder-only  real held-out rows
    utility.ml_efficacy.scores[].roc_auc          holder-only  real held-out rows
    training                                      holder-only  fit diagnostics (real rows)
    training.rows_given                           holder-only  fit diagnostics (real rows)
    training.rows_used                            holder-only  fit diagnostics (real rows)
    training.seconds                              holder-only  fit diagnostics (real rows)
    training.heldout_curve[]                      holder-only  real held-out rows
    training.heldout_curve[].step                 holder-only  constant
    training.heldout_curve[].eval_loss            holder-only  real held-out rows
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tramontane.files import HOLDER_MODE, SHAREABLE_MODE, write_atomic
from tramontane.manifest import DP, HOLDER, PUBLIC, ReleasedField
from tramontane.report.evaluation import EVALUATION_FIELDS, holder_evaluation, render_evaluation
from tramontane.report.release import OPAQUE, RELEASE_FIELDS, release_report, render_release

__all__ = ["EVALUATION_FIELDS", "HOLDER_DIR", "RELEASE_DIR", "RELEASE_FIELDS", "ReportPaths",
           "holder_evaluation", "release_report", "write_reports"]

RELEASE_DIR = "release"
HOLDER_DIR = "holder-only"


@dataclass(frozen=True)
class ReportPaths:
    """Where `write_reports` wrote; the evaluation's paths are None when no real table was given."""

    release_json: Path
    release_html: Path
    evaluation_json: Path | None = None
    evaluation_html: Path | None = None


def write_reports(directory: str | Path, synth: Any, real_train: pd.DataFrame | None, synthetic: pd.DataFrame,
                  real_test: pd.DataFrame | None = None, target: str | None = None) -> ReportPaths:
    """Write the shareable release and, with `real_train`, the data holder's evaluation under `directory`.

    Args:
        synth: a fitted `Synthesizer` (or one from `Synthesizer.load`, whose evaluation then has no fit
            diagnostics).
        real_train: the real training rows, for the evaluation only; None writes the release alone.
        synthetic: the synthetic table released with the report.
        real_test: held-out real rows (reference figures, held-out NLL, ML efficacy with `target`).
    Both reports are built before anything is written; each file is replaced atomically.
    """
    directory = Path(directory)
    release = release_report(synth, synthetic)
    release_html = render_release(release, synthetic, synth.schema)
    evaluation = evaluation_html = None
    if real_train is not None:
        evaluation = holder_evaluation(synth, real_train, synthetic, real_test, target)
        evaluation_html = render_evaluation(evaluation, real_train, synthetic, synth.schema, real_test)

    out = directory / RELEASE_DIR
    out.mkdir(parents=True, exist_ok=True)
    paths = {"release_json": out / "report.json", "release_html": out / "report.html"}
    write_atomic(paths["release_json"], _json(release), SHAREABLE_MODE)
    write_atomic(paths["release_html"], release_html, SHAREABLE_MODE)
    if evaluation is not None:
        assert evaluation_html is not None
        holder = directory / HOLDER_DIR
        holder.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths["evaluation_json"] = holder / "evaluation.json"
        paths["evaluation_html"] = holder / "evaluation.html"
        write_atomic(paths["evaluation_json"], _json(evaluation), HOLDER_MODE)
        write_atomic(paths["evaluation_html"], evaluation_html, HOLDER_MODE)
    return ReportPaths(**paths)


RELEASE_JSON = f"report/{RELEASE_DIR}/report.json"
RELEASE_HTML = f"report/{RELEASE_DIR}/report.html"
EVALUATION_JSON = f"report/{HOLDER_DIR}/evaluation.json"
EVALUATION_HTML = f"report/{HOLDER_DIR}/evaluation.html"


def _as_released(artifact: str, field: Any, schema_source: tuple[str, ...], count_source: tuple[str, ...],
                 ledger_source: tuple[str, ...], opaque: tuple[str, ...] = ()) -> list[ReleasedField]:
    """A report `Field` in the manifest's terms: DP fields name the ledger events they may come from."""
    source: tuple[str, ...]
    if field.status in ("public", "holder-only"):
        status, source = (PUBLIC if field.status == "public" else HOLDER), ()
    elif field.status == "schema":  # DP when inferred; a given schema is public (identical across neighbours)
        status, source = DP, schema_source
    elif field.source == "DP count":
        status, source = DP, count_source
    else:  # the ledger, bounds from it, the synthetic table: any of the run's mechanisms
        status, source = DP, ledger_source
    paths = [field.path] + ([field.path + ".*"] if field.path in opaque else [])
    return [ReleasedField(artifact, path, status, source, field.meaning) for path in paths]


def report_fields(*, schema_source: tuple[str, ...], count_source: tuple[str, ...],
                  ledger_source: tuple[str, ...]) -> tuple[ReleasedField, ...]:
    """Every field of both reports (`RELEASE_FIELDS`, `EVALUATION_FIELDS`, and the two pages) in the terms of a
    release manifest (`tramontane.manifest`), under the artifact names of a `--report report` folder. The
    caller names the ledger labels its DP fields come from: the schema's inference, the DP row count, and
    any of the run's mechanisms (`tramontane.synth.release.manifest` adds them to the synthesizer's own)."""
    sources = {"schema_source": schema_source, "count_source": count_source, "ledger_source": ledger_source}
    out = []
    for field in RELEASE_FIELDS:
        out += _as_released(RELEASE_JSON, field, **sources, opaque=OPAQUE)
    for field in EVALUATION_FIELDS:
        out += _as_released(EVALUATION_JSON, field, **sources)
    out.append(ReleasedField(RELEASE_HTML, "", DP, ledger_source,
                             "the release's JSON and the synthetic table's plots, as a page"))
    out.append(ReleasedField(EVALUATION_HTML, "", HOLDER, (),
                             "the evaluation's JSON and real-vs-synthetic plots, as a page"))
    return tuple(out)


def _json(data: Any) -> str:
    return json.dumps(_plain(data), indent=1, allow_nan=False) + "\n"


def _plain(value: Any) -> Any:
    """JSON-able: numpy scalars as Python numbers, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
