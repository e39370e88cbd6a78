"""Prefill and decode speed, peak memory and bytes read per token: tramontane in float32, bfloat16, int8 and
int4 against Hugging Face transformers (sdpa, float32 and bfloat16) and llama.cpp (GGUF F16, Q8_0, Q4_0).

Every engine runs the same random ~100M-parameter Mistral config with the same weights (saved once by
transformers; tramontane loads that folder with its checkpoint loader, llama.cpp a GGUF converted from it), on
2 threads, each engine in its own subprocess so that peak memory (max RSS) is its own. All engines are loaded first, then
timed in interleaved rounds (one prefill and one generation each, the order rotating), so that a change of load
on a shared machine hits them alike; medians over the rounds. Greedy decoding of one prompt (batch 1). tramontane float32 and transformers float32 must produce the same tokens, which is checked;
the other formats round differently and report how many leading tokens agree with tramontane float32.

tramontane int8 / int4 are the bfloat16 model with every linear layer quantized, output head included (and the
embedding table, which decoding reads one row of), as llama.cpp's Q8_0 / Q4_0 files quantize every 2-D weight;
int4 uses groups of 64 (0.5625 byte/weight, the size of Q4_0). tramontane w8a8 is the float32 model with the
same int8 weights run with dynamically quantized int8 activations (fbgemm; what llama.cpp's Q8_0 dot product
does with its activations too). "Bytes/token" is the size of the weights one
decoded token reads (everything but the embedding table, plus one of its rows; the KV cache, < 10 MB here, is
left out); "GB/s" is bytes/token times decode tokens/s.

Every engine runs with OMP_WAIT_POLICY=PASSIVE unless the caller sets it or `--omp-wait-policy` says otherwise
(torch and this llama.cpp build both use OpenMP; on shared cores spinning workers made 2 threads several times
slower than 1, see the serve benchmark). PASSIVE costs tramontane more than llama.cpp: a torch decode step opens
dozens of parallel regions (each linear layer's), each waking a sleeping worker, where llama.cpp's threads meet
at their own spinning barriers inside one region per token; `--omp-wait-policy default` measures both without
that cost.

llama.cpp runs through llama-cpp-python built from its source distribution (cmake and a C++ compiler needed) in
its own venv, `.bench/llamacpp-venv` by default, created on first use (10-20 minutes on 2 cores); when it
cannot be built the llama.cpp rows are skipped and the reason is recorded in the last line.

tramontane is loaded as `tramontane generate` and `serve` load it: `models.cpu_linear.prepack_for_inference`
runs each linear layer through MKL (`F.linear`) or a oneDNN-packed weight, whichever it timed faster for the
layer's shape; "tramontane fp32 unpacked" / "bf16 unpacked" are the same models with every layer on
`F.linear`.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generate.py [--repeats 5] [--prompt-len 512] [--new-tokens 64]
        [--only "transformers fp32,tramontane fp32,tramontane fp32 unpacked"]

The last line printed is one JSON object with the ratios (higher is better for speed, lower for memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# the benchmarks' shared helpers, however this file is loaded (as a script or by path, as the tests do)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _venv import ensure_venv  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"hidden_size": 768, "num_hidden_layers": 8, "num_attention_heads": 12, "num_key_value_heads": 4,
          "head_dim": 64, "intermediate_size": 2560, "vocab_size": 32000, "sliding_window": 4096,
          "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": False}
# variant -> (model dtype, (mode, int4 group size, activations) or None)
TRAMONTANE = {"fp32": (None, None), "bf16": ("bfloat16", None), "int8": ("bfloat16", ("int8", None, "float")),
              "int4": ("bfloat16", ("int4", 64, "float")), "w8a8": (None, ("int8", None, "int8"))}
# the float variants without `prepack_for_inference` (every linear layer through F.linear), as before it
UNPACKED = ("fp32", "bf16")
TRANSFORMERS = ("fp32", "bf16")
GGUF_TYPES = ("F16", "Q8_0", "Q4_0")
DEFAULT_LLAMA_VENV = ROOT / ".bench" / "llamacpp-venv"
LLAMA_WORKER = Path(__file__).resolve().parent / "_llamacpp_worker.py"


def make_checkpoint(directory: Path) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**CONFIG))
    model.save_pretrained(directory)


def the_prompt(prompt_len: int) -> list[int]:
    import torch

    return torch.randint(0, CONFIG["vocab_size"], (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()


def decode_bytes(module) -> int:
    """Bytes of the tensors one decoded token reads: every parameter and buffer except the embedding table
    (one row of it counted), each storage once, and the oneDNN-packed weights (`models.cpu_linear`)."""
    import torch

    seen, total = set(), 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor is None or tensor.numel() == 0 or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        size = tensor.numel() * tensor.element_size()
        embedding = name.startswith(("tok_embeddings.", "model.embed_tokens."))
        total += size // tensor.shape[0] if embedding else size
    for layer in module.modules():  # packed weights are neither parameters nor buffers
        packed = getattr(layer, "packed", None)
        # the int4 layers' packing is a buffer, counted above; oneDNN's packed weights have no data pointer
        if isinstance(packed, torch.Tensor) and not any(packed is b for b in layer.buffers(recurse=False)):
            total += packed.numel() * packed.element_size()
        if getattr(layer, "fbgemm", None) is not None:  # W8A8: int8 [out, in] in fbgemm's packing
            total += layer.out_features * layer.in_features
    return total


def run_engine(engine: str, variant: str, directory: Path, prompt_len: int, new_tokens: int) -> None:
    import torch

    variant, unpacked = variant.removesuffix(" unpacked"), variant.endswith(" unpacked")

    torch.set_num_threads(2)
    prompt = torch.tensor([the_prompt(prompt_len)])
    if engine == "tramontane":
        from tramontane.generation import SamplingParams, generate
        from tramontane.models.checkpoint import load_model
        from tramontane.models.quant import QuantConfig

        dtype, quant = TRAMONTANE[variant]
        config = None if quant is None else QuantConfig(quant[0], quant[1], embeddings=True, output=True,
                                                        activations=quant[2])
        model, _ = load_model(directory, dtype=dtype, quantize=config)
        model.eval()
        if not unpacked:  # as `tramontane generate` and `serve` load it
            from tramontane.models.cpu_linear import prepack_for_inference

            prepack_for_inference(model)

        def prefill() -> None:
            with torch.no_grad():
                model.output(model.hidden_states(prompt)[:, -1])

        def decode() -> list[int]:
            return generate(model, [prompt[0].tolist()], SamplingParams(max_tokens=new_tokens))[0].tokens
    else:
        from transformers import MistralForCausalLM

        dtype = torch.float32 if variant == "fp32" else torch.bfloat16
        model = MistralForCausalLM.from_pretrained(directory, attn_implementation="sdpa", dtype=dtype)
        model.eval()

        def prefill() -> None:
            with torch.no_grad():
                model(prompt, logits_to_keep=1)

        def decode() -> list[int]:
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=0)
            return out[0, prompt_len:].tolist()

    final = {"decode_bytes_per_token": decode_bytes(model)}
    if engine == "tramontane":  # which kernel ran W8A8 layers: the native one, or fbgemm's without a compiler
        kernels = {getattr(m, "w8a8_kernel", None) for m in model.modules()} - {None}
        final["w8a8_kernel"] = ",".join(sorted(kernels)) or None
    serve_rounds(prefill, decode, final)


def serve_rounds(prefill: Callable[[], None], decode: Callable[[], list[int]], final: dict) -> None:
    """The child's side of the interleaved timing: warm up, then answer each "round" line on stdin with one
    timed prefill and one timed generation (JSON on stdout), and any other line with `final`, the greedy tokens
    and the peak RSS. Shared by the llama.cpp worker, which imports it."""
    prefill()
    tokens = decode()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        start = time.perf_counter()
        prefill()
        middle = time.perf_counter()
        decode()
        print(json.dumps({"prefill_s": middle - start, "total_s": time.perf_counter() - middle}), flush=True)
    print(json.dumps(final | {"tokens": tokens,
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
          flush=True)


class Engine:
    """One engine in its own process, driven round by round (see `serve_rounds`)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], stdin_first: str | None = None):
        self.name, self.prefill_s, self.total_s = name, [], []
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - the child's stderr, kept for errors
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        if stdin_first is not None:
            self._send(stdin_first)
        self._reply()  # ready

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _reply(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.log.seek(0)
        raise RuntimeError(f"{self.name} exited: {self.log.read()[-2000:]}")

    def round(self) -> None:
        self._send("round")
        reply = self._reply()
        self.prefill_s.append(reply["prefill_s"])
        self.total_s.append(reply["total_s"])

    def finish(self, prompt_len: int, new_tokens: int) -> dict:
        self._send("done")
        final = self._reply()
        self.proc.wait(timeout=60)
        self.log.close()
        prefill_median = statistics.median(self.prefill_s)
        decode_median = max(statistics.median(self.total_s) - prefill_median, 1e-9)
        return final | {"prefill_tokens_per_s": prompt_len / prefill_median,
                        "decode_tokens_per_s": (new_tokens - 1) / decode_median}


# -- llama.cpp -----------------------------------------------------------------------------------------------


def ensure_llama_venv(venv: Path) -> Path:
    """The llama.cpp venv's python: numpy, gguf, safetensors, then llama-cpp-python built from its source
    distribution (pip runs cmake); created once. Raises RuntimeError on failure."""
    return ensure_venv(venv, "import llama_cpp, gguf, safetensors",
                       [["numpy", "gguf", "safetensors"],
                        ["--no-binary", "llama-cpp-python", "llama-cpp-python"]],
                       "llama.cpp built from source (10-20 minutes)", env={"CMAKE_BUILD_PARALLEL_LEVEL": "2"})


def llama_versions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json\n"
            "print(json.dumps({p: m.version(p) for p in ('llama_cpp_python', 'gguf')}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def start_llama(python: Path, directory: Path, kind: str, args: argparse.Namespace, env: dict[str, str]) -> Engine:
    gguf_file = directory / f"model-{kind}.gguf"
    subprocess.run([str(python), str(LLAMA_WORKER), "convert", str(directory), str(gguf_file), kind],
                   check=True, capture_output=True, text=True)
    return Engine(f"llama.cpp {kind}", [str(python), str(LLAMA_WORKER), "run", str(gguf_file),
                                        str(args.prompt_len), str(args.new_tokens)],
                  env, stdin_first=json.dumps(the_prompt(args.prompt_len)))


# -- report --------------------------------------------------------------------------------------------------


def _agreement(tokens: list[int], reference: list[int]) -> int:
    """How many leading tokens equal the reference's."""
    n = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        n += 1
    return n


def _ratio(a: dict | None, b: dict | None, key: str = "decode_tokens_per_s") -> float | None:
    return round(a[key] / b[key], 3) if a and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--llama-venv", type=Path, default=DEFAULT_LLAMA_VENV)
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE", "default"),
                        default=os.environ.get("OMP_WAIT_POLICY", "PASSIVE").upper(),
                        help="OMP_WAIT_POLICY of every engine (default: the caller's, else PASSIVE). 'default' "
                             "leaves it unset: libgomp's workers then spin briefly after each parallel region and "
                             "sleep after that, which a decode step's many small regions profit from; ACTIVE "
                             "spins forever, so the idle engines of the interleaved rounds starve the timed one")
    parser.add_argument("--no-llama", action="store_true", help="skip llama.cpp (no venv is built)")
    parser.add_argument("--only", help="comma-separated engines to run, as the table names them (default: "
                        "all; tramontane fp32 and transformers fp32 are required)")
    parser.add_argument("--engine", choices=["tramontane", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:  # child process: one engine, driven by the parent round by round
        run_engine(args.engine, args.variant, args.checkpoint, args.prompt_len, args.new_tokens)
        return

    llama_python, llama_error, versions = None, None, {}
    if args.no_llama:
        llama_error = "skipped (--no-llama)"
    else:
        try:
            llama_python = ensure_llama_venv(args.llama_venv)
            versions = llama_versions(llama_python)
        except (subprocess.CalledProcessError, OSError) as err:
            llama_error = f"llama-cpp-python could not be built: {err}"
            print(f"WARNING: {llama_error}; the llama.cpp rows are skipped", flush=True)

    variants = [("transformers", v) for v in TRANSFORMERS] + [("tramontane", v) for v in TRAMONTANE] + [
        ("tramontane", f"{v} unpacked") for v in UNPACKED]
    if args.only:
        only = {name.strip() for name in args.only.split(",")}
        unknown = only - {f"{e} {v}" for e, v in variants} - {f"llama.cpp {kind}" for kind in GGUF_TYPES}
        if unknown or not {"tramontane fp32", "transformers fp32"} <= only:
            parser.error(f"--only: unknown {sorted(unknown)}, or missing the anchors tramontane fp32 and "
                         "transformers fp32")
        variants = [(e, v) for e, v in variants if f"{e} {v}" in only]
    results: dict[str, dict | None] = {f"{e} {v}": None for e, v in variants}
    results |= {f"llama.cpp {kind}": None for kind in GGUF_TYPES
                if not args.only or f"llama.cpp {kind}" in only}
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        make_checkpoint(directory)
        engines: list[Engine] = []
        try:
            # loaded one after the other, then timed in interleaved rounds (a rotating order each round), so
            # that a change of load on a shared machine hits every engine alike
            for engine, variant in variants:
                engines.append(Engine(f"{engine} {variant}", [
                    sys.executable, __file__, "--engine", engine, "--variant", variant, "--checkpoint",
                    str(directory), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)],
                    env))
            for kind in GGUF_TYPES:
                if llama_python is None or (args.only and f"llama.cpp {kind}" not in only):
                    continue
                try:
                    engines.append(start_llama(llama_python, directory, kind, args, env))
                except (subprocess.CalledProcessError, RuntimeError) as err:
                    detail = err.stderr if isinstance(err, subprocess.CalledProcessError) else str(err)
                    llama_error = f"llama.cpp {kind} failed: {(detail or '')[-500:]}"
                    print(f"WARNING: {llama_error}", flush=True)
            for r in range(args.repeats):
                for engine in engines[r % len(engines):] + engines[:r % len(engines)]:
                    engine.round()
            for engine in engines:
                results[engine.name] = engine.finish(args.prompt_len, args.new_tokens)
        finally:
            for engine in engines:
                if engine.proc.poll() is None:
                    engine.proc.kill()
                    engine.proc.wait()

    ours, hf = results["tramontane fp32"], results["transformers fp32"]
    assert ours is not None and hf is not None
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}, "
          f"2 threads (OMP_WAIT_POLICY={args.omp_wait_policy}), prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, batch 1, median of {args.repeats}"
          + (f"; llama-cpp-python {versions.get('llama_cpp_python')}, gguf {versions.get('gguf')}" if versions
             else ""))
    print(f"{'engine':<26}{'prefill tok/s':>14}{'decode tok/s':>13}{'MB/token':>10}{'GB/s':>7}"
          f"{'peak RSS MB':>12}{'tokens = fp32':>14}")
    for name, r in results.items():
        if r is None:
            print(f"{name:<26}{'(not run)':>14}")
            continue
        mb = r["decode_bytes_per_token"] / 1e6
        print(f"{name:<26}{r['prefill_tokens_per_s']:>14.1f}{r['decode_tokens_per_s']:>13.1f}{mb:>10.1f}"
              f"{mb * r['decode_tokens_per_s'] / 1e3:>7.2f}{r['peak_rss_mb']:>12.0f}"
              f"{_agreement(r['tokens'], ours['tokens']):>10}/{len(ours['tokens'])}")
    same = ours["tokens"] == hf["tokens"]
    print(f"greedy tokens identical (tramontane fp32 vs transformers fp32): {same}")
    get = results.get
    summary = {
        "prefill_speedup_vs_hf": round(ours["prefill_tokens_per_s"] / hf["prefill_tokens_per_s"], 3),
        "decode_speedup_vs_hf": round(ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"], 3),
        "peak_memory_vs_hf": round(ours["peak_rss_mb"] / hf["peak_rss_mb"], 3),
        "greedy_tokens_identical": same,
        "int8_decode_speedup_vs_hf_fp32": _ratio(get("tramontane int8"), hf),
        "bf16_vs_llamacpp_f16": _ratio(get("tramontane bf16"), get("llama.cpp F16")),
        "int8_vs_llamacpp_q8_0": _ratio(get("tramontane int8"), get("llama.cpp Q8_0")),
        "int4_vs_llamacpp_q4_0": _ratio(get("tramontane int4"), get("llama.cpp Q4_0")),
        "w8a8_decode_speedup_vs_hf_fp32": _ratio(get("tramontane w8a8"), hf),
        "w8a8_vs_llamacpp_q8_0": _ratio(get("tramontane w8a8"), get("llama.cpp Q8_0")),
        "w8a8_kernel": (get("tramontane w8a8") or {}).get("w8a8_kernel"),
        "bf16_decode_speedup_vs_hf_bf16": _ratio(get("tramontane bf16"), get("transformers bf16")),
        "prepack_decode_speedup": {v: _ratio(get(f"tramontane {v}"), get(f"tramontane {v} unpacked"))
                                   for v in UNPACKED},
        "prefill_vs_fp32": {v: _ratio(get(f"tramontane {v}"), ours, "prefill_tokens_per_s") for v in TRAMONTANE},
        "decode_vs_hf_fp32": {v: _ratio(get(f"tramontane {v}"), hf)
                              for v in [*TRAMONTANE, *(f"{u} unpacked" for u in UNPACKED)]},
        "llamacpp": llama_error or "ok",
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
