"""What a synthesizer run writes, field by field, and why each field may be released.

Every field a fit writes (the saved model directory, the synthetic CSV, the report files, the lines on
stderr) has one status:
- `DP`: a function of the private rows only through mechanisms on the ledger; `source` names the ledger
  event labels (prefixes) it depends on, which must be on the run's ledger;
- `PUBLIC`: a function of public inputs only (the command line, the configuration, a given schema, the
  code's constants); identical for any two neighbouring tables;
- `HOLDER`: computed from real rows without DP, for the data holder only. Such fields live only in
  artifacts whose name says so (`holder-only/...`, the terminal) and never in the shareable release.

Privacy unit: one row of the training table; neighbouring tables differ by adding or removing one row.
The number of rows N is therefore private: it is released only as a DP count (ledger event "row count"),
which sets the sampling rate, the expected batch and the default number of synthetic rows.

The reports register their JSON keys beside their code (`tramontane.report.release.RELEASE_FIELDS`,
`tramontane.report.evaluation.EVALUATION_FIELDS`) and give them in manifest terms
(`tramontane.report.privacy_report.report_fields`); `manifest()` here is the whole list, this module's
entries and theirs. The vocabulary (`ReleasedField`, the statuses) lives in `tramontane.manifest`, below
both. It is checked against real outputs by
`tests/integration/test_release.py`: a field missing from it, a `PUBLIC` field that differs between
neighbouring tables, or a `DP` field whose ledger event is absent fails the suite.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from typing import Any

from tramontane.manifest import DP, HOLDER, PUBLIC, ReleasedField, released_fields
from tramontane.report.privacy_report import report_fields

PRIVACY_UNIT = "one row of the training table"
NEIGHBOURING = "add or remove one row"
ROW_COUNT_LABEL = "row count"
DPSGD_LABEL = "synth dp-sgd"
SCHEMA_LABEL = "schema inference"
MARGINALS_LABEL = "marginals"  # tramontane.synth.marginals.MARGINALS_LABEL
SELECTION_LABEL = "marginal selection"  # tramontane.synth.marginals.SELECTION_LABEL

# Artifacts (paths relative to the output they belong to). Shareable unless marked holder-only.
MODEL_STATE = "model/synthesizer.json"
MODEL_SCHEMA = "model/schema.json"
MODEL_PARAMS = "model/model/params.json"
MODEL_WEIGHTS = "model/model/consolidated.safetensors"
MODEL_MARGINALS = "model/marginals.json"
SYNTHETIC_CSV = "synthetic.csv"
SCHEMA_DRAFT = "draft-schema.json"  # `tramontane schema init --out`: from the header and the command line only
STDERR = "stderr"  # the terminal of whoever runs the command: the data holder

SHAREABLE_ARTIFACTS = (MODEL_STATE, MODEL_SCHEMA, MODEL_PARAMS, MODEL_WEIGHTS, MODEL_MARGINALS, SYNTHETIC_CSV)


_COUNT = (ROW_COUNT_LABEL,)
_SCHEMA = (SCHEMA_LABEL,)  # public (and then identical) when the schema is given
_TRAINED = (SCHEMA_LABEL, ROW_COUNT_LABEL, DPSGD_LABEL)
_CHOSEN = (*_TRAINED, MARGINALS_LABEL, SELECTION_LABEL)  # each round's choice follows what was measured
_MEASURED = _CHOSEN  # the marginals: grouped from model samples, chosen and measured with noise

MANIFEST: tuple[ReleasedField, ...] = tuple([
    # -- the saved synthesizer ---------------------------------------------------------------------------
    *released_fields(MODEL_STATE, PUBLIC, (), {
        "format": "file format name", "version": "file format version",
        "epsilon": "the target epsilon (an input)", "delta": "the target delta (an input)",
        "config.*": "model and training configuration (inputs)",
        "seed": "seed of initialisation, column orders and sampling (an input; the DP noise is not seeded)",
        "ledger.format": "ledger format name", "ledger.version": "ledger format version",
        "ledger.events[].type": "kind of each privacy event", "ledger.events[].label": "what each event is",
        "ledger.events[].steps": "number of DP-SGD steps (an input)",
        "ledger.events[].count": "number of releases of a Gaussian event, of selections of an exponential "
                                 "mechanism event (configuration)",
        "summary.row_count_noise": "std of the noise on the row count (configuration)",
        "summary.steps": "DP-SGD steps taken", "summary.max_grad_norm": "clipping norm C (configuration)",
        "summary.accountant": "accountant the noise was calibrated with", "summary.delta": "target delta",
        "summary.schema_source": "whether the schema was given, inferred with DP, or read without DP",
    }),
    *released_fields(MODEL_STATE, DP, _COUNT, {
        "ledger.events[].sample_rate": "Poisson rate q = expected batch / DP row count",
        "ledger.events[].noise_multiplier": "sigma of each Gaussian event: DP-SGD's calibrated for q; the row "
                                            "count's and the schema inference's set by the budget (inputs)",
        "summary.rows_dp": "the DP count of the training rows",
        "summary.batch_size": "expected batch, a share of the DP row count",
        "summary.sample_rate": "q", "summary.noise_multiplier": "sigma, calibrated for q",
        "summary.epsilon_rdp": "the ledger's epsilon (RDP)", "summary.epsilon_pld": "the ledger's epsilon (PLD)",
    }),
    *released_fields(MODEL_STATE, DP, _SCHEMA, {
        "summary.schema_notes[]": "what DP schema inference fell back on, and per column its kind, how many "
                                  "categories or bins passed, whether 'other' and missing exist, its budget",
        # shares of the budget; how delta is split follows the column kinds, which are decided with DP
        "ledger.events[].epsilon": "epsilon of a schema-inference step or of each marginal selection", "ledger.events[].delta": "its delta "
                                   "(the thresholds of the category sets)",
        "summary.schema_epsilon": "epsilon spent on the schema (its marginal cost within the run)",
        "summary.schema_delta": "delta spent on it",
    }),
    *released_fields(MODEL_SCHEMA, DP, _SCHEMA, {
        "*": "the schema: inferred with DP, or given (then public)"}),
    *released_fields(MODEL_PARAMS, DP, _SCHEMA, {
        "*": "model shape (configuration) and vocabulary size (schema)"}),
    *released_fields(MODEL_WEIGHTS, DP, _TRAINED, {"": "the DP-SGD-trained weights"}),
    *released_fields(MODEL_STATE, PUBLIC, (), {
        "summary.marginal_queries": "how many marginals were measured (the column count and marginal_rounds: "
                                    "configuration)",
        "summary.marginal_rounds": "how many were chosen by the exponential mechanism (configuration)"}),
    *released_fields(MODEL_STATE, DP, _SCHEMA, {
        "summary.marginal_sigma": "noise std of every 2- or 3-way marginal cell, set by the budget share "
                                  "(inputs) and the column count (schema)",
        "summary.marginal_one_way_sigma": "noise std of every 1-way marginal cell (0: marginal_sigma), set "
                                          "the same way"}),
    *released_fields(MODEL_MARGINALS, PUBLIC, (), {
        "rounds": "how many marginals were chosen by the exponential mechanism (configuration)"}),
    *released_fields(MODEL_MARGINALS, DP, _SCHEMA, {
        "sigma": "noise std of every 2- or 3-way cell (set by the budget share and the column count)",
        "sigma_1": "noise std of every 1-way cell (0: sigma), set the same way",
        "selection_epsilon": "epsilon of each choice (set by the budget share and the column count)"}),
    *released_fields(MODEL_MARGINALS, DP, _CHOSEN, {
        "queries[][]": "which columns and pairs were measured (each round's 2- or 3-way marginal chosen by the "
                       "exponential mechanism against the calibrated model)"}),
    *released_fields(MODEL_MARGINALS, DP, _TRAINED, {
        "groups_1[][]": "value groups of each column's 1-way marginal (from DP model samples)",
        "groups_2[][]": "value groups of each column in pairs (from DP model samples)",
        "groups_3[][]": "value groups of each column in triples (from DP model samples)"}),
    *released_fields(MODEL_MARGINALS, DP, _COUNT, {"total": "the DP row count"}),
    *released_fields(MODEL_MARGINALS, DP, _MEASURED, {
        "counts[][]": "the noisy marginal counts (Gaussian mechanism)"}),
    # -- the synthetic table -----------------------------------------------------------------------------
    *released_fields(SYNTHETIC_CSV, DP, _SCHEMA, {"header": "column names (the schema's)"}),
    *released_fields(SYNTHETIC_CSV, DP, _MEASURED, {
        "rows": "sampled from the DP model and resampled with the noisy marginals (post-processing)",
        "row_count": "--rows when given (public), else the DP row count",
    }),
    # -- the run folder (--run-dir): the data holder's, mode 0700 --------------------------------------------
    *released_fields("run/plan.json", HOLDER, (), {
        "*": "the plan a resumed fit reuses, with a hash of the table"}),
    *released_fields("run/train/*", HOLDER, (), {
        "*": "training checkpoints (weights, optimizer, ledger so far)"}),
    *released_fields("run/marginals.json", HOLDER, (), {
        "*": "the measured marginals, kept so a resumed fit reuses them"}),
    # -- `tramontane schema init`: the header's column names and the command line, no row ------------------
    *released_fields(SCHEMA_DRAFT, PUBLIC, (), {
        "*": "the draft schema: column names, declared kinds and ranges, todos"}),
    # -- the terminal: the data holder's ----------------------------------------------------------------------
    *released_fields(STDERR, PUBLIC, (), {
        "training a DP synthesizer at epsilon=*": "what is being run (inputs)",
        "saved the synthesizer *": "where the model went",
        "release (shareable): *": "where the shareable report went",
        "evaluation (data holder only*": "where the holder's evaluation went",

        "wrote a draft schema of * columns to *": "`schema init`: the header's column count, the output",
        "to fill in from public knowledge*": "`schema init`: the columns left to fill in (names, public)",
        "every column is complete*": "`schema init`: nothing left to fill in",
    }),
    *released_fields(STDERR, DP, _TRAINED, {
        "trained on about * rows (a DP count*": "the DP row count, sigma and q",
        "spent epsilon *": "the ledger's epsilon under both accountants, DP-SGD setting",
        "wrote * synthetic rows to *": "the synthetic CSV and its size",
        "wrote * rows to * (the model is *": "`synth sample`: --rows (public) and the model's epsilon",
        "warning: delta * is above 1 / rows*": "delta against the DP row count",
        "interrupted*": "what an interrupted fit had spent (the ledger so far), and how to resume it",
    }),
    *released_fields(STDERR, HOLDER, (), {
        "DP-SGD *": "progress of training (shown to the data holder while it runs; its timing grows with N)",
        "utility (data holder only, not DP): *": "marginal TVD and ML efficacy against the real rows (the "
                                                  "holder's evaluation, summarised)",
    }),
])


def manifest() -> tuple[ReleasedField, ...]:
    """Every field a synthesizer run writes: the model directory, the synthetic CSV and the terminal
    (`MANIFEST`) and both reports (`report_fields`: `RELEASE_FIELDS`, `EVALUATION_FIELDS` and the pages),
    under the artifact names of a `--report report` folder."""
    return (*MANIFEST, *report_fields(schema_source=_SCHEMA, count_source=_COUNT, ledger_source=_MEASURED))


def lookup(artifact: str, path: str, manifest: tuple[ReleasedField, ...] | None = None) -> ReleasedField | None:
    """The entry of one field in `manifest` (default `MANIFEST`), or None if it is not accounted for."""
    for entry in MANIFEST if manifest is None else manifest:
        # `[]` marks list items, not a character class: only `*` is a wildcard
        if entry.artifact == artifact and fnmatch.fnmatchcase(path, entry.path.replace("[", "[[]")):
            return entry
    return None


def json_fields(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key path, value) of every leaf of a JSON value; list items as `key[]`, an empty list as a
    `key[]` leaf holding [] (so its path is the same whether or not it has items)."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from json_fields(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        if not value:
            yield f"{prefix}[]", value
        for item in value:
            yield from json_fields(item, f"{prefix}[]")
    else:
        yield prefix, value
