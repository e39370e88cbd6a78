"""DP synthetic Adult: tramontane (defaults of `tramontane synth`) against AIM and MST (private-pgm).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/synth.py [--epsilons 1 3 10] [--methods tramontane aim mst]
        [--rows N] [--seed 0] [--max-minutes 60] [--aim-rounds R] [--aim-max-model-size MB]

Private table: Adult train (optionally a seeded subsample of --rows rows); held out: Adult test; target
"income"; delta 1e-5. Every method sees the same PUBLIC schema (`adult_schema()`): the baselines get the
rows as the schema's value ids (numeric columns as its 100 bins, categoricals as category indices) with the
full public domain fixed (see `_pgm_worker.py`), preprocessor_eps = 0; every method's output is turned into
value ids and decoded with `schema.frame_from_value_ids`, so all are evaluated identically by
`tramontane.report.utility.evaluate_synthetic` (1/2/3-way marginal TVD, ML efficacy of HistGradientBoosting
and logistic regression trained on synthetic and tested on real test, exact-match share; held-out NLL per row
for tramontane, the only method with a likelihood here).

Each (method, epsilon) runs alone in a subprocess: wall time is the subprocess's (imports included; fit and
sample times are reported separately), peak memory its max RSS from wait4. AIM and MST pin old packages, so
they run in their own venv (default `.bench/pgm-venv`), which this script creates on first use:
`python3 -m venv`, `pip install torch==2.13.0` (the CPU wheel, so pip does not pull a CUDA torch), then
`pip install smartnoise-synth`.

The last line is one JSON object: per epsilon and method the figures, and per epsilon `tvd3_vs_aim`
(tramontane / AIM 3-way TVD, < 1 is better) and `auc_vs_aim` (tramontane - AIM ROC AUC, per classifier;
> 0 is better).
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

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = ROOT / ".bench" / "pgm-venv"
PGM_TORCH = "torch==2.13.0"
DELTA = 1e-5
TARGET = "income"
METHODS = ("tramontane", "aim", "mst")
CLASSIFIERS = ("hist_gbdt", "logistic")


def load_tables(rows: int | None, seed: int):
    """(train, test): Adult train (a seeded subsample of `rows` rows, if given) and Adult test."""
    from tramontane.datasets import adult_schema, load_adult

    schema = adult_schema()
    train, test = schema.conform(load_adult("train")), schema.conform(load_adult("test"))
    if rows is not None and rows < len(train):
        train = train.sample(n=rows, random_state=seed).reset_index(drop=True)
    return schema, train, test


# -- the baselines' venv ---------------------------------------------------------------------------------

def ensure_pgm_venv(venv: Path) -> Path:
    """The venv's python, creating the venv (torch CPU wheel first, then smartnoise-synth) if missing."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import snsynth"], capture_output=True).returncode == 0:
        return python
    print(f"creating the baselines' venv at {venv} (a few minutes)", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [PGM_TORCH], check=True)
    subprocess.run(pip + ["smartnoise-synth"], check=True)
    torch_version = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    if not torch_version.startswith(PGM_TORCH.split("==")[1]):
        print(f"WARNING: smartnoise-synth replaced {PGM_TORCH} by torch {torch_version}", flush=True)
    return python


def pgm_versions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json\nv = {}\n"
            "for p in ('smartnoise-synth', 'private-pgm', 'mbi', 'torch', 'jax', 'numpy', 'pandas'):\n"
            "    try: v[p] = m.version(p)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(v))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


# -- one method in one subprocess ------------------------------------------------------------------------

def run_child(cmd: list[str], max_seconds: float, log_path: Path) -> dict:
    """Run `cmd`, return wall seconds, peak RSS (MiB, from wait4) and the exit status; kill at the limit."""
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
    return {"wall_seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024,
            "returncode": proc.returncode, "timed_out": timed_out}


def tramontane_worker(job_dir: Path) -> None:
    """Fit the defaults (`SynthConfig()`, as `tramontane synth` uses), sample as many rows, score test."""
    from tramontane.synth.synthesizer import SynthConfig, Synthesizer

    job = json.loads((job_dir / "job.json").read_text())
    schema, train, test = load_tables(job["rows"], job["seed"])
    start = time.perf_counter()
    synth = Synthesizer(schema, job["epsilon"], job["delta"], SynthConfig(), seed=job["seed"]).fit(train)
    fit_s = time.perf_counter() - start
    sample = synth.sample(len(train), seed=job["seed"])
    sample_s = time.perf_counter() - start - fit_s
    np.save(job_dir / "synthetic_ids.npy", schema.value_ids(sample))
    np.save(job_dir / "test_ll.npy", synth.log_likelihood(test))
    privacy = synth.privacy()
    s = synth.summary
    (job_dir / "result.json").write_text(json.dumps({
        "fit_seconds": fit_s, "sample_seconds": sample_s, "epsilon_rdp": privacy["epsilon_rdp"],
        "epsilon_pld": privacy["epsilon_pld"], "batch_size": s.batch_size, "steps": s.steps,
        "noise_multiplier": s.noise_multiplier}))


def run_method(method: str, epsilon: float, args, schema, train, pgm_python: Path | None, work: Path) -> dict:
    job_dir = work / f"{method}-eps{epsilon:g}"
    job_dir.mkdir(parents=True, exist_ok=True)
    job = {"method": method, "epsilon": epsilon, "delta": DELTA, "seed": args.seed, "rows": args.rows}
    if method == "tramontane":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_dir)]
    else:
        job["n_values"] = [spec.n_values for spec in schema.columns]
        options = {}
        if method == "aim":
            if args.aim_rounds is not None:
                options["rounds"] = args.aim_rounds
            if args.aim_max_model_size is not None:
                options["max_model_size"] = args.aim_max_model_size
        job["options"] = options
        np.save(job_dir / "train_ids.npy", schema.value_ids(train))
        cmd = [str(pgm_python), str(Path(__file__).resolve().parent / "_pgm_worker.py"), str(job_dir)]
    (job_dir / "job.json").write_text(json.dumps(job))
    run = run_child(cmd, args.max_minutes * 60, job_dir / "log.txt")
    if run["returncode"] != 0 or not (job_dir / "result.json").exists():
        tail = (job_dir / "log.txt").read_text()[-2000:]
        print(f"{method} eps={epsilon:g} FAILED ({'timed out' if run['timed_out'] else run['returncode']}):\n"
              f"{tail}", flush=True)
        return {**run, "failed": True, "options": job.get("options", {})}
    return {**run, **json.loads((job_dir / "result.json").read_text()), "options": job.get("options", {})}


# -- evaluation (identical for every method) -------------------------------------------------------------

def evaluate(schema, train, test, job_dir: Path) -> dict:
    from tramontane.report.utility import evaluate_synthetic

    synthetic = schema.frame_from_value_ids(np.load(job_dir / "synthetic_ids.npy"))
    ll_path = job_dir / "test_ll.npy"
    ll = np.load(ll_path) if ll_path.exists() else None
    return evaluate_synthetic(train, synthetic, schema, test, TARGET, ll, threads=1)


def summarise(run: dict, ev: dict | None) -> dict:
    out = {k: run.get(k) for k in ("wall_seconds", "fit_seconds", "sample_seconds", "peak_rss_mib", "options")}
    if "epsilon_rdp" in run:
        out.update({k: run[k] for k in ("epsilon_rdp", "epsilon_pld", "batch_size", "steps", "noise_multiplier")})
    if ev is None:
        out["failed"] = "timed out" if run.get("timed_out") else f"exit {run.get('returncode')}"
        return out
    out.update({f"tvd{k}": ev["tvd"][f"{k}-way"] for k in (1, 2, 3)})
    for clf in CLASSIFIERS:
        scores = ev["ml_efficacy"]["scores"][clf]
        out[f"{clf}_acc"], out[f"{clf}_auc"] = scores["synthetic"]["accuracy"], scores["synthetic"]["roc_auc"]
        out[f"{clf}_acc_real"], out[f"{clf}_auc_real"] = scores["real"]["accuracy"], scores["real"]["roc_auc"]
    out["exact_match_share"] = ev["exact_match_share"]
    if "heldout_nll_per_row" in ev:
        out["heldout_nll_per_row"] = ev["heldout_nll_per_row"]["nll_per_row"]
    return out


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(results: dict) -> None:
    head = (f"{'eps':>4} {'method':<10} {'tvd1':>6} {'tvd2':>6} {'tvd3':>6} {'gbdt acc':>8} {'gbdt auc':>8} "
            f"{'lr acc':>6} {'lr auc':>6} {'exact':>6} {'nll':>6} {'wall s':>7} {'peak MiB':>8}")
    print(head)
    print("-" * len(head))
    for eps, per in results.items():
        for method, r in per.items():
            if "failed" in r:
                print(f"{eps:>4} {method:<10} FAILED: {r['failed']} after {r['wall_seconds']:.0f} s")
                continue
            print(f"{eps:>4} {method:<10} {r['tvd1']:6.4f} {r['tvd2']:6.4f} {r['tvd3']:6.4f} "
                  f"{r['hist_gbdt_acc']:8.4f} {fmt(r['hist_gbdt_auc'], '8.4f')} {r['logistic_acc']:6.4f} "
                  f"{fmt(r['logistic_auc'], '6.4f')} {r['exact_match_share']:6.4f} "
                  f"{fmt(r.get('heldout_nll_per_row'), '6.2f')} {r['wall_seconds']:7.0f} {r['peak_rss_mib']:8.0f}")
        ref = next((r for r in per.values() if "failed" not in r), None)
        if ref:
            print(f"{eps:>4} {'real':<10} {'':>6} {'':>6} {'':>6} {ref['hist_gbdt_acc_real']:8.4f} "
                  f"{fmt(ref['hist_gbdt_auc_real'], '8.4f')} {ref['logistic_acc_real']:6.4f} "
                  f"{fmt(ref['logistic_auc_real'], '6.4f')}   (train on real)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--rows", type=int, default=None, help="seeded subsample of the private table (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=60.0, help="kill one method's run after this long")
    p.add_argument("--aim-rounds", type=int, default=None, help="AIM rounds (snsynth default: 16 x columns)")
    p.add_argument("--aim-max-model-size", type=float, default=None, help="AIM model size cap, MB (default 80)")
    p.add_argument("--pgm-venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs' files here (default: a temp dir)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        tramontane_worker(args.worker)
        return

    schema, train, test = load_tables(args.rows, args.seed)
    pgm_python = ensure_pgm_venv(args.pgm_venv) if set(args.methods) - {"tramontane"} else None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tramontane-synth-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"Adult: {len(train)} private rows, {len(test)} held out; delta {DELTA:g}; seed {args.seed}; "
          f"cpus {os.cpu_count()}; load {os.getloadavg()[0]:.1f}; files in {work}", flush=True)
    results: dict[str, dict[str, dict]] = {}
    for eps in args.epsilons:
        per = results.setdefault(f"{eps:g}", {})
        for method in args.methods:
            load = os.getloadavg()[0]
            run = run_method(method, eps, args, schema, train, pgm_python, work)
            ev = None if run.get("failed") else evaluate(schema, train, test, work / f"{method}-eps{eps:g}")
            per[method] = {**summarise(run, ev), "load_before": load}
            r = per[method]
            print(f"  eps={eps:g} {method}: " + ("FAILED" if "failed" in r else
                  f"tvd3 {r['tvd3']:.4f}  gbdt auc {fmt(r['hist_gbdt_auc'], '.4f')}  "
                  f"lr auc {fmt(r['logistic_auc'], '.4f')}") + f"  {r['wall_seconds']:.0f} s", flush=True)
    print()
    print_table(results)

    vs_aim: dict[str, dict] = {"tvd3_vs_aim": {}, "auc_vs_aim": {}}
    for eps, per in results.items():
        ours, aim = per.get("tramontane"), per.get("aim")
        if ours and aim and "failed" not in ours and "failed" not in aim:
            vs_aim["tvd3_vs_aim"][eps] = ours["tvd3"] / aim["tvd3"]
            vs_aim["auc_vs_aim"][eps] = {clf: ours[f"{clf}_auc"] - aim[f"{clf}_auc"] for clf in CLASSIFIERS}
    print(json.dumps({"benchmark": "synth", "dataset": "adult", "rows": len(train), "test_rows": len(test),
                      "delta": DELTA, "seed": args.seed, "cpus": os.cpu_count(),
                      "pgm_versions": pgm_versions(pgm_python) if pgm_python else None,
                      "results": results, **vs_aim}))


if __name__ == "__main__":
    main()
