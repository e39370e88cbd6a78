"""DP-SGD over the processes of a `torchrun` launch: every process holds a whole replica of the model and
trains on its shard of each Poisson batch; the clipped sums are added up across processes and the Gaussian
noise is added once.

Launch with `torchrun --nproc-per-node N -m tramontane.cli finetune ...` (or `synth fit`), or run a script of
one's own under torchrun: the `Trainer` joins the process group itself (`replica_group()`). torchrun sets
RANK, WORLD_SIZE and LOCAL_RANK; the group uses gloo for CPU tensors, and NCCL for CUDA tensors when a GPU
is present ("cpu:gloo,cuda:nccl", each process on the GPU of its LOCAL_RANK). Without torchrun, or with one
process, `replica_group()` is None and every step is the single-process one, bit for bit.

One DP-SGD step with W processes (ranks), `DPEngine.add_noise_and_set_grads` with a `ReplicaGroup` as its
reducer (the engine's one step, not a copy of it):

1. sampling: example i joins step t's batch iff u_{t,i} < q, with the same uniforms u_t on every rank
   (see "Seeding" below); each rank keeps the examples of its shard (`shard_of`: a fixed contiguous split of
   0..N-1 by rank). The union of the ranks' batches is the single-process `PoissonSampler`'s batch;
2. clipping: each rank records and clips its examples (`DPEngine.record`) into its clipped sum;
3. the W clipped sums are all-reduced (SUM): every rank holds sum_i c_i g_i over the whole batch;
4. noise: rank 0 draws N(0, (sigma C)^2 I) from the engine's `noise.SecureRandom` (the stream a single
   process would draw at that step) and broadcasts it, so the noise is added exactly once;
5. every rank divides by the *global* expected batch q N and sets `.grad`; the same optimizer step on the
   same values keeps the replicas bit-identical. `ReplicaGroup.check_in_sync` all-gathers a checksum of
   every parameter's bits every `check_every` steps and raises `DistributedError` on any difference.

Seeding, and why the privacy analysis (Poisson sampling at rate q, then the sampled Gaussian mechanism)
still holds. The sampler's uniforms for step t are one `torch.rand(N)` draw on every rank, seeded
- with a run seed: from `derive_seed(seed, "Poisson sampling", "cpu", t)`, as in a single process;
- without one: from a fresh 63-bit seed that rank 0 draws from the OS CSPRNG at each step and broadcasts
  (`ReplicaGroup.agree_seed`), as a single process draws one at each step.
So each example is in each step's batch independently with probability q, exactly as the accountant
assumes, and exactly one rank (its shard's) computes its clipped gradient. The noisy sum released to the
optimizer is (sum over the batch of c_i g_i) + N(0, (sigma C)^2 I): the single-process mechanism, with
sensitivity C to adding or removing one example, whatever W. The expected batch q N is global. Nothing of
this depends on W: the batch of step t is a function of (seed, t) alone, so a checkpoint holds no per-rank
state, and a run resumes with any number of processes and takes the same batches it would have taken.
Trust model: the ranks are one party (they see the batch's membership and each other's clipped sums);
DP covers what leaves the group (weights, ledger, outputs). Cost: every rank draws the N uniforms a single
process draws (for N = 10^7, 0.2-0.3 s per step on one busy CPU core); the collectives are one all-reduce
of the trainable parameters' size, one broadcast of that size and one 8-byte broadcast per step.

Writes: checkpoints (with the privacy ledger) and a run's outputs are written by rank 0 only
(`on_first`: every rank arrives, rank 0 acts, the others receive its result or its error); every rank keeps
the same ledger in memory.

What is supported, with per-example clipping:
- data parallelism over W processes on one or several machines: each holds the whole model, e.g. LoRA
  adapters over a frozen base (kept in bfloat16 with `--base-dtype`), or a small synthesizer;
- CPU tensors over gloo (what `finetune` and `synth fit` train on, and what the tests run); CUDA tensors
  over NCCL for a model the caller puts on its process's GPU (not covered by the tests, which have no
  GPUs); any number of processes on resume.
Not supported, and refused (`UnsupportedModuleError`, `refuse_sharded`) rather than run wrongly:
- FSDP2 (`fully_shard`, DTensor parameters) and FSDP1: per-example clipping of a sharded model is not
  implemented. It would need each example's squared gradient norm summed over the shards of every parameter,
  clipped sums kept and reduce-scattered per shard, and the noise drawn per shard; the engine keeps full-size
  clipped sums on every rank, and its hooks have not been validated on FSDP2's unsharded views. A model
  that does not fit on one device cannot be trained privately here yet;
- a model wrapped in DistributedDataParallel: the engine reduces the clipped sums itself (DDP would
  average unclipped gradients, and ranks with different batch sizes would stall it);
- tensor or pipeline parallelism.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from tramontane.errors import ConfigError, DistributedError, UnsupportedModuleError

logger = logging.getLogger(__name__)

T = TypeVar("T")

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_CHECK_EVERY = 50  # steps between two checks that the replicas are bit-identical
_BIT_VIEWS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class Reducer(Protocol):
    """What `DPEngine` needs to spread one DP-SGD step over processes (`ReplicaGroup` is one)."""

    rank: int

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor, in place, by its sum over the processes."""

    def broadcast_from_first(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor, in place, by rank 0's."""


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or anything that sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def is_first() -> bool:
    """Whether this process prints and writes: rank 0 of the process group or of a torchrun launch (known
    from the environment before the group is joined), or a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0" if launched_by_torchrun() else True


def shard_of(num_examples: int, rank: int, world_size: int) -> range:
    """The examples `rank` computes gradients for: a contiguous block of 0..N-1, the blocks of the ranks a
    partition of it (sizes differ by at most one). A function of (N, rank, W) only: recomputed, never saved."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in 0..{world_size - 1}")
    return range(rank * num_examples // world_size, (rank + 1) * num_examples // world_size)


def refuse_sharded(model: nn.Module) -> None:
    """Raise `UnsupportedModuleError` for a model sharded by FSDP (1 or 2) or wrapped in DDP (see the module
    docstring: the engine clips whole per-example gradients and reduces the clipped sums itself)."""
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    for name, module in model.named_modules():
        if isinstance(module, DistributedDataParallel):
            raise UnsupportedModuleError(
                f"{name or 'the model'} is wrapped in DistributedDataParallel: pass the bare model; under "
                "torchrun the DP engine all-reduces the clipped per-example sums itself")
        if isinstance(module, (FSDPModule, FullyShardedDataParallel)):
            raise UnsupportedModuleError(
                f"{name or 'the model'} is sharded with FSDP: per-example clipping of sharded parameters is not "
                "implemented. Train a model that fits on one device per process (e.g. LoRA over a bfloat16 "
                "base) with plain torchrun data parallelism")
    sharded = [name for name, param in model.named_parameters() if isinstance(param, DTensor)]
    if sharded:
        raise UnsupportedModuleError(
            f"parameters {sharded[:5]} are DTensors (sharded): per-example clipping of sharded parameters is "
            "not implemented; use full (unsharded) parameters on every process")


def param_checksums(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """[P] int64: for each tensor, the sum of its elements' bit patterns (read as integers of their width).
    Any bitwise difference between two copies changes it, barring exact cancellation."""
    sums = []
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        bits = flat.view(_BIT_VIEWS[flat.element_size()]) if flat.is_floating_point() else flat
        sums.append(bits.sum(dtype=torch.int64).cpu())
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


class ReplicaGroup:
    """The processes of this launch, each holding a whole replica of the model (see the module docstring).
    Wraps torch.distributed's default process group, which must be initialized (`replica_group()` does it).

    Attributes:
        rank, world_size: this process's rank and the number of processes.
        check_every: steps between the trainer's checks that the replicas are bit-identical (0: only at the
            start and the end of a run).
        comm_seconds: wall time spent in collectives so far (all-reduce, broadcasts, seed agreement), for
            benchmarks.
    """

    def __init__(self, check_every: int = DEFAULT_CHECK_EVERY) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError("torch.distributed's process group is not initialized: call replica_group()")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.check_every = check_every
        self.comm_seconds = 0.0

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def shard(self, num_examples: int) -> range:
        """This rank's examples (`shard_of`)."""
        return shard_of(num_examples, self.rank, self.world_size)

    # -- collectives ---------------------------------------------------------------------------------
    def _coalesced(self, tensors: Sequence[torch.Tensor], collective: Callable[[torch.Tensor], object]) -> None:
        """Run `collective` in place on one flat buffer per (device, dtype) rather than once per tensor."""
        start = time.perf_counter()
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for tensor in tensors:
            groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
        with torch.no_grad():
            for group in groups.values():
                if len(group) == 1 and group[0].is_contiguous():
                    collective(group[0])
                    continue
                flat = torch.cat([t.reshape(-1) for t in group])
                collective(flat)
                offset = 0
                for tensor in group:
                    tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
                    offset += tensor.numel()
        self.comm_seconds += time.perf_counter() - start

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor, in place, by its sum over the ranks (the same result on every rank)."""
        self._coalesced(tensors, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))

    def broadcast_from_first(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor, in place, by rank 0's."""
        self._coalesced(tensors, lambda flat: dist.broadcast(flat, src=0))

    def agree_seed(self, seed: int) -> int:
        """Rank 0's `seed`, on every rank (a 63-bit generator seed)."""
        box = torch.tensor([seed], dtype=torch.int64)
        self._coalesced([box], lambda flat: dist.broadcast(flat, src=0))
        return int(box.item())

    def barrier(self) -> None:
        dist.barrier()

    def on_first(self, action: Callable[[], T]) -> T:
        """Run `action` on rank 0 only, once every rank has arrived here; return its result on every rank,
        or raise its error on every rank (the same exception type where it can be rebuilt). For writes and
        for choices that must be made once (a plan that spends privacy budget, a seed drawn by one rank)."""
        self.barrier()  # whatever each rank checks or reads before this, it does before rank 0 acts
        box: list[Any] = [None]
        if self.is_first:
            try:
                result = action()
            except Exception as err:
                box[0] = ("error", _portable(err))
                dist.broadcast_object_list(box, src=0)
                raise
            box[0] = ("ok", result)
            dist.broadcast_object_list(box, src=0)
            return result
        dist.broadcast_object_list(box, src=0)
        status, payload = box[0]
        if status == "error":
            raise _rebuilt(payload)
        return cast(T, payload)

    # -- replicas ------------------------------------------------------------------------------------
    def check_in_sync(self, named: Iterable[tuple[str, torch.Tensor]], step: int | None = None) -> None:
        """Raise `DistributedError` unless every rank holds bit-identical tensors (all-gathered checksums of
        their bits, `param_checksums`). With `step`, only when it is a multiple of `check_every`."""
        if step is not None and (not self.check_every or step % self.check_every):
            return
        pairs = list(named)
        names = [name for name, _ in pairs]
        mine = param_checksums(tensor for _, tensor in pairs)
        start = time.perf_counter()
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine)
        self.comm_seconds += time.perf_counter() - start
        for rank, theirs in enumerate(everyone[1:], start=1):
            differ = (theirs != everyone[0]).nonzero().flatten().tolist()
            if differ:
                where = f"after step {step}" if step is not None else "here"
                raise DistributedError(
                    f"the replicas diverged {where}: rank {rank}'s {[names[i] for i in differ[:5]]} differ from "
                    "rank 0's. Every rank must start from the same weights and apply the same optimizer to the "
                    "same noisy gradient; check for per-rank randomness or non-deterministic kernels")


def _portable(err: Exception) -> tuple[bytes | None, str]:
    """An exception as (pickle or None, its text), so that another rank can raise it again."""
    text = f"{type(err).__name__}: {err}"
    try:
        return pickle.dumps(err), text
    except (pickle.PicklingError, TypeError, AttributeError):  # an unpicklable exception travels as its text
        return None, text


def _rebuilt(payload: tuple[bytes | None, str]) -> Exception:
    data, text = payload
    err = None
    if data is not None:
        try:
            err = pickle.loads(data)  # from rank 0 of this launch: the same trusted party
        except (pickle.UnpicklingError, TypeError, AttributeError, ImportError):  # rebuilt from its text
            logger.debug("rank 0's error cannot be rebuilt here: %s", text)
    return err if isinstance(err, Exception) else DistributedError(f"rank 0 failed: {text}")


_GROUP: ReplicaGroup | None = None


def replica_group() -> ReplicaGroup | None:
    """The processes of this torchrun launch, joined on the first call; None for a single process (no
    torchrun, or one process). Also wraps a default process group initialized by the caller."""
    global _GROUP
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 2:
            return None
        _join_from_env()
    if dist.get_world_size() < 2:
        return None
    if _GROUP is None or (_GROUP.rank, _GROUP.world_size) != (dist.get_rank(), dist.get_world_size()):
        _GROUP = ReplicaGroup()
    return _GROUP


def _join_from_env() -> None:
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "gloo"
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"this process is local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                "visible: launch at most one process per GPU (--nproc-per-node), or hide the GPUs "
                "(CUDA_VISIBLE_DEVICES=) to train on CPUs")
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)
    atexit.register(shutdown)
    logger.info("joined the process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)


def on_first(action: Callable[[], T]) -> T:
    """`ReplicaGroup.on_first` of this launch's group, or `action()` in a single process."""
    group = replica_group()
    return action() if group is None else group.on_first(action)


def shutdown() -> None:
    """Leave the process group (at exit; a later `replica_group()` joins again)."""
    global _GROUP
    _GROUP = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DEFAULT_CHECK_EVERY", "DistributedError", "Reducer", "ReplicaGroup", "is_first",
           "launched_by_torchrun", "on_first", "param_checksums", "refuse_sharded", "replica_group",
           "shard_of", "shutdown"]
