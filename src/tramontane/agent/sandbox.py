"""Running the agent's shell commands in a throw-away bubblewrap sandbox, one fresh `bwrap` per command.

What a command sees:
- file system: the host read-only and cut down to what commands need: /usr with the /bin, /sbin and /lib*
  links, a short list of /etc entries (no shadow files, no private keys, no pip credentials), the Python
  installation running tramontane (`sys.prefix`, `sys.base_prefix`) so its interpreter and test tools work,
  and `extra_read_only`. Home folders, /root, the project checkout and everything else are absent. The
  workspace is the only writable host path, mounted at its own path so that paths in tool output are host
  paths. /tmp and /dev/shm are fresh tmpfs bounded in size; / and /dev are read-only.
- namespaces: its own user namespace (uid 1000, no capabilities, no nested user namespaces), pid namespace
  (the command's shell is a child of bwrap's init, and when the init dies the kernel kills every process in
  the namespace: nothing a command starts outlives it, `cmd &` and `setsid` included), network namespace
  (a loopback only, unless `network=True`), ipc, uts and cgroup namespaces; a new terminal session.
- environment: a small fixed set (`PATH`, `HOME` = the workspace, `LANG`, `TERM=dumb`, ...); nothing of the
  host's environment, so no tokens or keys leak in.

Limits, per command:
- wall time: the whole tree is killed at the deadline (bwrap's init first, which takes the namespace down);
- CPU time (RLIMIT_CPU: SIGXCPU at `cpu_seconds`, SIGKILL a second later), address space (RLIMIT_AS) and
  processes (RLIMIT_NPROC), set by the command's shell with `ulimit` before it runs anything, so no
  `preexec_fn` is needed and sandboxes may run from several threads. Set inside the sandbox's own user
  namespace, RLIMIT_NPROC counts the sandbox's tasks only, not the host user's other processes (checked
  as an unprivileged user: forks fail at the limit);
- processes, again: Linux exempts tasks whose real uid is the host's root from RLIMIT_NPROC (checked: in a
  user namespace and without capabilities too), so when tramontane runs as root the kernel limit is void.
  A watchdog therefore checks every 10 ms whether the host's task count grew by more than `processes`
  since the command started (one read of /proc/loadavg) and, only then, counts the sandbox's own tasks
  (a /proc scan) and kills the tree above the limit. A fork bomb is stopped within a few polls either way;
- output: stdout and stderr share one pipe (so they interleave as on a terminal); past `output_bytes` the
  middle is dropped and counted, keeping the start and the end (where errors usually are).

The working directory carries over between commands: the command's shell reports its final directory on an
extra pipe when it exits, and the next command starts there; a directory outside the workspace (or one that
no longer exists) sends the next command back to the workspace. Shell variables and background processes do
not carry over: each command is a new shell in a new sandbox.

Without bubblewrap, or where it cannot create namespaces, `Sandbox` refuses to start unless
`unsafe_no_sandbox=True`: then commands run as plain subprocesses with the same environment, limits (the
process limit by the watchdog alone), output handling and working-directory rule, but see the whole host and
its network, and a process that leaves the command's session (`setsid`) can survive it.

Cost: starting bwrap with these options takes about 15-25 ms against 1 ms for a plain subprocess (the
network namespace is about 4 ms of it; each bind mount about 0.3 ms, hence one copied /etc instead of one
mount per entry); `run("true")` takes about 25-45 ms in all on a busy 2-core machine. `Sandbox` runs one
check command when created, and the first one in a process also copies /etc (about 0.4 s).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Self

from tramontane.errors import ConfigError, SandboxUnavailableError, TramontaneWarning
from tramontane.files import write_dir_atomic

logger = logging.getLogger(__name__)

SANDBOX_UID = 1000  # the user commands run as inside the sandbox (mapped to the host user running tramontane)
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`), or run commands without isolation on "
    "purpose with `--unsafe-no-sandbox` (`Sandbox(..., unsafe_no_sandbox=True)`)"
)

# The sandbox's /etc is a private copy, made once per process and bound read-only: one mount instead of one
# per entry (each costs about 0.3 ms at every command), and only entries known to hold no secrets. Listing
# them matters because the sandbox user is the host user: when that is root, every root-owned file the
# sandbox can see is its own (/etc/shadow, /etc/ssl/private would be readable). Its own passwd, group,
# hostname and hosts name the sandbox user `agent` and the host `sandbox`.
_ETC_COPIED = (
    "alternatives", "bash.bashrc", "ca-certificates", "ca-certificates.conf", "debian_version", "gai.conf",
    "gitconfig", "host.conf", "inputrc", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "locale.alias",
    "localtime", "magic", "magic.mime", "mime.types", "networks", "nsswitch.conf", "os-release", "profile",
    "protocols", "python3", f"python3.{sys.version_info.minor}", "resolv.conf", "services", "shells",
    "ssl/certs", "ssl/openssl.cnf", "terminfo", "timezone",
)
_ETC_WRITTEN = {
    "passwd": (f"root:x:0:0:root:/root:/bin/bash\nagent:x:{SANDBOX_UID}:{SANDBOX_UID}:agent:/tmp:/bin/bash\n"
               "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
    "group": f"root:x:0:\nagent:x:{SANDBOX_UID}:\nnogroup:x:65534:\n",
    "hostname": "sandbox\n",
    "hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tsandbox\n",
}
_etc_lock = threading.Lock()
_etc_dir: Path | None = None
_ROOT_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # into /usr on merged-/usr systems
_SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
_BWRAP_PATHS = ("/usr/bin/bwrap",)
_SHM_BYTES = 64 << 20
_POLL_SECONDS = 0.01  # watchdog period, and the longest a wall-time kill is late
_DRAIN_SECONDS = 1.0  # after the command's shell exits, how long stragglers may hold its output open
_TRAILER_BYTES = 8192  # the end of the working-directory pipe that is kept


@dataclass(frozen=True)
class SandboxLimits:
    """Per-command limits of a `Sandbox`.

    `cpu_seconds` is each process's CPU time (RLIMIT_CPU), `wall_seconds` the default wall-clock limit of a
    command and everything it started, `memory_bytes` each process's address space (RLIMIT_AS; also the size
    of the sandbox's /tmp), `processes` the most tasks (processes and threads) alive in the sandbox at once,
    `output_bytes` the command output kept (the middle of longer output is dropped and counted).
    """

    cpu_seconds: int = 60
    wall_seconds: float = 120.0
    memory_bytes: int = 2 << 30
    processes: int = 256
    output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        minimum = {"cpu_seconds": 1, "memory_bytes": 16 << 20, "processes": 4, "output_bytes": 64}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "wall_seconds":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                        math.isfinite(value) and value > 0):
                    raise ConfigError(f"SandboxLimits.wall_seconds must be a positive number, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < minimum[f.name]:
                raise ConfigError(f"SandboxLimits.{f.name} must be an integer >= {minimum[f.name]} (less "
                                  f"leaves no room for the command's own shell), got {value!r}")


@dataclass(frozen=True)
class CommandResult:
    """What one command did.

    `exit_code` is the shell's exit status (128+N when a signal N ended it), None when the sandbox killed the
    tree; `killed` says why the tree died: "wall time", "processes" or "closed" (the sandbox killed it),
    "cpu time" (the command's status says SIGXCPU), else None. `output` is stdout and stderr interleaved,
    decoded as UTF-8 with replacement characters; `seconds` the wall time from start to the end of its
    output.
    """

    exit_code: int | None
    output: str
    timed_out: bool
    killed: str | None
    seconds: float


class Sandbox:
    """Runs shell commands for an agent, each in a new bubblewrap sandbox over `workspace` (module docstring).

    `run` is serialized per sandbox (the working directory is shared state); separate sandboxes may run from
    separate threads. Raises `SandboxUnavailableError` when bwrap is missing or cannot create a sandbox here,
    unless `unsafe_no_sandbox` (then commands run unisolated, with a warning).
    """

    workspace: Path
    cwd: Path

    def __init__(self, workspace: Path, limits: SandboxLimits = SandboxLimits(), *,
                 unsafe_no_sandbox: bool = False, network: bool = False,
                 extra_read_only: Sequence[Path] = ()) -> None:
        if not isinstance(limits, SandboxLimits):
            raise ConfigError(f"limits must be a SandboxLimits, got {type(limits).__name__}")
        workspace = Path(workspace).resolve()
        if not workspace.is_dir():
            raise ConfigError(f"the workspace {workspace} is not a folder; create it (or check the path) "
                              "first")
        if workspace == Path("/"):
            raise ConfigError("the workspace cannot be / (it is the only writable path); give a project "
                              "folder")
        read_only = []
        for path in extra_read_only:
            path = Path(path).resolve()
            if not path.exists():
                raise ConfigError(f"extra_read_only path {path} does not exist")
            read_only.append(path)
        self.workspace = workspace
        self.cwd = workspace
        self.limits = limits
        self.unsafe_no_sandbox = unsafe_no_sandbox
        self.network = network
        self._env = _command_env(workspace)
        self._bash = _find_bash()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._killed_by_close: subprocess.Popen[bytes] | None = None  # the command close() killed, if any
        if unsafe_no_sandbox:
            self._prefix: list[str] = []
            message = (f"commands in {workspace} run WITHOUT a sandbox (unsafe_no_sandbox): they can read "
                       "and write anything this user can, and use the network")
            logger.warning(message)
            warnings.warn(message, TramontaneWarning, stacklevel=2)
        else:
            self._prefix = _bwrap_prefix(_find_bwrap(), workspace, limits, network,
                                         _python_paths() + read_only)
            self._check()

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        """Run `command` with `bash` in the current working directory and wait for it and everything it
        started; `timeout` (seconds) replaces `limits.wall_seconds` for this command."""
        if not isinstance(command, str) or "\0" in command:
            raise ConfigError("a command must be a string without NUL characters")
        wall = self.limits.wall_seconds if timeout is None else timeout
        if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not (
                math.isfinite(wall) and wall > 0):
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        with self._lock:
            if self._closed:
                raise SandboxUnavailableError("this sandbox was closed; create a new Sandbox to run commands")
            return self._execute(command, float(wall))

    def close(self) -> None:
        """Kill a command still running (from another thread) and refuse further commands."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._killed_by_close = proc  # set before the kill: the supervisor may see the pipes close first
            self._kill_tree(proc)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------------

    def _check(self) -> None:
        """Start one sandbox, so that a host where bwrap cannot work fails here, with bwrap's reason."""
        try:
            done = subprocess.run([*self._prefix, self._bash, "-c", "exit 0"], stdin=subprocess.DEVNULL,
                                  capture_output=True, env=self._env, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SandboxUnavailableError(f"bubblewrap could not start a sandbox ({e}); "
                                          f"{INSTALL_HINT}") from e
        if done.returncode != 0:
            reason = (done.stderr or done.stdout).decode(errors="replace").strip()
            raise SandboxUnavailableError(
                f"bubblewrap cannot create a sandbox here: {reason or f'exit code {done.returncode}'}. The "
                "kernel may forbid unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
                "or on Ubuntu kernel.apparmor_restrict_unprivileged_userns=0), or a container may block "
                "them; " + INSTALL_HINT
            )

    def _execute(self, command: str, wall: float) -> CommandResult:
        start_dir = self.cwd if self.cwd.is_dir() else self.workspace
        trailer_r, trailer_w = os.pipe()
        script = _shell_script(self.limits, trailer_w, sandboxed=not self.unsafe_no_sandbox)
        argv = [*self._prefix, self._bash, "-c", script, "bash", str(start_dir), str(self.workspace), command]
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=self._env, cwd=self.workspace,
                                    pass_fds=(trailer_w,), start_new_session=True)
        except BaseException:
            os.close(trailer_r)
            raise
        finally:
            os.close(trailer_w)
        self._proc = proc
        supervised = False
        try:
            output, trailer, killed = self._supervise(proc, trailer_r, start + wall)
            if killed is None and self._killed_by_close is proc:  # the pipes closed before the loop saw it
                killed = "closed"
            supervised = True
        finally:
            try:  # the outer bwrap exits a moment after the namespace it watched
                proc.wait(timeout=_DRAIN_SECONDS if supervised else 0)
            except subprocess.TimeoutExpired:
                self._kill_tree(proc)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    logger.error("sandbox process %d did not exit after SIGKILL", proc.pid)
            assert proc.stdout is not None
            proc.stdout.close()
            os.close(trailer_r)
            self._proc = None
        seconds = time.monotonic() - start
        code = proc.returncode
        if code is not None and code < 0:  # a plain subprocess (unsafe mode) ended by a signal
            code = 128 - code
        if killed is None and code == 128 + signal.SIGXCPU:
            killed = "cpu time"
        self.cwd = self._next_cwd(trailer)
        exit_code = None if killed in ("wall time", "processes", "closed") else code
        logger.debug("sandbox command %r: exit %s, killed %s, %.3f s", command[:200], exit_code, killed,
                     seconds)
        return CommandResult(exit_code=exit_code, output=output, timed_out=killed == "wall time",
                             killed=killed, seconds=seconds)

    def _supervise(self, proc: subprocess.Popen[bytes], trailer_fd: int,
                   deadline: float) -> tuple[str, bytes, str | None]:
        """Collect the output and the trailer until both pipes close; enforce the wall and process limits."""
        assert proc.stdout is not None
        output = _CappedOutput(self.limits.output_bytes)
        trailer = bytearray()
        open_fds = {proc.stdout.fileno(), trailer_fd}
        poller = select.poll()
        for fd in open_fds:
            poller.register(fd, select.POLLIN)
        watchdog = _TaskWatchdog(proc.pid, self.limits.processes, session=self.unsafe_no_sandbox)
        killed: str | None = None
        exited_at: float | None = None
        while open_fds:
            now = time.monotonic()
            if killed is None and now >= deadline:
                killed = "wall time"
                self._kill_tree(proc)
            elif killed is None and watchdog.over_limit(now):
                killed = "processes"
                self._kill_tree(proc)
            elif killed is None and self._closed:  # close() ran before this command's process was known
                killed = "closed"
                self._kill_tree(proc)
            if exited_at is None and proc.poll() is not None:
                exited_at = now
                if self.unsafe_no_sandbox:  # orphans of a plain subprocess may still hold the pipe
                    self._kill_tree(proc)
            if exited_at is not None and now - exited_at > _DRAIN_SECONDS:
                break  # a process out of reach keeps the pipe open; stop reading
            wait = _POLL_SECONDS if killed is not None else min(_POLL_SECONDS, max(0.0, deadline - now))
            for fd, _ in poller.poll(wait * 1000):
                data = os.read(fd, 1 << 16)
                if not data:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                elif fd == trailer_fd:
                    trailer += data
                    del trailer[:-_TRAILER_BYTES]
                else:
                    output.append(data)
        return output.text(), bytes(trailer), killed

    def _next_cwd(self, trailer: bytes) -> Path:
        """The directory the next command starts in: the one this command ended in, when it is inside the
        workspace (the shell writes NUL + `pwd -P` to the trailer pipe on exit), else the workspace."""
        if b"\0" not in trailer:
            return self.cwd if self.cwd.is_dir() else self.workspace  # killed, or it exec'd: no report
        reported = trailer.rsplit(b"\0", 1)[1].removesuffix(b"\n").decode(errors="replace")
        if not reported.startswith("/"):  # `pwd` failed (its directory was removed): nothing to resolve
            return self.workspace
        try:
            path = Path(reported).resolve()
        except (OSError, ValueError):
            return self.workspace
        return path if path.is_relative_to(self.workspace) and path.is_dir() else self.workspace

    def _kill_tree(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL everything the command started.

        Sandboxed: the outer bwrap stopped, then bwrap's init (its child) killed first; when a pid
        namespace's init dies the kernel kills every process in it and lets none fork, so nothing else needs
        finding. Unsandboxed: the session's process group and every live descendant or session member, again
        while a fork loop keeps adding some.
        """
        if not self.unsafe_no_sandbox:
            # Stopped first, so that the list of its children is final: bwrap killed just as it clones its
            # init would leave that init orphaned, in its own session, with its death signal not yet armed.
            _stop(proc.pid)
            table = _process_table()
            for pid in [*(pid for pid, row in table.items() if row[0] == proc.pid), proc.pid]:
                _kill(pid)
            return
        for _ in range(20):
            _kill(proc.pid, group=True)
            table = _process_table()
            targets = [pid for pid in _tree(table, proc.pid, session=True) if table[pid][3] != "Z"]
            if not targets:
                return
            for pid in targets:
                _kill(pid)
            time.sleep(0.005)


class _CappedOutput:
    """Keeps the first and the last `limit // 2` bytes of a stream and counts what falls in between."""

    def __init__(self, limit: int) -> None:
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head = bytearray()
        self._tail = bytearray()
        self._total = 0

    def append(self, data: bytes) -> None:
        self._total += len(data)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data
            if len(self._tail) > 2 * self._tail_limit:  # trim in batches, not at every read
                del self._tail[:-self._tail_limit]

    def text(self) -> str:
        tail = self._tail[-self._tail_limit:] if len(self._tail) > self._tail_limit else self._tail
        dropped = self._total - len(self._head) - len(tail)
        if dropped == 0:
            return (bytes(self._head) + bytes(tail)).decode(errors="replace")
        return (self._head.decode(errors="replace") + f"\n[... {dropped} bytes of output dropped ...]\n"
                + tail.decode(errors="replace"))


class _TaskWatchdog:
    """Is the command's tree above its task limit? See the module docstring (the root-user caveat).

    The system-wide task count (/proc/loadavg) is read at most every `_POLL_SECONDS`; the tree is counted
    (a /proc scan) only when the system gained more than `limit` tasks since the command started. Growth that
    turns out not to be the tree's is taken into the baseline, so a busy host does not cause a scan per poll.
    """

    def __init__(self, root_pid: int, limit: int, *, session: bool) -> None:
        self._root = root_pid
        self._limit = limit
        self._session = session
        self._baseline = _system_tasks()
        self._next = 0.0

    def over_limit(self, now: float) -> bool:
        if now < self._next:
            return False
        self._next = now + _POLL_SECONDS
        total = _system_tasks()
        if total is not None and self._baseline is not None and total - self._baseline <= self._limit:
            return False
        table = _process_table()
        count = sum(table[pid][2] for pid in _tree(table, self._root, session=self._session))
        if count > self._limit:
            return True
        if total is not None:
            self._baseline = total - count
        return False


def _system_tasks() -> int | None:
    """The number of tasks on the system (the 4th field of /proc/loadavg is `running/total`)."""
    try:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().split()[3].split(b"/")[1])
    except (OSError, IndexError, ValueError):
        return None


def _process_table() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (parent pid, session id, number of threads, state) of every process visible in /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            # after the command name in parentheses: state ppid pgrp session ... num_threads is the 18th
            rest = stat[stat.rindex(b")") + 2:].split()
            table[int(name)] = (int(rest[1]), int(rest[3]), int(rest[17]), rest[0].decode())
        except (OSError, ValueError, IndexError):
            continue  # it exited while we looked
    return table


def _tree(table: dict[int, tuple[int, int, int, str]], root: int, *, session: bool) -> list[int]:
    """The descendants of `root` (not `root` itself), plus, if `session`, the members of `root`'s session."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    seen = {root}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in seen:
                seen.add(child)
                found.append(child)
                stack.append(child)
    if session:
        found += [pid for pid, (_, sid, *_) in table.items() if sid == root and pid not in seen]
    return found


def _kill(pid: int, *, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _stop(pid: int, seconds: float = 1.0) -> None:
    """SIGSTOP `pid` and wait (at most `seconds`) until it is stopped or gone: it forks nothing more."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return
        if stat[stat.rindex(b")") + 2:][:1] in (b"T", b"t", b"Z", b"X"):
            return
        time.sleep(0.001)


def _shell_script(limits: SandboxLimits, trailer_fd: int, *, sandboxed: bool) -> str:
    """The shell that runs a command: limits first, then the start directory ($1, falling back to the
    workspace $2), an exit trap that reports the final directory on `trailer_fd`, and the command ($3)
    through `eval`, so that `cd`, `exit` and `set -e` behave as typed at a prompt.

    RLIMIT_CPU gets a hard limit one second above the soft one: the soft limit sends SIGXCPU (exit status
    152, reported as "cpu time"), the hard one SIGKILL. Core dumps are off (they would land in the workspace
    or go to the host's handler). A limit the host already set lower stays (`ulimit` fails quietly).
    RLIMIT_NPROC only in the sandbox: outside a user namespace it counts every process of the host user, so
    a desktop session alone could exceed it; the watchdog enforces `processes` there.
    """
    return (
        f"ulimit -H -t {limits.cpu_seconds + 1} 2>/dev/null; ulimit -S -t {limits.cpu_seconds} 2>/dev/null; "
        f"ulimit -v {limits.memory_bytes // 1024} 2>/dev/null; ulimit -c 0 2>/dev/null\n"
        + (f"ulimit -u {limits.processes} 2>/dev/null\n" if sandboxed else "") +
        'cd -- "$1" 2>/dev/null || cd -- "$2" || exit 126\n'
        f"trap 'printf \"\\0\" >&{trailer_fd}; pwd -P >&{trailer_fd} 2>/dev/null' EXIT\n"
        '__command=$3; set --\n'
        'eval "unset __command; $__command"\n'
    )


def _command_env(workspace: Path) -> dict[str, str]:
    """The whole environment of a command: nothing is inherited from the host."""
    path = list(dict.fromkeys([os.path.dirname(sys.executable), *_SYSTEM_PATH]))
    return {
        "PATH": ":".join(path),
        "HOME": str(workspace),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PAGER": "cat",
        "GIT_PAGER": "cat",
        "TMPDIR": "/tmp",
        "XDG_CACHE_HOME": "/tmp/.cache",  # caches stay out of the workspace (and out of the agent's diff)
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",  # stdout and stderr interleave in the order they were written
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
    }


def _find_bwrap() -> str:
    """bwrap on the PATH, else where Debian puts it (a service's PATH may lack /usr/bin)."""
    found = shutil.which("bwrap") or next((p for p in _BWRAP_PATHS if os.access(p, os.X_OK)), None)
    if found is None:
        raise SandboxUnavailableError(f"bubblewrap (`bwrap`) was not found, so commands cannot be sandboxed; "
                                      f"{INSTALL_HINT}")
    return found


def _find_bash() -> str:
    for candidate in ("/bin/bash", "/usr/bin/bash"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise SandboxUnavailableError("bash was not found at /bin/bash or /usr/bin/bash; the agent's commands "
                                  "need it")


def _python_paths() -> list[Path]:
    """The installation of the running Python (a virtual environment and the interpreter it was made from),
    so that `python`, `pytest` and the packages installed here work inside the sandbox."""
    paths = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    paths.add(Path(sys.executable).resolve().parent.parent)
    return [p for p in paths if p != Path("/")]


def _bwrap_prefix(bwrap: str, workspace: Path, limits: SandboxLimits, network: bool,
                  read_only: Sequence[Path]) -> list[str]:
    """The bwrap command line up to the command (see the module docstring for what each part is for)."""
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID),
            "--gid", str(SANDBOX_UID), "--hostname", "sandbox", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL"]
    if network:
        argv.append("--share-net")
    argv += ["--ro-bind", "/usr", "/usr", "--ro-bind", str(_staged_etc()), "/etc"]
    for path in _ROOT_LINKS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    # Parents before children, or a later mount would hide an earlier one (a workspace under /tmp, a read-only
    # path inside the workspace); a read-only path inside another one is already visible.
    kept = sorted({p for p in read_only if not any(q != p and p.is_relative_to(q) for q in read_only)})
    mounts: list[tuple[Path, list[str]]] = [
        (Path("/tmp"), ["--size", str(limits.memory_bytes), "--tmpfs", "/tmp"]),
        (Path("/dev/shm"), ["--size", str(_SHM_BYTES), "--tmpfs", "/dev/shm"]),
    ]
    mounts += [(p, ["--ro-bind", str(p), str(p)]) for p in kept if not p.is_relative_to("/usr")]
    mounts.append((workspace, ["--bind", str(workspace), str(workspace)]))
    for _, args in sorted(mounts, key=lambda m: len(m[0].parts)):
        argv += args
    argv += ["--remount-ro", "/", "--remount-ro", "/dev", "--chdir", str(workspace)]
    return argv


def _staged_etc() -> Path:
    """The private /etc of this process's sandboxes (see `_ETC_COPIED`), made on first use."""
    global _etc_dir
    with _etc_lock:
        if _etc_dir is None or not _etc_dir.is_dir():
            root = Path(tempfile.gettempdir()) / f"tramontane-sandbox-etc-{secrets.token_hex(8)}"
            write_dir_atomic(root, _fill_etc)
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            _etc_dir = root
        return _etc_dir


def _fill_etc(root: Path) -> None:
    for name in _ETC_COPIED:
        source, target = Path("/etc") / name, root / name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink() and os.path.realpath(source).startswith("/usr/"):
                target.symlink_to(os.readlink(source))  # visible in the sandbox as it is
            elif source.is_dir():
                shutil.copytree(source, target, symlinks=True)
            elif source.is_file():
                shutil.copyfile(source, target)
        except OSError as e:  # unreadable for this user, or gone: the sandbox goes without it
            logger.debug("sandbox /etc: skipping %s (%s)", source, e)
    for name, text in _ETC_WRITTEN.items():
        (root / name).write_text(text)
    (root / "mtab").symlink_to("../proc/self/mounts")
