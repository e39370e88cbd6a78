"""Seeds for every random stream: fresh OS entropy by default, or derived from one fixed seed per labelled use.

The one home of the rule "no seed -> fresh entropy, a seed -> a stream of its own for each use": call
`numpy_rng(seed, *labels)` for a numpy Generator, `seed_for(seed, *labels)` for a torch Generator's seed, and
`derived_seed(seed, *labels)` to pass a seed on to a callee. With a seed, the stream of one use is a pure
function of (seed, labels) through `derive_seed`, so several uses of one seed never share a stream and a
stream does not depend on which other streams were drawn first. Why fresh entropy matters for the DP noise:
`tramontane.dp.noise`.
"""

from __future__ import annotations

import hashlib
import json
import operator
import secrets

import numpy as np

_SEED_DOMAIN = "tramontane.derive_seed.v1"


def derive_seed(seed: int, *labels: str | int) -> int:
    """A 63-bit torch seed for one labelled use of `seed`: the first 8 bytes of SHA-256 over the JSON list
    [domain, seed, *labels]. Distinct labels give seeds as independent as SHA-256 outputs, so streams
    seeded from them share nothing (unlike seed + offset, where streams of nearby seeds may overlap)."""
    digest = hashlib.sha256(json.dumps([_SEED_DOMAIN, operator.index(seed), *labels]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def derived_seed(seed: int | None, *labels: str | int) -> int | None:
    """`derive_seed(seed, *labels)`, and None for None (the callee then draws fresh entropy)."""
    return None if seed is None else derive_seed(seed, *labels)


def seed_for(seed: int | None, *labels: str | int) -> int:
    """A 63-bit seed for a torch Generator: fresh from the OS CSPRNG (`secrets`) when `seed` is None, else
    `derive_seed(seed, *labels)`."""
    return secrets.randbits(63) if seed is None else derive_seed(seed, *labels)


def numpy_rng(seed: int | None, *labels: str | int) -> np.random.Generator:
    """A numpy Generator: from 128 bits of fresh OS entropy when `seed` is None; else seeded with
    `derive_seed(seed, *labels)`, or with `seed` itself when no label is given."""
    if seed is None:
        return np.random.default_rng(secrets.randbits(128))
    return np.random.default_rng(derive_seed(seed, *labels) if labels else seed)


__all__ = ["derive_seed", "derived_seed", "numpy_rng", "seed_for"]
