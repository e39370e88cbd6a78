"""The agent's tools (`tramontane.agent.tools`): OpenHands' names and schemas, the editor's exact semantics,
argument errors that never raise, and execute_bash's reporting.

Oracles: `cat -n` and `find | sort` run on the host for views and listings, plain Python string operations
for the edits, snapshots taken before each edit for undo, OpenHands' published parameter lists for the
schemas. Editor tests run over an unsandboxed `Sandbox` (the editor never runs commands); the execute_bash
tests need bubblewrap (skipped without it, failed under CI).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tramontane.agent.sandbox import Sandbox, SandboxLimits
from tramontane.agent.tools import TOOL_SPECS, ToolBox, ToolOutcome, truncate_middle
from tramontane.errors import ConfigError, SandboxUnavailableError

pytestmark = pytest.mark.filterwarnings("ignore::tramontane.errors.TramontaneWarning")

PY = "def f():\n    return 1\n\n\ndef g():\n    return 1\n"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.fixture
def tools(workspace: Path) -> ToolBox:
    return ToolBox(Sandbox(workspace, unsafe_no_sandbox=True))


@pytest.fixture
def sandboxed(workspace: Path) -> Iterator[ToolBox]:
    try:
        sb = Sandbox(workspace, SandboxLimits(wall_seconds=10.0))
    except SandboxUnavailableError as e:
        if os.environ.get("CI"):
            pytest.fail(f"bubblewrap must work in CI: {e}")
        pytest.skip(str(e))
    yield ToolBox(sb, max_output_chars=2000)
    sb.close()


def edit(tools: ToolBox, **arguments: Any) -> ToolOutcome:
    return tools.call("str_replace_editor", json.dumps(arguments))


def cat_n(path: Path) -> str:
    return subprocess.run(["cat", "-n", str(path)], capture_output=True, text=True, check=True).stdout


# ------------------------------------------------------------------------------------------------- the specs


def test_specs_have_openhands_names_and_parameters() -> None:
    """The parameter names, types and required lists of OpenHands' CodeAct tools (less its later
    `security_risk`), which Devstral was trained to call."""
    assert json.loads(json.dumps(TOOL_SPECS)) == TOOL_SPECS
    specs = {s["function"]["name"]: s["function"] for s in TOOL_SPECS}
    assert list(specs) == ["execute_bash", "str_replace_editor", "think", "finish"]
    assert all(s["type"] == "function" and s["function"]["description"] for s in TOOL_SPECS)

    def shape(name: str) -> tuple[dict[str, object], list[str]]:
        params = specs[name]["parameters"]
        assert params["type"] == "object"
        return {k: v.get("enum", v["type"]) for k, v in params["properties"].items()}, params["required"]

    assert shape("execute_bash") == (
        {"command": "string", "is_input": ["true", "false"], "timeout": "number"}, ["command"])
    assert shape("str_replace_editor") == ({
        "command": ["view", "create", "str_replace", "insert", "undo_edit"], "path": "string",
        "file_text": "string", "old_str": "string", "new_str": "string", "insert_line": "integer",
        "view_range": "array"}, ["command", "path"])
    view_range = specs["str_replace_editor"]["parameters"]["properties"]["view_range"]
    assert view_range["items"] == {"type": "integer"}
    assert shape("think") == ({"thought": "string"}, ["thought"])
    assert shape("finish") == ({"message": "string"}, ["message"])


# ------------------------------------------------------------------------------------------ argument errors


@pytest.mark.parametrize("name,arguments,problem", [
    ("rm_rf", "{}", "Unknown tool `rm_rf`"),
    ("execute_bash", '{"command": "ls"', "not valid JSON"),
    ("execute_bash", "[1, 2]", "must be a JSON object"),
    ("execute_bash", "", "missing required argument `command`"),
    ("execute_bash", '{"command": null}', "missing required argument `command`"),
    ("execute_bash", '{"command": "ls", "cwd": "/"}', "unexpected argument `cwd`"),
    ("execute_bash", '{"command": ["ls"]}', "`command` must be of type string"),
    ("execute_bash", '{"command": "ls", "timeout": "5"}', "`timeout` must be of type number"),
    ("execute_bash", '{"command": "ls", "timeout": true}', "`timeout` must be of type number"),
    ("execute_bash", '{"command": "ls", "is_input": "yes"}', '`is_input` must be one of "true", "false"'),
    ("str_replace_editor", '{"command": "delete", "path": "/x"}', "`command` must be one of"),
    ("str_replace_editor", '{"command": "insert", "path": "/x", "insert_line": "3"}',
     "`insert_line` must be of type integer"),
    ("str_replace_editor", '{"command": "insert", "path": "/x", "insert_line": 2.0}',
     "`insert_line` must be of type integer"),
    ("str_replace_editor", '{"command": "view", "path": "/x", "view_range": [1, "2"]}',
     "`view_range` must be an array of integers"),
    ("str_replace_editor", '{"path": "/x"}', "missing required argument `command`"),
    ("think", '{"thought": "a", "mood": "b"}', "unexpected argument `mood`"),
    ("finish", "{}", "missing required argument `message`"),
])
def test_bad_calls_are_errors_naming_the_problem_and_schema(tools: ToolBox, name: str, arguments: str,
                                                            problem: str) -> None:
    outcome = tools.call(name, arguments)
    assert outcome.error and not outcome.finished
    assert outcome.content.startswith("ERROR:\n") and problem in outcome.content, outcome.content
    if name != "rm_rf":
        assert "Expected arguments:" in outcome.content and "`" in outcome.content
    else:
        assert "execute_bash, str_replace_editor, think, finish" in outcome.content


def test_call_never_raises(tools: ToolBox, workspace: Path) -> None:
    assert tools.call("execute_bash", None).error  # type: ignore[arg-type]
    assert tools.call("str_replace_editor", '{"command": "view", "path": "/\\u0000"}').error
    fifo = workspace / "fifo"
    os.mkfifo(fifo)
    outcome = edit(tools, command="view", path=str(fifo))  # reading it would block forever
    assert outcome.error and "not a regular file" in outcome.content


def test_max_output_chars_is_validated(workspace: Path) -> None:
    with pytest.raises(ConfigError, match="max_output_chars"):
        ToolBox(Sandbox(workspace, unsafe_no_sandbox=True), max_output_chars=10)


def test_think_and_finish(tools: ToolBox, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tramontane.agent.tools"):
        outcome = tools.call("think", json.dumps({"thought": "the bug is in parse()"}))
    assert outcome == ToolOutcome("Your thought has been logged.", error=False)
    assert "the bug is in parse()" in caplog.text
    done = tools.call("finish", json.dumps({"message": "Fixed parse()."}))
    assert done.finished and not done.error and done.message == "Fixed parse()."


def test_truncate_middle() -> None:
    text = "".join(f"{i}\n" for i in range(5000))
    short = truncate_middle(text, 1000)
    head, _, tail = short.partition("\n[... ")
    dropped = int(tail.split(" characters truncated ...]\n")[0])
    kept_tail = tail.split(" characters truncated ...]\n")[1]
    assert text.startswith(head) and text.endswith(kept_tail)
    assert len(head) + len(kept_tail) + dropped == len(text)
    assert len(short) <= 1000
    assert truncate_middle("abc", 1000) == "abc"


# ----------------------------------------------------------------------------------------------- the editor


def test_view_file_matches_cat_n(tools: ToolBox, workspace: Path) -> None:
    path = workspace / "a.py"
    path.write_text(PY + "\tindented\ttabs\n")
    outcome = edit(tools, command="view", path=str(path))
    assert not outcome.error
    assert outcome.content == f"Here's the result of running `cat -n` on {path}:\n{cat_n(path)}"
    lines = cat_n(path).splitlines(keepends=True)
    ranged = edit(tools, command="view", path=str(path), view_range=[2, 4])
    assert ranged.content.split(":\n", 1)[1] == "".join(lines[1:4])
    to_end = edit(tools, command="view", path=str(path), view_range=[5, -1])
    assert to_end.content.split(":\n", 1)[1] == "".join(lines[4:])
    past = edit(tools, command="view", path=str(path), view_range=[6, 100])
    assert "".join(lines[5:]) in past.content and "We only show up to 7" in past.content


@pytest.mark.parametrize("view_range,message", [
    ([0, 2], "Its first element `0` should be within the range of lines of the file: [1, 6]"),
    ([7, 8], "Its first element `7` should be within the range of lines of the file: [1, 6]"),
    ([4, 2], "Its second element `2` should be greater than or equal to the first element `4`"),
    ([1, 2, 3], "It should be a list of two integers"),
])
def test_view_range_errors(tools: ToolBox, workspace: Path, view_range: list[int], message: str) -> None:
    (workspace / "a.py").write_text(PY)
    outcome = edit(tools, command="view", path=str(workspace / "a.py"), view_range=view_range)
    assert outcome.error and message in outcome.content, outcome.content


def test_view_directory_matches_find(tools: ToolBox, workspace: Path) -> None:
    for rel in ["src/pkg/mod.py", "src/pkg/deep/x.py", "src/.hidden/y.py", "src/.env", "README.md",
                ".git/config", "docs/index.md"]:
        (workspace / rel).parent.mkdir(parents=True, exist_ok=True)
        (workspace / rel).write_text("x\n")
    found = subprocess.run(f"find {workspace} -maxdepth 2 -not -path '*/.*' | LC_ALL=C sort", shell=True,
                           capture_output=True, text=True, check=True).stdout.split()
    outcome = edit(tools, command="view", path=str(workspace))
    body = outcome.content.split(":\n", 1)[1]
    listed = [line for line in body.split("\n\n")[0].splitlines()]
    assert [p.rstrip("/") for p in listed] == found
    assert all(p.endswith("/") == (Path(p).is_dir()) for p in listed)
    assert "1 hidden files/directories in this directory are excluded" in outcome.content
    bad = edit(tools, command="view", path=str(workspace), view_range=[1, 2])
    assert bad.error and "not allowed when `path` points to a directory" in bad.content


def test_create(tools: ToolBox, workspace: Path) -> None:
    path = workspace / "pkg" / "new.py"  # a missing parent is made
    outcome = edit(tools, command="create", path=str(path), file_text=PY)
    assert outcome == ToolOutcome(f"File created successfully at: {path}", error=False)
    assert path.read_text() == PY
    again = edit(tools, command="create", path=str(path), file_text="other")
    assert again.error and "File already exists at" in again.content and path.read_text() == PY
    missing = edit(tools, command="create", path=str(workspace / "b.py"))
    assert missing.error and "Parameter `file_text` is required for command: create." in missing.content


def test_relative_and_missing_paths(tools: ToolBox, workspace: Path) -> None:
    (workspace / "a.py").write_text(PY)
    outcome = edit(tools, command="view", path="a.py")
    assert outcome.error and "absolute path" in outcome.content
    assert f"Maybe you meant {workspace / 'a.py'}" in outcome.content
    gone = edit(tools, command="view", path=str(workspace / "nope.py"))
    assert gone.error and "does not exist" in gone.content
    folder = edit(tools, command="str_replace", path=str(workspace), old_str="a", new_str="b")
    assert folder.error and "only the `view` command can be used on directories" in folder.content


def test_str_replace_exactly_once(tools: ToolBox, workspace: Path) -> None:
    path = workspace / "a.py"
    path.write_text(PY)
    several = edit(tools, command="str_replace", path=str(path), old_str="return 1", new_str="return 2")
    assert several.error and "Multiple occurrences of old_str `return 1` in lines [2, 6]" in several.content
    none = edit(tools, command="str_replace", path=str(path), old_str="return 3", new_str="return 2")
    assert none.error and "did not appear verbatim" in none.content
    indent = edit(tools, command="str_replace", path=str(path), old_str="def g():\n  return 1", new_str="x")
    assert indent.error and "did not appear verbatim" in indent.content  # whitespace counts
    same = edit(tools, command="str_replace", path=str(path), old_str="def f", new_str="def f")
    assert same.error and "must be different" in same.content
    missing = edit(tools, command="str_replace", path=str(path), new_str="x")
    assert missing.error and "Parameter `old_str` is required for command: str_replace." in missing.content
    assert path.read_text() == PY  # nothing changed by the failures

    old, new = "def g():\n    return 1", "def g():\n    # two\n    return 2"
    outcome = edit(tools, command="str_replace", path=str(path), old_str=old, new_str=new)
    expected = PY.replace(old, new)
    assert not outcome.error and path.read_text() == expected
    # the snippet: lines 1..10 of the new file around the edit (line 5), numbered as cat -n does
    snippet = outcome.content.split(":\n", 1)[1].split("Review the changes")[0]
    assert snippet == "".join(cat_n(path).splitlines(keepends=True)[0:10])
    deleted = edit(tools, command="str_replace", path=str(path), old_str="    # two\n")
    assert not deleted.error and path.read_text() == expected.replace("    # two\n", "")


def test_insert(tools: ToolBox, workspace: Path) -> None:
    path = workspace / "a.py"
    path.write_text(PY)
    lines = PY.splitlines()
    for at, text in [(0, "import os"), (3, "x = 1\ny = 2"), (len(lines) + 3, "# end")]:
        outcome = edit(tools, command="insert", path=str(path), insert_line=at, new_str=text)
        assert not outcome.error, outcome.content
        lines = lines[:at] + text.split("\n") + lines[at:]
        assert path.read_text() == "\n".join(lines) + "\n"
        snippet = outcome.content.split(":\n", 1)[1].split("Review the changes")[0]
        first = max(0, at - 4)
        assert snippet == "".join(cat_n(path).splitlines(keepends=True)[first:at + 4 + len(text.split("\n"))])
    bad = edit(tools, command="insert", path=str(path), insert_line=len(lines) + 1, new_str="z")
    assert bad.error and f"It should be within the range of allowed values: [0, {len(lines)}]" in bad.content
    no_text = edit(tools, command="insert", path=str(path), insert_line=1)
    assert no_text.error and "Parameter `new_str` is required for command: insert." in no_text.content
    no_line = edit(tools, command="insert", path=str(path), new_str="z")
    assert no_line.error and "Parameter `insert_line` is required for command: insert." in no_line.content
    unterminated = workspace / "b.txt"
    unterminated.write_text("a\nb")
    edit(tools, command="insert", path=str(unterminated), insert_line=1, new_str="c")
    assert unterminated.read_text() == "a\nc\nb"


def test_undo_edit_walks_back_per_file(tools: ToolBox, workspace: Path) -> None:
    a, b = workspace / "a.py", workspace / "b.py"
    b.write_text("b = 1\n")
    snapshots = []
    edit(tools, command="create", path=str(a), file_text=PY)
    snapshots.append(a.read_text())
    edit(tools, command="str_replace", path=str(a), old_str="def f():\n    return 1",
         new_str="def f():\n    return 9")
    snapshots.append(a.read_text())
    edit(tools, command="str_replace", path=str(b), old_str="b = 1", new_str="b = 2")
    edit(tools, command="insert", path=str(a), insert_line=0, new_str="import os")
    snapshots.append(a.read_text())
    edit(tools, command="str_replace", path=str(a), old_str="import os", new_str="import sys")
    for expected in reversed(snapshots):
        outcome = edit(tools, command="undo_edit", path=str(a))
        assert not outcome.error and "undone successfully" in outcome.content
        assert a.read_text() == expected
        assert b.read_text() == "b = 2\n"  # another file's history is its own
    created = edit(tools, command="undo_edit", path=str(a))  # the create itself: the file goes
    assert not created.error and not a.exists()
    assert not edit(tools, command="undo_edit", path=str(b)).error and b.read_text() == "b = 1\n"
    empty = edit(tools, command="undo_edit", path=str(b))
    assert empty.error and f"No edit history found for {b}." in empty.content


def test_paths_outside_the_workspace_are_refused(tools: ToolBox, workspace: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("secret\n")
    (workspace / "link.txt").symlink_to(secret)
    (workspace / "linkdir").symlink_to(outside)
    (workspace / "inner.txt").write_text("inner\n")
    (workspace / "inner-link.txt").symlink_to(workspace / "inner.txt")
    attempts = [
        {"command": "view", "path": str(secret)},
        {"command": "view", "path": "/etc/passwd"},
        {"command": "view", "path": str(workspace / ".." / "outside" / "secret.txt")},
        {"command": "view", "path": str(workspace / "link.txt")},
        {"command": "str_replace", "path": str(workspace / "link.txt"), "old_str": "secret",
         "new_str": "pwned"},
        {"command": "insert", "path": str(workspace / "link.txt"), "insert_line": 0, "new_str": "pwned"},
        {"command": "create", "path": str(workspace / "linkdir" / "new.txt"), "file_text": "pwned"},
        {"command": "create", "path": str(tmp_path / "new.txt"), "file_text": "pwned"},
        {"command": "view", "path": str(workspace / "linkdir")},
    ]
    for arguments in attempts:
        outcome = edit(tools, **arguments)
        assert outcome.error and "outside the workspace" in outcome.content, (arguments, outcome.content)
        assert "secret\n" not in outcome.content.split("outside the workspace")[1]
    assert secret.read_text() == "secret\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"] and not (tmp_path / "new.txt").exists()
    inside = edit(tools, command="str_replace", path=str(workspace / "inner-link.txt"), old_str="inner",
                  new_str="changed")  # a link that stays inside is followed
    assert not inside.error and (workspace / "inner.txt").read_text() == "changed\n"


def test_edits_replace_files_keeping_mode_and_line_ends(tools: ToolBox, workspace: Path,
                                                        tmp_path: Path) -> None:
    script = workspace / "run.sh"
    script.write_text("#!/bin/sh\necho one\n")
    script.chmod(0o751)
    edit(tools, command="str_replace", path=str(script), old_str="one", new_str="two")
    assert script.read_text() == "#!/bin/sh\necho two\n" and script.stat().st_mode & 0o777 == 0o751
    crlf = workspace / "win.txt"
    crlf.write_bytes(b"a\r\nb\r\nc\r\n")
    outcome = edit(tools, command="str_replace", path=str(crlf), old_str="a\nb", new_str="a\nB")
    assert not outcome.error and crlf.read_bytes() == b"a\r\nB\r\nc\r\n"
    # a hard link to a file outside: the edit replaces the workspace's name, never writes through the link
    outside = tmp_path / "outside.txt"
    outside.write_text("keep\n")
    os.link(outside, workspace / "hard.txt")
    edit(tools, command="str_replace", path=str(workspace / "hard.txt"), old_str="keep", new_str="changed")
    assert outside.read_text() == "keep\n" and (workspace / "hard.txt").read_text() == "changed\n"


def test_binary_and_non_utf8_files_are_refused(tools: ToolBox, workspace: Path) -> None:
    (workspace / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (workspace / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    binary = edit(tools, command="view", path=str(workspace / "blob.bin"))
    assert binary.error and "appears to be binary" in binary.content
    latin = edit(tools, command="str_replace", path=str(workspace / "latin.txt"), old_str="caf", new_str="x")
    assert latin.error and "not UTF-8" in latin.content


# --------------------------------------------------------------------------------------------- execute_bash


def test_execute_bash_reports_exit_code_and_cwd(sandboxed: ToolBox, workspace: Path) -> None:
    ok = sandboxed.call("execute_bash", json.dumps({"command": "mkdir -p sub && cd sub && echo hello"}))
    assert ok == ToolOutcome(f"hello\n[The command completed with exit code 0.]\n"
                             f"[Current working directory: {workspace / 'sub'}]", error=False)
    failed = sandboxed.call("execute_bash", json.dumps({"command": "ls nope; exit 3"}))
    assert not failed.error and "No such file or directory" in failed.content
    assert "[The command completed with exit code 3.]" in failed.content


def test_execute_bash_escapes_come_back_as_failures(sandboxed: ToolBox, workspace: Path) -> None:
    readme = Path(__file__).resolve().parents[2] / "README.md"
    connect = f"{sys.executable} -c \"import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)\""
    for command in ["echo x > /etc/tramontane-probe", f"cat {readme}", connect]:
        outcome = sandboxed.call("execute_bash", json.dumps({"command": command}))
        assert "[The command completed with exit code 0.]" not in outcome.content, (command, outcome.content)
    assert not Path("/etc/tramontane-probe").exists()


def test_execute_bash_truncates_long_output_in_the_middle(sandboxed: ToolBox) -> None:
    full = "".join(f"{i}\n" for i in range(1, 5001))
    outcome = sandboxed.call("execute_bash", json.dumps({"command": "seq 1 5000"}))
    assert not outcome.error and len(outcome.content) <= 2000
    body, _, note = outcome.content.rpartition("\n[The command completed")
    head, _, rest = body.partition("\n[... ")
    dropped, _, tail = rest.partition(" characters truncated ...]\n")
    assert full.startswith(head) and (full.rstrip("\n")).endswith(tail)
    assert len(head) + int(dropped) + len(tail) == len(full.rstrip("\n"))
    assert note.startswith(" with exit code 0.]")


def test_execute_bash_timeouts_and_bad_requests(sandboxed: ToolBox) -> None:
    timed = sandboxed.call("execute_bash", json.dumps({"command": "echo begun; sleep 30", "timeout": 1}))
    assert timed.error and timed.content.startswith("begun\n")
    assert "killed after 1 seconds" in timed.content and "larger `timeout` (at most 10)" in timed.content
    interactive = sandboxed.call("execute_bash", json.dumps({"command": "y", "is_input": "true"}))
    assert interactive.error and "no running process" in interactive.content
    empty = sandboxed.call("execute_bash", json.dumps({"command": "  "}))
    assert empty.error and "empty" in empty.content
    negative = sandboxed.call("execute_bash", json.dumps({"command": "ls", "timeout": -1}))
    assert negative.error and "positive" in negative.content
