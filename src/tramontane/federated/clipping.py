"""Flat clipping of client updates and their sum: the client's half of DP-FedAvg, and the server's sum.

McMahan, Ramage, Talwar and Zhang 2018 (arXiv 1710.06963), "flat clipping": a client's update (its new model
minus the global one) is scaled by min(1, C / ||update||), the L2 norm taken over all its arrays together, so
that adding or removing one client moves the sum of updates by at most C (`tramontane.federated.dp_fedavg`
explains the rest of the mechanism). numpy only: a client process imports this and nothing heavier.

Floating point. `clip_update` casts back to the update's dtype and then shrinks the result until its float64
norm is at most C, so the bound holds exactly for the float64 sums the server takes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TypeAlias

import numpy as np

from tramontane.errors import DPInputError, PrivacyParameterError

Arrays: TypeAlias = dict[str, np.ndarray]  # a model (or an update) as named arrays, in a fixed order


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of an update over all its arrays together, computed in float64."""
    return math.sqrt(sum(float(np.square(np.asarray(v, dtype=np.float64)).sum()) for v in update.values()))


def clip_update(update: Mapping[str, np.ndarray], max_norm: float) -> tuple[Arrays, float]:
    """(the update scaled by min(1, max_norm / ||update||), its norm before clipping).

    The result keeps each array's dtype, and its float64 norm is at most `max_norm` even after the cast (it
    is shrunk by a few ulps when rounding pushed it over): the bound the accounting relies on holds exactly.
    """
    if not (max_norm > 0 and math.isfinite(max_norm)):
        raise PrivacyParameterError(f"the clipping norm must be positive and finite, got {max_norm}")
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise DPInputError("a client update holds NaN or infinite values; it cannot be clipped")
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    clipped = {k: (np.asarray(v, dtype=np.float64) * scale).astype(np.asarray(v).dtype)
               for k, v in update.items()}
    while update_norm(clipped) > max_norm:  # rounding in the cast; each pass removes about 1e-6 of the norm
        clipped = {k: (v.astype(np.float64) * (1.0 - 1e-6)).astype(v.dtype) for k, v in clipped.items()}
    return clipped, norm


def check_like(update: Mapping[str, np.ndarray], template: Mapping[str, np.ndarray], who: str) -> None:
    """Raise `DPInputError` unless `update` has exactly the arrays (names and shapes) of `template`."""
    if list(update) != list(template):
        raise DPInputError(f"{who} has arrays {list(update)}, the model has {list(template)}")
    for k, v in update.items():
        if np.shape(v) != np.shape(template[k]):
            raise DPInputError(f"{who}: array {k!r} has shape {np.shape(v)}, the model's is "
                               f"{np.shape(template[k])}")


def sum_clipped_updates(updates: Iterable[Mapping[str, np.ndarray]], template: Mapping[str, np.ndarray],
                        max_norm: float) -> tuple[Arrays, int]:
    """(S = the sum of the updates, each clipped to `max_norm`, in float64; how many were summed).

    The one place where updates are added up: in plaintext here, where a secure-aggregation protocol would
    return the same S without the server seeing any single update. Updates are clipped again (a no-op for
    an honest client, whose update is already within `max_norm`), so that a broken or malicious client
    cannot exceed the sensitivity; under secure aggregation that check needs the protocol's help (a norm
    bound proven inside it), since the server no longer sees single updates.
    """
    total = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in template.items()}
    count = 0
    for i, update in enumerate(updates):
        check_like(update, template, f"update {i}")
        clipped, _ = clip_update(update, max_norm)
        for k, v in clipped.items():
            total[k] += v
        count += 1
    return total, count
