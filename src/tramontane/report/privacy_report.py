"""The synthesizer's report: JSON for machines, one self-contained HTML page with plots for people.

Sections: privacy (the ledger, epsilon under RDP and PLD, the DP-SGD setting and its TAN), the schema and
what inferring it cost, the held-out learning curve, utility (marginal TVD, ML efficacy, held-out NLL,
copies of training rows), and plots: per-column marginals real vs synthetic and the difference between
real and synthetic pairwise associations (Cramer's V). Utility numbers are computed against real rows and
are labelled as not covered by the DP guarantee.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tramontane import accounting
from tramontane.report.metrics import MarginalBins, table_codes
from tramontane.synth.schema import Schema

NOT_DP_NOTE = ("Utility figures compare the synthetic table with the real rows: they are not covered by the "
               "differential-privacy guarantee and should not be released with the data.")


def privacy_section(ledger: accounting.PrivacyLedger, target_epsilon: float, delta: float,
                    summary: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"target_epsilon": target_epsilon, "delta": delta,
                           "epsilon_rdp": accounting.epsilon(ledger, delta, "rdp") if len(ledger) else 0.0,
                           "epsilon_pld": accounting.epsilon(ledger, delta, "pld") if len(ledger) else 0.0,
                           "ledger": ledger.to_dict()["events"]}
    if summary:
        q, sigma, steps = summary["sample_rate"], summary["noise_multiplier"], summary["steps"]
        eta = accounting.eta(q, sigma, steps)
        out["dp_sgd"] = {"steps": steps, "expected_batch_size": summary["batch_size"], "sample_rate": q,
                         "noise_multiplier": sigma, "max_grad_norm": summary.get("max_grad_norm"),
                         "eta_tan": eta, "epsilon_tan": accounting.eps_tan(eta, delta),
                         "privacy_unit": "one row"}
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _codes(real: pd.DataFrame, synthetic: pd.DataFrame, names: list[str],
           bins: MarginalBins) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared integer codes [N, d] of both tables (numeric columns in the real table's quantile bins)."""
    return table_codes(real, synthetic, names, bins)


def marginal_plots(real: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema, bins: MarginalBins) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = schema.names
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.4 * rows), squeeze=False)
    real_codes, syn_codes, sizes = _codes(real, synthetic, names, bins)
    for j, (ax, name) in enumerate(zip(axes.flat, names)):
        a, b, size = real_codes[:, j], syn_codes[:, j], int(sizes[j])
        pa = np.bincount(a, minlength=size) / max(len(a), 1)
        pb = np.bincount(b, minlength=size) / max(len(b), 1)
        x = np.arange(size)
        ax.bar(x - 0.2, pa, width=0.4, label="real", color="#4C72B0")
        ax.bar(x + 0.2, pb, width=0.4, label="synthetic", color="#DD8452")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("per-column marginals (numeric columns in quantile bins of the real table)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def cramers_v_matrix(codes: np.ndarray) -> np.ndarray:
    """Cramer's V of every pair of columns of integer codes [N, d], a symmetric [d, d] matrix."""
    codes = [codes[:, j] for j in range(codes.shape[1])]
    d = len(codes)
    out = np.eye(d)
    for i in range(d):
        for j in range(i + 1, d):
            a, b = codes[i], codes[j]
            ka, kb = int(a.max(initial=0)) + 1, int(b.max(initial=0)) + 1
            table = np.bincount(a * kb + b, minlength=ka * kb).reshape(ka, kb).astype(float)
            table = table[table.sum(1) > 0][:, table.sum(0) > 0]
            n = table.sum()
            if n == 0 or min(table.shape) < 2:
                v = 0.0
            else:
                expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / n
                chi2 = ((table - expected) ** 2 / expected).sum()
                v = math.sqrt(chi2 / (n * (min(table.shape) - 1)))
            out[i, j] = out[j, i] = v
    return out


def association_plot(real: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema, bins: MarginalBins) -> tuple[str, float]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = schema.names
    real_codes, syn_codes, _ = _codes(real, synthetic, names, bins)
    diff = np.abs(cramers_v_matrix(real_codes) - cramers_v_matrix(syn_codes))
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(diff, vmin=0, vmax=max(0.3, float(diff.max())), cmap="magma_r")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title("|Cramer's V real - Cramer's V synthetic| per column pair", fontsize=10)
    return _png(fig), float(diff[np.triu_indices(len(names), 1)].mean())


def curve_plot(curve: list[dict[str, float]]) -> str | None:
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([c["step"] for c in curve], [c["eval_loss"] for c in curve], marker="o")
    ax.set_xlabel("DP-SGD step")
    ax.set_ylabel("held-out NLL per row (nats)")
    ax.grid(alpha=0.3)
    return _png(fig)


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...] | None = None) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(directory: str | Path, report: dict[str, Any], real: pd.DataFrame | None,
                 synthetic: pd.DataFrame | None, schema: Schema) -> tuple[Path, Path]:
    """Write `report.json` and `report.html` into `directory` (each atomically); returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    if real is not None and synthetic is not None:
        bins = MarginalBins.fit(real, schema)
        images["marginals"] = marginal_plots(real, synthetic, schema, bins)
        images["associations"], mean_diff = association_plot(real, synthetic, schema, bins)
        report.setdefault("utility", {})["mean_abs_cramers_v_difference"] = mean_diff
    curve = report.get("training", {}).get("heldout_curve", [])
    if (img := curve_plot(curve)) is not None:
        images["curve"] = img
    json_path, html_path = directory / "report.json", directory / "report.html"
    _write_atomic(json_path, json.dumps(report, indent=1, default=float))
    _write_atomic(html_path, render_html(report, images))
    return json_path, html_path


def render_html(report: dict[str, Any], images: dict[str, str]) -> str:
    p = report["privacy"]
    parts = ["<!doctype html><meta charset='utf-8'><title>tramontane synthetic data report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:13px}th{background:#f3f3f3}.warn{background:#fff3cd;padding:.6em;border:1px solid #e0c36a}"
             "img{max-width:100%}</style>",
             "<h1>Synthetic data report</h1>"]
    parts.append("<h2>Privacy</h2>")
    parts.append(_table([("target epsilon", p["target_epsilon"]), ("delta", p["delta"]),
                         ("epsilon spent (RDP accountant)", p["epsilon_rdp"]),
                         ("epsilon spent (PLD accountant)", p["epsilon_pld"]),
                         *[(k.replace("_", " "), v) for k, v in p.get("dp_sgd", {}).items()]]))
    parts.append("<h3>Privacy ledger</h3>")
    parts.append(_table([(e.get("label", ""), e["type"], json.dumps({k: v for k, v in e.items()
                                                                  if k not in ("label", "type")}))
                         for e in p["ledger"]], ("label", "mechanism", "parameters")))
    if "bounds" in report:
        parts.append("<h3>What epsilon means here</h3>")
        parts.append(_table([(k.replace("_", " "), v) for k, v in report["bounds"].items()]))
    s = report["schema"]
    parts.append("<h2>Schema</h2>")
    if not s["private"]:
        parts.append("<p class='warn'><b>Warning:</b> the schema was inferred from the private rows WITHOUT "
                     "differential privacy. Category sets and numeric ranges may reveal individual rows.</p>")
    parts.append(f"<p>{html.escape(s['source'])}; cost epsilon = {s['epsilon']:.4g}, delta = {s['delta']:.3g}.</p>")
    parts.append(_table([(c["name"], c["kind"], c["values"]) for c in s["columns"]], ("column", "kind", "values")))
    parts.append("<h2>Training</h2>")
    parts.append(_table([(k.replace("_", " "), v) for k, v in report.get("training", {}).items()
                         if not isinstance(v, (list, dict))]))
    if "curve" in images:
        parts.append(f"<img alt='learning curve' src='data:image/png;base64,{images['curve']}'>")
    else:
        parts.append("<p>No held-out table was given, so there is no learning curve (the training loss on "
                     "private rows is not differentially private and is not recorded).</p>")
    if "utility" in report:
        u = report["utility"]
        parts.append("<h2>Utility</h2>")
        parts.append(f"<p class='warn'>{html.escape(NOT_DP_NOTE)}</p>")
        rows = [(f"mean TVD of {k} marginals", v) for k, v in u.get("tvd", {}).items()]
        rows += [(f"same, real test vs real train ({k})", v) for k, v in u.get("tvd_real_test_vs_train", {}).items()]
        rows.append(("synthetic rows identical to a training row", u.get("exact_match_share")))
        if "exact_match_share_real_test" in u:
            rows.append(("same share for real test rows", u["exact_match_share_real_test"]))
        if "heldout_nll_per_row" in u:
            rows.append(("held-out NLL per row (nats)", u["heldout_nll_per_row"]["nll_per_row"]))
        if "mean_abs_cramers_v_difference" in u:
            rows.append(("mean |Cramer's V difference|", u["mean_abs_cramers_v_difference"]))
        parts.append(_table(rows))
        if "ml_efficacy" in u:
            ml = u["ml_efficacy"]
            parts.append(f"<h3>Train on synthetic, test on real (target {html.escape(ml['target'])})</h3>")
            parts.append(_table([(m, src, sc["accuracy"], sc["roc_auc"]) for m, d in ml["scores"].items()
                                 for src, sc in d.items()], ("model", "trained on", "accuracy", "ROC AUC")))
        for key, title in (("marginals", "Marginals"), ("associations", "Pairwise associations")):
            if key in images:
                parts.append(f"<h3>{title}</h3><img alt='{key}' src='data:image/png;base64,{images[key]}'>")
    return "\n".join(parts)


def synthesizer_report(synth: Any, real_train: pd.DataFrame | None = None, synthetic: pd.DataFrame | None = None,
                       real_test: pd.DataFrame | None = None, target: str | None = None) -> dict[str, Any]:
    """The report dictionary of a fitted `Synthesizer` (utility only when the real and synthetic tables are
    given; held-out NLL and ML efficacy only with a held-out test table)."""
    from tramontane.report.utility import evaluate_synthetic

    summary = asdict_or_none(synth.summary)
    if summary is not None:
        summary["max_grad_norm"] = synth.config.max_grad_norm
    schema: Schema = synth.schema
    inference = synth.schema_inference.to_dict() if synth.schema_inference else getattr(
        synth, "_saved_schema_inference", None)
    source = ("given by the user (public)" if inference is None else
              "inferred from the data with differential privacy" if inference["private"] else
              "inferred from the data WITHOUT differential privacy")
    report: dict[str, Any] = {
        "privacy": privacy_section(synth.ledger, synth.epsilon, synth.delta, summary),
        "schema": {"source": source, "private": inference is None or inference["private"],
                   "epsilon": inference["epsilon"] if inference else 0.0,
                   "delta": inference["delta"] if inference else 0.0,
                   "columns": [{"name": c.name, "kind": c.kind, "values": c.n_values} for c in schema.columns]},
        "training": {} if summary is None else {
            "rows": summary["rows"], "rows_dropped_by_schema": summary["rows_dropped_by_schema"],
            "steps": summary["steps"], "expected_batch_size": summary["batch_size"],
            "seconds": summary["seconds"], "model_parameters": synth.model.args.num_parameters(),
            "heldout_curve": summary["eval_curve"]},
    }
    if len(synth.ledger):
        from tramontane.audit.card import privacy_card

        # What the ledger's epsilon means: membership-inference advantage, confidence and per-column
        # reconstruction bounds (all functions of the ledger alone, so they may be released).
        report["bounds"] = privacy_card(synth.ledger, synth.delta, schema)
    if real_train is not None and synthetic is not None:
        test_ll = synth.log_likelihood(real_test) if real_test is not None else None
        report["utility"] = evaluate_synthetic(real_train, synthetic, schema, real_test, target, test_ll)
        report["utility"]["note"] = NOT_DP_NOTE
    return report


def asdict_or_none(obj: Any) -> dict[str, Any] | None:
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else None
