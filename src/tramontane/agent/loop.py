"""The agent loop: a model behind an OpenAI-compatible endpoint works on a task with the tools of `tools.py`.

Each step sends the conversation with the tool definitions (`tool_choice` "auto"), appends the assistant's
reply, runs its tool calls in order through the `ToolBox` and appends one tool message per call (its
`tool_call_id`, `name` and output). The run stops when:

- the model calls `finish` ("finish");
- `max_steps` model replies were received ("max_steps"), `max_seconds` have passed ("max_seconds"), or the
  prompt and completion tokens of the run reach `max_total_tokens` ("max_total_tokens"); the limits are
  checked before each model call, so the step that crosses one completes, tool calls included;
- an error the loop cannot recover from ("error"): the endpoint still fails after `max_retries` retries of a
  transient failure (no answer, HTTP 408/425/429/5xx) or fails for good (any other 4xx), three replies in a
  row have neither content nor tool calls, or a tool cannot run at all (the sandbox broke).

A reply with text but no tool call is kept and answered with a reminder to use the tools or call `finish`
(OpenHands nudges the same way); it counts as a step. Unknown tools, malformed JSON arguments, escapes from
the sandbox and command timeouts come back to the model as tool errors (the `ToolBox` turns them into text).

Context policy (when `context_tokens` is set): the request must fit in `context_tokens` minus the completion
budget (`max_tokens`, or an eighth of the context when it is not set). The prompt size is estimated from its
characters (messages and tool definitions) at the tokens-per-character rate the last reply's `usage` showed,
4 characters per token until a reply has shown one. When the estimate is over the budget:

1. the system prompt and the task (the first two messages) are always kept;
2. tool outputs are replaced by "[output elided to fit the context]", oldest first, except those of the last
   assistant turn;
3. then the oldest whole turns are dropped (a turn is an assistant message with the tool results and reminders
   that follow it: a call is never separated from its result), keeping the last turn;
4. as a last resort, the last turn's own tool outputs are elided.

If the server still answers that the prompt is too long (HTTP 400 `context_length_exceeded`), the budget is
cut by a fifth and the request sent again, up to three times. The trajectory keeps the whole conversation;
only what is sent is cut.

Every message and event goes to the trajectory file as it happens (`trajectory.py`); `resume=True` reloads the
conversation and the counters (steps, tokens, time used) and goes on: tool calls of the last turn whose results
are missing (a crash in the middle of a step) are run again, a text-only last reply gets its reminder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import string
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tramontane.agent.client import ChatClient, ChatReply
from tramontane.agent.tools import TOOL_SPECS, ToolBox
from tramontane.agent.trajectory import (
    TrajectoryState,
    TrajectoryWriter,
    has_lines,
    now,
    read_trajectory,
    start_line,
)
from tramontane.errors import ConfigError, EndpointError, TramontaneError

logger = logging.getLogger(__name__)

ELIDED = "[output elided to fit the context]"
NUDGE = ("Your last reply called no tool. Keep working on the task with the tools (execute_bash, "
         "str_replace_editor, think). When the task is done, or cannot be done, call `finish` with a short "
         "summary of what you did.")
NOT_RUN = "[not run: `finish` was called earlier in the same reply, which ended the run]"
SYSTEM_PROMPT = """\
You are a software engineering agent. You solve the user's task by working on the files of a workspace \
through tools, one or more tool calls per reply.

Tools:
- execute_bash: run a bash command and see its output and exit code. The working directory carries over \
between calls; there is no network. Long-running commands are stopped at a time limit; prefer commands that \
end on their own.
- str_replace_editor: view a file or a directory, create a file, replace an exact, unique string in a file \
(str_replace), insert text after a line (insert), or undo the last edit of a file (undo_edit). Paths are \
absolute.
- think: write down reasoning or a plan; it changes nothing.
- finish: end the task, with a message summarising what was done. Call it once the task is complete (or \
cannot be completed); nothing runs after it.

Work step by step: explore the relevant code, reproduce the problem when there is one, make minimal changes, \
and check them (for example by running the tests) before calling finish."""

EMPTY_REPLIES_LIMIT = 3
CONTEXT_RETRIES = 3
_ALPHANUMERIC = string.ascii_letters + string.digits


@dataclass(frozen=True)
class AgentConfig:
    """How the loop talks to the model and when it stops (see the module docstring for the policies).

    Attributes:
        endpoint: base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1.
        model: the model id to request; None: the first id of `GET /models`.
        api_key: sent as a bearer token; never written to the trajectory.
        max_steps: model replies in the run (resumed runs included).
        max_seconds: wall-clock seconds of the run (resumed runs included).
        max_total_tokens: prompt + completion tokens summed over the run, from each reply's `usage` (estimated
            at 4 characters per token when a server sends none); None: no limit.
        temperature: sampling temperature of each model call.
        max_tokens: completion tokens per model call; None: the server's default.
        context_tokens: the model's context length; the conversation sent is kept within it. None: never cut.
        request_timeout: seconds to wait for one model call.
        max_retries: retries of a model call that failed transiently (no answer, HTTP 408/425/429/5xx).
        retry_backoff: seconds before the first retry, doubled for each next one.
    """

    endpoint: str
    model: str | None = None
    api_key: str | None = None
    max_steps: int = 50
    max_seconds: float = 1800.0
    max_total_tokens: int | None = None
    temperature: float = 0.0
    max_tokens: int | None = None
    context_tokens: int | None = None
    request_timeout: float = 600.0
    max_retries: int = 2
    retry_backoff: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.endpoint, str) or not self.endpoint.startswith(("http://", "https://")):
            problems.append(f"endpoint must be an http(s) base URL, e.g. http://127.0.0.1:8000/v1 (got "
                            f"{self.endpoint!r})")
        if self.model is not None and not self.model:
            problems.append("model must be a model id, or None for the endpoint's first")
        if self.max_steps < 1:
            problems.append(f"max_steps must be at least 1 (got {self.max_steps})")
        if not self.max_seconds > 0:
            problems.append(f"max_seconds must be positive (got {self.max_seconds})")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            problems.append(f"max_total_tokens must be at least 1, or None (got {self.max_total_tokens})")
        if not 0 <= self.temperature <= 2:
            problems.append(f"temperature must be in [0, 2] (got {self.temperature})")
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append(f"max_tokens must be at least 1, or None (got {self.max_tokens})")
        if self.context_tokens is not None and (self.context_tokens < 1 or (
                self.max_tokens is not None and self.max_tokens >= self.context_tokens)):
            problems.append(f"context_tokens must be more than max_tokens (got {self.context_tokens} and "
                            f"{self.max_tokens})")
        if not self.request_timeout > 0:
            problems.append(f"request_timeout must be positive seconds (got {self.request_timeout})")
        if self.max_retries < 0 or self.retry_backoff < 0:
            problems.append(f"max_retries and retry_backoff must not be negative (got {self.max_retries}, "
                            f"{self.retry_backoff})")
        if problems:
            raise ConfigError("AgentConfig: " + "; ".join(problems))

    def public(self) -> dict[str, Any]:
        """The config as written to a trajectory: everything but the API key (and a password in the URL)."""
        out = dataclasses.asdict(self)
        out.pop("api_key")
        url = urllib.parse.urlsplit(self.endpoint)
        if url.password is not None:
            out["endpoint"] = url._replace(netloc=f"{url.username}:***@{url.hostname}"
                                                  f"{f':{url.port}' if url.port else ''}").geturl()
        return out


@dataclass(frozen=True)
class AgentResult:
    """How a run ended: `reason` is "finish", "max_steps", "max_seconds", "max_total_tokens" or "error";
    `message` is finish's message or the error; the token counts are summed over the run."""

    reason: str
    steps: int
    message: str | None
    prompt_tokens: int
    completion_tokens: int


# -- context policy --------------------------------------------------------------------------------------------

def _chars(message: Mapping[str, Any]) -> int:
    return len(json.dumps(message, ensure_ascii=False)) + 2  # ", " between messages


def _turns(messages: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Messages cut before each assistant message: a turn never splits a call from its result."""
    turns: list[list[dict[str, Any]]] = []
    for message in messages:
        if message["role"] == "assistant" or not turns:
            turns.append([])
        turns[-1].append(message)
    return turns


def fit_context(messages: Sequence[dict[str, Any]], budget_tokens: float, tokens_per_char: float,
                fixed_chars: int = 0) -> list[dict[str, Any]]:
    """The messages to send so that their estimated size fits `budget_tokens` (the policy of the module
    docstring). `fixed_chars` are characters sent with every request (the tool definitions); the estimate is
    `(characters of the messages + fixed_chars) * tokens_per_char`. The input is not modified."""
    sizes = [_chars(m) for m in messages]
    total = sum(sizes) + fixed_chars
    budget_chars = budget_tokens / tokens_per_char
    if total <= budget_chars:
        return list(messages)
    head, turns = list(messages[:2]), _turns([dict(m) for m in messages[2:]])
    elided_chars = len(json.dumps(ELIDED))

    def elide(turn: list[dict[str, Any]]) -> bool:
        nonlocal total
        for message in turn:
            if message["role"] == "tool" and message.get("content") != ELIDED:
                total -= len(json.dumps(message.get("content"), ensure_ascii=False)) - elided_chars
                message["content"] = ELIDED
                if total <= budget_chars:
                    return True
        return False

    for turn in turns[:-1]:
        if elide(turn):
            return head + [m for t in turns for m in t]
    while len(turns) > 1 and total > budget_chars:
        total -= sum(_chars(m) for m in turns.pop(0))
    if total > budget_chars and turns:
        elide(turns[-1])
    return head + [m for t in turns for m in t]


# -- the loop ----------------------------------------------------------------------------------------------------

def _call_id() -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


class _Run:
    """The state of one run of `run_agent`: the conversation, the counters and the trajectory."""

    def __init__(self, toolbox: ToolBox, config: AgentConfig, client: ChatClient, model: str,
                 state: TrajectoryState, writer: TrajectoryWriter | None,
                 on_event: Callable[[Mapping[str, Any]], None] | None) -> None:
        self.toolbox, self.config, self.client, self.model = toolbox, config, client, model
        self.messages = state.messages
        self.steps, self.prompt_tokens, self.completion_tokens = state.steps, state.prompt_tokens, \
            state.completion_tokens
        self.empty_streak = state.empty_streak
        self.started = time.monotonic() - state.elapsed
        self.writer, self.on_event = writer, on_event
        self.tokens_per_char = 0.25
        self.context_scale = 1.0
        self.fixed_chars = len(json.dumps(TOOL_SPECS, ensure_ascii=False))

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def record(self, obj: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(obj)
        if self.on_event is not None:
            self.on_event(obj)

    def add(self, message: dict[str, Any], meta: Mapping[str, Any] | None = None) -> None:
        self.messages.append(message)
        self.record({**message, "meta": {"step": self.steps, **(meta or {}), "elapsed": round(self.elapsed, 6)}})

    def end(self, reason: str, message: str | None) -> AgentResult:
        result = AgentResult(reason, self.steps, message, self.prompt_tokens, self.completion_tokens)
        self.record({"event": "end", **dataclasses.asdict(result), "meta": {"elapsed": round(self.elapsed, 6)}})
        return result

    # -- one step ---------------------------------------------------------------------------------------------

    def limit_reached(self) -> str | None:
        if self.steps >= self.config.max_steps:
            return "max_steps"
        if self.elapsed >= self.config.max_seconds:
            return "max_seconds"
        total = self.prompt_tokens + self.completion_tokens
        if self.config.max_total_tokens is not None and total >= self.config.max_total_tokens:
            return "max_total_tokens"
        return None

    def request(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        messages = self.messages
        if self.config.context_tokens is not None:
            reserve = self.config.max_tokens or self.config.context_tokens // 8
            budget = (self.config.context_tokens - reserve) * self.context_scale
            messages = fit_context(self.messages, budget, self.tokens_per_char, self.fixed_chars)
        body: dict[str, Any] = {"model": self.model, "messages": messages, "tools": TOOL_SPECS,
                                "tool_choice": "auto", "temperature": self.config.temperature}
        if self.config.max_tokens is not None:
            body["max_tokens"] = self.config.max_tokens
        return body, messages

    def call_model(self) -> tuple[ChatReply, list[dict[str, Any]], int]:
        """The model's reply to the conversation, after bounded retries of transient failures and of a prompt
        the server found too long (its messages as sent, and the attempts made). Raises EndpointError."""
        retries = context_retries = 0
        while True:
            body, sent = self.request()
            remaining = self.config.max_seconds - self.elapsed
            try:
                return self.client.chat(body, timeout=max(1.0, min(self.config.request_timeout, remaining))), \
                    sent, retries + context_retries + 1
            except EndpointError as err:
                too_long = err.code == "context_length_exceeded" or (
                    err.status == 400 and "context length" in str(err).lower())
                if too_long and self.config.context_tokens is not None and context_retries < CONTEXT_RETRIES:
                    context_retries += 1
                    self.context_scale *= 0.8
                    logger.info("the endpoint found the prompt too long; cutting the context budget to %.0f%%",
                                100 * self.context_scale)
                    continue
                wait = self.config.retry_backoff * 2 ** retries
                if not err.retryable or retries >= self.config.max_retries or self.elapsed + wait >= \
                        self.config.max_seconds:
                    raise
                retries += 1
                logger.warning("model call failed (%s); retry %d of %d in %.1f s", err, retries,
                               self.config.max_retries, wait)
                time.sleep(wait)

    def count_tokens(self, reply: ChatReply, sent: Sequence[dict[str, Any]]) -> dict[str, Any]:
        sent_chars = sum(_chars(m) for m in sent) + self.fixed_chars
        if reply.prompt_tokens is not None and reply.completion_tokens is not None:
            prompt, completion, estimated = reply.prompt_tokens, reply.completion_tokens, False
            if prompt > 0:
                self.tokens_per_char = prompt / sent_chars
        else:  # a server without usage: counted at 4 characters per token
            prompt, completion, estimated = sent_chars // 4, _chars(reply.message) // 4, True
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
        if estimated:
            usage["estimated"] = True
        return usage

    def run_calls(self, calls: Sequence[Mapping[str, Any]]) -> str | None:
        """Run tool calls in order, appending their results; finish's message if one of them finished."""
        finished: str | None = None
        for call in calls:
            function = call.get("function") or {}
            name, arguments = str(function.get("name", "")), str(function.get("arguments", ""))
            message = {"role": "tool", "tool_call_id": call["id"], "name": name}
            if finished is not None:
                self.add({**message, "content": NOT_RUN}, {"seconds": 0.0, "error": True, "finished": False})
                continue
            start = time.monotonic()
            outcome = self.toolbox.call(name, arguments)
            meta: dict[str, Any] = {"seconds": round(time.monotonic() - start, 6), "error": outcome.error,
                                    "finished": outcome.finished}
            if outcome.finished:
                finished = outcome.message or ""
                meta["message"] = finished
            self.add({**message, "content": outcome.content}, meta)
        return finished

    def pending(self) -> str | None:
        """Complete the last turn of a resumed conversation: run the calls without a result, remind after a
        text-only reply. Finish's message if a call finished."""
        last = max((i for i, m in enumerate(self.messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return None
        assistant = self.messages[last]
        if not assistant.get("tool_calls"):
            if last == len(self.messages) - 1:
                self.add({"role": "user", "content": NUDGE})
            return None
        answered = {m.get("tool_call_id") for m in self.messages[last + 1:] if m["role"] == "tool"}
        return self.run_calls([c for c in assistant["tool_calls"] if c["id"] not in answered])

    def loop(self) -> AgentResult:
        try:
            finished = self.pending()
        except TramontaneError as err:
            return self.end("error", f"a tool could not run: {err}")
        if finished is not None:
            return self.end("finish", finished)
        while True:
            reason = self.limit_reached()
            if reason is not None:
                return self.end(reason, None)
            start = time.monotonic()
            try:
                reply, sent, attempts = self.call_model()
            except EndpointError as err:
                if self.elapsed >= self.config.max_seconds:
                    return self.end("max_seconds", None)
                return self.end("error", str(err))
            model_seconds = round(time.monotonic() - start, 6)
            self.steps += 1
            usage = self.count_tokens(reply, sent)
            meta = {"model_seconds": model_seconds, "usage": usage, "finish_reason": reply.finish_reason}
            if attempts > 1:
                meta["attempts"] = attempts
            message = dict(reply.message)
            content = message.get("content")
            calls = message.get("tool_calls") or []
            if not calls and not (content or "").strip():
                self.empty_streak += 1
                self.record({"event": "empty_reply", "meta": {"step": self.steps, **meta,
                                                              "elapsed": round(self.elapsed, 6)}})
                if self.empty_streak >= EMPTY_REPLIES_LIMIT:
                    return self.end("error", f"the model answered with neither content nor a tool call "
                                             f"{self.empty_streak} times in a row")
                continue
            self.empty_streak = 0
            for call in calls:  # a result must name its call: servers that send no id get one
                if not call.get("id"):
                    call["id"] = _call_id()
            self.add(message, meta)
            if not calls:
                self.add({"role": "user", "content": NUDGE})
                continue
            try:
                finished = self.run_calls(calls)
            except TramontaneError as err:
                return self.end("error", f"a tool could not run: {err}")
            if finished is not None:
                return self.end("finish", finished)


def system_prompt(workspace: Path | None = None) -> str:
    """The system prompt: the tools, `finish`, and the workspace when given."""
    if workspace is None:
        return SYSTEM_PROMPT
    return SYSTEM_PROMPT + f"\n\nThe workspace is {workspace}; your commands start there and only it is writable."


def run_agent(task: str, toolbox: ToolBox, config: AgentConfig, *, trajectory: Path | None = None,
              resume: bool = False, workspace: Path | None = None,
              on_event: Callable[[Mapping[str, Any]], None] | None = None) -> AgentResult:
    """Run the agent on `task` until it finishes or a limit stops it (see the module docstring).

    Args:
        task: the user's task; with `resume`, it may be "" (the trajectory's task is used).
        toolbox: the tools, bound to a sandbox on the workspace.
        config: endpoint, model and limits.
        trajectory: JSONL file the run is written to as it goes (a new file unless `resume`).
        resume: continue the run in `trajectory` (a missing or empty file starts a new one); a run that
            ended with `finish` is not continued, its result is returned.
        workspace: named in the system prompt, so the model knows where to work.
        on_event: called with every trajectory line (as a dict) when it is written, e.g. to show progress.

    Raises:
        ConfigError: `resume` with another task than the trajectory's, or without a trajectory.
        EndpointError: the endpoint's model list cannot be read (with `model` None) before the run starts.
        DataError: the trajectory exists (without `resume`) or cannot be read.
    """
    if resume and trajectory is None:
        raise ConfigError("resume needs the trajectory file of the run to continue")
    client = ChatClient(config.endpoint, api_key=config.api_key, timeout=config.request_timeout)
    state: TrajectoryState | None = None
    if resume and trajectory is not None and trajectory.exists() and has_lines(trajectory):
        state = read_trajectory(trajectory)
        if task and task != state.task:
            raise ConfigError(f"{trajectory} is the trajectory of another task; resume it with its own task (or "
                              "none), or start a new trajectory file")
        if state.finished is not None or (state.end is not None and state.end.get("reason") == "finish"):
            message = state.finished if state.finished is not None else (state.end or {}).get("message")
            return AgentResult("finish", state.steps, message, state.prompt_tokens, state.completion_tokens)
    elif not task.strip():
        raise ConfigError("the task is empty; say what the agent should do")
    model = config.model or (state.model if state is not None else None) or _default_model(client, config)
    writer: TrajectoryWriter | None = None
    try:
        if trajectory is not None:
            if resume and state is None and trajectory.exists():  # only a torn header: nothing to continue
                trajectory.unlink()
            writer = TrajectoryWriter(trajectory, resume=state is not None)
        if state is not None:
            run = _Run(toolbox, config, client, model, state, writer, on_event)
            run.record({"event": "resume", "model": model, "config": config.public(), "time": now()})
        else:
            state = TrajectoryState(task=task, model=model, tools=list(TOOL_SPECS), config=config.public())
            run = _Run(toolbox, config, client, model, state, writer, on_event)
            run.record(start_line(task, model, config.public(), TOOL_SPECS))
            run.add({"role": "system", "content": system_prompt(workspace)})
            run.add({"role": "user", "content": task})
        return run.loop()
    finally:
        if writer is not None:
            writer.close()


def _default_model(client: ChatClient, config: AgentConfig) -> str:
    """The endpoint's first model id, with the loop's bounded retries of transient failures."""
    for attempt in range(config.max_retries + 1):
        try:
            return client.default_model()
        except EndpointError as err:
            if not err.retryable or attempt == config.max_retries:
                raise
            time.sleep(config.retry_backoff * 2 ** attempt)
    raise AssertionError("unreachable")
