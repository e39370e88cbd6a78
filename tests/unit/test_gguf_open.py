"""`models.gguf.open_gguf`: a GGUF file's metadata is parsed once while the file is unchanged, and a loaded
model does not keep the parse."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import pytest

from tramontane.models import gguf as gguf_module
from tramontane.models.checkpoint import load_args, load_model, save_model

from tests.conftest import random_model, tiny_args
from tests.gguf_files import Q, gguf_tensors, write_gguf


@pytest.fixture()
def parses(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the gguf package's reader parses from now on (nothing kept from earlier tests)."""
    parsed: list[Path] = []

    class Counting(gguf.GGUFReader):
        def __init__(self, path: Any, *args: Any, **kwargs: Any) -> None:
            parsed.append(Path(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf_module, "_OPENED", {})
    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    return parsed


def test_a_file_is_parsed_once_until_it_changes_or_a_model_is_loaded(parses: list[Path], tmp_path: Path) -> None:
    tensors, meta = gguf_tensors(save_model(random_model(tiny_args(sliding_window=None)), tmp_path / "hf",
                                            format="hf"))
    first = write_gguf(tmp_path / "a.gguf", tensors, meta, Q.F32)
    other = write_gguf(tmp_path / "b.gguf", tensors, meta, Q.F32)
    args = load_args(first)
    assert load_args(first) == args and load_args(tmp_path / "." / "a.gguf") == args
    assert parses == [first]
    load_model(first)  # takes the kept parse, and lets it go
    assert parses == [first] and gguf_module._OPENED == {}
    load_args(first)
    load_args(other)  # another file: the first one's parse is let go
    load_args(first)
    assert parses == [first, first, other, first]
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten, as far as we can tell
    load_args(first)
    assert parses == [first, first, other, first, first]
