"""What a DP-SGD step trains on: a dataset of examples 0..N-1 and a per-row loss (`Objective`).

`DPEngine.step` samples nothing itself: it is given the indices of one Poisson batch and asks the objective
for their model input (`rows`) and one loss per input row (`losses`). The engine's privacy guarantee relies
on the objective keeping its side of the contract (see `engine.py`):

- `losses(model, batch)[r]` is a function of input row r alone (e.g. the mean of that row's token losses):
  never a mean over rows, never anything computed from the batch as a whole;
- the example ids returned by `rows` name, for each input row, the example it belongs to, so that all the
  rows of one example (augmentations, K views of one record) share one clip and one privacy unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn


class Objective(Protocol):
    """What the loop trains on: examples are indices 0..N-1 of a dataset the objective holds."""

    def rows(self, indices: Sequence[int]) -> tuple[Any, torch.Tensor | None]:
        """The model input for these examples, and the example id of each input row (None: one row per
        example). Several rows may belong to one example (augmentation multiplicity); they share a clip."""

    def losses(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """One loss per input row [R]; each a function of its own row only (e.g. mean token loss)."""
