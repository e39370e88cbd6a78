"""Does torch.compile give W8A8 decoding the fused step it lacks? Two probes, on `benchmarks/generate.py`'s
~100M random Mistral checkpoint with `--quantize w8a8` (what BENCHMARKS.md's "torch.compile, tried" reports):

1. A static-shape decode step compiled whole (`torch.compile(fullgraph=True, dynamic=False)`): the rolling cache
   is attended in full under a mask, so no shape changes between tokens. Dynamo cannot trace either W8A8 kernel
   (fbgemm's packed weight is a TorchScript object, the native kernel a ctypes call), so each W8A8 linear enters
   the graph as a custom op that runs the layer as eager code would; everything else (norms, RoPE, attention,
   residuals) is compiled.
   Measured against eager `generation.generate` (what `tramontane generate` runs), interleaved rounds, decode
   tokens/s from the time of 64 generated tokens minus that of 1 (the prefill cancels).
2. Inductor's own code for an int8 weight times one float row (`(x * w.float()).sum(-1) * scales`, which it can
   fuse, unlike `F.linear` on a dequantized weight), against float32 `F.linear` and the W8A8 layer (the native
   kernel where it builds, else fbgemm's).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compiled_decode.py [--threads 2] [--rounds 3]

Needs a C++ compiler (inductor's CPU backend). Prints a table and ends with one JSON line of ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import make_checkpoint, the_prompt  # noqa: E402

from tramontane.generation import SamplingParams, generate  # noqa: E402
from tramontane.models.cache import KVCache  # noqa: E402
from tramontane.models.checkpoint import load_model  # noqa: E402
from tramontane.models.cpu_linear import prepack_for_inference  # noqa: E402
from tramontane.models.quant import Int8Linear, QuantConfig  # noqa: E402
from tramontane.models.rope import apply_rotary, rotary_angles  # noqa: E402
from tramontane.models.transformer import Transformer  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 512, 64
_LAYERS: dict[int, Int8Linear] = {}  # custom-op handle -> the W8A8 layer it runs


@torch.library.custom_op("tramontane_bench::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return _LAYERS[handle](x)


@w8a8_linear.register_fake
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if id(module) in _LAYERS:
        return w8a8_linear(x, id(module), module.out_features)
    return module(x)


def static_step(model: Transformer, size: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """One token of one sequence (dense Mistral, no sliding window within `size`): (token [1, 1], position
    [1, 1], keys, values, slot positions [1, size]) -> (logits [1, 1, V], the new slot positions)."""
    args = model.args
    heads, kv_heads, head_dim = args.n_heads, args.n_kv_heads, args.head_dim
    inv_freq = model.inverse_frequencies(torch.device("cpu"))
    # registered before tracing: dynamo replays a traced function's side effects only after its graph runs
    _LAYERS.update({id(m): m for m in model.modules() if isinstance(m, Int8Linear) and m.w8a8_kernel is not None})

    def step(token: torch.Tensor, position: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
             slot_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary_angles(position, inv_freq)
        h = model.tok_embeddings(token)
        slot = position % size
        slot_positions = slot_positions.scatter(1, slot, position)
        visible = ((slot_positions >= 0) & (slot_positions <= position))[:, None, None, :]
        index = slot[:, None, :, None].expand(1, kv_heads, 1, head_dim)
        for i, layer in enumerate(model.layers):
            attention, ffn = layer.attention, layer.feed_forward
            x = layer.attention_norm(h)
            q = apply_rotary(linear(attention.wq, x).view(1, 1, heads, head_dim), cos, sin)
            k = apply_rotary(linear(attention.wk, x).view(1, 1, kv_heads, head_dim), cos, sin)
            v = linear(attention.wv, x).view(1, 1, kv_heads, head_dim)
            keys[i].scatter_(2, index, k.transpose(1, 2))
            values[i].scatter_(2, index, v.transpose(1, 2))
            grouped = q.reshape(1, kv_heads, heads // kv_heads, head_dim)
            scores = torch.matmul(grouped, keys[i].transpose(-1, -2)) * head_dim**-0.5
            probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
            h = h + linear(attention.wo, torch.matmul(probs, values[i]).reshape(1, 1, heads * head_dim))
            x = layer.ffn_norm(h)
            h = h + linear(ffn.w2, F.silu(linear(ffn.w1, x)) * linear(ffn.w3, x))
        return linear(model.output, model.norm(h)).float(), slot_positions

    return step


def static_decode(model: Transformer, step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
                  prompt: list[int], size: int) -> tuple[list[int], float]:
    """Greedy tokens and decode tokens/s (the prefill runs eagerly, untimed)."""
    cache = KVCache(model.args, 1, size)
    hidden = model.hidden_states(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
    token = model.output(hidden[:, -1]).float().argmax(-1)[:, None]
    tokens, position, slots = [int(token)], torch.tensor([[len(prompt)]]), cache.positions.clone()
    start = time.perf_counter()
    for _ in range(NEW_TOKENS - 1):
        logits, slots = step(token, position, cache.keys, cache.values, slots)
        token = logits[:, -1].argmax(-1)[:, None]
        tokens.append(int(token))
        position = position + 1
    return tokens, (NEW_TOKENS - 1) / (time.perf_counter() - start)


def eager_decode(model: Transformer, prompt: list[int]) -> tuple[list[int], float]:
    start = time.perf_counter()
    tokens = generate(model, [prompt], SamplingParams(max_tokens=NEW_TOKENS))[0].tokens
    full = time.perf_counter() - start
    start = time.perf_counter()
    generate(model, [prompt], SamplingParams(max_tokens=1))
    return tokens, (NEW_TOKENS - 1) / (full - (time.perf_counter() - start))


def per_call_us(fn: Callable[[], object], calls: int = 200, rounds: int = 9) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def gemv_probe(out_features: int = 2560, in_features: int = 768) -> dict[str, float]:
    """One row through one layer, microseconds per call: inductor's int8 code, fp32 F.linear, the W8A8 layer."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(in_features, out_features, bias=False).eval()
    quantized = Int8Linear.from_float(dense, dynamic_activations=True).eval()
    weight, scales = quantized.values(), quantized.scales.float()
    x = torch.randn(1, in_features)

    def int8_rowwise(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return (x[:, None, :] * weight[None].float()).sum(-1) * scales

    compiled = torch.compile(int8_rowwise, dynamic=False)
    compiled(x, weight, scales)
    return {"inductor int8": per_call_us(lambda: compiled(x, weight, scales)),
            "fp32 F.linear": per_call_us(lambda: dense(x)),
            "W8A8 layer": per_call_us(lambda: quantized(x))}


def quantized_kernel() -> str | None:
    """Which kernel the W8A8 layers of this run used (`Int8Linear.w8a8_kernel`)."""
    return next(iter({m.w8a8_kernel for m in _LAYERS.values()}), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, prompt {PROMPT_LEN}, {NEW_TOKENS} tokens",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        make_checkpoint(Path(tmp))
        config = QuantConfig("int8", None, embeddings=True, output=True, activations="int8")
        model, _ = load_model(Path(tmp), quantize=config)
        prepack_for_inference(model)
        prompt, size = the_prompt(PROMPT_LEN), PROMPT_LEN + NEW_TOKENS
        start = time.perf_counter()
        compiled = torch.compile(static_step(model, size), fullgraph=True, dynamic=False)
        static_decode(model, compiled, prompt, size)
        print(f"compiled the decode step in {time.perf_counter() - start:.1f} s", flush=True)
        eager_rates, compiled_rates, agree = [], [], []
        for i in range(args.rounds):
            reference, eager_rate = eager_decode(model, prompt)
            tokens, compiled_rate = static_decode(model, compiled, prompt, size)
            agree.append(sum(a == b for a, b in zip(tokens, reference)))
            eager_rates.append(eager_rate)
            compiled_rates.append(compiled_rate)
            print(f"round {i}: eager generate {eager_rate:.1f} tok/s, compiled step {compiled_rate:.1f} tok/s, "
                  f"{agree[-1]}/{NEW_TOKENS} tokens agree", flush=True)
        gemv = gemv_probe()
    print("one row through 2560 x 768, us per call: "
          + ", ".join(f"{name} {us:.0f}" for name, us in gemv.items()))
    print(json.dumps({
        "compiled_vs_eager_w8a8_decode": round(statistics.median(compiled_rates) / statistics.median(eager_rates), 3),
        "compiled_tokens_agree": min(agree),
        "inductor_int8_gemv_vs_fp32_linear": round(gemv["fp32 F.linear"] / gemv["inductor int8"], 3),
        "inductor_int8_gemv_vs_w8a8_layer": round(gemv["W8A8 layer"] / gemv["inductor int8"], 3),
        "w8a8_kernel": quantized_kernel(),
    }))


if __name__ == "__main__":
    main()
