"""One use of one parameter in a recorded forward: its share of every example's gradient.

A parameter's per-example gradient is the sum over all its uses (a layer called twice, an embedding matrix
tied to the output head). Each use is a `Contribution` that can give:

- `sq_norms()` [G]: the squared norm of this use's per-example gradients, without materialising them where
  the layer allows it (ghost norms, Li et al. 2022 "Large language models can be strong differentially
  private learners"; Bu et al. 2023 "Differentially private optimization on large model at small cost");
- `add_clipped_sum_(out, c)`: out += sum_i c_i * grad_i, the clipped gradient sum once every clip factor is
  known, accumulated in place into the step's running sum (the
  "book-keeping" trick of Bu et al.: re-weight the saved activations and output gradients instead of running
  a second backward pass);
- for parameters with several uses, what the norm of the *sum* needs: `factors()` (per-example gradient
  sum_p L_p R_p^T, so that the cross term of two uses is sum_{p,q} (L_p.L'_q)(R_p.R'_q)) or `per_example()`.

Shapes: G examples, P rows per example (padded), o/i a linear layer's output/input features, V/d an
embedding's rows/width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from tramontane.dp.rows import RowIndex


@dataclass
class Factor:
    """One side of a rank-P per-example gradient sum_p L_p R_p^T: dense rows, or one-hot rows by index."""

    dense: torch.Tensor | None = None  # [G, P, n]
    index: torch.Tensor | None = None  # [G, P] int64: row p is the one-hot vector e_index
    mask: torch.Tensor | None = None  # [G, P] bool: which index rows are real (not padding)


def _gram(u: Factor, v: Factor) -> torch.Tensor:
    """[G, Pu, Pv] inner products of u's rows with v's rows."""
    if u.dense is not None and v.dense is not None:
        return torch.bmm(u.dense, v.dense.transpose(1, 2))
    if u.dense is None and v.dense is None:
        assert u.index is not None and v.index is not None and u.mask is not None and v.mask is not None
        same = (u.index[:, :, None] == v.index[:, None, :]) & u.mask[:, :, None] & v.mask[:, None, :]
        return same
    if u.dense is None:
        return _gram(v, u).transpose(1, 2)
    assert v.index is not None and v.mask is not None
    picked = u.dense.gather(2, v.index[:, None, :].expand(-1, u.dense.shape[1], -1))  # <u_p, e_{v_q}>
    return picked * v.mask[:, None, :]


def cross_term(u: tuple[Factor, Factor], v: tuple[Factor, Factor]) -> torch.Tensor:
    """<grad_u_i, grad_v_i> for every example i, from both uses' factors: [G]."""
    assert u[1].dense is not None, "the second factor of every contribution is dense"
    return _batched_dot(_gram(u[0], v[0]).to(u[1].dense.dtype), _gram(u[1], v[1]))


def _batched_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over all but dim 0 of x * y, [G] (a batched matmul: no temporary the size of x)."""
    g = x.shape[0]
    return torch.bmm(x.reshape(g, 1, -1), y.reshape(g, -1, 1)).view(g)


class Contribution(ABC):
    """Base class; see the module docstring."""

    @abstractmethod
    def sq_norms(self) -> torch.Tensor:
        ...

    @abstractmethod
    def add_clipped_sum_(self, out: torch.Tensor, clip: torch.Tensor) -> None:
        ...

    @abstractmethod
    def per_example(self) -> torch.Tensor:
        ...

    def factors(self) -> tuple[Factor, Factor] | None:
        return None


class PerExample(Contribution):
    """Materialised per-example gradients [G, *param.shape] (small parameters, or cheaper than ghost)."""

    def __init__(self, grads: torch.Tensor) -> None:
        self.grads = grads

    def sq_norms(self) -> torch.Tensor:
        return _batched_dot(self.grads, self.grads)

    def add_clipped_sum_(self, out: torch.Tensor, clip: torch.Tensor) -> None:
        flat = self.grads.reshape(self.grads.shape[0], -1).to(out.dtype)
        out.view(-1).addmv_(flat.t(), clip.to(out.dtype))

    def per_example(self) -> torch.Tensor:
        return self.grads


class LinearGhost(Contribution):
    """A linear weight [o, i] whose example-i gradient is g_i^T a_i (a [G, P, i] inputs, g [G, P, o] output
    gradients). Squared norm <a a^T, g g^T> costs O(P^2 (i + o)) per example instead of O(P i o);
    `gram_a` may be shared by layers reading the same input (wq/wk/wv, w1/w3)."""

    def __init__(self, a: torch.Tensor, g: torch.Tensor, gram_a: torch.Tensor | None = None) -> None:
        self.a, self.g, self.gram_a = a, g, gram_a

    def sq_norms(self) -> torch.Tensor:
        gram_a = self.gram_a if self.gram_a is not None else torch.bmm(self.a, self.a.transpose(1, 2))
        gram_g = torch.bmm(self.g, self.g.transpose(1, 2))
        return _batched_dot(gram_a, gram_g)

    def add_clipped_sum_(self, out: torch.Tensor, clip: torch.Tensor) -> None:
        clip = clip.to(out.dtype)[:, None, None]
        a, g = self.a.to(out.dtype), self.g.to(out.dtype)
        if g.shape[-1] <= a.shape[-1]:  # scale the smaller side
            g = g * clip
        else:
            a = a * clip
        out.addmm_(g.reshape(-1, g.shape[-1]).t(), a.reshape(-1, a.shape[-1]))

    def per_example(self) -> torch.Tensor:
        return torch.bmm(self.g.transpose(1, 2), self.a)

    def factors(self) -> tuple[Factor, Factor]:
        return Factor(dense=self.g), Factor(dense=self.a)


class EmbeddingRows(Contribution):
    """An embedding weight [V, d]: example i's gradient adds output gradient g_r to row idx_r for each of
    its rows r. The squared norm sums, per example, the squared norms of the per-token sums of g (equal
    tokens add up): O(R d) with a sort, never a [G, V, d] tensor."""

    def __init__(self, idx: torch.Tensor, g: torch.Tensor, group: torch.Tensor, num_groups: int,
                 num_embeddings: int, padding_idx: int | None) -> None:
        if padding_idx is not None:  # F.embedding never updates the padding row
            keep = idx != padding_idx
            idx, g, group = idx[keep], g[keep], group[keep]
        self.idx, self.g, self.group = idx, g, group  # [R], [R, d], [R]
        self.num_groups, self.num_embeddings = num_groups, num_embeddings

    def sq_norms(self) -> torch.Tensor:
        keys = self.group * self.num_embeddings + self.idx
        unique, inverse = torch.unique(keys, return_inverse=True)
        # (index_put_ with accumulate sorts once; index_add_ is much slower on CPU with repeated indices)
        per_token = self.g.new_zeros(unique.numel(), self.g.shape[1]).index_put_((inverse,), self.g,
                                                                                  accumulate=True)
        out = self.g.new_zeros(self.num_groups)
        per_token_sq = torch.linalg.vector_norm(per_token, dim=1) ** 2
        return out.index_add_(0, unique // self.num_embeddings, per_token_sq)

    def add_clipped_sum_(self, out: torch.Tensor, clip: torch.Tensor) -> None:
        scaled = self.g.to(out.dtype) * clip.to(out.dtype)[self.group, None]
        out.index_put_((self.idx,), scaled, accumulate=True)

    def per_example(self) -> torch.Tensor:
        out = self.g.new_zeros(self.num_groups * self.num_embeddings, self.g.shape[1])
        out.index_add_(0, self.group * self.num_embeddings + self.idx, self.g)
        return out.view(self.num_groups, self.num_embeddings, -1)

    def factors(self) -> tuple[Factor, Factor]:
        rows = RowIndex.from_groups(self.group, self.num_groups)
        index = rows.pad(self.idx, feat_dims=0)
        mask = rows.pad(torch.ones_like(self.idx, dtype=torch.bool), feat_dims=0)
        return Factor(index=index, mask=mask), Factor(dense=rows.pad(self.g))


def combined_sq_norms(uses: list[Contribution]) -> torch.Tensor:
    """Squared norm of the per-example gradient of a parameter used several times: the norm of the sum of
    the uses' gradients (cross terms included), never the sum of their norms."""
    if len(uses) == 1:
        return uses[0].sq_norms()
    factors = [f for f in (u.factors() for u in uses) if f is not None]
    if len(factors) == len(uses):
        total = uses[0].sq_norms()
        for u in uses[1:]:
            total = total + u.sq_norms()
        for j in range(len(uses)):
            for k in range(j + 1, len(uses)):
                total = total + 2 * cross_term(factors[j], factors[k])
        return total
    summed = uses[0].per_example()
    for u in uses[1:]:
        summed = summed + u.per_example()
    return _batched_dot(summed, summed)
