"""The agent against `tramontane serve` on tiny checkpoints (live uvicorn servers on loopback, in threads), and
a scaffold nobody here wrote, mini-swe-agent, against the same server.

- A random model writes garbage: the loop must survive it and run to its step limit.
- A model rigged to call `think` every turn: real tool calls parsed by the server, their ids and results sent
  back turn after turn, and the trajectory usable as fine-tuning data for that very tokenizer.
- The `tramontane agent` command on the rigged server, then `--resume`.
- mini-swe-agent's DefaultAgent with its LiteLLM text-protocol model and a LocalEnvironment, programmatically
  (no config file, no network), pointed at `tramontane serve`: a random model writes no valid action, so it
  runs until its own step limit; every request must have been answered 200.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import random_model, tiny_args
from tests.integration.serve_fixtures import (  # noqa: F401 - one_torch_thread applies to the module
    ARGS,
    LiveServer,
    one_torch_thread,
    tekken_tokenizer,
    text_checkpoint,
)
from tramontane.agent.loop import AgentConfig, run_agent
from tramontane.agent.sandbox import Sandbox, SandboxLimits
from tramontane.agent.tools import ToolBox
from tramontane.agent.trajectory import messages_for_finetune, read_trajectory
from tramontane.cli import main
from tramontane.errors import SandboxUnavailableError
from tramontane.finetune.data import encode_record, records_from_dicts
from tramontane.models.checkpoint import save_model
from tramontane.serve.app import create_app
from tramontane.serve.engine import EngineConfig
from tramontane.serve.loading import load_served_model
from tramontane.tokenizer import Tokenizer

MAX_MODEL_LEN = 4096  # the agent's first prompt (system prompt, four tool definitions, task): 1.6k tokens
SMALL_LEN = 2048  # the random model's server: a few turns overflow it, so the context policy must act
TASK = "List the files of the workspace, then finish."
LIMITS = SandboxLimits(wall_seconds=10.0, cpu_seconds=10)
TOOL_RESULTS_END = 8  # [/TOOL_RESULTS] in v11+ tekken files
END_INST, TOOL_CALLS = 4, 9  # [/INST], [TOOL_CALLS]


def _bwrap_works(tmp: Path) -> bool:
    try:
        Sandbox(tmp, LIMITS).close()
    except SandboxUnavailableError:
        return False
    return True


@pytest.fixture(scope="module", autouse=True)
def bubblewrap(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A model's garbage commands run only inside the sandbox: no bubblewrap, no test."""
    if not _bwrap_works(tmp_path_factory.mktemp("probe")):
        pytest.skip("bubblewrap cannot create its namespaces here")


class Recorded:
    """ASGI wrapper that records (method, path, status) of every HTTP response the app sends."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.responses: list[tuple[str, str, int]] = []

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def recorded(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.responses.append((scope["method"], scope["path"], message["status"]))
            await send(message)

        await self.app(scope, receive, recorded)

    def chat_statuses(self) -> list[int]:
        return [status for method, path, status in self.responses if path == "/v1/chat/completions"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return tekken_tokenizer("v11", tmp_path_factory.mktemp("tok") / "tekken.json")


def think_checkpoint(path: Path, tokenizer: Tokenizer) -> Path:
    """A model whose greedy next token depends only on the current one, rigged so that after [/INST] or
    [/TOOL_RESULTS] it writes `[TOOL_CALLS]think[ARGS]{"thought": "hi"}` and EOS (attention and feed-forward
    outputs zero, so the last hidden state is the token's embedding: a basis vector per rigged token)."""
    call = [TOOL_CALLS, *tokenizer.encode("think", bos=False), ARGS,
            *tokenizer.encode('{"thought": "hi"}', bos=False), tokenizer.eos_id]
    following = {END_INST: TOOL_CALLS, TOOL_RESULTS_END: TOOL_CALLS, **dict(itertools.pairwise(call))}
    dim = 64
    assert len(following) < dim
    model = random_model(tiny_args(vocab_size=tokenizer.vocab_size, dim=dim, head_dim=16, n_layers=1), seed=3)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.norm.weight.fill_(1.0)
        model.output.weight.zero_()
        for i, (token, nxt) in enumerate(following.items()):
            model.tok_embeddings.weight[token].zero_()
            model.tok_embeddings.weight[token, i] = 1.0
            model.output.weight[nxt, i] = 10.0
    save_model(model, path)
    shutil.copy(tokenizer.path, path / "tekken.json")
    return path


def serve(path: Path, max_model_len: int) -> tuple[LiveServer, Recorded, str]:
    served = load_served_model(path)
    app = Recorded(create_app(served, engine_config=EngineConfig(max_batch=4, max_model_len=max_model_len)))
    return LiveServer(app), app, served.name


@pytest.fixture(scope="module")
def random_server(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Recorded,
                                                                                                       str]]:
    path = text_checkpoint(tmp_path_factory.mktemp("ckpt") / "random", tokenizer, seed=5, file_name="tekken.json")
    server, app, name = serve(path, SMALL_LEN)
    with server:
        yield f"{server.url}/v1", app, name


@pytest.fixture(scope="module")
def think_server(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Recorded]]:
    server, app, _ = serve(think_checkpoint(tmp_path_factory.mktemp("ckpt") / "thinker", tokenizer), MAX_MODEL_LEN)
    with server:
        yield f"{server.url}/v1", app


def agent_config(url: str, **kwargs: Any) -> AgentConfig:
    return AgentConfig(endpoint=url, max_tokens=16, context_tokens=kwargs.pop("context_tokens", MAX_MODEL_LEN),
                       max_seconds=120, request_timeout=60, max_retries=0, **kwargs)


def test_the_loop_survives_a_random_model(random_server: tuple[str, Recorded, str], tmp_path: Path) -> None:
    url, app, name = random_server
    workspace = tmp_path / "ws"
    workspace.mkdir()
    before = len(app.responses)
    steps = 8  # each turn adds about 70 tokens: by the last steps the whole conversation exceeds SMALL_LEN
    with Sandbox(workspace, LIMITS) as sandbox:
        result = run_agent(TASK, ToolBox(sandbox), agent_config(url, max_steps=steps, context_tokens=SMALL_LEN),
                           trajectory=tmp_path / "t.jsonl", workspace=workspace)
    assert (result.reason, result.steps) == ("max_steps", steps), result
    assert result.prompt_tokens > steps * 1000 and steps <= result.completion_tokens <= steps * 16
    assert app.responses[before] == ("GET", "/v1/models", 200)  # the model id came from the server
    assert app.chat_statuses()[-steps:] == [200] * steps and len(app.responses) - before == steps + 1
    state = read_trajectory(tmp_path / "t.jsonl")
    assert state.model == name and state.steps == steps and state.end is not None
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    replies = [line for line in lines if line.get("role") == "assistant" or line.get("event") == "empty_reply"]
    assert [r["meta"]["step"] for r in replies] == list(range(1, steps + 1))
    prompts = [r["meta"]["usage"]["prompt_tokens"] for r in replies]
    assert all(r["meta"]["usage"]["completion_tokens"] <= 16 for r in replies)
    # the whole conversation outgrew the context (each prompt carried more than the one before, until turns had
    # to be dropped), yet every prompt left room for the completion, as the server's usage counts it
    growth = prompts[1] - prompts[0]
    assert growth > 0 and prompts[0] + (steps - 1) * growth > SMALL_LEN - 16
    assert max(prompts) <= SMALL_LEN - 16 and prompts[-1] < prompts[0] + (steps - 1) * growth


def test_tool_calls_round_trip_through_tramontane_serve(think_server: tuple[str, Recorded], tokenizer: Tokenizer,
                                                        tmp_path: Path) -> None:
    url, app = think_server
    workspace = tmp_path / "ws"
    workspace.mkdir()
    before = len(app.chat_statuses())
    with Sandbox(workspace, LIMITS) as sandbox:
        result = run_agent(TASK, ToolBox(sandbox), agent_config(url, max_steps=3), trajectory=tmp_path / "t.jsonl",
                           workspace=workspace)
    assert (result.reason, result.steps) == ("max_steps", 3), result
    assert app.chat_statuses()[before:] == [200] * 3  # calls and results sent back were accepted each turn
    messages = read_trajectory(tmp_path / "t.jsonl").messages
    assert [m["role"] for m in messages] == ["system", "user"] + ["assistant", "tool"] * 3
    calls = [m["tool_calls"] for m in messages if m["role"] == "assistant"]
    assert all(len(c) == 1 and c[0]["function"] == {"name": "think", "arguments": '{"thought": "hi"}'}
               for c in calls)
    ids = [c[0]["id"] for c in calls]
    assert len(set(ids)) == 3 and [m["tool_call_id"] for m in messages if m["role"] == "tool"] == ids
    assert all(not m.get("content") for m in messages if m["role"] == "assistant")

    # the trajectory is fine-tuning data for the tokenizer that wrote it
    (record,) = records_from_dicts([messages_for_finetune(tmp_path / "t.jsonl")])
    encoded = encode_record(tokenizer, record)
    trained = [t for t, keep in zip(encoded.tokens, encoded.loss_mask, strict=True) if keep]
    assert trained.count(TOOL_CALLS) == 3 and trained.count(tokenizer.eos_id) == 3


def test_the_agent_command_and_its_resume(think_server: tuple[str, Recorded], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = think_server
    workspace, trajectory = tmp_path / "ws", tmp_path / "run.jsonl"
    workspace.mkdir()
    common = ["agent", "--endpoint", url, "--workspace", str(workspace), "--trajectory", str(trajectory),
              "--max-tokens", "16", "--context-tokens", str(MAX_MODEL_LEN)]
    assert main([*common, "--max-steps", "2", TASK]) == 1  # stopped by its limit, not finished
    err = capsys.readouterr().err
    assert "step 2: think(" in err and "max_steps after 2 step(s)" in err
    assert read_trajectory(trajectory).steps == 2
    assert main([*common, "--max-steps", "3", "--resume"]) == 1
    state = read_trajectory(trajectory)
    assert state.steps == 3 and state.task == TASK
    assert [json.loads(line).get("event") for line in trajectory.read_text().splitlines()].count("end") == 2
    assert main(["agent", "--endpoint", url, "--workspace", str(tmp_path / "missing"), TASK]) == 2
    assert "--workspace" in capsys.readouterr().err


def test_mini_swe_agent_runs_against_tramontane_serve(random_server: tuple[str, Recorded, str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    url, app, name = random_server
    # before mini-swe-agent and LiteLLM are imported: no banner, no config in the home folder, LiteLLM's price
    # table from its package (not the network), one attempt per call (a failure must show, not be retried)
    monkeypatch.setenv("MSWEA_SILENT_STARTUP", "1")
    monkeypatch.setenv("MSWEA_GLOBAL_CONFIG_DIR", str(tmp_path / "mswea"))
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT", "1")
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.environments.local import LocalEnvironment
    from minisweagent.models.litellm_textbased_model import LitellmTextbasedModel

    monkeypatch.setattr("litellm.suppress_debug_info", True)  # its hints about hosted providers' prices

    model = LitellmTextbasedModel(model_name=f"openai/{name}", cost_tracking="ignore_errors",
                                  model_kwargs={"api_base": url, "api_key": "none", "max_tokens": 16,
                                                "temperature": 0.0, "timeout": 60})
    workspace = tmp_path / "ws"
    workspace.mkdir()
    env = LocalEnvironment(cwd=str(workspace), timeout=10, env={"PAGER": "cat"})
    agent = DefaultAgent(model, env, step_limit=3, cost_limit=0, max_consecutive_format_errors=0,
                         system_template="You are a helpful assistant that can run bash commands. Answer with one "
                                         "command in a ```mswea_bash_command block.",
                         instance_template="Task: {{task}}")
    before = len(app.chat_statuses())
    outcome = agent.run(TASK)
    assert outcome["exit_status"] == "LimitsExceeded", outcome  # its own step limit, no exception
    assert agent.n_calls == 3
    assert app.chat_statuses()[before:] == [200] * 3
    # each reply was parsed, found to hold no action, and answered with mini-swe-agent's format error
    errors = [m for m in agent.messages if m.get("extra", {}).get("interrupt_type") == "FormatError"]
    assert len(errors) == 3 and all(m["extra"]["response"]["model"] == name for m in errors)
    assert all(m["extra"]["response"]["choices"][0]["finish_reason"] in ("stop", "length") for m in errors)
    assert os.listdir(workspace) == []  # garbage is no action: nothing ran


def test_the_agent_eval_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tramontane agent eval` on one bundled task with a scripted model that gives up at once: scored 0."""
    from tramontane.agent.harness import BUILTIN_TASKS
    from tramontane.agent.replay import ReplayServer

    task = sorted(p for p in BUILTIN_TASKS.iterdir() if (p / "task.json").is_file())[0]
    give_up = {"content": None, "tool_calls": [{"id": "done00001", "type": "function", "function": {
        "name": "finish", "arguments": '{"message": "I change nothing."}'}}]}
    with ReplayServer([give_up], model="scripted") as server:
        code = main(["agent", "--endpoint", server.url, "eval", "--tasks", str(task), "--out", str(tmp_path / "out"),
                     "--max-steps", "3"])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"model_name_or_path": "scripted", "total": 1, "resolved": 0,
                                                   "resolved_rate": 0.0}
    (prediction,) = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert prediction == {"instance_id": task.name, "model_name_or_path": "scripted", "model_patch": ""}
    assert read_trajectory(tmp_path / "out" / "trajectories" / f"{task.name}.jsonl").finished == "I change nothing."
