"""Batched generation: chunked prefill into the rolling KV cache, then one token per step.

Prompts of different lengths are left-padded into one batch; padding gets negative positions, which the model
never attends to, so every prompt is generated exactly as if it were alone. Sampling is greedy
(temperature 0), or temperature + nucleus (top-p), drawn from a seedable generator.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tramontane.errors import GenerationError
from tramontane.models.cache import KVCache
from tramontane.models.transformer import Transformer


def sampling_problems(max_tokens: Any, temperature: Any, top_p: Any) -> dict[str, str]:
    """What is wrong with these `SamplingParams` values: field -> the rule it breaks, worded without the
    field's name so that a caller can name it its own way (the CLI says `--top-p`). Empty when all fit."""

    def real(x: Any) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

    out = {}
    if not (isinstance(max_tokens, numbers.Integral) and not isinstance(max_tokens, bool)
            and int(max_tokens) >= 0):
        out["max_tokens"] = f"must be an integer >= 0, got {max_tokens!r}"
    if not (real(temperature) and temperature >= 0):
        out["temperature"] = f"must be a finite number >= 0 (0 is greedy), got {temperature!r}"
    if not (real(top_p) and 0.0 < top_p <= 1.0):
        out["top_p"] = f"must be a number in (0, 1], got {top_p!r}"
    return out


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    seed: int | None = None
    logprobs: bool = False  # return log p(token) under the model (before temperature and top-p)

    def __post_init__(self) -> None:
        problems = sampling_problems(self.max_tokens, self.temperature, self.top_p)
        if problems:
            raise GenerationError("; ".join(f"{name} {rule}" for name, rule in problems.items()))


@dataclass
class Completion:
    """The generated continuation of one prompt (prompt tokens not included)."""

    tokens: list[int]
    finish_reason: str  # "stop": the end-of-sequence token was generated (and is not in `tokens`); "length"
    logprobs: list[float] | None = None


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row of logits [B, V] (float32)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # Inverse-CDF draw: one uniform per row (several times faster than torch.multinomial on CPU).
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1).squeeze(-1)


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    positions = torch.empty(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        pad = longest - len(prompt)
        tokens[row, pad:] = torch.as_tensor(list(prompt), dtype=torch.long)
        positions[row] = torch.arange(longest) - pad
    return tokens.to(device), positions.to(device)


def _check_prompts(model: Transformer, prompts: Sequence[Sequence[int]]) -> None:
    if not prompts:
        raise GenerationError("no prompts given")
    vocab = model.args.vocab_size
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty: start it with at least the BOS token")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")


def _left_pad_embeddings(model: Transformer, prompts: Sequence[Sequence[int]],
                         embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(embeddings) != len(prompts):
        raise GenerationError(f"got {len(prompts)} prompt(s) but {len(embeddings)} embedding tensor(s)")
    longest = max(len(p) for p in prompts)
    padded = torch.zeros(len(prompts), longest, model.args.dim, dtype=model.dtype, device=model.device)
    for row, (prompt, emb) in enumerate(zip(prompts, embeddings)):
        if tuple(emb.shape) != (len(prompt), model.args.dim):
            raise GenerationError(f"embeddings of prompt {row} have shape {list(emb.shape)}, expected "
                                  f"[{len(prompt)}, {model.args.dim}]")
        padded[row, longest - len(prompt):] = emb
    return padded


@torch.no_grad()
def decode_steps(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    eos_id: int | None = None,
    chunk_size: int | None = None,
    prompt_embeddings: Sequence[torch.Tensor] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (tokens [B], logprobs [B] or empty, finished [B]) after every generated position.

    `prompt_embeddings[i]` [T_i, dim], when given, are the input embeddings of `prompts[i]` (multimodal
    prompts whose image or audio placeholders were replaced by encoder features); the ids then only matter
    for their count. A row that has finished keeps being fed its last token (its outputs are ignored), so the
    batch shape never changes. Stops after `max_tokens` steps or when every row has produced `eos_id`.
    """
    _check_prompts(model, prompts)
    embeddings = None if prompt_embeddings is None else _left_pad_embeddings(model, prompts, prompt_embeddings)
    if chunk_size is not None and chunk_size < 1:
        raise GenerationError(f"chunk_size must be >= 1, got {chunk_size}")
    if params.max_tokens == 0:
        return
    device = model.device
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    tokens, positions = _left_pad(prompts, device)
    batch, prompt_len = tokens.shape
    cache = KVCache(model.args, batch, prompt_len + params.max_tokens, dtype=model.dtype, device=device)

    chunk = chunk_size or prompt_len
    for start in range(0, prompt_len, chunk):
        piece = slice(start, start + chunk)
        hidden = model.hidden_states(tokens[:, piece], positions[:, piece], cache,
                                     embeddings=None if embeddings is None else embeddings[:, piece])
    next_positions = positions[:, -1] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(params.max_tokens):
        logits = model.output(hidden[:, -1]).float()  # B V
        new = sample_next(logits, params.temperature, params.top_p, generator)
        logprobs = (torch.log_softmax(logits, dim=-1).gather(-1, new[:, None]).squeeze(-1) if params.logprobs
                    else torch.empty(0))
        if eos_id is not None:
            finished = finished | (new == eos_id)
        yield new, logprobs, finished
        if bool(finished.all()):
            return
        hidden = model.hidden_states(new[:, None], next_positions[:, None], cache)
        next_positions = next_positions + 1


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    eos_id: int | None = None,
    chunk_size: int | None = None,
    prompt_embeddings: Sequence[torch.Tensor] | None = None,
) -> list[Completion]:
    """Generate a continuation for each prompt (lists of token ids) in one batch (see `decode_steps`)."""
    params = params or SamplingParams()
    outs: list[list[int]] = [[] for _ in prompts]
    logps: list[list[float]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    reasons = ["length"] * len(prompts)
    for new, logprobs, _ in decode_steps(model, prompts, params, eos_id, chunk_size, prompt_embeddings):
        for row, token in enumerate(new.tolist()):
            if done[row]:
                continue
            if eos_id is not None and token == eos_id:
                done[row], reasons[row] = True, "stop"
                continue
            outs[row].append(token)
            if params.logprobs:
                logps[row].append(float(logprobs[row]))
    return [Completion(o, r, lp if params.logprobs else None) for o, r, lp in zip(outs, reasons, logps)]
