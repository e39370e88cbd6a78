"""Generation: batching, stopping, sampling statistics and seeds (the model itself is tested elsewhere)."""

from __future__ import annotations

import pytest
import torch

from tramontane.errors import GenerationError
from tramontane.generation import SamplingParams, generate, sample_next

from tests.conftest import random_model, tiny_args


def _greedy_by_recompute(model, prompt: list[int], steps: int) -> list[int]:
    """Oracle: re-run the whole sequence without a cache for every new token."""
    seq = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_batched_greedy_equals_recompute_for_each_prompt(moe: bool) -> None:
    model = random_model(tiny_args(moe=moe, sliding_window=5), seed=11)
    gen = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (2, 9, 6)]
    for chunk in (None, 3):
        outs = generate(model, prompts, SamplingParams(max_tokens=10), chunk_size=chunk)
        for prompt, out in zip(prompts, outs):
            assert out.tokens == _greedy_by_recompute(model, prompt, 10)
            assert out.finish_reason == "length"


def test_stops_on_eos_and_reports_logprobs() -> None:
    model = random_model(tiny_args(), seed=13)
    prompt = [5, 6, 7]
    free = _greedy_by_recompute(model, prompt, 8)
    eos = free[3]
    out = generate(model, [prompt], SamplingParams(max_tokens=8, logprobs=True), eos_id=eos)[0]
    assert out.tokens == free[: free.index(eos)]
    assert out.finish_reason == "stop"
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.tokens]))[0].float().log_softmax(-1)
    expected = [float(logits[len(prompt) - 1 + i, t]) for i, t in enumerate(out.tokens)]
    assert out.logprobs == pytest.approx(expected, abs=1e-5)


def test_seeded_sampling_is_reproducible_and_unseeded_varies() -> None:
    model = random_model(tiny_args(), seed=14)
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=3)
    a = generate(model, [[1, 2, 3]], params)[0].tokens
    b = generate(model, [[1, 2, 3]], params)[0].tokens
    assert a == b
    unseeded = {tuple(generate(model, [[1, 2, 3]], SamplingParams(max_tokens=12, temperature=1.5))[0].tokens)
                for _ in range(4)}
    assert len(unseeded) > 1


def test_sampling_frequencies_follow_temperature_and_top_p() -> None:
    """Chi-square style check on a known distribution: p = softmax(log [0.5, 0.3, 0.15, 0.05])."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20_000, 4)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, 1.0, gen), minlength=4).float() / 20_000
    assert torch.allclose(counts, probs, atol=0.015)
    # top_p = 0.7: {0.5, 0.3} reach 0.7, so only tokens 0 and 1 remain, renormalised to 5/8, 3/8.
    counts = torch.bincount(sample_next(logits, 1.0, 0.7, gen), minlength=4).float() / 20_000
    assert torch.allclose(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015)
    # temperature 0.5 squares and renormalises the probabilities.
    sharpened = probs**2 / (probs**2).sum()
    counts = torch.bincount(sample_next(logits, 0.5, 1.0, gen), minlength=4).float() / 20_000
    assert torch.allclose(counts, sharpened, atol=0.015)


@pytest.mark.parametrize(
    "kwargs", [dict(max_tokens=-1), dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_bad_sampling_parameters(kwargs: dict) -> None:
    with pytest.raises(GenerationError):
        SamplingParams(**kwargs)


def test_bad_prompts() -> None:
    model = random_model(tiny_args(), seed=15)
    with pytest.raises(GenerationError, match="empty"):
        generate(model, [[]])
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(model, [[1, 500]])
    with pytest.raises(GenerationError, match="no prompts"):
        generate(model, [])
