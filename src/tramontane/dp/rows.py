"""Which example (privacy unit) each row of a captured activation belongs to.

A hooked layer sees a tensor [R0, ..., n]: its rows (every index but the last, feature, axis) belong to
examples. Per-example gradients need those rows grouped by example, padded to [G, P, n] (G examples, at most
P rows each; padding rows are zero and so add nothing to any gradient). Two layouts occur:

- `ByExample`: rows are example-major and contiguous, B examples with R/B rows each: dim 0 of a [B, T, n]
  activation, or the flattened [B*T, n] tokens an MoE router sees. Padding is a free reshape.
- `RowIndex`: an explicit example index per row: the tokens an MoE expert receives (rows of several examples
  mixed), or any layout once several rows share one privacy unit (`example_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _rows(x: torch.Tensor, feat_dims: int) -> torch.Tensor:
    """x [..., *feat] -> [R, *feat] (R = every row, flattened)."""
    return x.reshape(-1, *x.shape[x.dim() - feat_dims:]) if feat_dims else x.reshape(-1)


@dataclass(frozen=True)
class ByExample:
    """Rows are example-major: example b owns rows b*R/B .. (b+1)*R/B - 1 of the flattened tensor."""

    num_groups: int

    def pad(self, x: torch.Tensor, feat_dims: int = 1) -> torch.Tensor:
        """x [B, ..., *feat] -> [B, P, *feat] (a view when x is contiguous)."""
        feat = x.shape[x.dim() - feat_dims:] if feat_dims else ()
        return x.reshape(self.num_groups, -1, *feat)

    def per_example_sum(self, x: torch.Tensor, feat_dims: int = 1) -> torch.Tensor:
        """Sum of each example's rows: [B, ..., *feat] -> [B, *feat]."""
        return self.pad(x, feat_dims).sum(1)

    def row_groups(self, x: torch.Tensor, feat_dims: int = 1) -> torch.Tensor:
        """The example index of every flattened row, [R] int64."""
        rows = _rows(x, feat_dims).shape[0]
        per = rows // self.num_groups if self.num_groups else 0
        return torch.arange(self.num_groups, device=x.device).repeat_interleave(per)

    def num_rows_ok(self, rows: int) -> bool:
        return rows == 0 if self.num_groups == 0 else rows % self.num_groups == 0


@dataclass(frozen=True)
class RowIndex:
    """An explicit example index per flattened row (rows of one example need not be adjacent)."""

    group: torch.Tensor  # [R] int64, the example of each row
    pos: torch.Tensor  # [R] int64, the row's slot among its example's rows
    num_groups: int  # G
    width: int  # P, the most rows any example has

    @classmethod
    def from_groups(cls, group: torch.Tensor, num_groups: int) -> RowIndex:
        group = group.long()
        rows = group.numel()
        if rows == 0:
            return cls(group, group.clone(), num_groups, 0)
        counts = torch.bincount(group, minlength=num_groups)
        starts = torch.cumsum(counts, 0) - counts
        order = torch.argsort(group, stable=True)
        pos = torch.empty_like(group)
        pos[order] = torch.arange(rows, device=group.device) - starts[group[order]]
        return cls(group, pos, num_groups, int(counts.max()))

    def pad(self, x: torch.Tensor, feat_dims: int = 1) -> torch.Tensor:
        """x [..., *feat] with R rows -> [G, P, *feat], zeros where an example has fewer than P rows."""
        rows = _rows(x, feat_dims)
        assert rows.shape[0] == self.group.numel(), "row index built for another tensor"
        out = rows.new_zeros(self.num_groups, self.width, *rows.shape[1:])
        out[self.group, self.pos] = rows
        return out

    def per_example_sum(self, x: torch.Tensor, feat_dims: int = 1) -> torch.Tensor:
        rows = _rows(x, feat_dims)
        return rows.new_zeros(self.num_groups, *rows.shape[1:]).index_add_(0, self.group, rows)

    def row_groups(self, x: torch.Tensor, feat_dims: int = 1) -> torch.Tensor:
        return self.group

    def num_rows_ok(self, rows: int) -> bool:
        return rows == self.group.numel()


Layout = ByExample | RowIndex
