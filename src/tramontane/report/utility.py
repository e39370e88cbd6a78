"""One utility evaluation of a synthetic table against the real one (used by reports and benchmarks)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tramontane.errors import DataError
from tramontane.report.metrics import MarginalBins, exact_match_rate, marginal_tvd, ml_efficacy, nll_summary
from tramontane.tables.schema import Schema, parse_numbers


def numbers_as_floats(df: pd.DataFrame, schema: Schema, table: str = "the table") -> pd.DataFrame:
    """A copy of `df` whose columns the schema calls numeric hold float64 (an empty entry: NaN), each entry
    read from its value (`parse_numbers`): a CSV read as text then gets quantile bins, not categories, even
    where a metric looks at the dtype.

    Raises `DataError` naming every numeric column that holds an entry which is not a finite number
    (infinity, NaN, text): no bin takes it, and `Schema.validate` refuses it too. `table` names the table
    in the message; no message quotes a value from the rows or counts them.
    """
    out = df.copy()
    bad = []
    for spec in schema.columns:
        if not spec.is_numeric or spec.name not in df.columns:
            continue  # a missing column is the column check's to report
        x, missing = parse_numbers(df[spec.name])
        if (~missing & ~np.isfinite(x)).any():
            bad.append(spec.name)
        out[spec.name] = x
    if bad:
        raise DataError(
            f"column(s) {bad} of {table} are numeric but hold entries that are not finite numbers (infinity, "
            "NaN or text); every numeric entry must be a finite number or empty. Fix or drop those rows, or "
            "declare the column categorical in the schema"
        )
    return out


def evaluate_synthetic(real_train: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema,
                       real_test: pd.DataFrame | None = None, target: str | None = None,
                       test_log_likelihoods: np.ndarray | None = None, threads: int | None = 1) -> dict[str, Any]:
    """Marginal TVD (1-, 2-, 3-way), ML efficacy (with a test table and a target), held-out NLL per row (when
    log-likelihoods are given) and the share of synthetic rows identical to a training row.

    These numbers compare against the real rows, so they are NOT covered by any DP guarantee: they are for
    the data owner's evaluation, not for release alongside the synthetic data.
    """
    bins = MarginalBins.fit(real_train, schema)
    orders = tuple(range(1, min(3, len(schema.columns)) + 1))  # 1-, 2-, 3-way, as far as columns allow
    tvd = marginal_tvd(real_train, synthetic, schema=schema, bins=bins, orders=orders)
    out: dict[str, Any] = {"rows_real": len(real_train), "rows_synthetic": len(synthetic),
                           "tvd": {f"{k}-way": v for k, v in tvd.mean.items()},
                           "exact_match_share": exact_match_rate(synthetic, real_train, schema)}
    if real_test is not None:
        test_tvd = marginal_tvd(real_train, real_test, schema=schema, bins=bins, orders=orders)
        out["tvd_real_test_vs_train"] = {f"{k}-way": v for k, v in test_tvd.mean.items()}
        out["exact_match_share_real_test"] = exact_match_rate(real_test, real_train, schema)
        if target is not None:
            out["ml_efficacy"] = ml_efficacy(real_train, synthetic, real_test, target, schema=schema,
                                             threads=threads).to_dict()
    if test_log_likelihoods is not None:
        out["heldout_nll_per_row"] = nll_summary(test_log_likelihoods)
    return out
