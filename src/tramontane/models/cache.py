"""Rolling-buffer key/value cache (mistral-inference's design, with explicit positions).

Each layer keeps `size` slots per sequence, `size = sliding_window` when the model has one (else the longest
sequence the cache must hold). The token at absolute position p lives in slot `p mod size`; keys are stored
after the rotary embedding, so a slot never needs re-rotating. One position table shared by all layers
records which position each slot holds (-1: empty), which is all that masking needs.

Worked example, window 4, prompt of 6 tokens then one decoded token:
  prefill writes positions 2..5 (only the last 4 can ever be seen again): slots [4, 5, 2, 3]
  decode at position 6 overwrites slot 2 (position 2 has left the window): slots [4, 5, 6, 3]

A prefill chunk attends to [cached keys] + [its own keys] before being written (a chunk longer than the
window would otherwise overwrite keys its own earlier queries still need). A single decoded token is written
first and then attends to the cache alone, which avoids copying the cache at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tramontane.models.args import ModelArgs


@dataclass
class CacheStep:
    """How one forward call reads and writes the cache; computed once, shared by all layers."""

    slots: torch.Tensor  # B Tw: slot of each written token (the chunk's last Tw tokens)
    written_from: int  # index in the chunk of the first written token
    read_len: int  # cache slots [0, read_len) are read
    write_first: bool  # decode: write, then attend to the cache; prefill: attend to cache + chunk
    key_positions: torch.Tensor  # B S: position of every key the layer attends to (-1: none)
    next_positions: torch.Tensor  # B size: the position table after this call


class KVCache:
    """Pre-allocated keys and values [B, K, size, D] for every layer of one model."""

    def __init__(
        self,
        args: ModelArgs,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        size = self.size_for(args, max_seq_len)
        shape = (batch_size, args.n_kv_heads, size, args.head_dim)
        self._adopt([torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)],
                    [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)])

    @staticmethod
    def size_for(args: ModelArgs, max_seq_len: int) -> int:
        """Slots per sequence: the sliding window, or `max_seq_len` when it is shorter or there is none."""
        window = args.sliding_window
        return min(window, max_seq_len) if window is not None else max_seq_len

    @classmethod
    def over(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> KVCache:
        """An empty cache over given buffers [B, K, size, D] per layer (the serving engine passes views of
        its pool); their contents are never read before this cache writes them."""
        cache = cls.__new__(cls)
        cache._adopt(keys, values)
        return cache

    def _adopt(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values
        self.batch_size, _, self.size, _ = keys[0].shape
        self.positions = torch.full((self.batch_size, self.size), -1, dtype=torch.long, device=keys[0].device)
        self.filled = 0  # slots [filled, size) have never been written

    def plan(self, positions: torch.Tensor) -> CacheStep:
        """Plan a forward call over tokens at `positions` [B, T] (negative: left padding)."""
        if positions.shape[0] != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} sequences, got a batch of {positions.shape[0]}")
        t = positions.shape[1]
        written = min(t, self.size)
        new_positions = positions[:, t - written:]
        slots = torch.remainder(new_positions, self.size)
        next_positions = self.positions.scatter(1, slots, new_positions)
        highest = int(new_positions.max())
        filled = min(self.size, max(self.filled, highest + 1)) if highest >= 0 else self.filled
        write_first = t == 1 and bool((positions >= 0).all())
        if write_first:
            key_positions = next_positions[:, :filled]
            read_len = filled
        else:
            read_len = self.filled
            key_positions = torch.cat([self.positions[:, :read_len], positions], dim=1)
        step = CacheStep(slots, t - written, read_len, write_first, key_positions, next_positions)
        self._pending_filled = filled
        return step

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, step: CacheStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this chunk's k, v [B, K, T, D] for `layer`; return the keys and values to attend to."""
        cache_k, cache_v = self.keys[layer], self.values[layer]
        if step.write_first:
            self._write(cache_k, cache_v, k, v, step)
            return cache_k[:, :, : step.read_len], cache_v[:, :, : step.read_len]
        keys = torch.cat([cache_k[:, :, : step.read_len], k], dim=2)
        values = torch.cat([cache_v[:, :, : step.read_len], v], dim=2)
        self._write(cache_k, cache_v, k, v, step)
        return keys, values

    @staticmethod
    def _write(
        cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: CacheStep
    ) -> None:
        index = step.slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        cache_k.scatter_(2, index, k[:, :, step.written_from:].to(cache_k.dtype))
        cache_v.scatter_(2, index, v[:, :, step.written_from:].to(cache_v.dtype))

    def commit(self, step: CacheStep) -> None:
        """Record the positions written by a finished forward call."""
        self.positions = step.next_positions
        self.filled = self._pending_filled
