"""The llama.cpp side of `benchmarks/generate.py`, run by the python of its own venv (llama-cpp-python built
from source, gguf, numpy, safetensors; no torch).

    python _llamacpp_worker.py convert HF_DIR OUT.gguf {F16,Q8_0,Q4_0}
    python _llamacpp_worker.py run MODEL.gguf PROMPT_LEN NEW_TOKENS

`convert` writes a llama-architecture GGUF from the transformers checkpoint with the `gguf` package: tensor
names as llama.cpp's converter writes them, the rows of q_proj / k_proj permuted back from transformers'
rotate-half layout to the adjacent pairs llama.cpp rotates, norms in F32 and every 2-D weight in the asked
type (token embeddings and output head included, as `convert_hf_to_gguf.py --outtype q8_0` does). The vocabulary
is a placeholder (the benchmark feeds token ids). `run` answers timing rounds as the torch engines do.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def convert(hf_dir: Path, out: Path, kind: str) -> None:
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(hf_dir / "model.safetensors")
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    qtype = {"F16": gguf.GGMLQuantizationType.F16, "Q8_0": gguf.GGMLQuantizationType.Q8_0,
             "Q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]

    def unpermute(w: np.ndarray, heads: int) -> np.ndarray:  # rotate-half rows -> adjacent pairs, per head
        rows, cols = w.shape
        return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tramontane-benchmark")
    writer.add_context_length(config.get("max_position_embeddings", 8192))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    # transformers 5 writes rope_theta under rope_parameters; earlier versions at the top level
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type({"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind])
    vocab = config["vocab_size"]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                           + [gguf.TokenType.NORMAL] * (vocab - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
    for i in range(config["num_hidden_layers"]):
        for hf, ours in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{ours}.weight"
    for hf_name, name in names.items():
        data = tensors[hf_name].astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            data = unpermute(data, n_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = unpermute(data, n_kv)
        if data.ndim == 1:
            writer.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def decode_bytes(path: Path) -> int:
    """Bytes of the tensors a decoded token reads: all but the token embedding table, plus one of its rows."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    total = 0
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            total += int(tensor.n_bytes) // int(tensor.shape[-1])
        else:
            total += int(tensor.n_bytes)
    return total


def run(path: Path, prompt_len: int, new_tokens: int) -> None:
    """Load the GGUF file, read the prompt (JSON token ids) from the first line of stdin, then serve timing
    rounds with `generate.serve_rounds`."""
    from llama_cpp import Llama

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generate import serve_rounds  # stdlib-only at 
    llm = Llama(model_path=str(path), n_ctx=prompt_len + new_tokens + 16, n_batch=prompt_len,
                n_ubatch=prompt_len, n_threads=2, n_threads_batch=2, verbose=False)
    prompt = json.loads(sys.stdin.readline())
    assert len(prompt) == prompt_len and max(prompt) < llm.n_vocab()

    def prefill() -> None:
        llm.reset()
        llm.eval(prompt)

    def decode() -> list[int]:
        llm.reset()
        out = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                  reset=False):
            out.append(int(token))
            if len(out) == new_tokens:
                break
        return out

    serve_rounds(prefill, decode, {"decode_bytes_per_token": decode_bytes(path)})


if __name__ == "__main__":
    if sys.argv[1] == "convert":
        convert(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    else:
        run(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
