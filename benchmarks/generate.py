"""Prefill and decode speed and peak memory: tramontane against Hugging Face transformers (sdpa).

Both run the same random ~100M-parameter Mistral config with the same weights (saved once by transformers and
loaded by tramontane's checkpoint loader), in float32 on 2 threads, each engine in its own subprocess so that
peak memory (max RSS) is its own. Greedy decoding: both must produce the same tokens, which is checked.

    .venv/bin/python benchmarks/generate.py [--repeats 5] [--prompt-len 512] [--new-tokens 64]

The last line printed is one JSON object with the ratios (tramontane / transformers, higher is better for
speed, lower for memory).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4,
              head_dim=64, intermediate_size=2560, vocab_size=32000, sliding_window=4096,
              max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def make_checkpoint(directory: Path) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**CONFIG))
    model.save_pretrained(directory)


def run_engine(engine: str, directory: Path, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)
    prompt = torch.randint(0, CONFIG["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(1))
    if engine == "tramontane":
        from tramontane.generation import SamplingParams, generate
        from tramontane.models.checkpoint import load_model

        model, _ = load_model(directory)
        model.eval()

        def prefill() -> None:
            with torch.no_grad():
                model.output(model.hidden_states(prompt)[:, -1])

        def decode() -> list[int]:
            return generate(model, [prompt[0].tolist()], SamplingParams(max_tokens=new_tokens))[0].tokens
    else:
        from transformers import MistralForCausalLM

        model = MistralForCausalLM.from_pretrained(directory, attn_implementation="sdpa", dtype=torch.float32)
        model.eval()

        def prefill() -> None:
            with torch.no_grad():
                model(prompt, logits_to_keep=1)

        def decode() -> list[int]:
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=0)
            return out[0, prompt_len:].tolist()

    prefill()  # warm-up
    tokens = decode()
    prefill_s, total_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        prefill()
        prefill_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        decode()
        total_s.append(time.perf_counter() - start)
    prefill_median = statistics.median(prefill_s)
    decode_median = max(statistics.median(total_s) - prefill_median, 1e-9)
    return {"prefill_tokens_per_s": prompt_len / prefill_median,
            "decode_tokens_per_s": (new_tokens - 1) / decode_median,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--engine", choices=["tramontane", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:  # child process: one engine, result as JSON on stdout
        print(json.dumps(run_engine(args.engine, args.checkpoint, args.prompt_len, args.new_tokens,
                                    args.repeats)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        make_checkpoint(directory)
        results = {}
        for engine in ("transformers", "tramontane"):
            out = subprocess.run([sys.executable, __file__, "--engine", engine, "--checkpoint", str(directory),
                                  "--repeats", str(args.repeats), "--prompt-len", str(args.prompt_len),
                                  "--new-tokens", str(args.new_tokens)],
                                 check=True, capture_output=True, text=True)
            results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, hf = results["tramontane"], results["transformers"]
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}, "
          f"2 threads, float32, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}")
    print(f"{'engine':<14}{'prefill tok/s':>15}{'decode tok/s':>15}{'peak RSS MB':>14}")
    for name, r in (("transformers", hf), ("tramontane", ours)):
        print(f"{name:<14}{r['prefill_tokens_per_s']:>15.1f}{r['decode_tokens_per_s']:>15.1f}"
              f"{r['peak_rss_mb']:>14.0f}")
    same = ours["tokens"] == hf["tokens"]
    print(f"greedy tokens identical: {same}")
    print(json.dumps({
        "prefill_speedup_vs_hf": round(ours["prefill_tokens_per_s"] / hf["prefill_tokens_per_s"], 3),
        "decode_speedup_vs_hf": round(ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"], 3),
        "peak_memory_vs_hf": round(ours["peak_rss_mb"] / hf["peak_rss_mb"], 3),
        "greedy_tokens_identical": same,
    }))


if __name__ == "__main__":
    main()
