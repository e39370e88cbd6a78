"""tramontane.tokenizer against mistral_common itself (the oracle), on the tokenizers it ships.

The adapter is given plain dicts; the oracle is given mistral_common's own message/tool objects and
called directly, so a conversion that drops, reorders or rewrites anything shows up as different ids.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from tramontane.errors import TokenizerError
from tramontane.tokenizer import BUILTIN_VERSIONS, Tokenizer

ORACLES = {
    "v1": MistralTokenizer.v1,
    "v3": MistralTokenizer.v3,
    "v7": MistralTokenizer.v7,
    "v3-tekken": lambda: MistralTokenizer.v3(is_tekken=True),
}
VERSIONS = list(ORACLES)
TOOL_VERSIONS = ["v3", "v7", "v3-tekken"]


@functools.cache
def ours(version: str) -> Tokenizer:
    return Tokenizer.builtin(version)


@functools.cache
def oracle(version: str) -> MistralTokenizer:
    return ORACLES[version]()


def shipped_file(version: str) -> Path:
    return Path(oracle(version).instruct_tokenizer.tokenizer.file_path)


# -- chat --------------------------------------------------------------------------------------------------

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "I am a bot."},
    {"role": "user", "content": "What is 2+2? Réponds en français 🙂"},
]
CHAT_ORACLE = [
    SystemMessage(content="You are terse."),
    UserMessage(content="Hello, who are you?"),
    AssistantMessage(content="I am a bot."),
    UserMessage(content="What is 2+2? Réponds en français 🙂"),
]

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                           "parameters": WEATHER_PARAMS}}]
TOOL_CHAT = [
    {"role": "system", "content": "Use tools when useful."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call12345", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": '{"temp_c": 21}'},
    {"role": "assistant", "content": "21 °C in Paris."},
    {"role": "user", "content": "And in Lyon?"},
]
TOOLS_ORACLE = [Tool(function=Function(name="get_weather", description="Current weather",
                                       parameters=WEATHER_PARAMS))]
TOOL_CHAT_ORACLE = [
    SystemMessage(content="Use tools when useful."),
    UserMessage(content="Weather in Paris?"),
    AssistantMessage(tool_calls=[
        ToolCall(id="call12345", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))]),
    ToolMessage(tool_call_id="call12345", name="get_weather", content='{"temp_c": 21}'),
    AssistantMessage(content="21 °C in Paris."),
    UserMessage(content="And in Lyon?"),
]


@pytest.mark.parametrize("version", VERSIONS)
def test_chat_equals_mistral_common(version: str) -> None:
    expected = oracle(version).encode_chat_completion(ChatCompletionRequest(messages=CHAT_ORACLE)).tokens
    assert ours(version).encode_chat(CHAT) == expected
    assert ours(version).encode_chat(CHAT_ORACLE) == expected  # mistral_common objects are accepted too
    assert "terse" in ours(version).decode(expected)  # the system prompt is in there, somewhere


@pytest.mark.parametrize("version", TOOL_VERSIONS)
def test_chat_with_tools_equals_mistral_common(version: str) -> None:
    request = ChatCompletionRequest(messages=TOOL_CHAT_ORACLE, tools=TOOLS_ORACLE)
    expected = oracle(version).encode_chat_completion(request).tokens
    # The conversation really exercises tools: definition, call id and result are all in the prompt.
    text = oracle(version).decode(expected, special_token_policy=SpecialTokenPolicy.KEEP)
    assert "get_weather" in text and "call12345" in text and "temp_c" in text and "[TOOL_CALLS]" in text
    assert ours(version).encode_chat(TOOL_CHAT, tools=TOOLS) == expected


def test_pinned_chat_ids() -> None:
    # Measured with mistral_common 1.13.1 (shared/reference/model-family.md section 7): guards against a
    # template change in a new mistral_common release going unnoticed.
    chat = [
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "I am a bot."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    spm = [1, 3, 23325, 29493, 1461, 1228, 1136, 29572, 4, 1083, 1605, 1032, 13203, 29491, 2, 3, 2592, 1117,
           29473, 29518, 29574, 29518, 29572, 4]
    tekken = [1, 3, 22177, 1044, 2274, 1584, 1636, 1063, 4, 1073, 1855, 1261, 14988, 1046, 2, 3, 7493, 1395,
              1032, 1050, 1043, 1050, 1063, 4]
    assert ours("v3").encode_chat(chat) == spm
    assert ours("v7").encode_chat(chat) == spm
    assert ours("v3-tekken").encode_chat(chat) == tekken


def test_chat_errors_are_tokenizer_errors() -> None:
    with pytest.raises(TokenizerError, match="Tools not implemented"):
        ours("v1").encode_chat(TOOL_CHAT, tools=TOOLS)
    with pytest.raises(TokenizerError, match="bogus"):
        ours("v3").encode_chat([{"role": "bogus", "content": "x"}])
    with pytest.raises(TokenizerError, match="at least one message"):
        ours("v3").encode_chat([])


def test_encode_chat_full_returns_mistral_common_result() -> None:
    full = ours("v3-tekken").encode_chat_full(CHAT)
    assert full.tokens == ours("v3-tekken").encode_chat(CHAT)
    assert full.images == [] and full.audios == []


def test_encode_chat_refuses_to_drop_images() -> None:
    pytest.importorskip("cv2", reason="mistral_common needs opencv for images (mistral-common[opencv])")
    from mistral_common.protocol.instruct.messages import ImageChunk, TextChunk
    from PIL import Image

    message = UserMessage(content=[TextChunk(text="Describe"), ImageChunk(image=Image.new("RGB", (70, 40)))])
    tok = Tokenizer.builtin("v7-mm")
    assert len(tok.encode_chat_full([message]).images) == 1
    with pytest.raises(TokenizerError, match="encode_chat_full"):
        tok.encode_chat([message])


# -- text, decode, streaming -------------------------------------------------------------------------------

TEXTS = [
    "Hello world",
    "Héllo wörld, ça va? Grüße aus Köln",
    "emoji 🤖👩‍💻 and CJK 日本語のテキスト, rare ꙮ𓀀",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "[INST] looks like a control token [/INST] </s>",
]


@pytest.mark.parametrize("version", VERSIONS)
def test_encode_decode_round_trip(version: str) -> None:
    tok, raw = ours(version), oracle(version).instruct_tokenizer.tokenizer
    for text in TEXTS:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids == raw.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.encode(text, bos=False) == ids[1:-1]
        assert tok.decode(ids) == text
    # Control-token names in user text stay text: no id in the control range.
    lookalike = tok.encode(TEXTS[-1], bos=False)
    assert tok.bos_id not in lookalike and tok.eos_id not in lookalike


@pytest.mark.parametrize("version", VERSIONS)
def test_decode_keeps_control_tokens_on_request(version: str) -> None:
    tok = ours(version)
    ids = tok.encode_chat(CHAT[1:])
    assert "<s>" not in tok.decode(ids) and tok.decode(ids, keep_special=True).startswith("<s>")
    if version != "v1":  # v1 spells [INST] with ordinary sub-word tokens
        assert "[INST]" not in tok.decode(ids) and "[INST]" in tok.decode(ids, keep_special=True)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_decoding_concatenates_to_full_decode(version: str, chunk: int) -> None:
    tok = ours(version)
    for text in TEXTS:
        ids = tok.encode(text, bos=True)
        decoder = tok.incremental_decoder()
        deltas = [decoder.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
        deltas.append(decoder.flush())
        assert "".join(deltas) == tok.decode(ids)
        assert not any("\ufffd" in d for d in deltas)  # split multi-byte characters were held back


@pytest.mark.parametrize("version", VERSIONS)
def test_incremental_decoding_after_a_prompt_keeps_the_space(version: str) -> None:
    tok = ours(version)
    prompt = tok.encode("The capital of France is")
    generated = tok.encode("The capital of France is Paris, 🗼 «la tour»", bos=True)[len(prompt) :]
    decoder = tok.incremental_decoder(context=prompt)
    streamed = "".join(decoder.push([i]) for i in generated) + decoder.flush()
    assert tok.decode(prompt) + streamed == tok.decode(prompt + generated)
    assert streamed.startswith(" Paris")
    if not tok.is_tekken:  # the failure mode the context exists for: sentencepiece drops the space
        assert not tok.decode(generated).startswith(" ")


def test_incremental_decoder_holds_an_unfinished_character() -> None:
    tok = ours("v1")
    ids = tok.encode("🤖", bos=False)  # "▁" + four byte tokens
    decoder = tok.incremental_decoder()
    assert [decoder.push([i]) for i in ids] == ["", "", "", "", "🤖"]
    decoder = tok.incremental_decoder()
    assert decoder.push(ids[:3]) == "" and decoder.flush() == "\ufffd\ufffd"


# -- vocabulary properties ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("version", "name", "tekken", "vocab", "pad"),
    [("v1", "v1", False, 32000, None), ("v3", "v3", False, 32768, None), ("v7", "v7", False, 32768, None),
     ("v3-tekken", "v3", True, 131072, 11)],
)
def test_properties(version: str, name: str, tekken: bool, vocab: int, pad: int | None) -> None:
    tok, raw = ours(version), oracle(version).instruct_tokenizer.tokenizer
    assert (tok.version, tok.is_tekken, tok.vocab_size, tok.pad_id) == (name, tekken, vocab, pad)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (raw.bos_id, raw.eos_id, raw.n_words) == (1, 2, vocab)
    assert tok.path == shipped_file(version)


def test_builtin_names() -> None:
    assert {"v1", "v2", "v3", "v3-tekken", "v3-tekken-mm", "v7", "v7-mm"} <= set(BUILTIN_VERSIONS)
    assert Tokenizer.builtin("v7-mm").path.name.endswith(".v7m1")
    with pytest.raises(TokenizerError, match="v3-tekken"):
        Tokenizer.builtin("v99")


# -- finding and loading files -----------------------------------------------------------------------------

def test_from_file_and_from_model_dir(tmp_path: Path) -> None:
    spm = tmp_path / "consolidated_spm"
    spm.mkdir()
    shutil.copy(shipped_file("v3"), spm / "tokenizer.model.v3")
    (spm / "params.json").write_text("{}")
    assert Tokenizer.from_model_dir(spm).path == spm / "tokenizer.model.v3"
    assert Tokenizer.from_model_dir(spm).encode_chat(CHAT) == ours("v3").encode_chat(CHAT)

    tek = tmp_path / "hf_tekken"
    tek.mkdir()
    shutil.copy(shipped_file("v3-tekken"), tek / "tekken.json")
    (tek / "tokenizer.json").write_text("{}")  # a Hugging Face fast tokenizer is not a candidate
    loaded = Tokenizer.from_model_dir(str(tek))
    assert loaded.is_tekken and loaded.encode(TEXTS[2]) == ours("v3-tekken").encode(TEXTS[2])


def test_versioned_file_wins_over_bare_tokenizer_model(tmp_path: Path) -> None:
    # HF repos of v3 models ship the legacy `tokenizer.model` next to `tokenizer.model.v3`;
    # mistral_common would read the bare one as v1.
    shutil.copy(shipped_file("v1"), tmp_path / "tokenizer.model")
    assert Tokenizer.from_model_dir(tmp_path).version == "v1"
    shutil.copy(shipped_file("v3"), tmp_path / "tokenizer.model.v3")
    assert Tokenizer.from_model_dir(tmp_path).version == "v3"


def test_model_dir_without_or_with_several_tokenizers(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"tekken\*\.json.*tokenizer\.model") as info:
        Tokenizer.from_model_dir(tmp_path)
    assert str(tmp_path) in str(info.value)

    (tmp_path / "tokenizer.model.v3").write_bytes(b"")
    (tmp_path / "tekken.json").write_text("{}")
    with pytest.raises(TokenizerError, match="several") as info:
        Tokenizer.from_model_dir(tmp_path)
    assert "tekken.json" in str(info.value) and "tokenizer.model.v3" in str(info.value)

    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_model_dir(tmp_path / "missing")


def test_missing_unrecognised_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_file(tmp_path / "tekken.json")
    with pytest.raises(TokenizerError, match="from_model_dir"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerError, match="vocab.txt"):
        Tokenizer.from_file(tmp_path / "vocab.txt")

    garbage = tmp_path / "tokenizer.model.v3"
    garbage.write_bytes(b"\x00not a sentencepiece model\xff" * 8)
    with pytest.raises(TokenizerError, match="could not parse") as info:
        Tokenizer.from_file(garbage)
    assert str(garbage) in str(info.value) and info.value.__cause__ is not None

    truncated = tmp_path / "tekken_truncated.json"
    truncated.write_bytes(shipped_file("v3-tekken").read_bytes()[:4096])
    with pytest.raises(TokenizerError, match="JSONDecodeError"):
        Tokenizer.from_file(truncated)

    bad_version = tmp_path / "tekken.json"
    bad_version.write_text('{"config": {"version": "v99"}, "vocab": []}')
    with pytest.raises(TokenizerError, match="Unknown version"):
        Tokenizer.from_file(bad_version)

    only_corrupt = tmp_path / "dir"
    only_corrupt.mkdir()
    shutil.copy(garbage, only_corrupt / garbage.name)
    with pytest.raises(TokenizerError, match="could not parse"):
        Tokenizer.from_model_dir(only_corrupt)
