"""Constrained sampling of table rows from a `tramontane.models.Transformer` trained on codec sequences.

Column by column, batched, with the rolling KV cache: feed the next column's prompt token, sample its value
from the softmax restricted to that column's value tokens (`TabularCodec.mask_table`), then feed that
value, the column's end token (deterministic, so never sampled) and the next prompt as one 3-token chunk.
Every sampled row is therefore valid for the schema. This is synlm's trie-guided sampling for the "level"
tokenizer, where the trie of a column is just its set of value tokens.

Reproducibility: with a seed (or a seeded `torch.Generator`) the rows depend only on the model, the
arguments and `batch_size` (which decides how the random stream is consumed).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from tramontane.errors import GenerationError
from tramontane.generation import sample_next
from tramontane.models.cache import KVCache
from tramontane.models.transformer import Transformer
from tramontane.synth.codec import BOS_ID, TabularCodec


def _orders(codec: TabularCodec, n: int, order: str | Sequence[str] | None, generator: torch.Generator,
            device: torch.device) -> torch.Tensor:
    if isinstance(order, str) and order == "random":
        return torch.rand(n, codec.n_columns, generator=generator, device=device).argsort(dim=1)
    return torch.as_tensor(codec.orders(n, order), dtype=torch.long, device=device)


@torch.no_grad()
def sample_tokens(
    model: Transformer,
    codec: TabularCodec,
    n: int,
    *,
    order: str | Sequence[str] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Token sequences [n, T] of n sampled rows (see `sample_rows`)."""
    if model.args.vocab_size < codec.vocab_size:
        raise GenerationError(f"the model's vocabulary ({model.args.vocab_size}) is smaller than the codec's "
                              f"({codec.vocab_size}): build the model with vocab_size >= codec.vocab_size")
    if n < 0 or batch_size < 1:
        raise GenerationError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise GenerationError(f"need temperature >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    device = model.device
    if generator is None:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    elif seed is not None:
        raise GenerationError("pass either seed or generator, not both")
    d = codec.n_columns
    table = codec.mask_table(device)
    # A model vocabulary larger than the codec's (padding) never gets sampled: those columns stay masked.
    if model.args.vocab_size > codec.vocab_size:
        table = torch.nn.functional.pad(table, (0, model.args.vocab_size - codec.vocab_size), value=False)
    prompt_ids = torch.as_tensor(codec.prompt_ids, device=device)
    end_ids = torch.as_tensor(codec.end_ids, device=device)
    out = torch.empty(n, codec.seq_len, dtype=torch.long)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        orders = _orders(codec, b, order, generator, device)  # B d
        seq = torch.empty(b, codec.seq_len, dtype=torch.long, device=device)
        cache = KVCache(model.args, b, codec.seq_len, dtype=model.dtype, device=device)
        first = prompt_ids[orders[:, 0]][:, None]
        chunk = torch.cat([torch.full_like(first, BOS_ID), first], dim=1) if codec.bos else first
        pos = 0
        for step in range(d):
            col = orders[:, step]
            width = chunk.shape[1]
            positions = torch.arange(pos, pos + width, device=device).expand(b, width)
            seq[:, pos:pos + width] = chunk
            hidden = model.hidden_states(chunk, positions, cache)
            pos += width
            logits = model.output(hidden[:, -1]).float()  # B V
            logits = logits.masked_fill(~table[codec.value_mask_id(col)], float("-inf"))
            value = sample_next(logits, temperature, top_p, generator)
            end = end_ids[col]
            if step + 1 < d:
                chunk = torch.stack([value, end, prompt_ids[orders[:, step + 1]]], dim=1)
            else:
                seq[:, pos:pos + 2] = torch.stack([value, end], dim=1)
        out[start:start + b] = seq.cpu()
    return out


def sample_rows(
    model: Transformer,
    codec: TabularCodec,
    n: int,
    *,
    order: str | Sequence[str] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
) -> pd.DataFrame:
    """n rows sampled from `model`, valid for `codec.schema` by construction, in schema column order.

    order: the column order to generate in: None (schema order), a list of names, or "random" (an
        independent order per row, matching training with permuted columns).
    temperature, top_p: as `tramontane.generation.sample_next` (1.0, 1.0: the model's distribution).
    seed / generator: reproducible sampling (default: a fresh random seed).
    """
    tokens = sample_tokens(model, codec, n, order=order, temperature=temperature, top_p=top_p, seed=seed,
                           generator=generator, batch_size=batch_size)
    return codec.decode(tokens)
