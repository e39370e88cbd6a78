"""Agent trajectories: one JSONL file per run, one line per event, appended and flushed as the run goes.

A run can be read while it runs, resumed after a crash or a limit, and used as fine-tuning data. The lines:

- first, the header: `{"event": "start", "version": 1, "task", "model", "config" (the `AgentConfig` without
  its API key), "tools" (the OpenAI tool definitions sent), "time" (ISO 8601)}`;
- each message of the conversation, in order, as OpenAI writes it (`role`, `content`, and `tool_calls` for an
  assistant, `tool_call_id` and `name` for a tool result) plus a `meta` object: `step` (the model call it
  belongs to, 0 for the system prompt and the task), `elapsed` (seconds since the run started, resumed runs
  included), and for an assistant message `model_seconds`, `usage` (`prompt_tokens`, `completion_tokens`, and
  `estimated: true` when the server sent no usage and characters were counted), `finish_reason` and, when the
  call was retried, `attempts`; for a tool result `seconds`, `error`, `finished` (the `finish` tool ended the
  run) and then finish's `message`. Reminders sent after a reply without a tool call are user messages;
- `{"event": "empty_reply", "meta": {...}}` for a model reply with neither content nor tool calls (it counts as
  a step and its tokens count, but it is not part of the conversation);
- `{"event": "resume", "model", "config", "time"}` where a run was resumed;
- last, `{"event": "end", "reason", "steps", "message", "prompt_tokens", "completion_tokens", "meta":
  {"elapsed"}}`.

A crash can leave a torn last line; `read_trajectory` ignores it and `TrajectoryWriter(..., resume=True)` cuts
it off before appending. The timing fields (`time`, `elapsed`, `model_seconds`, `seconds`) are the only ones
that differ between two runs of the same scripted conversation (`TIMING_FIELDS`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Self

from tramontane.errors import DataError

TRAJECTORY_VERSION = 1
TIMING_FIELDS = frozenset({"time", "elapsed", "model_seconds", "seconds"})
MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


@dataclass
class TrajectoryState:
    """What a trajectory file says about its run: enough to resume it.

    `messages` are the conversation in OpenAI format (no `meta`); `steps` the model calls made (empty replies
    included); `elapsed` the seconds the run has used; `empty_streak` the empty replies since the last real
    one; `end` the last end event, if the run ended (a resumed run may have ended more than once);
    `finished` the message of a `finish` call when the conversation ends with one (whether or not the end
    line made it to the file).
    """

    task: str
    model: str | None
    tools: list[dict[str, Any]]
    config: dict[str, Any]
    messages: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed: float = 0.0
    empty_streak: int = 0
    end: dict[str, Any] | None = None
    finished: str | None = None


def now() -> str:
    """The current UTC time in ISO 8601, as trajectories write it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _complete_lines(raw: bytes) -> tuple[list[bytes], int]:
    """The complete lines of a JSONL file's bytes and the length of the part they span. A last line without
    its newline counts if it parses (a file written by hand); otherwise it is a torn write and is dropped."""
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    kept = len(raw) - len(tail)
    if tail.strip():
        try:
            json.loads(tail)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return lines, kept
        lines.append(tail)
        kept = len(raw)
    return lines, kept


def read_trajectory(path: str | Path) -> TrajectoryState:
    """Parse a trajectory file (see the module docstring); a torn last line is ignored.

    Raises:
        DataError: the file is missing, has no header, or a line other than the last is not a JSON object.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the trajectory {path}: {exc.strerror or type(exc).__name__}") from None
    lines, _ = _complete_lines(raw)
    state: TrajectoryState | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{path}, line {number}: not JSON; a trajectory is written one JSON object per line "
                            "(only a torn last line is skipped)") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {number}: a JSON {type(obj).__name__}, not an object")
        if state is None:
            if obj.get("event") != "start" or not isinstance(obj.get("task"), str):
                raise DataError(f"{path} does not start with a trajectory header ({{'event': 'start', ...}}); is it "
                                "a trajectory written by the agent?")
            if obj.get("version") != TRAJECTORY_VERSION:
                raise DataError(f"{path} is a version {obj.get('version')} trajectory; this tramontane reads "
                                f"version {TRAJECTORY_VERSION}")
            state = TrajectoryState(task=obj["task"], model=obj.get("model"), tools=list(obj.get("tools") or []),
                                    config=dict(obj.get("config") or {}))
            continue
        _apply(state, obj)
    if state is None:
        raise DataError(f"{path} is empty or holds no complete line; start the run again without resuming")
    return state


def _apply(state: TrajectoryState, obj: Mapping[str, Any]) -> None:
    meta: dict[str, Any] = obj["meta"] if isinstance(obj.get("meta"), dict) else {}
    state.steps = max(state.steps, int(meta.get("step", 0) or 0))
    state.elapsed = max(state.elapsed, float(meta.get("elapsed", 0.0) or 0.0))
    usage = meta.get("usage")
    if isinstance(usage, dict):
        state.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        state.completion_tokens += int(usage.get("completion_tokens") or 0)
    event = obj.get("event")
    if event == "empty_reply":
        state.empty_streak += 1
    elif event == "end":
        state.end = dict(obj)
    elif "role" in obj:
        message = {k: obj[k] for k in MESSAGE_KEYS if k in obj}
        state.messages.append(message)
        if message["role"] == "assistant":
            state.empty_streak = 0
            state.finished = None
        elif message["role"] == "tool" and meta.get("finished"):
            state.finished = meta.get("message") or ""


def has_lines(path: str | Path) -> bool:
    """Whether the file holds at least one complete line (a run that got as far as its header)."""
    lines, _ = _complete_lines(Path(path).read_bytes())
    return any(line.strip() for line in lines)


def start_line(task: str, model: str, config: Mapping[str, Any], tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The header of a new trajectory."""
    return {"event": "start", "version": TRAJECTORY_VERSION, "task": task, "model": model, "config": dict(config),
            "tools": list(tools), "time": now()}


class TrajectoryWriter:
    """Appends events to a trajectory file, one line each, flushed to the operating system as it is written (a
    crash of the process loses nothing but the line being written).

    A new file must not exist yet (a run is never overwritten); `resume=True` appends to an existing one after
    cutting off a torn last line. `write` takes any JSON object: a message line or an event.
    """

    def __init__(self, path: str | Path, *, resume: bool = False) -> None:
        self.path = Path(path)
        if resume:
            raw = self.path.read_bytes()
            _, kept = _complete_lines(raw)
            if kept < len(raw):  # a torn line from a crash: drop it, so the next line starts cleanly
                with self.path.open("r+b") as f:
                    f.truncate(kept)
            if kept and not raw[:kept].endswith(b"\n"):
                with self.path.open("ab") as f:
                    f.write(b"\n")
            self._file: IO[str] = self.path.open("a", encoding="utf-8")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._file = self.path.open("x", encoding="utf-8")
            except FileExistsError:
                raise DataError(f"the trajectory {self.path} exists already; resume it (--resume) or write to "
                                "another file") from None

    def write(self, obj: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(obj) + "\n")  # ASCII: a lone surrogate from a server cannot break a line
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def without_timing(obj: Any) -> Any:
    """`obj` (a decoded trajectory line, or anything nested) without the `TIMING_FIELDS` keys, at any depth:
    what two runs of one scripted conversation have in common."""
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING_FIELDS}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def messages_for_finetune(path: str | Path) -> dict[str, Any]:
    """A trajectory as one `tramontane finetune` chat record: `{"messages": [...], "tools": [...]}`.

    The messages are the conversation as sent to the model (system prompt, task, assistant turns, tool results,
    reminders), without `meta`, cut after the last assistant message: fine-tuning learns assistant messages,
    and what follows the last one (the result of `finish`) would never be trained. Tool-call ids are kept as
    the server gave them; Mistral tokenizers need 9 letters or digits (what `tramontane serve` and vLLM's
    Mistral parser give).

    Raises:
        DataError: the trajectory cannot be read or has no assistant message.
    """
    state = read_trajectory(path)
    last = max((i for i, m in enumerate(state.messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{path} has no assistant message, so nothing to learn from")
    messages = []
    for message in state.messages[:last + 1]:
        clean = {k: v for k, v in message.items() if v is not None or k == "content"}
        if clean["role"] == "assistant" and not clean.get("content") and clean.get("tool_calls"):
            clean.pop("content", None)
        messages.append(clean)
    return {"messages": messages, "tools": state.tools}
