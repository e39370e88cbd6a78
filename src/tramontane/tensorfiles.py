"""Tensor files, whatever network they hold: safetensors headers and shards, dtypes, atomic checkpoint folders.

Nothing here knows a tensor name or a config format; which files a checkpoint folder holds and what their
tensors are called belongs to the model family (`tramontane.models.checkpoint` for Mistral, and the vision and
audio checkpoint modules beside it). Headers are read without the tensor data, so names and shapes can be
checked before anything large is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tramontane.errors import CheckpointError, ConfigError
from tramontane.files import SHAREABLE_MODE, write_dir_atomic

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "half": "float16"}
# safetensors dtype tags we accept; anything else (int8, fp8, ...) is a quantized checkpoint.
SAFETENSORS_DTYPES = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
}
_MAX_LISTED = 10


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from one of `DTYPES` given as a dtype, a name or an alias ("bf16"); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype, dtype.removeprefix("torch."))
        if name in DTYPES:
            return DTYPES[name]
    raise ConfigError(f"dtype must be one of {sorted(DTYPES)} (or a torch dtype of those), got {dtype!r}")


# ------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorEntry:
    """One tensor on disk, from its file's header: where it is, its shape and its safetensors dtype tag."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


def shard_files(index: Path) -> list[Path]:
    """The shard files a safetensors index (`*.safetensors.index.json`) lists, in first-use order, each
    checked to exist (they sit beside the index)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index} is not a valid safetensors index ({err!r})") from None
    files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"{index} lists shard file(s) that do not exist: {absent}")
    return files


def scan_tensors(files: list[Path]) -> dict[str, TensorEntry]:
    """Names, shapes and dtypes of every tensor in `files`, from the headers only (no data is read)."""
    entries: dict[str, TensorEntry] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open is not iterable
                    view = st.get_slice(name)
                    if name in entries:
                        raise CheckpointError(
                            f"tensor {name!r} appears in both {entries[name].file} and {file}; shards must "
                            "hold disjoint tensors (tensor-parallel shards are not supported)"
                        )
                    entries[name] = TensorEntry(file, tuple(view.get_shape()), view.get_dtype())
        except (SafetensorError, OSError) as err:
            raise unreadable(file, err) from None
    return entries


def check_tensors(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], what: str
) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    missing = [k for k in expected if k not in found]
    unexpected = sorted(k for k in found if k not in expected)
    wrong = [f"{k} expected shape {list(expected[k])}, found {list(found[k])}"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s) {_listing(unexpected)}")
    if wrong:
        problems.append(f"wrong shape(s): {_listing(wrong)}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def unreadable(file: Path, err: Exception) -> CheckpointError:
    """The error for a tensor file safetensors cannot read."""
    return CheckpointError(f"cannot read {file}: {err}; the file may be truncated or corrupt (re-download or "
                           "re-save it)")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object (params.json, config.json), or a ConfigError saying what is wrong."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


# ------------------------------------------------------------------------------------------------- writing


def write_dir_atomically(path: Path, files: dict[str, Any], overwrite: bool) -> Path:
    """Write `files` (name -> JSON dict for `*.json`, else a tensor dict saved as safetensors) as the folder
    `path`, which appears complete or not at all (`tramontane.files.write_dir_atomic`, shareable modes: a
    checkpoint is meant to be shared, and the safetensors writer alone would make its files 0600).

    An existing non-empty `path` is refused unless `overwrite`, which replaces the whole folder.
    """
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} exists and is not a directory")
        if any(path.iterdir()) and not overwrite:
            raise CheckpointError(f"{path} is not empty; save into a new directory or pass overwrite=True "
                                  "(which replaces the whole directory)")

    def write(folder: Path) -> None:
        for name, content in files.items():
            if name.endswith(".json"):
                (folder / name).write_text(json.dumps(content, indent=2) + "\n")
            else:
                save_file(content, str(folder / name), metadata={"format": "pt"})

    return write_dir_atomic(path, write, SHAREABLE_MODE)


__all__ = [
    "DTYPES", "SAFETENSORS_DTYPES", "TensorEntry", "check_tensors", "read_json_object",
    "resolve_dtype", "scan_tensors", "shard_files", "unreadable", "write_dir_atomically",
]
