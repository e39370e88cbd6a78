"""A plain, slow, obviously-correct Mistral / Mixtral forward pass that every fast path is tested against.

It shares no code with the fast modules: it reads the weights from a state dict, rotates with complex
numbers, builds attention one query at a time over an explicit list of visible keys, repeats key/value heads
by hand, and routes every token through its experts one by one.
"""

from __future__ import annotations

import math

import torch

from tramontane.models.args import ModelArgs


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _rotate(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """Rotate one head vector x [D] (adjacent pairs as complex numbers) to `position`."""
    d = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    rotation = torch.polar(torch.ones_like(freqs), position * freqs)
    as_complex = torch.view_as_complex(x.float().reshape(d // 2, 2).contiguous())
    return torch.view_as_real(as_complex * rotation).reshape(d).type_as(x)


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    gate = x @ w1.T
    return (gate * torch.sigmoid(gate) * (x @ w3.T)) @ w2.T


def _attention(x: torch.Tensor, weights: dict[str, torch.Tensor], args: ModelArgs, prefix: str) -> torch.Tensor:
    """x [T, dim] for one sequence starting at position 0."""
    t = x.shape[0]
    hd = args.head_dim
    q = (x @ weights[prefix + "wq.weight"].T).reshape(t, args.n_heads, hd)
    k = (x @ weights[prefix + "wk.weight"].T).reshape(t, args.n_kv_heads, hd)
    v = (x @ weights[prefix + "wv.weight"].T).reshape(t, args.n_kv_heads, hd)
    out = torch.zeros(t, args.n_heads, hd, dtype=x.dtype)
    for h in range(args.n_heads):
        kv = h // args.n_rep  # query head h reads key/value head h // n_rep
        for i in range(t):
            first = 0 if args.sliding_window is None else max(0, i - args.sliding_window + 1)
            visible = range(first, i + 1)
            qi = _rotate(q[i, h], i, args.rope_theta)
            scores = torch.stack([qi @ _rotate(k[j, kv], j, args.rope_theta) for j in visible]) / math.sqrt(hd)
            probs = torch.softmax(scores.float(), dim=0).type_as(x)
            out[i, h] = sum(p * v[j, kv] for p, j in zip(probs, visible))
    return out.reshape(t, args.n_heads * hd) @ weights[prefix + "wo.weight"].T


def _feed_forward(x: torch.Tensor, weights: dict[str, torch.Tensor], args: ModelArgs, prefix: str) -> torch.Tensor:
    if args.moe is None:
        return _swiglu(x, *(weights[f"{prefix}w{n}.weight"] for n in (1, 2, 3)))
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        logits = x[i] @ weights[prefix + "gate.weight"].T
        top_logits, top = torch.topk(logits, args.moe.num_experts_per_tok)
        mix = torch.softmax(top_logits.float(), dim=0).type_as(x)
        for w, e in zip(mix, top.tolist()):
            expert = f"{prefix}experts.{e}."
            out[i] += w * _swiglu(x[i], *(weights[f"{expert}w{n}.weight"] for n in (1, 2, 3)))
    return out


def reference_forward(weights: dict[str, torch.Tensor], args: ModelArgs, tokens: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of one sequence `tokens` (positions 0..T-1) under `weights` (consolidated names)."""
    with torch.no_grad():
        x = weights["tok_embeddings.weight"][torch.tensor(tokens)]
        for layer in range(args.n_layers):
            p = f"layers.{layer}."
            x = x + _attention(_rms_norm(x, weights[p + "attention_norm.weight"], args.norm_eps), weights, args,
                               p + "attention.")
            x = x + _feed_forward(_rms_norm(x, weights[p + "ffn_norm.weight"], args.norm_eps), weights, args,
                                  p + "feed_forward.")
        x = _rms_norm(x, weights["norm.weight"], args.norm_eps)
        head = weights.get("output.weight", weights["tok_embeddings.weight"])
        return x @ head.T
