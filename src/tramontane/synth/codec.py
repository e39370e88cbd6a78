"""Rows <-> token sequences, synlm's "level" tokenizer (arXiv 2306.04803; method notes in
shared/reference/synlm-method.md).

Every (column, value) pair is one token, with per-column offsets so that no value token is shared between
columns; numbers are binned by the schema's edges and missing values are a value of their own (see
`schema.py`). Each column also has a prompt token (input only, never predicted: label -100) and an end token.
A row of d columns is

    [BOS]? prompt_c1 value_c1 end_c1 prompt_c2 value_c2 end_c2 ...          (3d tokens, +1 with BOS)

in schema order, or in a column order permuted per sequence (the prompt tokens keep it decodable).
Augmentation multiplicity K turns one row into K differently-permuted sequences that share one example id,
so that the DP engine clips their gradients together: K copies are one example, not K.

Vocabulary: 0 = BOS (always reserved), 1..d = prompts, d+1..2d = ends, then each column's value block.

Constrained likelihood: the token after position t may only be one of a known set (a column's values, or
that column's end token); `mask_table()[mask_ids]` gives it, so the training loss, held-out likelihood and
the sampler (`sampling.py`) all use the same restricted softmax, and every sampled row is valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from tramontane.errors import DataError, SchemaError
from tramontane.tables.schema import Schema

IGNORE_INDEX = -100  # label of tokens that are never predicted (torch cross_entropy's ignore_index)
BOS_ID = 0


@dataclass(frozen=True)
class EncodedRows:
    """Token sequences of M = N*K sequences of length T (3d, or 3d+1 with BOS).

    labels: the token itself where it is predicted (values, ends), IGNORE_INDEX at BOS and prompts; aligned
        with `tokens` (a next-token loss compares logits[:, t] with labels[:, t + 1]).
    mask_ids: for every token, the row of `codec.mask_table()` listing what may stand there (0: no
        constraint, for tokens that are never predicted).
    example_ids: the frame row each sequence came from (the unit the DP engine clips).
    orders: column index (schema order) in each slot of each sequence.
    """

    tokens: torch.Tensor  # M T
    labels: torch.Tensor  # M T
    mask_ids: torch.Tensor  # M T
    example_ids: torch.Tensor  # M
    orders: torch.Tensor  # M d

    def __len__(self) -> int:
        return self.tokens.shape[0]


class TabularCodec:
    """Encode frames that fit `schema` into token sequences and decode sequences back into frames."""

    def __init__(self, schema: Schema, bos: bool = False) -> None:
        self.schema = schema
        self.bos = bos
        d = len(schema)
        self.n_columns = d
        sizes = np.array([c.n_values for c in schema.columns], dtype=np.int64)
        self.value_offsets = 1 + 2 * d + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.value_sizes = sizes
        self.prompt_ids = 1 + np.arange(d, dtype=np.int64)
        self.end_ids = 1 + d + np.arange(d, dtype=np.int64)
        self.vocab_size = int(1 + 2 * d + sizes.sum())
        self.seq_len = 3 * d + int(bos)
        # Reverse look-ups over the vocabulary (-1: not that kind of token).
        self._prompt_col = np.full(self.vocab_size, -1, dtype=np.int64)
        self._prompt_col[self.prompt_ids] = np.arange(d)
        self._end_col = np.full(self.vocab_size, -1, dtype=np.int64)
        self._end_col[self.end_ids] = np.arange(d)
        self._value_col = np.full(self.vocab_size, -1, dtype=np.int64)
        for c in range(d):
            self._value_col[self.value_offsets[c]: self.value_offsets[c] + sizes[c]] = c
        table = torch.zeros(1 + 2 * d, self.vocab_size, dtype=torch.bool)
        table[0] = True
        for c in range(d):
            table[1 + c, int(self.value_offsets[c]): int(self.value_offsets[c] + sizes[c])] = True
            table[1 + d + c, int(self.end_ids[c])] = True
        self._mask_table = table

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    def column_index(self, column: str) -> int:
        try:
            return self.schema.names.index(column)
        except ValueError:
            raise SchemaError(f"no column {column!r} in the schema; columns: {self.schema.names}") from None

    # -- masks ------------------------------------------------------------------------------------------

    def mask_table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[1 + 2d, V] bool: row 0 allows everything, row 1+c the values of column c, row 1+d+c its end."""
        return self._mask_table.to(device) if device is not None else self._mask_table.clone()

    def allowed_mask(self, column: str) -> torch.Tensor:
        """[V] bool: the value tokens of `column`, the only tokens that may follow its prompt."""
        return self._mask_table[1 + self.column_index(column)].clone()

    def value_mask_id(self, column_index: torch.Tensor | int) -> torch.Tensor | int:
        """Row of `mask_table()` constraining the value of column(s) `column_index` (schema order)."""
        return 1 + column_index

    # -- encoding ---------------------------------------------------------------------------------------

    def orders(
        self,
        n: int,
        order: str | Sequence[str] | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Column orders [n, d]: schema order (None / "schema"), a fixed list of names, or "random"."""
        d = self.n_columns
        if order is None or (isinstance(order, str) and order == "schema"):
            return np.broadcast_to(np.arange(d), (n, d)).copy()
        if isinstance(order, str):
            if order != "random":
                raise SchemaError(
                    f"order must be None, 'schema', 'random' or a list of column names, got {order!r}"
                )
            rng = rng if rng is not None else np.random.default_rng()
            return np.argsort(rng.random((n, d)), axis=1)
        idx = [self.column_index(c) for c in order]
        if sorted(idx) != list(range(d)):
            raise SchemaError(f"an explicit order must list every column exactly once: {self.schema.names}")
        return np.broadcast_to(np.asarray(idx), (n, d)).copy()

    def encode(
        self,
        df: pd.DataFrame,
        order: str | Sequence[str] | None = None,
        augmentations: int = 1,
        rng: np.random.Generator | None = None,
    ) -> EncodedRows:
        """Token sequences of every row; `augmentations` = K sequences per row (consecutive, one example id).

        `order="random"` draws an independent column order for every sequence from `rng`; the frame must fit
        the schema (`schema.validate`; `schema.conform` makes it fit).
        """
        if not isinstance(augmentations, int) or augmentations < 1:
            raise SchemaError(f"augmentations must be a positive integer, got {augmentations!r}")
        vids = self.schema.value_ids(df)  # N d, validates
        return self.encode_value_ids(vids, order, augmentations, rng)

    def encode_value_ids(
        self,
        vids: np.ndarray,
        order: str | Sequence[str] | None = None,
        augmentations: int = 1,
        rng: np.random.Generator | None = None,
    ) -> EncodedRows:
        """`encode` from value ids [N, d] (see `Schema.value_ids`)."""
        n, d = vids.shape
        example_ids = np.repeat(np.arange(n), augmentations)
        m = len(example_ids)
        orders = self.orders(m, order, rng)  # M d
        slot_values = np.take_along_axis(vids[example_ids], orders, axis=1)  # M d
        triples = np.stack([self.prompt_ids[orders], self.value_offsets[orders] + slot_values,
                            self.end_ids[orders]], axis=2)  # M d 3
        masks = np.stack([np.zeros_like(orders), 1 + orders, 1 + d + orders], axis=2)
        tokens = triples.reshape(m, 3 * d)
        mask_ids = masks.reshape(m, 3 * d)
        labels = tokens.copy()
        labels[:, 0::3] = IGNORE_INDEX
        if self.bos:
            tokens = np.concatenate([np.full((m, 1), BOS_ID), tokens], axis=1)
            labels = np.concatenate([np.full((m, 1), IGNORE_INDEX), labels], axis=1)
            mask_ids = np.concatenate([np.zeros((m, 1), dtype=np.int64), mask_ids], axis=1)
        as_long = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long)  # noqa: E731
        return EncodedRows(as_long(tokens), as_long(labels), as_long(mask_ids), as_long(example_ids),
                           as_long(orders))

    # -- decoding ---------------------------------------------------------------------------------------

    def _parse(self, tokens: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(value ids [M, d], valid [M]) of token sequences [M, T]."""
        t = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        d = self.n_columns
        if t.ndim != 2 or t.shape[1] != self.seq_len:
            raise DataError(
                f"token sequences must have shape [M, {self.seq_len}] for this codec, got {list(t.shape)}"
            )
        t = t.astype(np.int64)
        m = t.shape[0]
        valid = ((t >= 0) & (t < self.vocab_size)).all(axis=1)
        t = np.where((t >= 0) & (t < self.vocab_size), t, BOS_ID)
        if self.bos:
            valid &= t[:, 0] == BOS_ID
            t = t[:, 1:]
        triples = t.reshape(m, d, 3)
        cols = self._prompt_col[triples[:, :, 0]]  # M d
        valid &= (cols >= 0).all(axis=1)
        valid &= (np.sort(cols, axis=1) == np.arange(d)).all(axis=1)  # each column exactly once
        safe_cols = np.where(cols >= 0, cols, 0)
        valid &= (self._value_col[triples[:, :, 1]] == cols).all(axis=1)
        valid &= (triples[:, :, 2] == self.end_ids[safe_cols]).all(axis=1)
        vids = np.zeros((m, d), dtype=np.int64)
        slot_values = triples[:, :, 1] - self.value_offsets[safe_cols]
        rows = np.flatnonzero(valid)
        vids[rows[:, None], cols[rows]] = slot_values[rows]
        return vids, valid

    def is_valid(self, tokens: torch.Tensor | np.ndarray) -> np.ndarray:
        """[M] bool: whether each sequence is a well-formed row (every column once, its own value and end)."""
        return self._parse(tokens)[1]

    def decode_value_ids(self, tokens: torch.Tensor | np.ndarray) -> np.ndarray:
        """Value ids [M, d] (schema order) of well-formed sequences; raises `DataError` otherwise."""
        vids, valid = self._parse(tokens)
        if not valid.all():
            bad = np.flatnonzero(~valid)
            raise DataError(f"{len(bad)} token sequence(s) are not well-formed rows (first at index(es) "
                            f"{bad[:5].tolist()}); check them with codec.is_valid(tokens)")
        return vids

    def decode(self, tokens: torch.Tensor | np.ndarray) -> pd.DataFrame:
        """Frame [M rows] of token sequences [M, T], in schema column order (numbers as their bin value)."""
        return self.schema.frame_from_value_ids(self.decode_value_ids(tokens))

    # -- likelihood -------------------------------------------------------------------------------------

    def token_log_probs(
        self, logits: torch.Tensor, batch: EncodedRows, constrained: bool = True
    ) -> torch.Tensor:
        """log p(token t | tokens < t) [M, T] for predicted tokens, 0 elsewhere (and at t = 0).

        `logits` [M, T, V] are the model outputs at every position (those at t predict token t+1). With
        `constrained`, the softmax is restricted to the tokens allowed at each position, so end tokens cost 0
        and a row's total is the log-likelihood of its values.
        """
        tokens, labels = batch.tokens.to(logits.device), batch.labels.to(logits.device)
        x = logits[:, :-1].float()
        if constrained:
            allowed = self._mask_table.to(logits.device)[batch.mask_ids[:, 1:].to(logits.device)]  # M T-1 V
            x = x.masked_fill(~allowed, float("-inf"))
        logp = torch.log_softmax(x, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        logp = torch.where(labels[:, 1:] != IGNORE_INDEX, logp, torch.zeros_like(logp))
        return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)

    def sequence_log_likelihood(
        self, logits: torch.Tensor, batch: EncodedRows, constrained: bool = True
    ) -> torch.Tensor:
        """Sum of `token_log_probs` per sequence [M] (with K augmentations, average per example id)."""
        return self.token_log_probs(logits, batch, constrained).sum(dim=1)

    def token_name(self, token: int) -> str:
        """Readable name of a token id, for debugging."""
        if token == BOS_ID:
            return "<bos>"
        if not 0 <= token < self.vocab_size:
            return f"<out of vocabulary {token}>"
        names = self.schema.names
        if self._prompt_col[token] >= 0:
            return f"<{names[self._prompt_col[token]]}>"
        if self._end_col[token] >= 0:
            return f"</{names[self._end_col[token]]}>"
        c = int(self._value_col[token])
        value = self.schema.columns[c].values()[token - self.value_offsets[c]]
        return f"{names[c]}={value!r}"
