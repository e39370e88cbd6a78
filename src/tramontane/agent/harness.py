"""SWE-style tasks for the coding agent, and scoring a patch against their hidden tests.

A task is a folder (the shipped ones are in `agent/tasks/`, one per bug, each with its provenance):

- `task.json`: `instance_id` (also the folder's name), `problem_statement` (the issue, as a user would write
  it), `fail_to_pass` and `pass_to_pass` (pytest node ids, as SWE-bench defines them: tests the fix must make
  pass, and tests that passed before and must still pass), `test_command` (run in the repository; the harness
  adds `-rA` so that every test's outcome is listed) and `provenance` (`repository`, `commit` and/or `pull`,
  `licence`, `notes`: where the bug and its fix come from and what was cut down);
- `repo/`: the repository snapshot with the bug, and the tests that passed before the fix;
- `test.patch`: the hidden regression tests (a unified diff the agent never sees);
- `gold.patch`: the upstream fix (source only), for checking the task and the scoring; optional.

Scoring follows SWE-bench: the patch is applied with `git apply` to a fresh copy of the snapshot (a patch
that does not apply leaves the task unresolved, with git's reason), the test files that `test.patch` touches
are reset to the snapshot's (so the agent's edits to them do not count) and `test.patch` is applied, then the
test command runs in a `Sandbox`; the task is resolved when every fail-to-pass and every pass-to-pass test
passed (pytest's PASSED, XFAIL or XPASS, and no FAILED, ERROR or SUBFAIL for it). Like SWE-bench, scoring trusts
the test run inside the patched repository. The copy's git operations run on the host before any of the
patch's code runs (git refuses paths into `.git` and through symbolic links); everything that executes the
repository's code runs sandboxed. Test commands run with the interpreter running tramontane first on `PATH`
and with pytest's plugin autoloading off (`PYTEST_DISABLE_PLUGIN_AUTOLOAD=1`), so the host's pytest plugins
neither slow the run nor change it.

`evaluate` runs the agent on every task: a fresh copy of the snapshot in `out/workspaces/<id>` (a git
repository whose first commit is the snapshot), the agent loop over a `ToolBox` on a `Sandbox` of it, the
trajectory in `out/trajectories/<id>.jsonl`, the patch as `git diff` of everything the agent changed or
added against that commit (computed inside the sandbox: the agent controlled the repository's git
configuration), then `score_patch`. It writes `out/predictions.jsonl` in SWE-bench's format (`instance_id`,
`model_name_or_path`, `model_patch`, for the official `swebench` harness where Docker exists) and
`out/results.json` (each task's score and how its run ended, and the resolved rate over all tasks), both
atomically after every task. A rerun with the same `out` skips the tasks already in `results.json` and starts
the others over.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tramontane.agent.client import ChatClient
from tramontane.agent.loop import AgentConfig, run_agent
from tramontane.agent.sandbox import CommandResult, Sandbox, SandboxLimits
from tramontane.agent.tools import ToolBox
from tramontane.errors import ConfigError, DataError
from tramontane.files import SHAREABLE_MODE, write_atomic, write_json_atomic

logger = logging.getLogger(__name__)

BUILTIN_TASKS = Path(__file__).with_name("tasks")
TASK_FILE = "task.json"
PREDICTION_KEYS = ("instance_id", "model_name_or_path", "model_patch")
PASSED, FAILED, MISSING = "passed", "failed", "missing"
DEFAULT_LIMITS = SandboxLimits()

_REQUIRED = {"instance_id": str, "problem_statement": str, "fail_to_pass": list, "pass_to_pass": list,
             "test_command": str, "provenance": dict}
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PASS_WORDS = ("PASSED", "XPASS", "XFAIL")  # XPASS only when not strict; a strict one is reported as FAILED
_FAIL_WORDS = ("FAILED", "ERROR", "SUBFAIL")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PATCH_PATH = re.compile(r"^diff --git a/(.+?) b/(.+)$", re.MULTILINE)
_OUTPUT_TAIL = 4000
_DIFF_OUTPUT_BYTES = 64 << 20
# git on the host reads neither the user's nor the system's configuration: scoring must not depend on them.
_GIT_ENV = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}
_GIT_IDENTITY = ("-c", "user.name=tramontane", "-c", "user.email=tramontane@localhost",
                 "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main")
# Written to .git/info/exclude of every copy, so caches never reach a patch (and stay out of `git add -A`).
_EXCLUDED = "__pycache__/\n*.py[cod]\n.pytest_cache/\n.mypy_cache/\n.ruff_cache/\n"


@dataclass(frozen=True)
class Task:
    """One task, as `load_tasks` read it (see the module docstring for the files)."""

    instance_id: str
    problem_statement: str
    repo_dir: Path
    test_patch: str
    gold_patch: str
    fail_to_pass: tuple[str, ...]
    pass_to_pass: tuple[str, ...]
    test_command: str
    provenance: dict[str, Any]


@dataclass(frozen=True)
class TaskScore:
    """How a patch did on a task's hidden tests.

    `tests` maps every fail-to-pass and pass-to-pass node id to "passed", "failed" or "missing" (the run did
    not report it: not collected, or the run died); `reason` says why the task is unresolved (None when it is
    resolved); `output_tail` is the end of the test run's output, for diagnosis.
    """

    instance_id: str
    resolved: bool
    patch_applied: bool
    reason: str | None
    tests: dict[str, str]
    seconds: float
    output_tail: str


@dataclass(frozen=True)
class EvalSummary:
    """An evaluation's outcome, as written to `results.json`: `results` maps each finished task's id to its
    record (score, how the agent's run ended, the patch); the rate counts unfinished tasks as unresolved."""

    model_name_or_path: str
    total: int
    resolved: int
    results: dict[str, dict[str, Any]]

    @property
    def resolved_rate(self) -> float:
        return self.resolved / self.total if self.total else 0.0


# -- loading ---------------------------------------------------------------------------------------------------

def load_tasks(tasks_dir: Path) -> list[Task]:
    """The tasks of `tasks_dir` (each sub-folder holding a `task.json`, in name order), or the one task when
    `tasks_dir` itself holds a `task.json`.

    Raises:
        ConfigError: the folder holds no task, or a task is malformed (the message names the file and what to
            fix), or two tasks share an instance id.
    """
    tasks_dir = Path(tasks_dir)
    if (tasks_dir / TASK_FILE).is_file():
        return [load_task(tasks_dir)]
    if not tasks_dir.is_dir():
        raise ConfigError(f"{tasks_dir} is not a folder of tasks; give a folder whose sub-folders hold a "
                          f"{TASK_FILE}, repo/ and test.patch")
    folders = sorted(p for p in tasks_dir.iterdir() if (p / TASK_FILE).is_file())
    if not folders:
        raise ConfigError(f"{tasks_dir} holds no task (no sub-folder with a {TASK_FILE}); the shipped tasks "
                          f"are in {BUILTIN_TASKS}")
    return [load_task(folder) for folder in folders]


def load_task(folder: Path) -> Task:
    """The task in `folder` (`task.json`, `repo/`, `test.patch`, optional `gold.patch`), checked."""
    folder = Path(folder)
    path = folder / TASK_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} cannot be read as JSON ({e}); fix the file") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object with the keys {sorted(_REQUIRED)}")
    problems = [f"'{key}' is missing" for key in _REQUIRED if key not in data]
    problems += [f"'{key}' must be a JSON {_json_type(kind)}" for key, kind in _REQUIRED.items()
                 if key in data and not isinstance(data[key], kind)]
    unknown = sorted(set(data) - set(_REQUIRED))
    if unknown:
        problems.append(f"unknown key(s) {unknown} (the keys are {sorted(_REQUIRED)})")
    if not problems:
        problems += _check_fields(data, folder)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    test_patch = _read_text(folder / "test.patch", required=True)
    if not _PATCH_PATH.search(test_patch):
        raise ConfigError(f"{folder / 'test.patch'} is not a git diff (no 'diff --git' line); write it with "
                          "`git diff` of the hidden tests against the snapshot")
    return Task(instance_id=data["instance_id"], problem_statement=data["problem_statement"],
                repo_dir=(folder / "repo").resolve(), test_patch=test_patch,
                gold_patch=_read_text(folder / "gold.patch", required=False),
                fail_to_pass=tuple(data["fail_to_pass"]), pass_to_pass=tuple(data["pass_to_pass"]),
                test_command=data["test_command"], provenance=dict(data["provenance"]))


def _check_fields(data: dict[str, Any], folder: Path) -> list[str]:
    problems = []
    instance_id = data["instance_id"]
    if not _INSTANCE_ID.fullmatch(instance_id) or instance_id in (".", ".."):
        problems.append(f"instance_id {instance_id!r} must be letters, digits, '.', '_' and '-' (it names files)")
    elif instance_id != folder.name:
        problems.append(f"instance_id {instance_id!r} must be the task folder's name ({folder.name!r})")
    if not data["problem_statement"].strip():
        problems.append("problem_statement is empty")
    for key in ("fail_to_pass", "pass_to_pass"):
        ids = data[key]
        if not all(isinstance(i, str) and i.strip() for i in ids):
            problems.append(f"{key} must list pytest node ids (non-empty strings)")
        elif len(set(ids)) != len(ids):
            problems.append(f"{key} lists a node id twice")
    if not data["fail_to_pass"]:
        problems.append("fail_to_pass is empty: a task needs at least one test that the fix makes pass")
    if not problems and set(data["fail_to_pass"]) & set(data["pass_to_pass"]):
        problems.append("a node id is in both fail_to_pass and pass_to_pass")
    if not data["test_command"].strip():
        problems.append("test_command is empty")
    provenance = data["provenance"]
    if not all(isinstance(provenance.get(k), str) and provenance[k] for k in ("repository", "licence")) or not (
            provenance.get("commit") or provenance.get("pull")):
        problems.append("provenance must give 'repository', 'licence' and 'commit' or 'pull'")
    if not (folder / "repo").is_dir():
        problems.append(f"the repository snapshot {folder / 'repo'} is missing")
    return problems


def _json_type(kind: type) -> str:
    return "string" if kind is str else "array" if kind is list else "object"


def _read_text(path: Path, *, required: bool) -> str:
    if not path.exists() and not required:
        return ""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); each task needs a UTF-8 test.patch") from e
    if required and not text.strip():
        raise ConfigError(f"{path} is empty; it must add the task's hidden tests")
    return text


# -- scoring ---------------------------------------------------------------------------------------------------

def score_patch(task: Task, patch: str, *, limits: SandboxLimits = DEFAULT_LIMITS,
                unsafe_no_sandbox: bool = False) -> TaskScore:
    """Apply `patch` to a fresh copy of the task's snapshot, add the hidden tests and run them sandboxed.

    An empty patch is scored as is (the snapshot's bug stays). The test run gets `limits.wall_seconds`.

    Raises:
        SandboxUnavailableError: bubblewrap cannot run here and `unsafe_no_sandbox` is False.
    """
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tramontane-score-") as tmp:
        work = Path(tmp) / "repo"
        copy_snapshot(task.repo_dir, work)
        base = init_repository(work)
        if patch.strip():
            applied = _git(work, "apply", "--index", "--whitespace=nowarn", "-", stdin=patch)
            if applied.returncode != 0:
                return _unresolved(task, "the patch does not apply: "
                                   + _one_line(applied.stderr or applied.stdout), False, start)
        _reset_test_files(work, base, task)
        applied = _git(work, "apply", "--whitespace=nowarn", "-", stdin=task.test_patch)
        if applied.returncode != 0:  # the agent's changes to non-test files can collide with the tests' diff
            return _unresolved(task, "the hidden tests do not apply over the patch: "
                               + _one_line(applied.stderr or applied.stdout), bool(patch.strip()), start)
        with Sandbox(work, limits, unsafe_no_sandbox=unsafe_no_sandbox) as sandbox:
            run = sandbox.run(hidden_tests_command(task.test_command))
    tests = parse_test_outcomes(run.output, task.fail_to_pass + task.pass_to_pass)
    bad_f2p = [t for t in task.fail_to_pass if tests[t] != PASSED]
    bad_p2p = [t for t in task.pass_to_pass if tests[t] != PASSED]
    reason: str | None = None
    if bad_f2p or bad_p2p:
        reason = (f"{len(bad_f2p)} of {len(task.fail_to_pass)} fail-to-pass and {len(bad_p2p)} of "
                  f"{len(task.pass_to_pass)} pass-to-pass tests did not pass (first: {(bad_f2p + bad_p2p)[0]})")
        if run.killed is not None:
            reason += f"; the test run was killed ({run.killed})"
    return TaskScore(task.instance_id, reason is None, True, reason, tests, time.monotonic() - start,
                     run.output[-_OUTPUT_TAIL:])


def hidden_tests_command(test_command: str) -> str:
    """The shell command that runs a task's tests: tramontane's interpreter first on PATH, no autoloaded
    pytest plugins, and `-rA` (every test's outcome in the summary) after the task's command."""
    bin_dir = os.path.dirname(sys.executable)
    return (f"export PATH={_quote(bin_dir)}:\"$PATH\" PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "
            f"PYTHONDONTWRITEBYTECODE=1; {test_command} -rA")


def parse_test_outcomes(output: str, node_ids: Sequence[str]) -> dict[str, str]:
    """Each node id's outcome in pytest's `-rA` summary ("PASSED id", "FAILED id - message", ...): "failed"
    when any line reports it failing (a failing subtest included), else "passed" when one reports it
    passing, else "missing"."""
    seen: dict[str, set[str]] = {}
    for line in _ANSI.sub("", output).splitlines():
        word, _, rest = line.partition(" ")
        if word in _PASS_WORDS or word in _FAIL_WORDS:
            seen.setdefault(word, set()).add(rest)
    lines_by_word = {word: sorted(rests) for word, rests in seen.items()}

    def reported(words: Sequence[str], node_id: str) -> bool:
        # the id alone, or followed by " - message" or " [subtest]"; never a longer id with the same start
        return any(rest == node_id or rest.startswith(node_id + " ")
                   for word in words for rest in lines_by_word.get(word, ()))

    return {node_id: FAILED if reported(_FAIL_WORDS, node_id) else PASSED if reported(_PASS_WORDS, node_id)
            else MISSING for node_id in node_ids}


def copy_snapshot(source: Path, target: Path) -> None:
    """Copy a task's snapshot to `target` (which must not exist), writable by this user whatever the modes of
    the installed copy; links are copied as links."""
    shutil.copytree(source, target, symlinks=True, copy_function=shutil.copyfile)
    for root, dirs, _ in os.walk(target):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o755)
    os.chmod(target, 0o755)


def init_repository(folder: Path) -> str:
    """Make `folder` a git repository whose one commit holds all its files; returns the commit's id.

    Caches (`__pycache__`, `.pytest_cache`, ...) are excluded through `.git/info/exclude`, so no patch ever
    carries them.
    """
    for args in (("init", "-q"), ("add", "-A"), ("commit", "-q", "--no-verify", "--allow-empty", "-m",
                                                  "task snapshot")):
        if args[0] == "add":
            (folder / ".git" / "info").mkdir(parents=True, exist_ok=True)
            (folder / ".git" / "info" / "exclude").write_text(_EXCLUDED)
        done = _git(folder, *args)
        if done.returncode != 0:
            raise DataError(f"git {args[0]} failed in {folder}: {_one_line(done.stderr or done.stdout)}; is git "
                            "installed (Debian: apt-get install git)?")
    return _git(folder, "rev-parse", "HEAD").stdout.strip()


def patch_paths(patch: str) -> list[str]:
    """The files a git diff touches (both sides of renames), in order of appearance."""
    found: list[str] = []
    for match in _PATCH_PATH.finditer(patch):
        for path in match.groups():
            if path not in found:
                found.append(path)
    return found


def _reset_test_files(work: Path, base: str, task: Task) -> None:
    """Put the files `test.patch` touches back as the snapshot has them (removing those it creates), as
    SWE-bench does before applying the hidden tests: the agent's version of a test file does not count."""
    paths = patch_paths(task.test_patch)
    tracked = set(_git(work, "ls-tree", "-r", "--name-only", base, "--", *paths).stdout.splitlines())
    if tracked:
        _checked(_git(work, "checkout", base, "--", *sorted(tracked)), "reset the test files")
    created = [p for p in paths if p not in tracked]
    if created:  # the patch was applied with --index, so files it added are tracked and git removes them safely
        _checked(_git(work, "rm", "-q", "-r", "-f", "--ignore-unmatch", "--", *created), "remove test files")


def _unresolved(task: Task, reason: str, applied: bool, start: float) -> TaskScore:
    tests = dict.fromkeys(task.fail_to_pass + task.pass_to_pass, MISSING)
    return TaskScore(task.instance_id, False, applied, reason, tests, time.monotonic() - start, "")


def _git(folder: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *_GIT_IDENTITY, *args], cwd=folder, input=stdin, capture_output=True,
                          text=True, env={**os.environ, **_GIT_ENV}, timeout=120, check=False)


def _checked(done: subprocess.CompletedProcess[str], what: str) -> None:
    if done.returncode != 0:
        raise DataError(f"could not {what}: {_one_line(done.stderr or done.stdout)}")


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[:6])[:1000] or "(no message)"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


# -- evaluation ------------------------------------------------------------------------------------------------

def task_prompt(task: Task, workspace: Path) -> str:
    """What the agent is asked: the issue, where the repository is, and what a fix is."""
    return (f"A Python repository is checked out at {workspace} (a git repository; its first commit is the "
            "code as you found it). A user reported the following issue:\n\n"
            f"<issue>\n{task.problem_statement.strip()}\n</issue>\n\n"
            "Change the repository's source so that the issue is resolved. Tests that check the fix exist but "
            "are not in the repository; the existing tests must keep passing. Call `finish` when you are done.")


def evaluate(tasks_dir: Path, config: AgentConfig, out: Path, *, model_name: str | None = None,
             limits: SandboxLimits = DEFAULT_LIMITS, max_workers: int = 1, unsafe_no_sandbox: bool = False,
             on_task: Callable[[str, dict[str, Any]], None] | None = None) -> EvalSummary:
    """Run the agent on every task of `tasks_dir` and score its patches (module docstring); write `out`.

    Args:
        tasks_dir: a folder of tasks (or one task), e.g. `BUILTIN_TASKS`.
        config: the endpoint, model and the agent's limits for each task.
        out: results folder (made if missing); a rerun continues it.
        model_name: `model_name_or_path` in the predictions; default `config.model`, else the endpoint's first
            model.
        limits: the sandbox limits of the agent's commands and of the test runs.
        max_workers: tasks run at once (each in its own workspace and sandbox).
        unsafe_no_sandbox: run commands and tests without bubblewrap (they see the whole host).
        on_task: called with (instance id, its record) as each task is finished, e.g. to show progress.

    Raises:
        ConfigError: `out` holds results of another model, or `max_workers` < 1, or the tasks are malformed.
        EndpointError: the endpoint's model list cannot be read (no `model_name` nor `config.model`).
        SandboxUnavailableError: bubblewrap cannot run here and `unsafe_no_sandbox` is False.
    """
    if max_workers < 1:
        raise ConfigError(f"max_workers must be at least 1 (got {max_workers})")
    tasks = load_tasks(tasks_dir)
    out = Path(out)
    name = model_name or config.model or ChatClient(
        config.endpoint, api_key=config.api_key, timeout=config.request_timeout).default_model()
    for sub in ("trajectories", "workspaces"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    results = _previous_results(out, name, {t.instance_id for t in tasks})
    lock = threading.Lock()

    def finish(task_id: str, record: dict[str, Any]) -> None:
        with lock:
            results[task_id] = record
            _write_outputs(out, name, tasks, results)
        if on_task is not None:
            on_task(task_id, record)

    pending = [t for t in tasks if t.instance_id not in results]
    logger.info("evaluating %d task(s) (%d already done) in %s", len(pending), len(tasks) - len(pending), out)
    with lock:
        _write_outputs(out, name, tasks, results)
    run_one = _TaskRunner(config, out, limits, unsafe_no_sandbox)
    if max_workers == 1:
        for task in pending:
            finish(task.instance_id, run_one(task))
    else:
        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            futures = {pool.submit(run_one, task): task for task in pending}
            for future in as_completed(futures):
                finish(futures[future].instance_id, future.result())
    return _summary(name, tasks, results)


class _TaskRunner:
    """One task's agent run and scoring (callable from several threads: each task has its own folders)."""

    def __init__(self, config: AgentConfig, out: Path, limits: SandboxLimits, unsafe_no_sandbox: bool) -> None:
        self.config = config
        self.out = out
        self.limits = limits
        self.unsafe = unsafe_no_sandbox

    def __call__(self, task: Task) -> dict[str, Any]:
        workspace = (self.out / "workspaces" / task.instance_id).resolve()
        trajectory = self.out / "trajectories" / f"{task.instance_id}.jsonl"
        if workspace.exists():  # an earlier, unfinished run: start over
            _remove_tree(workspace)
        trajectory.unlink(missing_ok=True)
        copy_snapshot(task.repo_dir, workspace)
        base = init_repository(workspace)
        start = time.monotonic()
        with Sandbox(workspace, self.limits, unsafe_no_sandbox=self.unsafe) as sandbox:
            agent = run_agent(task_prompt(task, workspace), ToolBox(sandbox), self.config,
                              trajectory=trajectory, workspace=workspace)
        agent_seconds = time.monotonic() - start
        patch, patch_error = workspace_patch(workspace, base, self.limits, unsafe_no_sandbox=self.unsafe)
        score = score_patch(task, patch, limits=self.limits, unsafe_no_sandbox=self.unsafe)
        if patch_error is not None:
            score = replace(score, reason=f"{patch_error}; {score.reason}" if score.reason else patch_error)
        logger.info("%s: %s (agent: %s after %d step(s))", task.instance_id,
                    "resolved" if score.resolved else f"unresolved ({score.reason})", agent.reason, agent.steps)
        return {**asdict(score), "agent": {**asdict(agent), "seconds": round(agent_seconds, 3)},
                "model_patch": patch}


def _remove_tree(path: Path) -> None:
    """Remove a folder the agent worked in, even where it took away its own write permissions."""
    def make_writable(function: Callable[..., object], name: str, _: object) -> None:
        os.chmod(os.path.dirname(name), 0o700)
        if os.path.isdir(name) and not os.path.islink(name):
            os.chmod(name, 0o700)
        function(name)

    shutil.rmtree(path, onerror=make_writable)


def workspace_patch(workspace: Path, base: str, limits: SandboxLimits = DEFAULT_LIMITS, *,
                    unsafe_no_sandbox: bool = False) -> tuple[str, str | None]:
    """Everything changed or added in `workspace` since commit `base`, as a git diff (binary files included),
    and None, or "" and why there is no patch.

    git runs inside a sandbox of the workspace: the agent could have set hooks or commands in the repository's
    git configuration, which must not run on the host.
    """
    command = (f"git add -A >/dev/null 2>&1 || exit 90; git diff --cached --binary --no-color --no-ext-diff "
               f"--no-textconv {_quote(base)} 2>/dev/null || exit 91")
    big = replace(limits, output_bytes=max(limits.output_bytes, _DIFF_OUTPUT_BYTES))
    with Sandbox(workspace, big, unsafe_no_sandbox=unsafe_no_sandbox) as sandbox:
        done: CommandResult = sandbox.run(command)
    if done.exit_code != 0:
        why = {90: "git add failed", 91: "git diff failed"}.get(done.exit_code or 0, f"exit {done.exit_code}")
        return "", f"no patch: the workspace's git repository is unusable ({why}, killed: {done.killed})"
    return done.output, None


def _previous_results(out: Path, model: str, task_ids: set[str]) -> dict[str, dict[str, Any]]:
    """The finished tasks of an earlier run into `out` (only those still in the task set)."""
    path = out / "results.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        previous_model, results = data["model_name_or_path"], data["results"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path} cannot be read ({e}); move it away to start a new evaluation") from e
    if previous_model != model:
        raise ConfigError(f"{out} holds results of model {previous_model!r}, not {model!r}; give another --out "
                          "folder (or the same model name) instead of mixing models")
    return {k: v for k, v in results.items() if k in task_ids}


def _summary(model: str, tasks: Sequence[Task], results: Mapping[str, dict[str, Any]]) -> EvalSummary:
    ordered = {t.instance_id: results[t.instance_id] for t in tasks if t.instance_id in results}
    return EvalSummary(model, len(tasks), sum(bool(r["resolved"]) for r in ordered.values()), ordered)


def _write_outputs(out: Path, model: str, tasks: Sequence[Task], results: Mapping[str, dict[str, Any]]) -> None:
    summary = _summary(model, tasks, results)
    lines = [json.dumps({"instance_id": task_id, "model_name_or_path": model,
                         "model_patch": record["model_patch"]}, ensure_ascii=False)
             for task_id, record in summary.results.items()]
    write_atomic(out / "predictions.jsonl", "".join(line + "\n" for line in lines), SHAREABLE_MODE)
    write_json_atomic(out / "results.json", {
        "model_name_or_path": model, "total": summary.total, "finished": len(summary.results),
        "resolved": summary.resolved, "resolved_rate": summary.resolved_rate,
        "resolved_ids": [k for k, r in summary.results.items() if r["resolved"]],
        "results": summary.results,
    }, SHAREABLE_MODE)


__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_LIMITS",
    "FAILED",
    "MISSING",
    "PASSED",
    "PREDICTION_KEYS",
    "EvalSummary",
    "Task",
    "TaskScore",
    "copy_snapshot",
    "evaluate",
    "hidden_tests_command",
    "init_repository",
    "load_task",
    "load_tasks",
    "parse_test_outcomes",
    "patch_paths",
    "score_patch",
    "task_prompt",
    "workspace_patch",
]
