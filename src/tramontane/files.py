"""Writing files so that they appear complete or not at all, with one permission policy.

Shareable outputs (a synthetic table, the release report) are created with mode 0o666 and so end up 0644
under the usual umask; the data holder's files (checkpoints, run plans, the evaluation) with 0o600.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SHAREABLE_MODE = 0o666  # the umask applies: 0644 under the usual 022
HOLDER_MODE = 0o600


def write_atomic(path: str | Path, data: str | bytes, mode: int = SHAREABLE_MODE) -> Path:
    """Write `data` to `path` through a sibling temporary file, fsync it, then rename it into place.

    The file is created with `mode` (the umask applies). An existing file of that name is replaced whole,
    its permissions included; a crash at any moment leaves either the old file or the new one, plus at most
    a hidden `.NAME.*.tmp` sibling. The folder must exist.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself is durable
    finally:
        os.close(dir_fd)
    return path
