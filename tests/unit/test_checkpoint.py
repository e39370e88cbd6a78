"""Checkpoint formats: exact round trips, format detection, and every kind of bad input named in the error."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tramontane.tensorfiles as tensorfiles
from tramontane.errors import CheckpointError, ConfigError
from tramontane.models.args import ModelArgs, MoeArgs
from tramontane.models.checkpoint import (
    args_from_hf_config,
    args_to_hf_config,
    consolidated_to_hf,
    detect_format,
    hf_to_consolidated,
    load_model,
    permute_from_hf,
    permute_to_hf,
    save_model,
)
from tramontane.models.transformer import Transformer

BASE = dict(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
            vocab_size=64)
ARGS = {
    "dense": ModelArgs(**BASE, sliding_window=4),
    "moe": ModelArgs(**BASE, rope_theta=1e6, moe=MoeArgs(num_experts=3, num_experts_per_tok=2)),
    "tied": ModelArgs(**BASE, tied_embeddings=True),
}


def _model(kind: str = "dense", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ARGS[kind])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


def _assert_same_state(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _rewrite(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------ q/k permutation


def test_permutation_on_a_small_example():
    # one head of dim 4: consolidated rows (re0, im0, re1, im1); HF rotate-half rows (re0, re1, im0, im1)
    consolidated = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    assert permute_to_hf(consolidated, 1).flatten().tolist() == [0, 2, 1, 3]
    two_heads = torch.arange(8.0)[:, None]
    assert permute_to_hf(two_heads, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    six = torch.arange(6.0)[:, None]  # head dim 6: pairs (0,1) (2,3) (4,5) -> reals first
    assert permute_to_hf(six, 1).flatten().tolist() == [0, 2, 4, 1, 3, 5]


def test_permutation_is_inverted():
    w = torch.randn(4 * 16, 24)
    assert torch.equal(permute_from_hf(permute_to_hf(w, 4), 4), w)
    assert torch.equal(permute_to_hf(permute_from_hf(w, 4), 4), w)
    assert not torch.equal(permute_to_hf(w, 4), w)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_name_mapping_is_inverted(kind):
    state = _model(kind).state_dict()
    hf = consolidated_to_hf(dict(state), ARGS[kind])
    assert "model.layers.1.self_attn.q_proj.weight" in hf
    back = hf_to_consolidated(hf, ARGS[kind])
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["consolidated", "hf"])
@pytest.mark.parametrize("kind", list(ARGS))
def test_round_trip_is_exact(tmp_path, kind, fmt):
    model = _model(kind)
    save_model(model, tmp_path / "ckpt", format=fmt)
    assert detect_format(tmp_path / "ckpt") == fmt
    loaded, args = load_model(tmp_path / "ckpt")
    assert args.moe == ARGS[kind].moe and args.sliding_window == ARGS[kind].sliding_window
    assert args.rope_theta == ARGS[kind].rope_theta and args.tied_embeddings == ARGS[kind].tied_embeddings
    _assert_same_state(loaded, model)
    tokens = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_loaded_model_is_materialised_and_trainable(tmp_path):
    save_model(_model("tied"), tmp_path / "ckpt")
    model, _ = load_model(tmp_path / "ckpt")
    params = list(model.parameters())
    assert all(not p.is_meta and p.requires_grad for p in params)
    assert model.output.weight is model.tok_embeddings.weight
    assert len(params) == len(list(_model("tied").parameters()))
    with safe_open(tmp_path / "ckpt" / "consolidated.safetensors", "pt") as f:
        assert "output.weight" not in f.keys()  # tied: stored once


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bfloat16", "fp16"])
def test_save_and_load_dtypes(tmp_path, dtype):
    model = _model()
    torch_dtype = {"bfloat16": torch.bfloat16, "fp16": torch.float16}.get(dtype, dtype)
    save_model(model, tmp_path / "half", dtype=dtype)
    with safe_open(tmp_path / "half" / "consolidated.safetensors", "pt") as f:
        assert f.get_tensor("norm.weight").dtype == torch_dtype
    loaded, _ = load_model(tmp_path / "half")
    assert all(p.dtype == torch_dtype for p in loaded.parameters())
    assert torch.equal(loaded.output.weight, model.output.weight.to(torch_dtype))
    # and converting at load time
    save_model(model, tmp_path / "full", format="hf")
    converted, _ = load_model(tmp_path / "full", dtype=dtype)
    _assert_same_state(converted, loaded)
    assert json.loads((tmp_path / "full" / "config.json").read_text())["dtype"] == "float32"


def test_bad_dtype_is_refused(tmp_path):
    save_model(_model(), tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="int8"):
        load_model(tmp_path / "ckpt", dtype=torch.int8)
    with pytest.raises(ConfigError, match="float64"):
        save_model(_model().double(), tmp_path / "f64")


def test_hf_save_writes_transformers_names(tmp_path):
    save_model(_model("moe"), tmp_path / "hf", format="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert config["rope_parameters"]["rope_theta"] == 1e6
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.1.block_sparse_moe.gate.weight",
            "model.layers.1.block_sparse_moe.experts.2.w3.weight"} <= keys
    assert not any(k.startswith("layers.") for k in keys)


def test_sharded_consolidated_checkpoint(tmp_path):
    model = _model()
    save_model(model, tmp_path / "c")
    tensors = load_file(tmp_path / "c" / "consolidated.safetensors")
    (tmp_path / "c" / "consolidated.safetensors").unlink()
    names = sorted(tensors)
    for i, part in enumerate((names[::2], names[1::2])):
        save_file({k: tensors[k] for k in part}, str(tmp_path / "c" / f"consolidated.0{i}.safetensors"))
    loaded, _ = load_model(tmp_path / "c")
    _assert_same_state(loaded, model)


# ------------------------------------------------------------------------------------------ format detection


def test_empty_and_missing_directories(tmp_path):
    with pytest.raises(CheckpointError, match="neither params.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_model(tmp_path / "file")


def test_both_formats_need_an_explicit_choice(tmp_path):
    dense, moe = _model("dense"), _model("moe")
    save_model(dense, tmp_path / "c")
    save_model(moe, tmp_path / "h", format="hf")
    for f in (tmp_path / "h").iterdir():
        os.replace(f, tmp_path / "c" / f.name)
    with pytest.raises(CheckpointError, match="format='consolidated' or format='hf'"):
        load_model(tmp_path / "c")
    loaded, _ = load_model(tmp_path / "c", format="consolidated")
    _assert_same_state(loaded, dense)
    loaded, args = load_model(tmp_path / "c", format="hf")
    assert args.moe is not None
    _assert_same_state(loaded, moe)
    with pytest.raises(ConfigError, match="gguf"):
        load_model(tmp_path / "c", format="gguf")


def test_explicit_format_must_be_present(tmp_path):
    save_model(_model(), tmp_path / "c")
    with pytest.raises(CheckpointError, match="format='hf' but .* has no config.json"):
        load_model(tmp_path / "c", format="hf")


@pytest.mark.parametrize("config, pickled", [("params.json", "consolidated.00.pth"),
                                             ("config.json", "pytorch_model.bin")])
def test_pickled_checkpoints_are_refused(tmp_path, config, pickled):
    fmt = "consolidated" if config == "params.json" else "hf"
    save_model(_model(), tmp_path / "c", format=fmt)
    weights = "consolidated.safetensors" if fmt == "consolidated" else "model.safetensors"
    (tmp_path / "c" / weights).unlink()
    (tmp_path / "c" / pickled).write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match=rf"{pickled}.*pickled checkpoints are not loaded.*safetensors"):
        load_model(tmp_path / "c")


def test_config_without_weights(tmp_path):
    save_model(_model(), tmp_path / "c")
    (tmp_path / "c" / "consolidated.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights: expected consolidated.safetensors"):
        load_model(tmp_path / "c")


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("cut", [0.5, 0.999, 4])
def test_truncated_file_is_named(tmp_path, cut):
    save_model(_model(), tmp_path / "c")
    file = tmp_path / "c" / "consolidated.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * cut) if cut < 1 else cut])
    with pytest.raises(CheckpointError, match=r"consolidated\.safetensors.*truncated or corrupt"):
        load_model(tmp_path / "c")


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    save_model(_model(), tmp_path / "c")
    _rewrite(tmp_path / "c" / "consolidated.safetensors",
             lambda t: t.update({"layers.1.attention.wk.weight": torch.zeros(8, 32)}))
    with pytest.raises(CheckpointError,
                       match=r"layers\.1\.attention\.wk\.weight expected shape \[16, 32\], found \[8, 32\]"):
        load_model(tmp_path / "c")


def test_wrong_shape_in_hf_checkpoint_names_hf_tensor(tmp_path):
    save_model(_model("moe"), tmp_path / "h", format="hf")
    _rewrite(tmp_path / "h" / "model.safetensors",
             lambda t: t.update({"model.layers.0.block_sparse_moe.experts.2.w2.weight": torch.zeros(32, 47)}))
    match = r"experts\.2\.w2\.weight expected shape \[32, 48\], found \[32, 47\]"
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path / "h")


def test_missing_tensor_is_named(tmp_path):
    save_model(_model(), tmp_path / "c")
    _rewrite(tmp_path / "c" / "consolidated.safetensors", lambda t: t.pop("layers.0.ffn_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) layers\.0\.ffn_norm\.weight"):
        load_model(tmp_path / "c")


def test_missing_untied_head_in_hf_checkpoint(tmp_path):
    save_model(_model(), tmp_path / "h", format="hf")
    _rewrite(tmp_path / "h" / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) lm_head\.weight"):
        load_model(tmp_path / "h")


def test_unexpected_tensor_is_named(tmp_path):
    save_model(_model(), tmp_path / "c")
    _rewrite(tmp_path / "c" / "consolidated.safetensors",
             lambda t: t.update({"vision_encoder.patch_conv.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) vision_encoder\.patch_conv\.weight"):
        load_model(tmp_path / "c")


def test_all_problems_reported_together(tmp_path):
    save_model(_model(), tmp_path / "c")

    def edit(t):
        t.pop("norm.weight")
        t["extra.weight"] = torch.zeros(1)
        t["output.weight"] = torch.zeros(3, 3)

    _rewrite(tmp_path / "c" / "consolidated.safetensors", edit)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "c")
    for part in ("missing tensor(s) norm.weight", "unexpected tensor(s) extra.weight",
                 "output.weight expected shape [64, 32], found [3, 3]"):
        assert part in str(err.value)


def test_quantized_tensor_is_refused(tmp_path):
    save_model(_model(), tmp_path / "c")
    _rewrite(tmp_path / "c" / "consolidated.safetensors",
             lambda t: t.update({"layers.0.attention.wv.weight": torch.zeros(16, 32, dtype=torch.int8)}))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wv\.weight.*I8.*quantized"):
        load_model(tmp_path / "c")


def test_duplicate_tensor_across_shards(tmp_path):
    save_model(_model(), tmp_path / "c")
    tensors = load_file(tmp_path / "c" / "consolidated.safetensors")
    save_file({"norm.weight": tensors["norm.weight"]}, str(tmp_path / "c" / "consolidated.01.safetensors"))
    os.replace(tmp_path / "c" / "consolidated.safetensors", tmp_path / "c" / "consolidated.00.safetensors")
    match = r"'norm\.weight' appears in both .*consolidated\.00\.safetensors"
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path / "c")


def test_index_naming_a_missing_shard(tmp_path):
    save_model(_model(), tmp_path / "h", format="hf")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "h" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(tmp_path / "h")


def test_missing_params_keys_are_named(tmp_path):
    save_model(_model(), tmp_path / "c")
    params = json.loads((tmp_path / "c" / "params.json").read_text())
    del params["dim"], params["vocab_size"]
    (tmp_path / "c" / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['dim', 'vocab_size'\]"):
        load_model(tmp_path / "c")


def test_params_not_matching_weights(tmp_path):
    save_model(_model(), tmp_path / "c")
    params = json.loads((tmp_path / "c" / "params.json").read_text())
    params["n_layers"] = 3
    (tmp_path / "c" / "params.json").write_text(json.dumps(params))
    match = r"n_layers=3.*missing tensor\(s\) layers\.2\.attention\.wq\.weight"
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path / "c")


@pytest.mark.parametrize("change, name", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "llama"),
    ({"architectures": ["MistralModel"]}, "MistralModel"),
])
def test_unsupported_architecture_is_named(tmp_path, change, name):
    save_model(_model(), tmp_path / "h", format="hf")
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (tmp_path / "h" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=name):
        load_model(tmp_path / "h")


def test_a_vision_language_config_is_sent_to_its_loader(tmp_path):
    save_model(_model(), tmp_path / "h", format="hf")
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    config.pop("model_type")
    config["architectures"] = ["LlavaForConditionalGeneration"]
    (tmp_path / "h" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vision-language.*load_vision_language_model"):
        load_model(tmp_path / "h")


# -------------------------------------------------------------------------------------- HF config mapping


def _hf_config(**change):
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 100, "rms_norm_eps": 1e-5, "sliding_window": None,
              "tie_word_embeddings": False}
    config.update(change)
    return {k: v for k, v in config.items() if v != "DROP"}


def test_hf_config_rope_theta_4x_and_5x_keys():
    assert args_from_hf_config(_hf_config(rope_theta=1e6)).rope_theta == 1e6
    rope = {"rope_type": "default", "rope_theta": 5e5}
    assert args_from_hf_config(_hf_config(rope_parameters=rope)).rope_theta == 5e5
    assert args_from_hf_config(_hf_config(rope_theta=2e5, rope_scaling=None)).rope_theta == 2e5


def test_hf_config_absent_theta_defaults_like_transformers(caplog):
    with caplog.at_level(logging.WARNING, logger="tramontane.models.checkpoint"):
        assert args_from_hf_config(_hf_config()).rope_theta == 1e4  # never 1e6 for Mistral
    assert "rope_theta" in caplog.text
    mixtral = _hf_config(architectures=["MixtralForCausalLM"], model_type="mixtral")
    args = args_from_hf_config(mixtral)
    assert args.rope_theta == 1e6 and args.moe == MoeArgs(8, 2)


def test_hf_config_defaults_and_derived_values(caplog):
    args = args_from_hf_config(_hf_config(num_attention_heads=16, head_dim=None, num_key_value_heads="DROP",
                                          sliding_window="DROP", max_position_embeddings=32768))
    assert args.head_dim == 4 and args.n_kv_heads == 8 and args.sliding_window == 4096
    assert "num_key_value_heads" in caplog.text and "sliding_window" in caplog.text
    assert args.extra == {"max_position_embeddings": 32768}
    assert args_to_hf_config(args)["max_position_embeddings"] == 32768


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "linear"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"hidden_size": "DROP"}, "hidden_size"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantiz"),
])
def test_hf_config_refusals(change, match):
    with pytest.raises(ConfigError, match=match):
        args_from_hf_config(_hf_config(**change))


def test_hf_config_round_trip():
    for args in ARGS.values():
        back = args_from_hf_config(args_to_hf_config(args))
        assert back == args


# --------------------------------------------------------------------------------------------- atomic save


def _failing_writer(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"half a checkpoint")
    raise RuntimeError("disk full")


@pytest.mark.parametrize("fmt", ["consolidated", "hf"])
def test_failed_save_leaves_nothing(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(tensorfiles, "save_file", _failing_writer)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(_model(), tmp_path / "ckpt", format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old = _model(seed=1)
    save_model(old, tmp_path / "ckpt")
    monkeypatch.setattr(tensorfiles, "save_file", _failing_writer)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(_model(seed=2), tmp_path / "ckpt", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded, _ = load_model(tmp_path / "ckpt")
    _assert_same_state(loaded, old)


def test_existing_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    save_model(_model(), tmp_path / "empty")  # an empty directory is fine
    with pytest.raises(CheckpointError, match="not empty.*overwrite=True"):
        save_model(_model(seed=3), tmp_path / "empty")
    new = _model(seed=3)
    save_model(new, tmp_path / "empty", format="hf", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["config.json", "model.safetensors"]
    loaded, _ = load_model(tmp_path / "empty")
    _assert_same_state(loaded, new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_saved_files_follow_the_umask(tmp_path):
    save_model(_model(), tmp_path / "ckpt")
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "ckpt").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_save_refuses_a_model_not_matching_args(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) layers\.0\.feed_forward\.gate\.weight"):
        save_model(_model("dense"), tmp_path / "ckpt", args=ARGS["moe"])
    assert not (tmp_path / "ckpt").exists()
