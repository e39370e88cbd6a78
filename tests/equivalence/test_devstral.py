"""Devstral-Small checkpoints: Mistral Small 3.1's text decoder (head_dim 128 with dim 5120, so head_dim is
not dim / n_heads = 160; 32 query / 8 key-value heads; RoPE theta 1e9; no sliding window; 128k context;
tekken tokenizer).

The releases (mistralai/Devstral-Small-2505 and -2507) ship both layouts side by side: `params.json` (no
`vision_encoder`: the vision tower was removed) + `consolidated.safetensors` + `tekken.json`, and a Hugging
Face `config.json` of a text-only `MistralForCausalLM` (model_type "mistral", `head_dim` given) with sharded
`model-0000k-of-0000n.safetensors` under `model.*` / `lm_head` names - not Mistral 3's
`Mistral3ForConditionalGeneration`.

The oracle is transformers' `MistralForCausalLM` on tiny random configs of that shape (q projection narrower
than `dim`, head_dim set explicitly, GQA 4:1, theta 1e9, no window), plus the released model's own parameter
count. The tool-call format follows the tokenizer file's version (v7 JSON lists, v11+ `name[ARGS]{...}`), as
mistral_common encodes it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from tests.conftest import random_model
from tests.integration.serve_fixtures import ARGS, CALL_ID, tekken_tokenizer
from tramontane import cli
from tramontane.errors import CheckpointError
from tramontane.generation import SamplingParams, generate
from tramontane.models import ModelArgs, Transformer
from tramontane.models.cache import KVCache
from tramontane.models.checkpoint import (
    args_from_hf_config,
    detect_format,
    detect_kind,
    load_args,
    load_model,
    save_model,
)
from tramontane.serve import protocol as api
from tramontane.serve.loading import load_served_model
from tramontane.serve.prompt import chat_prompt
from tramontane.serve.tools import OutputParser, tool_format

ATOL = 1e-5

# params.json of Devstral-Small-2507 as released (2505 is the same decoder).
RELEASED_PARAMS = {"dim": 5120, "n_layers": 40, "head_dim": 128, "hidden_dim": 32768, "n_heads": 32,
                   "n_kv_heads": 8, "rope_theta": 1e9, "norm_eps": 1e-5, "vocab_size": 131072}
# Its config.json as transformers 4.x writes one for a MistralForCausalLM of this shape (theta at the top
# level, no rope_parameters); the architecture, model_type and sizes are those the release lists.
RELEASED_HF_CONFIG = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 32768, "max_position_embeddings": 131072,
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "rope_theta": 1e9, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 131072,
}
# "total_parameters" in the model.safetensors.index.json of mistralai/Devstral-Small-2507.
RELEASED_PARAMETER_COUNT = 23_572_403_200

# The same shape scaled down 32x: dim 160, 8 query heads of 16 (q is 128 wide; dim / n_heads = 20), 2 kv.
TINY = {"dim": 160, "n_layers": 2, "head_dim": 16, "hidden_dim": 256, "n_heads": 8, "n_kv_heads": 2,
        "norm_eps": 1e-5, "vocab_size": 256, "rope_theta": 1e9}
TINY_ARGS = ModelArgs(**TINY)


def _hf_config() -> MistralConfig:
    return MistralConfig(hidden_size=TINY["dim"], num_hidden_layers=TINY["n_layers"],
                         head_dim=TINY["head_dim"], intermediate_size=TINY["hidden_dim"],
                         num_attention_heads=TINY["n_heads"], num_key_value_heads=TINY["n_kv_heads"],
                         rms_norm_eps=TINY["norm_eps"],
                         vocab_size=TINY["vocab_size"], rope_theta=TINY["rope_theta"], sliding_window=None,
                         max_position_embeddings=131072, tie_word_embeddings=False)


def _hf_model(seed: int = 0, attn: str = "eager") -> MistralForCausalLM:
    """Random weights wider than transformers' init and norms away from one, so that a wrong permutation,
    head_dim or theta moves the logits by O(1)."""
    torch.manual_seed(seed)
    model = MistralForCausalLM(_hf_config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.08)
    model.set_attn_implementation(attn)
    return model.eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory, tokens: torch.Tensor) -> tuple[Path, torch.Tensor]:
    """A directory written by `save_pretrained` and transformers' logits on `tokens`."""
    model = _hf_model()
    path = tmp_path_factory.mktemp("devstral_hf")
    model.save_pretrained(path)
    with torch.no_grad():
        return path, model(tokens).logits


def _logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


# -- the released configs ------------------------------------------------------------------------------------


def test_released_configs_describe_the_released_network(tmp_path: Path) -> None:
    args = ModelArgs.from_params(RELEASED_PARAMS)
    assert args.head_dim == 128 != args.dim // args.n_heads
    assert args.rope_theta == 1e9 and args.sliding_window is None and args.moe is None
    assert not args.tied_embeddings
    # Both files of the release describe the same network, with as many parameters as the release has.
    assert args_from_hf_config(RELEASED_HF_CONFIG) == replace(args, extra={"max_position_embeddings": 131072})
    assert args.num_parameters() == RELEASED_PARAMETER_COUNT
    with torch.device("meta"):
        ours = sum(p.numel() for p in Transformer(args).parameters())
        theirs = sum(p.numel() for p in MistralForCausalLM(MistralConfig(**RELEASED_HF_CONFIG)).parameters())
    assert ours == theirs == RELEASED_PARAMETER_COUNT
    # Neither file makes the folder a vision checkpoint (Mistral Small 3.1 had a vision tower; Devstral not).
    consolidated, hf_dir = tmp_path / "consolidated", tmp_path / "hf"
    for folder, name, content in ((consolidated, "params.json", RELEASED_PARAMS),
                                  (hf_dir, "config.json", RELEASED_HF_CONFIG)):
        folder.mkdir()
        (folder / name).write_text(json.dumps(content))
        assert detect_kind(folder) == "text"
    assert load_args(consolidated) == args


# -- both layouts against transformers -----------------------------------------------------------------------


def test_hf_layout_gives_transformers_logits(hf, tokens) -> None:
    path, expected = hf
    model, args = load_model(path)
    assert (args.dim, args.head_dim, args.n_heads, args.n_kv_heads, args.hidden_dim) == (160, 16, 8, 2, 256)
    assert args.rope_theta == 1e9 and args.sliding_window is None and not args.tied_embeddings
    torch.testing.assert_close(_logits(model, tokens), expected, atol=ATOL, rtol=0)


def test_theta_and_head_dim_change_the_logits(hf, tokens) -> None:
    """Guards the power of the comparisons: theta 1e6 (Mistral 7B v0.2's) instead of 1e9 moves the logits by
    far more than the tolerance, and a config that leaves head_dim out describes another network."""
    path, expected = hf
    model, args = load_model(path)
    other = Transformer(replace(args, rope_theta=1e6))
    other.load_state_dict(model.state_dict())
    assert (_logits(other, tokens) - expected).abs().max() > 0.1
    config = json.loads((path / "config.json").read_text())
    del config["head_dim"]  # transformers would then take hidden_size / heads = 20
    assert args_from_hf_config(config).head_dim == 20
    broken = path.parent / "no_head_dim"
    shutil.copytree(path, broken)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_model(broken)


def test_released_consolidated_layout_gives_transformers_logits(hf, tokens, tmp_path) -> None:
    """A folder in the release's consolidated form, written without our save function: params.json with the
    released keys only, mistral-inference tensor names (q/k rows in the interleaved rotary layout)."""
    path, expected = hf
    model, _ = load_model(path)
    folder = tmp_path / "consolidated"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(TINY))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "consolidated.safetensors"))
    assert detect_format(folder) == "consolidated" and detect_kind(folder) == "text"
    loaded, args = load_model(folder)
    assert args == TINY_ARGS
    torch.testing.assert_close(_logits(loaded, tokens), expected, atol=ATOL, rtol=0)


def test_our_saves_round_trip_in_both_layouts(hf, tokens, tmp_path) -> None:
    path, expected = hf
    model, args = load_model(path)
    consolidated = save_model(model, tmp_path / "consolidated")
    params = json.loads((consolidated / "params.json").read_text())
    assert {k: params[k] for k in TINY} == TINY and "sliding_window" not in params
    reloaded, reloaded_args = load_model(consolidated)
    assert reloaded_args == args
    assert torch.equal(_logits(reloaded, tokens), _logits(model, tokens))

    hf_out = save_model(model, tmp_path / "hf", format="hf")
    config = json.loads((hf_out / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["head_dim"] == 16
    assert config["sliding_window"] is None and config["rope_parameters"]["rope_theta"] == 1e9
    theirs = AutoModelForCausalLM.from_pretrained(hf_out, attn_implementation="eager").eval()
    assert isinstance(theirs, MistralForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, expected, atol=ATOL, rtol=0)


def test_sharded_hf_layout_and_a_folder_holding_both(tokens, tmp_path) -> None:
    """The Devstral-Small-2507 repository holds both layouts, the HF one in shards: each loads when chosen,
    and the folder alone is refused as ambiguous rather than guessed."""
    hf_model = _hf_model(seed=1)
    folder = tmp_path / "both"
    hf_model.save_pretrained(folder, max_shard_size="300KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*"))) > 1
    from_hf, _ = load_model(folder, format="hf")
    with torch.no_grad():
        expected = hf_model(tokens).logits
    torch.testing.assert_close(_logits(from_hf, tokens), expected, atol=ATOL, rtol=0)
    written = save_model(from_hf, tmp_path / "consolidated")
    for name in ("params.json", "consolidated.safetensors"):
        shutil.copy(written / name, folder / name)
    with pytest.raises(CheckpointError, match="pass format='consolidated' or format='hf'"):
        detect_format(folder)
    from_consolidated, _ = load_model(folder, format="consolidated")
    torch.testing.assert_close(_logits(from_consolidated, tokens), expected, atol=ATOL, rtol=0)


# -- generation and long context -----------------------------------------------------------------------------


def test_greedy_generation_matches_transformers(hf) -> None:
    path, _ = hf
    ours, _ = load_model(path)
    theirs = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, TINY["vocab_size"], (n,), generator=gen).tolist() for n in (11, 3, 17)]
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = theirs.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    for chunk in (None, 4):
        batched = generate(ours, prompts, SamplingParams(max_tokens=8), chunk_size=chunk)
        assert [c.tokens for c in batched] == expected


def _from_hf_state(state: dict[str, torch.Tensor], folder: Path) -> Transformer:
    """Our model from a transformers state dict, through the HF loader (a folder on disk)."""
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(_hf_config().to_dict()))
    model, _ = load_model(folder)
    return model


def test_theta_at_long_positions_through_the_cache(tmp_path: Path) -> None:
    """Past position 5000: our chunked prefill into the KV cache, then single-token decoding, give
    transformers' one-shot forward over the whole sequence. The same weights with theta 1e6, or with the
    4096-token window transformers' MistralConfig assumes when config.json names none, are far off, so the
    comparison sees both (RoPE is relative: what is tested is keys up to 5000 positions back)."""
    hf_model = _hf_model(seed=2, attn="sdpa")  # eager would materialise 5000 x 5000 scores per head
    prefill, decoded, chunk, shown = 5000, 4, 1024, 8
    length = prefill + decoded
    tokens = torch.randint(0, TINY["vocab_size"], (1, length), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf_model(tokens).logits[0, prefill - shown:]  # the last prefilled positions, then decoded
    ours = _from_hf_state(hf_model.state_dict(), tmp_path / "hf")

    def run(model: Transformer) -> torch.Tensor:
        cache = KVCache(model.args, 1, length)
        positions = torch.arange(length)[None]
        out = []
        with torch.no_grad():
            for start in range(0, prefill, chunk):
                piece = slice(start, min(start + chunk, prefill))
                logits = model(tokens[:, piece], positions[:, piece], cache)
            out.append(logits[0, -shown:])
            for p in range(prefill, length):
                out.append(model(tokens[:, p:p + 1], positions[:, p:p + 1], cache)[0])
        return torch.cat(out).float()

    torch.testing.assert_close(run(ours), expected, atol=ATOL, rtol=0)
    for change in ({"rope_theta": 1e6}, {"sliding_window": 4096}):
        other = Transformer(replace(ours.args, **change))
        other.load_state_dict(ours.state_dict())
        assert (run(other) - expected).abs().max() > 0.1, change


# -- the tool-call format follows the tokenizer file ---------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "str_replace_editor", "description": "view or edit a file",
    "parameters": {"type": "object",
                   "properties": {"command": {"type": "string"}, "path": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def devstral_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small Devstral-shaped consolidated checkpoint (head_dim 8 with dim 40, GQA 4:1, theta 1e9, no
    window) beside a tekken.json of each version: the same vocabulary and control tokens ([ARGS] and
    [CALL_ID] included), only `config.version` differs."""
    root = tmp_path_factory.mktemp("devstral_tools")
    tokenizers = {version: tekken_tokenizer(version, root / "tokenizers" / version / "tekken.json")
                  for version in ("v7", "v11", "v13")}
    args = replace(TINY_ARGS, vocab_size=tokenizers["v7"].vocab_size, dim=40, n_heads=4, n_kv_heads=1,
                   head_dim=8, hidden_dim=64, n_layers=1)
    model = random_model(args, seed=6)
    folders = {}
    for version, tokenizer in tokenizers.items():
        folders[version] = save_model(model, root / version)
        shutil.copy(tokenizer.path, folders[version] / "tekken.json")
    return folders


@pytest.mark.parametrize("version", ["v7", "v11", "v13"])
def test_tool_format_follows_the_tokenizer_version(devstral_folders, version: str) -> None:
    served = load_served_model(devstral_folders[version])
    assert served.tokenizer.version == version
    call = {"id": "call_1", "type": "function",
            "function": {"name": "str_replace_editor", "arguments": '{"command": "view", "path": "a.py"}'}}
    request = api.ChatCompletionRequest.model_validate({"model": served.name, "tools": TOOLS, "messages": [
        {"role": "system", "content": "You are Devstral."}, {"role": "user", "content": "Fix the bug."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "def f(): pass"}]})
    prompt = chat_prompt(served, request)
    fmt = prompt.tool_format
    assert fmt is not None and fmt.version == int(version[1:]) and fmt == tool_format(served.tokenizer)
    # The oracle: how mistral_common itself wrote the earlier call into the prompt for this file.
    written_with_args = ARGS in prompt.tokens
    assert fmt.json_list == (not written_with_args) == (version == "v7")
    assert (CALL_ID in prompt.tokens) == (version == "v11")  # only v11 writes the call's id this way
    # And the model's own reply in that format parses back into the call.
    start = prompt.tokens.index(fmt.tool_calls)
    reply = prompt.tokens[start: prompt.tokens.index(served.tokenizer.eos_id, start)]
    parser = OutputParser(served.tokenizer, fmt)
    parser.feed(reply)
    parser.finish()
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [
        ("str_replace_editor", {"command": "view", "path": "a.py"})]
    assert parser.content == ""


def test_serve_and_the_cli_load_a_folder_holding_both_layouts(devstral_folders, tmp_path: Path, capsys) -> None:
    """A whole Devstral download (params.json and config.json side by side) is served and run with `format`
    / `--format`; without it the error says how to choose."""
    folder = shutil.copytree(devstral_folders["v13"], tmp_path / "devstral")
    model, _ = load_model(folder)
    hf_out = save_model(model, tmp_path / "hf", format="hf")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_out / name, folder / name)
    with pytest.raises(CheckpointError, match="format"):
        load_served_model(folder)
    for layout in ("consolidated", "hf"):
        served = load_served_model(folder, format=layout)
        assert served.tokenizer.version == "v13"
        # the served model's linear layers may run packed for oneDNN: equal to float rounding
        torch.testing.assert_close(_logits(served.model, torch.arange(6)[None]),
                                   _logits(model, torch.arange(6)[None]), rtol=1e-5, atol=1e-5)
    assert cli.main(["generate", "--model", str(folder), "--prompt", "def f(", "--max-tokens", "2"]) == 2
    assert "--format consolidated|hf" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(folder), "--format", "hf", "--prompt", "def f(",
                     "--max-tokens", "2", "--json"]) == 0
