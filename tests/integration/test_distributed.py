"""DP-SGD over 2 torchrun processes (gloo, CPU) against the single-process run it must reproduce.

What must hold (`tramontane.dp.distributed`): with the same seeds, the 2-process run takes the same Poisson
batches (the union of the ranks' shards) and the same noise as one process, so its weights equal the
single-process weights (to 1e-6) for a dense and an MoE model, are bit-identical across the ranks, and its
ledger is the single-process ledger; only rank 0 writes checkpoints; a rank killed mid-run leaves a
checkpoint that one process resumes to the uninterrupted run's ledger and weights; unseeded, the union of
the ranks' samples is one Poisson(q) sample (tested statistically, with a broken sampler failing the same
test); sharded (FSDP2) and DDP-wrapped models are refused; diverged replicas are detected.

This file is also the torchrun worker: `torchrun ... test_distributed.py OUT`. One launch (each costs seconds
of process start and imports) runs every distributed check and ends with the killed run, while this process
computes the single-process runs it is compared with.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tramontane.dp import DPEngine, PoissonSampler, distributed
from tramontane.dp.distributed import shard_of
from tramontane.errors import ConfigError, TramontaneWarning, UnsupportedModuleError
from tramontane.training import TrainConfig, Trainer, latest_checkpoint
from tramontane.training.objectives import LanguageModelingObjective

from tests.conftest import random_model, tiny_args

ROOT = Path(__file__).resolve().parents[2]
logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's skipped RDP orders, already accounted

STEPS, N, BATCH, DIE_AT = 8, 64, 16, 5
KINDS = ("dense", "moe", "plain")
SAMPLE_N, SAMPLE_Q, SAMPLE_STEPS = 300, 0.1, 300
Z = 6.0  # two-sided windows at 6 standard deviations, as in the dp tests
LAUNCH_TIMEOUT_S = 150


class _Recorded:
    """The copy task of test_training (rows 'a b c ... a b c'), noting the examples each step asks for."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        half = torch.randint(3, 20, (N, 5), generator=gen)
        seq = torch.cat([half, half], dim=1)
        labels = seq[:, 1:].clone()
        labels[:, :4] = -100
        self.task = LanguageModelingObjective(seq[:, :-1], labels)
        self.asked: list[int] = []

    def rows(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.asked.extend(indices)
        return self.task.rows(indices)

    def losses(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.task.losses(model, batch)


def _train(kind: str, run_dir: Path, init_seed: int = 0, die_at: int | None = None
           ) -> tuple[nn.Module, list[list[int]], dict]:
    """The run every test compares: 8 DP-SGD steps of a tiny model ("dense", "moe"), seeded sampling and
    noise, a checkpoint every 2 steps; or ("plain") 8 non-private steps of the dense model on seeded
    batches. Returns the model, each step's examples (this process's) and the ledger."""
    objective = _Recorded()
    model = random_model(tiny_args(moe=kind == "moe"), seed=init_seed)
    batches: list[list[int]] = []

    def on_step(step: int, total: int, info: dict[str, float]) -> None:
        batches.append(sorted(objective.asked))
        objective.asked.clear()
        if step == die_at:
            os._exit(17)  # a crash: no clean-up, no checkpoint of this step

    # lr 1e-3: Adam turns float rounding (per-example sums over other batch shapes, as any change of
    # micro-batching also gives) into weight differences of about lr * 1e-4 on the MoE model
    privacy: dict[str, Any] = {"noise_multiplier": 1.0, "delta": 1e-5, "noise_seed": 7}
    config = TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-3, micro_batch_size=8, checkpoint_every=2,
                         data_seed=5, **(privacy if kind != "plain" else {"private": False}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)  # seeded on purpose
        trainer = Trainer(model, objective, N, config, run_dir=run_dir, on_step=on_step)
        if trainer.group is not None:
            trainer.group.check_every = 1
        result = trainer.fit()
    return model, batches, result.ledger.to_dict()


# -- the torchrun worker --------------------------------------------------------------------------------

def _worker(out: Path) -> None:
    """Every check of the launch, its results in report-rank{R}.json; then the run in which rank 1 dies."""
    torch.set_num_threads(1)
    group = distributed.replica_group()
    assert group is not None and group.world_size == 2
    rank = group.rank
    report: dict[str, Any] = {}
    from tramontane.training import trainer as trainer_module

    saves = []
    real_save = trainer_module.save_checkpoint

    def counted_save(*args: Any, **kwargs: Any) -> Path:  # the real write, counted per rank
        saves.append(1)
        return real_save(*args, **kwargs)

    trainer_module.save_checkpoint = counted_save
    for kind in KINDS:
        # rank 1 starts from other weights: rank 0's must reach it
        model, batches, ledger = _train(kind, out / f"run-{kind}", init_seed=rank)
        torch.save({n: p.detach() for n, p in model.named_parameters()}, out / f"{kind}-rank{rank}.pt")
        report[kind] = {"batches": batches, "ledger": ledger}
    trainer_module.save_checkpoint = real_save
    report["checkpoint_writes"] = len(saves)

    sampler = PoissonSampler(SAMPLE_N, SAMPLE_Q, steps=SAMPLE_STEPS, shard=group.shard(SAMPLE_N),
                             agree_seed=group.agree_seed)  # unseeded: rank 0's fresh entropy each step
    report["samples"] = list(sampler)
    report["shard"] = [group.shard(SAMPLE_N).start, group.shard(SAMPLE_N).stop]

    refused = {}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    for name, wrap in (("fsdp2", lambda m: fully_shard(m, mesh=init_device_mesh("cpu", (2,)))),
                       ("ddp", DistributedDataParallel)):
        try:
            DPEngine(wrap(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))), max_grad_norm=1.0,
                     noise_multiplier=1.0)
            refused[name] = None
        except UnsupportedModuleError as err:
            refused[name] = f"{type(err).__name__}: {err}"
    report["refused"] = refused

    def refuse() -> None:
        raise ConfigError("rank 0 refuses")

    try:
        group.on_first(refuse)
    except ConfigError as err:
        report["on_first_error"] = str(err)
    report["on_first_value"] = group.on_first(lambda: {"drawn by": rank})

    weights = [("w", torch.ones(3)), ("v", torch.zeros(2))]
    group.check_in_sync(weights)  # equal: passes
    if rank == 1:
        weights[1][1][0] = 1e-30
    try:
        group.check_in_sync(weights)
        report["divergence"] = None
    except distributed.DistributedError as err:
        report["divergence"] = str(err)
    (out / f"report-rank{rank}.json").write_text(json.dumps(report))
    # last, as it ends the launch: rank 1 exits (17) after step 5, and torchrun stops rank 0
    _train("dense", out / "run-kill", die_at=DIE_AT if rank == 1 else None)


# -- launching ------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_torchrun(args: Sequence[str], nproc: int = 2, module: bool = False) -> subprocess.Popen:
    """Start `torchrun --nproc-per-node nproc` on loopback in a session of its own; `finish_torchrun` waits
    for it. Started first, it runs while the caller computes what it is compared with."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *(["-m"] if module else []),
               *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
           "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, whatever GPUs there are
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish_torchrun(proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Wait for a launch of `start_torchrun`; killed whole on timeout (or when the caller failed first)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stop_torchrun(proc: subprocess.Popen) -> None:
    """Kill a launch of `start_torchrun` whose results are no longer wanted."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def torchrun(args: Sequence[str], nproc: int = 2, timeout: float = LAUNCH_TIMEOUT_S,
             module: bool = False) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc-per-node nproc` on loopback in a session of its own, killed whole on timeout."""
    return finish_torchrun(start_torchrun(args, nproc, module), timeout)


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread in this process, as in the workers: on a small shared machine, intra-op threads
    of these tiny models wait on each other (ten times slower than one thread while a launch runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _single_runs(folder: Path) -> dict[str, Any]:
    """The single-process runs (this process: no process group)."""
    assert distributed.replica_group() is None
    runs = {}
    for kind in KINDS:
        model, batches, ledger = _train(kind, folder / kind)
        runs[kind] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                      "batches": batches, "ledger": ledger, "run_dir": folder / kind}
    return runs


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, subprocess.CompletedProcess]:
    """The single-process runs, computed while the launch runs; the launch's folder and its outcome."""
    out = tmp_path_factory.mktemp("dist")
    launch = start_torchrun([__file__, str(out)])
    try:
        with one_thread():
            runs = _single_runs(tmp_path_factory.mktemp("single"))
    except BaseException:
        stop_torchrun(launch)
        raise
    return runs, out, finish_torchrun(launch)


@pytest.fixture(scope="module")
def single(both: tuple[dict[str, Any], Path, subprocess.CompletedProcess]) -> dict[str, Any]:
    return both[0]


@pytest.fixture(scope="module")
def launched(both: tuple[dict[str, Any], Path, subprocess.CompletedProcess]) -> Path:
    """The launch's folder, once both ranks finished every check (each writes its report last)."""
    _, out, done = both
    assert all((out / f"report-rank{rank}.json").is_file() for rank in (0, 1)), done.stderr[-4000:]
    return out


def _report(out: Path, rank: int) -> dict[str, Any]:
    return json.loads((out / f"report-rank{rank}.json").read_text())


def _meta(run_dir: Path) -> dict[str, Any]:
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    return json.loads((ckpt / "meta.json").read_text())


# -- tests ----------------------------------------------------------------------------------------------

def test_shards_partition_the_examples_and_their_samples_add_up_to_one_sample() -> None:
    """Seeded, the shards' batches are exactly the single-process sampler's, for any world size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)
        whole = list(PoissonSampler(101, 0.2, steps=20, seed=3, first_step=4))
        for world in (1, 2, 3, 5):
            shards = [shard_of(101, rank, world) for rank in range(world)]
            assert [i for s in shards for i in s] == list(range(101))
            assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
            parts = [list(PoissonSampler(101, 0.2, steps=20, seed=3, first_step=4, shard=s)) for s in shards]
            for step, batch in enumerate(whole):
                assert sorted(i for part in parts for i in part[step]) == batch
                assert all(i in shards[r] for r, part in enumerate(parts) for i in part[step])
    with pytest.raises(ConfigError):
        PoissonSampler(10, 0.5, shard=range(5, 12))


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_equal_one_on_the_same_batches_and_noise(kind: str, single: dict, launched: Path) -> None:
    reports = [_report(launched, rank) for rank in (0, 1)]
    ref = single[kind]
    # the same Poisson batches: the ranks' shards add up to the single-process batch, step by step
    unions = [sorted(a + b) for a, b in zip(reports[0][kind]["batches"], reports[1][kind]["batches"])]
    assert unions == ref["batches"]
    assert all(i < N // 2 for batch in reports[0][kind]["batches"] for i in batch)
    assert all(i >= N // 2 for batch in reports[1][kind]["batches"] for i in batch)
    ranks = [torch.load(launched / f"{kind}-rank{rank}.pt") for rank in (0, 1)]
    # Without noise, Adam's g / sqrt(v) magnifies rounding on near-zero coordinates: two single-process runs
    # that differ only in micro-batching (8 vs 4) differ by 7e-6 on this plain run, by 1e-7 on the DP ones.
    atol = 1e-6 if kind != "plain" else 3e-5
    for name, param in ref["params"].items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs across ranks"
        assert torch.allclose(ranks[0][name], param, rtol=0, atol=atol), \
            f"{name}: max diff {(ranks[0][name] - param).abs().max().item():.3g}"
    # the weights moved (Adam, lr 1e-3, 8 steps): equality is not that of two untouched models
    start = random_model(tiny_args(moe=kind == "moe"), seed=0)
    moved = max((p.detach() - ref["params"][n]).abs().max().item() for n, p in start.named_parameters())
    assert moved > 2e-3
    # the ledger: rank 0's checkpoint and every rank's in memory equal the single-process ledger
    assert _meta(launched / f"run-{kind}")["ledger"] == _meta(ref["run_dir"])["ledger"]
    assert reports[0][kind]["ledger"] == reports[1][kind]["ledger"] == ref["ledger"]
    assert _meta(launched / f"run-{kind}")["step"] == STEPS


def test_only_rank_zero_writes_checkpoints(launched: Path) -> None:
    per_run = STEPS // 2 + 1  # every 2 steps, and the final save
    assert _report(launched, 0)["checkpoint_writes"] == len(KINDS) * per_run
    assert _report(launched, 1)["checkpoint_writes"] == 0


def _poisson_violations(per_rank: list[list[list[int]]], shards: list[range], n: int, q: float) -> list[str]:
    """What in the ranks' samples contradicts one Poisson(q) sample of 0..n-1 per step (6-sigma windows)."""
    found = []
    steps = len(per_rank[0])
    counts = torch.zeros(n)
    sizes = []
    for step in range(steps):
        union = [i for rank in per_rank for i in rank[step]]
        if len(set(union)) != len(union):
            found.append(f"step {step}: an example sampled by two ranks")
        if any(i not in shards[r] for r, rank in enumerate(per_rank) for i in rank[step]):
            found.append(f"step {step}: an example outside its rank's shard")
        counts[union] += 1
        sizes.append(len(union))
    size = torch.tensor(sizes, dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    if abs(size.mean().item() - mean) > Z * math.sqrt(var / steps):
        found.append(f"mean batch {size.mean().item():.2f}, expected {mean:.2f}")
    sd_var = math.sqrt(2 * var**2 / steps + var * (1 - 6 * q * (1 - q)) / steps)
    if abs(size.var().item() - var) > Z * sd_var:
        found.append(f"batch variance {size.var().item():.2f}, expected {var:.2f}")
    expected, sd = steps * q, math.sqrt(steps * q * (1 - q))
    if ((counts - expected).abs() > Z * sd).any():
        found.append("some examples are sampled at another rate than q")
    chi2 = (((counts - expected) / sd) ** 2).sum().item()
    if abs(chi2 - n) > Z * math.sqrt(2 * n):
        found.append(f"inclusion counts spread as chi2 {chi2:.0f}, expected {n} +- {math.sqrt(2 * n):.0f}")
    if len({tuple(sorted(i for rank in per_rank for i in rank[s])) for s in range(steps)}) < steps // 2:
        found.append("the same batch repeats: the steps' randomness is not fresh")
    return found


def test_union_of_unseeded_rank_samples_is_one_poisson_sample(launched: Path) -> None:
    reports = [_report(launched, rank) for rank in (0, 1)]
    shards = [range(*r["shard"]) for r in reports]
    assert shards == [shard_of(SAMPLE_N, 0, 2), shard_of(SAMPLE_N, 1, 2)]
    samples = [r["samples"] for r in reports]
    assert len(samples[0]) == len(samples[1]) == SAMPLE_STEPS
    assert _poisson_violations(samples, shards, SAMPLE_N, SAMPLE_Q) == []

    # The same test fails samplers that are wrong in the ways a distributed one can be.
    gen = torch.Generator().manual_seed(0)

    def broken(rate: float, own_shard: bool) -> list[list[list[int]]]:
        out: list[list[list[int]]] = [[], []]
        for _ in range(SAMPLE_STEPS):
            for rank, shard in enumerate(shards):
                pool = shard if own_shard else range(SAMPLE_N)
                draws = torch.rand(len(pool), generator=gen)
                out[rank].append([pool[i] for i in torch.nonzero(draws < rate).flatten().tolist()])
        return out

    assert _poisson_violations(broken(SAMPLE_Q / 2, True), shards, SAMPLE_N, SAMPLE_Q)  # rate q / W per rank
    assert _poisson_violations(broken(SAMPLE_Q, False), shards, SAMPLE_N, SAMPLE_Q)  # every rank samples all
    assert _poisson_violations(broken(SAMPLE_Q, True), shards, SAMPLE_N, SAMPLE_Q) == []  # a right one passes


def test_sharded_and_ddp_models_are_refused_and_divergence_is_caught(launched: Path) -> None:
    for rank in (0, 1):
        report = _report(launched, rank)
        assert report["refused"]["fsdp2"] is not None and "UnsupportedModuleError" in report["refused"]["fsdp2"]
        assert "FSDP" in report["refused"]["fsdp2"]
        assert report["refused"]["ddp"] is not None and "DistributedDataParallel" in report["refused"]["ddp"]
        assert report["on_first_error"] == "rank 0 refuses"  # rank 0's error, raised on every rank
        assert report["on_first_value"] == {"drawn by": 0}
        assert report["divergence"] is not None and "rank 1's ['v']" in report["divergence"]


def test_a_killed_rank_leaves_a_checkpoint_one_process_resumes(
        both: tuple[dict[str, Any], Path, subprocess.CompletedProcess]) -> None:
    single, out, killed = both
    assert killed.returncode != 0 and re.search(r"exitcode\s*:\s*17", killed.stderr), killed.stderr[-3000:]
    run_dir = out / "run-kill"
    # rank 1 died after step 5; rank 0 could not finish step 6 without it: the checkpoint of step 4 stands
    assert _meta(run_dir)["step"] == 4
    assert sum(e["steps"] for e in _meta(run_dir)["ledger"]["events"]) == 4
    with one_thread():
        model, batches, ledger = _train("dense", run_dir)  # one process now, from the checkpoint
    assert batches == single["dense"]["batches"][4:]  # the batches the uninterrupted run took
    assert ledger == single["dense"]["ledger"]
    assert _meta(run_dir)["ledger"] == _meta(single["dense"]["run_dir"])["ledger"]
    for name, param in model.named_parameters():
        assert torch.allclose(param.detach(), single["dense"]["params"][name], rtol=0, atol=1e-6), name


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
