"""DP-SGD throughput and peak memory: non-private training vs tramontane's DPEngine vs Opacus (hooks, ghost).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dpsgd.py [--batches 16 64] [--rounds 5] [--threads 2]

A tiny Mistral (dim 256, 4 layers, 8 heads, 2 kv heads, hidden 896, vocab 2000) trained on random
sequences of 128 tokens with SGD, 2 threads (`--threads`). Throughput: per batch size, one subprocess builds
one model per mode and runs their steps interleaved round-robin (after a warm-up step each), so that
background load falls on every mode alike; samples/s = batch / median step time (also the best step, less
sensitive to load). Memory: each (mode, batch) alone in a subprocess, two steps; the whole process's peak
RSS and the peak above the RSS just before the first step (model, data and libraries excluded).
The last line is one JSON object; ratios are DP / anchor measured in the same run (worst batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = ("nonprivate", "tramontane", "opacus_hooks", "opacus_ghost")
SEQ = 128


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def build(mode: str, batch: int):
    """A fresh model trained in `mode`: returns (step function, note)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from tramontane.models import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(dim=256, n_layers=4, head_dim=32, hidden_dim=896, n_heads=8, n_kv_heads=2, norm_eps=1e-5,
                     vocab_size=2000)
    model = Transformer(args)
    data = torch.randint(0, args.vocab_size, (batch, SEQ + 1))
    inputs, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    note = ""

    if mode == "nonprivate":
        def step() -> None:
            logits = model(inputs)
            F.cross_entropy(logits.reshape(-1, args.vocab_size), targets.reshape(-1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    elif mode == "tramontane":
        from tramontane.dp import DPEngine

        engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0)
        note = "rules: " + ", ".join(sorted(set(engine.describe().values())))

        def step() -> None:
            with engine.record():
                logits = model(inputs)
                losses = F.cross_entropy(logits.reshape(-1, args.vocab_size), targets.reshape(-1),
                                         reduction="none")
                engine.backward(losses.view(batch, SEQ).mean(1))
            engine.add_noise_and_set_grads(expected_batch_size=batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        from _opacus import make_private

        wrapped, dp_optimizer, criterion, grad_sample_mode = make_private(
            model, optimizer, inputs, targets, batch, mode)
        other = sorted({type(m).__name__ for m in wrapped.modules()
                        if any(p.requires_grad for p in m.parameters(recurse=False))
                        and type(m) not in (nn.Linear, nn.Embedding)})
        note = f"Opacus wraps the whole model; layers without a dedicated Opacus sampler: {other}"

        def step() -> None:
            logits = wrapped(inputs)
            flat = logits.reshape(-1, args.vocab_size)
            loss = criterion(flat, targets.reshape(-1), shape=logits.shape) if grad_sample_mode == "ghost" \
                else criterion(flat, targets.reshape(-1))
            loss.backward()
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)

    return step, note


def memory_worker(mode: str, batch: int, threads: int) -> dict:
    """Peak RSS of `mode` alone in this process: two steps."""
    import torch

    torch.set_num_threads(threads)
    step, note = build(mode, batch)
    base = _rss_kib()
    step()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_mib": peak / 1024, "peak_above_base_mib": (peak - base) / 1024, "note": note}


def timing_worker(modes: list[str], batch: int, rounds: int, threads: int) -> dict:
    """Every mode in this one process, steps interleaved round-robin (rotating order), so that background
    load falls on all modes alike."""
    import torch

    torch.set_num_threads(threads)
    steps = {mode: build(mode, batch)[0] for mode in modes}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for r in range(rounds):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            start = time.perf_counter()
            steps[mode]()
            times[mode].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per mode (interleaved)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "MODES", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, modes, batch = args.worker
        out = memory_worker(modes, int(batch), args.threads) if kind == "memory" else \
            timing_worker(modes.split(","), int(batch), args.rounds, args.threads)
        print(json.dumps(out))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}

    def run_worker(kind: str, modes: str, batch: int) -> dict | None:
        proc = subprocess.run([sys.executable, __file__, "--rounds", str(args.rounds), "--threads",
                               str(args.threads), "--worker", kind, modes, str(batch)],
                              capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            print(f"{kind} {modes} batch {batch}: FAILED\n{proc.stderr[-2000:]}")
            return None
        return json.loads(proc.stdout.strip().splitlines()[-1])

    summary: dict[str, dict] = {}
    for batch in args.batches:
        times = run_worker("timing", ",".join(args.modes), batch) or {}
        for mode in args.modes:
            memory = run_worker("memory", mode, batch)
            if mode not in times or memory is None:
                continue
            summary[f"{mode}@{batch}"] = {
                "samples_per_s": batch / statistics.median(times[mode]),
                "samples_per_s_best": batch / min(times[mode]), **memory}

    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'mode':<14}{'batch':>6}{'samples/s':>11}{'vs np':>7}{'best/s':>9}{'vs np':>7}{'peak MiB':>10}"
          f"{'vs np':>7}{'above base':>12}{'vs np':>7}")
    for batch in args.batches:
        anchor = summary.get(f"nonprivate@{batch}")
        for mode in args.modes:
            row = summary.get(f"{mode}@{batch}")
            if row is None:
                continue
            r = {key: row[key] / anchor[key] if anchor else float("nan") for key in
                 ("samples_per_s", "samples_per_s_best", "peak_mib", "peak_above_base_mib")}
            print(f"{mode:<14}{batch:>6}{row['samples_per_s']:>11.2f}{r['samples_per_s']:>7.2f}"
                  f"{row['samples_per_s_best']:>9.2f}{r['samples_per_s_best']:>7.2f}"
                  f"{row['peak_mib']:>10.0f}{r['peak_mib']:>7.2f}{row['peak_above_base_mib']:>12.0f}"
                  f"{r['peak_above_base_mib']:>7.2f}")
    for key, row in summary.items():
        if row["note"]:
            print(f"  {key}: {row['note']}")

    def worst(metric: str, other: tuple[str, ...], higher_is_better: bool) -> float | None:
        ratios = []
        for batch in args.batches:
            dp = summary.get(f"tramontane@{batch}")
            refs = [summary[f"{m}@{batch}"] for m in other if f"{m}@{batch}" in summary]
            if dp and refs:
                ref = max(r[metric] for r in refs) if higher_is_better else min(r[metric] for r in refs)
                ratios.append(dp[metric] / ref)
        if not ratios:
            return None
        return round(min(ratios) if higher_is_better else max(ratios), 3)

    result = {
        "dp_vs_nonprivate": worst("samples_per_s", ("nonprivate",), True),
        "dp_vs_opacus_best": worst("samples_per_s", ("opacus_hooks", "opacus_ghost"), True),
        "memory_vs_nonprivate": worst("peak_mib", ("nonprivate",), False),
        "memory_above_base_vs_nonprivate": worst("peak_above_base_mib", ("nonprivate",), False),
        "dp_vs_nonprivate_best_step": worst("samples_per_s_best", ("nonprivate",), True),
        "dp_vs_opacus_best_best_step": worst("samples_per_s_best", ("opacus_hooks", "opacus_ghost"), True),
        "per_run": {k: {m: round(v, 3) for m, v in r.items() if m != "note"} for k, r in summary.items()},
        "config": {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "hidden_dim": 896, "seq": SEQ,
                   "vocab": 2000, "threads": args.threads, "rounds": args.rounds},
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
