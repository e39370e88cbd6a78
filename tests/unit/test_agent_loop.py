"""The agent loop driven by a scripted model (the replay endpoint, a stdlib HTTP server that shares no code
with `tramontane serve`): every tool, an unknown tool, malformed JSON arguments, a command timeout, a reply
without a tool call, `finish`; the limits; the context policy; resuming; trajectories as fine-tuning data.

The oracle of a run is a reference conversation built without the loop: the same scripted calls sent straight
to a fresh ToolBox on the same workspace, one after the other. The trajectory must equal it line for line
(timings aside) and every request the server got must carry its prefix."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest

from tramontane.agent.client import ChatClient
from tramontane.agent.loop import (
    ELIDED,
    NOT_RUN,
    NUDGE,
    AgentConfig,
    AgentResult,
    fit_context,
    run_agent,
    system_prompt,
)
from tramontane.agent.replay import ReplayServer
from tramontane.agent.sandbox import Sandbox, SandboxLimits
from tramontane.agent.tools import TOOL_SPECS, ToolBox
from tramontane.agent.trajectory import messages_for_finetune, read_trajectory, without_timing
from tramontane.errors import ConfigError, DataError, EndpointError, SandboxUnavailableError
from tramontane.finetune.data import encode_record, read_records
from tramontane.tokenizer import Tokenizer

TASK = "add() in calc.py subtracts; make it add, and add a test."
CALC = "def add(a, b):\n    return a - b\n"
TEST_FILE = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
LIMITS = SandboxLimits(wall_seconds=20.0, cpu_seconds=20)


def bwrap_works(tmp: Path) -> bool:
    try:
        Sandbox(tmp, LIMITS).close()
    except SandboxUnavailableError:
        return False
    return True


@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory: pytest.TempPathFactory) -> bool:
    """Whether commands run under bubblewrap here (the tests run either way; isolation is sandbox.py's)."""
    return bwrap_works(tmp_path_factory.mktemp("probe"))


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    reset(ws)
    return ws


def reset(ws: Path) -> None:
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    (ws / "calc.py").write_text(CALC)


def call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def script(ws: Path) -> list[dict[str, Any]]:
    """The scripted model: every tool and command, the failure cases, then finish (ids: 9 letters/digits)."""
    calc, test = str(ws / "calc.py"), str(ws / "test_calc.py")
    return [
        {"content": None, "tool_calls": [call("thnk00001", "think", {"thought": "First read calc.py."})]},
        {"content": "I will look at the workspace first."},  # no tool call: the loop reminds
        {"content": "Looking around.", "tool_calls": [  # two calls in one reply, run in order
            call("bash00001", "execute_bash", {"command": "ls"}),
            call("view00001", "str_replace_editor", {"command": "view", "path": calc})]},
        {"content": None, "tool_calls": [call("edit00001", "str_replace_editor", {
            "command": "str_replace", "path": calc, "old_str": "return a - b", "new_str": "return a + b"})]},
        {"content": None, "tool_calls": [call("edit00002", "str_replace_editor", {
            "command": "insert", "path": calc, "insert_line": 2, "new_str": "\n\ndef sub(a, b):\n    return a - b"})]},
        {"content": None, "tool_calls": [call("undo00001", "str_replace_editor", {"command": "undo_edit",
                                                                                 "path": calc})]},
        {"content": None, "tool_calls": [call("make00001", "str_replace_editor", {
            "command": "create", "path": test, "file_text": TEST_FILE})]},
        {"content": None, "tool_calls": [call("nope00001", "run_python", {"code": "print(1)"})]},
        {"content": None, "tool_calls": [call("json00001", "execute_bash", '{"command": "ls')]},
        {"content": None, "tool_calls": [call("slow00001", "execute_bash", {"command": "sleep 30", "timeout": 1})]},
        {"content": None, "tool_calls": [call("test00001", "execute_bash", {
            "command": "python3 -c 'import calc; print(calc.add(2, 3))'"})]},
        {"content": None, "tool_calls": [call("done00001", "finish", {"message": "add() adds; test added."}),
                                         call("late00001", "think", {"thought": "after finish"})]},
    ]


def config(url: str, **kwargs: Any) -> AgentConfig:
    return AgentConfig(endpoint=url, max_steps=kwargs.pop("max_steps", 30), retry_backoff=0.01, **kwargs)


_SANDBOXES: list[Sandbox] = []


@pytest.fixture(autouse=True)
def close_sandboxes() -> Iterator[None]:
    yield
    while _SANDBOXES:
        _SANDBOXES.pop().close()


def toolbox(ws: Path, sandboxed: bool) -> ToolBox:
    """Tools on `ws`, in bubblewrap where it works (closed after the test)."""
    _SANDBOXES.append(Sandbox(ws, LIMITS, unsafe_no_sandbox=not sandboxed))
    return ToolBox(_SANDBOXES[-1])


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def reference(replies: list[dict[str, Any]], ws: Path, sandboxed: bool) -> list[dict[str, Any]]:
    """The conversation the loop must produce, built without it: each scripted call sent straight to a fresh
    ToolBox (message lines with the meta the loop writes, timings left out; usage as the replay server counts
    it, 4 characters of the messages sent per token)."""
    box = toolbox(ws, sandboxed)
    out: list[dict[str, Any]] = [{"role": "system", "content": system_prompt(ws), "meta": {"step": 0}},
                                 {"role": "user", "content": TASK, "meta": {"step": 0}}]

    def conversation() -> list[dict[str, Any]]:
        return [{k: v for k, v in m.items() if k != "meta"} for m in out]

    for step, reply in enumerate(replies, start=1):
        message = {"role": "assistant", "content": reply.get("content")}
        if reply.get("tool_calls"):
            message["tool_calls"] = reply["tool_calls"]
        usage = {"prompt_tokens": len(json.dumps(conversation())) // 4,
                 "completion_tokens": len(json.dumps(message)) // 4}
        out.append({**message, "meta": {"step": step, "usage": usage,
                                        "finish_reason": "tool_calls" if reply.get("tool_calls") else "stop"}})
        if not reply.get("tool_calls"):
            out.append({"role": "user", "content": NUDGE, "meta": {"step": step}})
        finished = False
        for c in reply.get("tool_calls") or []:
            result = {"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"]}
            if finished:
                out.append({**result, "content": NOT_RUN, "meta": {"step": step, "error": True, "finished": False}})
                continue
            outcome = box.call(c["function"]["name"], c["function"]["arguments"])
            meta = {"step": step, "error": outcome.error, "finished": outcome.finished}
            if outcome.finished:
                finished = True
                meta["message"] = outcome.message
            out.append({**result, "content": outcome.content, "meta": meta})
    return out


# -- the scripted run -----------------------------------------------------------------------------------------

@pytest.fixture
def full_run(workspace: Path, tmp_path: Path, sandboxed: bool) -> Iterator[dict[str, Any]]:
    replies = script(workspace)
    trajectory = tmp_path / "run.jsonl"
    box = toolbox(workspace, sandboxed)
    with ReplayServer(replies) as server:
        result = run_agent(TASK, box, config(server.url), trajectory=trajectory, workspace=workspace)
    yield {"result": result, "trajectory": trajectory, "requests": server.requests, "replies": replies,
           "files": {p.name: p.read_text() for p in workspace.iterdir() if p.is_file()}}


def test_scripted_run_matches_the_reference_conversation(full_run: dict[str, Any], workspace: Path,
                                                         sandboxed: bool) -> None:
    result, replies = full_run["result"], full_run["replies"]
    written = lines(full_run["trajectory"])
    reset(workspace)
    expected = reference(replies, workspace, sandboxed)
    header, messages, end = written[0], written[1:-1], written[-1]

    assert header["event"] == "start" and header["version"] == 1 and header["task"] == TASK
    assert header["model"] == "replay" and header["tools"] == TOOL_SPECS
    assert header["config"] == config(header["config"]["endpoint"]).public()
    assert "api_key" not in header["config"]
    assert without_timing(messages) == expected
    total_prompt = sum(m["meta"]["usage"]["prompt_tokens"] for m in expected if "usage" in m["meta"])
    total_completion = sum(m["meta"]["usage"]["completion_tokens"] for m in expected if "usage" in m["meta"])
    assert result == AgentResult("finish", len(replies), "add() adds; test added.", total_prompt, total_completion)
    assert without_timing(end) == {"event": "end", "reason": "finish", "steps": len(replies),
                                   "message": "add() adds; test added.", "prompt_tokens": total_prompt,
                                   "completion_tokens": total_completion, "meta": {}}
    for line in messages:  # the timings are there, and plausible
        assert 0 <= line["meta"]["elapsed"] < 60
        if line["role"] == "assistant":
            assert 0 <= line["meta"]["model_seconds"] < 10


def test_scripted_run_requests_carry_the_conversation(full_run: dict[str, Any]) -> None:
    written = [line for line in lines(full_run["trajectory"]) if "role" in line]
    requests = full_run["requests"]
    assert len(requests) == len(full_run["replies"])
    assistant_rows = [i for i, line in enumerate(written) if line["role"] == "assistant"]
    for request, row in zip(requests, assistant_rows, strict=True):
        assert request["messages"] == [{k: v for k, v in m.items() if k != "meta"} for m in written[:row]]
        assert request["tools"] == TOOL_SPECS and request["tool_choice"] == "auto"
        assert request["model"] == "replay" and request["temperature"] == 0.0 and request["stream"] is False
        assert "max_tokens" not in request


def test_scripted_run_tools_did_their_work(full_run: dict[str, Any], workspace: Path) -> None:
    """What each tool did, checked on the files and outputs themselves (not against the reference)."""
    assert full_run["files"] == {"calc.py": CALC.replace("a - b", "a + b"), "test_calc.py": TEST_FILE}
    results = {line["tool_call_id"]: line for line in lines(full_run["trajectory"]) if line.get("role") == "tool"}
    assert set(results) == {c["id"] for r in full_run["replies"] for c in r.get("tool_calls") or []}
    assert "calc.py" in results["bash00001"]["content"]
    assert "return a - b" in results["view00001"]["content"]
    assert "def sub" in results["edit00002"]["content"]
    for ok in ("thnk00001", "bash00001", "view00001", "edit00001", "edit00002", "undo00001", "make00001",
               "test00001", "done00001"):
        assert results[ok]["meta"]["error"] is False, results[ok]
    for bad in ("nope00001", "json00001", "slow00001", "late00001"):
        assert results[bad]["meta"]["error"] is True, results[bad]
    assert "run_python" in results["nope00001"]["content"]
    assert "JSON" in results["json00001"]["content"] or "json" in results["json00001"]["content"]
    assert results["slow00001"]["meta"]["seconds"] < 10  # stopped at its 1 s timeout, not after 30 s
    assert "5" in results["test00001"]["content"].split()
    assert results["done00001"]["meta"]["finished"] is True
    assert results["late00001"]["content"] == NOT_RUN
    nudges = [line for line in lines(full_run["trajectory"]) if line.get("role") == "user"][1:]
    assert [n["content"] for n in nudges] == [NUDGE]


def test_trajectory_is_finetune_data(full_run: dict[str, Any], tmp_path: Path) -> None:
    record = messages_for_finetune(full_run["trajectory"])
    assert record["tools"] == TOOL_SPECS
    assert record["messages"][-1]["role"] == "assistant"
    assert record["messages"][-1]["tool_calls"][0]["function"]["name"] == "finish"
    assert all("meta" not in m for m in record["messages"])
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (parsed,) = read_records(path)
    assert parsed.messages == record["messages"]
    encoded = encode_record(Tokenizer.builtin("v7"), parsed)
    assert sum(encoded.loss_mask) > 0  # the assistant turns are trained


# -- resuming --------------------------------------------------------------------------------------------------

def test_resume_from_a_torn_trajectory_continues_where_it_stopped(full_run: dict[str, Any], workspace: Path,
                                                                  tmp_path: Path, sandboxed: bool) -> None:
    replies = full_run["replies"]
    reset(workspace)
    trajectory = tmp_path / "partial.jsonl"
    box = toolbox(workspace, sandboxed)
    with ReplayServer(replies[:3]) as server:  # a run stopped after 3 steps...
        first = run_agent(TASK, box, config(server.url, max_steps=3), trajectory=trajectory, workspace=workspace)
    assert first.reason == "max_steps" and first.steps == 3
    # ... and cut as a crash would: in step 3, after its first tool result, in the middle of a line
    kept = []
    for line in trajectory.read_text().splitlines(keepends=True):
        kept.append(line)
        if json.loads(line).get("tool_call_id") == "bash00001":
            break
    trajectory.write_text("".join(kept) + '{"role": "tool", "tool_call_id": "view000')
    state = read_trajectory(trajectory)
    assert state.steps == 3 and state.messages[-1]["tool_call_id"] == "bash00001"

    with ReplayServer(replies[3:]) as server:
        result = run_agent("", box, config(server.url), trajectory=trajectory, resume=True, workspace=workspace)
    assert result == full_run["result"]
    resumed = [line for line in lines(trajectory) if line.get("event") != "resume"]
    assert [line.get("event") for line in lines(trajectory)].count("resume") == 1
    original = lines(full_run["trajectory"])
    assert resumed[0]["task"] == TASK and resumed[0]["config"]["max_steps"] == 3  # the first run's header
    assert without_timing(resumed[1:]) == without_timing(original[1:])
    assert server.requests == full_run["requests"][3:]
    assert {p.name: p.read_text() for p in workspace.iterdir() if p.is_file()} == full_run["files"]

    with ReplayServer([]) as server:  # a finished run is not continued
        again = run_agent("", box, config(server.url), trajectory=trajectory, resume=True)
    assert again == result and server.requests == []


def test_resume_refuses_another_task_and_new_runs_refuse_an_existing_file(tmp_path: Path, workspace: Path,
                                                                         sandboxed: bool) -> None:
    trajectory = tmp_path / "t.jsonl"
    box = toolbox(workspace, sandboxed)
    with ReplayServer([{"content": None, "tool_calls": [call("done00001", "finish", {"message": "ok"})]}]) as s:
        assert run_agent(TASK, box, config(s.url), trajectory=trajectory).reason == "finish"
        with pytest.raises(DataError, match="exists already"):
            run_agent(TASK, box, config(s.url), trajectory=trajectory)
        with pytest.raises(ConfigError, match="another task"):
            run_agent("something else", box, config(s.url), trajectory=trajectory, resume=True)


# -- limits and errors ----------------------------------------------------------------------------------------

def think(i: int) -> dict[str, Any]:
    return {"content": None, "tool_calls": [call(f"think{i:04d}", "think", {"thought": f"step {i}"})]}


def test_step_limit(workspace: Path, sandboxed: bool, tmp_path: Path) -> None:
    with ReplayServer([think(i) for i in range(6)]) as server:
        result = run_agent(TASK, toolbox(workspace, sandboxed), config(server.url, max_steps=3),
                           trajectory=tmp_path / "t.jsonl")
    assert (result.reason, result.steps, result.message) == ("max_steps", 3, None)
    assert len(server.requests) == 3 and server.remaining == 3
    assert lines(tmp_path / "t.jsonl")[-1]["reason"] == "max_steps"


def test_time_limit(workspace: Path, sandboxed: bool) -> None:
    slow = {"content": None, "tool_calls": [call("slow00001", "execute_bash", {"command": "sleep 1.2"})]}
    with ReplayServer([slow, think(1), think(2)]) as server:
        start = time.monotonic()
        result = run_agent(TASK, toolbox(workspace, sandboxed), config(server.url, max_seconds=1.0))
    assert (result.reason, result.steps) == ("max_seconds", 1)  # the step that crossed the limit completed
    assert len(server.requests) == 1 and 1.2 <= time.monotonic() - start < 10


def test_token_limit(workspace: Path, sandboxed: bool) -> None:
    with ReplayServer([think(i) for i in range(5)]) as server:
        result = run_agent(TASK, toolbox(workspace, sandboxed), config(server.url, max_total_tokens=1))
    assert (result.reason, result.steps) == ("max_total_tokens", 1)
    # the counts are the server's usage: 4 characters of the messages sent per token
    assert result.prompt_tokens == len(json.dumps(server.requests[0]["messages"])) // 4 > 1
    with ReplayServer([think(i) for i in range(5)]) as server:
        budget = 2 * result.prompt_tokens + 1  # two steps' worth: the second prompt is longer, so 2 steps
        second = run_agent(TASK, toolbox(workspace, sandboxed), config(server.url, max_total_tokens=budget))
    assert (second.reason, second.steps) == ("max_total_tokens", 2)
    assert second.prompt_tokens + second.completion_tokens >= budget


def test_endpoint_errors_end_the_run(workspace: Path, sandboxed: bool) -> None:
    box = toolbox(workspace, sandboxed)
    with ReplayServer([think(1)]) as server:  # the script runs out: HTTP 409, not retried
        result = run_agent(TASK, box, config(server.url))
    assert (result.reason, result.steps) == ("error", 1)
    assert "409" in result.message and "exhausted" in result.message
    assert len(server.requests) == 2

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    result = run_agent(TASK, box, config(url, model="m", max_retries=2))
    assert result.reason == "error" and result.steps == 0 and "no answer" in result.message
    with pytest.raises(EndpointError, match="no answer"):  # the model list is read before the run starts
        run_agent(TASK, box, config(url, max_retries=0))


class FlakyEndpoint:
    """Answers 503 to the first `failures` chat requests, then forwards to a replay server (a stdlib proxy)."""

    def __init__(self, replay: ReplayServer, failures: int) -> None:
        outer = self
        self.statuses: list[int] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if len(outer.statuses) < failures:
                    status, data = 503, b'{"error": {"message": "busy, try again", "code": null}}'
                else:
                    request = urllib.request.Request(replay.url + "/chat/completions", data=body,
                                                     headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(request, timeout=10) as answer:
                        status, data = answer.status, answer.read()
                outer.statuses.append(status)
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_transient_failures_are_retried_a_bounded_number_of_times(workspace: Path, sandboxed: bool,
                                                                    tmp_path: Path) -> None:
    done = {"content": None, "tool_calls": [call("done00001", "finish", {"message": "ok"})]}
    with ReplayServer([done]) as replay:
        flaky = FlakyEndpoint(replay, failures=2)
        try:
            result = run_agent(TASK, toolbox(workspace, sandboxed), config(flaky.url, model="replay", max_retries=2),
                               trajectory=tmp_path / "t.jsonl")
        finally:
            flaky.close()
    assert (result.reason, result.steps, result.message) == ("finish", 1, "ok")
    assert flaky.statuses == [503, 503, 200]
    (reply,) = [line for line in lines(tmp_path / "t.jsonl") if line.get("role") == "assistant"]
    assert reply["meta"]["attempts"] == 3

    with ReplayServer([done]) as replay:
        flaky = FlakyEndpoint(replay, failures=3)
        try:
            result = run_agent(TASK, toolbox(workspace, sandboxed), config(flaky.url, model="replay", max_retries=2))
        finally:
            flaky.close()
    assert (result.reason, result.steps) == ("error", 0) and "HTTP 503: busy, try again" in result.message
    assert flaky.statuses == [503, 503, 503] and replay.requests == []


def test_empty_replies_end_the_run(workspace: Path, sandboxed: bool, tmp_path: Path) -> None:
    replies = [{"content": ""}, {"content": None}, {"content": "  \n"}, think(1)]
    with ReplayServer(replies) as server:
        result = run_agent(TASK, toolbox(workspace, sandboxed), config(server.url), trajectory=tmp_path / "t.jsonl")
    assert (result.reason, result.steps) == ("error", 3) and "3 times in a row" in result.message
    events = [line.get("event") for line in lines(tmp_path / "t.jsonl")]
    assert events == ["start", None, None, "empty_reply", "empty_reply", "empty_reply", "end"]
    # an empty reply is no part of the conversation: every request carried the same two messages
    assert [len(r["messages"]) for r in server.requests] == [2, 2, 2]


# -- the context policy ---------------------------------------------------------------------------------------

def size(messages: list[dict[str, Any]], fixed: int = 0) -> int:
    """Characters as the policy counts them, written out independently: each message's JSON plus 2."""
    return sum(len(json.dumps(m, ensure_ascii=False)) + 2 for m in messages) + fixed


def conversation_with_outputs() -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "S"}, {"role": "user", "content": "T"}]
    for turn in range(3):
        msgs.append({"role": "assistant", "content": None, "tool_calls": [
            call(f"a{turn}", "execute_bash", {"command": "x"}), call(f"b{turn}", "execute_bash", {"command": "y"})]})
        msgs.append({"role": "tool", "tool_call_id": f"a{turn}", "name": "execute_bash", "content": "A" * 400})
        msgs.append({"role": "tool", "tool_call_id": f"b{turn}", "name": "execute_bash", "content": "B" * 400})
        if turn == 1:
            msgs += [{"role": "assistant", "content": "hmm"}, {"role": "user", "content": NUDGE}]
    return msgs


def elided(message: dict[str, Any]) -> dict[str, Any]:
    return {**message, "content": ELIDED}


def test_fit_context_keeps_what_fits() -> None:
    msgs = conversation_with_outputs()
    assert fit_context(msgs, size(msgs, 100), 1.0, fixed_chars=100) == msgs
    assert fit_context(msgs, size(msgs, 100) / 4, 0.25, fixed_chars=100) == msgs  # the rate scales the budget


def test_fit_context_elides_oldest_outputs_first() -> None:
    msgs = conversation_with_outputs()
    before = [json.dumps(m) for m in msgs]
    saved = size(msgs) - size([*msgs[:3], elided(msgs[3]), *msgs[4:]])
    out = fit_context(msgs, size(msgs) - saved, 1.0)
    assert out == msgs[:3] + [elided(msgs[3])] + msgs[4:]
    out = fit_context(msgs, size(msgs) - saved - 1, 1.0)  # one character more: the next output goes too
    assert out == msgs[:3] + [elided(msgs[3]), elided(msgs[4])] + msgs[5:]
    assert [json.dumps(m) for m in msgs] == before  # the conversation itself is untouched


def test_fit_context_drops_whole_turns_then_elides_the_last() -> None:
    msgs = conversation_with_outputs()
    # turns after the task: [a0 t t] [a1 t t] [hmm nudge] [a2 t t]
    all_but_last_elided = msgs[:3] + [elided(msgs[3]), elided(msgs[4]), msgs[5], elided(msgs[6]),
                                      elided(msgs[7])] + msgs[8:]
    assert fit_context(msgs, size(all_but_last_elided), 1.0) == all_but_last_elided
    without_first = msgs[:2] + [msgs[5], elided(msgs[6]), elided(msgs[7])] + msgs[8:]
    assert fit_context(msgs, size(without_first), 1.0) == without_first
    only_last = msgs[:2] + msgs[10:]
    assert fit_context(msgs, size(only_last), 1.0) == only_last
    last_elided = msgs[:2] + [msgs[10], elided(msgs[11]), elided(msgs[12])]
    assert fit_context(msgs, size(last_elided), 1.0) == last_elided
    assert fit_context(msgs, 10, 1.0) == last_elided  # nothing more to cut: sent as small as it gets
    for out in (without_first, only_last, last_elided):  # no result without its call, no call without results
        ids = [c["id"] for m in out for c in m.get("tool_calls") or []]
        assert ids == [m["tool_call_id"] for m in out if m["role"] == "tool"]


def test_loop_applies_the_context_policy(workspace: Path, sandboxed: bool, tmp_path: Path) -> None:
    big = [{"content": None, "tool_calls": [call(f"seq{i:06d}", "execute_bash", {"command": "seq 1 1500"})]}
           for i in range(3)]
    with ReplayServer([*big, think(9)]) as server:
        result = run_agent(TASK, toolbox(workspace, sandboxed),
                           config(server.url, max_steps=4, context_tokens=6000, max_tokens=100),
                           trajectory=tmp_path / "t.jsonl")
    assert result.reason == "max_steps"
    full = [line for line in lines(tmp_path / "t.jsonl") if line.get("name") == "execute_bash"]
    assert len(full) == 3 and all("1500" in line["content"] for line in full)  # the trajectory keeps them all
    last = server.requests[-1]["messages"]
    assert last[:2] == [m for m in server.requests[0]["messages"]]  # system prompt and task always sent
    tools = [m for m in last if m["role"] == "tool"]
    assert tools[0]["content"] == ELIDED and "1500" in tools[-1]["content"]
    tokens = len(json.dumps(TOOL_SPECS)) / 4 + size(last) / 4
    assert tokens <= 6000 - 100


# -- the client and the replay server ---------------------------------------------------------------------------

def test_replay_server_speaks_openai_to_the_openai_client() -> None:
    reply = {"content": None, "tool_calls": [call("abcDEF123", "think", {"thought": "x"})]}
    with ReplayServer([reply, {"content": "done"}], model="scripted") as server:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=10)
        assert [m.id for m in client.models.list()] == ["scripted"]
        first = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
        assert first.choices[0].finish_reason == "tool_calls"
        assert first.choices[0].message.tool_calls[0].id == "abcDEF123"
        assert first.usage.prompt_tokens == len(json.dumps([{"role": "user", "content": "hi"}])) // 4
        second = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
        assert (second.choices[0].finish_reason, second.choices[0].message.content) == ("stop", "done")
        assert first.id != second.id
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 409
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="scripted", prompt="hi")
    assert len(server.requests) == 3


def test_client_errors_say_what_went_wrong() -> None:
    with ReplayServer([]) as server:
        client = ChatClient(server.url, api_key="secret", timeout=5)
        assert client.default_model() == "replay" and "secret" not in repr(client)
        with pytest.raises(EndpointError, match="HTTP 409: the replay script is exhausted") as err:
            client.chat({"model": "replay", "messages": []})
        assert err.value.status == 409 and not err.value.retryable and err.value.code == "script_exhausted"
        with pytest.raises(EndpointError, match="HTTP 404.*ending in /v1"):
            ChatClient(server.url.removesuffix("/v1"), timeout=5).models()
    with pytest.raises(ConfigError, match="not an http"):
        ChatClient("127.0.0.1:8000/v1")
    with pytest.raises(ConfigError, match="max_steps"):
        AgentConfig(endpoint="http://x/v1", max_steps=0)
    with pytest.raises(ConfigError, match="context_tokens"):
        AgentConfig(endpoint="http://x/v1", context_tokens=100, max_tokens=100)
