"""benchmarks/synth.py's scoring and floor check, without the baselines' venv: the check must catch a table
whose columns are co-monotone (the failure of snsynth's default sampler on mbi 1.1) and pass real rows."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tramontane.datasets import adult_schema, load_adult
from tramontane.report.metrics import MarginalBins, independent_marginals_baseline

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "synth.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_synth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tables():
    """(schema, real, other real rows, q10 bins): two disjoint seeded 2,000-row samples of Adult train."""
    schema = adult_schema()
    adult = schema.conform(load_adult("train")).sample(n=4000, random_state=0).reset_index(drop=True)
    real, other = adult.iloc[:2000].reset_index(drop=True), adult.iloc[2000:].reset_index(drop=True)
    return schema, real, other, MarginalBins.fit(real, schema, 10)


def _scores(bench, tvd: dict) -> dict:
    return {**bench.summarise_tvd(tvd), "wall_seconds": 1.0}


def test_tvd_by_binning_is_zero_on_the_same_table(bench, tables):
    schema, real, _, q_bins = tables
    tvd = bench.tvd_by_binning(schema, real, real, q_bins)
    assert set(tvd) == set(bench.BINNINGS)
    for per_k in tvd.values():
        assert per_k == {1: 0.0, 2: 0.0, 3: 0.0}


def test_schema_binning_is_blind_to_moves_inside_a_bin(bench, tables):
    """Decoding to bin representatives changes nothing under the schema's bins, but does under quantile bins
    (which do not depend on our discretisation)."""
    schema, real, _, q_bins = tables
    decoded = schema.frame_from_value_ids(schema.value_ids(real))
    tvd = bench.tvd_by_binning(schema, real, decoded, q_bins)
    assert tvd["schema"] == {1: 0.0, 2: 0.0, 3: 0.0}
    assert tvd["q10"][1] > 0.0


def test_floor_check_passes_real_rows_and_refuses_comonotone_columns(bench, tables):
    schema, real, other, q_bins = tables
    rng = np.random.default_rng(0)
    floor = independent_marginals_baseline(real, schema, len(real), rng)
    # Every column sorted on its own: 1-way marginals exact, every pair co-monotone (the broken sampler's
    # signature, in its extreme form).
    ids = np.sort(schema.value_ids(real), axis=0)
    comonotone = schema.frame_from_value_ids(rng.permutation(ids, axis=0))
    per = {name: _scores(bench, bench.tvd_by_binning(schema, real, table, q_bins))
           for name, table in ((bench.FLOOR, floor), ("real", other), ("broken", comonotone))}
    assert per["broken"]["tvd1_schema"] == pytest.approx(0.0)
    refused = bench.floor_check(per)
    assert set(refused) == {"broken"}
    assert "independent-marginals floor" in refused["broken"]


def test_floor_check_needs_every_binning_below_the_floor(bench):
    floor = {"tvd2_schema": 0.15, "tvd2_q10": 0.12}
    per = {bench.FLOOR: floor,
           "ok": {"tvd2_schema": 0.11, "tvd2_q10": 0.08},
           "one": {"tvd2_schema": 0.11, "tvd2_q10": 0.12},  # equal is not below
           "failed": {"failed": "timed out"}}
    refused = bench.floor_check(per)
    assert set(refused) == {"one"}
    assert "q10" in refused["one"] and "schema bins" not in refused["one"]
    no_floor = bench.floor_check({"ok": per["ok"]})
    assert set(no_floor) == {"ok"}
    assert set(bench.floor_check({bench.FLOOR: {"failed": "exit 1"}, "ok": per["ok"]})) == {"ok"}


def test_a_failing_baseline_is_refused_and_a_failing_tramontane_only_marked(bench):
    """A broken baseline must never flatter tramontane; tramontane below the floor can only look worse, so it
    stays in the table and the ratios."""
    low, high = {"tvd2_schema": 0.1, "tvd2_q10": 0.1}, {"tvd2_schema": 0.3, "tvd2_q10": 0.3}
    per = {bench.FLOOR: {"tvd2_schema": 0.2, "tvd2_q10": 0.2}, "aim": dict(high), "mst-round": dict(high),
           "mst": dict(low), "tramontane": dict(high)}
    assert set(bench.apply_floor_check(per)) == {"aim", "mst-round", "tramontane"}
    assert "refused" in per["aim"] and "refused" in per["mst-round"]
    assert "below_floor" in per["tramontane"] and "refused" not in per["tramontane"]
    assert "refused" not in per["mst"] and "below_floor" not in per["mst"]


def test_ratios_skip_a_refused_aim(bench):
    row = {f"tvd3_{b}": 0.2 for b in bench.BINNINGS} | {f"{c}_auc": 0.8 for c in bench.CLASSIFIERS}
    aim = {f"tvd3_{b}": 0.25 for b in bench.BINNINGS} | {f"{c}_auc": 0.75 for c in bench.CLASSIFIERS}
    ratios = bench.ratios_vs_aim({"1": {"tramontane": {**row, "below_floor": "weak"}, "aim": aim},
                                  "3": {"tramontane": row, "aim": {**aim, "refused": "broken"}}})
    assert set(ratios["tvd3_vs_aim"]) == {"1"} and set(ratios["auc_vs_aim"]) == {"1"}
    assert ratios["tvd3_vs_aim"]["1"] == {b: pytest.approx(0.8) for b in bench.BINNINGS}
    assert ratios["auc_vs_aim"]["1"] == {c: pytest.approx(0.05) for c in bench.CLASSIFIERS}


def test_independent_worker_writes_dp_floor_rows(bench, tables, tmp_path, monkeypatch):
    schema, real, _, _ = tables
    monkeypatch.setattr(bench, "load_tables", lambda rows, seed: (schema, real.iloc[:rows], None))
    (tmp_path / "job.json").write_text(pd.Series({"method": bench.FLOOR, "epsilon": 3.0, "delta": 1e-5,
                                                  "seed": 0, "rows": 500}).to_json())
    bench.independent_worker(tmp_path)
    ids = np.load(tmp_path / "synthetic_ids.npy")
    assert ids.shape == (500, len(schema))
    assert (tmp_path / "result.json").exists()


def test_medians_over_seeds_skip_refused_runs_and_count_them(bench):
    def row(tvd3: float, **extra) -> dict:
        return {"tvd3_schema": tvd3, "hist_gbdt_auc": 1 - tvd3, "wall_seconds": 10 * tvd3, **extra}

    seeds = [{"1": {"aim": row(0.30), "tramontane": row(0.10)}},
             {"1": {"aim": row(0.20, refused="below the floor"), "tramontane": row(0.40)}},
             {"1": {"aim": row(0.10), "tramontane": row(0.20, below_floor="weak")}}]
    medians = bench.median_results(seeds)
    aim, ours = medians["1"]["aim"], medians["1"]["tramontane"]
    assert (aim["n"], aim["of"]) == (2, 3) and aim["tvd3_schema"] == pytest.approx(0.20)  # mean of 0.3, 0.1
    assert (ours["n"], ours["of"]) == (3, 3) and ours["tvd3_schema"] == pytest.approx(0.20)
    assert ours["hist_gbdt_auc"] == pytest.approx(0.80) and ours["below_floor"].startswith("1 of 3 seeds")
    every_seed_failed = bench.median_results([{"1": {"mst": {"failed": "timed out"}}}] * 2)
    assert every_seed_failed["1"]["mst"] == {"failed": "timed out"}


def test_a_finished_job_is_reused_and_a_changed_one_runs_again(bench, tmp_path, monkeypatch):
    calls = []

    def fake_child(cmd, max_seconds, log_path):  # the subprocess, as far as run_method can tell
        calls.append(cmd)
        (log_path.parent / "result.json").write_text('{"fit_seconds": 1.0}')
        return {"wall_seconds": 2.0, "cpu_seconds": 3.0, "peak_rss_mib": 1.0, "returncode": 0,
                "timed_out": False}

    monkeypatch.setattr(bench, "run_child", fake_child)
    args = SimpleNamespace(rows=100, synth_config={}, dataset="adult", max_minutes=1.0)
    first = bench.run_method(bench.FLOOR, 1.0, 0, args, None, None, None, tmp_path)
    again = bench.run_method(bench.FLOOR, 1.0, 0, args, None, None, None, tmp_path)
    assert len(calls) == 1 and again == first and first["cpu_seconds"] == 3.0
    bench.run_method(bench.FLOOR, 1.0, 1, args, None, None, None, tmp_path)  # another seed: a new job
    assert len(calls) == 2
