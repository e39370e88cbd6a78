"""The agent's sandbox (`tramontane.agent.sandbox`): every escape fails, the limits hold, nothing outlives a
command, the working directory carries over.

Oracles are the host itself: files looked for on the host after the command, processes looked for in the
host's /proc, a socket listening on the host. Each escape test has a positive control (the same command
without the sandbox, or with the network allowed) so that a sandbox that stopped isolating would fail it.
Without a usable bubblewrap the sandboxed tests skip, except under CI (env CI set), where they fail.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tramontane.agent import sandbox as sandbox_module
from tramontane.agent.sandbox import CommandResult, Sandbox, SandboxLimits
from tramontane.errors import ConfigError, SandboxUnavailableError, TramontaneWarning

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICK = SandboxLimits(wall_seconds=20.0)


def make_sandbox(workspace: Path, limits: SandboxLimits = QUICK, **kwargs: object) -> Sandbox:
    """A bubblewrap sandbox; skip where bwrap cannot work here, but fail under CI, which installs it."""
    try:
        return Sandbox(workspace, limits, **kwargs)  # type: ignore[arg-type]
    except SandboxUnavailableError as e:
        if os.environ.get("CI"):
            pytest.fail(f"bubblewrap must work in CI: {e}")
        pytest.skip(str(e))


def make_unsafe(workspace: Path, limits: SandboxLimits = QUICK) -> Sandbox:
    with pytest.warns(TramontaneWarning, match="WITHOUT a sandbox"):
        return Sandbox(workspace, limits, unsafe_no_sandbox=True)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.fixture
def sandbox(workspace: Path) -> Iterator[Sandbox]:
    sb = make_sandbox(workspace)
    yield sb
    sb.close()


def host_processes_with(token: str) -> list[str]:
    """Command lines of host processes that mention `token` (read from /proc, the host's own view)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                raw = Path(f"/proc/{name}/cmdline").read_bytes()
                cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if token in cmdline:
                found.append(cmdline)
    return found


def wait_gone(token: str, seconds: float = 2.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := host_processes_with(token)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def unique_sleep() -> str:
    """A `sleep` argument no other process on the host has: 30 seconds and a random fraction."""
    return f"30.{secrets.randbelow(10**9):09d}"


# -------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("bad", [
    {"cpu_seconds": 0}, {"cpu_seconds": 1.5}, {"processes": True}, {"processes": 3}, {"memory_bytes": 1024},
    {"output_bytes": 10}, {"wall_seconds": 0}, {"wall_seconds": float("nan")}, {"wall_seconds": "5"},
])
def test_limits_are_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        SandboxLimits(**bad)  # type: ignore[arg-type]


def test_workspace_must_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a folder"):
        Sandbox(tmp_path / "missing", unsafe_no_sandbox=True)
    with pytest.raises(ConfigError, match="cannot be /"):
        Sandbox(Path("/"), unsafe_no_sandbox=True)


def test_without_bwrap_it_refuses_and_says_how_to_fix(workspace: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(sandbox_module, "_BWRAP_PATHS", ())
    with pytest.raises(SandboxUnavailableError) as info:
        Sandbox(workspace)
    assert "apt-get install bubblewrap" in str(info.value) and "--unsafe-no-sandbox" in str(info.value)
    unsafe = make_unsafe(workspace)  # allowed on purpose, with a warning
    assert unsafe.run("echo ok").output == "ok\n"


# ----------------------------------------------------------------------------------------------- what it sees


def test_identity_capabilities_and_environment(sandbox: Sandbox, workspace: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAMONTANE_TEST_SECRET", "s3cr3t-" + secrets.token_hex(4))
    assert os.environ["TRAMONTANE_TEST_SECRET"] in os.environ.values()
    result = sandbox.run("id -u; grep CapEff /proc/self/status; env")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "1000"
    assert lines[1].split() == ["CapEff:", "0000000000000000"]
    env = dict(line.split("=", 1) for line in lines[2:] if "=" in line)
    assert "TRAMONTANE_TEST_SECRET" not in env and "s3cr3t" not in result.output
    assert env["HOME"] == str(workspace) and env["TERM"] == "dumb"
    nested = sandbox.run("unshare --user true && echo NESTED")  # no user namespace inside the sandbox
    assert nested.exit_code != 0 and "NESTED" not in nested.output


def test_the_running_python_works_inside(sandbox: Sandbox) -> None:
    result = sandbox.run(f"{sys.executable} -c 'import sys, json; print(sys.prefix)'")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == sys.prefix


def test_writes_outside_the_workspace_fail(sandbox: Sandbox, workspace: Path, tmp_path: Path) -> None:
    name = f"tramontane-probe-{secrets.token_hex(6)}"
    # a checkout under /tmp (a scratch clone) is hidden by the sandbox's own /tmp: there it is a host_tmp case
    repo_in_tmp = Path("/tmp") in REPO_ROOT.resolve().parents
    read_only_targets = [Path("/etc") / name, Path("/usr") / name, Path(sys.prefix) / name, Path("/") / name]
    if not repo_in_tmp:
        read_only_targets.append(REPO_ROOT / name)
    for target in read_only_targets:
        result = sandbox.run(f"echo x > {target}")
        assert result.exit_code != 0, (target, result.output)
        assert not target.exists(), target
    # /tmp and the workspace's parents inside the sandbox are the sandbox's own tmpfs, not the host's
    host_tmp = [Path("/tmp") / name, tmp_path / name] + ([REPO_ROOT / name] if repo_in_tmp else [])
    for target in host_tmp:
        sandbox.run(f"echo x > {target}")
        assert not target.exists(), target
    control = sandbox.run(f"echo inside > {workspace / name}")
    assert control.exit_code == 0 and (workspace / name).read_text() == "inside\n"


def test_reads_outside_the_allowed_set_fail(sandbox: Sandbox, workspace: Path, tmp_path: Path) -> None:
    secret = "secret-" + secrets.token_hex(8)
    home_file = Path.home() / f".tramontane-probe-{secrets.token_hex(6)}"
    outside = tmp_path / "outside.txt"
    outside.write_text(secret)
    home_file.write_text(secret)
    try:
        targets = [home_file, outside, REPO_ROOT / "README.md", REPO_ROOT / "pyproject.toml"]
        for target in targets:
            first_line = next(line for line in target.read_text().splitlines() if line.strip())
            result = sandbox.run(f"cat {target}")
            assert result.exit_code != 0, (target, result.output)
            assert first_line not in result.output, target
        unsafe = make_unsafe(workspace)  # the control: the same reads succeed without the sandbox
        for target in targets:
            assert unsafe.run(f"cat {target}").exit_code == 0, target
        assert secret in unsafe.run(f"cat {home_file}").output
    finally:
        home_file.unlink()


def test_extra_read_only_paths_are_visible_but_not_writable(workspace: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "table.csv").write_text("a,b\n1,2\n")
    sb = make_sandbox(workspace, extra_read_only=[data])
    assert sb.run(f"cat {data / 'table.csv'}").output == "a,b\n1,2\n"
    assert sb.run(f"echo 3,4 >> {data / 'table.csv'}").exit_code != 0
    assert (data / "table.csv").read_text() == "a,b\n1,2\n"
    with pytest.raises(ConfigError, match="does not exist"):
        Sandbox(workspace, extra_read_only=[tmp_path / "missing"])


def test_no_network_unless_allowed(workspace: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        connect = (f"{sys.executable} -c \"import socket; socket.create_connection(('127.0.0.1', {port}), "
                   "timeout=3); print('CONNECTED')\"")
        isolated = make_sandbox(workspace)
        result = isolated.run(connect)
        assert result.exit_code != 0 and "CONNECTED" not in result.output
        assert "ConnectionRefusedError" in result.output or "Errno" in result.output, result.output
        shared = make_sandbox(workspace, network=True)  # the control: the host's loopback is reachable
        result = shared.run(connect)
        assert result.exit_code == 0 and "CONNECTED" in result.output, result.output


# -------------------------------------------------------------------------------------------------- limits


def test_wall_time_kills_the_whole_tree(sandbox: Sandbox) -> None:
    tokens = [unique_sleep() for _ in range(3)]
    start = time.monotonic()
    result = sandbox.run(f"sleep {tokens[0]} & (setsid sleep {tokens[1]} &); echo started; sleep {tokens[2]}",
                         timeout=1.0)
    elapsed = time.monotonic() - start
    assert result.timed_out and result.killed == "wall time" and result.exit_code is None
    assert result.output == "started\n"
    assert 1.0 <= elapsed < 3.0, elapsed
    for token in tokens:
        assert wait_gone(token) == [], token


def test_background_processes_end_with_the_command(sandbox: Sandbox) -> None:
    token = unique_sleep()
    start = time.monotonic()
    result = sandbox.run(f"nohup sleep {token} >/dev/null 2>&1 & echo started")
    assert time.monotonic() - start < 5.0
    assert result.exit_code == 0 and result.output == "started\n" and result.killed is None
    assert wait_gone(token) == []


def test_a_fork_bomb_is_contained(workspace: Path) -> None:
    """A bounded bomb (at most 511 processes, each leaf sleeping 30 s) against a limit of 32 processes.

    Where the kernel applies RLIMIT_NPROC (a non-root host user), forks fail beyond the limit and the wall
    limit ends the command; for root, which the kernel exempts, the watchdog must kill the tree. Either way
    the bomb does not get far, returns soon, and leaves nothing running.
    """
    token = unique_sleep()
    (workspace / "forks").mkdir()
    sb = make_sandbox(workspace, SandboxLimits(wall_seconds=4.0, processes=32))
    bomb = (f'f(){{ : > forks/$BASHPID; if [ $1 -gt 0 ]; then f $(($1-1)) & f $(($1-1)); wait; '
            f'else sleep {token}; fi; }}; f 8')
    start = time.monotonic()
    result = sb.run(bomb)
    elapsed = time.monotonic() - start
    forks = len(list((workspace / "forks").iterdir()))
    assert result.exit_code is None
    assert result.killed == "processes" or (result.killed == "wall time" and os.geteuid() != 0), result
    assert elapsed < 7.0, elapsed
    assert forks < 511, forks  # the bomb was stopped before it completed
    assert wait_gone(token) == []


def test_memory_limit(workspace: Path) -> None:
    sb = make_sandbox(workspace, SandboxLimits(wall_seconds=20.0, memory_bytes=256 << 20))
    hog = sb.run(f"{sys.executable} -c 'b = bytearray(1 << 30); print(len(b))'")
    assert hog.exit_code != 0 and "MemoryError" in hog.output, hog.output
    fits = sb.run(f"{sys.executable} -c 'b = bytearray(16 << 20); print(len(b))'")
    assert fits.exit_code == 0 and fits.output.strip() == str(16 << 20), fits.output


def test_cpu_time_limit(workspace: Path) -> None:
    sb = make_sandbox(workspace, SandboxLimits(wall_seconds=30.0, cpu_seconds=1))
    result = sb.run("while :; do :; done")
    assert result.killed == "cpu time" and result.exit_code == 152 and not result.timed_out, result


def test_output_is_capped_keeping_start_and_end(workspace: Path) -> None:
    sb = make_sandbox(workspace, SandboxLimits(wall_seconds=20.0, output_bytes=4096))
    n = 200_000
    result = sb.run(f"{sys.executable} -c \"print('START' + 'x' * {n} + 'END')\"")
    total = len("START") + n + len("END") + 1
    assert result.exit_code == 0
    assert result.output.startswith("START") and result.output.endswith("xEND\n")
    assert f"[... {total - 4096} bytes of output dropped ...]" in result.output
    assert len(result.output) < 4096 + 100


# ---------------------------------------------------------------------------------------- working directory


def test_cwd_carries_over_and_stays_in_the_workspace(sandbox: Sandbox, workspace: Path) -> None:
    assert sandbox.run("mkdir -p sub/deeper && cd sub").exit_code == 0
    assert sandbox.cwd == workspace / "sub"
    assert sandbox.run("pwd").output == f"{workspace / 'sub'}\n"
    result = sandbox.run("cd deeper && exit 3")
    assert result.exit_code == 3 and sandbox.cwd == workspace / "sub" / "deeper"
    sandbox.run("cd /tmp")
    assert sandbox.cwd == workspace and sandbox.run("pwd").output == f"{workspace}\n"
    sandbox.run("cd ..")  # the workspace's parent: outside
    assert sandbox.cwd == workspace
    sandbox.run("cd sub")
    sandbox.run(f"rm -r {workspace / 'sub'}")  # the directory it is in disappears
    assert sandbox.run("pwd").output == f"{workspace}\n"


def test_close_kills_a_running_command(sandbox: Sandbox) -> None:
    token = unique_sleep()
    results: list[CommandResult] = []
    thread = threading.Thread(target=lambda: results.append(sandbox.run(f"sleep {token}")))
    thread.start()
    deadline = time.monotonic() + 5
    while not host_processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.02)
    sandbox.close()
    thread.join(timeout=5)
    assert not thread.is_alive() and results and results[0].exit_code != 0
    assert wait_gone(token) == []
    with pytest.raises(SandboxUnavailableError, match="closed"):
        sandbox.run("true")


def test_close_as_the_command_starts_still_kills_it(workspace: Path) -> None:
    """close() may run before the command's process is known to the sandbox, or kill it before the supervisor
    looks again; either way the command must die and be reported as closed (the delays sweep both races)."""
    for attempt in range(40):
        sb = Sandbox(workspace)
        token = unique_sleep()
        outcome: list[object] = []

        def run(sb: Sandbox = sb, token: str = token) -> None:
            try:
                outcome.append(sb.run(f"sleep {token}"))
            except SandboxUnavailableError as e:  # close() won the race before the command started
                outcome.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        time.sleep((attempt % 10) * 0.001)
        sb.close()
        thread.join(timeout=10)
        assert not thread.is_alive() and outcome
        if isinstance(outcome[0], CommandResult):
            assert outcome[0].exit_code is None and outcome[0].killed == "closed"
        assert wait_gone(token) == []


# ------------------------------------------------------------------------------------------------ unsafe mode


def test_unsafe_mode_keeps_the_limits_and_the_clean_environment(workspace: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAMONTANE_TEST_SECRET", "s3cr3t")
    sb = make_unsafe(workspace)
    assert "s3cr3t" not in sb.run("env").output
    tokens = [unique_sleep(), unique_sleep()]
    result = sb.run(f"sleep {tokens[0]} & mkdir -p d && cd d && sleep {tokens[1]}", timeout=1.0)
    assert result.timed_out and result.exit_code is None
    assert all(wait_gone(t) == [] for t in tokens)
    sb.run("cd d")
    assert sb.run("pwd").output == f"{workspace / 'd'}\n"
    capped = make_unsafe(workspace, SandboxLimits(cpu_seconds=1, wall_seconds=30.0))
    assert capped.run("while :; do :; done").killed == "cpu time"
    # the process limit is the watchdog's alone here (RLIMIT_NPROC would count all of the host user's processes)
    token = unique_sleep()
    (workspace / "forks").mkdir()
    bounded = make_unsafe(workspace, SandboxLimits(wall_seconds=10.0, processes=32))
    bomb = bounded.run(f'f(){{ : > forks/$BASHPID; if [ $1 -gt 0 ]; then f $(($1-1)) & f $(($1-1)); wait; '
                       f'else sleep {token}; fi; }}; f 8')
    assert bomb.killed == "processes" and len(list((workspace / "forks").iterdir())) < 511
    assert wait_gone(token) == []
