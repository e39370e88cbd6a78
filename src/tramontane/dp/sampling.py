"""Poisson sampling of logical batches, and their split into physical micro-batches.

Privacy amplification by subsampling as the accountants compute it (Abadi et al. 2016; Mironov et al. 2019,
"Renyi differential privacy of the sampled Gaussian mechanism") assumes each example joins each step's
batch independently with probability q = `sample_rate`, secretly. Batch sizes are then Binomial(N, q):
variable, sometimes empty. An empty batch is still a step: the training loop must still add noise (the
engine does) and the accountant must still count it. The gradient is normalised by the *expected* batch
size q N, never the realised one (which would depend on the data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from tramontane.dp.noise import SecureRandom
from tramontane.errors import ConfigError, PrivacyParameterError


class PoissonSampler:
    """A batch sampler: each iteration yields `steps` lists of example indices, each index in [0, N)
    included independently with probability `sample_rate` (lists may be empty).

    Usable as `torch.utils.data.DataLoader(dataset, batch_sampler=..., collate_fn=...)` provided the
    collate function accepts an empty list. `steps` defaults to round(1 / sample_rate): one epoch in
    expectation. Without a seed the draws are seeded from the OS CSPRNG; a seed warns (`TramontaneWarning`)
    and makes step t's batch a function of (seed, t) alone (`noise.derive_seed`), independent of the
    noise an engine draws from the same seed. A resumed run passes `first_step` = the steps already
    taken, so that its seeded batches continue the run's sequence instead of repeating its first steps.

    In a distributed run (`distributed.py`) each process passes its `shard` of 0..N-1 and the group's
    `agree_seed`: every process draws the same N uniforms (rank 0's seed) and yields the sampled indices of
    its shard, so the shards' batches add up to exactly the batch one process would draw.
    """

    def __init__(self, num_examples: int, sample_rate: float, steps: int | None = None,
                 seed: int | None = None, first_step: int = 0, *, shard: range | None = None,
                 agree_seed: Callable[[int], int] | None = None) -> None:
        if not isinstance(num_examples, int) or num_examples < 1:
            raise PrivacyParameterError(f"num_examples must be a positive integer, got {num_examples!r}")
        if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
            raise PrivacyParameterError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if steps is None:
            steps = max(1, round(1 / sample_rate))
        if not isinstance(steps, int) or steps < 1:
            raise PrivacyParameterError(f"steps must be a positive integer, got {steps!r}")
        if shard is not None and not (shard.step == 1 and 0 <= shard.start <= shard.stop <= num_examples):
            raise ConfigError(f"shard must be a contiguous range inside 0..{num_examples}, got {shard!r}")
        self.num_examples, self.sample_rate, self.steps = num_examples, float(sample_rate), steps
        self.shard = shard
        self._random = SecureRandom(seed, "Poisson sampling", first_step, agree_seed)

    @property
    def expected_batch_size(self) -> float:
        """q N: what the noisy gradient sum is divided by."""
        return self.sample_rate * self.num_examples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            self._random.next_step()
            draws = torch.rand(self.num_examples, generator=self._random.generator("cpu"))
            if self.shard is None:
                yield torch.nonzero(draws < self.sample_rate).flatten().tolist()
            else:  # all N uniforms are drawn, so that the stream is the one a single process draws
                start, stop = self.shard.start, self.shard.stop
                yield (torch.nonzero(draws[start:stop] < self.sample_rate).flatten() + start).tolist()


def micro_batches(indices: Sequence[int], max_size: int) -> list[list[int]]:
    """Split one logical batch into physical micro-batches of at most `max_size` examples (none if empty).
    Clip each micro-batch, accumulate the clipped sums, add noise once per logical batch."""
    if max_size < 1:
        raise ConfigError(f"micro-batches need max_size >= 1, got {max_size}")
    indices = list(indices)
    return [indices[k * max_size:(k + 1) * max_size] for k in range(math.ceil(len(indices) / max_size))]
