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
from collections.abc import Iterator, Sequence

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
    """

    def __init__(self, num_examples: int, sample_rate: float, steps: int | None = None,
                 seed: int | None = None, first_step: int = 0) -> None:
        if not isinstance(num_examples, int) or num_examples < 1:
            raise PrivacyParameterError(f"num_examples must be a positive integer, got {num_examples!r}")
        if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
            raise PrivacyParameterError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if steps is None:
            steps = max(1, round(1 / sample_rate))
        if not isinstance(steps, int) or steps < 1:
            raise PrivacyParameterError(f"steps must be a positive integer, got {steps!r}")
        self.num_examples, self.sample_rate, self.steps = num_examples, float(sample_rate), steps
        self._random = SecureRandom(seed, "Poisson sampling", first_step)

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
            yield torch.nonzero(draws < self.sample_rate).flatten().tolist()


def micro_batches(indices: Sequence[int], max_size: int) -> list[list[int]]:
    """Split one logical batch into physical micro-batches of at most `max_size` examples (none if empty).
    Clip each micro-batch, accumulate the clipped sums, add noise once per logical batch."""
    if max_size < 1:
        raise ConfigError(f"micro-batches need max_size >= 1, got {max_size}")
    indices = list(indices)
    return [indices[k * max_size:(k + 1) * max_size] for k in range(math.ceil(len(indices) / max_size))]
