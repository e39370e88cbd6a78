"""One utility evaluation of a synthetic table against the real one (used by reports and benchmarks)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tramontane.report.metrics import MarginalBins, exact_match_rate, marginal_tvd, ml_efficacy, nll_summary
from tramontane.synth.schema import Schema


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
