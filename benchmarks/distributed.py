"""DP-SGD throughput on 1 vs 2 torchrun processes (gloo, CPU), and the share of a step spent communicating.

    .venv/bin/python benchmarks/distributed.py [--steps 8] [--repeats 3] [--examples 4096] [--batch 64]

A tiny Mistral (dim 256, 4 layers, 8 heads, 2 kv heads, hidden 768, vocab 2000; every weight trained) on
random sequences of 64 tokens, DP-SGD through `Trainer` (Poisson batches of expected size `--batch`, one
micro-batch of 32 at a time, AdamW). Each process uses one thread (OMP_NUM_THREADS=1), so 2 processes use
2 cores. The sampling and noise are seeded, so both settings train on the same batches: samples/s = the
examples of the measured steps (all but the first, a warm-up) / their wall time, on rank 0. Communication
share = time inside the collectives (all-reduce of the clipped sums, broadcast of the noise, the seed
agreement; waiting for the slower rank included) / step time; transfer share = the same collectives timed
alone after training (each after a barrier, median of 5) / median step time. Runs of 1 and 2 processes alternate so that
background load falls on both; medians over `--repeats`. The last line is one JSON object with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQ = 64


def worker(out: Path, steps: int, examples: int, batch: int) -> None:
    import torch
    from torch import nn

    from tramontane.dp import distributed
    from tramontane.models import ModelArgs, Transformer
    from tramontane.training import TrainConfig, Trainer
    from tramontane.training.objectives import LanguageModelingObjective

    torch.set_num_threads(1)
    group = distributed.replica_group()
    if group is not None:
        group.check_every = 0  # the replica check only at the start and the end, outside the timed steps
    torch.manual_seed(0)
    args = ModelArgs(dim=256, n_layers=4, head_dim=32, hidden_dim=768, n_heads=8, n_kv_heads=2, norm_eps=1e-5,
                     vocab_size=2000)
    model: nn.Module = Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (examples, SEQ + 1), generator=torch.Generator().manual_seed(1))
    objective = LanguageModelingObjective(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    marks: list[tuple[float, float]] = []  # (time, communication seconds so far) after each step

    def on_step(step: int, total: int, info: dict[str, float]) -> None:
        marks.append((time.perf_counter(), group.comm_seconds if group is not None else 0.0))

    config = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, noise_multiplier=1.0, delta=1e-5,
                         micro_batch_size=32, noise_seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seeded noise warns: on purpose here
        trainer = Trainer(model, objective, examples, config, on_step=on_step)
        start = (time.perf_counter(), group.comm_seconds if group is not None else 0.0)
        trainer.fit()
    transfer = []  # the step's collectives alone, each after a barrier: no waiting for the slower rank
    if group is not None:
        flat = [torch.zeros(sum(p.numel() for p in model.parameters()))]
        for _ in range(5):
            torch.distributed.barrier()
            began = time.perf_counter()
            group.agree_seed(0)
            group.all_reduce_sum(flat)
            group.broadcast_from_first(flat)
            transfer.append(time.perf_counter() - began)
    if distributed.is_first():
        step_times = [b[0] - a[0] for a, b in zip([start, *marks], marks)]
        comm = [b[1] - a[1] for a, b in zip([start, *marks], marks)]
        out.write_text(json.dumps({"processes": group.world_size if group is not None else 1,
                                   "step_seconds": step_times, "comm_seconds": comm,
                                   "transfer_seconds": statistics.median(transfer) if transfer else 0.0}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(processes: int, steps: int, examples: int, batch: int, folder: Path) -> dict:
    out = folder / f"run-{processes}-{time.monotonic_ns()}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__, "--worker", str(out),
               "--steps", str(steps), "--examples", str(examples), "--batch", str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(command, env=env, check=True, timeout=1800, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def measured_examples(steps: int, examples: int, batch: int) -> list[int]:
    """The realised batch sizes of the seeded run (the same for any number of processes)."""
    from tramontane.dp import PoissonSampler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [len(b) for b in PoissonSampler(examples, batch / examples, steps=steps, seed=0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(Path(args.worker), args.steps, args.examples, args.batch)
        return
    sizes = measured_examples(args.steps, args.examples, args.batch)[1:]  # the first step warms up
    runs: dict[int, list[dict]] = {1: [], 2: []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for processes in (1, 2):
                runs[processes].append(launch(processes, args.steps, args.examples, args.batch, Path(folder)))
    load_after = os.getloadavg()

    summary = {}
    print(f"{'processes':>9} | {'samples/s (median, min-max)':>28} | {'step s':>7} | {'comm share':>10} | "
          f"{'transfer share':>14}")
    print("-" * 81)
    for processes, results in runs.items():
        rates, steps, shares, transfers = [], [], [], []
        for r in results:
            timed, comm = r["step_seconds"][1:], r["comm_seconds"][1:]
            rates.append(sum(sizes) / sum(timed))
            steps.append(statistics.median(timed))
            shares.append(sum(comm) / sum(timed))
            transfers.append(r["transfer_seconds"] / statistics.median(timed))
        summary[processes] = {"samples_per_s": statistics.median(rates), "step_s": statistics.median(steps),
                              "comm_share": statistics.median(shares), "transfer_share": statistics.median(transfers)}
        print(f"{processes:>9} | {statistics.median(rates):>12.1f} ({min(rates):.1f}-{max(rates):.1f}){'':>6} | "
              f"{statistics.median(steps):>7.3f} | {statistics.median(shares):>9.1%} | "
              f"{statistics.median(transfers):>13.1%}")
    print(json.dumps({"speedup_2_vs_1": round(summary[2]["samples_per_s"] / summary[1]["samples_per_s"], 3),
                      "comm_share_2": round(summary[2]["comm_share"], 4),
                      "transfer_share_2": round(summary[2]["transfer_share"], 4),
                      "samples_per_s": {k: round(v["samples_per_s"], 2) for k, v in summary.items()},
                      "steps_timed": len(sizes), "examples_timed": sum(sizes), "repeats": args.repeats,
                      "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)]}))


if __name__ == "__main__":
    main()
