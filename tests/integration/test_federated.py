"""DP-FedAvg and CANIFE on a real Flower federation: a SuperLink and 3 SuperNodes on loopback, no TLS.

Flower's deployment runtime as a user runs it: `flower-superlink`, `flower-supernode` (one per client, each
holding a third of UCI Adult through its --node-config), and `flwr run` of the app directory that
`tramontane.federated.app.write_flower_app` writes. The processes are started once for the module, on free
ports, with their own FLWR_HOME, and every process they started is killed at the end, also after a failure.

Oracles: dp-accounting's RDP accountant on the user-level Poisson-subsampled Gaussian, built here from its
own events; the noise scale of the released aggregate, known in closed form; an empirical epsilon that must
be finite and below the ledger's for a private run, and infinite without noise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dp_accounting
import pytest

from tramontane import accounting
from tramontane.audit.estimators import gaussian_epsilon

pytest.importorskip("flwr")
from tramontane.federated.app import write_flower_app

pytestmark = pytest.mark.slow
logging.getLogger("absl").setLevel(logging.ERROR)

BIN = Path(sys.executable).parent
NUM_CLIENTS = 3
RUN_TIMEOUT = 420  # seconds for one `flwr run` (rounds take 5-40 s on a loaded 2-core machine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (through /proc), deepest last."""
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


class Federation:
    """A SuperLink and NUM_CLIENTS SuperNodes, started as subprocesses; `close` ends them and theirs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir()
        self.port = _free_port()
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "OMP_NUM_THREADS": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.procs: list[subprocess.Popen[Any]] = []
        self.logs: list[Path] = []
        self._start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--port", str(self.port),
                                  "--disable-runtime-dependency-installation"])
        self._wait_for_port(self.port, 90)
        for i in range(NUM_CLIENTS):
            self._start(f"supernode{i}", [
                str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(_free_port()),
                "--node-config", f"partition-id={i} num-partitions={NUM_CLIENTS}"])

    def _start(self, name: str, command: list[str]) -> None:
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                               cwd=self.root, start_new_session=True))

    def _wait_for_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if self.procs[0].poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"the SuperLink did not listen on {port}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        def last(log: Path) -> str:
            return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

        return "\n".join(f"--- {log.name}\n{last(log)}" for log in self.logs if log.exists())

    def start_run(self, name: str, **config: Any) -> tuple[subprocess.Popen[str], Path]:
        """`flwr run` the app with these run-config values, without waiting; `report` waits for it."""
        output = self.root / f"{name}.json"
        app = write_flower_app(self.root / name, {**config, "output": str(output)})
        run = subprocess.Popen([str(BIN / "flwr"), "run", str(app), "test", "--stream"], env=self.env,
                               cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
        self.procs.append(run)  # `close` ends it too, should the test stop before it does
        return run, output

    def report(self, started: tuple[subprocess.Popen[str], Path]) -> dict[str, Any]:
        """The ServerApp's JSON report of a run `start_run` started, once its `flwr run` has ended."""
        run, output = started
        try:
            stdout, stderr = run.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            run.kill()
            stdout, stderr = run.communicate()
        if not output.exists():
            raise AssertionError(f"run {output.stem} wrote no report (flwr run exit {run.returncode}):\n"
                                 f"{stdout[-3000:]}\n{stderr[-3000:]}\n{self.tail()}")
        assert output.stat().st_mode & 0o777 == 0o600  # the operator's file: not DP beyond "privacy"
        report = json.loads(output.read_text())
        assert set(report["fields"]) == {"run_config", "privacy", "rounds", "evaluation", "audit"}
        return report

    def close(self) -> None:
        family = [p.pid for p in self.procs]
        for p in self.procs:
            family += _children(p.pid)
        for pid in family:
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        for pid in family:
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                p.wait(timeout=5)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    fed = Federation(tmp_path_factory.mktemp("flower"))
    try:
        yield fed
    finally:
        fed.close()


def _dp_accounting_epsilon(q: float, sigma: float, rounds: int, delta: float) -> float:
    """The oracle: dp-accounting's RDP accountant on the user-level Poisson-subsampled Gaussian."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds)
    acc = dp_accounting.rdp.RdpAccountant(orders=list(accounting.RDP_ORDERS))
    acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.fixture(scope="module")
def private_run(federation: Federation) -> dict[str, Any]:
    # sigma 1, C 0.5, 2 expected clients of 3; CANIFE audits round 1 (standing for the 3 rounds), 200 replays
    # each way. Seeded: the statistical checks below are then deterministic (and the run is not private).
    return federation.report(federation.start_run("private", **{
        "num-rounds": 3, "noise-multiplier": 1.0, "max-update-norm": 0.5, "clients-per-round": 2.0,
        "audit-every": 3, "audit-trials": 200, "seed": 11}))


def test_three_rounds_of_dp_fedavg_finish_with_the_dp_accounting_epsilon(private_run: dict[str, Any]) -> None:
    report = private_run
    assert report["rounds_run"] == 3 and report["stopped"] is None
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert r["dropped"] == 0 and r["replied"] == r["sampled"]
        # clipped on the client: what reached the server was already within C (updates are ~3 before)
        assert r["largest_norm"] <= 0.5 and r["clipped"] == r["replied"]
    privacy = report["privacy"]
    q = 2.0 / NUM_CLIENTS
    assert privacy["sample_rate"] == pytest.approx(q)
    assert privacy["ledger"]["events"] == [{"type": "dp_sgd", "sample_rate": q, "noise_multiplier": 1.0,
                                            "steps": 3, "label": "dp-fedavg"}]
    oracle = _dp_accounting_epsilon(q, 1.0, 3, 1e-5)
    assert privacy["epsilon"] == pytest.approx(oracle, rel=1e-9)
    assert rounds[-1]["epsilon"] == pytest.approx(oracle, rel=1e-9)
    first = _dp_accounting_epsilon(q, 1.0, 1, 1e-5)
    assert rounds[0]["epsilon"] == pytest.approx(first, rel=1e-9) and first < oracle / 1.1  # composed, not last
    evaluation = report["evaluation"]
    assert sorted(evaluation, key=int) == ["0", "1", "2", "3"]
    assert all(0.0 <= e["accuracy"] <= 1.0 and math.isfinite(e["loss"]) for e in evaluation.values())


def test_a_canary_round_measures_the_noise_and_stays_below_the_ledger(private_run: dict[str, Any]) -> None:
    audit = private_run["audit"]
    (only,) = audit["rounds"]
    assert only["round"] == 1 and only["trials"] == 200 and only["design_pool"] == 16
    assert only["canary_norm"] == pytest.approx(0.5, rel=1e-6)
    # The canary moves the released update by C eta_s / (qN) along its direction, the noise's std there is
    # sigma C eta_s / (qN): a signal-to-noise of 1 / sigma = 1. Noise skipped, halved or doubled fails this.
    assert 0.7 < only["signal_to_noise"] < 1.4
    est = only["estimate"]
    ledger = private_run["privacy"]["epsilon"]
    assert math.isfinite(est["epsilon"]) and 0.3 < est["epsilon"] < ledger
    assert est["low"] <= gaussian_epsilon(1.0, est["delta"])  # the lower end never beats the theory
    composed = audit["composed"]
    assert composed["delta"] == 1e-5 and len(composed["noise_multipliers"]) == 1
    assert composed["low"] < ledger
    assert composed["ledger"]["events"][0]["steps"] == 3  # the one audit stands for the run's 3 rounds


def test_without_noise_the_empirical_epsilon_is_far_above(federation: Federation,
                                                          private_run: dict[str, Any]) -> None:
    report = federation.report(federation.start_run("nonprivate", **{
        "num-rounds": 1, "noise-multiplier": 0.0, "audit-every": 1, "audit-trials": 50, "seed": 12}))
    assert report["rounds_run"] == 1
    assert report["privacy"]["epsilon"] == "inf" and report["privacy"]["ledger"]["events"] == []
    (only,) = report["audit"]["rounds"]
    assert only["estimate"]["epsilon"] == "inf" and only["signal_to_noise"] == "inf"
    assert report["audit"]["composed"]["epsilon"] == "inf"
    # perfect separation: the point estimate is infinite, far above the private run's finite one, and the
    # lower end is what 0 errors in 50 + 50 replays certify
    assert math.isfinite(private_run["audit"]["rounds"][0]["estimate"]["epsilon"])
    assert only["estimate"]["low"] > 2.0
