"""Flower round time of DP-FedAvg, and its overhead over the same client updates computed in one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/federated.py [--clients 3] [--rounds 4]

Flower: a SuperLink and `--clients` SuperNodes on loopback (no TLS), `flwr run` of the app that
`tramontane.federated.app.write_flower_app` writes, every client in every round (clients-per-round = N,
q = 1, so both sides do the same work), no CANIFE, a fixed seed. A round's time is the ServerApp's, from
`configure_train` to the end of `aggregate_train` (the report's `rounds[].seconds`): messages out, each
SuperNode polling, starting a ClientApp process, loading its shard of Adult, training, clipping, replying,
and the server's sum and noise. The first round also pays the app's installation on each SuperNode.

Local anchor, measured in the same run: the same clients' updates in this process, sequentially: local
training on each shard from the round's global model, clipping, the sum, the noise and the release
(`DPFedAvgServer`), shards loaded once beforehand. The ratio flower / local is Flower's overhead factor.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    by_parent: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        by_parent.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def flower_rounds(root: Path, clients: int, rounds: int, settings: dict) -> tuple[list[float], float, float]:
    """(per-round seconds on the ServerApp, wall seconds of `flwr run`, final test accuracy) on a fresh
    loopback federation."""
    from tramontane.federated.app import write_flower_app

    home = root / "flwr-home"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, command: list[str]) -> None:
        with (root / f"{name}.log").open("wb") as log:
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                                          start_new_session=True))

    try:
        start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--port", str(port),
                            "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + 90
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the SuperLink did not start")
            time.sleep(0.5)
        for i in range(clients):
            start(f"supernode{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                    f"127.0.0.1:{port}", "--port", str(_free_port()),
                                    "--node-config", f"partition-id={i} num-partitions={clients}"])
        output = root / "run.json"
        app = write_flower_app(root / "app", {**settings, "output": str(output)})
        started = time.monotonic()
        done = subprocess.run([str(BIN / "flwr"), "run", str(app), "bench", "--stream"], env=env, cwd=root,
                              capture_output=True, text=True, timeout=1800, check=False)
        wall = time.monotonic() - started
        if not output.exists():
            raise RuntimeError(f"the run wrote no report:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        report = json.loads(output.read_text())
        return [r["seconds"] for r in report["rounds"]], wall, report["evaluation"][str(rounds)]["accuracy"]
    finally:
        family = [p.pid for p in procs]
        for p in procs:
            family += _descendants(p.pid)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=15)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def local_rounds(clients: int, rounds: int, settings: dict) -> tuple[list[float], float]:
    """(per-round seconds, final test accuracy) of the same DP-FedAvg rounds in this process (shards loaded
    beforehand); with the same seed, the same sampling, training and noise as the federation's."""
    from tramontane.errors import TramontaneWarning
    from tramontane.federated import task
    from tramontane.federated.app import dp_config, local_training
    from tramontane.federated.clipping import clip_update, sum_clipped_updates
    from tramontane.federated.dp_fedavg import DPFedAvgServer
    from tramontane.seeding import numpy_rng

    config = dp_config(settings)
    training = local_training(settings)
    shards = [task.client_data(i, clients) for i in range(clients)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        server = DPFedAvgServer(config)
    params = task.initial_params()
    times = []
    for r in range(rounds):
        started = time.monotonic()
        updates = []
        for i in server.sample_cohort():
            x, y = shards[i]
            new = task.local_train(params, x, y, training, numpy_rng(config.seed, "local training", i, r + 1))
            updates.append(clip_update({k: new[k] - params[k] for k in params}, config.max_update_norm)[0])
        total, _ = sum_clipped_updates(updates, params, config.max_update_norm)
        params = server.release(params, total)
        times.append(time.monotonic() - started)
    return times, task.evaluate(params, *task.held_out_data())[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    settings = {"num-rounds": args.rounds, "num-clients": args.clients,
                "clients-per-round": float(args.clients), "noise-multiplier": 1.0, "max-update-norm": 0.5,
                "audit-every": 0, "seed": 1}
    with tempfile.TemporaryDirectory(prefix="bench-federated-") as tmp:
        flower, wall, flower_accuracy = flower_rounds(Path(tmp), args.clients, args.rounds, settings)
    local, local_accuracy = local_rounds(args.clients, args.rounds, settings)

    print(f"DP-FedAvg, {args.clients} clients x {args.rounds} rounds (q = 1), logistic regression on Adult "
          f"(109 parameters); {platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.2f}")
    print(f"{'round':>6} {'flower s':>10} {'local s':>10} {'ratio':>8}")
    for r, (f, loc) in enumerate(zip(flower, local, strict=True), start=1):
        print(f"{r:>6} {f:>10.3f} {loc:>10.4f} {f / loc:>8.0f}")
    f_med, l_med = statistics.median(flower), statistics.median(local)
    steady_f = statistics.median(flower[1:]) if len(flower) > 1 else f_med
    print(f"{'median':>6} {f_med:>10.3f} {l_med:>10.4f} {f_med / l_med:>8.0f}")
    print(f"flwr run wall time {wall:.1f} s (app submission, ServerApp start, {args.rounds} rounds)")
    print(f"final test accuracy: flower {flower_accuracy:.6f}, local {local_accuracy:.6f} (same seed: the "
          "same rounds, so they agree)")
    print(json.dumps({"bench": "federated", "clients": args.clients, "rounds": args.rounds,
                      "flower_round_s_median": round(f_med, 3),
                      "flower_round_s_after_first": round(steady_f, 3),
                      "local_round_s_median": round(l_med, 5), "overhead_ratio": round(f_med / l_med, 1),
                      "overhead_s_per_round": round(f_med - l_med, 3), "flwr_run_wall_s": round(wall, 1),
                      "same_model": flower_accuracy == local_accuracy,
                      "loadavg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
