"""The shareable release report: what a fitted synthesizer's privacy guarantee is and what it means.

Built only from what may be published with the synthetic data: the run's privacy statement
(`Synthesizer.statement`: the ledger, its epsilon under both accountants, the TAN figures), `Synthesizer.summary`
(DP row count, DP-SGD setting, schema source and cost), `Synthesizer.config`, the schema, bounds computed
from the statement (`tramontane.audit.card.privacy_card`) and the synthetic table itself (post-processing).
It never reads real rows nor `Synthesizer.diagnostics`. Every key path is registered in `RELEASE_FIELDS`
with its status, source and one-line meaning; the page opens with a summary for a data protection
officer, then the details, each number with its meaning and source.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pandas as pd

from tramontane.errors import ConfigError
from tramontane.report import plots
from tramontane.report.page import (
    Field,
    at_most,
    esc,
    field_rows,
    figures_table,
    fmt,
    image,
    page,
    percent,
    registry,
    table,
)

FORMAT = "tramontane.release-report"
VERSION = 1
PRIVACY_UNIT = "one row of the training table"
NEIGHBOURING_RELATION = "add or remove one row"
_SUMMARY_COLUMNS = 6  # reconstruction bounds named in the summary (all of them in the details)
ROW_COUNT_LABEL = "row count"  # the ledger label of the DP row count (tramontane.synth.synthesizer)

_LEDGER = "ledger"
_BOUND = "bound from the ledger"
_FROM_LEDGER = "computed from the ledger"
_PUBLIC = "public input"
_COUNT = "DP count"
_SCHEMA = "schema"
_SYNTHETIC = "synthetic table"
_CONSTANT = "constant"

RELEASE_FIELDS: tuple[Field, ...] = (
    Field("format", "public", _CONSTANT, f"what this file is: {FORMAT!r}"),
    Field("version", "public", _CONSTANT, "version of this layout"),
    Field("summary", "dp", "ledger, bounds, DP count, schema", "the summary for a data protection officer"),
    Field("summary.privacy_unit", "public", _CONSTANT, "what one person's contribution is taken to be",
          "privacy unit"),
    Field("summary.neighbouring_relation", "public", _CONSTANT,
          "the two tables the guarantee compares differ by this", "neighbouring relation"),
    Field("summary.epsilon", "dp", _LEDGER,
          "epsilon of the whole ledger under the run's accountant, at most the target", "epsilon"),
    Field("summary.delta", "public", _PUBLIC, "probability allowance of the guarantee (keep below 1 / rows)",
          "delta"),
    Field("summary.statements[]", "dp", "bounds from the ledger, DP count, schema",
          "what the guarantee means, in plain sentences"),
    Field("privacy", "dp", _LEDGER, "the guarantee"),
    Field("privacy.target_epsilon", "public", _PUBLIC, "the budget the run was asked to stay within"),
    Field("privacy.delta", "public", _PUBLIC, "the delta every epsilon here is computed at"),
    Field("privacy.accountant", "public", _PUBLIC, "the accountant that calibrated the noise (rdp or pld)"),
    Field("privacy.epsilon_rdp", "dp", _LEDGER, "epsilon of the whole ledger under the RDP accountant",
          "epsilon (RDP)"),
    Field("privacy.epsilon_pld", "dp", _LEDGER,
          "epsilon of the whole ledger under the PLD accountant (usually tighter)", "epsilon (PLD)"),
    Field("privacy.ledger", "dp", _LEDGER, "every release computed from the rows, in order"),
    Field("privacy.ledger.format", "public", _CONSTANT, "the ledger's format (tramontane.accounting)"),
    Field("privacy.ledger.version", "public", _CONSTANT, "the ledger's version"),
    Field("privacy.ledger.events[]", "dp", _LEDGER, "one release computed from the rows"),
    Field("privacy.ledger.events[].type", "public", _LEDGER,
          "mechanism: gaussian, dp_sgd or epsilon_delta (a step with its own (epsilon, delta) analysis)"),
    Field("privacy.ledger.events[].label", "public", _LEDGER, "what the release was"),
    Field("privacy.ledger.events[].noise_multiplier", "dp", _LEDGER,
          "Gaussian noise std over sensitivity (gaussian, dp_sgd)"),
    Field("privacy.ledger.events[].count", "public", _LEDGER, "number of releases (gaussian)"),
    Field("privacy.ledger.events[].sample_rate", "dp", _LEDGER, "Poisson sampling rate q (dp_sgd)"),
    Field("privacy.ledger.events[].steps", "dp", _LEDGER, "number of DP-SGD steps (dp_sgd)"),
    Field("privacy.ledger.events[].epsilon", "public", _LEDGER, "epsilon of the step (epsilon_delta)"),
    Field("privacy.ledger.events[].delta", "public", _LEDGER, "delta of the step (epsilon_delta)"),
    Field("bounds", "dp", _BOUND, "what an attacker can achieve at most, given this ledger"),
    Field("bounds.mi_advantage_bound", "dp", _BOUND,
          "largest true-positive minus false-positive rate of any test of whether one row was in the "
          "data, by someone who knows every other row (arXiv 2204.06106)", "membership advantage"),
    Field("bounds.mi_advantage_naive_epsilon_delta", "dp", _BOUND,
          "the same from (epsilon, delta) alone: looser, shown for comparison",
          "membership advantage from (epsilon, delta)"),
    Field("bounds.mi_advantage_naive_yeom", "dp", _BOUND,
          "the same from epsilon alone (Yeom et al.): loosest, shown for comparison",
          "membership advantage from epsilon (Yeom)"),
    Field("bounds.confidence_prior", "public", _CONSTANT,
          "share of the candidates assumed to be in the data, for the confidence bound", "prior"),
    Field("bounds.confidence_fpr", "public", _CONSTANT,
          "share of non-members an attacker may wrongly flag, for the confidence bound",
          "false-positive rate"),
    Field("bounds.confidence_bound", "dp", _BOUND,
          "highest share of real members among the people an attacker flags at that rate and prior",
          "attacker's confidence"),
    Field("bounds.confidence_naive", "dp", _BOUND, "the same from (epsilon, delta) alone: looser",
          "attacker's confidence from (epsilon, delta)"),
    Field("bounds.reconstruction[]", "dp", _BOUND, "one column's reconstruction bound"),
    Field("bounds.reconstruction[].column", "schema", _SCHEMA, "the column"),
    Field("bounds.reconstruction[].values", "schema", _SCHEMA, "M, its number of possible values"),
    Field("bounds.reconstruction[].chance", "schema", _SCHEMA, "1/M: success of a blind guess"),
    Field("bounds.reconstruction[].bound", "dp", _BOUND,
          "highest chance that someone who knows every other row guesses a row's value of this column "
          "(uniform prior over its M values)"),
    Field("row_count", "dp", _COUNT, "the only release of the number of rows"),
    Field("row_count.rows_dp", "dp", _COUNT,
          "number of training rows plus Gaussian noise, rounded (at least 1): the exact number is not "
          "released", "DP row count"),
    Field("row_count.noise_std", "public", _PUBLIC, "standard deviation of that noise (sensitivity 1)"),
    Field("row_count.ledger_label", "public", _CONSTANT, "the ledger event of the DP count"),
    Field("dp_sgd", "dp", _LEDGER, "the training setting"),
    Field("dp_sgd.steps", "dp", _LEDGER, "DP-SGD steps taken"),
    Field("dp_sgd.sample_rate", "dp", _LEDGER,
          "each row's chance of being in a step's batch (expected batch over the DP count)",
          "sampling rate q"),
    Field("dp_sgd.noise_multiplier", "dp", _LEDGER,
          "Gaussian noise std over the clipping norm, calibrated so the ledger meets the target",
          "noise multiplier sigma"),
    Field("dp_sgd.max_grad_norm", "public", _PUBLIC, "each row's gradient is clipped to this norm",
          "clipping norm C"),
    Field("dp_sgd.expected_batch_size", "dp", _COUNT, "rows per step on average: q times the DP count"),
    Field("dp_sgd.eta", "dp", _FROM_LEDGER,
          "TAN's individual signal-to-noise ratio q sqrt(steps/2) / sigma (arXiv 2210.03403)", "TAN eta"),
    Field("dp_sgd.total_amount_of_noise", "dp", _FROM_LEDGER, "TAN = 1 / eta: more noise, less leakage",
          "TAN"),
    Field("dp_sgd.epsilon_tan", "dp", _FROM_LEDGER,
          "TAN's closed-form estimate of epsilon: a heuristic, never the guarantee",
          "epsilon TAN (heuristic)"),
    Field("schema", "schema", _SCHEMA, "the columns and the values they may take"),
    Field("schema.source", "public", _SCHEMA,
          "public (given), dp (inferred with DP) or non-private (read off the rows WITHOUT DP)"),
    Field("schema.epsilon", "public", _LEDGER, "epsilon spent inferring the schema (0 when given)"),
    Field("schema.delta", "public", _LEDGER, "delta spent inferring the schema (0 when given)"),
    Field("schema.provenance", "schema", _SCHEMA, "where the schema says it came from"),
    Field("schema.notes[]", "schema", _SCHEMA, "what DP inference had to fall back on"),
    Field("schema.columns[]", "schema", _SCHEMA, "one column"),
    Field("schema.columns[].name", "schema", _SCHEMA, "column name"),
    Field("schema.columns[].kind", "schema", _SCHEMA, "categorical, integer or float"),
    Field("schema.columns[].n_values", "schema", _SCHEMA, "number of values (categories or bins, missing)"),
    Field("schema.columns[].missing", "schema", _SCHEMA, "whether a missing value is allowed"),
    Field("schema.columns[].categories[]", "schema", _SCHEMA, "allowed categories (none for numbers)"),
    Field("schema.columns[].lo", "schema", _SCHEMA, "smallest allowed number (null for categories)"),
    Field("schema.columns[].hi", "schema", _SCHEMA, "largest allowed number (null for categories)"),
    Field("synthetic", "dp", _SYNTHETIC, "the synthetic table: post-processing, covered by the guarantee"),
    Field("synthetic.rows", "dp", _SYNTHETIC, "number of synthetic rows (by default the DP count)",
          "synthetic rows"),
    Field("synthetic.columns[]", "public", _SYNTHETIC, "column names"),
    Field("model", "public", _PUBLIC, "the language model"),
    Field("model.parameters", "public", _PUBLIC, "number of weights of the model", "model weights"),
    Field("model.config", "public", _PUBLIC, "SynthConfig: every training and model setting, by name"),
)
FIELDS = registry(RELEASE_FIELDS)
OPAQUE = ("model.config",)  # registered as a whole: its keys are SynthConfig's fields


def _reconstruction_key(name: str, values: int) -> str:
    return f"reconstruction_bound[{name}] (M={values})"  # as tramontane.audit.card.privacy_card names it


def release_report(synth: Any, synthetic: pd.DataFrame) -> dict[str, Any]:
    """The shareable report of a fitted (or loaded) `Synthesizer` and the synthetic table it sampled.

    Reads `synth.statement` (the privacy statement, computed once per fit or load), `.summary`, `.config`,
    `.schema` and the model's size, and the synthetic table: nothing computed from real rows. Key paths:
    `RELEASE_FIELDS`.
    """
    from tramontane.audit.card import privacy_card

    s = synth.summary
    if s is None or synth.model is None:
        raise ConfigError("the synthesizer is not fitted: fit it (or load a fitted one) before reporting")
    schema = synth.schema
    st = synth.statement
    card = privacy_card(st, schema=schema)
    bounds = {key: card[key] for key in ("mi_advantage_bound", "mi_advantage_naive_epsilon_delta",
                                         "mi_advantage_naive_yeom", "confidence_prior", "confidence_fpr",
                                         "confidence_bound", "confidence_naive")}
    bounds["reconstruction"] = [
        {"column": c.name, "values": int(c.n_values), "chance": 1 / int(c.n_values),
         "bound": card[_reconstruction_key(c.name, int(c.n_values))]} for c in schema.columns]
    report: dict[str, Any] = {
        "format": FORMAT, "version": VERSION,
        "summary": {"privacy_unit": PRIVACY_UNIT, "neighbouring_relation": NEIGHBOURING_RELATION,
                    "epsilon": st.epsilon, "delta": st.delta, "statements": []},
        "privacy": st.to_dict(),
        "bounds": bounds,
        "row_count": {"rows_dp": s.rows_dp, "noise_std": s.row_count_noise, "ledger_label": ROW_COUNT_LABEL},
        "dp_sgd": {"steps": s.steps, "sample_rate": s.sample_rate, "noise_multiplier": s.noise_multiplier,
                   "max_grad_norm": s.max_grad_norm, "expected_batch_size": s.batch_size, "eta": st.eta,
                   "total_amount_of_noise": st.total_amount_of_noise, "epsilon_tan": st.epsilon_tan},
        "schema": {"source": s.schema_source, "epsilon": s.schema_epsilon, "delta": s.schema_delta,
                   "provenance": schema.provenance, "notes": list(s.schema_notes),
                   "columns": [_column(c) for c in schema.columns]},
        "synthetic": {"rows": len(synthetic), "columns": [str(c) for c in synthetic.columns]},
        "model": {"parameters": synth.model.args.num_parameters(), "config": asdict(synth.config)},
    }
    report["summary"]["statements"] = statements(report)
    return report


def _column(spec: Any) -> dict[str, Any]:
    numeric = spec.is_numeric
    return {"name": spec.name, "kind": spec.kind, "n_values": int(spec.n_values), "missing": spec.missing,
            "categories": [] if numeric else list(spec.categories),
            "lo": spec.lo if numeric else None, "hi": spec.hi if numeric else None}


_SCHEMA_SENTENCE = {
    "public": "Schema: given as a public input (columns and allowed values): it cost nothing and reveals "
              "nothing about the rows.",
    "dp": "Schema: inferred from the rows with differential privacy, spending epsilon {epsilon} and delta "
          "{delta} of the budget (on the ledger, included in the guarantee).",
    "non-private": "WARNING: the schema was read off the rows WITHOUT differential privacy. Its category "
                   "lists and numeric ranges can reveal individual rows (a rare category, an extreme value) "
                   "and the guarantee does not cover them.",
}


def statements(report: dict[str, Any]) -> list[str]:
    """The summary in plain sentences, each true of the figures in `report` (bounds rounded up)."""
    p, b, n, sc = report["privacy"], report["bounds"], report["row_count"], report["schema"]
    eps, delta = report["summary"]["epsilon"], report["summary"]["delta"]
    recon = sorted(b["reconstruction"], key=lambda r: -r["bound"])
    shown = "; ".join(f"{r['column']} {percent(r['bound'], up=True)} ({percent(r['chance'])})"
                      for r in recon[:_SUMMARY_COLUMNS])
    more = len(recon) - _SUMMARY_COLUMNS
    return [
        (f"What is protected: the privacy unit is {PRIVACY_UNIT}. The guarantee compares any two training "
         f"tables that differ by one row (neighbouring relation: {NEIGHBOURING_RELATION}), and everything "
         "released here is almost equally likely whichever of the two was used. A person with several rows "
         "is protected per row only."),
        (f"Guarantee: ({fmt(eps, up=True)}, {fmt(delta)})-differential privacy for everything released "
         + ("here but the schema (see the warning below)" if sc["source"] == "non-private" else "here")
         + f" ({p['accountant'].upper()} accountant, target epsilon {fmt(p['target_epsilon'])}). The "
         "synthetic rows are post-processing of the trained model and cost nothing more."),
        ("Membership: someone who knows every other row can tell whether a given person was in the data "
         f"with advantage at most {at_most(b['mi_advantage_bound'])} (0 means no better than a guess, 1 "
         "means always right)."),
        (f"Confidence: if {percent(b['confidence_prior'])} of the candidates were in the data, an attacker "
         f"that wrongly accuses at most 1 in {round(1 / b['confidence_fpr']):,} of the others is right at "
         f"most {percent(b['confidence_bound'], up=True)} of the time when it accuses someone."),
        ("Reconstruction: someone who knows every other row guesses one value of a person's row right at "
         f"most this often (a blind guess in brackets): {shown}"
         + (f"; {more} more columns in the details." if more > 0 else ".")),
        (f"Number of rows: not public. It was released only as a DP count, {fmt(n['rows_dp'])} (Gaussian "
         f"noise of standard deviation {fmt(n['noise_std'])}, ledger event \"{n['ledger_label']}\"), which "
         "set the sampling rate and the default number of synthetic rows."),
        _SCHEMA_SENTENCE[sc["source"]].format(epsilon=fmt(sc["epsilon"]), delta=fmt(sc["delta"])),
        ("What can be learnt: patterns of the population as a whole (how often values occur and occur "
         "together), which is the purpose of synthetic data and can concern groups a person belongs to; "
         "and the public inputs shown here (settings, a public schema)."),
    ]


# -- HTML ----------------------------------------------------------------------------------------------

def _event_meaning(event: dict[str, Any]) -> str:
    kind, sigma = event["type"], fmt(event.get("noise_multiplier"))
    if kind == "gaussian" and event.get("label") == ROW_COUNT_LABEL:
        return f"the DP row count: the number of rows plus Gaussian noise of standard deviation {sigma}"
    if kind == "gaussian":
        return f"Gaussian mechanism, noise {sigma} times the sensitivity, {event['count']} release(s)"
    if kind == "dp_sgd":
        return (f"training: {event['steps']} DP-SGD steps, each row in a step's batch with probability "
                f"{fmt(event['sample_rate'])}, clipped gradients plus Gaussian noise {sigma} times the "
                "clipping norm")
    if kind == "exponential_mechanism":
        return (f"{event['count']} choice(s) by the exponential mechanism, epsilon {fmt(event['epsilon'])} "
                "each (e.g. which marginal to measure next)")
    if kind == "epsilon_delta":
        return f"a step that is ({fmt(event['epsilon'])}, {fmt(event['delta'])})-DP by its own analysis"
    return kind


def _parameters(event: dict[str, Any]) -> str:
    names = {"sample_rate": "q", "noise_multiplier": "sigma", "steps": "steps", "count": "count",
             "epsilon": "epsilon", "delta": "delta"}
    return ", ".join(f"{names[k]} = {fmt(v)}" for k, v in event.items() if k in names)


def _values_text(column: dict[str, Any]) -> str:
    if column["kind"] == "categorical":
        cats = [str(c) for c in column["categories"]]
        text = ", ".join(cats[:12]) + (f", ... ({len(cats)} in all)" if len(cats) > 12 else "")
    else:
        text = f"{fmt(column['lo'])} to {fmt(column['hi'])}"
    return text + (", or missing" if column["missing"] else "")


_SCHEMA_SOURCE = {"public": "given as a public input (costs nothing)",
                  "dp": "inferred from the rows with differential privacy (on the ledger)",
                  "non-private": "read off the rows WITHOUT differential privacy"}


def render_release(report: dict[str, Any], synthetic: pd.DataFrame, schema: Any) -> str:
    """The release page: the summary for a data protection officer, then the details (every number with
    its meaning and source), with plots of the synthetic table and the reconstruction bounds."""
    s, p, b, sc = report["summary"], report["privacy"], report["bounds"], report["schema"]
    items = "".join(f"<li class='warn'>{esc(t)}</li>" if t.startswith("WARNING") else f"<li>{esc(t)}</li>"
                    for t in s["statements"])
    summary = field_rows(report, FIELDS, ["summary.privacy_unit", "summary.neighbouring_relation",
                                          "summary.epsilon", "summary.delta"])
    summary[2] = (summary[2][0], fmt(s["epsilon"], up=True), *summary[2][2:])  # rounded up, as in the text
    parts = [
        "<h1>Synthetic data release: privacy report</h1>",
        ("<p class='lead'>This page and the synthetic table may be shared: everything here is either a "
         "public input or computed from differentially private releases of the training rows. The data "
         "holder's evaluation against the real rows is kept apart and must not be published.</p>"),
        "<section class='summary' id='summary'><h2>Summary</h2>", figures_table(summary),
        f"<ul>{items}</ul></section>",

        "<h2>Privacy guarantee</h2>",
        figures_table(field_rows(report, FIELDS, ["privacy.target_epsilon", "privacy.delta",
                                                  "privacy.accountant", "privacy.epsilon_rdp",
                                                  "privacy.epsilon_pld"])),
        ("<h3>Privacy ledger</h3><p>Every release computed from the training rows, in order; together "
         "they make up the guarantee above.</p>"),
        table([(e.get("label", ""), e["type"], _parameters(e), _event_meaning(e))
               for e in p["ledger"]["events"]], ("label", "mechanism", "parameters", "what it is")),

        ("<h2>What the guarantee means</h2><p>Bounds computed from the ledger alone: they hold for any "
         "attacker, including one who knows every row but the one attacked.</p>"),
        figures_table(field_rows(report, FIELDS, [
            "bounds.mi_advantage_bound", "bounds.mi_advantage_naive_epsilon_delta",
            "bounds.mi_advantage_naive_yeom", "bounds.confidence_bound", "bounds.confidence_naive",
            "bounds.confidence_prior", "bounds.confidence_fpr"])),
        ("<h3>Reconstruction of one value</h3><p>Per column, the chance that someone who knows every other "
         "row guesses a person's value, from a uniform prior over the column's M values (source: bound from "
         "the ledger; M and the blind guess 1/M come from the schema).</p>"),
        table([(r["column"], r["values"], r["chance"], r["bound"]) for r in b["reconstruction"]],
              ("column", "possible values M", "blind guess 1/M", "at most, knowing all other rows"),
              numeric=(1, 2, 3)),
        image("reconstruction bounds", plots.reconstruction_plot(b["reconstruction"]),
              "Per column: a blind guess against the most an attacker who knows every other row can achieve "
              "(bound from the ledger, uniform prior over the column's values)."),

        ("<h2>Number of rows</h2><p>The number of training rows is <b>not public</b>: neighbouring tables "
         "differ by one row, so the exact count would itself leak. It was released once, as a DP count, and "
         "only that count was used afterwards (sampling rate, expected batch, default number of synthetic "
         "rows).</p>"),
        figures_table(field_rows(report, FIELDS, ["row_count.rows_dp", "row_count.noise_std",
                                                  "row_count.ledger_label"])),

        "<h2>Training (DP-SGD)</h2>",
        figures_table(field_rows(report, FIELDS, [
            "dp_sgd.steps", "dp_sgd.sample_rate", "dp_sgd.noise_multiplier", "dp_sgd.max_grad_norm",
            "dp_sgd.expected_batch_size", "dp_sgd.eta", "dp_sgd.total_amount_of_noise",
            "dp_sgd.epsilon_tan"])),

        "<h2>Schema</h2>",
    ]
    if sc["source"] == "non-private":
        parts.append("<p class='warn'><b>Warning:</b> this schema was read off the private rows without "
                     "differential privacy. Its category lists and numeric ranges may reveal individual "
                     "rows; review them before publishing, or fit again with a public or DP schema.</p>")
    parts += [
        figures_table([("source", sc["source"], _SCHEMA_SOURCE[sc["source"]], _SCHEMA),
                       *field_rows(report, FIELDS, ["schema.epsilon", "schema.delta"])]),
        *(f"<p>Note: {esc(note)}</p>" for note in sc["notes"]),
        f"<p>The columns and the values they may take (source: the schema, {esc(sc['source'])}).</p>",
        table([(c["name"], c["kind"], c["n_values"], _values_text(c)) for c in sc["columns"]],
              ("column", "kind", "values", "allowed")),

        "<h2>Synthetic table</h2>",
        figures_table(field_rows(report, FIELDS, ["synthetic.rows", "model.parameters"])),
        image("synthetic marginals", plots.synthetic_marginals(synthetic, schema),
              "Share of each value per column in the synthetic table (numbers in the schema's bins), "
              "computed from the synthetic rows only."),
        "<h3>Settings</h3><p>Every setting of the run (source: public input).</p>",
        table(sorted(report["model"]["config"].items()), ("setting", "value"), numeric=(1,)),
    ]
    return page("Synthetic data release: privacy report", parts)
