"""The agent harness with scripted models, and the agent loop's own overhead per step.

1. Scoring check: the harness (`tramontane.agent.harness.evaluate`) over every shipped task with two scripted
   models served by the replay endpoint: one whose shell command applies each task's known fix (`git apply`
   of gold.patch) and then calls `finish` (expected: 100% resolved), and one that calls `finish` at once
   (expected: 0%). This proves the scoring, not a model.
2. Loop overhead: the same sequence of shell commands (file listing and reading, grep, git, a short Python
   run, a write) run directly with `subprocess` (bash, same environment, no sandbox: the anchor) and as the
   tool calls of an agent run (`run_agent` + `ToolBox` + `Sandbox` against a replay endpoint on localhost,
   trajectory written). A step is the time between two consecutive tool results of the run: the model call
   (the replay server's HTTP answer, about a millisecond), starting a bubblewrap sandbox, the command, output
   handling and the trajectory line. Overhead = median step time - median direct time of the same commands
   (repeats alternate the ways); the goal is under 50 ms. The same commands through `Sandbox.run` alone split
   it into the sandbox's share and the loop's (model call, tool dispatch, trajectory).

    .venv/bin/python benchmarks/agent.py [--repeats 5] [--out DIR] [--unsafe-no-sandbox]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tramontane.agent.harness import BUILTIN_TASKS, copy_snapshot, evaluate, init_repository, load_tasks
from tramontane.agent.loop import AgentConfig, run_agent
from tramontane.agent.replay import ReplayServer
from tramontane.agent.sandbox import Sandbox, SandboxLimits
from tramontane.agent.tools import ToolBox

SNAPSHOT = "mahmoud__boltons-766b554"  # the workspace of the overhead runs
COMMANDS = [
    "ls -la",
    "grep -n 'def ' boltons/strutils.py | head -20",
    "sed -n '300,345p' boltons/strutils.py",
    "git status --short",
    "git log --oneline -1",
    "find . -name '*.py' -not -path './.git/*' | sort",
    "python -c 'import sys; sys.path.insert(0, \".\"); import boltons.strutils as s; print(s.bytes2human(2048))'",
    "printf 'notes\\n' > notes.txt && cat notes.txt && rm notes.txt",
    "wc -l boltons/strutils.py tests/test_strutils.py",
    "head -c 2000 LICENSE | tail -5",
]


def _bash(command: str) -> dict[str, Any]:
    return {"tool_calls": [{"function": {"name": "execute_bash", "arguments": json.dumps({"command": command})}}]}


def _finish(message: str) -> dict[str, Any]:
    return {"tool_calls": [{"function": {"name": "finish", "arguments": json.dumps({"message": message})}}]}


def _config(url: str, steps: int) -> AgentConfig:
    return AgentConfig(endpoint=url, max_steps=steps, max_seconds=600, request_timeout=60, max_retries=0)


def harness_check(out: Path, limits: SandboxLimits, unsafe: bool) -> dict[str, Any]:
    """Resolved rates of the fix-applying and the do-nothing scripted models over all shipped tasks."""
    tasks = load_tasks(BUILTIN_TASKS)
    figures: dict[str, Any] = {"tasks": len(tasks)}
    gold = [r for t in tasks for r in (_bash(f"git apply <<'END_OF_PATCH'\n{t.gold_patch}END_OF_PATCH"),
                                       _finish("applied the known fix"))]
    for name, replies in (("gold", gold), ("nothing", [_finish("nothing done")] * len(tasks))):
        start = time.perf_counter()
        with ReplayServer(replies, model=f"scripted-{name}") as server:
            summary = evaluate(BUILTIN_TASKS, _config(server.url, 5), out / name, limits=limits,
                               unsafe_no_sandbox=unsafe)
        seconds = time.perf_counter() - start
        figures[name] = {"resolved": summary.resolved, "resolved_rate": summary.resolved_rate,
                         "seconds": round(seconds, 2), "seconds_per_task": round(seconds / len(tasks), 2)}
    return figures


def _direct(workspace: Path, env: dict[str, str]) -> list[float]:
    times = []
    for command in COMMANDS:
        start = time.perf_counter()
        subprocess.run(["bash", "-c", command], cwd=workspace, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return times


def _sandboxed(workspace: Path, limits: SandboxLimits, unsafe: bool) -> list[float]:
    times = []
    with Sandbox(workspace, limits, unsafe_no_sandbox=unsafe) as sandbox:
        for command in COMMANDS:
            start = time.perf_counter()
            sandbox.run(command)
            times.append(time.perf_counter() - start)
    return times


def _through_loop(workspace: Path, trajectory: Path, limits: SandboxLimits, unsafe: bool) -> dict[str, list[float]]:
    stamps: list[float] = []
    tool_seconds: list[float] = []
    model_seconds: list[float] = []

    def on_event(event: Any) -> None:
        if event.get("role") == "tool" and not event["meta"].get("finished"):
            stamps.append(time.perf_counter())
            tool_seconds.append(event["meta"]["seconds"])
        elif event.get("role") == "assistant":
            model_seconds.append(event["meta"]["model_seconds"])

    replies = [_bash(c) for c in COMMANDS] + [_finish("done")]
    with ReplayServer(replies) as server, Sandbox(workspace, limits, unsafe_no_sandbox=unsafe) as sandbox:
        start = time.perf_counter()
        run_agent("Run the benchmark commands.", ToolBox(sandbox), _config(server.url, len(replies)),
                  trajectory=trajectory, workspace=workspace, on_event=on_event)
    assert len(stamps) == len(COMMANDS), stamps
    steps = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
    return {"step": steps, "tool": tool_seconds, "model": model_seconds[:len(COMMANDS)]}


def loop_overhead(repeats: int, limits: SandboxLimits, unsafe: bool) -> dict[str, Any]:
    """Median per-step times, direct and through the loop (the first step of each run is left out: it also
    holds the run's start, the system prompt and the task)."""
    direct: list[float] = []
    sandboxed: list[float] = []
    loop: dict[str, list[float]] = {"step": [], "tool": [], "model": []}
    with tempfile.TemporaryDirectory(prefix="tramontane-bench-agent-") as tmp:
        workspace = Path(tmp) / "ws"
        copy_snapshot(BUILTIN_TASKS / SNAPSHOT / "repo", workspace)
        init_repository(workspace)
        env = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin", "HOME": str(workspace),
               "LANG": "C.UTF-8", "TERM": "dumb", "PYTHONDONTWRITEBYTECODE": "1"}
        for repeat in range(repeats):
            direct += _direct(workspace, env)[1:]
            sandboxed += _sandboxed(workspace, limits, unsafe)[1:]
            through = _through_loop(workspace, Path(tmp) / f"trajectory-{repeat}.jsonl", limits, unsafe)
            for key, values in through.items():
                loop[key] += values[1:]
    direct_ms = 1000 * statistics.median(direct)
    step_ms = 1000 * statistics.median(loop["step"])
    sandboxed_ms = 1000 * statistics.median(sandboxed)
    return {"steps_measured": len(loop["step"]), "direct_ms": round(direct_ms, 2),
            "sandbox_run_ms": round(sandboxed_ms, 2), "step_ms": round(step_ms, 2),
            "tool_ms": round(1000 * statistics.median(loop["tool"]), 2),
            "model_call_ms": round(1000 * statistics.median(loop["model"]), 2),
            "overhead_ms": round(step_ms - direct_ms, 2), "step_over_direct": round(step_ms / direct_ms, 2),
            "sandbox_overhead_ms": round(sandboxed_ms - direct_ms, 2),
            "loop_overhead_beyond_sandbox_ms": round(step_ms - sandboxed_ms, 2),
            "goal_ms": 50.0, "within_goal": step_ms - direct_ms < 50.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="keep the harness results here (default: temp)")
    parser.add_argument("--unsafe-no-sandbox", action="store_true", help="run commands without bubblewrap")
    args = parser.parse_args()
    limits = SandboxLimits()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}, sandbox: {'none (unsafe)' if args.unsafe_no_sandbox else 'bubblewrap'}")
    with tempfile.TemporaryDirectory(prefix="tramontane-bench-harness-") as tmp:
        harness = harness_check(args.out or Path(tmp), limits, args.unsafe_no_sandbox)
    print(f"\nharness over {harness['tasks']} shipped tasks")
    print(f"{'scripted model':<28}{'resolved':>10}{'rate':>8}{'seconds':>10}{'s/task':>8}")
    for name, label in (("gold", "applies the known fix"), ("nothing", "does nothing")):
        h = harness[name]
        print(f"{label:<28}{h['resolved']:>10}{h['resolved_rate']:>8.0%}{h['seconds']:>10.1f}"
              f"{h['seconds_per_task']:>8.2f}")
    overhead = loop_overhead(args.repeats, limits, args.unsafe_no_sandbox)
    print(f"\nloop overhead per step ({len(COMMANDS) - 1} commands x {args.repeats} repeats, medians)")
    print(f"{'direct subprocess':<46}{overhead['direct_ms']:>10.2f} ms")
    print(f"{'Sandbox.run alone (bubblewrap)':<46}{overhead['sandbox_run_ms']:>10.2f} ms")
    print(f"{'agent step (model call + tool + bookkeeping)':<46}{overhead['step_ms']:>10.2f} ms")
    print(f"{'  of which the tool call (sandboxed)':<46}{overhead['tool_ms']:>10.2f} ms")
    print(f"{'  of which the model call (replay HTTP)':<46}{overhead['model_call_ms']:>10.2f} ms")
    print(f"{'overhead (step - direct)':<46}{overhead['overhead_ms']:>10.2f} ms   (goal < 50 ms)")
    print(f"{'  sandbox (Sandbox.run - direct)':<46}{overhead['sandbox_overhead_ms']:>10.2f} ms")
    print(f"{'  loop (step - Sandbox.run)':<46}{overhead['loop_overhead_beyond_sandbox_ms']:>10.2f} ms")
    print(json.dumps({"harness": harness, "loop_overhead": overhead}))


if __name__ == "__main__":
    main()
