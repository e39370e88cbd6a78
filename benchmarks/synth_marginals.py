"""Ablations of the measured marginals on one fitted model: re-measure, sample and score, without refitting.

A `tramontane synth` fit spends most of its time in DP-SGD; the marginals (`synth/marginals.py`) are
measured after it, from the trained model's samples. This script fits the defaults once on a bundled table
(or reuses a saved fit), then for each variant measures the marginals again with other settings on the same
private rows, samples as many rows as the table, and scores them as `benchmarks/synth.py` does (mean 1/2/3-way
TVD under the schema's bins and 10 real-train quantile bins, HistGradientBoosting ROC AUC on the real test
split), with the held-out NLL per row of the real test rows under the model at the variant's sampling
temperature. Variants that change the budget split (`share`, `one_way_weight`, `rounds`) keep the model trained
under the default split: they measure the marginals' side of the trade only. `temperature` and `pool_factor`
change how the pool is drawn (and the final sample, as `SynthConfig`'s fields of those names do).

Every variant re-spends the marginals' budget on the same rows, so this is a benchmark on public data, not
a private workflow. Ends with one JSON line: per variant its scores and its 3-way TVD against the first
variant's (ratios below 1 are better).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/synth_marginals.py --dataset adult --epsilon 1 \\
        --variant default --variant one_way_weight=4 --variant one_way_weight=4,share=0.3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synth as bench  # noqa: E402  (benchmarks/synth.py: the tables and the scorer)

KNOBS = {"share": float, "rounds": int, "one_way_weight": float, "groups_1": int, "groups_2": int,
         "groups_3": int, "temperature": float, "pool_factor": float}


def parse_variant(text: str) -> dict:
    """"default", "none" (no marginals: the model's own samples) or KEY=VALUE,... over KNOBS."""
    if text in ("default", "none"):
        return {"name": text}
    out: dict = {"name": text}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in KNOBS:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY in {sorted(KNOBS)}, got {item!r}")
        out[key] = KNOBS[key](value)
    return out


def heldout_nll(synth, test) -> float:
    """Mean NLL per row (nats) of the real test rows under the model at the synthesizer's sampling temperature
    (the marginals' tilt not included)."""
    import torch

    from tramontane.synth.synthesizer import value_log_likelihood

    model, codec = synth._fitted()
    rows = synth.schema.conform(test)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), 4096):
            enc = codec.encode(rows.iloc[i:i + 4096])
            total -= float(value_log_likelihood(model, codec, enc, synth.config.temperature).sum())
    return total / len(rows)


def score(schema, train, test, target: str, ids: np.ndarray) -> dict:
    from tramontane.report.metrics import MarginalBins
    from tramontane.report.utility import evaluate_synthetic

    synthetic = schema.frame_from_value_ids(ids, np.random.default_rng(0))
    q_bins = MarginalBins.fit(train, schema, bench.QUANTILE_BINS)
    out = bench.summarise_tvd(bench.tvd_by_binning(schema, train, synthetic, q_bins))
    ev = evaluate_synthetic(train, synthetic, schema, test, target, None, threads=2)
    out["hist_gbdt_auc"] = ev["ml_efficacy"]["scores"]["hist_gbdt"]["synthetic"]["roc_auc"]
    return out


def main() -> None:
    from tramontane.datasets import BUNDLED
    from tramontane.synth import marginals
    from tramontane.synth.synthesizer import SynthConfig, Synthesizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(BUNDLED), default="adult")
    p.add_argument("--epsilon", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=None,
                   help="a saved fit to reuse (default: .bench/marginals-<dataset>-eps<epsilon>-s<seed>, fitted "
                        "there first if missing)")
    p.add_argument("--variant", dest="variants", type=parse_variant, action="append", default=[])
    args = p.parse_args()
    variants = args.variants or [parse_variant("default")]
    table = BUNDLED[args.dataset]
    schema, train, test = bench.load_tables(None, args.seed, args.dataset)
    model_dir = args.model or bench.ROOT / ".bench" / f"marginals-{args.dataset}-eps{args.epsilon:g}-s{args.seed}"
    if not (model_dir / "model").exists():
        start = time.perf_counter()
        print(f"fitting the defaults on {table.title} at epsilon {args.epsilon:g} into {model_dir}", flush=True)
        Synthesizer(schema, args.epsilon, bench.DELTA, SynthConfig(), seed=args.seed).fit(train).save(
            model_dir, overwrite=True)
        print(f"fitted in {time.perf_counter() - start:.0f} s", flush=True)
    synth = Synthesizer.load(model_dir)
    c = synth.config
    private = schema.value_ids(schema.conform(train))
    results = {}
    for v in variants:
        start = time.perf_counter()
        # this variant's temperature and pool size, for its pool and its final sample
        synth.config = replace(c, temperature=v.get("temperature", c.temperature),
                               pool_factor=v.get("pool_factor", c.pool_factor))
        if v["name"] == "none":
            synth.marginals = None
        else:
            budget = marginals.plan_budget(synth.epsilon, synth.delta, v.get("share", c.marginal_share), len(schema),
                                           v.get("rounds", c.marginal_rounds), c.selection_share,
                                           v.get("one_way_weight", c.one_way_weight))
            pool = synth._model_ids(max(1000, int(synth.config.pool_factor * len(train))),
                                    np.random.default_rng(args.seed + 1000))
            synth.marginals = marginals.select_adaptive(
                schema, budget, pool, private, len(train), args.seed,
                (v.get("groups_1", c.marginal_groups), v.get("groups_2", c.pair_groups),
                 v.get("groups_3", c.triple_groups)))
        seconds = time.perf_counter() - start
        ids = schema.value_ids(synth.sample(len(train), seed=args.seed))
        results[v["name"]] = r = {**score(schema, train, test, table.target, ids), "marginal_seconds": seconds,
                                  "heldout_nll": heldout_nll(synth, test)}
        print(f"{v['name']:<40} tvd1 {r['tvd1_schema']:.4f} / {r['tvd1_q10']:.4f}  tvd2 {r['tvd2_schema']:.4f} / "
              f"{r['tvd2_q10']:.4f}  tvd3 {r['tvd3_schema']:.4f} / {r['tvd3_q10']:.4f}  gbdt auc "
              f"{r['hist_gbdt_auc']:.4f}  held-out NLL {r['heldout_nll']:.3f}  ({seconds:.0f} s to measure)",
              flush=True)
    first = results[variants[0]["name"]]
    print(json.dumps({"benchmark": "synth_marginals", "dataset": args.dataset, "epsilon": args.epsilon,
                      "seed": args.seed, "results": results,
                      "tvd3_vs_first": {name: {b: r[f"tvd3_{b}"] / first[f"tvd3_{b}"] for b in bench.BINNINGS}
                                        for name, r in results.items()}}))


if __name__ == "__main__":
    main()
