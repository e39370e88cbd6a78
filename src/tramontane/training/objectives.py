"""Training objectives for the loop: next-token prediction over fixed-length token rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tramontane.errors import DataError

IGNORE_INDEX = -100


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token losses [B, T] of logits [B, T, V] against labels [B, T]; 0 where the label is IGNORE_INDEX.

    The rows are flattened to [B*T, V] for `cross_entropy`: the class-dimension-second layout
    (`logits.transpose(1, 2)`) takes a strided path that is about 3x slower on CPU."""
    batch, time, vocab = logits.shape
    return F.cross_entropy(logits.reshape(batch * time, vocab), labels.reshape(batch * time),
                           ignore_index=IGNORE_INDEX, reduction="none").view(batch, time)


class LanguageModelingObjective:
    """Next-token cross-entropy; each row's loss is the mean over its labelled tokens.

    Args:
        inputs: [R, T] token ids of every row.
        labels: [R, T] the token each position must predict (IGNORE_INDEX: not scored).
        example_of_row: [R] example index of each row, when one example has several rows (augmentation
            multiplicity); the loop then samples examples and clips their rows together. Default: row = example.
        logit_mask: optional function (row indices [R'], inputs [R', T]) -> bool [R', T, V] of the tokens
            allowed at each position (constrained models); disallowed logits are set to -inf before the loss.
        trim_padding: run each batch only up to its last labelled position (right-padded rows of different
            lengths). A causal model's losses do not depend on later positions, so each row's loss is the
            same; only the compute shrinks. Not with `logit_mask`, which is given whole rows.
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, example_of_row: torch.Tensor | None = None,
                 logit_mask: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 trim_padding: bool = False) -> None:
        if trim_padding and logit_mask is not None:
            raise DataError("trim_padding cannot be combined with a logit_mask (it is given whole rows)")
        if inputs.shape != labels.shape:
            raise DataError(f"inputs {tuple(inputs.shape)} and labels {tuple(labels.shape)} differ in shape: "
                            "give one label per input token (IGNORE_INDEX where none is scored)")
        self.inputs, self.labels, self.logit_mask = inputs, labels, logit_mask
        self.trim_padding = trim_padding
        if example_of_row is None:
            self.rows_of_example = None
            self.num_examples = inputs.shape[0]
        else:
            self.num_examples = int(example_of_row.max()) + 1
            order = torch.argsort(example_of_row, stable=True)
            counts = torch.bincount(example_of_row, minlength=self.num_examples)
            self.rows_of_example = list(torch.split(order, counts.tolist()))

    def rows(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.rows_of_example is None:
            return torch.as_tensor(list(indices), dtype=torch.long), None
        rows = [self.rows_of_example[i] for i in indices]
        ids = torch.cat([torch.full((len(r),), i) for i, r in zip(indices, rows)]) if rows else torch.empty(0)
        return (torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)), ids.long()

    def losses(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        inputs, labels = self.inputs[batch], self.labels[batch]
        if self.trim_padding and labels.numel():
            scored_at = (labels != IGNORE_INDEX).any(0).nonzero()
            width = int(scored_at.max()) + 1 if scored_at.numel() else 1
            inputs, labels = inputs[:, :width], labels[:, :width]
        logits = model(inputs).float()
        if self.logit_mask is not None:
            logits = logits.masked_fill(~self.logit_mask(batch, inputs), float("-inf"))
        token_loss = token_losses(logits, labels)
        scored = (labels != IGNORE_INDEX).float()
        return (token_loss * scored).sum(-1) / scored.sum(-1).clamp(min=1)
