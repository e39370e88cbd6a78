"""The SWE-style harness: the shipped tasks are valid, scoring follows SWE-bench, evaluate() end to end.

Oracles: each task's known fix (gold.patch) must resolve it and the untouched snapshot must not, with every
fail-to-pass test failing and every pass-to-pass test passing (so each task is a real, reproducible bug);
the per-test outcomes parsed from pytest's `-rA` summary are checked against pytest's own JUnit XML report of
the same tests; evaluate() runs the real agent loop against a replay endpoint (a scripted model) whose
commands apply the known fix, or do nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tramontane.agent.harness import (
    BUILTIN_TASKS,
    FAILED,
    MISSING,
    PASSED,
    PREDICTION_KEYS,
    Task,
    copy_snapshot,
    evaluate,
    hidden_tests_command,
    init_repository,
    load_tasks,
    parse_test_outcomes,
    patch_paths,
    score_patch,
)
from tramontane.agent.loop import AgentConfig
from tramontane.agent.replay import ReplayServer
from tramontane.agent.sandbox import Sandbox, SandboxLimits
from tramontane.errors import ConfigError, SandboxUnavailableError

TASKS = load_tasks(BUILTIN_TASKS)
LIMITS = SandboxLimits(wall_seconds=120.0)
LICENCES = {"MIT", "BSD-3-Clause", "BSD-2-Clause", "Apache-2.0", "PSF-2.0"}


def _sandbox_works() -> bool:
    probe = Path(__file__).parent
    try:
        Sandbox(probe).close()
    except SandboxUnavailableError:
        return False
    return True


# Scoring is what is tested here; where bubblewrap cannot run (some containers) it runs unsandboxed.
UNSAFE = not _sandbox_works()
pytestmark = pytest.mark.filterwarnings("ignore:commands in .* run WITHOUT a sandbox")


def _task(instance_id: str) -> Task:
    return next(t for t in TASKS if t.instance_id == instance_id)


# -- the shipped tasks ---------------------------------------------------------------------------------------


def test_at_least_ten_real_tasks_with_provenance() -> None:
    assert len(TASKS) >= 10
    assert len({t.provenance["repository"] for t in TASKS}) >= 4  # not all from one project
    for task in TASKS:
        prov = task.provenance
        assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", prov["repository"]), task.instance_id
        assert re.fullmatch(r"[0-9a-f]{40}", prov["commit"]) and re.fullmatch(r"[0-9a-f]{40}", prov["base_commit"])
        assert prov["licence"] in LICENCES and prov["notes"].strip()
        assert any((task.repo_dir / name).is_file() for name in ("LICENSE", "LICENCE", "LICENSE.txt"))
        lines = sum(len(p.read_text().splitlines()) for p in task.repo_dir.rglob("*.py"))
        assert lines < 1000, f"{task.instance_id}: the snapshot should stay small ({lines} lines of Python)"
        assert not list(task.repo_dir.rglob("__pycache__"))
        # the hidden tests only touch test files, the fix only source files
        assert all("test" in Path(p).name for p in patch_paths(task.test_patch)), task.instance_id
        assert task.gold_patch and not any("test" in Path(p).name for p in patch_paths(task.gold_patch))


@pytest.mark.parametrize("task", TASKS, ids=[t.instance_id for t in TASKS])
def test_gold_patch_resolves_and_the_snapshot_does_not(task: Task) -> None:
    with ThreadPoolExecutor(2) as pool:  # two independent scorings, each in its own copy and sandbox
        gold_run, empty_run = (pool.submit(score_patch, task, patch, limits=LIMITS, unsafe_no_sandbox=UNSAFE)
                               for patch in (task.gold_patch, ""))
        gold, empty = gold_run.result(), empty_run.result()
    assert gold.resolved and gold.patch_applied and gold.reason is None, (gold.reason, gold.output_tail)
    assert set(gold.tests.values()) == {PASSED}

    assert not empty.resolved and empty.reason
    # a real bug: every hidden test fails before the fix (it ran: not "missing"), every old test passes
    assert {empty.tests[t] for t in task.fail_to_pass} == {FAILED}, empty.output_tail
    assert {empty.tests[t] for t in task.pass_to_pass} == {PASSED}, empty.output_tail


# -- scoring ---------------------------------------------------------------------------------------------------


def test_a_malformed_patch_is_unresolved_with_the_reason() -> None:
    task = _task("mahmoud__boltons-766b554")
    garbage = ("diff --git a/boltons/strutils.py b/boltons/strutils.py\n--- a/boltons/strutils.py\n"
               "+++ b/boltons/strutils.py\n@@ -1 +1 @@\n-no such line\n+whatever\n")
    score = score_patch(task, garbage, limits=LIMITS, unsafe_no_sandbox=UNSAFE)
    assert not score.resolved and not score.patch_applied
    assert score.reason.startswith("the patch does not apply") and "strutils.py" in score.reason
    assert set(score.tests.values()) == {MISSING}

    not_a_diff = score_patch(task, "I fixed it, trust me.\n", limits=LIMITS, unsafe_no_sandbox=UNSAFE)
    assert not not_a_diff.resolved and not_a_diff.reason.startswith("the patch does not apply")


def test_the_agents_edits_to_test_files_do_not_count() -> None:
    task = _task("more-itertools__more-itertools-cca3294")
    # rewriting the test file so that the failing test "passes" is undone before the hidden tests go in
    cheat = _diff_after(task, lambda repo: (repo / "tests/test_more.py").write_text(
        "def test_reversed_is_none():\n    pass\n"))
    score = score_patch(task, cheat, limits=LIMITS, unsafe_no_sandbox=UNSAFE)
    assert score.patch_applied and not score.resolved
    assert score.tests["tests/test_more.py::LastTests::test_reversed_is_none"] == FAILED
    # the fix plus an edit of the test file (even one that breaks it) is judged on the hidden tests alone
    both = _diff_after(task, lambda repo: (
        subprocess.run(["git", "apply", "-"], cwd=repo, input=task.gold_patch, text=True, check=True),
        (repo / "tests/test_more.py").write_text("raise SystemExit('broken')\n")))
    assert score_patch(task, both, limits=LIMITS, unsafe_no_sandbox=UNSAFE).resolved


def _diff_after(task: Task, edit: Callable[[Path], object]) -> str:
    """The git diff of `edit` applied to a copy of the task's snapshot."""
    with tempfile.TemporaryDirectory() as d:
        repo = Path(d) / "repo"
        copy_snapshot(task.repo_dir, repo)
        base = init_repository(repo)
        edit(repo)
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
        return subprocess.run(["git", "diff", "--cached", base], cwd=repo, capture_output=True, text=True,
                              check=True).stdout


def test_outcomes_parsed_from_the_summary_match_pytests_junit_report(tmp_path: Path) -> None:
    # the same tests, reported two ways by pytest itself: the -rA summary (what scoring reads) and JUnit XML
    task = _task("python-humanize__humanize-823ad60")
    repo = tmp_path / "repo"
    copy_snapshot(task.repo_dir, repo)
    subprocess.run(["git", "apply", "-"], cwd=repo, input=task.test_patch, text=True, check=True)
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                          f"--junitxml={tmp_path / 'junit.xml'}"], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    junit = {}
    for case in ET.parse(tmp_path / "junit.xml").getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        node_id = f"{module}.py::{case.get('name')}"
        junit[node_id] = FAILED if case.find("failure") is not None or case.find("error") is not None else PASSED
    ids = task.fail_to_pass + task.pass_to_pass
    assert set(ids) <= set(junit)
    assert parse_test_outcomes(run.stdout, ids) == {i: junit[i] for i in ids}
    assert list(parse_test_outcomes(run.stdout, ids).values()).count(FAILED) == len(task.fail_to_pass)


def test_outcome_parsing_edge_cases() -> None:
    lines = [
        "PASSED t.py::test_a",
        "PASSED t.py::test_a_longer",                      # a longer id with the same start is another test
        "FAILED t.py::test_b - AssertionError: x - y",
        "PASSED t.py::test_c[x - y]",                      # " - " inside an id
        "FAILED t.py::test_d[x - y] - assert 1 == 2",
        "SUBFAIL t.py::T::test_e [case 3] - assert 0",      # a failing subtest fails its test
        "PASSED t.py::T::test_e",
        "\x1b[32mPASSED\x1b[0m t.py::test_f",              # colour codes
        "XFAIL t.py::test_g - reason",
        "ERROR t.py::test_h - fixture 'x' not found",
        "some line mentioning PASSED t.py::test_i",
    ]
    output = "\n".join(lines)
    ids = ["t.py::test_a", "t.py::test_b", "t.py::test_c[x - y]", "t.py::test_d[x - y]", "t.py::T::test_e",
           "t.py::test_f", "t.py::test_g", "t.py::test_h", "t.py::test_i", "t.py::test_a_long"]
    assert parse_test_outcomes(output, ids) == {
        "t.py::test_a": PASSED, "t.py::test_b": FAILED, "t.py::test_c[x - y]": PASSED,
        "t.py::test_d[x - y]": FAILED, "t.py::T::test_e": FAILED, "t.py::test_f": PASSED,
        "t.py::test_g": PASSED, "t.py::test_h": FAILED, "t.py::test_i": MISSING, "t.py::test_a_long": MISSING}


def test_the_test_command_uses_this_interpreter() -> None:
    command = hidden_tests_command("python -m pytest -q")
    assert command.endswith("python -m pytest -q -rA") and os.path.dirname(sys.executable) in command
    assert "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1" in command


# -- loading ---------------------------------------------------------------------------------------------------


def _write_task(folder: Path, **changes: object) -> Path:
    source = BUILTIN_TASKS / "mahmoud__boltons-c1c25da"
    shutil.copytree(source, folder)
    data = json.loads((folder / "task.json").read_text())
    data["instance_id"] = folder.name
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    (folder / "task.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize(("changes", "message"), [
    ({"fail_to_pass": None}, "'fail_to_pass' is missing"),
    ({"pass_to_pass": "tests/test_mathutils.py::test_bits"}, "'pass_to_pass' must be a JSON array"),
    ({"fail_to_pas": ["x"]}, "unknown key(s) ['fail_to_pas']"),
    ({"fail_to_pass": []}, "fail_to_pass is empty"),
    ({"instance_id": "other"}, "must be the task folder's name"),
    ({"provenance": {"repository": "https://github.com/a/b"}}, "provenance must give"),
])
def test_malformed_tasks_are_refused_with_what_to_fix(tmp_path: Path, changes: dict[str, object],
                                                       message: str) -> None:
    folder = _write_task(tmp_path / "tasks" / "t1", **changes)
    with pytest.raises(ConfigError) as err:
        load_tasks(tmp_path / "tasks")
    assert message in str(err.value) and str(folder / "task.json") in str(err.value)


def test_task_folder_problems(tmp_path: Path) -> None:
    folder = _write_task(tmp_path / "t1")
    assert [t.instance_id for t in load_tasks(folder)] == ["t1"]  # one task folder works too
    (folder / "test.patch").write_text("")
    with pytest.raises(ConfigError, match="test.patch is empty"):
        load_tasks(folder)
    shutil.rmtree(folder / "repo")
    with pytest.raises(ConfigError, match="snapshot .* is missing"):
        load_tasks(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no task"):
        load_tasks(tmp_path / "empty")


# -- evaluate() end to end -------------------------------------------------------------------------------------

E2E_IDS = ("mahmoud__boltons-766b554", "more-itertools__more-itertools-cca3294")


def _two_tasks(tmp_path: Path) -> Path:
    tasks_dir = tmp_path / "tasks"
    for task_id in E2E_IDS:
        shutil.copytree(BUILTIN_TASKS / task_id, tasks_dir / task_id)
    return tasks_dir


def _bash(command: str) -> dict[str, object]:
    return {"tool_calls": [{"function": {"name": "execute_bash", "arguments": json.dumps({"command": command})}}]}


def _finish(message: str) -> dict[str, object]:
    return {"tool_calls": [{"function": {"name": "finish", "arguments": json.dumps({"message": message})}}]}


def _config(url: str) -> AgentConfig:
    return AgentConfig(endpoint=url, max_steps=5, max_seconds=120, request_timeout=30, max_retries=0)


def test_evaluate_with_a_model_that_applies_the_fix(tmp_path: Path) -> None:
    tasks_dir = _two_tasks(tmp_path)
    out = tmp_path / "out"
    replies = []
    for task in load_tasks(tasks_dir):
        # the scripted model looks around, applies the known fix through the sandboxed shell, and finishes
        replies += [_bash("git status --short && ls"),
                    _bash(f"git apply <<'END_OF_PATCH'\n{task.gold_patch}END_OF_PATCH"),
                    _finish("applied the fix")]
    with ReplayServer(replies, model="scripted-gold") as server:
        summary = evaluate(tasks_dir, _config(server.url), out, limits=LIMITS, unsafe_no_sandbox=UNSAFE)
        assert server.remaining == 0
        first_request = server.requests[0]
    assert (summary.total, summary.resolved, summary.resolved_rate) == (2, 2, 1.0)
    assert summary.model_name_or_path == "scripted-gold"  # the endpoint's model, as no name was given
    # the agent was told the issue and where the repository is
    user = next(m["content"] for m in first_request["messages"] if m["role"] == "user")
    assert str(out.resolve() / "workspaces" / E2E_IDS[0]) in user
    assert load_tasks(tasks_dir)[0].problem_statement.strip() in user

    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [tuple(p) for p in predictions] == [PREDICTION_KEYS] * 2
    assert [p["instance_id"] for p in predictions] == list(E2E_IDS)
    assert {p["model_name_or_path"] for p in predictions} == {"scripted-gold"}
    for prediction in predictions:  # the patch is the fix itself: same files, same changed lines
        task = next(t for t in load_tasks(tasks_dir) if t.instance_id == prediction["instance_id"])
        assert patch_paths(prediction["model_patch"]) == patch_paths(task.gold_patch)
        assert _changed_lines(prediction["model_patch"]) == _changed_lines(task.gold_patch)

    results = json.loads((out / "results.json").read_text())
    assert results["resolved_rate"] == 1.0 and results["resolved_ids"] == list(E2E_IDS)
    record = results["results"][E2E_IDS[1]]
    assert record["agent"]["reason"] == "finish" and record["agent"]["steps"] == 3
    assert record["tests"]["tests/test_more.py::LastTests::test_reversed_is_none"] == PASSED
    for task_id in E2E_IDS:
        lines = (out / "trajectories" / f"{task_id}.jsonl").read_text().splitlines()
        assert len(lines) > 5 and all(json.loads(line) for line in lines)

    # a rerun into the same folder skips the finished tasks: no model call at all
    with ReplayServer([], model="scripted-gold") as server:
        again = evaluate(tasks_dir, _config(server.url), out, limits=LIMITS, unsafe_no_sandbox=UNSAFE)
        assert server.requests == []
    assert again.resolved == 2 and again.results == summary.results
    # mixing models in one results folder is refused
    with pytest.raises(ConfigError, match="holds results of model 'scripted-gold'"):
        evaluate(tasks_dir, _config("http://127.0.0.1:9/v1"), out, model_name="other")


def test_evaluate_with_a_model_that_does_nothing(tmp_path: Path) -> None:
    tasks_dir = _two_tasks(tmp_path)
    out = tmp_path / "out"
    # two tasks at once: the replies are all alike, so the order the runs take them in does not matter
    with ReplayServer([_finish("nothing to do")] * 2, model="scripted-noop") as server:
        summary = evaluate(tasks_dir, _config(server.url), out, model_name="noop", limits=LIMITS,
                           unsafe_no_sandbox=UNSAFE, max_workers=2)
    assert (summary.total, summary.resolved, summary.resolved_rate) == (2, 0, 0.0)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert predictions == [{"instance_id": i, "model_name_or_path": "noop", "model_patch": ""} for i in E2E_IDS]
    for record in summary.results.values():
        assert record["agent"]["reason"] == "finish" and not record["resolved"]
        assert "fail-to-pass" in record["reason"]

    # an interrupted run: the second task's result is lost, its workspace left half-done (and read-only);
    # the rerun starts that task over and leaves the first alone
    results = json.loads((out / "results.json").read_text())
    del results["results"][E2E_IDS[1]]
    (out / "results.json").write_text(json.dumps(results))
    workspace = out / "workspaces" / E2E_IDS[1]
    (workspace / "half-done").mkdir()
    (workspace / "half-done" / "notes.txt").write_text("x")
    (workspace / "half-done").chmod(0o500)
    with ReplayServer([_bash("touch started-over"), _finish("done")], model="scripted-noop") as server:
        again = evaluate(tasks_dir, _config(server.url), out, model_name="noop", limits=LIMITS,
                         unsafe_no_sandbox=UNSAFE)
        assert server.remaining == 0
    assert again.results[E2E_IDS[0]] == summary.results[E2E_IDS[0]]
    assert not (workspace / "half-done").exists() and (workspace / "started-over").exists()
    assert patch_paths(again.results[E2E_IDS[1]]["model_patch"]) == ["started-over"]
    assert [json.loads(line)["instance_id"] for line in (out / "predictions.jsonl").read_text().splitlines()] \
        == list(E2E_IDS)


def _changed_lines(patch: str) -> list[str]:
    return [line for line in patch.splitlines()
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
