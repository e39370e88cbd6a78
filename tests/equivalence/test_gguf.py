"""GGUF files written as llama.cpp's converter writes them load into our Transformer with transformers' logits.

The oracle is transformers on tiny random Mistral / Mixtral configs, saved with `save_pretrained` and converted
to GGUF by `benchmarks/_llamacpp_worker.py`'s `convert` (whose F16 and Q8_0 greedy tokens matched llama.cpp's)
or by `tests/gguf_files.py` (Mixtral, tied heads, windows; same conventions). Two checks per file type:

- exact: transformers with its weights rounded as the file stores them (`hf_state_as_stored`) gives our
  float32 logits to 1e-4: names, q/k row order, expert layout and the dequantization are all right;
- bound: against transformers' unrounded weights, what the file type costs (fp16 rounding, Q8_0's 8 bits).

Weights are drawn wider than transformers' default init and norms away from 1, so a swapped tensor or a wrong
permutation moves logits by O(1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import MistralForCausalLM, MixtralForCausalLM

from tramontane.generation import SamplingParams, generate
from tramontane.models.checkpoint import detect_format, load_model
from tramontane.models.gguf import GGUFFile
from tramontane.models.quant import QuantizedLinear, quantize_model

from tests.hf_tiny import COMMON as HF_COMMON
from tests.hf_tiny import tiny_causal_lm
from tests.gguf_files import Q, benchmark_convert, gguf_tensors, hf_state_as_stored, write_gguf

SEQ = 20
EXACT = 1e-4
COMMON = {**HF_COMMON, "max_position_embeddings": 4096}
# Measured on these models (max |logit| about 3.3): F16 file in float16 0.0064, F16 in float32 0.0029, Q8_0
# 0.080, Q4_0 0.99. The bounds leave about 2x.
F16_BOUND = 0.015
Q8_0_BOUND = 0.16


def _hf_model(kind: str, **config: object) -> MistralForCausalLM | MixtralForCausalLM:
    return tiny_causal_lm(kind, max_position_embeddings=4096, **config)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, MistralForCausalLM | MixtralForCausalLM]]:
    """kind -> (directory written by save_pretrained, the model)."""
    out = {}
    for kind in ("mistral", "mixtral", "mistral_tied"):
        model = _hf_model(kind)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = (path, model)
    return out


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


def _hf_logits(model: torch.nn.Module, tokens: torch.Tensor, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    if state is not None:
        model = type(model)(model.config)
        model.load_state_dict(state)
        model.set_attn_implementation("eager")
    with torch.no_grad():
        return model.eval()(tokens).logits.float()


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", ["F16", "Q8_0", "Q4_0"])
def test_converted_file_gives_hf_logits_of_its_rounded_weights(hf, tokens, tmp_path, kind):
    path, model = hf["mistral"]
    benchmark_convert()(path, tmp_path / "m.gguf", kind)
    assert detect_format(tmp_path / "m.gguf") == "gguf"
    ours, args = load_model(tmp_path / "m.gguf", dtype=torch.float32)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim,
            args.vocab_size, args.norm_eps, args.rope_theta) == (64, 2, 4, 2, 16, 128, 128, 1e-5, 1e4)
    assert args.moe is None and not args.tied_embeddings and args.sliding_window is None
    expected = _hf_logits(model, tokens, hf_state_as_stored(model, Q[kind]))
    torch.testing.assert_close(_logits(ours, tokens), expected, atol=EXACT, rtol=0)


def test_f16_file_within_fp16_rounding_and_same_greedy_tokens(hf, tokens, tmp_path):
    path, model = hf["mistral"]
    benchmark_convert()(path, tmp_path / "f16.gguf", "F16")
    ours, _ = load_model(tmp_path / "f16.gguf")
    assert ours.dtype == torch.float16  # dtype None: the file's float type
    exact = _hf_logits(model, tokens)
    assert _max_error(_logits(ours, tokens), exact) < F16_BOUND
    assert torch.equal(_logits(ours, tokens).argmax(-1), exact.argmax(-1))
    sequence = tokens[:1, :8]
    for _ in range(10):  # transformers, greedy by full recompute
        sequence = torch.cat([sequence, _hf_logits(model, sequence)[:, -1:].argmax(-1)], dim=1)
    [completion] = generate(ours, [tokens[0, :8].tolist()], SamplingParams(max_tokens=10))
    assert completion.tokens == sequence[0, 8:].tolist()


def test_q8_0_file_within_its_bound_and_q4_0_further(hf, tokens, tmp_path):
    path, model = hf["mistral"]
    exact = _hf_logits(model, tokens)
    errors = {}
    for kind in ("Q8_0", "Q4_0"):
        benchmark_convert()(path, tmp_path / f"{kind}.gguf", kind)
        ours, _ = load_model(tmp_path / f"{kind}.gguf")
        assert ours.dtype == torch.float32  # dtype None: float32 for a quantized file
        errors[kind] = _max_error(_logits(ours, tokens), exact)
    assert 0 < errors["Q8_0"] < Q8_0_BOUND
    assert errors["Q4_0"] > 3 * errors["Q8_0"]  # the bound is about 8-bit weights, not any rounding


def test_test_writer_matches_benchmark_converter(hf, tmp_path):
    """tests/gguf_files.py (used below for Mixtral and tied heads) writes what the checked converter writes."""
    path, _ = hf["mistral"]
    benchmark_convert()(path, tmp_path / "bench.gguf", "Q8_0")
    tensors, meta = gguf_tensors(path)
    write_gguf(tmp_path / "ours.gguf", tensors, meta, Q.Q8_0)
    bench, ours = GGUFFile(tmp_path / "bench.gguf"), GGUFFile(tmp_path / "ours.gguf")
    assert bench.tensors.keys() == ours.tensors.keys()
    for name, tensor in bench.tensors.items():
        assert tensor.tensor_type == ours.tensors[name].tensor_type
        assert np.array_equal(tensor.data, ours.tensors[name].data), name
    assert bench.args() == ours.args()


@pytest.mark.parametrize("per_expert", [False, True], ids=["stacked", "per-expert"])
def test_mixtral_file_gives_hf_logits(hf, tokens, tmp_path, per_expert):
    path, model = hf["mixtral"]
    tensors, meta = gguf_tensors(path, per_expert=per_expert)
    assert ("blk.0.ffn_gate_exps.weight" in tensors) != per_expert
    write_gguf(tmp_path / "mixtral.gguf", tensors, meta, Q.F16)
    ours, args = load_model(tmp_path / "mixtral.gguf", dtype=torch.float32)
    assert args.moe is not None and (args.moe.num_experts, args.moe.num_experts_per_tok) == (4, 2)
    assert args.rope_theta == 1e6
    expected = _hf_logits(model, tokens, hf_state_as_stored(model, Q.F16))
    torch.testing.assert_close(_logits(ours, tokens), expected, atol=EXACT, rtol=0)
    half, _ = load_model(tmp_path / "mixtral.gguf")
    assert half.dtype == torch.float16  # routers in F32 do not make an F16 file float32


def test_tied_head_file_gives_hf_logits(hf, tokens, tmp_path):
    path, model = hf["mistral_tied"]
    tensors, meta = gguf_tensors(path)
    assert "output.weight" not in tensors
    write_gguf(tmp_path / "tied.gguf", tensors, meta, Q.Q8_0)
    ours, args = load_model(tmp_path / "tied.gguf")
    assert args.tied_embeddings and ours.output.weight is ours.tok_embeddings.weight
    expected = _hf_logits(model, tokens, hf_state_as_stored(model, Q.Q8_0))
    torch.testing.assert_close(_logits(ours, tokens), expected, atol=EXACT, rtol=0)


def test_window_only_where_the_file_states_one(tmp_path, tokens):
    """GGUF's llama metadata has no window: none is assumed; `llama.attention.sliding_window` sets one."""
    windowed = _hf_model("mistral", sliding_window=8)
    windowed.save_pretrained(tmp_path / "hf")
    tensors, meta = gguf_tensors(tmp_path / "hf")
    write_gguf(tmp_path / "plain.gguf", tensors, meta, Q.F32)
    write_gguf(tmp_path / "window.gguf", tensors, meta | {"llama.attention.sliding_window": 8}, Q.F32)
    plain, plain_args = load_model(tmp_path / "plain.gguf")
    window, window_args = load_model(tmp_path / "window.gguf")
    assert plain_args.sliding_window is None and window_args.sliding_window == 8
    torch.testing.assert_close(_logits(window, tokens), _hf_logits(windowed, tokens), atol=EXACT, rtol=0)
    assert _max_error(_logits(plain, tokens), _hf_logits(windowed, tokens)) > 0.1  # SEQ > 8: the window matters


def test_quantize_after_loading_a_gguf_file(hf, tokens, tmp_path):
    path, model = hf["mistral"]
    benchmark_convert()(path, tmp_path / "q8.gguf", "Q8_0")
    ours, _ = load_model(tmp_path / "q8.gguf", quantize="int8")
    assert isinstance(ours.layers[0].attention.wq, QuantizedLinear)
    float_model, _ = load_model(tmp_path / "q8.gguf")
    torch.testing.assert_close(_logits(ours, tokens), _logits(quantize_model(float_model, "int8"), tokens),
                               atol=0, rtol=0)
    assert _max_error(_logits(ours, tokens), _hf_logits(model, tokens)) < 2 * Q8_0_BOUND
