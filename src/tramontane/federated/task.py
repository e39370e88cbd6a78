"""The federated demo task: logistic regression on UCI Adult, the training table split across clients.

Small on purpose, so that a federation of processes on one machine spends its time in Flower and in the
mechanism, not in the model: numpy only (no torch, no flwr), about a hundred parameters.

- Features (`encode`): one-hot categories and numbers scaled to [0, 1] with the PUBLIC schema's ranges
  (`tramontane.datasets.adult_schema`), log-scaled for the heavy-tailed ones. Nothing is fitted on the rows,
  so the encoding itself spends no privacy.
- Clients (`client_data`): the 32,561 training rows permuted with a fixed public seed and cut into
  `num_partitions` contiguous shards; client `partition_id` holds one shard (a hospital's records).
- Local training (`local_train`): plain minibatch SGD on the logistic loss from the global model, for
  `LocalTraining.epochs` passes over the client's rows in a fresh random order.
- Evaluation (`evaluate`): loss and accuracy on the held-out test split (public here, so the server may
  score every release without spending privacy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from tramontane.datasets import ADULT_TARGET, adult_schema, load_adult
from tramontane.errors import ConfigError
from tramontane.tables.schema import Schema

PARTITION_SEED = 0  # the public permutation that assigns rows to clients
POSITIVE = ">50K"
LOG_SCALE_ABOVE = 1000.0  # numeric columns whose public upper bound exceeds this are log-scaled

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class LocalTraining:
    """A client's local training: `epochs` passes of minibatch SGD at `learning_rate`."""

    epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"local epochs must be an integer >= 1, got {self.epochs!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"local batch size must be an integer >= 1, got {self.batch_size!r}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"local learning rate must be positive, got {self.learning_rate}")


def encode(frame: pd.DataFrame, schema: Schema, target: str = ADULT_TARGET) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, D] float32, labels [n] float32 in {0, 1}) from the schema's public ranges only."""
    columns: list[np.ndarray] = []
    for spec in schema:
        if spec.name == target:
            continue
        values = frame[spec.name]
        if spec.is_numeric:
            lo, hi = float(spec.lo or 0.0), float(spec.hi or 1.0)
            x = np.clip(values.to_numpy(dtype=np.float64), lo, hi)
            if lo >= 0 and hi > LOG_SCALE_ABOVE:
                x = np.log1p(x - lo) / math.log1p(hi - lo)
            else:
                x = (x - lo) / (hi - lo)
            columns.append(x[:, None])
        else:
            cats = np.asarray(spec.categories, dtype=object)
            columns.append((values.to_numpy(dtype=object)[:, None] == cats[None, :]).astype(np.float64))
    features = np.concatenate(columns, axis=1).astype(np.float32)
    labels = (frame[target].astype(str).str.rstrip(".") == POSITIVE).to_numpy(dtype=np.float32)
    return features, labels


@lru_cache(maxsize=2)
def _encoded(split: str) -> tuple[np.ndarray, np.ndarray]:
    return encode(load_adult(split), adult_schema())


def num_features() -> int:
    """D, the number of encoded features."""
    schema = adult_schema()
    return sum(1 if spec.is_numeric else len(spec.categories) for spec in schema if spec.name != ADULT_TARGET)


def partition_indices(num_rows: int, num_partitions: int, partition_id: int) -> np.ndarray:
    """Rows of client `partition_id`: a contiguous shard of a permutation drawn with a public seed."""
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise ConfigError(f"num-partitions must be an integer >= 1, got {num_partitions!r}")
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) \
            or not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id must be an integer in [0, {num_partitions}), got {partition_id!r}")
    order = np.random.default_rng(PARTITION_SEED).permutation(num_rows)
    return np.array_split(order, num_partitions)[partition_id]


def client_data(partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of one client of the Adult federation."""
    x, y = _encoded("train")
    idx = partition_indices(len(y), num_partitions, partition_id)
    return x[idx], y[idx]


def held_out_data() -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of Adult's held-out test split."""
    return _encoded("test")


def initial_params(dim: int | None = None) -> Arrays:
    """The global model before the first round: all zeros (weight [D], bias [1])."""
    d = num_features() if dim is None else dim
    return {"weight": np.zeros(d, dtype=np.float32), "bias": np.zeros(1, dtype=np.float32)}


def _logits(params: Arrays, x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ params["weight"].astype(np.float64) + float(params["bias"][0])


def local_train(params: Arrays, x: np.ndarray, y: np.ndarray, training: LocalTraining,
                rng: np.random.Generator) -> Arrays:
    """The client's new parameters after local SGD from `params` (which are left untouched)."""
    w = params["weight"].astype(np.float64).copy()
    b = float(params["bias"][0])
    n = len(y)
    for _ in range(training.epochs):
        order = rng.permutation(n)
        for start in range(0, n, training.batch_size):
            batch = order[start:start + training.batch_size]
            xb, yb = x[batch].astype(np.float64), y[batch]
            p = 1.0 / (1.0 + np.exp(-(xb @ w + b)))
            err = p - yb  # gradient of the mean logistic loss w.r.t. the logits, times the batch size
            w -= training.learning_rate * (xb.T @ err) / len(batch)
            b -= training.learning_rate * float(err.mean())
    return {"weight": w.astype(params["weight"].dtype), "bias": np.array([b], dtype=params["bias"].dtype)}


def evaluate(params: Arrays, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean logistic loss, accuracy) of the model on (x, y)."""
    z = _logits(params, x)
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
    accuracy = float(np.mean((z > 0) == (y > 0.5)))
    return loss, accuracy
