"""The `tramontane` command line: parse arguments, call the library, print results.

Results go to stdout; progress and timing go to stderr, so `--json` output can be piped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tramontane.errors import TramontaneError

_DTYPES = ("float32", "bfloat16", "float16")


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


# -- model commands ----------------------------------------------------------------------------------------

def _load_model_and_tokenizer(model_dir: str, dtype: str | None):
    import torch

    from tramontane.models.checkpoint import load_model
    from tramontane.tokenizer import Tokenizer

    start = time.perf_counter()
    model, _ = load_model(model_dir, dtype=getattr(torch, dtype) if dtype else None)
    tokenizer = Tokenizer.from_model_dir(model_dir)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise TramontaneError(
            f"the tokenizer in {model_dir} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.args.vocab_size}: the directory mixes files of different models"
        )
    _stderr().print(f"loaded {model_dir} ({model.args.num_parameters() / 1e6:.1f}M parameters, "
                    f"{tokenizer.version} tokenizer) in {time.perf_counter() - start:.2f} s")
    return model, tokenizer


def _sampling(args: argparse.Namespace, logprobs: bool = False):
    from tramontane.generation import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, logprobs=logprobs)


def cmd_generate(args: argparse.Namespace) -> int:
    from tramontane.generation import generate

    model, tokenizer = _load_model_and_tokenizer(args.model, args.dtype)
    if args.chat:
        prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = tokenizer.encode(args.prompt, bos=True)
    start = time.perf_counter()
    completion = generate(model, [prompt], _sampling(args, logprobs=args.json), eos_id=tokenizer.eos_id,
                          chunk_size=args.chunk_size)[0]
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


def cmd_chat(args: argparse.Namespace) -> int:
    from tramontane.generation import decode_steps

    model, tokenizer = _load_model_and_tokenizer(args.model, args.dtype)
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    err = _stderr()
    err.print("type a message; an empty line or Ctrl-D ends the chat")
    turn = 0
    while True:
        err.print("[bold]> [/bold]", end="")
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = tokenizer.encode_chat(messages)
        params = _sampling(args)
        if params.seed is not None:  # a new but reproducible draw each turn
            params.seed += turn
        decoder = tokenizer.incremental_decoder(prompt)
        reply: list[int] = []
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


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser, temperature: float) -> None:
        p.add_argument("--model", required=True, help="checkpoint directory (consolidated or Hugging Face)")
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
        p.add_argument("--dtype", choices=_DTYPES, default=None, help="default: the checkpoint's dtype")

    p = sub.add_parser("generate", help="continue a prompt with a model")
    common(p, temperature=0.0)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill the prompt in chunks of N tokens")
    p.add_argument("--json", action="store_true", help="print tokens, text, logprobs as one JSON object")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with an instruct model")
    common(p, temperature=0.7)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)


# -- privacy accounting -----------------------------------------------------------------------------------

def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def cmd_account(args: argparse.Namespace) -> int:
    """epsilon from (q, sigma, S, delta), or sigma calibrated for (epsilon, delta, q, S)."""
    import warnings

    from tramontane import accounting

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.noise_multiplier is not None:
            if args.epsilon is not None:
                raise TramontaneError("give either --noise-multiplier (to get epsilon) or --epsilon (to get "
                                      "the noise multiplier), not both")
            report = accounting.tan_report(args.sample_rate, args.noise_multiplier, args.steps, args.delta,
                                           accountant=args.accountant)
            result = {"epsilon": report.epsilon, "delta": args.delta, "accountant": report.accountant,
                      "sample_rate": args.sample_rate, "noise_multiplier": args.noise_multiplier,
                      "steps": args.steps, "eta": report.eta, "total_amount_of_noise": report.total_amount_of_noise,
                      "epsilon_tan": report.epsilon_tan, "epsilon_over_epsilon_tan": report.ratio,
                      "overcharged": report.overcharged}
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
                     [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in result.items()])
        for note in notes:
            _stderr().print(f"[yellow]warning:[/yellow] {note}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """(batch, sigma) at constant TAN for a target budget, plus the non-private small-batch simulation."""
    import warnings

    from tramontane import accounting

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = accounting.plan_constant_tan(args.dataset_size, args.epsilon, args.delta, args.steps,
                                            batch_size_ref=args.reference_batch,
                                            simulated_batch_size=args.simulated_batch, accountant=args.accountant)
    ref = plan.reference
    result = {"private_run": {"batch_size": ref.batch_size, "noise_multiplier": ref.noise_multiplier,
                              "steps": ref.steps, "sample_rate": ref.sample_rate, "epochs": ref.epochs,
                              "epsilon": plan.epsilon, "delta": plan.delta, "accountant": plan.accountant,
                              "eta": ref.eta, "epsilon_tan": plan.epsilon_tan}}
    if plan.simulated is not None:
        sim = plan.simulated
        result["simulation"] = {"batch_size": sim.batch_size, "noise_multiplier": sim.noise_multiplier,
                                "steps": sim.steps, "epochs": sim.epochs, "private": sim.private,
                                "label": sim.label}
    notes = [str(w.message) for w in caught]
    if args.json:
        print(json.dumps({**result, "warnings": notes}))
    else:
        _print_table(f"private run at epsilon <= {args.epsilon}, delta = {args.delta}",
                     [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in result["private_run"].items()])
        if "simulation" in result:
            _print_table("simulation for hyper-parameter search (same TAN, NOT PRIVATE)",
                         [(k, f"{v:.6g}" if isinstance(v, float) else str(v))
                          for k, v in result["simulation"].items()])
        for note in notes:
            _stderr().print(f"[yellow]warning:[/yellow] {note}")
    return 0


def _add_accounting_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("account", help="epsilon of a DP-SGD run, or the noise multiplier for a target epsilon")
    p.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q = batch / N")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--delta", type=float, required=True)
    p.add_argument("--noise-multiplier", type=float, default=None, help="sigma: prints epsilon")
    p.add_argument("--epsilon", type=float, default=None, help="target epsilon: prints the calibrated sigma")
    p.add_argument("--accountant", choices=["rdp", "pld"], default="rdp")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_account)

    p = sub.add_parser("plan", help="batch size and noise at constant TAN for a target budget")
    p.add_argument("--dataset-size", type=int, required=True)
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--delta", type=float, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--reference-batch", type=int, default=None, help="batch size of the private run")
    p.add_argument("--simulated-batch", type=int, default=128, help="batch size of the non-private simulation")
    p.add_argument("--accountant", choices=["rdp", "pld"], default="rdp")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)


# -- entry point -------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tramontane", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_model_commands(sub)
    _add_accounting_commands(sub)
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
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
