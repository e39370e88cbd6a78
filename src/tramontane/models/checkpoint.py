"""Load and save Mistral-family checkpoints in the consolidated (mistral-inference) and Hugging Face formats,
and load llama.cpp's GGUF files.

Consolidated: `params.json` + `consolidated.safetensors` (or `consolidated*.safetensors` shards), tensor
names exactly those of `Transformer.state_dict()`. Hugging Face: `config.json` + `model.safetensors` (or
shards listed in `model.safetensors.index.json`), MistralForCausalLM / MixtralForCausalLM names. GGUF: one
`.gguf` file of llama.cpp's "llama" architecture (Mistral, Mixtral), passed as the file itself and read by
`models.gguf`, which dequantizes llama.cpp's block formats at load (load only; nothing is written as GGUF).

Two traps live here and nowhere else:
- rotary layout: consolidated checkpoints rotate adjacent feature pairs (2i, 2i+1), HF rotates (i, i + D/2).
  The HF conversion scripts permute the rows of `wq` (per query head) and `wk` (per kv head) so both give the
  same network; we apply the inverse permutation when loading HF weights and the forward one when saving.
- Mixtral experts: `save_pretrained` (transformers 4.x and 5.x) writes one tensor per expert under
  `block_sparse_moe`; transformers 5.x's runtime module (and so a raw `state_dict()` dump) fuses them into
  `mlp.experts.gate_up_proj` [E, 2*hidden, D] (gate rows first) and `mlp.experts.down_proj` [E, D, hidden].
  Both are read; the per-expert layout is written.

A weight-only quantized model (`models.quant`) saves and loads in the consolidated format only, in the layout
that module's docstring describes (params.json's `quantization` entry says which).

Loading builds the model on the meta device and assigns the tensors read from disk, so weights are never held
twice. Every name and shape is checked against the model before any tensor data is read. Saving writes into a
temporary directory next to the target and renames it, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from tramontane.errors import CheckpointError, ConfigError
from tramontane.files import fsync_path  # noqa: F401 - re-exported: the old import path keeps working
from tramontane.models.args import DEFAULT_ROPE_THETA, ModelArgs, MoeArgs
from tramontane.models.gguf import is_gguf, open_gguf
from tramontane.models.quant import (
    QuantConfig,
    QuantizedEmbedding,
    QuantizedLinear,
    quantization_config,
    quantize_model,
)
from tramontane.models.transformer import Transformer
from tramontane.tensorfiles import (
    DTYPES,
    SAFETENSORS_DTYPES,
    TensorEntry,
    check_tensors,
    read_json_object,
    resolve_dtype,
    scan_tensors,
    shard_files,
    unreadable,
    write_dir_atomically,
)

logger = logging.getLogger(__name__)

Format = Literal["consolidated", "hf", "gguf"]
FORMATS: tuple[str, ...] = ("consolidated", "hf", "gguf")

_HF_ARCHITECTURES = {"mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}
# What transformers' MistralConfig / MixtralConfig assume for an absent key, so we build the network
# transformers would build; each use is logged. Sizes have no sensible default and are required.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": {"num_key_value_heads": 8, "rms_norm_eps": 1e-6, "sliding_window": 4096,
                "rope_theta": DEFAULT_ROPE_THETA, "tie_word_embeddings": False},
    "mixtral": {"num_key_value_heads": 8, "rms_norm_eps": 1e-5, "sliding_window": None, "rope_theta": 1e6,
                "tie_word_embeddings": False, "num_local_experts": 8, "num_experts_per_tok": 2},
}
_HF_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
# transformers 5.x runtime Mixtral names (fused experts), as found in raw state_dict dumps
_FUSED_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up|down)_proj$")
_T = TypeVar("_T", bound=Transformer)  # the text model or one built on it (vision, audio)


# ----------------------------------------------------------------------------------------------- public API


def load_model(
    path: str | Path,
    *,
    format: Format | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    quantize: QuantConfig | str | None = None,
) -> tuple[Transformer, ModelArgs]:
    """Load a checkpoint directory or a llama.cpp `.gguf` file (format detected unless given) into a
    `Transformer` on `device`.

    `dtype` None keeps the checkpoint's dtype (that of its embedding tensor; for GGUF see `models.gguf`:
    float32 for a block-quantized file, whose Q8_0 / Q4_K / ... weights are dequantized at load, not run
    natively). `quantize` ("int8", "int4" or a `models.quant.QuantConfig`) quantizes the decoder's linear
    layers after loading a float or GGUF checkpoint; a checkpoint saved quantized (see `models.quant`) loads
    as it was saved, and `quantize`, if given, must describe the same stored weights (it may choose other
    `activations`: an int8 checkpoint runs weight-only or W8A8). Raises `CheckpointError` for
    missing/ambiguous/corrupt files or tensors that do not match the config, `ConfigError` for a bad config.
    """
    path = Path(path)
    fmt = detect_format(path, format)
    wanted = QuantConfig(quantize) if isinstance(quantize, str) else quantize
    if fmt == "gguf":  # one parse of the file for its metadata and tensors, load_args' if it kept one
        gguf_file = open_gguf(path, keep=False)
        args = gguf_file.args()
        return _assemble(gguf_file.state_dict(args, dtype=dtype, device=device), args, wanted), args
    kind = detect_kind(path, fmt)
    if kind != "text":
        loader = _MULTIMODAL_LOADERS[kind]
        raise CheckpointError(f"{path} holds a {loader[0]} checkpoint, not a text-only model: load it with "
                              f"{loader[1]} (the CLI's generate, chat, transcribe and serve detect the kind)")
    args = load_args(path, format=fmt)
    if "quantization" in args.extra:
        saved = QuantConfig.from_params(args.extra["quantization"])
        if wanted is not None and not wanted.same_weights(saved):
            raise ConfigError(f"{path} is already quantized ({saved}); load it without quantize=, or quantize "
                              "the float checkpoint it was made from")
        if wanted is not None:  # the same weights, run with the activations asked for
            args.extra["quantization"] = wanted.to_params()
        return _load_quantized(path, args, wanted or saved, dtype, device).eval(), args
    state = read_state_dict(path, args, format=fmt, dtype=dtype, device=device)
    return _assemble(state, args, wanted), args


def _assemble(state: dict[str, torch.Tensor], args: ModelArgs, quantize: QuantConfig | None) -> Transformer:
    """The model holding `state` (consolidated names, checked), quantized with `quantize` if given."""
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    if args.tied_embeddings:  # assign=True wrapped the shared tensor in two Parameters: tie them again
        model.output.weight = model.tok_embeddings.weight
    assert not any(t.is_meta for t in model.state_dict().values())
    if quantize is not None:
        quantize_model(model, quantize)
    return model.eval()  # inference mode, as the quantized kernels need; a trainer sets train mode


def save_model(
    model: nn.Module,
    path: str | Path,
    *,
    format: Format = "consolidated",
    dtype: torch.dtype | str | None = None,
    args: ModelArgs | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (a `Transformer`, or any module with its state-dict names) as a checkpoint directory.

    consolidated: params.json + consolidated.safetensors; hf: config.json + model.safetensors, loadable by
    transformers' `MistralForCausalLM` / `MixtralForCausalLM`. `args` defaults to `model.args`; `dtype` None
    keeps the model's dtype. The directory appears complete or not at all. An existing non-empty directory
    is refused unless `overwrite=True`, which replaces the whole directory (tokenizer files included).
    """
    fmt = _check_format(format)
    if fmt == "gguf":
        raise ConfigError("tramontane does not write GGUF files: save format='hf' and convert that folder with "
                          "llama.cpp's convert_hf_to_gguf.py")
    if args is None:
        args = getattr(model, "args", None)
        if not isinstance(args, ModelArgs):
            raise ConfigError("save_model needs `args=ModelArgs(...)` for a module without `.args`")
    state = model.state_dict()
    quantized = quantization_config(model)
    if quantized is not None:
        return _save_quantized(model, state, Path(path), fmt, dtype, args, quantized, overwrite)
    check_tensors({k: tuple(v.shape) for k, v in state.items()}, _expected_shapes(args),
                   f"the model does not match its ModelArgs ({_describe(args)})")
    target_dtype = resolve_dtype(dtype) or state["tok_embeddings.weight"].dtype
    if target_dtype not in DTYPES.values():
        raise ConfigError(f"cannot save dtype {target_dtype}; pass dtype= one of {sorted(DTYPES)}")
    dtype_name = next(k for k, v in DTYPES.items() if v == target_dtype)
    tensors = {k: v.detach().to("cpu", target_dtype).contiguous() for k, v in state.items()}
    if args.tied_embeddings:  # one tensor on disk; safetensors refuses shared storage anyway
        del tensors["output.weight"]
    if fmt == "hf":
        tensors = consolidated_to_hf(tensors, args)
        files = {"config.json": args_to_hf_config(args, dtype_name), "model.safetensors": tensors}
    else:
        files = {"params.json": args.to_params(), "consolidated.safetensors": tensors}
    return write_dir_atomically(Path(path), files, overwrite)


def detect_format(path: str | Path, format: Format | None = None) -> Format:
    """"consolidated" (params.json) or "hf" (config.json) for a directory, which needs `format=` where it holds
    both; "gguf" for a file that starts with GGUF's magic bytes."""
    path = Path(path)
    fmt = _check_format(format) if format is not None else None
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        if is_gguf(path):
            if fmt not in (None, "gguf"):
                raise CheckpointError(f"format={fmt!r} but {path} is a GGUF file; leave the format out")
            return "gguf"
        if path.suffix.lower() == ".gguf":
            raise CheckpointError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); it "
                                  "may be truncated or corrupt (re-download it)")
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds it (or a llama.cpp "
                              ".gguf file)")
    if fmt == "gguf":
        raise ConfigError(f"format='gguf' names a llama.cpp .gguf file, but {path} is a directory; pass the "
                          ".gguf file itself")
    has = {"consolidated": (path / "params.json").is_file(), "hf": (path / "config.json").is_file()}
    if fmt is not None:
        if not has[fmt]:
            config = "params.json" if fmt == "consolidated" else "config.json"
            raise CheckpointError(f"format={fmt!r} but {path} has no {config}")
        return fmt
    if has["consolidated"] and has["hf"]:
        raise CheckpointError(
            f"{path} holds both a consolidated checkpoint (params.json) and a Hugging Face one "
            "(config.json); pass format='consolidated' or format='hf' to choose"
        )
    if has["consolidated"]:
        return "consolidated"
    if has["hf"]:
        return "hf"
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs:
        raise CheckpointError(f"{path} has no params.json or config.json but holds GGUF file(s) {ggufs[:5]}; "
                              "pass the .gguf file itself, not its folder")
    raise CheckpointError(
        f"{path} is not a checkpoint: it has neither params.json (consolidated format) nor config.json "
        "(Hugging Face format)"
    )


Kind = Literal["text", "vision", "audio"]
_HF_KINDS: dict[str, Kind] = {"llava": "vision", "mistral3": "vision", "voxtral": "audio"}
_HF_KIND_ARCHITECTURES: dict[str, Kind] = {"LlavaForConditionalGeneration": "vision",
                                           "Mistral3ForConditionalGeneration": "vision",
                                           "VoxtralForConditionalGeneration": "audio"}


_MULTIMODAL_LOADERS = {
    "vision": ("vision-language (Pixtral / Mistral 3)", "tramontane.models.vision.load_vision_language_model"),
    "audio": ("speech-language (Voxtral)", "tramontane.models.audio.load_voxtral"),
}


def detect_kind(path: str | Path, format: Format | None = None) -> Kind:
    """Which network a checkpoint directory holds, from its config alone: "text" (Mistral, Mixtral:
    `load_model`), "vision" (Pixtral, Mistral Small 3.1: `models.vision.load_vision_language_model`) or
    "audio" (Voxtral: `models.audio.load_voxtral`). Errors as `detect_format`'s."""
    path = Path(path)
    fmt = detect_format(path, format)
    if fmt == "gguf":
        return "text"  # models.gguf loads the "llama" architecture only
    if fmt == "consolidated":
        params = read_json_object(path / "params.json")
        multimodal = params.get("multimodal")
        if "vision_encoder" in params or (isinstance(multimodal, dict) and "vision_encoder_args" in multimodal):
            return "vision"
        return "audio" if isinstance(multimodal, dict) else "text"
    config = read_json_object(path / "config.json")
    kind = _HF_KINDS.get(str(config.get("model_type")))
    if kind is not None:
        return kind
    archs = config.get("architectures") or []
    return next((_HF_KIND_ARCHITECTURES[a] for a in archs if a in _HF_KIND_ARCHITECTURES), "text")


def load_args(path: str | Path, *, format: Format | None = None) -> ModelArgs:
    """The `ModelArgs` of a checkpoint directory, from params.json or config.json, or of a GGUF file."""
    path = Path(path)
    fmt = detect_format(path, format)
    if fmt == "gguf":
        return open_gguf(path).args()
    if fmt == "consolidated":
        args = ModelArgs.load(path / "params.json")
        if args.extra.get("quantization"):  # ours loads (models.quant's layout); any other scheme is refused
            QuantConfig.from_params(args.extra["quantization"], str(path / "params.json"))
        elif "quantization" in args.extra:
            del args.extra["quantization"]  # an empty entry: a float checkpoint
        return args
    return args_from_hf_config(read_json_object(path / "config.json"))


def read_state_dict(
    path: str | Path,
    args: ModelArgs,
    *,
    format: Format | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors under consolidated names (HF weights renamed and un-permuted).

    Names and shapes are checked against `Transformer(args)` before any data is read. With tied embeddings
    `output.weight` is the same tensor as `tok_embeddings.weight` (a stored copy of the head is ignored).
    A GGUF file's tensors are dequantized (`models.gguf`).
    """
    path = Path(path)
    fmt = detect_format(path, format)
    if fmt == "gguf":
        return open_gguf(path).state_dict(args, dtype=dtype, device=device)
    if "quantization" in args.extra:
        raise CheckpointError(f"{path} holds a quantized checkpoint (models.quant's layout): load it with "
                              "load_model, which rebuilds its quantized layers")
    files = weight_files(path, fmt)
    entries = scan_tensors(files)
    plan = _consolidated_plan(args) if fmt == "consolidated" else _hf_plan(args, entries)
    head = "output.weight" if fmt == "consolidated" else "lm_head.weight"
    ignored = {head} if args.tied_embeddings else set()
    # old transformers versions saved the (recomputed, never loaded) rotary tables
    ignored |= {k for k in entries if k.endswith("rotary_emb.inv_freq")}
    check_tensors({k: e.shape for k, e in entries.items() if k not in ignored},
                   {k: s.shape for k, s in plan.items()},
                   f"checkpoint {path} does not match its config ({_describe(args)})")
    for name in plan:
        if entries[name].dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} in {entries[name].file} has dtype {entries[name].dtype}; quantized or "
                "non-floating checkpoints are not supported (save it in float32, bfloat16 or float16)"
            )
    embed = "tok_embeddings.weight" if fmt == "consolidated" else "model.embed_tokens.weight"
    target = resolve_dtype(dtype) or SAFETENSORS_DTYPES[entries[embed].dtype]
    device = torch.device(device)

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(entries[name].file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as st:
                for name in names:
                    tensor = st.get_tensor(name).to(device=device, dtype=target)
                    state.update(plan[name].convert(tensor))
        except (SafetensorError, OSError) as err:
            raise unreadable(file, err) from None
    if args.tied_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


# ------------------------------------------------------------------------------- quantized checkpoints

# safetensors tags of the tensors models.quant stores (qweight int8 / uint8, bfloat16 scales and zeros)
_QUANT_TAGS = {torch.int8: "I8", torch.uint8: "U8", torch.bfloat16: "BF16"}


def _quantized_skeleton(args: ModelArgs, config: QuantConfig) -> Transformer:
    """A meta-device model with `config`'s quantized modules in place: its state dict names the tensors of a
    quantized checkpoint, with their shapes and (for the quantized ones) dtypes."""
    with torch.device("meta"):
        model = Transformer(args)
    return quantize_model(model, config)


def _quantized_names(model: Transformer) -> set[str]:
    """State-dict names of the quantized modules' tensors (stored in their own dtypes, never cast)."""
    return {f"{prefix}.{name}" for prefix, module in model.named_modules()
            if isinstance(module, (QuantizedLinear, QuantizedEmbedding)) for name in module.state_dict()}


def _load_quantized(path: Path, args: ModelArgs, config: QuantConfig, dtype: torch.dtype | str | None,
                    device: str | torch.device) -> Transformer:
    """Load a checkpoint `save_model` wrote from a quantized model (consolidated format, models.quant's
    layout): names, shapes and the quantized tensors' dtypes are checked before any data is read."""
    entries = scan_tensors(weight_files(path, "consolidated"))
    model = _quantized_skeleton(args, config)
    skeleton = model.state_dict()
    tied = args.tied_embeddings and not config.output
    if tied:
        del skeleton["output.weight"]
    check_tensors({k: e.shape for k, e in entries.items()}, {k: tuple(v.shape) for k, v in skeleton.items()},
                  f"quantized checkpoint {path} does not match its config ({_describe(args)}, {config.mode})")
    quantized = _quantized_names(model)
    for name, entry in entries.items():
        want = _QUANT_TAGS[skeleton[name].dtype] if name in quantized else None
        if (want is not None and entry.dtype != want) or (want is None and entry.dtype not in SAFETENSORS_DTYPES):
            raise CheckpointError(f"tensor {name!r} in {entry.file} has dtype {entry.dtype}, expected "
                                  f"{want or 'a float dtype'} for a {config.mode} checkpoint")
    float_names = [k for k in skeleton if k not in quantized]
    target = resolve_dtype(dtype) or SAFETENSORS_DTYPES[entries[float_names[0]].dtype]
    state: dict[str, torch.Tensor] = {}
    for file in dict.fromkeys(e.file for e in entries.values()):
        try:
            with safe_open(file, framework="pt") as st:
                for name in (k for k, e in entries.items() if e.file == file):
                    tensor = st.get_tensor(name).to(device)
                    state[name] = tensor if name in quantized else tensor.to(target)
        except (SafetensorError, OSError) as err:
            raise unreadable(file, err) from None
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    if config.embeddings:  # the rows come out in the model's dtype, like a float table's
        model.tok_embeddings.weight = torch.empty(0, dtype=target, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    assert not any(t.is_meta for t in model.state_dict().values())
    return model.eval()


def _save_quantized(model: nn.Module, state: dict[str, torch.Tensor], path: Path, fmt: Format,
                    dtype: torch.dtype | str | None, args: ModelArgs, config: QuantConfig,
                    overwrite: bool) -> Path:
    """`save_model` of a quantized model: params.json with the `quantization` entry and the layout of
    models.quant; float tensors cast to `dtype` (default: the norms' dtype), quantized ones kept as they are."""
    if fmt != "consolidated":
        raise ConfigError("a quantized model saves in the consolidated format only (transformers does not read "
                          "tramontane's int8/int4 layout); pass format='consolidated'")
    skeleton = _quantized_skeleton(args, config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = args.tied_embeddings and not config.output
    found = {k: tuple(v.shape) for k, v in state.items() if not (tied and k == "output.weight")}
    if tied:
        del expected["output.weight"]
    check_tensors(found, expected, f"the quantized model does not match its ModelArgs ({_describe(args)})")
    target_dtype = resolve_dtype(dtype) or state["norm.weight"].dtype
    if target_dtype not in DTYPES.values():
        raise ConfigError(f"cannot save dtype {target_dtype}; pass dtype= one of {sorted(DTYPES)}")
    quantized = _quantized_names(skeleton)
    tensors = {k: v.detach().to("cpu").contiguous() if k in quantized
               else v.detach().to("cpu", target_dtype).contiguous()
               for k, v in state.items() if k in expected}
    params = args.to_params() | {"quantization": config.to_params()}
    return write_dir_atomically(path, {"params.json": params, "consolidated.safetensors": tensors}, overwrite)


# --------------------------------------------------------------------------------- HF config <-> ModelArgs


def args_from_hf_config(config: dict[str, Any]) -> ModelArgs:
    """`ModelArgs` from a transformers `config.json` (MistralForCausalLM or MixtralForCausalLM, 4.x or 5.x).

    Absent optional keys take the defaults transformers' config classes use, with a logged warning; in
    particular a missing RoPE theta is 1e4 for Mistral and 1e6 for Mixtral, as in transformers.
    """
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type is None and len(archs) == 1:
        model_type = {v: k for k, v in _HF_ARCHITECTURES.items()}.get(archs[0])
    supported = f"supported: {sorted(_HF_ARCHITECTURES.values())}"
    if model_type not in _HF_ARCHITECTURES:
        raise ConfigError(
            f"config.json model_type {model_type!r} (architectures {archs}) is not supported; {supported}"
        )
    if archs and list(archs) != [_HF_ARCHITECTURES[model_type]]:
        raise ConfigError(
            f"config.json architectures {archs} is not supported for model_type {model_type!r}; {supported}"
        )
    if config.get("quantization_config"):
        raise ConfigError("config.json describes a quantized checkpoint (quantization_config); not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json hidden_act {config['hidden_act']!r} is not supported (Mistral: silu)")
    missing = [k for k in _HF_REQUIRED if config.get(k) is None]
    if missing:
        raise ConfigError(f"config.json is missing required key(s) {missing}")

    defaults = _HF_DEFAULTS[model_type]

    def get(key: str) -> Any:
        if key in config:
            return config[key]
        logger.warning("config.json has no %r; using transformers' %s default %r",
                       key, model_type, defaults[key])
        return defaults[key]

    moe = None
    if model_type == "mixtral":
        moe = MoeArgs(num_experts=get("num_local_experts"), num_experts_per_tok=get("num_experts_per_tok"))
    extra = {}
    if config.get("max_position_embeddings") is not None:
        extra["max_position_embeddings"] = config["max_position_embeddings"]
    return ModelArgs(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        hidden_dim=config["intermediate_size"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=get("num_key_value_heads") or config["num_attention_heads"],
        norm_eps=get("rms_norm_eps"),
        vocab_size=config["vocab_size"],
        rope_theta=_hf_rope_theta(config, model_type),
        sliding_window=get("sliding_window"),
        moe=moe,
        tied_embeddings=bool(get("tie_word_embeddings")),
        extra=extra,
    )


def args_to_hf_config(args: ModelArgs, dtype: str = "bfloat16") -> dict[str, Any]:
    """A `config.json` dict that transformers 4.x and 5.x load as MistralForCausalLM / MixtralForCausalLM."""
    model_type = "mixtral" if args.moe is not None else "mistral"
    config: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "hidden_act": "silu",
        "rope_theta": args.rope_theta,  # 4.x reads this key ...
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},  # ... 5.x this one
        "sliding_window": args.sliding_window,
        "tie_word_embeddings": args.tied_embeddings,
        "dtype": dtype,  # 5.x name
        "torch_dtype": dtype,  # 4.x name
    }
    max_pos = args.extra.get("max_position_embeddings") or args.extra.get("max_seq_len")
    if max_pos:
        config["max_position_embeddings"] = max_pos
    if args.moe is not None:
        config["num_local_experts"] = args.moe.num_experts
        config["num_experts_per_tok"] = args.moe.num_experts_per_tok
    return config


def _hf_rope_theta(config: dict[str, Any], model_type: str) -> float:
    rope = config.get("rope_parameters")  # 5.x: {"rope_type": ..., "rope_theta": ...}
    if rope is None:
        rope = dict(config.get("rope_scaling") or {})  # 4.x: scaling only, theta at the top level
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise ConfigError(f"config.json rope parameters {rope!r} are not supported (one default RoPE only)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"config.json RoPE type {rope_type!r} is not supported (only 'default' RoPE)")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        theta = _HF_DEFAULTS[model_type]["rope_theta"]
        logger.warning("config.json has no rope_theta; using transformers' %s default %g", model_type, theta)
    return float(theta)


# -------------------------------------------------------------------------- HF names and the q/k permutation


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk, per head, from adjacent-pair rotary layout to HF's rotate-half layout."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.view(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_to_hf`: HF rotate-half rows of wq/wk back to adjacent pairs."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.view(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_names(args: ModelArgs) -> dict[str, str]:
    """Consolidated name -> HF name, Mixtral experts in the per-expert layout `save_pretrained` writes."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    for i in range(args.n_layers):
        c, h = f"layers.{i}.", f"model.layers.{i}."
        names |= {
            c + "attention.wq.weight": h + "self_attn.q_proj.weight",
            c + "attention.wk.weight": h + "self_attn.k_proj.weight",
            c + "attention.wv.weight": h + "self_attn.v_proj.weight",
            c + "attention.wo.weight": h + "self_attn.o_proj.weight",
            c + "attention_norm.weight": h + "input_layernorm.weight",
            c + "ffn_norm.weight": h + "post_attention_layernorm.weight",
        }
        if args.moe is None:
            names |= {c + "feed_forward.w1.weight": h + "mlp.gate_proj.weight",
                      c + "feed_forward.w2.weight": h + "mlp.down_proj.weight",
                      c + "feed_forward.w3.weight": h + "mlp.up_proj.weight"}
        else:
            names[c + "feed_forward.gate.weight"] = h + "block_sparse_moe.gate.weight"
            for e in range(args.moe.num_experts):
                for w in ("w1", "w2", "w3"):
                    names[f"{c}feed_forward.experts.{e}.{w}.weight"] = (
                        f"{h}block_sparse_moe.experts.{e}.{w}.weight"
                    )
    return names


def _qk_heads(name: str, args: ModelArgs) -> int | None:
    """Heads to permute over for a consolidated name (None: not a rotary projection)."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def consolidated_to_hf(tensors: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Rename to HF and permute wq/wk rows (per-expert Mixtral layout)."""
    names = hf_names(args)
    out = {}
    for name, tensor in tensors.items():
        heads = _qk_heads(name, args)
        out[names[name]] = tensor if heads is None else permute_to_hf(tensor, heads)
    return out


def hf_to_consolidated(tensors: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Inverse of `consolidated_to_hf`; also reads the fused Mixtral expert layout of transformers 5.x."""
    plan = _hf_plan(args, tensors)
    check_tensors({k: tuple(v.shape) for k, v in tensors.items()}, {k: s.shape for k, s in plan.items()},
                   "HF tensors do not match the config")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        out |= plan[name].convert(tensor)
    return out


# ------------------------------------------------------------------------------------------------ load plans


@dataclass(frozen=True)
class _Source:
    """One tensor on disk: its expected shape and how it becomes consolidated tensors."""

    shape: tuple[int, ...]
    convert: Callable[[torch.Tensor], dict[str, torch.Tensor]]


def _renamed(name: str) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    return lambda t: {name: t}


def _unpermuted(name: str, heads: int) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    return lambda t: {name: permute_from_hf(t, heads)}


def _split_gate_up(prefix: str, n_exp: int, hidden: int) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    # clone: each expert gets its own storage, so the fused tensor is freed and saving works
    return lambda t: {f"{prefix}experts.{e}.{w}.weight": part.clone()
                      for e in range(n_exp) for w, part in (("w1", t[e, :hidden]), ("w3", t[e, hidden:]))}


def _split_down(prefix: str, n_exp: int) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    return lambda t: {f"{prefix}experts.{e}.w2.weight": t[e].clone() for e in range(n_exp)}


def _expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Transformer(args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _consolidated_plan(args: ModelArgs) -> dict[str, _Source]:
    expected = _expected_shapes(args)
    if args.tied_embeddings:
        del expected["output.weight"]
    return {k: _Source(shape, _renamed(k)) for k, shape in expected.items()}


def _hf_plan(args: ModelArgs, on_disk: Iterable[str]) -> dict[str, _Source]:
    expected = _expected_shapes(args)
    if args.tied_embeddings:
        del expected["output.weight"]
    names = hf_names(args)
    fused = args.moe is not None and any(_FUSED_EXPERTS.search(k) for k in on_disk)
    plan = {}
    for name, shape in expected.items():
        if fused and ".feed_forward." in name:
            continue
        heads = _qk_heads(name, args)
        if heads is None:
            plan[names[name]] = _Source(shape, _renamed(name))
        else:
            plan[names[name]] = _Source(shape, _unpermuted(name, heads))
    if fused:
        assert args.moe is not None
        n_exp, dim, hidden = args.moe.num_experts, args.dim, args.hidden_dim
        for i in range(args.n_layers):
            c, h = f"layers.{i}.feed_forward.", f"model.layers.{i}.mlp."
            plan[h + "gate.weight"] = _Source((n_exp, dim), _renamed(c + "gate.weight"))
            plan[h + "experts.gate_up_proj"] = _Source((n_exp, 2 * hidden, dim),
                                                       _split_gate_up(c, n_exp, hidden))
            plan[h + "experts.down_proj"] = _Source((n_exp, dim, hidden), _split_down(c, n_exp))
    return plan


def _describe(args: ModelArgs) -> str:
    moe = f", {args.moe.num_experts} experts" if args.moe is not None else ""
    return (f"dim={args.dim}, n_layers={args.n_layers}, n_heads={args.n_heads}, "
            f"n_kv_heads={args.n_kv_heads}, head_dim={args.head_dim}, hidden_dim={args.hidden_dim}, "
            f"vocab_size={args.vocab_size}{moe}")


# ------------------------------------------------------------------------------------------------------ files


def weight_files(path: Path, fmt: Format) -> list[Path]:
    """The safetensors files of a checkpoint folder in format `fmt`; pickled weights are refused, not read."""
    stem = "consolidated" if fmt == "consolidated" else "model"
    index = path / f"{stem}.safetensors.index.json"
    if index.is_file():
        return shard_files(index)
    if (path / f"{stem}.safetensors").is_file():
        return [path / f"{stem}.safetensors"]
    shards = sorted(path.glob(f"{stem}*.safetensors"))
    if shards:
        return shards
    pickled = sorted(p.name for p in path.iterdir()
                     if (p.name.startswith("consolidated") and p.suffix in (".pth", ".pt"))
                     or (p.name.startswith("pytorch_model") and p.suffix == ".bin"))
    if pickled:
        raise CheckpointError(
            f"{path} holds only pickled weights {pickled}; pickled checkpoints are not loaded (unpickling "
            "can run arbitrary code). Convert them to safetensors first (safetensors.torch.save_file)"
        )
    raise CheckpointError(
        f"{path} has no weights: expected {stem}.safetensors (or {stem}*.safetensors shards)"
    )


def assign_weights(model: _T, entries: dict[str, TensorEntry], names: dict[str, str], *,
                   rotary_heads: Callable[[str], int | None] | None = None,
                   dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   what: str = "the checkpoint") -> _T:
    """Load the tensors `entries` (from `scan_tensors`) into a meta-device `model` (with `.args`) in place.

    `names` maps on-disk names to the model's (keys absent from it are not read); `rotary_heads(name)` gives
    the head count of a tensor whose rows need the HF -> consolidated q/k permutation. Shapes are checked
    before any data is read; tied embeddings are re-tied after `assign=True` loading.
    """
    tied = model.args.tied_embeddings
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if tied:
        del expected["output.weight"]
    check_tensors({names[k]: e.shape for k, e in entries.items() if k in names}, expected,
                  f"{what} does not match its config")
    state: dict[str, torch.Tensor] = {}
    for file in dict.fromkeys(e.file for e in entries.values()):
        try:
            with safe_open(file, framework="pt", device=str(device)) as st:
                for key in (k for k, e in entries.items() if e.file == file and k in names):
                    name, tensor = names[key], st.get_tensor(key)
                    heads = rotary_heads(name) if rotary_heads is not None else None
                    tensor = permute_from_hf(tensor, heads) if heads else tensor
                    state[name] = tensor if dtype is None else tensor.to(dtype)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {file}: {err}; the file may be truncated or "
                                  "corrupt") from None
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # assign=True wrapped the shared tensor in two Parameters: tie them again
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


# ------------------------------------------------------------------------------------------------------ misc


def _check_format(format: str) -> Format:
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {list(FORMATS)}, got {format!r}")
    return format  # type: ignore[return-value]


__all__ = [
    "FORMATS", "Format", "Kind", "args_from_hf_config", "args_to_hf_config", "consolidated_to_hf", "detect_format",
    "detect_kind", "hf_names", "hf_to_consolidated", "load_args", "load_model", "permute_from_hf", "permute_to_hf",
    "read_state_dict", "save_model",
]
