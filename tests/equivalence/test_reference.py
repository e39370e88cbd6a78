"""The fast model, its cache and its batching against `reference.py` (one sequence, one query at a time)."""

from __future__ import annotations

import pytest
import torch

from tramontane.models import KVCache
from tramontane.models.reference import reference_forward

from tests.conftest import random_model, tiny_args


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("window", [None, 5])
def test_fast_model_matches_reference(moe: bool, window: int | None) -> None:
    args = tiny_args(moe=moe, sliding_window=window)
    model = random_model(args, seed=1)
    tokens = torch.randint(0, args.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = model(tokens)
    weights = model.state_dict()
    for row in range(tokens.shape[0]):
        slow = reference_forward(weights, args, tokens[row].tolist())
        torch.testing.assert_close(fast[row], slow, atol=1e-5, rtol=0)


def test_sliding_window_changes_only_late_positions() -> None:
    """The window must bite: logits before position W equal full attention's, later ones differ."""
    windowed = random_model(tiny_args(sliding_window=4), seed=3)
    full = random_model(tiny_args(sliding_window=None), seed=3)
    tokens = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = windowed(tokens), full(tokens)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=1e-6, rtol=0)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3


def _incremental_logits(model, tokens: torch.Tensor, chunk: int, cache_len: int) -> torch.Tensor:
    cache = KVCache(model.args, tokens.shape[0], cache_len)
    outs = []
    for start in range(0, tokens.shape[1], chunk):
        piece = tokens[:, start:start + chunk]
        positions = torch.arange(start, start + piece.shape[1]).expand_as(piece)
        outs.append(model(piece, positions, cache))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("window", [None, 6])
def test_cached_decode_equals_full_recompute(moe: bool, window: int | None) -> None:
    args = tiny_args(moe=moe, sliding_window=window)
    model = random_model(args, seed=5)
    tokens = torch.randint(0, args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(tokens)
        one_by_one = _incremental_logits(model, tokens, chunk=1, cache_len=20)
    torch.testing.assert_close(one_by_one, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 6])
def test_chunked_prefill_equals_one_shot(window: int | None) -> None:
    """chunk < W < prompt, then single-token decode steps."""
    args = tiny_args(sliding_window=window)
    model = random_model(args, seed=7)
    tokens = torch.randint(0, args.vocab_size, (3, 23), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(tokens)
        for chunk in (4, 6, 9):
            chunked = _incremental_logits(model, tokens, chunk=chunk, cache_len=23)
            torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 5])
def test_left_padded_batch_equals_each_prompt_alone(window: int | None) -> None:
    args = tiny_args(moe=True, sliding_window=window)
    model = random_model(args, seed=9)
    gen = torch.Generator().manual_seed(10)
    prompts = [torch.randint(0, args.vocab_size, (n,), generator=gen) for n in (3, 11, 7)]
    longest = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), longest, dtype=torch.long)
    positions = torch.empty(len(prompts), longest, dtype=torch.long)
    for row, p in enumerate(prompts):
        pad = longest - len(p)
        batch[row, pad:] = p
        positions[row] = torch.arange(longest) - pad
    with torch.no_grad():
        batched = model(batch, positions)
        cache = KVCache(args, len(prompts), longest + 4)
        cached = torch.cat([model(batch[:, :4], positions[:, :4], cache),
                            model(batch[:, 4:], positions[:, 4:], cache)], dim=1)
        for row, p in enumerate(prompts):
            alone = model(p[None])[0]
            torch.testing.assert_close(batched[row, -len(p):], alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(cached[row, -len(p):], alone, atol=1e-5, rtol=0)
        assert torch.isfinite(batched).all() and torch.isfinite(cached).all()
