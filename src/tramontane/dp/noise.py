"""Randomness of the Gaussian mechanism (and of Poisson sampling), securely seeded by default.

Without a seed, each draw's torch.Generator is seeded from the operating system's CSPRNG (`secrets`), afresh
at every step, so that neither noise nor sampling of one step can be predicted from another's. The
generator itself is torch's Mersenne Twister / Philox, not a cryptographic generator, and floating-point
Gaussian samples are known to leak low-order bits (Mironov 2012, "On significance of the least significant
bits for differential privacy"); like Opacus without `secure_mode`, we accept both.

With a seed, every draw is reproducible, hence predictable by whoever knows the seed: a `TramontaneWarning`
says so. Use seeds for tests and debugging, not for releases. A seeded stream is a pure function of
(seed, purpose, device, step index) through `tramontane.seeding.derive_seed`, which gives two guarantees:
- one seed may serve several mechanisms: the Poisson sampler and the Gaussian noise seeded alike still
  draw independent streams (their purposes differ), so the noise is never a function of the batch draws;
- a run resumed at step k (`first_step=k`) draws exactly what an uninterrupted run draws at steps k, k+1,
  ..., never a replay of steps 0, 1, ...
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from tramontane.errors import PrivacyParameterError, TramontaneWarning
from tramontane.seeding import derive_seed, seed_for  # noqa: F401 - derive_seed re-exported: its old path


class SecureRandom:
    """Per-device torch.Generators, new for every step: from `secrets`, or derived from a fixed seed.

    Call `next_step()` at the start of each step (the first call opens step `first_step`; a `generator()`
    request before any call opens it too). Within a step, draws on one device continue one stream.

    Args:
        seed: None (secure: fresh OS entropy at each step) or a fixed seed (reproducible; warns).
        purpose: what the draws are for; it names the stream in the warning and labels the seed derivation,
            so generators of different purposes never share a stream, whatever their seeds.
        first_step: index of the first step, for a resumed run (ignored without a seed).
        agree_seed: for the processes of a distributed run that must draw the same stream (Poisson sampling,
            `distributed.ReplicaGroup.agree_seed`): maps each generator's seed to rank 0's, so an unseeded
            run uses rank 0's fresh OS entropy on every rank.
    """

    def __init__(self, seed: int | None, purpose: str, first_step: int = 0,
                 agree_seed: Callable[[int], int] | None = None) -> None:
        if isinstance(first_step, bool) or not isinstance(first_step, int) or first_step < 0:
            raise PrivacyParameterError(f"first_step must be an integer >= 0, got {first_step!r}")
        if seed is not None:
            warnings.warn(
                f"{purpose} uses a fixed seed ({seed}): it is reproducible and NOT secure; anyone who knows "
                "the seed can predict it. Leave seed=None for a private run.",
                TramontaneWarning, stacklevel=3)
        self.seed, self.purpose, self._agree_seed = seed, purpose, agree_seed
        self.step: int | None = None  # index of the current step; None until the first
        self._next_step = first_step
        self._generators: dict[torch.device, torch.Generator] = {}

    def next_step(self) -> None:
        """Start the next step: its draws come from new generators (new secret or derived seeds)."""
        self.step, self._next_step = self._next_step, self._next_step + 1
        self._generators.clear()

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        device = torch.device(device)
        if self.step is None:
            self.next_step()
        assert self.step is not None
        if device not in self._generators:
            seed = seed_for(self.seed, self.purpose, str(device), self.step)
            gen = torch.Generator(device=device)
            gen.manual_seed(seed if self._agree_seed is None else self._agree_seed(seed))
            self._generators[device] = gen
        return self._generators[device]

    def normal(self, shape: torch.Size, std: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """N(0, std^2) samples of the given shape."""
        noise = torch.randn(shape, generator=self.generator(device), device=device, dtype=dtype)
        return noise.mul_(std)
