"""Checkpoints written by transformers' `save_pretrained` load into our Transformer with the same logits, and
checkpoints we write load back (ours and transformers' `from_pretrained`) with the same logits.

The oracle is transformers itself on tiny random Mistral / Mixtral configs. Weights are drawn wider than
transformers' default init (and norm weights away from 1) so that a wrong q/k permutation, window or RoPE
theta moves logits by O(1), far above the 1e-5 tolerance.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from tramontane.models.checkpoint import args_to_hf_config, load_model, save_model
from tramontane.models.transformer import Transformer

from tests.hf_tiny import COMMON, KINDS, tiny_causal_lm

WINDOW = 8
SEQ = 20  # > WINDOW, so the sliding window changes the logits after position WINDOW
ATOL = 1e-5


def _hf_model(kind: str) -> MistralForCausalLM | MixtralForCausalLM:
    return tiny_causal_lm(kind, sliding_window=WINDOW)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf(
    tmp_path_factory: pytest.TempPathFactory, tokens: torch.Tensor
) -> dict[str, tuple[Path, torch.Tensor]]:
    """kind -> (directory written by save_pretrained, transformers' float32 logits on `tokens`)."""
    out = {}
    for kind in KINDS:
        model = _hf_model(kind)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        with torch.no_grad():
            out[kind] = (path, model(tokens).logits)
    return out


def _logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


def _hf_logits(path: Path, tokens: torch.Tensor, **kwargs: object) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kwargs).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_checkpoint_gives_hf_logits(hf, tokens, kind):
    path, expected = hf[kind]
    model, args = load_model(path)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim) == (
        64, 2, 4, 2, 16, 128)
    if kind == "mixtral":
        assert args.moe is not None and (args.moe.num_experts, args.moe.num_experts_per_tok) == (4, 2)
        assert args.sliding_window is None and args.rope_theta == 1e6
    else:
        assert args.moe is None and args.sliding_window == WINDOW and args.rope_theta == 1e4
    assert args.tied_embeddings == (kind == "mistral_tied")
    if args.tied_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
    assert all(p.dtype == torch.float32 and not p.is_meta for p in model.parameters())
    torch.testing.assert_close(_logits(model, tokens), expected, atol=ATOL, rtol=0)


def test_test_inputs_exercise_window_and_theta(hf, tokens):
    """Guards the power of the test above: dropping the window or changing theta moves logits a lot."""
    for kind, change in (("mistral", {"sliding_window": None}), ("mixtral", {"rope_theta": 1e4})):
        path, expected = hf[kind]
        model, args = load_model(path)
        other = Transformer(replace(args, **change))
        other.load_state_dict(model.state_dict())
        assert (_logits(other, tokens) - expected).abs().max() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_consolidated_round_trip_keeps_logits(hf, tokens, tmp_path, kind):
    path, expected = hf[kind]
    model, args = load_model(path)
    out = save_model(model, tmp_path / "consolidated")
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.safetensors", "params.json"]
    params = json.loads((out / "params.json").read_text())
    assert params["rope_theta"] == args.rope_theta and params.get("sliding_window") == args.sliding_window
    reloaded, reloaded_args = load_model(out)
    assert reloaded_args == args
    # same weights, same network: bit-identical, and still equal to transformers
    assert torch.equal(_logits(reloaded, tokens), _logits(model, tokens))
    torch.testing.assert_close(_logits(reloaded, tokens), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_hf_save_loads_in_transformers(hf, tokens, tmp_path, kind):
    path, expected = hf[kind]
    model, _ = load_model(path)
    out = save_model(model, tmp_path / "hf", format="hf")
    torch.testing.assert_close(_hf_logits(out, tokens), expected, atol=ATOL, rtol=0)
    # the same tensors, under the same names, as transformers' own save_pretrained wrote
    ours, theirs = load_file(out / "model.safetensors"), load_file(path / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_sharded_hf_checkpoint(tmp_path, tokens):
    model = _hf_model("mixtral")
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours, _ = load_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(_logits(ours, tokens), model(tokens).logits, atol=ATOL, rtol=0)


def test_fused_mixtral_expert_layout(hf, tokens, tmp_path):
    """transformers 5.x's runtime Mixtral module fuses experts (`mlp.experts.gate_up_proj`/`down_proj`);
    a raw dump of its state_dict in that layout loads too."""
    model = _hf_model("mixtral")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if not any(k.endswith("mlp.experts.gate_up_proj") for k in state):
        pytest.skip("this transformers version keeps Mixtral experts unfused at runtime")
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    ours, _ = load_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(_logits(ours, tokens), model(tokens).logits, atol=ATOL, rtol=0)
    # and saving writes the per-expert layout save_pretrained writes
    out = save_model(ours, tmp_path / "resaved", format="hf")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in f.keys()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(hf, tokens, tmp_path, dtype):
    path, expected = hf["mixtral"]
    model, _ = load_model(path, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    logits = _logits(model, tokens)
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()

    # a half-precision checkpoint keeps its dtype when loaded without dtype=, and transformers reads ours
    out = save_model(model, tmp_path / "half", format="hf")
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    reloaded, _ = load_model(out)
    assert all(p.dtype == dtype for p in reloaded.parameters())
    assert torch.equal(_logits(reloaded, tokens), logits)
    theirs = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert theirs.dtype == dtype
    with torch.no_grad():
        assert (theirs(tokens).logits.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_bf16_save_pretrained_loads_as_bf16(tmp_path, tokens):
    model = _hf_model("mistral").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours.state_dict()["layers.1.attention.wv.weight"],
                       model.state_dict()["model.layers.1.self_attn.v_proj.weight"])


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_hf_config_read_by_transformers(hf, kind):
    """Every field we write is the one transformers reads (a non-default theta catches a dropped key)."""
    _, args = load_model(hf[kind][0])
    args = replace(args, rope_theta=5e5, tied_embeddings=True)
    config_cls = MixtralConfig if kind == "mixtral" else MistralConfig
    config = config_cls.from_dict(args_to_hf_config(args, "float16"))
    assert config.rope_parameters["rope_theta"] == 5e5
    assert config.tie_word_embeddings is True
    assert config.dtype == torch.float16
    assert config.sliding_window == args.sliding_window
    pairs = {"hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
             "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
             "intermediate_size": args.hidden_dim, "vocab_size": args.vocab_size,
             "rms_norm_eps": args.norm_eps}
    assert {k: getattr(config, k) for k in pairs} == pairs
    if kind == "mixtral":
        assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_gpu(hf, tokens):
    path, expected = hf["mixtral"]
    model, _ = load_model(path, device="cuda", dtype=torch.float32)
    assert all(p.device.type == "cuda" for p in model.parameters())
    with torch.no_grad():
        logits = model(tokens.cuda()).float().cpu()
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)  # TF32/GPU kernels: looser
