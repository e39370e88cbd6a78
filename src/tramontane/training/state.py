"""Training checkpoints: weights and optimizer tensors as safetensors, everything else as JSON meta.

A checkpoint directory `step-000123/` holds `model.safetensors`, `optimizer.safetensors` and `meta.json`
(training config, step, optimizer hyper-state, RNG state, and the privacy ledger). The run directory's
`latest` file names the newest complete checkpoint; it is replaced atomically only after the checkpoint is
fully written and fsynced, so a crash at any moment leaves the previous checkpoint usable and the privacy
ledger never loses a step that was applied to the saved weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tramontane.accounting import PrivacyLedger
from tramontane.errors import CheckpointError
from tramontane.files import HOLDER_MODE, write_dir_atomic, write_json_atomic  # also imported from here

META_FORMAT = "tramontane.training_checkpoint"
META_VERSION = 1


@dataclass
class TrainState:
    """What a resumed run needs besides the model structure and the optimizer object."""

    step: int
    ledger: PrivacyLedger
    config: dict[str, Any]
    history: list[dict[str, float]]
    rng_state: torch.Tensor | None = None


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """Split `optimizer.state_dict()` into named tensors and a JSON-able rest."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        name = names[index]
        for key, value in slots.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{name}/{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value.item() if torch.is_tensor(value) else value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _param_index_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Optimizer state is keyed by parameter index; name the indices after the model's parameters."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names, index = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            names[index] = by_id[id(p)]
            index += 1
    return names


def save_checkpoint(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState, keep: int = 2, trainable_only: bool = False) -> Path:
    """Write `run_dir/step-<7-digit step>/` and point `run_dir/latest` at it; keep the newest `keep` checkpoints.

    `trainable_only` saves only the parameters that train (requires_grad), e.g. a LoRA adapter's and not the
    frozen base it sits on: resuming then needs the same base, loaded by the caller."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{state.step:07d}"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = {n: p.detach().contiguous() for n, p in model.state_dict().items()
               if not trainable_only or n in trainable}
    # Tied parameters appear under several names; safetensors refuses shared storage, so clone.
    seen: set[int] = set()
    for name, tensor in weights.items():
        if tensor.data_ptr() in seen:
            weights[name] = tensor.clone()
        seen.add(tensor.data_ptr())
    names = _param_index_names(model, optimizer)
    opt_tensors, opt_rest = _optimizer_tensors(optimizer, names)
    meta = {"format": META_FORMAT, "version": META_VERSION, "step": state.step,
            "weights": "trainable" if trainable_only else "all",
            "ledger": state.ledger.to_dict(), "config": state.config, "history": state.history,
            "optimizer": opt_rest, "param_names": [names[i] for i in range(len(names))],
            "rng_state": state.rng_state.tolist() if state.rng_state is not None else None}

    def write(folder: Path) -> None:
        save_file(weights, folder / "model.safetensors")
        save_file(opt_tensors, folder / "optimizer.safetensors")
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))

    write_dir_atomic(final, write, HOLDER_MODE)
    write_json_atomic(run_dir / "latest", {"checkpoint": final.name, "step": state.step})
    old = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and p != final)
    for path in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None if it has none."""
    pointer = Path(run_dir) / "latest"
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{pointer} is corrupt ({err}); delete it to start the run afresh") from None
    path = Path(run_dir) / name
    if not (path / "meta.json").exists():
        raise CheckpointError(f"{pointer} names {name}, which is missing or incomplete")
    return path


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore weights and optimizer state in place; return the rest (step, ledger, config, history)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path / 'meta.json'}: {err}") from None
    if meta.get("format") != META_FORMAT or meta.get("version", 0) > META_VERSION:
        raise CheckpointError(f"{path} is not a tramontane training checkpoint of a known version")
    try:
        weights = load_file(path / "model.safetensors")
        opt_tensors = load_file(path / "optimizer.safetensors")
    except Exception as err:  # safetensors raises several types for truncated or corrupt files
        raise CheckpointError(f"cannot read the tensors of {path}: {err}") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if meta.get("weights") == "trainable":  # the frozen parameters are the caller's (the same base)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        missing = [n for n in missing if n in trainable]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    names = meta["param_names"]
    state: dict[int, dict[str, Any]] = {}
    for index, name in enumerate(names):
        slots = {key.split("/", 1)[1]: value for key, value in opt_tensors.items() if key.split("/", 1)[0] == name}
        for key, value in meta["optimizer"]["scalars"].get(name, {}).items():
            slots[key] = torch.tensor(value, dtype=torch.float32) if key == "step" else value
        if slots:
            state[index] = slots
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    rng = meta.get("rng_state")
    return TrainState(step=meta["step"], ledger=PrivacyLedger.from_dict(meta["ledger"]), config=meta["config"],
                      history=meta.get("history", []),
                      rng_state=torch.tensor(rng, dtype=torch.uint8) if rng is not None else None)
