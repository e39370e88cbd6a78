"""Greedy generation equals transformers' `generate` on tiny Mistral (prompt + output longer than the sliding
window) and Mixtral models, for single prompts, batches of different lengths and chunked prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

from tramontane.generation import SamplingParams, generate
from tramontane.models.checkpoint import load_model

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=128, vocab_size=128, initializer_range=0.2, rms_norm_eps=1e-5)
NEW_TOKENS = 16


def _save_hf(kind: str, path: Path) -> MistralForCausalLM | MixtralForCausalLM:
    torch.manual_seed(3)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2))
    else:
        model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=6, rope_theta=1e4))
    model.save_pretrained(path)
    return model.eval()


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_greedy_generation_matches_transformers(kind: str, tmp_path: Path) -> None:
    hf = _save_hf(kind, tmp_path)
    ours, _ = load_model(tmp_path)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (9, 3, 14)]
    expected = [_hf_greedy(hf, p) for p in prompts]
    # A continuation that never repeats the prompt's last token would not exercise much: make sure the
    # sequences really run past the window.
    assert all(len(p) + NEW_TOKENS > 6 for p in prompts)
    for chunk in (None, 4):
        batched = generate(ours, prompts, SamplingParams(max_tokens=NEW_TOKENS), chunk_size=chunk)
        assert [c.tokens for c in batched] == expected
    alone = [generate(ours, [p], SamplingParams(max_tokens=NEW_TOKENS))[0].tokens for p in prompts]
    assert alone == expected
