"""The reports' figures, as base64 PNGs for data: URIs (pages stay one self-contained file).

Two kinds, kept apart by what they read:
- from the release only (`synthetic_marginals`, `reconstruction_plot`): the synthetic table on the schema's
  own value ids, and bounds computed from the ledger; these may be shared;
- from real rows (`real_vs_synthetic_marginals`, `association_plot`, `curve_plot`): for the data holder's
  evaluation only.
matplotlib is optional (`pip install 'tramontane[synth]'`) and imported here only.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from tramontane.report.metrics import MarginalBins, table_codes
from tramontane.tables.schema import Schema

REAL, SYNTHETIC, HELDOUT = "#4C72B0", "#DD8452", "#55A868"
_MAX_TICK_LABELS = 24


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - optional extra
        raise ImportError("report plots need matplotlib: pip install 'tramontane[synth]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _grid(n: int, width: float = 4.2, height: float = 2.5) -> tuple[Any, np.ndarray]:
    plt = _pyplot()
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, axes


def _value_labels(spec: Any) -> list[str]:
    if spec.is_numeric:
        edges = spec.edges
        labels = [f"{edges[i]:.4g}" for i in range(spec.n_bins)]
    else:
        labels = [str(c) for c in spec.categories]
    return labels + (["missing"] if spec.missing else [])


# -- from the release only ------------------------------------------------------------------------------

def synthetic_marginals(synthetic: pd.DataFrame, schema: Schema) -> str:
    """Share of the synthetic rows taking each value of each column, on the schema's values (numeric
    columns in the schema's bins). Reads nothing but the synthetic table and the schema."""
    fig, axes = _grid(len(schema.columns))
    ids = schema.value_ids(synthetic)  # N d; every synthetic row is valid under the schema
    for j, (ax, spec) in enumerate(zip(axes.flat, schema.columns)):
        share = np.bincount(ids[:, j], minlength=spec.n_values) / max(len(ids), 1)
        x = np.arange(spec.n_values)
        ax.bar(x, share, width=0.8 if spec.n_values < 40 else 1.0, color=SYNTHETIC)
        ax.set_title(f"{spec.name} ({spec.kind}, {spec.n_values} values)", fontsize=9)
        labels = _value_labels(spec)
        if spec.n_values <= _MAX_TICK_LABELS:
            slanted = spec.n_values > 4
            ax.set_xticks(x, labels, rotation=60 if slanted else 0, ha="right" if slanted else "center",
                          fontsize=6)
        else:
            ticks = np.linspace(0, spec.n_values - 1, 5).round().astype(int)
            ax.set_xticks(ticks, [labels[t] for t in ticks], fontsize=6)
        ax.tick_params(axis="y", labelsize=6)
    fig.suptitle("synthetic rows: share of each value per column", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def reconstruction_plot(rows: Sequence[dict[str, Any]]) -> str:
    """Per column: the chance 1/M of a blind guess and the bound on an informed adversary's success."""
    plt = _pyplot()
    names = [r["column"] for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(rows) + 1.2))
    ax.barh(y + 0.2, [r["chance"] for r in rows], height=0.4, color="#999999", label="blind guess (1/M)")
    ax.barh(y - 0.2, [r["bound"] for r in rows], height=0.4, color=REAL,
            label="at most, knowing all other rows")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of guessing a person's value right", fontsize=8)
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# -- from real rows (data holder only) ------------------------------------------------------------------

def _codes(df: pd.DataFrame, schema: Schema, bins: MarginalBins) -> np.ndarray:
    """Integer codes [N, d] on one scale for every table: numeric columns in `bins`, categorical ones by
    the schema's value ids (anything outside the schema: the code after them)."""
    codes = []
    for spec in schema.columns:
        if spec.name in bins.cuts:
            codes.append(bins.codes(df[spec.name], spec.name))
        else:
            ids = spec.value_index(df[spec.name], clip=True)
            codes.append(np.where(ids < 0, spec.n_values, ids))
    return np.stack(codes, axis=1)


def real_vs_synthetic_marginals(real: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema,
                                bins: MarginalBins, real_test: pd.DataFrame | None = None) -> str:
    """Per-column marginals of the real training rows, the synthetic rows and (when given) held-out real
    rows; numeric columns in quantile bins of the real training table, categories in schema order."""
    fig, axes = _grid(len(schema.columns))
    series = [("real (training)", real, REAL), ("synthetic", synthetic, SYNTHETIC)]
    if real_test is not None:
        series.append(("real (held out)", real_test, HELDOUT))
    coded = [(label, _codes(df, schema, bins), color) for label, df, color in series]
    width = 0.8 / len(series)
    for j, (ax, spec) in enumerate(zip(axes.flat, schema.columns)):
        size = max(int(codes[:, j].max(initial=0)) + 1 for _, codes, _ in coded)
        x = np.arange(size)
        for k, (label, codes, color) in enumerate(coded):
            share = np.bincount(codes[:, j], minlength=size) / max(len(codes), 1)
            ax.bar(x + (k - (len(series) - 1) / 2) * width, share, width=width, label=label, color=color)
        ax.set_title(spec.name, fontsize=9)
        if spec.name in bins.cuts:
            ax.set_xlabel("quantile bin of the real training rows", fontsize=7)
        elif size <= _MAX_TICK_LABELS:
            labels = (_value_labels(spec) + ["other"])[:size]
            slanted = size > 4
            ax.set_xticks(x, labels, rotation=60 if slanted else 0, ha="right" if slanted else "center")
        ax.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("per-column marginals: real training rows, synthetic rows, real held-out rows", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def cramers_v_matrix(codes: np.ndarray) -> np.ndarray:
    """Cramer's V of every pair of columns of integer codes [N, d], a symmetric [d, d] matrix."""
    d = codes.shape[1]
    out = np.eye(d)
    for i in range(d):
        for j in range(i + 1, d):
            a, b = codes[:, i], codes[:, j]
            ka, kb = int(a.max(initial=0)) + 1, int(b.max(initial=0)) + 1
            counts = np.bincount(a * kb + b, minlength=ka * kb).reshape(ka, kb).astype(float)
            counts = counts[counts.sum(1) > 0][:, counts.sum(0) > 0]
            n = counts.sum()
            if n == 0 or min(counts.shape) < 2:
                v = 0.0
            else:
                expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / n
                chi2 = ((counts - expected) ** 2 / expected).sum()
                v = math.sqrt(chi2 / (n * (min(counts.shape) - 1)))
            out[i, j] = out[j, i] = v
    return out


def cramers_v_difference(real: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema,
                         bins: MarginalBins) -> np.ndarray:
    """|Cramer's V real - Cramer's V synthetic| of every column pair [d, d] (zero diagonal)."""
    real_codes, syn_codes, _ = table_codes(real, synthetic, schema.names, bins)
    return np.abs(cramers_v_matrix(real_codes) - cramers_v_matrix(syn_codes))


def association_plot(diff: np.ndarray, names: Sequence[str]) -> str:
    """Heat map of `cramers_v_difference` per column pair."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.0 + 0.45 * len(names), 2.0 + 0.45 * len(names)))
    im = ax.imshow(diff, vmin=0, vmax=max(0.3, float(diff.max())), cmap="magma_r")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title("|Cramer's V real - Cramer's V synthetic|", fontsize=9)
    return _png(fig)


def curve_plot(curve: Sequence[dict[str, float]]) -> str | None:
    """Held-out NLL per row over DP-SGD steps; None without points."""
    if not curve:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([c["step"] for c in curve], [c["eval_loss"] for c in curve], marker="o")
    ax.set_xlabel("DP-SGD step")
    ax.set_ylabel("held-out NLL per row (nats)")
    ax.grid(alpha=0.3)
    return _png(fig)
