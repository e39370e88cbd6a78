"""CANIFE's canary for DP-FedAvg: the canary client's crafted update and the server's score of it.

Maddock, Sablayrolles and Stock, "CANIFE: crafting canaries for empirical privacy measurement in federated
learning" (arXiv 2210.02912). Under user-level DP the unit that is clipped and noised is a whole client's
update, and a client controls its update entirely; so the canary here is a crafted UPDATE, the
gradient-space canary of `tramontane.audit.canife.orthogonal_direction`: a direction orthogonal to a design
pool of clipped client updates (what the other clients are expected to send), scaled to the clipping norm C
so that clipping leaves it whole. The adversary's best test then reads the aggregate along that direction,
where the other clients add (almost) nothing and only the noise hides the canary.

- Client (`design_pool`, `craft_canary_update`): m updates of local training from the current global model,
  each on a disjoint random part of the canary client's rows (m mock clients, as CANIFE's design pool), are
  clipped and stacked; the canary is C u with u the unit vector that `orthogonal_direction` draws.
- Server (`canary_score`): s = <u, theta_after - theta_before>, the released model update projected on the
  canary's direction. Any positive rescaling of the scores leaves the empirical epsilon unchanged (it only
  thresholds them), so the server learning rate and the denominator qN need not be divided out.

The configuration keys the CANIFE strategy sends the canary client live here, beside the code that reads
them, so that the client imports neither flwr's strategy side nor the audit's estimators. Imports torch
only inside `craft_canary_update`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from tramontane.errors import PrivacyParameterError
from tramontane.federated.clipping import Arrays, clip_update
from tramontane.seeding import numpy_rng, seed_for

# Keys of the train message's ConfigRecord (set by `CanifeStrategy`) and of the reply's records.
ACTION_KEY = "canife-action"  # absent: train only; UPDATE_AND_CANARY or CANARY_ONLY
UPDATE_AND_CANARY = "update+canary"
CANARY_ONLY = "canary"
POOL_KEY = "canife-design-pool"  # m, the number of mock-client updates to craft against
CANARY_RECORD = "canary"  # the reply's ArrayRecord holding the canary update


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """All arrays as one float64 vector [D], in their order."""
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in arrays.values()])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> Arrays:
    """The vector [D] cut into arrays shaped (and typed) like `like`."""
    out: Arrays = {}
    start = 0
    for k, v in like.items():
        v = np.asarray(v)
        out[k] = vector[start:start + v.size].reshape(v.shape).astype(v.dtype)
        start += v.size
    if start != vector.size:
        raise PrivacyParameterError(f"a vector of {vector.size} values does not fit arrays of {start} values")
    return out


def design_pool(params: Mapping[str, np.ndarray], num_rows: int, pool_size: int, max_update_norm: float,
                train: Callable[[np.ndarray], Arrays], seed: int | None = None) -> np.ndarray:
    """Clipped updates [m, D] of `pool_size` mock clients: `train(rows)` -> new parameters from `params`
    on those rows of the canary client, for m disjoint random parts of its `num_rows` rows."""
    if pool_size < 1 or pool_size > num_rows:
        raise PrivacyParameterError(f"a design pool of {pool_size} mock clients needs 1 <= m <= the "
                                    f"canary client's {num_rows} rows")
    parts = np.array_split(numpy_rng(seed, "CANIFE design pool").permutation(num_rows), pool_size)
    base = flatten(params)
    rows = []
    for part in parts:
        new = train(part)
        delta = unflatten(flatten(new) - base, params)
        rows.append(flatten(clip_update(delta, max_update_norm)[0]))
    return np.stack(rows)


def craft_canary_update(pool: np.ndarray, max_update_norm: float, seed: int | None = None) -> np.ndarray:
    """The canary update [D]: `max_update_norm` times a unit vector orthogonal to every pool row
    (`tramontane.audit.canife.orthogonal_direction`, a random direction with the pool's span removed)."""
    import torch

    from tramontane.audit.canife import orthogonal_direction

    generator = torch.Generator().manual_seed(seed_for(seed, "CANIFE canary direction"))
    u = orthogonal_direction(torch.from_numpy(np.asarray(pool, dtype=np.float64)), generator)
    return max_update_norm * u.numpy()


def canary_score(canary: Mapping[str, np.ndarray], before: Mapping[str, np.ndarray],
                 after: Mapping[str, np.ndarray]) -> float:
    """<u, after - before> with u the canary's unit direction: the released update read along the canary."""
    c = flatten(canary)
    norm = float(np.linalg.norm(c))
    if norm == 0:
        raise PrivacyParameterError("the canary update is zero: it has no direction to score")
    return float((c / norm) @ (flatten(after) - flatten(before)))
