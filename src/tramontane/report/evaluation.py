"""The data holder's evaluation: how useful the synthetic table is, measured against the real rows.

Everything here is computed from real rows (training rows, held-out rows, `Synthesizer.diagnostics`), so
none of it is covered by the differential-privacy guarantee: it is for the data holder only, written apart
from the shareable release, with a banner saying so. Utility comes first (`report.utility.evaluate_synthetic`:
marginal TVD, ML efficacy, held-out NLL, exact copies, each beside the same figure for real held-out rows),
then the plots and the training diagnostics (held-out learning curve, row counts, time). Key paths:
`EVALUATION_FIELDS`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tramontane.errors import ConfigError
from tramontane.report import plots
from tramontane.report.metrics import MarginalBins
from tramontane.report.page import Field, esc, field_rows, figures_table, fmt, image, page, registry, table

FORMAT = "tramontane.holder-evaluation"
VERSION = 1
NOTICE = ("For the data holder only: computed from the real rows, not covered by differential privacy, do "
          "not publish.")

_TRAIN = "real training rows"
_TEST = "real held-out rows"
_BOTH = "real rows and synthetic table"
_FIT = "fit diagnostics (real rows)"
_H = "holder-only"
ORDERS = (1, 2, 3)  # k-way marginals

EVALUATION_FIELDS: tuple[Field, ...] = (
    Field("format", "public", "constant", f"what this file is: {FORMAT!r}"),
    Field("version", "public", "constant", "version of this layout"),
    Field("notice", "public", "constant", "who may read this file"),
    Field("utility", _H, _BOTH, "the synthetic table compared with real rows"),
    Field("utility.rows_real", _H, _TRAIN, "number of real training rows compared with",
          "real training rows"),
    Field("utility.rows_real_test", _H, _TEST, "number of held-out real rows (null without a held-out table)",
          "real held-out rows"),
    Field("utility.rows_synthetic", _H, "synthetic table", "number of synthetic rows", "synthetic rows"),
    Field("utility.tvd", _H, _BOTH, "mean total-variation distance of k-way marginals to the training rows"),
    *(Field(f"utility.tvd.{k}-way", _H, _BOTH,
            f"mean TVD over all {k}-column marginals, synthetic vs training rows (0 identical, 1 disjoint; "
            f"null with fewer than {k} columns)") for k in ORDERS),
    Field("utility.tvd_real_test_vs_train", _H, _TEST,
          "the same for held-out real rows: what sampling alone gives (null without a held-out table)"),
    *(Field(f"utility.tvd_real_test_vs_train.{k}-way", _H, _TEST,
            f"mean TVD over all {k}-column marginals, held-out vs training rows") for k in ORDERS),
    Field("utility.exact_match_share", _H, _BOTH,
          "share of synthetic rows identical to some training row (on the schema's values)"),
    Field("utility.exact_match_share_real_test", _H, _TEST,
          "the same share for held-out rows: what is expected without copying"),
    Field("utility.mean_abs_cramers_v_difference", _H, _BOTH,
          "mean |Cramer's V real - synthetic| over column pairs: lost or invented associations"),
    Field("utility.heldout_nll_per_row", _H, _TEST,
          "negative log-likelihood of held-out rows under the model (null without a held-out table)"),
    Field("utility.heldout_nll_per_row.nll_per_row", _H, _TEST,
          "mean NLL per held-out row, nats: lower fits better"),
    Field("utility.heldout_nll_per_row.stderr", _H, _TEST, "its standard error"),
    Field("utility.heldout_nll_per_row.nll_per_row_bits", _H, _TEST, "the mean in bits"),
    Field("utility.heldout_nll_per_row.n", _H, _TEST, "held-out rows scored"),
    Field("utility.ml_efficacy", _H, _BOTH,
          "train on synthetic, test on real held-out rows, against train on real (null without a held-out "
          "table and a target)"),
    Field("utility.ml_efficacy.target", _H, "public input", "the column predicted"),
    Field("utility.ml_efficacy.positive", _H, "public input", "the positive class for ROC AUC"),
    Field("utility.ml_efficacy.majority_accuracy", _H, _TEST, "accuracy of always predicting the majority"),
    Field("utility.ml_efficacy.n_train", _H, _TRAIN, "real training rows"),
    Field("utility.ml_efficacy.n_synthetic", _H, "synthetic table", "synthetic rows"),
    Field("utility.ml_efficacy.n_test", _H, _TEST, "held-out rows tested on"),
    Field("utility.ml_efficacy.scores[]", _H, _BOTH, "one classifier trained on one table"),
    Field("utility.ml_efficacy.scores[].model", _H, "constant", "classifier: hist_gbdt or logistic"),
    Field("utility.ml_efficacy.scores[].trained_on", _H, "constant", "real or synthetic"),
    Field("utility.ml_efficacy.scores[].accuracy", _H, _TEST, "accuracy on the held-out rows"),
    Field("utility.ml_efficacy.scores[].roc_auc", _H, _TEST,
          "ROC AUC on the held-out rows (null for a multi-class target)"),
    Field("training", _H, _FIT, "what fitting measured on real rows (null after Synthesizer.load)"),
    Field("training.rows_given", _H, _FIT, "exact number of rows in the input table"),
    Field("training.rows_used", _H, _FIT, "exact number of rows that fit the schema and were trained on"),
    Field("training.seconds", _H, _FIT, "wall time of the fit (grows with the number of rows)"),
    Field("training.heldout_curve[]", _H, _TEST, "one point of the held-out learning curve"),
    Field("training.heldout_curve[].step", _H, "constant", "DP-SGD step"),
    Field("training.heldout_curve[].eval_loss", _H, _TEST, "mean NLL per held-out row at that step, nats"),
)
FIELDS = registry(EVALUATION_FIELDS)


def holder_evaluation(synth: Any, real_train: pd.DataFrame, synthetic: pd.DataFrame,
                      real_test: pd.DataFrame | None = None, target: str | None = None) -> dict[str, Any]:
    """The data holder's evaluation (see the module docstring); optional parts are null, never absent.

    `target` (a column) adds ML efficacy when `real_test` is given; `real_test` also adds the reference
    figures of real held-out rows and their NLL under the model (`synth.log_likelihood`).
    """
    from tramontane.report.utility import evaluate_synthetic

    if synth.model is None:
        raise ConfigError("the synthesizer is not fitted: fit it (or load a fitted one) before evaluating")
    schema = synth.schema
    test_ll = synth.log_likelihood(real_test) if real_test is not None else None
    u = evaluate_synthetic(real_train, synthetic, schema, real_test, target, test_ll)
    diff = plots.cramers_v_difference(real_train, synthetic, schema, MarginalBins.fit(real_train, schema))
    pairs = diff[np.triu_indices(len(diff), 1)]
    ml = u.get("ml_efficacy")
    if ml is not None:
        scores = [{"model": model, "trained_on": source, "accuracy": sc["accuracy"], "roc_auc": sc["roc_auc"]}
                  for model, by_source in ml["scores"].items() for source, sc in by_source.items()]
        ml = {k: ml[k] for k in ("target", "positive", "majority_accuracy", "n_train", "n_synthetic",
                                 "n_test")} | {"scores": scores}
    test_tvd = u.get("tvd_real_test_vs_train")
    diag = synth.diagnostics
    return {
        "format": FORMAT, "version": VERSION, "notice": NOTICE,
        "utility": {
            "rows_real": u["rows_real"], "rows_real_test": None if real_test is None else len(real_test),
            "rows_synthetic": u["rows_synthetic"], "tvd": _by_order(u["tvd"]),
            "tvd_real_test_vs_train": None if test_tvd is None else _by_order(test_tvd),
            "exact_match_share": u["exact_match_share"],
            "exact_match_share_real_test": u.get("exact_match_share_real_test"),
            "mean_abs_cramers_v_difference": float(pairs.mean()) if len(pairs) else 0.0,
            "heldout_nll_per_row": u.get("heldout_nll_per_row"),
            "ml_efficacy": ml},
        "training": None if diag is None else {
            "rows_given": diag.rows_given, "rows_used": diag.rows_used, "seconds": diag.seconds,
            "heldout_curve": [{"step": int(c["step"]), "eval_loss": float(c["eval_loss"])}
                              for c in diag.heldout_curve]},
    }


def _by_order(tvd: dict[str, float]) -> dict[str, float | None]:
    return {f"{k}-way": tvd.get(f"{k}-way") for k in ORDERS}


def _summary_rows(u: dict[str, Any]) -> list[tuple[str, Any, Any, str]]:
    """(figure, synthetic, real reference, what it means) rows of the utility summary."""
    ref = u["tvd_real_test_vs_train"] or {}
    rows: list[tuple[str, Any, Any, str]] = [
        (f"{k} TVD to the training rows", v, ref.get(k), "0 identical, 1 disjoint; reference: held-out rows")
        for k, v in u["tvd"].items() if v is not None]
    rows.append(("rows identical to a training row", u["exact_match_share"], u["exact_match_share_real_test"],
                 "well above the held-out share suggests copying"))
    rows.append(("mean |Cramer's V difference|", u["mean_abs_cramers_v_difference"], None,
                 FIELDS["utility.mean_abs_cramers_v_difference"].meaning))
    if (nll := u["heldout_nll_per_row"]) is not None:
        rows.append(("held-out NLL per row (nats)", nll["nll_per_row"], None,
                     f"mean NLL per held-out row, lower fits better; +/- {fmt(nll['stderr'])}"))
    if (ml := u["ml_efficacy"]) is not None:
        scores = {(s["model"], s["trained_on"]): s for s in ml["scores"]}
        for model in dict.fromkeys(s["model"] for s in ml["scores"]):
            syn, real = scores[(model, "synthetic")], scores[(model, "real")]
            rows.append((f"{model} accuracy on held-out rows, predicting {ml['target']}", syn["accuracy"],
                         real["accuracy"],
                         f"trained on synthetic vs on real (majority class: {fmt(ml['majority_accuracy'])})"))
            if syn["roc_auc"] is not None:
                rows.append((f"{model} ROC AUC on held-out rows", syn["roc_auc"], real["roc_auc"],
                             f"trained on synthetic vs on real (positive class {ml['positive']})"))
    return rows


def render_evaluation(evaluation: dict[str, Any], real_train: pd.DataFrame, synthetic: pd.DataFrame,
                      schema: Any, real_test: pd.DataFrame | None = None) -> str:
    """The holder's page: the banner, the utility summary against real held-out rows, plots, diagnostics."""
    u, t = evaluation["utility"], evaluation["training"]
    bins = MarginalBins.fit(real_train, schema)
    counts = ["utility.rows_real", "utility.rows_synthetic"]
    counts += ["utility.rows_real_test"] if u["rows_real_test"] is not None else []
    parts = [
        f"<p class='banner' id='banner'>{esc(evaluation['notice'])}</p>",
        "<h1>Synthetic data: the data holder's evaluation</h1>",
        ("<p class='lead'>How well the synthetic table reproduces the real one. These figures compare with "
         "the real rows, so they are not covered by the differential-privacy guarantee: keep this page with "
         "the private data. The shareable release (synthetic table and privacy report) is in "
         "<code>../release/</code>.</p>"),
        "<h2>Utility summary</h2>",
        table(_summary_rows(u), ("figure", "synthetic", "real reference", "what it means"), numeric=(1, 2)),
    ]
    if u["rows_real_test"] is None:
        parts.append("<p>No held-out table was given: there is no reference from real held-out rows, no "
                     "held-out likelihood and no ML efficacy (pass a held-out table, and a target).</p>")
    diff = plots.cramers_v_difference(real_train, synthetic, schema, bins)
    parts += [
        figures_table(field_rows(evaluation, FIELDS, counts)),
        "<h2>Marginals and associations</h2>",
        image("real vs synthetic marginals",
              plots.real_vs_synthetic_marginals(real_train, synthetic, schema, bins, real_test),
              "Share of each value per column in the real training rows, the synthetic rows and the held-out "
              "rows."),
        image("Cramer's V differences", plots.association_plot(diff, schema.names),
              "Difference of pairwise association (Cramer's V) between real and synthetic rows; dark cells "
              "are associations the synthetic table lost or invented."),
        "<h2>Training</h2>",
    ]
    if t is None:
        parts.append("<p>The synthesizer was loaded from disk: the fit's diagnostics (exact row counts, "
                     "learning curve, time) are not saved with it.</p>")
        return page("Data holder's evaluation (do not publish)", parts)
    parts.append(figures_table(field_rows(evaluation, FIELDS, ["training.rows_given", "training.rows_used",
                                                               "training.seconds"])))
    if (curve := plots.curve_plot(t["heldout_curve"])) is not None:
        parts.append(image("learning curve", curve,
                           "Held-out NLL per row over DP-SGD steps (real held-out rows; not covered by DP)."))
    else:
        parts.append("<p>No held-out table was given to the fit, so there is no learning curve (the training "
                     "loss on private rows is not recorded).</p>")
    return page("Data holder's evaluation (do not publish)", parts)
