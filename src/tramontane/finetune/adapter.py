"""LoRA adapters on disk in PEFT's layout, so that `PeftModel.from_pretrained(MistralForCausalLM...)` loads
what we save and we load what PEFT saves; and merged checkpoints for `tramontane generate`.

An adapter folder holds `adapter_config.json` (PEFT's `LoraConfig.to_dict()`: peft_type LORA, task_type
CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules in Hugging Face names, ...) and
`adapter_model.safetensors` with the keys `peft.get_peft_model_state_dict` writes: the HF module path under
`base_model.model.`, then `lora_A.weight` / `lora_B.weight`, without PEFT's adapter name (PEFT strips
`.default` on saving and inserts it on loading; it never writes it, so keys holding it are refused).

Names, ours -> Hugging Face (`tramontane.models.checkpoint.hf_names`):

    layers.i.attention.wq / wk / wv / wo     model.layers.i.self_attn.q_proj / k_proj / v_proj / o_proj
    layers.i.feed_forward.w1 / w3 / w2       model.layers.i.mlp.gate_proj / up_proj / down_proj
    layers.i.feed_forward.experts.e.wK       model.layers.i.block_sparse_moe.experts.e.wK   (K = 1, 2, 3)

Mixtral experts: transformers 5 fuses them into 3-D parameters (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`) that are no nn.Linear; PEFT adapts those through `target_parameters`, in a fused
layout (one lora_A shared by gate and up, rank patterns) that our per-expert adapters cannot hold in general.
We write experts in the per-expert layout above instead: transformers 4's module names, which PEFT wrote for
Mixtral with target_modules w1 w2 w3, and which PEFT (0.21) on transformers 5 converts when loading (w1 and
w3 fused block-diagonally into rank 2r with alpha doubled; it needs w1 and w3 adapted together, and gets the
scaling of rsLoRA expert adapters wrong by sqrt(2): alpha doubled is right for alpha / r only). Adapters PEFT
writes with `target_parameters` (Mixtral trained with PEFT on transformers 5) are refused: merge them with
PEFT (`merge_and_unload`) and load the merged checkpoint instead.

The rotary trap (`checkpoint.py`): HF's q_proj / k_proj rows are ours permuted per head. The adapter's
delta B A permutes the same way, which is B's rows: lora_B of wq / wk is permuted, lora_A never.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from tramontane.errors import CheckpointError, ConfigError
from tramontane.files import write_dir_atomic
from tramontane.finetune.lora import (
    LoraConfig,
    add_lora,
    check_adapters,
    load_lora_state_dict,
    lora_modules,
    lora_targets,
    merge_lora,
)
from tramontane.models.args import ModelArgs
from tramontane.models.checkpoint import (
    Format,
    detect_format,
    hf_names,
    load_model,
    permute_from_hf,
    permute_to_hf,
    save_model,
)
from tramontane.models.quant import QuantConfig, QuantizedLinear
from tramontane.models.transformer import Transformer
from tramontane.tensorfiles import (
    SAFETENSORS_DTYPES,
    check_tensors,
    read_json_object,
    scan_tensors,
    unreadable,
)

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel) .model (MistralForCausalLM)

# HF target name -> ours (PEFT matches target_modules by the module's last name, as we do)
_FROM_HF = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w1",
            "up_proj": "w3", "down_proj": "w2", "w1": "w1", "w2": "w2", "w3": "w3"}
# adapter_config.json keys whose value does not change the adapted network (the rest are checked)
_IGNORED = frozenset({
    "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
    "megatron_config", "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config",
    "layers_pattern", "ensure_weight_tying", "task_type", "peft_type", "r", "lora_alpha", "lora_dropout",
    "target_modules", "use_rslora", "init_lora_weights", "bias", "fan_in_fan_out", "use_dora", "lora_bias",
})
# initialisations that leave the base weights alone (pissa, olora, corda, loftq, ... rewrite them)
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_NAMED_KEY = re.compile(r"\.lora_[AB]\.[^.]+\.weight$")  # ...lora_A.default.weight: a PeftModel's own name
# tokenizer files a merged checkpoint takes from its base: mistral_common's, and transformers' own
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "chat_template.jinja")


# ---------------------------------------------------------------------------------------------- saving


def save_adapter(model: nn.Module, out_dir: str | Path, config: LoraConfig, *,
                 base_model_name_or_path: str | None = None,
                 extra_json: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write `model`'s adapters (made by `add_lora(model, config)` or `load_adapter`) as a PEFT adapter
    folder.

    `base_model_name_or_path` is recorded in adapter_config.json (PEFT's key; e.g. a Hub id for the base).
    `extra_json` maps further file names (`*.json`, e.g. the privacy ledger) to JSON objects written beside
    it. The folder appears complete or not at all; an existing non-empty `out_dir` is refused unless
    `overwrite`, which replaces the whole folder. Tensors are written in the adapters' dtype.
    """
    args = _model_args(model)
    adapters = check_adapters(model, config)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    extras = _extra_files(extra_json)
    names = _hf_modules(args, list(adapters))
    tensors: dict[str, torch.Tensor] = {}
    for name, lora in adapters.items():
        key = _PREFIX + names[name]
        heads = _rotary_heads(name, args)
        b = lora.lora_B.weight.detach()
        tensors[f"{key}.lora_A.weight"] = lora.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = (b if heads is None else permute_to_hf(b, heads)).cpu().contiguous()
    targets = sorted({hf.rpartition(".")[2] for hf in names.values()})
    if config.use_rslora and {"w1", "w3"} <= set(targets):
        logger.warning("rsLoRA expert adapters: PEFT on transformers 5 loads them with the w1 / w3 scaling "
                       "off by sqrt(2) (its Mixtral conversion doubles alpha); tramontane loads them right")
    peft_config = peft_config_dict(config, targets, base_model_name_or_path)

    def write(folder: Path) -> None:
        (folder / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for file_name, text in extras.items():
            (folder / file_name).write_text(text)

    return write_dir_atomic(out_dir, write)


def peft_config_dict(config: LoraConfig, target_modules: list[str],
                     base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """adapter_config.json as PEFT 0.22's `LoraConfig.to_dict()` writes it for a plain LoRA on a causal LM
    (every key it writes, at its default unless it describes this adapter; `peft_version` left for PEFT to
    fill in). `target_modules` are Hugging Face module names."""
    alpha: float | int = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "astra_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "bias": "none", "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha,
        "lora_bias": False, "lora_dropout": float(config.dropout), "lora_ga_config": None,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "monteclora_config": None, "peft_type": "LORA", "qalora_group_size": 16, "r": config.rank,
        "rank_pattern": {}, "revision": None, "target_modules": list(target_modules),
        "target_parameters": None, "task_type": "CAUSAL_LM", "trainable_token_indices": None,
        "use_bdlora": None, "use_dora": False, "use_qalora": False, "use_rslora": config.use_rslora,
        "velora_config": None,
    }


# --------------------------------------------------------------------------------------------- loading


def lora_config_from_peft(peft: Mapping[str, Any], source: str = ADAPTER_CONFIG) -> LoraConfig:
    """Our `LoraConfig` from a PEFT adapter_config.json dict, refusing (ConfigError) every option that changes
    the adapted network in a way we do not implement (DoRA, biases, per-module ranks, layer subsets, ...)."""
    peft_type = peft.get("peft_type")
    if peft_type != "LORA":
        raise ConfigError(f"{source}: peft_type {peft_type!r} is not supported; only LoRA adapters "
                          "(peft_type LORA) can be loaded")
    if peft.get("task_type") not in (None, "CAUSAL_LM"):
        raise ConfigError(f"{source}: task_type {peft['task_type']!r} is not supported; the adapter must be "
                          "for a causal language model (task_type CAUSAL_LM)")
    if peft.get("target_parameters"):
        raise ConfigError(
            f"{source} adapts parameters {peft['target_parameters']} (target_parameters: PEFT's layout for "
            "Mixtral experts fused by transformers 5), which tramontane cannot load; merge the adapter into "
            "its base with PEFT (merge_and_unload, save_pretrained) and load the merged checkpoint instead")
    fixed = {"bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False}
    why = {"bias": "adapter biases", "fan_in_fan_out": "transposed (Conv1D) weights",
           "use_dora": "DoRA (weight-decomposed LoRA)", "lora_bias": "a bias on lora_B"}
    for key, value in fixed.items():
        if peft.get(key, value) != value:
            raise ConfigError(f"{source}: {key}={peft[key]!r} ({why[key]}) is not supported; only plain LoRA "
                              f"({key}={value!r}) can be loaded")
    init = peft.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ConfigError(
            f"{source}: init_lora_weights={init!r} rewrites the base model's weights, so the adapter works "
            "only with that modified base; convert it to a plain LoRA with PEFT "
            "(save_pretrained(path_initial_model_for_weight_conversion=...)) and load the converted adapter")
    for key, value in peft.items():
        if key not in _IGNORED and value not in (None, False, {}, [], ""):
            raise ConfigError(f"{source}: option {key}={value!r} is not supported by tramontane's LoRA (only "
                              "one rank and alpha for every adapted layer of every layer, no extra trained "
                              f"modules); save the adapter without {key}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in peft:
            raise ConfigError(f"{source} has no {key!r}; is it a PEFT LoRA adapter config?")
    return LoraConfig(rank=peft["r"], alpha=peft["lora_alpha"], dropout=peft.get("lora_dropout") or 0.0,
                      targets=_targets_from_hf(peft["target_modules"], source),
                      use_rslora=bool(peft.get("use_rslora", False)))


def _targets_from_hf(target_modules: Any, source: str) -> tuple[str, ...]:
    adaptable = sorted(_FROM_HF)
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            return ("all",)
        raise ConfigError(f"{source}: target_modules {target_modules!r} is a regular expression, which "
                          f"tramontane does not match; list the module names instead (some of {adaptable})")
    if not isinstance(target_modules, list) or not all(isinstance(t, str) for t in target_modules):
        raise ConfigError(f"{source}: target_modules must be a list of module names, got {target_modules!r}")
    targets = []
    for hf in target_modules:
        if hf == "gate":
            raise ConfigError(f"{source} adapts the MoE router 'gate', which tramontane does not (adapting "
                              "it changes which experts each token is routed to)")
        if hf not in _FROM_HF:
            raise ConfigError(f"{source}: target module {hf!r} cannot be adapted by tramontane; adaptable "
                              f"modules are {adaptable}")
        targets.append(_FROM_HF[hf])
    return tuple(targets)


def load_adapter(model: nn.Module, adapter_dir: str | Path, *,
                 base_dtype: torch.dtype | str | None = None) -> LoraConfig:
    """Add the PEFT adapter in `adapter_dir` to `model` (a `Transformer` without adapters, its linear layers
    float or weight-only quantized by `models.quant`), in place; `base_dtype` as in `add_lora` (the base cast
    to it, e.g. bfloat16, the adapters kept in float32).

    Everything is checked before the model is touched: the config (`lora_config_from_peft`: ConfigError for
    what we do not implement), then every tensor name and shape against the layers the config targets
    (CheckpointError for missing or unexpected tensors, a rank that differs from the config's, or an adapter
    made for another model size). Adapters take the model's train/eval mode. Returns the adapter's config.
    """
    adapter_dir = Path(adapter_dir)
    args = _model_args(model)
    if lora_modules(model):
        raise ConfigError("the model already has LoRA adapters; load the adapter into a freshly loaded base "
                          "model (or merge the present adapters first with merge_lora)")
    config_file, weights = _adapter_files(adapter_dir)
    config = lora_config_from_peft(read_json_object(config_file), str(config_file))
    names = _hf_modules(args, lora_targets(model, config))
    key_of = {}  # file key -> (our key, rows to un-permute by heads)
    expected: dict[str, tuple[int, ...]] = {}
    for name, hf in names.items():
        base = model.get_submodule(name)
        assert isinstance(base, (nn.Linear, QuantizedLinear)), name  # a quantized base takes adapters too
        for part, shape in (("lora_A", (config.rank, base.in_features)), ("lora_B", (base.out_features,
                                                                                    config.rank))):
            key = f"{_PREFIX}{hf}.{part}.weight"
            expected[key] = shape
            key_of[key] = (f"{name}.{part}.weight", _rotary_heads(name, args) if part == "lora_B" else None)
    entries = scan_tensors([weights])
    found = {k: e.shape for k, e in entries.items()}
    _diagnose(found, expected, config, weights)
    check_tensors(found, expected, f"adapter {adapter_dir} does not fit the model ({_describe(args)}, LoRA "
                  f"r={config.rank}, targets {list(config.targets)}); was it made for another base model?")
    for key, entry in entries.items():
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {key!r} in {weights} has dtype {entry.dtype}; adapters must be "
                                  "float32, bfloat16, float16 or float64")
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(weights, framework="pt") as st:
            for key, (ours, heads) in key_of.items():
                tensor = st.get_tensor(key)
                state[ours] = tensor if heads is None else permute_from_hf(tensor, heads)
    except (SafetensorError, OSError) as err:
        raise unreadable(weights, err) from None
    add_lora(model, config, base_dtype=base_dtype)
    load_lora_state_dict(model, state)
    return config


def load_model_with_adapter(model_dir: str | Path, adapter_dir: str | Path,
                            dtype: torch.dtype | str | None = None, format: Format | None = None,
                            quantize: QuantConfig | str | None = None) -> tuple[Transformer, ModelArgs]:
    """`load_model(model_dir, dtype=dtype)` (a checkpoint folder or a llama.cpp .gguf file) plus the adapter in
    `adapter_dir` (kept unmerged, its weights in float32 over a half-precision base), in eval mode: ready for
    generation."""
    model, args = load_model(model_dir, dtype=dtype, format=format, quantize=quantize)
    load_adapter(model, adapter_dir)
    return model.eval(), args


def merge_adapter_checkpoint(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                             format: Format | None = None, *, dtype: torch.dtype | str | None = None,
                             extra_json: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the checkpoint base + adapter with the adapter merged into the weights, loadable by `load_model`
    (and `tramontane generate --model OUT_DIR`): the base's tokenizer files are copied beside it.

    `base_dir`: a checkpoint folder or a llama.cpp .gguf file (its tokenizer files are those in its folder).
    `format`: "hf" or "consolidated" (default: the base's own, and "hf" over a GGUF base: tramontane writes no
    GGUF, and llama.cpp's convert_hf_to_gguf.py converts the HF folder back; format="gguf" is refused before
    anything is read). `dtype`: of the saved weights (default: the base checkpoint's, for a GGUF file the one
    `load_model` gives: float16 / bfloat16 for an F16 / BF16 file, float32 for a block-quantized one; the merge
    is computed in float32 and rounded once to it). `extra_json` as in `save_adapter` (e.g. the privacy ledger
    of the fine-tuning). The folder appears complete or not at all; an existing non-empty `out_dir` is refused
    unless `overwrite`.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if format == "gguf":
        raise ConfigError("tramontane does not write GGUF files: merge with format='hf' and convert the merged "
                          "folder with llama.cpp's convert_hf_to_gguf.py (then requantize it with llama-quantize)")
    fmt: Format = format or detect_format(base_dir)
    if fmt == "gguf":  # the base's own format, which is not written: HF, the input of llama.cpp's converter
        fmt = "hf"
    _check_out_dir(out_dir, overwrite)
    extras = _extra_files(extra_json)
    model, args = load_model(base_dir, dtype=dtype)  # loaded in the saved dtype: the merge rounds once
    load_adapter(model, adapter_dir)
    merge_lora(model)
    tokenizer = tokenizer_files(base_dir)
    if not tokenizer:
        logger.warning("%s has no tokenizer file; the merged checkpoint %s has none either", base_dir,
                       out_dir)

    def write(folder: Path) -> None:
        # save_model writes its own folder atomically: here it replaces this (empty) temporary folder, which
        # then gets the tokenizer and extra files and is renamed into place as a whole
        save_model(model, folder, format=fmt, args=args, overwrite=True)
        for file in tokenizer:
            shutil.copyfile(file, folder / file.name)
        for file_name, text in extras.items():
            (folder / file_name).write_text(text)

    return write_dir_atomic(out_dir, write)


# ---------------------------------------------------------------------------------------------- helpers


def _model_args(model: nn.Module) -> ModelArgs:
    args = getattr(model, "args", None)
    if not isinstance(args, ModelArgs):
        raise ConfigError("PEFT adapters are read and written for a tramontane Transformer (with .args); "
                          f"got {type(model).__name__}")
    return args


def _hf_modules(args: ModelArgs, names: list[str]) -> dict[str, str]:
    """Our module name -> its HF module path (experts in transformers 4's per-expert layout)."""
    weights = hf_names(args)
    return {name: weights[f"{name}.weight"].removesuffix(".weight") for name in names}


def _rotary_heads(name: str, args: ModelArgs) -> int | None:
    """Heads over which lora_B's rows follow the q/k rotary permutation (None: not wq / wk)."""
    if name.endswith(".attention.wq"):
        return args.n_heads
    if name.endswith(".attention.wk"):
        return args.n_kv_heads
    return None


def _describe(args: ModelArgs) -> str:
    moe = f", {args.moe.num_experts} experts" if args.moe is not None else ""
    return (f"dim={args.dim}, n_layers={args.n_layers}, n_heads={args.n_heads}, "
            f"n_kv_heads={args.n_kv_heads}, head_dim={args.head_dim}, hidden_dim={args.hidden_dim}{moe}")


def _adapter_files(adapter_dir: Path) -> tuple[Path, Path]:
    if not adapter_dir.is_dir():
        raise CheckpointError(f"adapter directory {adapter_dir} does not exist (or is not a directory)")
    config_file, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not config_file.is_file():
        raise CheckpointError(f"{adapter_dir} is not a PEFT adapter: it has no {ADAPTER_CONFIG}")
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise CheckpointError(
                f"{adapter_dir} holds only pickled adapter weights (adapter_model.bin), which are not loaded "
                "(unpickling can run arbitrary code); re-save the adapter with PEFT's save_pretrained "
                "(safe_serialization=True, the default)")
        raise CheckpointError(f"{adapter_dir} has no adapter weights ({ADAPTER_WEIGHTS})")
    return config_file, weights


def _diagnose(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], config: LoraConfig,
              weights: Path) -> None:
    """Clearer errors than `check_tensors`' list for the usual mistakes: adapter names in keys, a rank that
    disagrees with the config."""
    named = sorted(k for k in found if _NAMED_KEY.search(k))
    if named:
        raise CheckpointError(
            f"{weights} has keys holding an adapter name (e.g. {named[0]!r}), as in a PeftModel's own "
            "state_dict; PEFT's save_pretrained writes them without it (…lora_A.weight): re-save the adapter "
            "with save_pretrained")
    ranks = {shape[0] for key, shape in found.items() if key.endswith(".lora_A.weight") and key in expected
             and len(shape) == 2}
    if ranks and ranks != {config.rank}:
        raise CheckpointError(
            f"adapter_config.json says r={config.rank} but the lora_A weights in {weights} have rank "
            f"{sorted(ranks)}: the config and the weights disagree (fix r in adapter_config.json, or re-save "
            "the adapter)")


def _check_out_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(f"{path} is not empty; save into a new directory or pass overwrite=True (which "
                              "replaces the whole directory)")


def _extra_files(extra_json: Mapping[str, Any] | None) -> dict[str, str]:
    """File name -> JSON text, each name a plain `*.json` file name that is not one of the adapter's own."""
    out = {}
    for name, value in (extra_json or {}).items():
        if (not isinstance(name, str) or not name.endswith(".json") or Path(name).name != name
                or name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "config.json", "params.json")
                or name.startswith(".")):
            raise ConfigError(f"extra_json file name {name!r} must be a plain *.json file name (no folder), "
                              f"not {ADAPTER_CONFIG}, config.json or params.json")
        try:
            out[name] = json.dumps(value, indent=2) + "\n"
        except (TypeError, ValueError) as err:
            raise ConfigError(f"extra_json[{name!r}] cannot be written as JSON: {err}") from None
    return out


def tokenizer_files(model_path: str | Path) -> list[Path]:
    """The tokenizer files that go with a checkpoint's weights when they are saved elsewhere (a merged or fully
    fine-tuned model): mistral_common's (`tekken*.json`, `*.model*`) and transformers' own, from the checkpoint
    folder, or from the folder holding a one-file checkpoint (a llama.cpp .gguf, as `Tokenizer.from_model_dir`
    looks there)."""
    from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece
    from mistral_common.tokens.tokenizers.tekken import is_tekken

    folder = Path(model_path)
    if folder.is_file():
        folder = folder.parent
    return sorted(p for p in folder.iterdir()
                  if is_tekken(p) or is_sentencepiece(p) or (p.name in _HF_TOKENIZER_FILES and p.is_file()))


__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "load_adapter", "load_model_with_adapter", "lora_config_from_peft",
    "merge_adapter_checkpoint", "peft_config_dict", "save_adapter", "tokenizer_files",
]
