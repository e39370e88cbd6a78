"""Writing files and folders so that they appear complete or not at all, with one fsync and permission policy.

The one home of atomic writes: nothing else in tramontane renames a temporary file into place or fsyncs.

Policy, for a file (`write_atomic`, `write_json_atomic`, `write_csv_atomic`) and for a whole folder
(`write_dir_atomic`) alike: write into a hidden temporary sibling in the same folder (so the rename never
crosses file systems), fsync what was written (every file and folder of it), rename it over the target,
fsync the parent folder (so the rename itself is durable). A failure or Ctrl-C at any point removes the
temporary sibling and leaves the previous target as it was.

Modes are explicit, and the umask applies on top of them:
- `SHAREABLE_MODE` (0o666): outputs meant to be shared (a synthetic table, the release report, a saved model):
  files 0644 and folders 0755 under the usual umask 022;
- `HOLDER_MODE` (0o600): the data holder's files (checkpoints, run plans, the evaluation, audit results):
  files 0600 and folders 0700.
A folder's mode is its files' mode plus the search bit wherever the file mode can read (0o666 -> 0o777,
0o600 -> 0o700).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

SHAREABLE_MODE = 0o666  # the umask applies: 0644 under the usual 022
HOLDER_MODE = 0o600

FolderContent = Mapping[str, str | bytes] | Callable[[Path], object]


def fsync_path(path: str | Path) -> None:
    """Flush a file or a folder to disk (a folder: so that a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _atomic_file(path: Path, mode: int) -> Iterator[IO[bytes]]:
    """A binary file to write `path`'s new content into; it replaces `path` only if the block completes.

    On any exception (or Ctrl-C) the temporary file is removed and `path` is left as it was.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)  # the rename itself is durable


def write_atomic(path: str | Path, data: str | bytes, mode: int = SHAREABLE_MODE) -> Path:
    """Write `data` (str as UTF-8, or bytes) to `path` through a sibling temporary file, fsync it, then rename
    it into place.

    The file is created with `mode` (the umask applies). An existing file of that name is replaced whole,
    its permissions included; a crash at any moment leaves either the old file or the new one, plus at most
    a hidden `.NAME.*.tmp` sibling. The folder must exist.
    """
    path = Path(path)
    with _atomic_file(path, mode) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def write_json_atomic(path: str | Path, data: Any, mode: int = HOLDER_MODE) -> Path:
    """Write `data` as JSON (`json.dumps(data, indent=1)`), atomically as `write_atomic` does.

    Default `mode`: the data holder's (0600): the JSON written this way is run state (checkpoint pointers,
    run plans, measured marginals, audit results). Pass `SHAREABLE_MODE` for JSON meant to be shared.
    """
    return write_atomic(path, json.dumps(data, indent=1), mode)


def write_csv_atomic(frame: pd.DataFrame, path: str | Path, mode: int = SHAREABLE_MODE) -> Path:
    """Write `frame` as UTF-8 CSV without its index (`frame.to_csv(index=False)`), atomically as
    `write_atomic` does: a table that fails halfway leaves the previous file (or none) and no temporary
    file. The rows are streamed into the temporary file, never held as one string. Missing parent folders
    are created. Default `mode`: shareable (a synthetic table); pass `HOLDER_MODE` for the holder's rows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_file(path, mode) as f:
        frame.to_csv(f, index=False, encoding="utf-8")
    return path


def write_dir_atomic(path: str | Path, content: FolderContent, mode: int = SHAREABLE_MODE) -> Path:
    """Write the folder `path` so that it appears complete or not at all, replacing whatever was there.

    `content` is either name -> data (str as UTF-8, or bytes; a name may hold `/` for a subfolder) or a
    callable that writes the folder's files into the temporary folder it is given (its return value is
    ignored). That temporary folder is a hidden sibling `.NAME.tmp-*`; once `content` is written, every
    file in it gets `mode` and every folder the matching folder mode (the umask applies to both, see the
    module docstring), all are fsynced, and it is renamed to `path`. An existing `path` (folder, file or
    link) is moved aside to `.NAME.tmp-old-*` first and removed only once the new folder is in place.

    Refusing to replace an existing `path` is the caller's decision, made before calling this. Debris of an
    earlier write to `path` that was killed midway (`.NAME.tmp-*`) is removed first. On any exception (or
    Ctrl-C) the temporary folder is removed and `path` is left as it was. Missing parent folders are made.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(glob.escape(f".{path.name}.tmp-") + "*"):
        _remove(stale)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    os.mkdir(tmp, _folder_mode(mode))
    try:
        folder_mode = tmp.stat().st_mode & 0o777  # the umask applied, whatever `content` does to it later
        if callable(content):
            content(tmp)
        else:
            for name, data in content.items():
                file = tmp / name
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        _settle(tmp, mode & folder_mode, folder_mode)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(path.parent)
    return path


def _folder_mode(mode: int) -> int:
    """A folder's mode for files of `mode`: search (x) wherever read (r) is allowed."""
    return mode | (mode & 0o444) >> 2


def _settle(folder: Path, file_mode: int, folder_mode: int) -> None:
    """Give every file under `folder` (links aside) `file_mode` and every folder, `folder` included,
    `folder_mode`; fsync them all, deepest first."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                os.chmod(file, file_mode)  # e.g. safetensors writes 0600 whatever the policy
                fsync_path(file)
        for name in dirs:
            sub = os.path.join(root, name)
            if not os.path.islink(sub):
                os.chmod(sub, folder_mode)
                fsync_path(sub)
    os.chmod(folder, folder_mode)
    fsync_path(folder)


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` is kept aside until then, and put back if the rename fails."""
    if not (path.exists() or path.is_symlink()):
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.tmp-old-{secrets.token_hex(4)}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree, best effort (what is left is debris the next write removes)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


__all__ = [
    "HOLDER_MODE", "SHAREABLE_MODE", "fsync_path", "write_atomic", "write_csv_atomic", "write_dir_atomic",
    "write_json_atomic",
]
