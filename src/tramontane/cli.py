"""The `tramontane` command line: parse arguments, call the library, print results.

Results go to stdout; progress and timing go to stderr, so `--json` output can be piped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tramontane.errors import TramontaneError

if TYPE_CHECKING:  # the commands import these lazily: `tramontane --help` loads no torch
    import pandas as pd
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from tramontane.generation import SamplingParams
    from tramontane.models.checkpoint import Format
    from tramontane.models.quant import QuantConfig
    from tramontane.models.transformer import Transformer
    from tramontane.models.vision import VisionLanguageModel
    from tramontane.synth.synthesizer import Synthesizer
    from tramontane.tokenizer import Tokenizer

_DTYPES = ("float32", "bfloat16", "float16")


def _stderr() -> Console:
    from rich.console import Console

    # one message, one line; under torchrun only rank 0 prints (`_join_torchrun`)
    return Console(stderr=True, highlight=False, soft_wrap=True, quiet=not _PRINTS)


_PRINTS = True  # False on the ranks of a torchrun launch other than 0


def _join_torchrun() -> bool:
    """Under torchrun, join the launch's process group (DP-SGD spread over the processes,
    `tramontane.dp.distributed`) and silence every rank but 0. True where outputs are printed and written."""
    global _PRINTS
    from tramontane.dp import distributed

    distributed.replica_group()
    _PRINTS = distributed.is_first()
    return _PRINTS


# -- model commands ----------------------------------------------------------------------------------------

# The loaders' hints name Python calls; on the command line the same fix is a file in the --model folder or
# another command. Keyed by the library's exact words: the model-command tests fail if they drift.
_FORMATS = ("consolidated", "hf")
_MODEL_HELP = ("checkpoint directory (consolidated or Hugging Face), or a llama.cpp .gguf file of a Mistral / "
               "Mixtral text model with the model's tekken.json or tokenizer.model.v* beside it; GGUF weights "
               "are dequantized at load, to float32 for a quantized file unless --dtype is given (add --quantize "
               "int8|int4 to shrink them again)")
_FORMAT_HELP = ("the checkpoint layout to load where the --model folder holds both (Mistral's repositories "
                "ship params.json and config.json side by side); default: the one present")


def _format(name: str | None) -> Format | None:
    return "consolidated" if name == "consolidated" else "hf" if name == "hf" else None


def _quantize_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=("int8", "int4", "w8a8"), default=None,
                   help="weight-only quantization of the decoder's linear layers at load time (int8 per channel, "
                        "int4 in groups); w8a8: the int8 weights with int8 activations quantized on the fly "
                        "(fbgemm, CPU; faster than int8 where torch's int8 kernel has no AVX2 code, less exact)")
    p.add_argument("--quant-group-size", type=int, default=None, help="int4 group size (default 64)")
    p.add_argument("--quantize-head", action="store_true",
                   help="also quantize the output head and the embeddings (fewer bytes, lower agreement)")


def _base_quantize_options(p: argparse.ArgumentParser) -> None:
    """--quantize and --quant-group-size of `finetune` and `plan search`: the frozen base of LoRA training."""
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="QLoRA-style: weight-only quantize the frozen base's decoder linear layers (int8 per "
                        "channel, int4 in groups) and train float32 LoRA adapters over it (--method lora); the "
                        "adapter also loads over the float base")
    p.add_argument("--quant-group-size", type=int, default=None, help="int4 group size (default 64)")
    p.add_argument("--quantize-head", action="store_true",
                   help="also quantize the frozen output head and the token embeddings (with --quantize)")


def _quantize(args: argparse.Namespace) -> QuantConfig | None:
    """The --quantize options as a `QuantConfig` (None without --quantize)."""
    head = getattr(args, "quantize_head", False)
    if args.quantize is None:
        if args.quant_group_size is not None or head:
            raise TramontaneError("--quant-group-size and --quantize-head need --quantize int8|int4")
        return None
    from tramontane.models.quant import QuantConfig

    if args.quant_group_size is not None and args.quantize != "int4":
        raise TramontaneError("--quant-group-size applies to --quantize int4 (int8 and w8a8 are per output "
                              "channel)")
    if args.quantize == "w8a8":
        return QuantConfig("int8", embeddings=head, output=head, activations="int8")
    return QuantConfig(args.quantize, args.quant_group_size, embeddings=head, output=head)


_COMMAND_LINE_HINTS = (
    ("pass format='consolidated' or format='hf' to choose",
     "choose one with --format consolidated|hf, or keep only one in the --model folder"),
    ("pass the one to use to Tokenizer.from_file", "keep only the one to use in the --model folder"),
    ("use Tokenizer.from_model_dir() or pass the file", "move it out of the --model folder"),
    ("(load text models with tramontane.models.checkpoint.load_model)",
     "(for a text model use `tramontane generate` or `tramontane chat`)"),
    ("a text-only checkpoint, load it with tramontane.models.checkpoint.load_model",
     "a text-only checkpoint; chat with it without --image"),
    ("use a multimodal tokenizer, e.g. Tokenizer.builtin('v3-tekken-mm') or a Pixtral tekken.json",
     "put the checkpoint's multimodal tokenizer file (e.g. Pixtral's tekken.json) in the --model folder"),
)


def _command_line_hint(err: TramontaneError) -> TramontaneError:
    """`err` with its hint reworded for the command line (same exception, same traceback)."""
    message = str(err)
    for call, fix in _COMMAND_LINE_HINTS:
        message = message.replace(call, fix)
    err.args = (message,)
    return err


def _load_model_and_tokenizer(model_dir: str, dtype: str | None, adapter: str | None = None,
                              format: str | None = None,
                              quantize: QuantConfig | None = None) -> tuple[Transformer, Tokenizer]:
    import torch

    from tramontane.models.checkpoint import detect_format, load_model
    from tramontane.tokenizer import Tokenizer

    start = time.perf_counter()
    try:
        detect_format(model_dir, _format(format))  # a wrong --model is named first, then a missing tokenizer,
        tokenizer = Tokenizer.from_model_dir(model_dir)  # before the weights (a .gguf is dequantized: minutes)
        if adapter is None:
            model, _ = load_model(model_dir, dtype=getattr(torch, dtype) if dtype else None,
                                  format=_format(format), quantize=quantize)
        else:
            from tramontane.finetune.adapter import load_model_with_adapter

            model, _ = load_model_with_adapter(model_dir, adapter, dtype=getattr(torch, dtype) if dtype else None,
                                               format=_format(format), quantize=quantize)
    except TramontaneError as err:
        raise _command_line_hint(err)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise TramontaneError(
            f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model {model_dir} only "
            f"{model.args.vocab_size}: the folder mixes files of different models"
        )
    from tramontane.models.cpu_linear import prepack_for_inference

    prepack_for_inference(model)  # generate and chat only run inference: oneDNN where it is faster (CPU)
    _stderr().print(f"loaded {model_dir} ({model.args.num_parameters() / 1e6:.1f}M parameters, "
                    f"{tokenizer.version} tokenizer{f', LoRA adapter {adapter}' if adapter else ''}) in "
                    f"{time.perf_counter() - start:.2f} s")
    return model, tokenizer


def _sampling(args: argparse.Namespace, logprobs: bool = False) -> SamplingParams:
    """The sampling options as `SamplingParams`, a bad one named by its option. Every model command calls
    this before loading anything: a mistyped option must not wait minutes for a real checkpoint."""
    from tramontane.generation import SamplingParams, sampling_problems

    problems = sampling_problems(args.max_tokens, args.temperature, args.top_p)
    if problems:
        raise TramontaneError("; ".join(f"--{name.replace('_', '-')} {rule}" for name, rule in problems.items()))
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, logprobs=logprobs)


def cmd_generate(args: argparse.Namespace) -> int:
    from tramontane.generation import generate

    params = _sampling(args, logprobs=args.json)  # every option before the model
    if args.chunk_size is not None and args.chunk_size < 1:
        raise TramontaneError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    model, tokenizer = _load_model_and_tokenizer(args.model, args.dtype, args.adapter, args.format, _quantize(args))
    if args.chat:
        prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = tokenizer.encode(args.prompt, bos=True)
    start = time.perf_counter()
    completion = generate(model, [prompt], params, eos_id=tokenizer.eos_id, chunk_size=args.chunk_size)[0]
    elapsed = time.perf_counter() - start
    text = tokenizer.decode(completion.tokens)
    _stderr().print(f"{len(prompt)} prompt tokens, {len(completion.tokens)} generated in {elapsed:.2f} s "
                    f"({completion.finish_reason})")
    if args.json:
        print(json.dumps({"prompt_tokens": prompt, "tokens": completion.tokens, "text": text,
                          "logprobs": completion.logprobs, "finish_reason": completion.finish_reason}))
    else:
        print(text)
    return 0


def _load_vision_model_and_tokenizer(model_dir: str, dtype: str | None, format: str | None = None,
                                     quantize: QuantConfig | None = None) -> tuple[VisionLanguageModel, Tokenizer]:
    import torch

    from tramontane.models.vision import check_tokenizer, load_vision_language_model
    from tramontane.tokenizer import Tokenizer

    model = load_vision_language_model(model_dir, dtype=getattr(torch, dtype) if dtype else None,
                                       format=_format(format))
    if quantize is not None:
        from tramontane.models.quant import quantize_model

        quantize_model(model, quantize)
    tokenizer = Tokenizer.from_model_dir(model_dir)
    check_tokenizer(tokenizer, model.vision_args)
    from tramontane.models.cpu_linear import prepack_for_inference

    return prepack_for_inference(model), tokenizer  # chat only runs inference


def cmd_chat(args: argparse.Namespace) -> int:
    from tramontane.generation import decode_steps

    if args.image:
        from tramontane.generation.multimodal import generate_with_images
        from tramontane.models.vision import VisionLanguageModel, encode_image_chat, image_message, load_image

    options = _sampling(args)  # every option and image before the model
    if args.image and args.adapter:
        raise TramontaneError("--adapter applies to text models; it cannot be combined with --image")
    model: Transformer
    if args.image:
        pictures = [load_image(path) for path in args.image]
        try:
            model, tokenizer = _load_vision_model_and_tokenizer(args.model, args.dtype, args.format,
                                                                _quantize(args))
        except TramontaneError as exc:
            raise _command_line_hint(exc)
    else:
        model, tokenizer = _load_model_and_tokenizer(args.model, args.dtype, args.adapter, args.format, _quantize(args))
    messages: list[Any] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    err = _stderr()
    err.print("type a message; an empty line or Ctrl-D ends the chat"
              + (f" ({len(args.image)} image(s) go with the first message)" if args.image else ""))
    turn = 0
    while True:
        err.print("[bold]> [/bold]", end="")
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        text = line.rstrip("\n")
        if args.image and turn == 0:
            messages.append(image_message(text, pictures))
        else:
            messages.append({"role": "user", "content": text})
        params = options
        if options.seed is not None:  # a new but reproducible draw each turn
            params = dataclasses.replace(options, seed=options.seed + turn)
        if args.image:  # images: the whole reply at once (prefill reads the spliced image features)
            assert isinstance(model, VisionLanguageModel)
            prompt, images = encode_image_chat(tokenizer, messages)
            [completion] = generate_with_images(model, [prompt], [images], params, eos_id=tokenizer.eos_id)
            reply = completion.tokens
            print(tokenizer.decode(reply), flush=True)
        else:
            prompt = tokenizer.encode_chat(messages)
            decoder = tokenizer.incremental_decoder(prompt)
            reply = []
            for new, _, finished in decode_steps(model, [prompt], params, eos_id=tokenizer.eos_id):
                if bool(finished[0]):
                    break
                reply.append(int(new[0]))
                sys.stdout.write(decoder.push([int(new[0])]))
                sys.stdout.flush()
            sys.stdout.write(decoder.flush() + "\n")
            sys.stdout.flush()
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
        turn += 1


def cmd_transcribe(args: argparse.Namespace) -> int:
    """Speech to text with a Voxtral checkpoint (the prompt is built by mistral_common)."""
    import torch

    from tramontane.generation.multimodal import transcribe
    from tramontane.models.audio import load_audio, load_voxtral
    from tramontane.tokenizer import Tokenizer

    params = _sampling(args)  # every option and the audio before the model
    if args.language is not None:
        from mistral_common.protocol.transcription.request import TranscriptionRequest
        from pydantic import TypeAdapter, ValidationError

        try:  # mistral_common's own rule for the request's language
            language_type = TranscriptionRequest.model_fields["language"].annotation
            assert language_type is not None
            TypeAdapter(language_type).validate_python(args.language)
        except ValidationError:
            raise TramontaneError(f"--language must be an ISO 639-1 code such as en or fr, got "
                                  f"{args.language!r}") from None
    audio = load_audio(args.audio)
    start = time.perf_counter()
    try:
        model = load_voxtral(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None,
                             format=_format(args.format))
        quant = _quantize(args)
        if quant is not None:
            from tramontane.models.quant import quantize_model

            quantize_model(model, quant)
        tokenizer = Tokenizer.from_model_dir(args.model)
    except TramontaneError as err:
        raise _command_line_hint(err)
    _stderr().print(f"loaded {args.model} in {time.perf_counter() - start:.2f} s; "
                    f"{len(audio.audio_array) / audio.sampling_rate:.1f} s of audio")
    print(transcribe(model, tokenizer, audio, language=args.language, params=params))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible server (`vllm serve`'s counterpart) on one checkpoint."""
    import os

    try:
        import uvicorn

        from tramontane.serve.app import create_app
    except ImportError as err:
        raise TramontaneError(f"tramontane serve needs FastAPI and uvicorn ({err.name} is missing): "
                              "pip install 'tramontane[serve]'") from None
    from tramontane.serve.engine import EngineConfig
    from tramontane.serve.loading import load_served_model

    try:  # every option before the model
        config = EngineConfig(max_batch=args.max_batch, max_model_len=args.max_model_len, max_queue=args.max_queue)
    except TramontaneError as err:
        message = str(err)
        for name in ("max_batch", "max_model_len", "max_queue"):
            message = message.replace(f"EngineConfig.{name}", f"--{name.replace('_', '-')}")
        raise TramontaneError(message) from None
    start = time.perf_counter()
    try:
        served = load_served_model(args.model, args.adapter, dtype=args.dtype, name=args.served_model_name,
                                   format=_format(args.format), quantize=_quantize(args))
    except TramontaneError as err:
        raise _command_line_hint(err)
    api_key = args.api_key or os.environ.get("TRAMONTANE_API_KEY") or None
    app = create_app(served, engine_config=config, api_key=api_key, allow_remote_media=args.allow_remote_media)
    _stderr().print(f"loaded {args.model} ({served.kind}, {served.tokenizer.version} tokenizer"
                    f"{', DP ledger' if served.privacy else ''}) in {time.perf_counter() - start:.2f} s; serving "
                    f"{served.name!r} on http://{args.host}:{args.port}/v1"
                    f"{' (API key required)' if api_key else ''}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


# -- the coding agent ---------------------------------------------------------------------------------------

_AGENT_OPTIONS = ("max_steps", "max_seconds", "max_total_tokens", "temperature", "max_tokens", "context_tokens",
                  "request_timeout", "endpoint", "model")


def _agent_config(args: argparse.Namespace) -> Any:
    """The `AgentConfig` of the agent options, a bad value named by its option."""
    import os

    from tramontane.agent.loop import AgentConfig

    if not args.endpoint:
        raise TramontaneError("tramontane agent needs --endpoint, the base URL of an OpenAI-compatible API "
                              "(e.g. http://127.0.0.1:8000/v1 for `tramontane serve`)")
    try:
        return AgentConfig(endpoint=args.endpoint, model=args.model,
                           api_key=args.api_key or os.environ.get("TRAMONTANE_API_KEY") or None,
                           max_steps=args.max_steps, max_seconds=args.max_seconds,
                           max_total_tokens=args.max_total_tokens, temperature=args.temperature,
                           max_tokens=args.max_tokens, context_tokens=args.context_tokens,
                           request_timeout=args.request_timeout)
    except TramontaneError as err:
        message = str(err).replace("AgentConfig: ", "")
        for name in _AGENT_OPTIONS:
            message = message.replace(name, f"--{name.replace('_', '-')}")
        raise TramontaneError(message) from None


def _sandbox_limits(args: argparse.Namespace) -> Any:
    from tramontane.agent.sandbox import SandboxLimits

    try:
        return SandboxLimits(wall_seconds=args.command_timeout)
    except TramontaneError as err:
        raise TramontaneError(f"--command-timeout: {err}") from None


def _show_agent_event(event: Any) -> None:
    """One stderr line per assistant reply and per end of run (the trajectory file has everything)."""
    def clip(text: str, limit: int = 160) -> str:
        text = " ".join(text.split())
        return text if len(text) <= limit else text[:limit - 3] + "..."

    meta = event.get("meta") or {}
    if event.get("role") == "assistant":
        calls = [f"{c['function']['name']}({c['function']['arguments']})" for c in event.get("tool_calls") or []]
        what = "; ".join(calls) or event.get("content") or ""
        _stderr().print(f"step {meta.get('step')}: {clip(what)}", markup=False)
    elif event.get("event") == "empty_reply":
        _stderr().print(f"step {meta.get('step')}: (empty reply)", markup=False)


def cmd_agent(args: argparse.Namespace) -> int:
    """The coding agent on one task in a sandboxed workspace (`agent.loop.run_agent`), or `agent eval`."""
    if args.agent_command == "eval":
        return cmd_agent_eval(args)
    from tramontane.agent.loop import run_agent
    from tramontane.agent.sandbox import Sandbox
    from tramontane.agent.tools import ToolBox

    if args.workspace is None:
        raise TramontaneError("tramontane agent needs --workspace, the folder the agent works in (the only one "
                              "it can write)")
    workspace = Path(args.workspace).resolve()
    if not workspace.is_dir():
        raise TramontaneError(f"--workspace {args.workspace} is not a folder; create it or name an existing one")
    if args.task_text is not None and args.task is not None:
        raise TramontaneError("give the task once: as text or with --task FILE, not both")
    if args.task is not None:
        try:
            task = Path(args.task).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise TramontaneError(f"cannot read --task {args.task}: {getattr(err, 'strerror', None) or err}") \
                from None
    else:
        task = args.task_text or ""
    if args.resume and args.trajectory is None:
        raise TramontaneError("--resume continues the run in --trajectory FILE; give that file")
    if not task.strip() and not args.resume:
        raise TramontaneError('tramontane agent needs a task: "task text" or --task FILE')
    config = _agent_config(args)
    limits = _sandbox_limits(args)
    if args.unsafe_no_sandbox:
        _stderr().print("WARNING: --unsafe-no-sandbox: the agent's commands run on this machine as you, with your "
                        "files and network", markup=False)
    try:
        with Sandbox(workspace, limits, unsafe_no_sandbox=args.unsafe_no_sandbox) as sandbox:
            result = run_agent(task, ToolBox(sandbox), config,
                               trajectory=Path(args.trajectory) if args.trajectory else None, resume=args.resume,
                               workspace=workspace, on_event=_show_agent_event)
    except KeyboardInterrupt:
        if args.trajectory:
            _stderr().print(f"interrupted: {args.trajectory} holds every step taken; continue with the same "
                            "command and --resume", markup=False)
        raise
    _stderr().print(f"{result.reason} after {result.steps} step(s), {result.prompt_tokens} prompt + "
                    f"{result.completion_tokens} completion tokens"
                    f"{f'; trajectory in {args.trajectory}' if args.trajectory else ''}", markup=False)
    if result.message is not None:
        print(result.message)
    return 0 if result.reason == "finish" else 1


def cmd_agent_eval(args: argparse.Namespace) -> int:
    """The agent on every task of a folder, scored by the tasks' hidden tests (`agent.harness.evaluate`)."""
    from tramontane.agent.harness import BUILTIN_TASKS, evaluate

    if args.out is None:
        raise TramontaneError("tramontane agent eval needs --out, the results folder")
    config = _agent_config(args)
    limits = _sandbox_limits(args)
    tasks = Path(args.tasks) if args.tasks is not None else BUILTIN_TASKS
    err = _stderr()

    def show(task_id: str, record: dict[str, Any]) -> None:
        agent = record.get("agent") or {}
        outcome = "resolved" if record.get("resolved") else f"unresolved ({record.get('reason')})"
        err.print(f"{task_id}: {outcome}; the agent stopped on {agent.get('reason')} after {agent.get('steps')} "
                  "step(s)", markup=False)

    summary = evaluate(tasks, config, Path(args.out), model_name=args.model_name, limits=limits,
                       max_workers=args.max_workers, unsafe_no_sandbox=args.unsafe_no_sandbox, on_task=show)
    print(json.dumps({"model_name_or_path": summary.model_name_or_path, "total": summary.total,
                      "resolved": summary.resolved, "resolved_rate": summary.resolved_rate}))
    err.print(f"resolved {summary.resolved} of {summary.total}; predictions in "
              f"{Path(args.out) / 'predictions.jsonl'} (SWE-bench format), results in "
              f"{Path(args.out) / 'results.json'}, trajectories in {Path(args.out) / 'trajectories'}", markup=False)
    return 0


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser, temperature: float, model_help: str = _MODEL_HELP) -> None:
        p.add_argument("--model", required=True, help=model_help)
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
        p.add_argument("--dtype", choices=_DTYPES, default=None, help="default: the checkpoint's dtype")
        p.add_argument("--format", choices=_FORMATS, default=None, help=_FORMAT_HELP)
        _quantize_options(p)

    p = sub.add_parser("generate", help="continue a prompt with a model")
    common(p, temperature=0.0)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill the prompt in chunks of N tokens")
    p.add_argument("--json", action="store_true", help="print tokens, text, logprobs as one JSON object")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (PEFT layout) on top of --model")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("transcribe", help="transcribe speech with a Voxtral model")
    common(p, temperature=0.0, model_help="Voxtral checkpoint directory (consolidated or Hugging Face)")
    p.add_argument("audio", help="audio file (WAV, FLAC, OGG, MP3); resampled to 16 kHz if needed")
    p.add_argument("--language", default=None, help="language code, e.g. en (default: let the model tell)")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("chat", help="interactive chat with an instruct model")
    common(p, temperature=0.7)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--image", action="append", default=[],
                   help="image file for the first message (repeatable; needs a Pixtral / Mistral-3 checkpoint)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (PEFT layout) on top of --model")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, transcriptions)")
    p.add_argument("--model", required=True, help="checkpoint directory: text, Mixtral, Pixtral / Mistral 3 or "
                   "Voxtral (consolidated or Hugging Face); or a llama.cpp .gguf file of a Mistral / Mixtral "
                   "text model (dequantized at load; its mistral_common tokenizer file beside it)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (PEFT layout) on top of --model; its "
                   "DP ledger is shown at /v1/models")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the "
                   "--model folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but "
                   "/health (default: $TRAMONTANE_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-model-len", type=int, default=4096, help="prompt + completion tokens per request")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond that answer 429")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image URLs (off: only "
                   "data: URLs, so the server never fetches what a client names)")
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="default: the checkpoint's dtype")
    p.add_argument("--format", choices=_FORMATS, default=None, help=_FORMAT_HELP)
    _quantize_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("agent", help="a coding agent on a workspace, through any OpenAI-compatible endpoint",
                       description='tramontane agent --endpoint URL --workspace DIR "task text" (or --task FILE) '
                       "runs the agent on one task; tramontane agent eval --tasks DIR --endpoint URL --out DIR "
                       "scores it on a folder of tasks.")
    _agent_options(p)
    p.add_argument("--workspace", default=None, help="the folder the agent works in: the only one it can write")
    p.add_argument("--task", default=None, help="a file holding the task (instead of the task text)")
    p.add_argument("--trajectory", default=None, help="JSONL file the run is written to, step by step")
    p.add_argument("--resume", action="store_true", help="continue the run in --trajectory")
    p.set_defaults(func=cmd_agent, agent_command=None, task_text=None)
    agent_sub = p.add_subparsers(dest="agent_command", action=_TaskOrCommand, metavar='"task text" | eval')
    ev = agent_sub.add_parser("eval", help="run and score the agent on a folder of tasks (SWE-bench style)")
    _agent_options(ev, inherit=True)
    ev.add_argument("--tasks", default=None, help="folder of tasks (a repository snapshot, an issue, hidden "
                    "tests each; default: the tasks bundled with tramontane)")
    ev.add_argument("--out", default=None, help="results folder: predictions.jsonl (SWE-bench format), "
                    "results.json, trajectories/")
    ev.add_argument("--model-name", default=None, help="model_name_or_path in the predictions (default: the "
                    "model id)")
    ev.add_argument("--max-workers", type=int, default=1, help="tasks run at once")


class _TaskOrCommand(argparse._SubParsersAction):
    """`tramontane agent "task text"` and `tramontane agent eval ...` share the first positional: a word that
    names no subcommand is the task, and the options after it belong to `agent`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # any word passes argparse's check of choices: a subcommand's name, else the task text
        self.choices = None  # type: ignore[assignment]

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if values and values[0] not in self._name_parser_map:
            if getattr(namespace, "task_text", None) is not None:
                parser.error("give the task text once (quote it)")
            namespace.task_text = values[0]
            _, extra = parser.parse_known_args(list(values[1:]), namespace)
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            return
        super().__call__(parser, namespace, values, option_string)


def _agent_options(p: argparse.ArgumentParser, inherit: bool = False) -> None:
    """The options of `agent` and `agent eval`; with `inherit` (eval) an option left out keeps the value given
    before the subcommand (`tramontane agent --endpoint URL eval ...`)."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if inherit else value

    p.add_argument("--endpoint", default=default(None), help="base URL of an OpenAI-compatible API, e.g. "
                   "http://127.0.0.1:8000/v1 (tramontane serve, vLLM, a hosted API)")
    p.add_argument("--api-key", default=default(None), help="bearer key for the endpoint (default: "
                   "$TRAMONTANE_API_KEY, else none)")
    p.add_argument("--model", default=default(None), help="model id (default: the endpoint's first)")
    p.add_argument("--max-steps", type=int, default=default(50), help="model replies per task (default 50)")
    p.add_argument("--max-seconds", type=float, default=default(1800.0), help="wall-clock seconds per task "
                   "(default 1800)")
    p.add_argument("--max-total-tokens", type=int, default=default(None), help="prompt + completion tokens per "
                   "task")
    p.add_argument("--max-tokens", type=int, default=default(None), help="completion tokens per model call")
    p.add_argument("--context-tokens", type=int, default=default(None), help="the model's context: older tool "
                   "outputs are elided, then older turns dropped, to stay within it")
    p.add_argument("--temperature", type=float, default=default(0.0))
    p.add_argument("--request-timeout", type=float, default=default(600.0), help="seconds to wait for one model "
                   "call (default 600)")
    p.add_argument("--command-timeout", type=float, default=default(120.0), help="default wall-clock limit of "
                   "one command in the sandbox, seconds (default 120)")
    p.add_argument("--unsafe-no-sandbox", action="store_true", default=default(False), help="run commands "
                   "WITHOUT the bubblewrap sandbox, as you, with your files and network")


# -- privacy accounting -----------------------------------------------------------------------------------

def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def _show(value: Any) -> str:
    """A table cell: floats to 6 significant digits, anything else as str."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def cmd_account(args: argparse.Namespace) -> int:
    """epsilon from (q, sigma, S, delta), or sigma calibrated for (epsilon, delta, q, S)."""
    import warnings

    from tramontane import accounting
    from tramontane.accounting import events as check

    check.check_sample_rate(args.sample_rate, "--sample-rate")
    check.check_count(args.steps, "--steps")
    check.check_delta(args.delta, "--delta")
    if args.noise_multiplier is not None:
        check.check_noise_multiplier(args.noise_multiplier, "--noise-multiplier")
    if args.epsilon is not None:
        check.check_epsilon(args.epsilon, "--epsilon", positive=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.noise_multiplier is not None:
            if args.epsilon is not None:
                raise TramontaneError("give either --noise-multiplier (to get epsilon) or --epsilon (to get "
                                      "the noise multiplier), not both")
            result = accounting.tan_report(args.sample_rate, args.noise_multiplier, args.steps, args.delta,
                                           accountant=args.accountant).to_dict()
        elif args.epsilon is not None:
            cal = accounting.calibrate_noise_multiplier(args.epsilon, args.delta, args.sample_rate, args.steps,
                                                        accountant=args.accountant)
            e = accounting.eta(args.sample_rate, cal.noise_multiplier, args.steps)
            result = {"noise_multiplier": cal.noise_multiplier, "epsilon": cal.epsilon,
                      "target_epsilon": args.epsilon, "delta": args.delta, "accountant": cal.accountant,
                      "sample_rate": args.sample_rate, "steps": args.steps, "eta": e,
                      "epsilon_tan": accounting.eps_tan(e, args.delta)}
        else:
            raise TramontaneError("give --noise-multiplier SIGMA to get epsilon, or --epsilon E to calibrate sigma")
    notes = [str(w.message) for w in caught]
    if args.json:
        print(json.dumps({**result, "warnings": notes}))
    else:
        _print_table(f"privacy of a Poisson-sampled Gaussian mechanism ({result['accountant']} accountant)",
                     [(k, _show(v)) for k, v in result.items()])
        for note in notes:
            _stderr().print(f"[yellow]warning:[/yellow] {note}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """(batch, sigma) at constant TAN for a target budget, plus the non-private small-batch simulation."""
    import warnings

    from tramontane import accounting
    from tramontane.accounting import events as check

    if args.plan_command == "search":
        return cmd_plan_search(args)
    missing = [f"--{n.replace('_', '-')}" for n in ("dataset_size", "epsilon", "delta", "steps")
               if getattr(args, n) is None]
    if missing:
        raise TramontaneError(f"tramontane plan needs {', '.join(missing)} (or `tramontane plan search` to choose "
                              "the learning rate and steps)")
    check.check_count(args.dataset_size, "--dataset-size", minimum=1)
    check.check_epsilon(args.epsilon, "--epsilon", positive=True)
    check.check_delta(args.delta, "--delta")
    check.check_count(args.steps, "--steps", minimum=1)
    if args.reference_batch is not None:
        check.check_count(args.reference_batch, "--reference-batch", minimum=1)
    if args.simulated_batch is not None:
        check.check_count(args.simulated_batch, "--simulated-batch", minimum=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = accounting.plan_constant_tan(args.dataset_size, args.epsilon, args.delta, args.steps,
                                            batch_size_ref=args.reference_batch,
                                            simulated_batch_size=args.simulated_batch, accountant=args.accountant)
    result = plan.to_dict()
    notes = [str(w.message) for w in caught]
    if args.json:
        print(json.dumps({**result, "warnings": notes}))
    else:
        _print_table(f"private run at epsilon <= {args.epsilon}, delta = {args.delta}",
                     [(k, _show(v)) for k, v in result["private_run"].items()])
        if "simulation" in result:
            _print_table("simulation for hyper-parameter search (same TAN, NOT PRIVATE)",
                         [(k, _show(v)) for k, v in result["simulation"].items()])
        for note in notes:
            _stderr().print(f"[yellow]warning:[/yellow] {note}")
    return 0


def _number_list(text: str, kind: type[int | float], option: str) -> tuple[Any, ...]:
    """Comma-separated numbers of one kind (`--lr 1e-4,3e-4`)."""
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        example = "1e-4,3e-4,1e-3" if kind is float else "100,200"
        raise TramontaneError(f"{option} takes comma-separated {'whole ' if kind is int else ''}numbers, e.g. "
                              f"{example}; got {text!r}") from None


def cmd_plan_search(args: argparse.Namespace) -> int:
    """The constant-TAN search on the fine-tuning task: NOT private trials at a reduced batch, then the
    recommended private run (`training.search`, `finetune.search`)."""
    import shlex
    import warnings

    from rich.console import Console
    from rich.table import Table

    from tramontane.accounting import events as check
    from tramontane.finetune.lora import LoraConfig
    from tramontane.finetune.run import FinetuneConfig
    from tramontane.finetune.search import METRIC, FinetuneTask, finetune_arguments
    from tramontane.training.search import SearchConfig, Trial, search_constant_tan

    lrs, steps = _number_list(args.lr, float, "--lr"), _number_list(args.steps, int, "--steps")
    check.check_epsilon(args.epsilon, "--epsilon", positive=True)
    check.check_delta(args.delta, "--delta")
    _check_output(args.out, "--out", "file", args.overwrite)
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    quant = _quantize(args)
    settings = FinetuneConfig(
        method=args.method, lora=LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha or 2 * args.lora_rank,
                                            dropout=args.lora_dropout, targets=targets),
        base_dtype=args.base_dtype, quantize=quant.mode if quant else None,
        quant_group_size=quant.group_size if quant else None, quantize_head=bool(quant and quant.output),
        private=False, delta=args.delta,
        accountant=args.accountant,
        privacy_unit=args.privacy_unit, max_examples_per_user=args.max_examples_per_user,
        max_grad_norm=args.max_grad_norm, max_len=args.max_len, packing=args.packing,
        micro_batch_size=args.micro_batch_size, seed=args.seed)
    task = FinetuneTask(args.model, args.data, args.eval, settings)
    err = _stderr()
    err.print("[bold]NOT PRIVATE:[/bold] the search's trials train on --data without differential privacy; use "
              "public or proxy data, or keep the results with the data holder")
    units = task.dataset_size()
    config = SearchConfig(target_epsilon=args.epsilon, delta=args.delta, dataset_size=units, learning_rates=lrs,
                          steps=steps, reference_batch_size=args.reference_batch,
                          simulated_batch_size=args.simulated_batch, accountant=args.accountant,
                          repeats=args.repeats, seed=args.seed, metric=METRIC, workers=args.workers,
                          threads_per_worker=args.threads_per_worker, backend=args.backend)

    def progress(trial: Trial, done: int, total: int) -> None:
        err.print(f"trial {done}/{total} (not private): lr {trial.lr:g}, {trial.steps} steps at batch "
                  f"{trial.batch_size}, sigma {trial.noise_multiplier:.4g} -> {METRIC} {trial.metric:.4g}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = search_constant_tan(task, config, out=args.out, on_trial=progress)
    notes = [str(w.message) for w in caught]
    rec = result.recommendation
    command = ["tramontane", "finetune", "--model", args.model, "--data", args.data, "--eval", args.eval,
               "--epsilon", f"{args.epsilon:g}", "--delta", f"{args.delta:g}", "--batch-size", str(rec.batch_size),
               "--steps", str(rec.steps), "--lr", f"{rec.lr:g}", *finetune_arguments(settings), "--out", "RUN"]
    if args.json:
        print(json.dumps({**result.to_dict(), "command": shlex.join(command), "warnings": notes}))
        return 0
    table = Table(title=f"trials (NOT PRIVATE: simulations at the private runs' TAN, {config.repeats} run(s) "
                        "each), best first")
    for column in ("rank", "lr", "steps", "batch", "noise multiplier", METRIC, "seconds"):
        table.add_column(column, justify="right")
    for rank, trial in enumerate(result.trials, 1):
        table.add_row(str(rank), f"{trial.lr:g}", str(trial.steps), str(trial.batch_size),
                      f"{trial.noise_multiplier:.4g}", f"{trial.metric:.6g}", f"{trial.seconds:.1f}")
    Console().print(table)
    rows = {k: v for k, v in rec.to_dict().items() if k not in ("private", "simulated_metric_label")}
    _print_table(f"recommended private run at epsilon <= {args.epsilon:g}, delta = {args.delta:g}",
                 [(k if k != "simulated_metric" else f"simulated {METRIC} (not private)", _show(v))
                  for k, v in rows.items()])
    print(shlex.join(command))
    if args.out:
        err.print(f"trials and recommendation (not private, for the data holder): {args.out}")
    for note in notes:
        err.print(f"[yellow]warning:[/yellow] {note}")
    return 0


def _add_accounting_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("account", help="epsilon of a DP-SGD run, or the noise multiplier for a target epsilon")
    p.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q = batch / N")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--delta", type=float, required=True)
    p.add_argument("--noise-multiplier", type=float, default=None, help="sigma: prints epsilon")
    p.add_argument("--epsilon", type=float, default=None, help="target epsilon: prints the calibrated sigma")
    p.add_argument("--accountant", choices=["rdp", "pld"], default="rdp",
                   help="pld is tighter and slower, and refuses compositions over 1e7 grid points (about 1e7 "
                   "steps at q=0.01, sigma=1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_account)

    p = sub.add_parser("plan", help="batch size and noise at constant TAN for a target budget")
    p.add_argument("--dataset-size", type=int, default=None, help="required")
    p.add_argument("--epsilon", type=float, default=None, help="required")
    p.add_argument("--delta", type=float, default=None, help="required")
    p.add_argument("--steps", type=int, default=None, help="required")
    p.add_argument("--reference-batch", type=int, default=None, help="batch size of the private run")
    p.add_argument("--simulated-batch", type=int, default=128, help="batch size of the non-private simulation")
    p.add_argument("--accountant", choices=["rdp", "pld"], default="rdp")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan, plan_command=None)
    plan_sub = p.add_subparsers(dest="plan_command")
    _add_plan_search_command(plan_sub)


def _add_plan_search_command(plan_sub: argparse._SubParsersAction) -> None:
    s = plan_sub.add_parser(
        "search", help="choose the learning rate and steps of a DP fine-tuning run (`tramontane finetune`) from "
        "trials at a small batch with the private run's TAN (NOT private: public or proxy data)",
        description="Hyper-parameter search at constant TAN (Sander et al., arXiv 2210.03403): every (lr, steps) "
        "of the grid is a short fine-tuning run at a reduced batch with sigma scaled to keep sigma / batch, and "
        "so the total amount of noise, of the private run; the best one is recommended as the private run. The "
        "trials are NOT differentially private: run them on public or proxy data, or keep their results with "
        "the data holder.")
    s.add_argument("--model", required=True, help="base checkpoint directory or llama.cpp .gguf file (as for "
                   "`tramontane finetune`)")
    s.add_argument("--data", required=True, help="training JSONL (chats or texts): public or proxy data")
    s.add_argument("--eval", required=True, help="held-out JSONL: the metric is its mean token loss")
    s.add_argument("--epsilon", type=float, required=True, help="the private run's budget")
    s.add_argument("--delta", type=float, default=1e-6)
    s.add_argument("--lr", required=True, help="learning rates to try, comma-separated (e.g. 1e-3,2e-3,4e-3)")
    s.add_argument("--steps", required=True, help="step counts to try, comma-separated (e.g. 50,100,200)")
    s.add_argument("--reference-batch", type=int, default=None, help="expected batch of the private run "
                   "(default: the TAN rule's for each step count)")
    s.add_argument("--simulated-batch", type=int, default=None, help="batch of the trials (default: 128, or "
                   "the number of units / 16 when smaller)")
    s.add_argument("--accountant", choices=["rdp", "pld"], default="rdp")
    s.add_argument("--repeats", type=int, default=1, help="runs per grid point, with shared seeds")
    s.add_argument("--workers", type=int, default=1, help="trials run at once, each in its own process")
    s.add_argument("--threads-per-worker", type=int, default=None, help="default: the CPUs shared among workers")
    s.add_argument("--backend", choices=["processes", "ray"], default="processes",
                   help="ray: Ray Tune runs the trials (pip install 'ray[tune]')")
    s.add_argument("--seed", type=int, default=0, help="the trials' seeds (initialisation, sampling, noise)")
    s.add_argument("--out", default=None, help="JSON of every trial and the recommendation (not private)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.add_argument("--json", action="store_true")
    s.add_argument("--method", choices=("lora", "full"), default="lora")
    s.add_argument("--lora-rank", type=int, default=8)
    s.add_argument("--lora-alpha", type=float, default=None, help="default: twice the rank")
    s.add_argument("--lora-dropout", type=float, default=0.0)
    s.add_argument("--lora-targets", default="attention")
    s.add_argument("--base-dtype", choices=("bfloat16", "float16"), default=None)
    _base_quantize_options(s)
    s.add_argument("--privacy-unit", choices=("example", "user"), default="example")
    s.add_argument("--max-examples-per-user", type=int, default=16)
    s.add_argument("--max-grad-norm", type=float, default=1.0)
    s.add_argument("--max-len", type=int, default=512)
    s.add_argument("--packing", choices=("truncate", "split", "pack"), default="truncate")
    s.add_argument("--micro-batch-size", type=int, default=8)


# -- synthetic data ---------------------------------------------------------------------------------------

def _probe_writable(directory: Path, option: str) -> None:
    """Create and remove a file in the nearest existing ancestor of `directory`: the real permission test
    (access() misses immutable folders and read-only mounts), done before anything private is read."""
    import tempfile

    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise TramontaneError(f"{option} {directory}: {probe} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".tramontane-probe-"):
            pass
    except OSError as err:
        raise TramontaneError(f"{option} {directory}: cannot write in {probe} ({err.strerror}); choose "
                              "another location") from None


def _check_output(path: str | None, option: str, kind: str, overwrite: bool) -> None:
    """Refuse an output that would destroy something (unless --overwrite) or cannot be written."""
    if path is None:
        return
    target = Path(path)
    if kind == "file":
        if target.is_dir():
            raise TramontaneError(f"{option} {path} is a folder: give a file name, e.g. {target / 'out.csv'}")
        if target.exists() and not overwrite:
            raise TramontaneError(f"{option} {path} already exists: choose a new name, or pass --overwrite to "
                                  "replace it")
        _probe_writable(target.parent, option)
        return
    if target.exists() and not target.is_dir():
        raise TramontaneError(f"{option} {path} is a file, not a folder: give a folder name")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise TramontaneError(f"{option} {path} already exists and is not empty: choose a new folder, or pass "
                              "--overwrite to replace it")
    _probe_writable(target if target.is_dir() else target.parent, option)


class _Progress:
    """A rich progress bar on stderr fed by the trainer's per-step callback."""

    def __init__(self, description: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=_stderr())
        self.description = description
        self.task: TaskID | None = None

    def __enter__(self) -> "_Progress":
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.progress.__exit__(exc_type, exc, traceback)

    def __call__(self, step: int, total: int, info: dict[str, float]) -> None:
        text = f"held-out NLL {info['eval_loss']:.2f}" if "eval_loss" in info else ""
        if self.task is None:
            self.task = self.progress.add_task(self.description, total=total, info=text)
        self.progress.update(self.task, completed=step, info=text or self.progress.tasks[0].fields["info"])


def _fit_synthesizer(args: argparse.Namespace) -> tuple[Synthesizer, pd.DataFrame, pd.DataFrame | None]:
    from tramontane import datasets
    from tramontane.synth.synthesizer import SynthConfig, Synthesizer

    # Arguments first: nothing private is read before every option has been checked.
    if getattr(args, "rows", None) is not None and args.rows < 0:
        raise TramontaneError(f"--rows must be >= 0, got {args.rows}")
    if args.checkpoint_every < 1:
        raise TramontaneError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.resume is not None and args.run_dir is not None:
        raise TramontaneError("give --run-dir DIR to start a run that can be resumed, or --resume DIR to "
                              "continue one, not both")
    if args.resume is not None and not (Path(args.resume) / "plan.json").is_file():
        raise TramontaneError(f"--resume {args.resume}: nothing to resume there (no plan.json); start the run "
                              "with --run-dir")
    _check_output(args.run_dir, "--run-dir", "folder", False)
    config = SynthConfig.fast() if args.fast else SynthConfig()
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps)
    if args.accountant is not None:
        config = dataclasses.replace(config, accountant=args.accountant)
    schema = datasets.schema_for(args.data, args.schema)
    synth = Synthesizer(schema, epsilon=args.epsilon, delta=args.delta, config=config, seed=args.seed,
                        allow_non_private_schema=args.allow_non_private_schema)
    train = datasets.read_table(args.data, schema)
    test = datasets.read_table(args.test, schema) if args.test else None
    target = getattr(args, "target", None)
    if getattr(args, "report", None) and target is not None and target not in train.columns:
        raise TramontaneError(f"--target {target!r} is not a column of {args.data} (its columns: "
                              f"{', '.join(map(str, train.columns))}); nothing was spent")
    err = _stderr()
    # Lines on stderr are listed in tramontane.synth.release: none quotes the exact number of rows.
    err.print(f"training a DP synthesizer at epsilon={args.epsilon}, delta={args.delta}"
              + (" (fast configuration)" if args.fast else ""))
    run_dir = args.resume or args.run_dir
    try:
        with _Progress("DP-SGD") as progress:
            synth.fit(train, test=test, on_step=progress, run_dir=run_dir,
                      checkpoint_every=args.checkpoint_every)
    except KeyboardInterrupt:
        if len(synth.ledger):
            spent = synth.statement  # of the ledger so far
            err.print(f"interrupted: spent epsilon {spent.epsilon_rdp:.3f} (RDP) at delta {args.delta:g} on "
                      "the data so far; it counts against the data's budget")
        else:
            err.print("interrupted before anything was spent")
        if run_dir is not None:
            err.print(f"interrupted: continue from the last checkpoint with --resume {run_dir}")
        raise
    s, spent = synth.summary, synth.statement
    assert s is not None  # fit() wrote it
    err.print(f"trained on about {s.rows_dp} rows (a DP count, noise std {s.row_count_noise:g}): "
              f"{s.steps} steps at sample rate {s.sample_rate:.4g} (expected batch {s.batch_size}), "
              f"sigma {s.noise_multiplier:.3f}")
    err.print(f"spent epsilon {spent.epsilon_rdp:.3f} (RDP) / {spent.epsilon_pld:.3f} (PLD) at delta "
              f"{spent.delta:g} of the target {spent.target_epsilon:g}")
    if s.delta * s.rows_dp > 1:
        err.print(f"[yellow]warning:[/yellow] delta {s.delta:g} is above 1 / rows (about 1/{s.rows_dp}): at that "
                  "delta a mechanism may publish some row outright; choose --delta well below 1 / rows")
    return synth, train, test


def _write_report(synth: Synthesizer, train: pd.DataFrame, synthetic: pd.DataFrame, test: pd.DataFrame | None,
                  target: str | None, directory: str) -> None:
    from tramontane.report.privacy_report import write_reports

    paths = write_reports(directory, synth, train, synthetic, test, target)
    err = _stderr()
    err.print(f"release (shareable): {paths.release_html}")
    if paths.evaluation_html is not None:
        assert paths.evaluation_json is not None  # the two are written together
        err.print(f"evaluation (data holder only, do not publish): {paths.evaluation_html}")
        line = _utility_line(json.loads(paths.evaluation_json.read_text())["utility"])
        err.print(f"utility (data holder only, not DP): {line}")


def _utility_line(u: dict) -> str:
    """One line of the holder's evaluation: 3-way marginal TVD (against real held-out rows' own), and the
    gradient-boosting ROC AUC trained on synthetic against trained on real."""
    ref = (u.get("tvd_real_test_vs_train") or {}).get("3-way")
    parts = [f"3-way marginal TVD {u['tvd']['3-way']:.4f}" + (f" (real held-out rows: {ref:.4f})" if ref else "")]
    ml = u.get("ml_efficacy")
    if ml:
        auc = {sc["trained_on"]: sc["roc_auc"] for sc in ml["scores"] if sc["model"] == "hist_gbdt"}
        if "synthetic" in auc:
            parts.append(f"HistGradientBoosting ROC AUC on real test {auc['synthetic']:.3f} trained on synthetic"
                         + (f", {auc['real']:.3f} trained on real" if "real" in auc else ""))
    return "; ".join(parts)


def cmd_synth(args: argparse.Namespace) -> int:
    """Fit, sample and report in one go (or `synth fit` / `synth sample`)."""
    from tramontane.files import write_csv_atomic

    if args.synth_command == "sample":
        return cmd_synth_sample(args)
    for name in ("data", "epsilon"):
        if getattr(args, name) is None:
            raise TramontaneError(f"tramontane synth needs --{name}")
    first = _join_torchrun()
    if args.synth_command == "fit":
        _check_output(args.out_model, "--out-model", "folder", args.overwrite)
        synth, _, _ = _fit_synthesizer(args)
        if not first:
            return 0
        synth.save(args.out_model, overwrite=args.overwrite)
        _stderr().print(f"saved the synthesizer (model, schema, privacy ledger) to {args.out_model}")
        return 0
    if args.out is None:
        raise TramontaneError("tramontane synth needs --out synthetic.csv")
    _check_output(args.out, "--out", "file", args.overwrite)
    _check_output(args.save_model, "--save-model", "folder", args.overwrite)
    _check_output(args.report, "--report", "folder", args.overwrite)
    synth, train, test = _fit_synthesizer(args)
    if not first:
        return 0
    assert synth.summary is not None  # fit() wrote it
    rows = args.rows if args.rows is not None else synth.summary.rows_dp  # N itself is not public
    synthetic = synth.sample(rows, seed=args.seed)
    write_csv_atomic(synthetic, args.out)  # shareable: the umask's usual 0644
    _stderr().print(f"wrote {rows} synthetic rows to {args.out}")
    if args.save_model:
        synth.save(args.save_model, overwrite=args.overwrite)
        _stderr().print(f"saved the synthesizer (model, schema, privacy ledger) to {args.save_model}")
    if args.report:
        _write_report(synth, train, synthetic, test, args.target, args.report)
    return 0


def cmd_synth_sample(args: argparse.Namespace) -> int:
    from tramontane.files import write_csv_atomic
    from tramontane.synth.synthesizer import Synthesizer

    if args.model is None or args.rows is None or args.out is None:
        raise TramontaneError("tramontane synth sample needs --model DIR --rows N --out synthetic.csv")
    if args.rows < 0:
        raise TramontaneError(f"--rows must be >= 0, got {args.rows}")
    _check_output(args.out, "--out", "file", args.overwrite)
    synth = Synthesizer.load(args.model)
    synthetic = synth.sample(args.rows, seed=args.seed)
    write_csv_atomic(synthetic, args.out)  # shareable: the umask's usual 0644
    spent = synth.statement
    _stderr().print(f"wrote {args.rows} rows to {args.out} (the model is ({spent.epsilon_rdp:.3f}, {spent.delta})-DP; "
                    "sampling spends nothing more)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tramontane import datasets
    from tramontane.report.utility import evaluate_synthetic, numbers_as_floats
    from tramontane.synth.dp_schema import evaluation_schema

    schema = datasets.schema_for(args.real_train, args.schema)
    train = datasets.read_table(args.real_train, schema)
    if args.target is not None and args.target not in train.columns:
        raise TramontaneError(f"--target {args.target!r} is not a column of --real-train; columns: "
                              f"{list(train.columns)}")
    test = datasets.read_table(args.real_test, schema) if args.real_test else None
    synthetic = datasets.read_table(args.synthetic, schema)
    if schema is None:  # evaluation only: a schema read off the real table is never released
        schema = evaluation_schema(train)
    # Numbers as numbers whatever dtype the CSV was read with; infinities and NaN refused, as fitting does.
    train = numbers_as_floats(train, schema, "--real-train")
    synthetic = numbers_as_floats(synthetic, schema, "--synthetic")
    test = numbers_as_floats(test, schema, "--real-test") if test is not None else None
    if args.target is not None and test is None:
        _stderr().print("note: --target needs --real-test (train on synthetic, test on real): no ML efficacy")
    result = evaluate_synthetic(train, synthetic, schema, test, args.target)
    if args.json:
        print(json.dumps(result, default=float))
    else:
        rows = [(f"TVD {k}", f"{v:.4f}") for k, v in result["tvd"].items()]
        rows.append(("exact copies of training rows", f"{result['exact_match_share']:.4f}"))
        for model, d in result.get("ml_efficacy", {}).get("scores", {}).items():
            for src, sc in d.items():
                auc = "n/a (not binary)" if sc["roc_auc"] is None else f"{sc['roc_auc']:.4f}"
                rows.append((f"{model} trained on {src}", f"acc {sc['accuracy']:.4f}  AUC {auc}"))
        _print_table("utility of the synthetic table (not covered by DP: it reads the real rows)", rows)
    return 0


def cmd_schema_init(args: argparse.Namespace) -> int:
    """Draft a public schema from the header of --data and the declared kinds: no row is read."""
    from tramontane.files import write_atomic
    from tramontane.synth.schema_draft import draft_from_csv, draft_json, parse_range, todo_columns

    _check_output(args.out, "--out", "file", args.overwrite)
    draft = draft_from_csv(args.data, categorical=args.categorical, integer=args.integer, floats=args.float,
                           ranges=dict(parse_range(r) for r in args.range))
    write_atomic(args.out, draft_json(draft))
    todo = todo_columns(draft)
    err = _stderr()
    err.print(f"wrote a draft schema of {len(draft['columns'])} columns to {args.out} (from the header only)")
    if todo:
        err.print(f"to fill in from public knowledge, never from the rows ('todo' in each): {', '.join(todo)}; "
                  "then delete the 'todo' keys and pass the file with --schema")
    else:
        err.print("every column is complete: review it, then pass it with --schema")
    return 0


def _add_synth_commands(sub: argparse._SubParsersAction) -> None:
    def fit_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", help="training table (CSV), or a bundled table: 'adult' (UCI Adult), "
                       "'cps1988' (CPS 1988 wages)")
        p.add_argument("--schema", default=None, help="public schema JSON/YAML (default: inferred with DP)")
        p.add_argument("--epsilon", type=float, default=None)
        p.add_argument("--delta", type=float, default=1e-5)
        p.add_argument("--test", default=None, help="held-out real table for the learning curve and utility")
        p.add_argument("--fast", action="store_true", help="smaller model, fewer steps (quick, lower utility)")
        p.add_argument("--steps", type=int, default=None, help="override the number of DP-SGD steps")
        p.add_argument("--accountant", choices=["rdp", "pld"], default=None,
                       help="the accountant that calibrates the noise (default: pld, the tighter; rdp is "
                            "faster to calibrate at large epsilon)")
        p.add_argument("--seed", type=int, default=None, help="reproducible initialisation and sampling "
                       "(the DP noise stays securely random)")
        p.add_argument("--allow-non-private-schema", action="store_true",
                       help="infer the schema without DP (NOT private; the report says so)")
        p.add_argument("--run-dir", default=None, help="folder for checkpoints (the data holder's: it holds a "
                       "fingerprint of the table); an interrupted fit continues with --resume DIR")
        p.add_argument("--resume", default=None, metavar="DIR", help="continue the fit whose --run-dir was DIR "
                       "(same options and data): nothing is spent again")
        p.add_argument("--checkpoint-every", type=int, default=10, help="DP-SGD steps between checkpoints")

    p = sub.add_parser("synth", help="DP synthetic data: fit a private LM on a table, sample, report")
    fit_options(p)
    p.add_argument("--out", default=None, help="synthetic CSV to write")
    p.add_argument("--rows", type=int, default=None, help="rows to sample (default: as many as the input)")
    p.add_argument("--report", default=None, help="folder for the reports: release/ (shareable) and "
                   "holder-only/ (utility against the real rows: do not publish)")
    p.add_argument("--target", default=None, help="label column for train-on-synthetic, test-on-real")
    p.add_argument("--save-model", default=None, help="also save the fitted synthesizer here")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (refused otherwise)")
    p.set_defaults(func=cmd_synth, synth_command=None, model=None)
    synth_sub = p.add_subparsers(dest="synth_command")
    fit = synth_sub.add_parser("fit", help="fit and save a synthesizer")
    fit_options(fit)
    fit.add_argument("--out-model", required=True, help="directory to save the synthesizer to")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing --out-model folder")
    sample = synth_sub.add_parser("sample", help="sample from a saved synthesizer")
    sample.add_argument("--model", required=True, help="a directory written by `synth fit`")
    sample.add_argument("--rows", type=int, required=True)
    sample.add_argument("--out", required=True)
    sample.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    sample.add_argument("--seed", type=int, default=None)

    p = sub.add_parser("schema", help="draft a public schema from a CSV header (no row is read)")
    schema_sub = p.add_subparsers(dest="schema_command", required=True)
    init = schema_sub.add_parser(
        "init", help="write a draft schema from the header and the kinds you declare, to review and fill in")
    init.add_argument("--data", required=True, help="CSV file: only its header line is read")
    init.add_argument("--out", required=True, help="schema JSON to write")
    for kind, flag in (("categorical", "--categorical"), ("integer", "--integer"), ("float", "--float")):
        init.add_argument(flag, action="append", default=[], metavar="COLS",
                          help=f"{kind} columns, comma-separated (repeatable; a name holding a comma: alone)")
    init.add_argument("--range", action="append", default=[], metavar="NAME=LO:HI",
                      help="public range of a numeric column, e.g. age=0:120 (repeatable)")
    init.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    init.set_defaults(func=cmd_schema_init)

    p = sub.add_parser("evaluate", help="utility of a synthetic table against the real one")
    p.add_argument("--real-train", required=True)
    p.add_argument("--real-test", default=None)
    p.add_argument("--synthetic", required=True)
    p.add_argument("--target", default=None)
    p.add_argument("--schema", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)


# -- privacy measurement: bounds and audits -----------------------------------------------------------------

def cmd_bounds(args: argparse.Namespace) -> int:
    """What a DP-SGD setting or a saved ledger means: MI advantage, confidence and reconstruction bounds."""
    from tramontane.accounting import DpSgdEvent, PrivacyLedger
    from tramontane.accounting import events as check
    from tramontane.audit.card import ledger_bounds, read_ledger

    for value, option, validate in ((args.sample_rate, "--sample-rate", check.check_sample_rate),
                                    (args.noise_multiplier, "--noise-multiplier", check.check_noise_multiplier),
                                    (args.steps, "--steps", check.check_count),
                                    (args.delta, "--delta", check.check_delta)):
        if value is not None:
            validate(value, option)
    if args.values is not None:
        check.check_count(args.values, "--values", minimum=1)
    setting = (args.sample_rate, args.noise_multiplier, args.steps)
    if args.ledger is not None:
        if any(v is not None for v in setting):
            raise TramontaneError("give either --ledger or --sample-rate/--noise-multiplier/--steps, "
                                  "not both")
        ledger, saved_delta = read_ledger(args.ledger)
    elif all(v is not None for v in setting):
        ledger, saved_delta = PrivacyLedger([DpSgdEvent(*setting)]), None
    else:
        raise TramontaneError("give --sample-rate Q --noise-multiplier SIGMA --steps S, or --ledger FILE")
    delta = args.delta if args.delta is not None else saved_delta if saved_delta is not None else 1e-5
    result = ledger_bounds(ledger, delta, args.values)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table("what the privacy guarantee means (tramontane.audit)",
                     [(k, _show(v)) for k, v in result.items()])
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """CANIFE and membership inference on a saved synthesizer, beside its theoretical bounds.

    Progress per phase goes to stderr (bars on a terminal, else a line per tenth of a phase or 15 s), each
    with a time estimate. Ctrl-C writes what was measured so far to --out, marked partial, and exits 130.
    """
    from tramontane import datasets
    from tramontane.audit.card import privacy_card
    from tramontane.audit.synth_audit import (
        PHASES,
        AuditConfig,
        AuditInterrupted,
        audit_synthesizer,
        rows_note,
        write_audit_files,
        write_partial_audit,
    )
    from tramontane.synth.synthesizer import Synthesizer

    err = _stderr()
    config = AuditConfig(rounds=args.rounds, canary=args.canary, design_pool=args.design_pool,
                         craft_steps=args.craft_steps, membership_rows=args.membership_rows,
                         shadows=args.shadows, seed=args.seed)
    if args.out is not None:
        _probe_writable(Path(args.out), "--out")  # before minutes of work, not after (refuses a file)
    try:
        synth = Synthesizer.load(args.model)
        # Not checked against the schema here: the audit prepares the rows exactly as the fit did.
        data = datasets.read_table(args.data)
        holdout_path = args.holdout or datasets.default_holdout(args.data)
        holdout = datasets.read_table(holdout_path) if holdout_path else None
    except KeyboardInterrupt:
        err.print("interrupted before the audit started: nothing measured, nothing written")
        return 130
    note = rows_note(synth)
    if note:
        err.print(f"note: {note}")
    if synth.summary is not None:
        err.print(f"each replayed round is one DP-SGD step of about {synth.summary.batch_size} rows (the "
                  "fit's expected batch), about as long as one training step")

    bars: Progress | None = None
    tasks: dict[str, TaskID] = {}
    started: dict[str, float] = {}
    last: dict[str, tuple[int, float]] = {}  # phase -> (done, time) when last printed
    order: list[str] = []
    if err.is_terminal:
        from rich import progress as rp

        bars = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                           rp.TimeElapsedColumn(), rp.TextColumn("left"), rp.TimeRemainingColumn(),
                           console=err)

    def begin(phase: str, now: float) -> None:  # a phase starts when the one before it ends
        started[phase] = now
        if bars is not None:
            bars.start_task(tasks[phase])

    def progress(phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if phase not in order:  # the plan, announced in order before any work (done = 0)
            order.append(phase)
            if bars is not None:
                tasks[phase] = bars.add_task(PHASES[phase], total=total, start=False)
            else:
                err.print(f"{PHASES[phase]}: {total} to do")
            if len(order) == 1:
                begin(phase, now)
            return
        if phase not in started:
            begin(phase, now)
        if done >= total and order.index(phase) + 1 < len(order):
            following = order[order.index(phase) + 1]
            if following not in started:
                begin(following, now)
        if bars is not None:
            bars.update(tasks[phase], completed=done, total=total)
            return
        tenth = max(1, total // 10)
        seen, shown = last.get(phase, (0, started[phase]))
        if done >= total or done // tenth > seen // tenth or now - shown >= 15:  # a tenth, or 15 s
            last[phase] = (done, now)
            spent = now - started[phase]
            left = spent / done * (total - done)
            err.print(f"{PHASES[phase]}: {done}/{total}, {spent:.0f} s"
                      + (f", about {left:.0f} s left" if done < total else " (done)"))

    try:
        if bars is not None:
            with bars:
                audit = audit_synthesizer(synth, data, holdout, config, progress)
        else:
            audit = audit_synthesizer(synth, data, holdout, config, progress)
    except AuditInterrupted as stop:
        partial = stop.partial
        done = f"after {partial['rounds_replayed']} of {partial['rounds_planned']} rounds"
        if args.out is None:
            err.print(f"interrupted during {PHASES[stop.phase]} {done}: nothing written (no --out)")
            return 130
        card = privacy_card(synth.statement, schema=synth.schema, audit=partial.get("summary"))
        path = write_partial_audit(args.out, card, partial)
        err.print(f"interrupted during {PHASES[stop.phase]} {done}: partial results written to {path}")
        return 130
    except KeyboardInterrupt:  # while the rows were being prepared: nothing measured yet
        err.print("interrupted before the audit started: nothing measured, nothing written")
        return 130
    card = privacy_card(synth.statement, schema=synth.schema, audit=audit)
    if args.out:
        for path in write_audit_files(args.out, card, audit):
            err.print(f"wrote {path}")
    if args.json:
        print(json.dumps({"card": card, "audit": audit.to_dict()}, default=float))
    else:
        _print_table(f"privacy report card of {args.model}", [(k, _show(v)) for k, v in card.items()])
        s, e = audit.step, audit.step.estimate
        _print_table("CANIFE, one replayed DP-SGD step", [
            ("canary", s.canary),
            ("expected signal (1 = ideal canary)", _show(audit.canary_expected_signal)),
            ("measured signal", _show(s.signal)),
            ("empirical epsilon",
             f"{_show(e.epsilon)} [{_show(e.low)}, {_show(e.high)}] at delta {e.delta:.3g}"),
            ("theoretical epsilon (one Gaussian step)",
             f"{_show(s.theoretical_epsilon)} at delta {s.delta:.3g}")])
        if audit.membership is not None:
            m = audit.membership
            _print_table("loss-threshold membership attack (training vs held-out rows)",
                         [("AUC", _show(m.auc)), ("advantage", _show(m.advantage)),
                          *[(f"TPR at FPR {k}", _show(v)) for k, v in m.tpr_at_fpr.items()]])
    return 0


def _add_audit_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bounds", help="membership-inference and reconstruction bounds of a DP-SGD run or "
                       "a ledger")
    p.add_argument("--sample-rate", type=float, default=None, help="Poisson sampling rate q = batch / N")
    p.add_argument("--noise-multiplier", type=float, default=None, help="sigma")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--ledger", default=None, help="a privacy ledger JSON file or a saved synthesizer "
                   "directory")
    p.add_argument("--delta", type=float, default=None, help="default: the saved one, else 1e-5")
    p.add_argument("--values", type=int, default=None,
                   help="M: bound the chance of reconstructing a value drawn uniformly from M")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bounds)

    p = sub.add_parser("audit", help="empirical privacy audit (CANIFE, membership inference) of a "
                       "synthesizer")
    p.add_argument("--model", required=True, help="a directory written by `synth fit` / `--save-model`")
    p.add_argument("--data", required=True, help="the training table (CSV), or 'adult' / 'cps1988'")
    p.add_argument("--holdout", default=None, help="held-out rows for membership inference (default for "
                   "a bundled table: its test split, e.g. adult-test)")
    p.add_argument("--rounds", type=int, default=None,
                   help="replayed DP-SGD steps, half with the canary, each about one training step. Default: "
                   "about 120,000 example gradients in all, 14 to 100 rounds (14 for all of Adult: a few "
                   "minutes on 2 cores). Power (ideal canary, sigma 2): at 14 rounds the 95%% interval is "
                   "typically [0, 5.3] and its lower end is above 0 in 1%% of correct runs but in 100%% of "
                   "runs without noise (a gross-failure check only); at 100 rounds [0, 6.2], and the lower "
                   "end passes the one-step theory in 88%% of runs whose noise is 4x too small")
    p.add_argument("--canary", choices=["input", "gradient"], default="input",
                   help="input: a crafted table row (weaker, a real row); gradient: the ideal canary")
    p.add_argument("--design-pool", type=int, default=32, help="rows the canary is crafted against")
    p.add_argument("--craft-steps", type=int, default=30, help="optimisation steps of the input canary "
                   "(a second or two each on 2 cores, whatever the table's size)")
    p.add_argument("--membership-rows", type=int, default=2000,
                   help="members and as many held-out rows for the loss attack (forward passes only): 2000 "
                   "+ 2000 put the AUC's standard error near 0.01")
    p.add_argument("--shadows", type=int, default=0, help="LiRA shadow synthesizers (each a full fit on "
                   "2 x membership-rows rows: minutes each)")
    p.add_argument("--seed", type=int, default=0, help="seeds the audit's batches, noise and crafting")
    p.add_argument("--out", default=None, help="directory for audit.json and the plots")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)


# -- entry point -------------------------------------------------------------------------------------------

# -- private fine-tuning ----------------------------------------------------------------------------------

def cmd_finetune(args: argparse.Namespace) -> int:
    """DP fine-tuning of a checkpoint on a JSONL of chats or text (`finetune.run`), or `finetune merge`."""
    from tramontane.finetune.lora import LoraConfig
    from tramontane.finetune.run import FinetuneConfig, finetune

    if args.finetune_command == "merge":
        return cmd_finetune_merge(args)
    for name in ("model", "data", "out"):
        if getattr(args, name) is None:
            raise TramontaneError(f"tramontane finetune needs --{name}")
    if args.epsilon is None and not args.non_private:
        raise TramontaneError("tramontane finetune needs --epsilon (the privacy budget), or --non-private to "
                              "train without differential privacy")
    if args.epsilon is not None and args.non_private:
        raise TramontaneError("--non-private trains without differential privacy: leave --epsilon out")
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    quant = _quantize(args)
    config = FinetuneConfig(
        method=args.method, lora=LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha or 2 * args.lora_rank,
                                            dropout=args.lora_dropout, targets=targets),
        base_dtype=args.base_dtype, quantize=quant.mode if quant else None,
        quant_group_size=quant.group_size if quant else None, quantize_head=bool(quant and quant.output),
        private=not args.non_private, epsilon=args.epsilon,
        delta=None if args.non_private else args.delta, privacy_unit=args.privacy_unit,
        max_examples_per_user=args.max_examples_per_user, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size, noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm,
        lr=args.lr, max_len=args.max_len, packing=args.packing, micro_batch_size=args.micro_batch_size,
        checkpoint_every=args.checkpoint_every, seed=args.seed, canaries=args.canaries,
        canary_repetitions=tuple(int(r) for r in args.canary_repetitions.split(",")),
        eval_every=args.eval_every)
    first = _join_torchrun()
    err = _stderr()
    try:
        with _Progress("DP-SGD" if config.private else "training") as progress:
            result = finetune(args.model, args.data, args.out, config, eval_data=args.eval,
                              init_adapter=args.adapter, resume=args.resume, on_step=progress,
                              on_phase=lambda text: err.print(text))
    except KeyboardInterrupt:
        err.print(f"interrupted: the checkpoints in {Path(args.out) / 'run'} carry the ledger of every step taken; "
                  "continue with the same command and --resume")
        raise
    if not first:
        return 0
    if result.statement is not None:
        s = result.statement
        err.print(f"privacy: epsilon {s.epsilon_rdp:.4g} (RDP) / {s.epsilon_pld:.4g} (PLD) at delta {s.delta:g}, "
                  f"per {config.privacy_unit}; the ledger is in {result.weights_dir}")
    else:
        err.print("trained WITHOUT differential privacy")
    if "heldout_loss" in result.holder:
        err.print(f"held-out loss {result.holder['heldout_loss']:.4f}, perplexity "
                  f"{result.holder['heldout_perplexity']:.4g} (data holder only)")
    exposure = result.release.get("canary_exposure")
    if exposure is not None:
        summary = exposure["summary"]
        for reps, row in summary["by_repetitions"].items():
            err.print(f"canary exposure, {reps} repetition(s): median {row['median']:.2f} bits, max "
                      f"{row['max']:.2f} of {summary['max_exposure']:.2f} ({row['canaries']} canaries)")
    print(result.weights_dir)
    return 0


def cmd_finetune_merge(args: argparse.Namespace) -> int:
    from tramontane.finetune.adapter import merge_adapter_checkpoint

    _check_output(args.out, "--out", "folder", args.overwrite)
    merge_adapter_checkpoint(args.model, args.adapter, args.out, format=args.format, dtype=args.dtype,
                             overwrite=args.overwrite)
    _stderr().print(f"wrote the merged checkpoint ({args.format}) to {args.out}")
    return 0


def _add_finetune_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="DP fine-tuning (LoRA or full) of a checkpoint on chats or text (JSONL)",
                       description="DP-SGD fine-tuning of a checkpoint: LoRA adapters (optionally over an int8 / "
                       "int4 weight-only quantized base, --quantize) or every weight (--method full)")
    p.add_argument("--model", default=None, help="base checkpoint directory (consolidated or Hugging Face), or a "
                   "llama.cpp .gguf file with the model's tekken.json or tokenizer.model.v* beside it (dequantized "
                   "to float32; --quantize re-quantizes it with tramontane's int8 / int4). --method full writes "
                   "the trained model in the Hugging Face format, whatever the base's")
    p.add_argument("--data", default=None, help="training JSONL: {'messages': [...], 'tools': [...]} chats or "
                   "{'text': ...} records, each with an optional 'user_id'")
    p.add_argument("--out", default=None, help="run folder: adapter/ (PEFT layout + ledger), report/, run/")
    p.add_argument("--eval", default=None, help="held-out JSONL: loss, perplexity, membership attack (data "
                   "holder only)")
    p.add_argument("--epsilon", type=float, default=None, help="privacy budget (the whole ledger)")
    p.add_argument("--delta", type=float, default=1e-6)
    p.add_argument("--non-private", action="store_true", help="train WITHOUT differential privacy")
    p.add_argument("--method", choices=("lora", "full"), default="lora")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=None, help="default: twice the rank")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="attention", help="comma-separated: wq,wk,wv,wo,w1,w2,w3 or the "
                   "groups attention, mlp, experts, all")
    p.add_argument("--base-dtype", choices=("bfloat16", "float16"), default=None,
                   help="keep the frozen base in this dtype (LoRA; adapters stay float32)")
    _base_quantize_options(p)
    p.add_argument("--adapter", default=None, help="continue this LoRA adapter (its ledger counts against "
                   "--epsilon)")
    p.add_argument("--privacy-unit", choices=("example", "user"), default="example",
                   help="user: all of a user_id's examples are one unit, one clipped gradient per user")
    p.add_argument("--max-examples-per-user", type=int, default=16)
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=None)
    steps.add_argument("--epochs", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="expected batch of privacy units (default: the "
                   "TAN rule)")
    p.add_argument("--noise-multiplier", type=float, default=None, help="default: calibrated to --epsilon")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-len", type=int, default=512, help="tokens per training row")
    p.add_argument("--packing", choices=("truncate", "split", "pack"), default="truncate",
                   help="a longer example: truncated, split over rows, or packed with its unit's others")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--canaries", type=int, default=0, help="insert N random secrets and report their exposure")
    p.add_argument("--canary-repetitions", default="1,10", help="comma-separated repetition counts")
    p.add_argument("--seed", type=int, default=None, help="reproducible noise, sampling and canaries (NOT "
                   "secure: the noise becomes predictable)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.set_defaults(func=cmd_finetune, finetune_command=None)
    ft_sub = p.add_subparsers(dest="finetune_command")
    merge = ft_sub.add_parser("merge", help="merge a LoRA adapter into its base: a full checkpoint")
    merge.add_argument("--model", required=True, help="base checkpoint directory, or a llama.cpp .gguf file (its "
                       "folder's tokenizer files are copied)")
    merge.add_argument("--adapter", required=True, help="adapter directory (PEFT layout)")
    merge.add_argument("--out", required=True)
    merge.add_argument("--format", choices=("hf", "consolidated"), default="hf",
                       help="layout of the merged checkpoint (default hf, over a .gguf base too: tramontane writes "
                            "no GGUF; convert the hf folder with llama.cpp's convert_hf_to_gguf.py)")
    merge.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                       help="dtype of the merged weights (default: the base's; a block-quantized .gguf loads as "
                            "float32)")
    merge.add_argument("--overwrite", action="store_true")


# ------------------------------------------------------------------------------------------------ federated


def _federated_app_module() -> Any:
    try:
        from tramontane.federated import app
    except ImportError as err:
        raise TramontaneError(f"federated learning needs Flower ({err.name} is missing): "
                              "pip install 'tramontane[federated]'") from None
    return app


def _run_config_value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def cmd_federated_app(args: argparse.Namespace) -> int:
    """Write the Flower app folder that `flwr run` takes (DP-FedAvg on Adult, CANIFE audits)."""
    app = _federated_app_module()
    overrides: dict[str, int | float | str] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise TramontaneError(f"--set takes key=value, got {item!r}")
        overrides[key.strip()] = _run_config_value(value.strip())
    folder = app.write_flower_app(args.dir, overrides)
    print(f"Flower app written to {folder}; run it on a federation (see tramontane/federated/app.py):")
    print(f"  flwr run {folder} <connection> --stream --run-config 'output=\"run.json\"'")
    return 0


def cmd_federated_report(args: argparse.Namespace) -> int:
    """Sum up the JSON report a federated run wrote."""
    app = _federated_app_module()
    try:
        report = json.loads(Path(args.report).read_text())
    except json.JSONDecodeError as err:
        raise TramontaneError(f"{args.report} is not a JSON report: {err}") from None
    if not isinstance(report, dict) or report.get("format") != app.REPORT_FORMAT:
        raise TramontaneError(f"{args.report} is not a federated run report (format {app.REPORT_FORMAT!r})")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_table("federated run", app.report_summary(report))
    return 0


def _add_federated_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("federated", help="DP-FedAvg on Flower (user-level DP) with CANIFE audits")
    fed_sub = p.add_subparsers(dest="federated_command", required=True)
    app = fed_sub.add_parser("app", help="write the Flower app folder for `flwr run`")
    app.add_argument("dir", help="folder to write (its pyproject.toml)")
    app.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a run-config default, e.g. "
                     "--set noise-multiplier=2.0 --set audit-every=1 (repeatable)")
    app.set_defaults(func=cmd_federated_app)
    report = fed_sub.add_parser("report", help="sum up the JSON report of a federated run")
    report.add_argument("report", help="the run's JSON report (the app's `output`)")
    report.add_argument("--json", action="store_true", help="print the whole report")
    report.set_defaults(func=cmd_federated_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tramontane", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_model_commands(sub)
    _add_accounting_commands(sub)
    _add_synth_commands(sub)
    _add_finetune_commands(sub)
    _add_audit_commands(sub)
    _add_federated_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # dp-accounting logs every RDP order it skips; the result already accounts for it
        logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except TramontaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a disk full, a folder made read-only midway: one line unless --verbose
        if args.verbose:
            raise
        print(f"error: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
