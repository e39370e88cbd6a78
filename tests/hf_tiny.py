"""Tiny random transformers Mistral / Mixtral models: the oracle of the checkpoint equivalence tests.

Weights are drawn wider than transformers' default init and norm weights away from 1, so that a swapped
tensor, a wrong q/k permutation, window or RoPE theta moves the logits by O(1). Each kind has its own seed.
"""

from __future__ import annotations

import torch
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=128, vocab_size=128, initializer_range=0.1, rms_norm_eps=1e-5)
KINDS = ("mistral", "mixtral", "mistral_tied")


def tiny_causal_lm(kind: str, *, sliding_window: int | None = None,
                   **config: object) -> MistralForCausalLM | MixtralForCausalLM:
    """A random "mistral", "mixtral" (4 experts, top 2; no window) or "mistral_tied" (tied head) model in
    eval mode with eager attention; `config` adds or overrides config fields."""
    torch.manual_seed({"mistral": 0, "mixtral": 1, "mistral_tied": 2}[kind])
    model: MistralForCausalLM | MixtralForCausalLM
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**{**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2,
                                                    "sliding_window": None, **config}))
    else:
        model = MistralForCausalLM(MistralConfig(**{**COMMON, "rope_theta": 1e4, "sliding_window": sliding_window,
                                                    "tie_word_embeddings": kind == "mistral_tied", **config}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    model.set_attn_implementation("eager")
    return model.eval()
