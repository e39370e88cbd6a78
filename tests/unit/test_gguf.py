"""GGUF loading (`tramontane.models.gguf`): detection, every block type, and the errors a bad file gets.

Files are written by `tests/gguf_files.py` (llama.cpp's conventions, through the gguf package) from tiny
random models saved in the Hugging Face layout; `tests/equivalence/test_gguf.py` ties them to transformers.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from tramontane.errors import CheckpointError, ConfigError, TokenizerError
from tramontane.models.checkpoint import detect_format, detect_kind, load_args, load_model, save_model
from tramontane.tokenizer import Tokenizer

from tests.conftest import random_model, tiny_args
from tests.gguf_files import Q, gguf_tensors, write_gguf

ARGS = tiny_args(sliding_window=None)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, dict[str, np.ndarray], dict]:
    """A random model, and its GGUF tensors (float32) and metadata."""
    model = random_model(ARGS, seed=3)
    path = save_model(model, tmp_path_factory.mktemp("hf") / "tiny", format="hf")
    tensors, meta = gguf_tensors(path)
    return model, tensors, meta


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in model.state_dict().items()}


def test_f32_file_is_detected_by_its_magic_and_loads_the_model_exactly(base, tmp_path):
    model, tensors, meta = base
    path = write_gguf(tmp_path / "model.bin", tensors, meta, Q.F32)  # no .gguf suffix: the magic decides
    assert detect_format(path) == "gguf" and detect_kind(path) == "text"
    args = load_args(path)
    assert args.extra == {"max_position_embeddings": 8192}
    args.extra = {}
    assert args == ARGS
    loaded, _ = load_model(path)
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(_state(loaded), _state(model), atol=0, rtol=0)


_BLOCK_TYPES = ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
                "IQ4_XS"]


@pytest.mark.parametrize("kind", _BLOCK_TYPES)
def test_block_types_load_as_the_floats_they_dequantize_to(tmp_path, kind):
    """Random blocks of each type (row length 256, as the K-quants need) load as the same model as an F32
    file of `gguf.quants.dequantize`'s values: byte shapes, block sizes and mixed files (F32 norms,
    a Q6_K head as in Q4_K_M files) are handled for every type."""
    args = tiny_args(sliding_window=None, dim=256, head_dim=64, hidden_dim=256, n_layers=1, vocab_size=32)
    path = save_model(random_model(args), tmp_path / "hf", format="hf")
    tensors, meta = gguf_tensors(path)
    rng = np.random.default_rng(0)
    raw: dict[str, np.ndarray | tuple[np.ndarray, gguf.GGMLQuantizationType]] = {}
    floats: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        qtype = Q.Q6_K if name == "output.weight" else Q[kind]
        if value.ndim == 1:
            raw[name] = floats[name] = value
            continue
        shape = gguf.quants.quant_shape_to_byte_shape(value.shape, qtype)
        data = rng.integers(0, 0x7C, size=shape, dtype=np.uint8)  # < 0x7C: no f16 scale is inf or NaN
        raw[name] = (data, qtype)
        floats[name] = gguf.quants.dequantize(data, qtype).reshape(value.shape)
    quantized, _ = load_model(write_gguf(tmp_path / "q.gguf", raw, meta))
    exact, _ = load_model(write_gguf(tmp_path / "f32.gguf", floats, meta, Q.F32))
    assert quantized.dtype == torch.float32  # dtype None: float32 for a block-quantized file
    torch.testing.assert_close(_state(quantized), _state(exact), atol=0, rtol=0, equal_nan=True)


def test_dtype_argument_and_default_of_a_half_file(base, tmp_path):
    _, tensors, meta = base
    path = write_gguf(tmp_path / "bf16.gguf", tensors, meta, Q.BF16)
    assert load_model(path)[0].dtype == torch.bfloat16
    assert load_model(path, dtype="float32")[0].dtype == torch.float32
    assert load_model(path, dtype=torch.float16)[0].dtype == torch.float16


# --------------------------------------------------------------------------------------------------- errors


def _write(base, path: Path, drop: tuple[str, ...] = (), add: dict | None = None, meta: dict | None = None,
           drop_meta: tuple[str, ...] = (), arch: str = "llama") -> Path:
    _, tensors, metadata = base
    tensors = {k: v for k, v in tensors.items() if k not in drop} | (add or {})
    metadata = {k: v for k, v in metadata.items() if k not in drop_meta} | (meta or {})
    return write_gguf(path, tensors, metadata, Q.F16, arch=arch)


@pytest.mark.parametrize("change, message", [
    ({"arch": "qwen2"}, r"'qwen2' model .*'llama' architecture"),
    ({"drop": ("blk.1.ffn_up.weight",)}, r"missing tensor\(s\) blk\.1\.ffn_up\.weight.*convert_hf_to_gguf"),
    ({"meta": {"llama.feed_forward_length": 100}},
     r"wrong shape\(s\): blk\.0\.ffn_gate\.weight expected shape \[100, 64\], found \[96, 64\]"),
    ({"add": {"rope_freqs.weight": np.ones(8, np.float32)}}, r"unexpected tensor\(s\) rope_freqs\.weight"),
    ({"meta": {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}}, "RoPE scaling"),
    ({"meta": {"llama.rope.dimension_count": 8}}, "rotary"),
    ({"drop_meta": ("llama.attention.layer_norm_rms_epsilon",)}, "no llama.attention.layer_norm_rms_epsilon"),
    ({"meta": {"llama.attention.head_count_kv": [2, 2]}}, "differs between layers"),
    ({"meta": {"llama.vocab_size": 50}}, "llama.vocab_size is 50 but token_embd.weight has 97 rows"),
    ({"meta": {"llama.attention.head_count_kv": 3}}, "invalid llama.* metadata: n_heads=4 must be a multiple"),
    ({"meta": {"split.count": 2}}, "llama-gguf-split --merge"),
    ({"meta": {"llama.expert_count": 4, "llama.expert_used_count": 2, "llama.expert_gating_func": 2}},
     "non-softmax router"),
    ({"add": {"blk.0.attn_norm.weight": (np.ones(64, np.int8), Q.I8)}}, "stored as I8, which .* cannot dequantize"),
], ids=["architecture", "missing-tensor", "wrong-shape", "unexpected-tensor", "rope-scaling", "partial-rotary",
        "missing-metadata", "per-layer-sizes", "vocab-mismatch", "bad-gqa", "split-file", "router", "integer-type"])
def test_bad_file_is_a_checkpoint_error_naming_the_problem(base, tmp_path, change, message):
    path = _write(base, tmp_path / "bad.gguf", **change)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_truncated_and_mislabelled_files(base, tmp_path):
    path = _write(base, tmp_path / "full.gguf")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path / "cut.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_model(tmp_path / "text.gguf")


def test_format_argument_and_folders(base, tmp_path):
    model, _, _ = base
    (tmp_path / "folder").mkdir()
    path = _write(base, tmp_path / "folder" / "model.gguf")
    with pytest.raises(CheckpointError, match=r"pass the \.gguf file itself"):
        load_model(tmp_path / "folder")
    with pytest.raises(ConfigError, match="format='gguf' names a llama.cpp .gguf file"):
        load_model(save_model(model, tmp_path / "c"), format="gguf")
    with pytest.raises(CheckpointError, match="is a GGUF file"):
        load_model(path, format="hf")
    assert load_model(path, format="gguf")[1].dim == ARGS.dim
    with pytest.raises(ConfigError, match="does not write GGUF"):
        save_model(model, tmp_path / "out", format="gguf")


def test_missing_gguf_package_names_the_install(base, tmp_path, monkeypatch):
    path = _write(base, tmp_path / "m.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(CheckpointError, match=r"pip install 'tramontane\[gguf\]'"):
        load_model(path)


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_is_read_from_the_folder_of_the_file(base, tmp_path):
    path = _write(base, tmp_path / "m.gguf")
    with pytest.raises(TokenizerError, match=r"no tokenizer file next to m\.gguf .*tekken\.json or "
                                             r"tokenizer\.model\.v3"):
        Tokenizer.from_model_dir(path)
    shutil.copy(MistralTokenizer.v3().instruct_tokenizer.tokenizer.file_path, tmp_path / "tokenizer.model.v3")
    tokenizer = Tokenizer.from_model_dir(path)
    assert tokenizer.path == tmp_path / "tokenizer.model.v3" and tokenizer.version == "v3"
