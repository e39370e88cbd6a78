"""DP synthetic tables: tramontane (defaults of `tramontane synth`) against AIM and MST (private-pgm).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/synth.py [--dataset adult|cps1988] [--epsilons 1 3 10]
        [--methods tramontane aim mst independent tramontane-noschema] [--rows N] [--seeds 0 1 2]
        [--max-minutes 60] [--aim-rounds 40] [--aim-max-model-size MB] [--pgm-sampler sample|round|both]

Data: a table bundled with tramontane (`tramontane.datasets.BUNDLED`), `--dataset adult` (the default: UCI
Adult, 15 columns, target "income") or `cps1988` (CPS 1988 wages, 7 columns with a heavy-tailed weekly wage
in log-spaced bins, target "parttime"). Private table: its train split (optionally a seeded subsample of
--rows rows); held out: its test split; the target is the table's registered one; delta 1e-5. Every method
is scored in the same PUBLIC schema (the table's documented one, e.g. `adult_schema()`): the baselines get
the rows as the schema's value ids (numeric columns as its bins, categoricals as category indices) with the
full public domain fixed (see `_pgm_worker.py`), preprocessor_eps = 0; every method's output is turned into
value ids and decoded with `schema.frame_from_value_ids` (numbers drawn uniformly inside their bin), so all
are evaluated identically.

Methods:
- tramontane: `SynthConfig()`, what `tramontane synth` uses without flags.
- tramontane-noschema (only when listed in --methods): the same epsilon, delta and `SynthConfig()` with no
  schema given, so the fit infers one with DP out of the same budget (`schema_budget_share`), as `tramontane
  synth` without --schema does. Its rows are cast to the public schema's types, `conform`ed (numbers outside
  the public range clipped: counted as `rows_clipped`) and scored in the public value ids; a row `conform`
  would drop (a value the public schema cannot hold) is not scored and is counted as `rows_unscorable`, shown
  beside its scores. No held-out NLL: its likelihood is over its own bins, not comparable.
- aim, mst: private-pgm's, via smartnoise-synth, sampled i.i.d. from the fitted model (`--pgm-sampler
  sample`; `round` is snsynth's own `sample()`, whose mbi 1.1 sampler makes sibling columns co-monotone:
  kept only to reproduce that failure, see `_pgm_worker.py`; `both` samples one fit both ways and adds
  the rows `aim-round` / `mst-round`, which isolates the sampler). AIM runs with `rounds=40` by default
  (`--aim-rounds`; 0 = snsynth's default of 16 x columns = 240, which spends 1/240 of the budget per
  measurement and did not finish full Adult in 30 min on 2 cores; 40 finished at epsilon 1, 3 and 10).
- independent: the independent-marginals floor, `independent_marginals_baseline` at the same epsilon
  (Laplace-noised 1-way marginals, pure epsilon-DP, columns drawn independently). It always runs, first.

Scoring (identical for every method): mean TVD over all 1-, 2- and 3-way marginals under two binnings,
side by side: the schema's own value ids ("schema": numeric columns in its 100 bins) and 10 quantile bins
per numeric column fitted on real train ("q10", `MarginalBins.fit(train, schema, 10)`, which does not
depend on our discretisation); ML efficacy of HistGradientBoosting and logistic regression trained on
synthetic and tested on real test; exact-match share; held-out NLL per row for tramontane, the only method
with a likelihood here (`tramontane.report.utility.evaluate_synthetic`). The held-out real test table is
scored the same way as a reference row.

The floor check: a method whose 2-way TVD is not below the independent floor's under both binnings has a
joint no better than independent columns, the signature of a broken sampler or fit. A baseline (AIM, MST)
that fails it is REFUSED: its numbers are neither printed in the table nor used in a ratio, and the reason
is printed instead, so a broken baseline can never make tramontane look good. tramontane failing it is
printed and compared all the same, marked "below floor" with the reason: that can only make it look worse.

Each (method, epsilon) runs alone in a subprocess: wall time is the subprocess's (imports included; fit and
sample times are reported separately), its CPU seconds (user + system, from wait4: on a loaded machine the
wall time is inflated, and CPU seconds / cores is what the job needs on a quiet one), peak memory its max RSS.
A job that finished before in the same folder with the same settings is reused, not run again, so a long
benchmark that was stopped resumes where it was. With several `--seeds` every seed runs in WORKDIR/seed<N>
and the last table and the JSON's `results` are the medians over the seeds (`n` of `of` seeds scored; the
per-seed figures under `per_seed`). AIM and MST pin old packages, so
they run in their own venv (default `.bench/pgm-venv`), which this script creates on first use:
`python3 -m venv`, `pip install torch==2.13.0` (the CPU wheel, so pip does not pull a CUDA torch), then
`pip install smartnoise-synth`.

The last line is one JSON object (the dataset, its target, the row counts): per epsilon and method the
figures (a refused baseline carries `refused`, a tramontane below the floor `below_floor`: why), per epsilon
every floor-check failure, and, where AIM is not refused, `tvd3_vs_aim` (tramontane / AIM 3-way TVD per
binning, < 1 is better) and `auc_vs_aim` (tramontane - AIM ROC AUC, per classifier; > 0 is better).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

# the benchmarks' shared helpers, however this file is loaded (as a script or by path, as the tests do)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _venv import ensure_venv  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = ROOT / ".bench" / "pgm-venv"
PGM_TORCH = "torch==2.13.0"
DELTA = 1e-5
FLOOR = "independent"  # the independent-marginals floor every other method must beat on 2-way TVD
NOSCHEMA = "tramontane-noschema"  # schema inferred with DP; runs only when listed in --methods
METHODS = ("tramontane", "aim", "mst", FLOOR)
OPTIONAL_METHODS = (NOSCHEMA,)
NAME_WIDTH = max(len(m) for m in (*METHODS, *OPTIONAL_METHODS, "held-out"))  # the table's method column
PGM_METHODS = ("aim", "mst")
SAMPLERS = ("sample", "round", "both")  # both: one fit sampled both ways, rows "aim" and "aim-round"
DEFAULT_AIM_ROUNDS = 40  # the strongest setting that finished full Adult at every epsilon inside 30 min
QUANTILE_BINS = 10
BINNINGS = ("schema", f"q{QUANTILE_BINS}")  # the schema's value ids; quantile bins fitted on real train
CLASSIFIERS = ("hist_gbdt", "logistic")


def load_tables(rows: int | None, seed: int, dataset: str = "adult"):
    """(schema, train, test): the bundled table's public schema, its train split (a seeded subsample of
    `rows` rows, if given) and its test split."""
    from tramontane.datasets import BUNDLED

    table = BUNDLED[dataset]
    schema = table.schema()
    train, test = schema.conform(table.load("train")), schema.conform(table.load("test"))
    if rows is not None and rows < len(train):
        train = train.sample(n=rows, random_state=seed).reset_index(drop=True)
    return schema, train, test


def job_tables(job: dict):
    """load_tables for a worker's job; a job.json without "dataset" (written before --dataset) is Adult."""
    if "dataset" in job:
        return load_tables(job["rows"], job["seed"], job["dataset"])
    return load_tables(job["rows"], job["seed"])


# -- the baselines' venv ---------------------------------------------------------------------------------

def ensure_pgm_venv(venv: Path) -> Path:
    """The baselines' venv's python: the torch CPU wheel first (else smartnoise-synth pulls a CUDA build), then
    smartnoise-synth; created once."""
    python = ensure_venv(venv, "import snsynth", [[PGM_TORCH], ["smartnoise-synth"]],
                         "smartnoise-synth and its pinned mbi (a few minutes)")
    torch_version = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    if not torch_version.startswith(PGM_TORCH.split("==")[1]):
        print(f"WARNING: smartnoise-synth replaced {PGM_TORCH} by torch {torch_version}", flush=True)
    return python


def pgm_versions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json\nv = {}\n"
            "for p in ('smartnoise-synth', 'private-pgm', 'mbi', 'torch', 'jax', 'numpy', 'pandas'):\n"
            "    try: v[p] = m.version(p)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(v))")
    out = subprocess.run([str(python), "-c", code], check=False, capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


# -- one method in one subprocess ------------------------------------------------------------------------

def run_child(cmd: list[str], max_seconds: float, log_path: Path) -> dict:
    """Run `cmd`, return wall seconds, CPU seconds (user + system, children included, from wait4), peak RSS
    (MiB) and the exit status; kill at the limit. On a loaded machine the wall time is inflated; the CPU seconds
    divided by the cores the job uses are what it needs on a quiet one."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > max_seconds:
                os.killpg(proc.pid, signal.SIGKILL)
                timed_out = True
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_seconds": time.perf_counter() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "returncode": proc.returncode, "timed_out": timed_out}


def _setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def fit_and_sample(job: dict, schema, train: pd.DataFrame):
    """(synthesizer, as many sampled rows as `train`, fit seconds, sample seconds) with `SynthConfig()`, the
    defaults `tramontane synth` uses; `schema` None infers it with DP inside the same budget."""
    from tramontane.synth.synthesizer import SynthConfig, Synthesizer

    start = time.perf_counter()
    config = SynthConfig(**job.get("synth_config", {}))  # `--set`: an ablation; default: the defaults
    synth = Synthesizer(schema, job["epsilon"], job["delta"], config, seed=job["seed"]).fit(train)
    fit_s = time.perf_counter() - start
    sample = synth.sample(len(train), seed=job["seed"])
    return synth, sample, fit_s, time.perf_counter() - start - fit_s


def tramontane_worker(job_dir: Path) -> None:
    """Fit the defaults (`SynthConfig()`, as `tramontane synth` uses), sample as many rows, score test."""
    job = json.loads((job_dir / "job.json").read_text())
    schema, train, test = job_tables(job)
    synth, sample, fit_s, sample_s = fit_and_sample(job, schema, train)
    np.save(job_dir / "synthetic_ids.npy", schema.value_ids(sample))
    np.save(job_dir / "test_ll.npy", synth.log_likelihood(test))
    privacy = synth.privacy()
    s = synth.summary
    (job_dir / "result.json").write_text(json.dumps({
        "fit_seconds": fit_s, "sample_seconds": sample_s, "epsilon_rdp": privacy["epsilon_rdp"],
        "epsilon_pld": privacy["epsilon_pld"], "batch_size": s.batch_size, "steps": s.steps,
        "noise_multiplier": s.noise_multiplier}))


def independent_worker(job_dir: Path) -> None:
    """The floor: columns drawn independently from epsilon-DP (Laplace) 1-way marginals, as many rows."""
    from tramontane.report.metrics import independent_marginals_baseline

    job = json.loads((job_dir / "job.json").read_text())
    schema, train, _ = job_tables(job)
    start = time.perf_counter()
    sample = independent_marginals_baseline(train, schema, len(train), np.random.default_rng(job["seed"]),
                                            epsilon=job["epsilon"])
    np.save(job_dir / "synthetic_ids.npy", schema.value_ids(sample))
    (job_dir / "result.json").write_text(json.dumps({"fit_seconds": time.perf_counter() - start,
                                                     "sample_seconds": 0.0}))


def public_value_ids(schema, rows: pd.DataFrame) -> tuple[np.ndarray, int, int, dict[str, int]]:
    """(ids, rows_unscorable, rows_clipped, clipped per column): `rows` (drawn under some other schema) in
    the public schema's value ids. Categorical columns are cast to text where the public categories are text
    (an inferred schema may hold numbers or booleans), then `schema.conform` clips numbers into the public
    ranges (`rows_clipped` rows had one clipped) and drops the rows it cannot hold (an unknown category, a
    missing value the public schema has no room for): those are counted in `rows_unscorable`, never
    scored."""
    frame = rows[schema.names].copy()
    for spec in schema.columns:
        if spec.kind == "categorical" and all(isinstance(c, str) for c in spec.categories):
            col = frame[spec.name]
            frame[spec.name] = col.astype(object).where(col.isna(), col.astype(str))
    held = np.ones(len(frame), dtype=bool)
    exact = {}
    for spec in schema.columns:
        held &= spec.value_index(frame[spec.name], clip=True) >= 0  # what conform keeps
        exact[spec.name] = spec.value_index(frame[spec.name]) >= 0
    conformed = schema.conform(frame)
    assert len(conformed) == int(held.sum())
    clipped = {name: int((held & ~ok).sum()) for name, ok in exact.items()}
    clipped_rows = int((held & ~np.logical_and.reduce(list(exact.values()))).sum())
    return (schema.value_ids(conformed), int((~held).sum()), clipped_rows,
            {name: n for name, n in clipped.items() if n})


def noschema_worker(job_dir: Path) -> None:
    """`SynthConfig()` with no schema: inferred with DP inside the same budget; scored in the public ids."""
    job = json.loads((job_dir / "job.json").read_text())
    public, train, _ = job_tables(job)
    synth, sample, fit_s, sample_s = fit_and_sample(job, None, train)
    ids, unscorable, clipped, clipped_by_column = public_value_ids(public, sample)
    np.save(job_dir / "synthetic_ids.npy", ids)
    synth.schema.save(job_dir / "inferred_schema.json")  # DP output: the data holder's to inspect
    privacy = synth.privacy()
    s = synth.summary
    (job_dir / "result.json").write_text(json.dumps({
        "fit_seconds": fit_s, "sample_seconds": sample_s, "epsilon_rdp": privacy["epsilon_rdp"],
        "epsilon_pld": privacy["epsilon_pld"], "batch_size": s.batch_size, "steps": s.steps,
        "noise_multiplier": s.noise_multiplier, "schema_epsilon": s.schema_epsilon,
        "inferred_n_values": {c.name: c.n_values for c in synth.schema.columns},
        "rows_sampled": len(sample), "rows_unscorable": unscorable, "rows_clipped": clipped,
        "rows_clipped_by_column": clipped_by_column}))


WORKERS = {"tramontane": tramontane_worker, NOSCHEMA: noschema_worker, FLOOR: independent_worker}


def run_method(method: str, epsilon: float, seed: int, args, schema, train, pgm_python: Path | None,
               work: Path) -> dict:
    """Run one method at one epsilon and seed in its own subprocess, in `work/<method>-eps<epsilon>`. A job
    that finished there before with the same settings is not run again (a long benchmark resumes)."""
    job_dir = work / f"{method}-eps{epsilon:g}"
    job_dir.mkdir(parents=True, exist_ok=True)
    job = {"method": method, "epsilon": epsilon, "delta": DELTA, "seed": seed, "rows": args.rows,
           "synth_config": args.synth_config,
           "dataset": args.dataset}
    if method in WORKERS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_dir)]
    else:
        job["n_values"] = [spec.n_values for spec in schema.columns]
        job["sampler"] = args.pgm_sampler
        options = {}
        if method == "aim":
            if args.aim_rounds > 0:
                options["rounds"] = args.aim_rounds
            if args.aim_max_model_size is not None:
                options["max_model_size"] = args.aim_max_model_size
        job["options"] = options
        np.save(job_dir / "train_ids.npy", schema.value_ids(train))
        cmd = [str(pgm_python), str(Path(__file__).resolve().parent / "_pgm_worker.py"), str(job_dir)]
    finished = job_dir / "run.json"
    if finished.exists() and (job_dir / "result.json").exists() and json.loads(
            (job_dir / "job.json").read_text()) == job:  # the same job ran to the end before: reuse it
        run = json.loads(finished.read_text())
        return {**run, **json.loads((job_dir / "result.json").read_text()), "options": job.get("options", {})}
    finished.unlink(missing_ok=True)
    (job_dir / "result.json").unlink(missing_ok=True)
    (job_dir / "job.json").write_text(json.dumps(job))
    run = run_child(cmd, args.max_minutes * 60, job_dir / "log.txt")
    if run["returncode"] == 0 and (job_dir / "result.json").exists():
        finished.write_text(json.dumps(run))
    if run["returncode"] != 0 or not (job_dir / "result.json").exists():
        tail = (job_dir / "log.txt").read_text()[-2000:]
        print(f"{method} eps={epsilon:g} FAILED ({'timed out' if run['timed_out'] else run['returncode']}):\n"
              f"{tail}", flush=True)
        return {**run, "failed": True, "options": job.get("options", {})}
    return {**run, **json.loads((job_dir / "result.json").read_text()), "options": job.get("options", {})}


# -- evaluation (identical for every method) -------------------------------------------------------------

def tvd_by_binning(schema, train, other, q_bins) -> dict[str, dict[int, float]]:
    """Mean 1/2/3-way TVD of `other` against real `train` under each binning in BINNINGS.

    "schema": every column as the schema's value ids (numbers in its bins), compared as categories.
    "q10": numbers in the quantile bins `q_bins` fitted on real train, categories as they are.
    """
    from tramontane.report.metrics import MarginalBins, marginal_tvd

    def ids(df):  # categorical dtype: marginal_tvd compares the ids as categories, not as numbers
        return pd.DataFrame(schema.value_ids(df), columns=schema.names).astype("category")

    by_ids = marginal_tvd(ids(train), ids(other), bins=MarginalBins({}), orders=(1, 2, 3))
    by_quantiles = marginal_tvd(train, other, schema=schema, bins=q_bins, orders=(1, 2, 3))
    return dict(zip(BINNINGS, (by_ids.mean, by_quantiles.mean)))


def summarise_tvd(tvd: dict[str, dict[int, float]]) -> dict[str, float]:
    """{binning: {k: tvd}} as the flat keys summarise() uses: tvd{k}_{binning}."""
    return {f"tvd{k}_{b}": v for b, per_k in tvd.items() for k, v in per_k.items()}


def evaluate(schema, train, test, target: str, q_bins, job_dir: Path,
             rows: str = "synthetic_ids.npy") -> dict:
    from tramontane.report.utility import evaluate_synthetic

    # numbers drawn uniformly inside their bin, for every method alike (no pile-up on the bins' centres)
    synthetic = schema.frame_from_value_ids(np.load(job_dir / rows), np.random.default_rng(0))
    ll_path = job_dir / "test_ll.npy"
    ll = np.load(ll_path) if ll_path.exists() else None
    ev = evaluate_synthetic(train, synthetic, schema, test, target, ll, threads=1)
    return {**ev, "tvd_by_binning": tvd_by_binning(schema, train, synthetic, q_bins)}


def summarise(run: dict, ev: dict | None) -> dict:
    out = {k: run.get(k) for k in ("wall_seconds", "cpu_seconds", "fit_seconds", "sample_seconds", "peak_rss_mib",
                                     "options")}
    if "sampler" in run:
        out["sampler"] = run["sampler"]
    if "epsilon_rdp" in run:
        out.update({k: run[k] for k in ("epsilon_rdp", "epsilon_pld", "batch_size", "steps", "noise_multiplier")})
    extra = ("schema_epsilon", "inferred_n_values", "rows_sampled", "rows_unscorable", "rows_clipped",
             "rows_clipped_by_column")
    out.update({k: run[k] for k in extra if k in run})  # tramontane-noschema
    if ev is None:
        out["failed"] = "timed out" if run.get("timed_out") else f"exit {run.get('returncode')}"
        return out
    out.update(summarise_tvd(ev["tvd_by_binning"]))
    # evaluate_synthetic's own 20 quantile bins, the binning of the withdrawn figures (JSON only)
    out.update({f"tvd{k}_q20": ev["tvd"][f"{k}-way"] for k in (1, 2, 3)})
    for clf in CLASSIFIERS:
        scores = ev["ml_efficacy"]["scores"][clf]
        out[f"{clf}_acc"], out[f"{clf}_auc"] = scores["synthetic"]["accuracy"], scores["synthetic"]["roc_auc"]
        out[f"{clf}_acc_real"], out[f"{clf}_auc_real"] = scores["real"]["accuracy"], scores["real"]["roc_auc"]
    out["exact_match_share"] = ev["exact_match_share"]
    if "heldout_nll_per_row" in ev:
        out["heldout_nll_per_row"] = ev["heldout_nll_per_row"]["nll_per_row"]
    return out


def is_baseline(name: str) -> bool:
    return name.removesuffix("-round") in PGM_METHODS


def floor_check(per: dict[str, dict]) -> dict[str, str]:
    """Why each method of one epsilon fails the check: its 2-way TVD is not below the independent floor's
    under every binning (or there is no floor to check against). Failed runs and the floor are not checked."""
    floor = per.get(FLOOR)
    refused = {}
    for method, r in per.items():
        if method == FLOOR or "failed" in r:
            continue
        if floor is None or "failed" in floor:
            refused[method] = "no independent-marginals floor at this epsilon to check its 2-way TVD against"
            continue
        losing = [b for b in BINNINGS if not r[f"tvd2_{b}"] < floor[f"tvd2_{b}"]]
        if losing:
            figures = ", ".join(f"{r[f'tvd2_{b}']:.4f} vs {floor[f'tvd2_{b}']:.4f} ({b} bins)" for b in losing)
            refused[method] = (f"2-way TVD not below the independent-marginals floor's: {figures}; a joint no "
                               "better than independent columns is the signature of a broken sampler or fit")
    return refused


def apply_floor_check(per: dict[str, dict]) -> dict[str, str]:
    """floor_check, recorded on the rows: a failing baseline gets `refused`, tramontane `below_floor`."""
    failures = floor_check(per)
    for name, why in failures.items():
        per[name]["refused" if is_baseline(name) else "below_floor"] = why
    return failures


def ratios_vs_aim(results: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """tramontane against AIM per epsilon, where both ran and neither is refused."""
    out: dict[str, dict] = {"tvd3_vs_aim": {}, "auc_vs_aim": {}}
    for eps, per in results.items():
        ours, aim = per.get("tramontane"), per.get("aim")
        if not ours or not aim or any("failed" in r or "refused" in r for r in (ours, aim)):
            continue
        out["tvd3_vs_aim"][eps] = {b: ours[f"tvd3_{b}"] / aim[f"tvd3_{b}"] for b in BINNINGS}
        out["auc_vs_aim"][eps] = {clf: ours[f"{clf}_auc"] - aim[f"{clf}_auc"] for clf in CLASSIFIERS}
    return out


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def tvd_cells(r: dict) -> str:
    return " ".join(f"{r[f'tvd{k}_{b}']:6.4f}" for b in BINNINGS for k in (1, 2, 3))


def progress_line(eps: str, name: str, r: dict) -> str:
    if "failed" in r:
        status = "FAILED"
    elif "refused" in r:
        status = f"REFUSED: {r['refused']}"
    else:
        status = ("BELOW FLOOR: " if "below_floor" in r else "") + (
            " ".join(f"tvd{k} {r[f'tvd{k}_{BINNINGS[0]}']:.4f} / {r[f'tvd{k}_{BINNINGS[1]}']:.4f}" for k in (2, 3))
            + f" ({' / '.join(BINNINGS)})  gbdt auc {fmt(r['hist_gbdt_auc'], '.4f')}  "
            f"lr auc {fmt(r['logistic_auc'], '.4f')}")
    note = f"  ({unscorable_note(r)})" if "rows_unscorable" in r else ""
    cpu = fmt(r.get("cpu_seconds"), ".0f")
    return f"  eps={eps} {name}: {status}  {r['wall_seconds']:.0f} s ({cpu} CPU s){note}"


def unscorable_note(r: dict) -> str:
    """tramontane-noschema: how many of its rows the public schema held only after clipping, or not at all."""
    return (f"{r['rows_unscorable']} of {r['rows_sampled']} rows unscorable (not scored: the public schema "
            f"cannot hold them), {r['rows_clipped']} scored after clipping into the public ranges "
            f"{r.get('rows_clipped_by_column') or ''}")


def print_table(results: dict, held_out: dict) -> None:
    tvd_head = " ".join(f"{f'tvd{k} {b[:3]}':>6}" for b in BINNINGS for k in (1, 2, 3))
    head = (f"{'eps':>4} {'method':<{NAME_WIDTH}} {tvd_head} {'gbdt acc':>8} {'gbdt auc':>8} "
            f"{'lr acc':>6} {'lr auc':>6} {'exact':>6} {'nll':>6} {'wall s':>7} {'cpu s':>7} {'peak MiB':>8}")
    print(f"TVD: mean over all k-way marginals; 'sch' = the schema's bins, '{BINNINGS[1]}' = {QUANTILE_BINS} "
          "quantile bins per numeric column fitted on real train")
    print(head)
    print("-" * len(head))
    for eps, per in results.items():
        for method, r in per.items():
            if "failed" in r:
                print(f"{eps:>4} {method:<{NAME_WIDTH}} FAILED: {r['failed']} after "
                      f"{r['wall_seconds']:.0f} s")
                continue
            if "refused" in r:
                print(f"{eps:>4} {method:<{NAME_WIDTH}} REFUSED: {r['refused']}")
                continue
            if "below_floor" in r:
                print(f"{eps:>4} {method:<{NAME_WIDTH}} BELOW FLOOR (still printed and compared): "
                      f"{r['below_floor']}")
            print(f"{eps:>4} {method:<{NAME_WIDTH}} {tvd_cells(r)} "
                  f"{r['hist_gbdt_acc']:8.4f} {fmt(r['hist_gbdt_auc'], '8.4f')} {r['logistic_acc']:6.4f} "
                  f"{fmt(r['logistic_auc'], '6.4f')} {r['exact_match_share']:6.4f} "
                  f"{fmt(r.get('heldout_nll_per_row'), '6.2f')} {r['wall_seconds']:7.0f} "
                  f"{fmt(r.get('cpu_seconds'), '7.0f')} {r['peak_rss_mib']:8.0f}")
            if "rows_unscorable" in r:
                print(f"{'':>4} {'':<{NAME_WIDTH}} {unscorable_note(r)}")
        ref = next((r for r in per.values() if "failed" not in r), None)
        if ref:
            print(f"{eps:>4} {'real':<{NAME_WIDTH}} {'':<{7 * len(BINNINGS) * 3 - 1}} "
                  f"{ref['hist_gbdt_acc_real']:8.4f} {fmt(ref['hist_gbdt_auc_real'], '8.4f')} "
                  f"{ref['logistic_acc_real']:6.4f} {fmt(ref['logistic_auc_real'], '6.4f')}   (train on real)")
    print(f"{'-':>4} {'held-out':<{NAME_WIDTH}} {tvd_cells(held_out)}   (real test rows against real train)")


def main() -> None:
    from tramontane.datasets import BUNDLED

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=list(BUNDLED), default="adult",
                   help="the bundled table: its train split is private, its test split held out")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    p.add_argument("--methods", nargs="+", choices=(*METHODS, *OPTIONAL_METHODS), default=list(METHODS),
                   help=f"'{FLOOR}' (the floor every method is checked against) always runs; "
                        f"{', '.join(OPTIONAL_METHODS)} only when listed")
    p.add_argument("--rows", type=int, default=None, help="seeded subsample of the private table (quick runs)")
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                   help="one run per seed (each in WORKDIR/seed<N> when there are several), then the medians")
    p.add_argument("--set", dest="synth_config", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="an ablation: override one SynthConfig field for tramontane's runs (repeatable; the "
                        "value is read as JSON, else as a string), e.g. --set steps=200 --set accountant=pld")
    p.add_argument("--max-minutes", type=float, default=60.0, help="kill one method's run after this long")
    p.add_argument("--aim-rounds", type=int, default=DEFAULT_AIM_ROUNDS,
                   help="AIM's rounds (sets its per-measurement budget); 0: snsynth's default, 16 x columns")
    p.add_argument("--aim-max-model-size", type=float, default=None, help="AIM model size cap, MB (default 80)")
    p.add_argument("--pgm-sampler", choices=SAMPLERS, default="sample",
                   help="AIM/MST sampling: i.i.d. from the model; snsynth's sample() (broken, co-monotone); "
                        "both, from one fit (adds rows aim-round, mst-round)")
    p.add_argument("--pgm-venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs' files here (default: a temp dir)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        WORKERS[json.loads((args.worker / "job.json").read_text())["method"]](args.worker)
        return
    if args.aim_rounds < 0:
        p.error("--aim-rounds must be >= 0")
    args.synth_config = dict(args.synth_config)
    methods = [FLOOR] + [m for m in dict.fromkeys(args.methods) if m != FLOOR]  # the floor first, always

    table = BUNDLED[args.dataset]
    pgm_python = ensure_pgm_venv(args.pgm_venv) if set(methods) & set(PGM_METHODS) else None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tramontane-synth-bench-"))
    per_seed: dict[str, dict] = {}
    held_out: dict[str, float] = {}
    for seed in args.seeds:
        seed_work = work / f"seed{seed}" if len(args.seeds) > 1 else work
        held_out, per_seed[str(seed)] = run_seed(seed, methods, args, pgm_python, seed_work)
    if len(args.seeds) > 1:
        results = median_results([r["results"] for r in per_seed.values()])
        print(f"\nMedians over seeds {', '.join(map(str, args.seeds))} (the baselines' noise is not seedable: "
              "each seed is a fresh fit); 'n' in the JSON: how many seeds each median is over")
        print_table(results, held_out)
    else:
        results = next(iter(per_seed.values()))["results"]
    print(json.dumps({"benchmark": "synth", "dataset": args.dataset, "target": table.target,
                      "rows": per_seed[str(args.seeds[0])]["rows"],
                      "test_rows": per_seed[str(args.seeds[0])]["test_rows"],
                      "delta": DELTA, "seeds": args.seeds, "cpus": os.cpu_count(),
                      "aim_rounds": args.aim_rounds, "pgm_sampler": args.pgm_sampler,
                      "quantile_bins": QUANTILE_BINS,
                      "pgm_versions": pgm_versions(pgm_python) if pgm_python else None,
                      "held_out_real": held_out, "results": results,
                      "per_seed": per_seed if len(args.seeds) > 1 else None,
                      "floor_check_failed": {s: r["floor_check_failed"] for s, r in per_seed.items()},
                      **ratios_vs_aim(results)}))


def run_seed(seed: int, methods: list[str], args, pgm_python: Path | None, work: Path) -> tuple[dict, dict]:
    """Every method at every epsilon for one seed: prints progress and the table, returns (the held-out
    real rows' TVDs, {"results": per epsilon and method, "floor_check_failed": per epsilon})."""
    from tramontane.datasets import BUNDLED
    from tramontane.report.metrics import MarginalBins

    table = BUNDLED[args.dataset]
    schema, train, test = load_tables(args.rows, seed, args.dataset)
    q_bins = MarginalBins.fit(train, schema, QUANTILE_BINS)
    held_out = summarise_tvd(tvd_by_binning(schema, train, test, q_bins))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{table.title}: {len(train)} private rows, {len(test)} held out; target {table.target!r}; "
          f"delta {DELTA:g}; seed {seed}; AIM rounds {args.aim_rounds or 'snsynth default'}; "
          f"AIM/MST sampler {args.pgm_sampler}; "
          f"cpus {os.cpu_count()}; load {os.getloadavg()[0]:.1f}; files in {work}", flush=True)
    results: dict[str, dict[str, dict]] = {}
    floor_failures: dict[str, dict[str, str]] = {}
    for eps in args.epsilons:
        per = results.setdefault(f"{eps:g}", {})
        for method in methods:
            load = os.getloadavg()[0]
            run = run_method(method, eps, seed, args, schema, train, pgm_python, work)
            job_dir = work / f"{method}-eps{eps:g}"
            rows = {method: "synthetic_ids.npy"}
            if method in PGM_METHODS and args.pgm_sampler == "both":
                rows[f"{method}-round"] = "synthetic_ids_round.npy"  # the same fit, snsynth's sample()
            for name, path in rows.items():
                ev = (None if run.get("failed")
                      else evaluate(schema, train, test, table.target, q_bins, job_dir, path))
                per[name] = r = {**summarise(run, ev), "load_before": load}
                if name.endswith("-round"):
                    r["sampler"] = "round"
                if name != FLOOR:
                    apply_floor_check({FLOOR: per[FLOOR], name: r})
                print(progress_line(f"{eps:g}", name, r), flush=True)
        floor_failures[f"{eps:g}"] = floor_check(per)  # every failure, refused or only marked
    print()
    print_table(results, held_out)
    return held_out, {"results": results, "floor_check_failed": floor_failures, "rows": len(train),
                      "test_rows": len(test)}


def median_results(runs: list[dict[str, dict[str, dict]]]) -> dict[str, dict[str, dict]]:
    """Per epsilon and method, the median of every number over the seeds where the method was scored
    (neither failed nor refused; `n` says how many). A method with no scored seed keeps the first seed's
    failure or refusal."""
    out: dict[str, dict[str, dict]] = {}
    for eps in runs[0]:
        for method in runs[0][eps]:
            rows = [run[eps][method] for run in runs if method in run.get(eps, {})]
            scored = [r for r in rows if "failed" not in r and "refused" not in r]
            if not scored:
                out.setdefault(eps, {})[method] = rows[0]
                continue
            keys = [k for k, v in scored[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            merged: dict[str, object] = {k: float(np.median([r[k] for r in scored if r.get(k) is not None]))
                      for k in keys if any(r.get(k) is not None for r in scored)}
            merged.update({"options": scored[0].get("options", {}), "n": len(scored), "of": len(rows)})
            below = [r["below_floor"] for r in scored if "below_floor" in r]
            if below:
                merged["below_floor"] = f"{len(below)} of {len(scored)} seeds: {below[0]}"
            out.setdefault(eps, {})[method] = merged
    return out

if __name__ == "__main__":
    main()
