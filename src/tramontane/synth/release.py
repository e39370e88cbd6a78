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
`tramontane.report.evaluation.EVALUATION_FIELDS`); `tramontane.report.privacy_report.manifest()` is the
whole list, this module's entries and theirs. It is checked against real outputs by
`tests/integration/test_release.py`: a field missing from it, a `PUBLIC` field that differs between
neighbouring tables, or a `DP` field whose ledger event is absent fails the suite.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

DP, PUBLIC, HOLDER = "dp", "public", "holder-only"
STATUSES = (DP, PUBLIC, HOLDER)

PRIVACY_UNIT = "one row of the training table"
NEIGHBOURING = "add or remove one row"
ROW_COUNT_LABEL = "row count"
DPSGD_LABEL = "synth dp-sgd"
SCHEMA_LABEL = "schema inference"
MARGINALS_LABEL = "marginals"  # tramontane.synth.marginals.MARGINALS_LABEL

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


@dataclass(frozen=True)
class ReleasedField:
    """One field (or family of fields, `path` with `*` wildcards) of one artifact, and its status."""

    artifact: str
    path: str  # dotted JSON key path, lists as `[]`; "" for a whole file; a line pattern for stderr
    status: str
    source: tuple[str, ...] = ()  # DP: ledger labels it depends on; PUBLIC / HOLDER: empty
    meaning: str = ""

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status
        assert (self.status == DP) == bool(self.source), f"{self.artifact}:{self.path}: DP fields name a source"

    @property
    def shareable(self) -> bool:
        return self.status != HOLDER


def _fields(artifact: str, status: str, source: tuple[str, ...], entries: Mapping[str, str]) -> list[ReleasedField]:
    return [ReleasedField(artifact, path, status, source, meaning) for path, meaning in entries.items()]


_COUNT = (ROW_COUNT_LABEL,)
_SCHEMA = (SCHEMA_LABEL,)  # public (and then identical) when the schema is given
_TRAINED = (SCHEMA_LABEL, ROW_COUNT_LABEL, DPSGD_LABEL)
_MEASURED = (*_TRAINED, MARGINALS_LABEL)  # marginals: chosen from model samples, measured with noise

MANIFEST: tuple[ReleasedField, ...] = tuple([
    # -- the saved synthesizer ---------------------------------------------------------------------------
    *_fields(MODEL_STATE, PUBLIC, (), {
        "format": "file format name", "version": "file format version",
        "epsilon": "the target epsilon (an input)", "delta": "the target delta (an input)",
        "config.*": "model and training configuration (inputs)",
        "seed": "seed of initialisation, column orders and sampling (an input; the DP noise is not seeded)",
        "ledger.format": "ledger format name", "ledger.version": "ledger format version",
        "ledger.events[].type": "kind of each privacy event", "ledger.events[].label": "what each event is",
        "ledger.events[].steps": "number of DP-SGD steps (an input)",
        "ledger.events[].count": "number of releases of a Gaussian event",
        "summary.row_count_noise": "std of the noise on the row count (configuration)",
        "summary.steps": "DP-SGD steps taken", "summary.max_grad_norm": "clipping norm C (configuration)",
        "summary.accountant": "accountant the noise was calibrated with", "summary.delta": "target delta",
        "summary.schema_source": "whether the schema was given, inferred with DP, or read without DP",
    }),
    *_fields(MODEL_STATE, DP, _COUNT, {
        "ledger.events[].sample_rate": "Poisson rate q = expected batch / DP row count",
        "ledger.events[].noise_multiplier": "sigma of each Gaussian event: DP-SGD's calibrated for q; the row "
                                            "count's and the schema inference's set by the budget (inputs)",
        "summary.rows_dp": "the DP count of the training rows",
        "summary.batch_size": "expected batch, a share of the DP row count",
        "summary.sample_rate": "q", "summary.noise_multiplier": "sigma, calibrated for q",
        "summary.epsilon_rdp": "the ledger's epsilon (RDP)", "summary.epsilon_pld": "the ledger's epsilon (PLD)",
    }),
    *_fields(MODEL_STATE, DP, _SCHEMA, {
        "summary.schema_notes[]": "what DP schema inference fell back on, and per column its kind, how many "
                                  "categories or bins passed, whether 'other' and missing exist, its budget",
        # shares of the budget; how delta is split follows the column kinds, which are decided with DP
        "ledger.events[].epsilon": "epsilon of a schema-inference step", "ledger.events[].delta": "its delta "
                                   "(the thresholds of the category sets)",
        "summary.schema_epsilon": "epsilon spent on the schema (its marginal cost within the run)",
        "summary.schema_delta": "delta spent on it",
    }),
    *_fields(MODEL_SCHEMA, DP, _SCHEMA, {"*": "the schema: inferred with DP, or given (then public)"}),
    *_fields(MODEL_PARAMS, DP, _SCHEMA, {"*": "model shape (configuration) and vocabulary size (schema)"}),
    *_fields(MODEL_WEIGHTS, DP, _TRAINED, {"": "the DP-SGD-trained weights"}),
    *_fields(MODEL_STATE, PUBLIC, (), {"summary.marginal_queries": "how many marginals were measured (the "
                                       "column count and pairs_per_column: configuration)"}),
    *_fields(MODEL_STATE, DP, (*_COUNT, MARGINALS_LABEL), {
        "summary.marginal_sigma": "noise std of every marginal cell, set by the budget share (inputs)"}),
    *_fields(MODEL_MARGINALS, DP, _TRAINED, {
        "queries[][]": "which columns and pairs were measured (pairs chosen from DP model samples)",
        "groups_1[][]": "value groups of each column's 1-way marginal (from DP model samples)",
        "groups_2[][]": "value groups of each column in pairs (from DP model samples)",
        "sigma": "noise std of every cell (set by the budget share)", "total": "the DP row count"}),
    *_fields(MODEL_MARGINALS, DP, _MEASURED, {"counts[][]": "the noisy marginal counts (Gaussian mechanism)"}),
    # -- the synthetic table -----------------------------------------------------------------------------
    *_fields(SYNTHETIC_CSV, DP, _SCHEMA, {"header": "column names (the schema's)"}),
    *_fields(SYNTHETIC_CSV, DP, _MEASURED, {
        "rows": "sampled from the DP model and resampled with the noisy marginals (post-processing)",
        "row_count": "--rows when given (public), else the DP row count",
    }),
    # -- the run folder (--run-dir): the data holder's, mode 0700 --------------------------------------------
    *_fields("run/plan.json", HOLDER, (), {"*": "the plan a resumed fit reuses, with a hash of the table"}),
    *_fields("run/train/*", HOLDER, (), {"*": "training checkpoints (weights, optimizer, ledger so far)"}),
    *_fields("run/marginals.json", HOLDER, (), {"*": "the measured marginals, kept so a resumed fit reuses them"}),
    # -- `tramontane schema init`: the header's column names and the command line, no row ------------------
    *_fields(SCHEMA_DRAFT, PUBLIC, (), {"*": "the draft schema: column names, declared kinds and ranges, todos"}),
    # -- the terminal: the data holder's ----------------------------------------------------------------------
    *_fields(STDERR, PUBLIC, (), {
        "training a DP synthesizer at epsilon=*": "what is being run (inputs)",
        "saved the synthesizer *": "where the model went",
        "release (shareable): *": "where the shareable report went",
        "evaluation (data holder only*": "where the holder's evaluation went",

        "wrote a draft schema of * columns to *": "`schema init`: the header's column count, the output",
        "to fill in from public knowledge*": "`schema init`: the columns left to fill in (names, public)",
        "every column is complete*": "`schema init`: nothing left to fill in",
    }),
    *_fields(STDERR, DP, _TRAINED, {
        "trained on about * rows (a DP count*": "the DP row count, sigma and q",
        "spent epsilon *": "the ledger's epsilon under both accountants, DP-SGD setting",
        "wrote * synthetic rows to *": "the synthetic CSV and its size",
        "wrote * rows to * (the model is *": "`synth sample`: --rows (public) and the model's epsilon",
        "warning: delta * is above 1 / rows*": "delta against the DP row count",
        "interrupted*": "what an interrupted fit had spent (the ledger so far), and how to resume it",
    }),
    *_fields(STDERR, HOLDER, (), {
        "DP-SGD *": "progress of training (shown to the data holder while it runs; its timing grows with N)",
        "utility (data holder only, not DP): *": "marginal TVD and ML efficacy against the real rows (the "
                                                  "holder's evaluation, summarised)",
    }),
])


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
