"""Randomness of the Gaussian mechanism (and of Poisson sampling), securely seeded by default.

Without a seed, each draw's torch.Generator is seeded from the operating system's CSPRNG (`secrets`), afresh
at every step, so that neither noise nor sampling of one step can be predicted from another's. The
generator itself is torch's Mersenne Twister / Philox, not a cryptographic generator, and floating-point
Gaussian samples are known to leak low-order bits (Mironov 2012, "On significance of the least significant
bits for differential privacy"); like Opacus without `secure_mode`, we accept both.

With a seed, every draw is reproducible, hence predictable by whoever knows the seed: a `TramontaneWarning`
says so. Use seeds for tests and debugging, not for releases.
"""

from __future__ import annotations

import secrets
import warnings
import zlib

import torch

from tramontane.errors import TramontaneWarning


class SecureRandom:
    """A per-device torch.Generator: reseeded from `secrets` at each `next_step()`, or seeded once."""

    def __init__(self, seed: int | None, purpose: str) -> None:
        if seed is not None:
            warnings.warn(
                f"{purpose} uses a fixed seed ({seed}): it is reproducible and NOT secure; anyone who knows "
                "the seed can predict it. Leave seed=None for a private run.",
                TramontaneWarning, stacklevel=3)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def next_step(self) -> None:
        """Unseeded: the next draws use new secret seeds. Seeded: the reproducible streams just continue."""
        if self.seed is None:
            self._generators.clear()

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        device = torch.device(device)
        if device not in self._generators:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.manual_seed(secrets.randbits(63))
            else:  # distinct, reproducible streams per device
                gen.manual_seed((self.seed + zlib.crc32(str(device).encode())) % 2**63
                                if device.type != "cpu" else self.seed)
            self._generators[device] = gen
        return self._generators[device]

    def normal(self, shape: torch.Size, std: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """N(0, std^2) samples of the given shape."""
        noise = torch.randn(shape, generator=self.generator(device), device=device, dtype=dtype)
        return noise.mul_(std)
