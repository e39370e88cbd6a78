"""`tramontane.files`, the one home of atomic writes.

`write_csv_atomic`: the table round-trips through pandas byte for byte as `to_csv` writes it, a write that
fails halfway leaves the previous file and no temporary file, the permission policy is `write_atomic`'s.
`write_dir_atomic`: shareable and holder-only modes on every file and folder, whoever created them; everything
fsynced before the rename and the parent after it; a failure at any point (in the callback, or the rename
itself) leaves the previous folder intact and no temporary folder behind.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tramontane import files
from tramontane.files import (
    HOLDER_MODE,
    SHAREABLE_MODE,
    write_csv_atomic,
    write_dir_atomic,
    write_json_atomic,
)


@pytest.fixture
def frame() -> pd.DataFrame:
    # Values a CSV writer gets wrong: separators, quotes and newlines inside a field, non-ASCII text, a
    # missing value, a leading zero that must stay text, floats that need their digits.
    return pd.DataFrame({"name": ["a,b", 'say "hi"', "two\nlines", "héllo", None],
                         "code": ["007", "010", "1", "2", "3"],
                         "age": [17, 90, 33, 41, 58],
                         "wage": [0.1, 1e-7, 123456.789, np.nan, -2.5]})


def test_the_table_round_trips_through_pandas(frame: pd.DataFrame, tmp_path: Path) -> None:
    path = tmp_path / "synthetic.csv"
    assert write_csv_atomic(frame, path) == path
    assert path.read_bytes() == frame.to_csv(index=False).encode("utf-8")  # what the CLI always wrote
    back = pd.read_csv(path, dtype={"name": str, "code": str})
    pd.testing.assert_frame_equal(back, frame)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic.csv"]


def test_an_existing_file_is_replaced_whole_and_missing_folders_are_made(frame: pd.DataFrame,
                                                                          tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "out.csv"
    write_csv_atomic(frame, path)
    write_csv_atomic(frame.iloc[:2], path)  # shorter: no tail of the longer file may remain
    pd.testing.assert_frame_equal(pd.read_csv(path, dtype={"name": str, "code": str}), frame.iloc[:2])


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_write_failing_halfway_keeps_the_previous_file(frame: pd.DataFrame, tmp_path: Path, monkeypatch,
                                                         error: BaseException) -> None:
    path = tmp_path / "synthetic.csv"
    path.write_text("previous,table\n1,2\n")
    real_to_csv = frame.to_csv
    written = []

    def half_then_fail(buf, **kwargs):
        real_to_csv(buf, **kwargs)  # the whole table reaches the temporary file...
        written.extend(p.name for p in tmp_path.iterdir() if p.name != "synthetic.csv")
        raise error  # ...then the writer dies before the rename

    monkeypatch.setattr(frame, "to_csv", half_then_fail)
    with pytest.raises(type(error)):
        write_csv_atomic(frame, path)
    assert len(written) == 1 and written[0].startswith(".synthetic.csv.")  # it did write a temporary file
    assert path.read_text() == "previous,table\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic.csv"]  # and removed it


def test_a_failure_before_any_file_existed_leaves_nothing(frame: pd.DataFrame, tmp_path: Path,
                                                          monkeypatch) -> None:
    def fail(buf, **kwargs):
        buf.write(b"name,code\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(frame, "to_csv", fail)
    with pytest.raises(OSError):
        write_csv_atomic(frame, tmp_path / "out.csv")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask, mode, expected", [(0o022, None, 0o644), (0o077, None, 0o600),
                                                   (0o022, HOLDER_MODE, 0o600)])
def test_permissions_follow_write_atomic(frame: pd.DataFrame, tmp_path: Path, umask: int, mode: int | None,
                                         expected: int) -> None:
    path = tmp_path / "out.csv"
    old = os.umask(umask)
    try:
        write_csv_atomic(frame, path) if mode is None else write_csv_atomic(frame, path, mode=mode)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == expected


# ------------------------------------------------------------------------------------------ write_dir_atomic


def _modes(folder: Path) -> dict[str, int]:
    """relative path -> permission bits, for the folder itself ("."), every file and every subfolder."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for p in folder.rglob("*"):
        found[str(p.relative_to(folder))] = stat.S_IMODE(p.stat().st_mode)
    return found


def _write_like_a_library(folder: Path) -> None:
    """Files the way other writers make them: 0600 (safetensors, mkstemp), the umask's default, a subfolder
    made 0700 (mkdtemp); and the folder itself changed."""
    os.chmod(folder, 0o711)
    fd = os.open(folder / "weights.bin", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"\x00" * 8)
    os.close(fd)
    (folder / "meta.json").write_text("{}")
    (folder / "sub").mkdir(mode=0o700)
    (folder / "sub" / "inner.txt").write_text("inner")


@pytest.mark.parametrize("umask, mode, file_mode, folder_mode", [
    (0o022, SHAREABLE_MODE, 0o644, 0o755), (0o002, SHAREABLE_MODE, 0o664, 0o775),
    (0o077, SHAREABLE_MODE, 0o600, 0o700), (0o022, HOLDER_MODE, 0o600, 0o700), (0o000, HOLDER_MODE, 0o600, 0o700),
])
@pytest.mark.parametrize("content", ["callback", "dict"])
def test_folder_modes_are_the_policy_whoever_made_the_files(tmp_path: Path, umask: int, mode: int,
                                                            file_mode: int, folder_mode: int,
                                                            content: str) -> None:
    target = tmp_path / "out"
    given = _write_like_a_library if content == "callback" else {"meta.json": "{}", "weights.bin": b"\x00" * 8,
                                                                  "sub/inner.txt": "inner"}
    old = os.umask(umask)
    try:
        assert write_dir_atomic(target, given, mode) == target
    finally:
        os.umask(old)
    modes = _modes(target)
    assert sorted(modes) == [".", "meta.json", "sub", "sub/inner.txt", "weights.bin"]
    for name, bits in modes.items():
        assert bits == (folder_mode if name in (".", "sub") else file_mode), name
    assert (target / "sub" / "inner.txt").read_text() == "inner" and (target / "meta.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling left


def test_the_default_mode_is_shareable(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_dir_atomic(tmp_path / "out", {"a.txt": "a"})
    finally:
        os.umask(old)
    assert _modes(tmp_path / "out") == {".": 0o755, "a.txt": 0o644}


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failing_callback_keeps_the_previous_folder_and_leaves_no_temporary_one(tmp_path: Path,
                                                                                  error: BaseException) -> None:
    target = tmp_path / "model"
    write_dir_atomic(target, {"v1.txt": "first", "sub/deep.txt": "deep"}, HOLDER_MODE)
    before = _modes(target)
    seen: list[str] = []

    def half_then_fail(folder: Path) -> None:
        (folder / "v2.txt").write_text("half")
        seen.extend(sorted(p.name for p in tmp_path.iterdir()))
        raise error

    with pytest.raises(type(error)):
        write_dir_atomic(target, half_then_fail, HOLDER_MODE)
    assert len(seen) == 2 and seen[0].startswith(".model.tmp-") and seen[1] == "model"  # it did write aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "v1.txt").read_text() == "first" and (target / "sub" / "deep.txt").read_text() == "deep"
    assert _modes(target) == before and not (target / "v2.txt").exists()


def test_a_failure_with_no_previous_folder_leaves_nothing(tmp_path: Path) -> None:
    def fail(folder: Path) -> None:
        (folder / "x").write_text("x")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_dir_atomic(tmp_path / "new" / "model", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["new"]  # the parent was made; nothing inside it
    assert list((tmp_path / "new").iterdir()) == []


def test_a_failed_rename_puts_the_previous_folder_back(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "model"
    write_dir_atomic(target, {"v1.txt": "first"})
    real_replace = os.replace
    calls: list[tuple[str, str]] = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(".model.tmp-") and not Path(src).name.startswith(".model.tmp-old-"):
            raise OSError(5, "Input/output error")  # the new folder cannot be renamed into place
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output"):
        write_dir_atomic(target, {"v2.txt": "second"})
    assert calls[0][0] == "model" and calls[0][1].startswith(".model.tmp-old-")  # the old one moved aside...
    assert calls[-1] == (calls[0][1], "model")  # ...and back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in target.iterdir()) == ["v1.txt"]


@pytest.mark.parametrize("previous", ["folder", "file", "link"])
def test_whatever_was_there_is_replaced_whole(tmp_path: Path, previous: str) -> None:
    target = tmp_path / "model"
    if previous == "folder":
        write_dir_atomic(target, {"old.txt": "old", "sub/old.txt": "old"})
    elif previous == "file":
        target.write_text("a file")
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
        target.symlink_to(tmp_path / "elsewhere")
    write_dir_atomic(target, {"new.txt": "new"})
    assert target.is_dir() and not target.is_symlink()
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    expected = ["elsewhere", "model"] if previous == "link" else ["model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected  # nothing of the old one left, hidden or not
    if previous == "link":
        assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "keep"  # the link goes, not its target


def test_debris_of_a_killed_write_is_removed_and_nothing_else(tmp_path: Path) -> None:
    for name in (".model.tmp-abcd1234", ".model.tmp-old-0000ffff"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "schema.json").write_text("{")
    (tmp_path / ".model.a1b2c3d4.tmp").write_text("a file write of another target")
    (tmp_path / ".model2.tmp-abcd1234").mkdir()  # another target's
    write_dir_atomic(tmp_path / "model", {"a": "a"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.a1b2c3d4.tmp", ".model2.tmp-abcd1234", "model"]


def test_everything_is_fsynced_before_the_rename_and_the_parent_after(tmp_path: Path, monkeypatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = files.fsync_path, os.replace

    def fsync(path):
        events.append(("fsync", str(path)))
        real_fsync(path)

    def replace(src, dst):
        events.append(("rename", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(files, "fsync_path", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_dir_atomic(tmp_path / "out", {"a.txt": "a", "sub/b.txt": "b"})
    rename = next(i for i, (kind, _) in enumerate(events) if kind == "rename")
    tmp = events[rename][1]
    synced_before = {os.path.relpath(p, tmp) for kind, p in events[:rename] if kind == "fsync"}
    assert synced_before == {".", "a.txt", "sub", "sub/b.txt"}
    assert events[rename + 1:] == [("fsync", str(tmp_path))]


def test_write_json_atomic_is_the_holders_by_default(tmp_path: Path) -> None:
    data = {"checkpoint": "step-0000003", "step": 3, "nested": [1, 2.5, None]}
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "latest", data)
        write_json_atomic(tmp_path / "shared.json", data, SHAREABLE_MODE)
    finally:
        os.umask(old)
    assert (tmp_path / "latest").read_text() == json.dumps(data, indent=1)  # the format checkpoints always had
    assert json.loads((tmp_path / "shared.json").read_text()) == data
    assert stat.S_IMODE((tmp_path / "latest").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "shared.json"]
