"""The agent's tools, under the names and argument schemas of OpenHands' CodeAct agent (the scaffold Devstral
was trained in): `execute_bash`, `str_replace_editor`, `think` and `finish`.

`TOOL_SPECS` is the OpenAI `tools` list sent to the model; `ToolBox.call` runs one tool call from the raw JSON
arguments the model wrote and never raises: an unknown tool, arguments that are not a JSON object, a missing,
unexpected or wrongly typed argument, a refused path or a command past its time limit all come back as an
error outcome whose text says what was wrong and what the tool expects, so the model can correct itself.

`execute_bash` runs in the `Sandbox`. `str_replace_editor` follows OpenHands' editor (itself Anthropic's
text-editor tool): `cat -n` views, `create` that never overwrites, `str_replace` only on exactly one
verbatim occurrence (the errors name the line numbers of several), `insert` after a line, and `undo_edit`
from a per-file history; a numbered snippet of the edited region comes back after each edit. It works in
host Python but only inside the workspace: paths are resolved (links included) before any check, and a path
that ends up outside the workspace is refused, so the editor can neither read nor write more than the
sandboxed commands can write. Between commands nothing sandboxed is running (each command's processes are
gone when it returns), so a link cannot change between the check and the write. Writes replace the file
(never write through a hard link) and keep its permission bits. Departures from OpenHands: undoing a
`create` removes the file (OpenHands rewrites the same text), a view does not number a phantom empty line
after the final newline, files with CRLF line ends are edited as if they had LF ones and keep CRLF.

Every tool reply is at most `max_output_chars` long: longer text loses its middle, replaced by
"[... N characters truncated ...]".
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tramontane.agent.sandbox import Sandbox
from tramontane.errors import ConfigError
from tramontane.files import write_atomic

logger = logging.getLogger(__name__)

SNIPPET_CONTEXT_LINES = 4  # lines shown above and below an edit, as OpenHands does
MAX_EDITOR_FILE_BYTES = 10 << 20
MAX_UNDO_PER_FILE = 10
EDITOR_COMMANDS = ("view", "create", "str_replace", "insert", "undo_edit")

def _prose(text: str) -> str:
    """Source-wrapped text as the model gets it: an indented line continues the line above."""
    return re.sub(r"\n +", " ", text.strip())


_BASH_DESCRIPTION = _prose("""
Run a bash command in the workspace's sandbox and get back its output (stdout and stderr together) and its
  exit code.
* Each call is a fresh shell: the working directory carries over to the next call (so `cd` works), but shell
  variables, functions and aliases do not. Chain steps with `&&` or `;`, or write a script and run it.
* Commands read no input and have no terminal: use non-interactive options (`git --no-pager ...`,
  `pip install -q ...`) or pipe the answers in (`yes | ...`).
* Every command has a hard time limit. Set `timeout` (seconds) for long ones such as a test suite; at the
  limit the command and everything it started are killed and you get the output so far.
* Processes started in the background (`cmd &`) are stopped when the command returns: start a server and
  query it within one command.
* Only the workspace is writable; /tmp is fresh for each command; there is normally no network, so
  downloads and `pip install` from an index fail.
* Long output is shortened in the middle: redirect it to a file and look at parts of it (`grep -n`, `head`,
  `tail`, `sed -n 'A,Bp'`).
""")

_EDITOR_DESCRIPTION = _prose("""
View, create and edit plain-text files in the workspace.
* `view`: on a file, shows it as `cat -n` does (line number, tab, line), all of it or the lines in
  `view_range`; on a directory, lists the files and directories in it up to 2 levels deep, hidden ones left
  out.
* `create`: writes a new file with `file_text`, making missing parent directories. It refuses a `path` that
  exists: change an existing file with `str_replace` or `insert`.
* `str_replace`: replaces `old_str` with `new_str` (omitted or empty: deletes `old_str`). `old_str` must
  match exactly one place in the file, character for character, indentation and blank lines included. With
  no match, or with several (the error lists their line numbers), nothing changes: add a few surrounding
  lines to `old_str` to make it unique.
* `insert`: inserts `new_str` as new lines after line `insert_line` (0 inserts at the top).
* `undo_edit`: reverts the last change this tool made to the file at `path`; repeat to go further back.
* `path` is an absolute path inside the workspace; links are followed and must stay inside it.
* After an edit you get a numbered snippet of the changed region: check the indentation and that no line is
  duplicated or lost.
""")

_THINK_DESCRIPTION = _prose("""
Write down your reasoning: what you learned from the last results, a hypothesis about the cause of a bug,
  the options for the next step and which one you pick. It changes nothing and has no result; use it when
  thinking first will save actions.
""")

_FINISH_DESCRIPTION = _prose("""
End the task. Call it once the task is done, with a summary of what you changed and how you checked it, or
  when you cannot make progress, saying what blocks you. Nothing runs after it.
""")


def _function(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOL_SPECS: list[dict[str, Any]] = [
    _function("execute_bash", _BASH_DESCRIPTION, {
        "command": {"type": "string", "description": (
            "The bash command to run; several lines are allowed. Chain commands with `&&` or `;`.")},
        "is_input": {"type": "string", "enum": ["true", "false"], "description": (
            "`true` would send `command` as input to a running process. Here every command runs to "
            "completion (or to its time limit), so there is never one: leave this out or use `false`.")},
        "timeout": {"type": "number", "description": (
            "A hard time limit for this command, in seconds. Without it the sandbox's default limit applies; "
            "it cannot go above the sandbox's maximum.")},
    }, ["command"]),
    _function("str_replace_editor", _EDITOR_DESCRIPTION, {
        "command": {"type": "string", "enum": list(EDITOR_COMMANDS), "description": (
            "The editor command: `view`, `create`, `str_replace`, `insert` or `undo_edit`.")},
        "path": {"type": "string", "description": (
            "Absolute path to a file or directory in the workspace, e.g. `/workspace/src/module.py`.")},
        "file_text": {"type": "string", "description": (
            "For `create` (required): the content of the new file.")},
        "old_str": {"type": "string", "description": (
            "For `str_replace` (required): the exact text to replace, occurring once in the file.")},
        "new_str": {"type": "string", "description": (
            "For `str_replace` (optional, default empty): the text that replaces `old_str`. For `insert` "
            "(required): the text to insert.")},
        "insert_line": {"type": "integer", "description": (
            "For `insert` (required): `new_str` goes after this line; 0 puts it at the top.")},
        "view_range": {"type": "array", "items": {"type": "integer"}, "description": (
            "For `view` of a file (optional): [first, last] line numbers to show, counting from 1; "
            "[first, -1] shows from `first` to the end. Without it the whole file is shown.")},
    }, ["command", "path"]),
    _function("think", _THINK_DESCRIPTION, {
        "thought": {"type": "string", "description": "Your reasoning."},
    }, ["thought"]),
    _function("finish", _FINISH_DESCRIPTION, {
        "message": {"type": "string", "description": "The final message: what was done, or what blocks you."},
    }, ["message"]),
]


@dataclass(frozen=True)
class ToolOutcome:
    """The result of one tool call: `content` is the tool message the model reads; `error` marks a call the
    model should correct (bad arguments, refused path, timeout); `finished` and `message` are `finish`'s."""

    content: str
    error: bool
    finished: bool = False
    message: str | None = None


class ToolError(Exception):
    """A tool call that cannot be carried out; its text is shown to the model."""


class ToolBox:
    """The four tools over one `Sandbox`; `call` runs a tool call as the model wrote it."""

    def __init__(self, sandbox: Sandbox, *, max_output_chars: int = 10_000) -> None:
        if isinstance(max_output_chars, bool) or not isinstance(max_output_chars, int) or (
                max_output_chars < 1000):
            raise ConfigError(f"max_output_chars must be an integer >= 1000 (room for a tool's notes), got "
                              f"{max_output_chars!r}")
        self.sandbox = sandbox
        self.max_output_chars = max_output_chars
        self.editor = FileEditor(sandbox)
        self._tools: dict[str, Callable[..., ToolOutcome]] = {
            "execute_bash": self._execute_bash, "str_replace_editor": self._str_replace_editor,
            "think": self._think, "finish": self._finish,
        }
        self._schemas = {spec["function"]["name"]: spec["function"]["parameters"] for spec in TOOL_SPECS}

    def call(self, name: str, arguments: str) -> ToolOutcome:
        """Run tool `name` with `arguments`, the JSON text from the model's tool call. Never raises."""
        try:
            if name not in self._tools:
                return _error(f"Unknown tool `{name}`. The available tools are: {', '.join(self._tools)}.")
            schema = self._schemas[name]
            try:  # some clients hand over parsed arguments, and some models send "" for "no arguments"
                args = (arguments if isinstance(arguments, dict)
                        else json.loads(arguments) if arguments.strip() else {})
            except (json.JSONDecodeError, AttributeError) as e:
                return _error(f"The arguments of `{name}` are not valid JSON ({e}). Send one JSON object. "
                              f"{_describe(schema)}")
            if not isinstance(args, dict):
                return _error(f"The arguments of `{name}` must be a JSON object, got {type(args).__name__}. "
                              f"{_describe(schema)}")
            problem = _check_arguments(schema, args)
            if problem is not None:
                return _error(f"Invalid arguments for `{name}`: {problem}. {_describe(schema)}")
            outcome = self._tools[name](**{k: v for k, v in args.items() if v is not None})
        except ToolError as e:
            outcome = _error(str(e))
        except Exception as e:  # the model must always get an answer; the loop goes on
            logger.exception("tool %s failed", name)
            outcome = _error(f"The tool `{name}` failed unexpectedly: {type(e).__name__}: {e}")
        if len(outcome.content) > self.max_output_chars:
            outcome = ToolOutcome(truncate_middle(outcome.content, self.max_output_chars), outcome.error,
                                  outcome.finished, outcome.message)
        return outcome

    def _execute_bash(self, command: str, timeout: float | None = None,
                      is_input: str = "false") -> ToolOutcome:
        if is_input == "true":
            raise ToolError("There is no running process to send input to: every command runs to "
                            "completion (or to its time limit) before you get its output. Run the program "
                            "again with its input piped in, e.g. `printf 'y\\n' | ./script.sh`.")
        if not command.strip():
            raise ToolError("The command is empty. There is no earlier command still running whose output "
                            "you could read more of: give the command to run.")
        if "\0" in command:
            raise ToolError("The command contains a NUL character; bash cannot run it.")
        limit = self.sandbox.limits.wall_seconds
        if timeout is not None and timeout <= 0:
            raise ToolError(f"`timeout` must be a positive number of seconds (at most {limit:g}), got "
                            f"{timeout}.")
        wall = limit if timeout is None else min(float(timeout), limit)
        result = self.sandbox.run(command, timeout=wall)
        output = result.output.removesuffix("\n")
        if result.timed_out:
            printed = "the output above is what it printed until then" if output else "it printed nothing"
            note = (f"[The command was killed after {wall:g} seconds, its time limit, with every process "
                    f"it started; {printed}. If it needs longer, run it again with a larger `timeout` (at "
                    f"most {limit:g}); otherwise make it do less (fewer tests, a smaller input) or find out "
                    "why it hangs (a prompt waiting for input, a server that never stops).]")
            return ToolOutcome(self._fit(output, note), error=True)
        if result.killed == "processes":
            limit_n = self.sandbox.limits.processes
            note = (f"[The command was killed: it ran more than {limit_n} processes and threads at once, the "
                    "sandbox's limit, so it and every process it started were stopped. Use fewer parallel "
                    "workers or threads.]")
            return ToolOutcome(self._fit(output, note), error=True)
        note = ""
        if result.killed == "cpu time":
            note = (f"[A process ran out of CPU time ({self.sandbox.limits.cpu_seconds} s per process) and "
                    "was killed.]\n")
        note += (f"[The command completed with exit code {result.exit_code}.]\n"
                 f"[Current working directory: {self.sandbox.cwd}]")
        return ToolOutcome(self._fit(output, note), error=False)

    def _fit(self, output: str, note: str) -> str:
        """`output` then `note`, the output shortened so that the note always shows."""
        room = max(100, self.max_output_chars - len(note) - 1)
        return f"{truncate_middle(output, room)}\n{note}" if output else note

    def _str_replace_editor(self, command: str, path: str, **kwargs: Any) -> ToolOutcome:
        return ToolOutcome(self.editor(command, path, **kwargs), error=False)

    def _think(self, thought: str) -> ToolOutcome:
        logger.info("think: %s", thought)
        return ToolOutcome("Your thought has been logged.", error=False)

    def _finish(self, message: str) -> ToolOutcome:
        return ToolOutcome(message, error=False, finished=True, message=message)


class FileEditor:
    """`str_replace_editor` over the files of one sandbox's workspace (module docstring); raises
    `ToolError`."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self._history: dict[Path, list[bytes | None]] = {}  # content before each edit; None: it did not exist

    def __call__(self, command: str, path: str, *, file_text: str | None = None, old_str: str | None = None,
                 new_str: str | None = None, insert_line: int | None = None,
                 view_range: list[int] | None = None) -> str:
        target = self._resolve(command, path)
        if command == "view":
            return self.view(target, view_range)
        if command == "create":
            if file_text is None:
                raise ToolError(_missing("file_text", command))
            return self.create(target, file_text)
        if command == "str_replace":
            if old_str is None:
                raise ToolError(_missing("old_str", command))
            return self.str_replace(target, old_str, new_str or "")
        if command == "insert":
            if insert_line is None:
                raise ToolError(_missing("insert_line", command))
            if new_str is None:
                raise ToolError(_missing("new_str", command))
            return self.insert(target, insert_line, new_str)
        return self.undo_edit(target)

    def _resolve(self, command: str, raw: str) -> Path:
        """The real path `raw` names, checked to lie inside the workspace and to suit `command`."""
        workspace = self.sandbox.workspace
        given = Path(raw)
        if not given.is_absolute():
            hint = "The path should be an absolute path, starting with `/`."
            guess = self.sandbox.cwd / given
            if Path(os.path.realpath(guess)).is_relative_to(workspace) and guess.exists():
                hint += f" Maybe you meant {guess}?"
            raise ToolError(_invalid("path", raw, hint))
        real = Path(os.path.realpath(given))
        if not real.is_relative_to(workspace):
            where = "It" if real == Path(os.path.normpath(given)) else f"It resolves to {real}, which"
            raise ToolError(_invalid("path", raw, f"{where} is outside the workspace {workspace}; this tool "
                                     "only works on files inside the workspace."))
        exists = real.exists()
        if command == "create" and exists:
            raise ToolError(_invalid("path", raw, f"File already exists at: {raw}. Cannot overwrite files "
                                     "using command `create`."))
        if command != "create" and not exists:
            raise ToolError(_invalid("path", raw, f"The path {raw} does not exist. Please provide a valid "
                                     "path."))
        if exists and not (real.is_file() or real.is_dir()):  # a FIFO would block the read forever
            raise ToolError(_invalid("path", raw, f"The path {raw} is not a regular file or a directory."))
        if command != "view" and real.is_dir():
            raise ToolError(_invalid("path", raw, f"The path {raw} is a directory and only the `view` "
                                     "command can be used on directories."))
        return real

    # --------------------------------------------------------------------------------------------- commands

    def view(self, path: Path, view_range: list[int] | None) -> str:
        if path.is_dir():
            if view_range:
                raise ToolError(_invalid("view_range", view_range, "The `view_range` parameter is not "
                                         "allowed when `path` points to a directory."))
            return self._list(path)
        lines = _lines(self._read(path)[0])
        if not view_range:
            return _cat_n(lines, 1, str(path))
        if len(view_range) != 2:
            raise ToolError(_invalid("view_range", view_range, "It should be a list of two integers."))
        first, last = view_range
        if not 1 <= first <= len(lines):
            raise ToolError(_invalid("view_range", view_range, f"Its first element `{first}` should be "
                                     f"within the range of lines of the file: {[1, len(lines)]}."))
        note = ""
        if last == -1:
            last = len(lines)
        elif last > len(lines):
            note = (f"\nNOTE: We only show up to {len(lines)} since there's only {len(lines)} lines in this "
                    "file.\n")
            last = len(lines)
        if last < first:
            raise ToolError(_invalid("view_range", view_range, f"Its second element `{last}` should be "
                                     f"greater than or equal to the first element `{first}`."))
        return _cat_n(lines[first - 1:last], first, str(path)) + note

    def create(self, path: Path, file_text: str) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, file_text)
        self._remember(path, None)
        return f"File created successfully at: {path}"

    def str_replace(self, path: Path, old_str: str, new_str: str) -> str:
        if old_str == "":
            raise ToolError(_invalid("old_str", "''", "It is empty: give the exact text to replace."))
        if new_str == old_str:
            raise ToolError(_invalid("new_str", new_str, "No replacement was performed. `new_str` and "
                                     "`old_str` must be different."))
        text, crlf, raw = self._read(path)
        starts = _occurrences(text, old_str)
        if not starts:
            raise ToolError(f"No replacement was performed, old_str `{old_str}` did not appear verbatim in "
                            f"{path}.")
        if len(starts) > 1:
            lines = sorted({text.count("\n", 0, s) + 1 for s in starts})
            raise ToolError(f"No replacement was performed. Multiple occurrences of old_str `{old_str}` in "
                            f"lines {lines}. Please ensure it is unique.")
        start = starts[0]
        new_text = text[:start] + new_str + text[start + len(old_str):]
        self._write(path, new_text, crlf, raw)
        line = text.count("\n", 0, start) + 1
        first = max(0, line - 1 - SNIPPET_CONTEXT_LINES)
        last = line + SNIPPET_CONTEXT_LINES + new_str.count("\n")
        snippet = _cat_n(_lines(new_text)[first:last], first + 1, f"a snippet of {path}")
        return (f"The file {path} has been edited. {snippet}Review the changes and make sure they are as "
                "expected. Edit the file again if necessary.")

    def insert(self, path: Path, insert_line: int, new_str: str) -> str:
        text, crlf, raw = self._read(path)
        lines = _lines(text)
        if not 0 <= insert_line <= len(lines):
            raise ToolError(_invalid("insert_line", insert_line, "It should be within the range of allowed "
                                     f"values: {[0, len(lines)]}"))
        inserted = new_str.split("\n")
        new_lines = lines[:insert_line] + inserted + lines[insert_line:]
        # a file that ended with a newline still does; one that did not, still does not (unless appended to)
        new_text = "\n".join(new_lines) + ("\n" if text.endswith("\n") or insert_line == len(lines) else "")
        if text == "":
            new_text = "\n".join(inserted) + "\n"
        self._write(path, new_text, crlf, raw)
        first = max(0, insert_line - SNIPPET_CONTEXT_LINES)
        last = insert_line + SNIPPET_CONTEXT_LINES + len(inserted)
        snippet = _cat_n(new_lines[first:last], first + 1, "a snippet of the edited file")
        return (f"The file {path} has been edited. {snippet}Review the changes and make sure they are as "
                "expected (correct indentation, no duplicate lines, etc). Edit the file again if necessary.")

    def undo_edit(self, path: Path) -> str:
        history = self._history.get(path)
        if not history:
            raise ToolError(f"No edit history found for {path}.")
        previous = history.pop()
        if previous is None:
            path.unlink()
            return f"Last edit to {path} undone successfully: the file it created was removed."
        write_atomic(path, previous, stat.S_IMODE(path.stat().st_mode))
        text = previous.decode("utf-8", errors="replace").replace("\r\n", "\n")
        return f"Last edit to {path} undone successfully. {_cat_n(_lines(text), 1, str(path))}"

    # ---------------------------------------------------------------------------------------------- helpers

    def _read(self, path: Path) -> tuple[str, bool, bytes]:
        """(text with LF line ends, whether the file uses CRLF, the bytes as on disk)."""
        size = path.stat().st_size
        if size > MAX_EDITOR_FILE_BYTES:
            raise ToolError(f"File {path} is too large ({size / 2**20:.1f} MB; at most "
                            f"{MAX_EDITOR_FILE_BYTES >> 20} MB). Look at parts of it with execute_bash "
                            "(`grep -n`, `sed -n 'A,Bp'`).")
        raw = path.read_bytes()
        if b"\0" in raw[:8192]:
            raise ToolError(f"File {path} appears to be binary and this file type cannot be read or edited "
                            "by this tool.")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ToolError(f"File {path} is not UTF-8 text ({e}); inspect or convert it with execute_bash "
                            "(`file`, `iconv`).") from None
        crlf = "\r\n" in text and text.count("\r\n") == text.count("\n")
        return (text.replace("\r\n", "\n") if crlf else text), crlf, raw

    def _write(self, path: Path, text: str, crlf: bool, previous: bytes) -> None:
        data = (text.replace("\n", "\r\n") if crlf else text).encode("utf-8")
        write_atomic(path, data, stat.S_IMODE(path.stat().st_mode))
        self._remember(path, previous)

    def _remember(self, path: Path, previous: bytes | None) -> None:
        history = self._history.setdefault(path, [])
        history.append(previous)
        del history[:-MAX_UNDO_PER_FILE]

    def _list(self, path: Path) -> str:
        """The directory and its non-hidden entries two levels deep, one path a line, directories with `/`."""
        entries: list[str] = []
        hidden = 0
        for entry in os.scandir(path):
            if entry.name.startswith("."):
                hidden += 1
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            entries.append(entry.path + ("/" if is_dir else ""))
            if is_dir:
                try:
                    for sub in os.scandir(entry.path):
                        if not sub.name.startswith("."):
                            entries.append(sub.path + ("/" if sub.is_dir(follow_symlinks=False) else ""))
                except OSError:
                    pass
        listing = "\n".join([f"{path}/", *sorted(entries)])
        text = (f"Here's the files and directories up to 2 levels deep in {path}, excluding hidden items:\n"
                f"{listing}\n")
        if hidden:
            text += (f"\n{hidden} hidden files/directories in this directory are excluded. You can use "
                     f"'ls -la {path}' to see them.")
        return text


def truncate_middle(text: str, limit: int) -> str:
    """`text` if at most `limit` characters long, else its start and its end around
    "[... N characters truncated ...]"."""
    if len(text) <= limit:
        return text
    marker = f"\n[... {len(text) - limit} characters truncated ...]\n"
    keep = max(0, limit - len(marker))
    dropped = len(text) - keep
    marker = f"\n[... {dropped} characters truncated ...]\n"
    head = keep // 2
    return text[:head] + marker + text[len(text) - (keep - head):]


def _lines(text: str) -> list[str]:
    """The lines of `text`, without a phantom empty one after a final newline."""
    lines = text.split("\n")
    return lines[:-1] if text.endswith("\n") else lines if text else []


def _cat_n(lines: list[str], first: int, what: str) -> str:
    numbered = "\n".join(f"{first + i:6}\t{line}" for i, line in enumerate(lines))
    return f"Here's the result of running `cat -n` on {what}:\n{numbered}\n"


def _occurrences(text: str, needle: str) -> list[int]:
    """Start offsets of the non-overlapping occurrences of `needle`."""
    starts, at = [], text.find(needle)
    while at != -1:
        starts.append(at)
        at = text.find(needle, at + len(needle))
    return starts


def _invalid(parameter: str, value: object, hint: str) -> str:
    return f"Invalid `{parameter}` parameter: {value}. {hint}"


def _missing(parameter: str, command: str) -> str:
    return f"Parameter `{parameter}` is required for command: {command}."


def _error(text: str) -> ToolOutcome:
    return ToolOutcome(f"ERROR:\n{text}", error=True)


_JSON_TYPES: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
}


def _check_arguments(schema: dict[str, Any], args: dict[str, Any]) -> str | None:
    """What is wrong with `args` against the tool's JSON schema (None: nothing). A null optional argument
    counts as absent, as models often send every parameter."""
    properties: dict[str, Any] = schema["properties"]
    unexpected = sorted(set(args) - set(properties))
    if unexpected:
        return f"unexpected argument{'s' * (len(unexpected) > 1)} {', '.join(f'`{u}`' for u in unexpected)}"
    for name in schema["required"]:
        if args.get(name) is None:
            return f"missing required argument `{name}`"
    for name, value in args.items():
        if value is None:
            continue
        prop = properties[name]
        if not _JSON_TYPES[prop["type"]](value):
            return f"`{name}` must be of type {prop['type']}, got {json.dumps(value)[:100]}"
        if prop["type"] == "array" and not all(_JSON_TYPES[prop["items"]["type"]](v) for v in value):
            return f"`{name}` must be an array of {prop['items']['type']}s, got {json.dumps(value)[:100]}"
        if "enum" in prop and value not in prop["enum"]:
            allowed = ", ".join(map(json.dumps, prop["enum"]))
            return f"`{name}` must be one of {allowed}, got {json.dumps(value)[:100]}"
    return None


def _describe(schema: dict[str, Any]) -> str:
    """The expected arguments in one line, e.g. `command` (string, required), `timeout` (number)."""
    parts = []
    for name, prop in schema["properties"].items():
        kind = f"array of {prop['items']['type']}s" if prop["type"] == "array" else prop["type"]
        if "enum" in prop:
            kind += ": " + " | ".join(map(json.dumps, prop["enum"]))
        parts.append(f"`{name}` ({kind}{', required' if name in schema['required'] else ''})")
    return "Expected arguments: " + ", ".join(parts) + "."
