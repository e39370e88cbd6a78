"""The serving layer's pieces that need no server: tool calls in model output (parsed and streamed for every
tokenizer format, on the token sequences mistral_common itself encodes, and on the outputs that broke vLLM's
parser), tool-call ids, stop strings, and OpenAI messages -> mistral_common prompts."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest

from tests.conftest import random_model, tiny_args
from tests.integration.serve_fixtures import tekken_tokenizer
from tramontane.errors import GenerationError
from tramontane.serve import protocol as api
from tramontane.serve.loading import ServedModel
from tramontane.serve.prompt import chat_prompt
from tramontane.serve.serving import StopStrings
from tramontane.serve.tools import (
    CALL_ID_PATTERN,
    CallIds,
    OutputParser,
    ToolFormat,
    forced_call_prefix,
    merge_calls,
    mistral_call_id,
    tool_format,
)
from tramontane.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CALLS = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": 'Rome "}" x', "days": [1, {"a": 2}]})]


@functools.cache
def load(version: str) -> Tokenizer:
    """A tokenizer of each version, loaded once (tekken files take a second or two)."""
    if version in ("v11", "v13"):
        with tempfile.TemporaryDirectory() as folder:  # the file is read once, when loading
            return tekken_tokenizer(version, Path(folder) / "tekken.json")
    return Tokenizer.builtin(version)


@pytest.fixture(params=["v3", "v7", "v3-tekken", "v11", "v13"])
def tokenizer(request) -> Tokenizer:
    return load(request.param)


def _ids():
    counter = iter(range(10_000))
    return lambda: f"call{next(counter):05d}"


def assistant_tokens(tokenizer: Tokenizer, calls=CALLS) -> list[int]:
    """The tokens mistral_common writes for an assistant turn with `calls` (what the model was trained on)."""
    messages = [{"role": "user", "content": "weather?"}]
    prompt = tokenizer.encode_chat(messages, TOOLS)
    ids = [f"abcDEF{i:03d}" for i in range(len(calls))]
    tool_calls = [{"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                  for i, (n, a) in zip(ids, calls)]
    turn = messages + [{"role": "assistant", "tool_calls": tool_calls}] + [
        {"role": "tool", "tool_call_id": i, "content": "ok"} for i in ids]
    full = tokenizer.encode_chat(turn, TOOLS)
    assert full[: len(prompt)] == prompt
    rest = full[len(prompt):]
    return rest[: rest.index(tokenizer.eos_id)]


def parse(tokenizer: Tokenizer, tokens: list[int], fmt: ToolFormat | None = None, step: int = 1, **kwargs):
    parser = OutputParser(tokenizer, fmt if fmt is not None else tool_format(tokenizer), new_id=_ids(), **kwargs)
    deltas = [parser.feed(tokens[i: i + step]) for i in range(0, len(tokens), step)] + [parser.finish()]
    return parser, deltas


def test_each_format_parses_what_mistral_common_encodes(tokenizer: Tokenizer) -> None:
    tokens = assistant_tokens(tokenizer)
    parser, deltas = parse(tokenizer, tokens)
    assert parser.content == ""
    calls = parser.calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == CALLS
    # OpenAI's streaming shape: per call, a first delta with id and name, then argument text pieces.
    for index in range(len(CALLS)):
        mine = [c for d in deltas for c in d.calls if c.index == index]
        assert mine[0].id is not None and mine[0].name == "get_weather" and mine[0].arguments == ""
        assert all(c.id is None and c.name is None for c in mine[1:])
        assert len(mine) > 2, "arguments stream in pieces, not in one block at the end"
    # Token by token or all at once: the same calls.
    whole, _ = parse(tokenizer, tokens, step=len(tokens))
    assert [(c.name, c.arguments) for c in whole.calls] == [(c.name, c.arguments) for c in calls]


def test_arguments_stream_before_the_output_ends(tokenizer: Tokenizer) -> None:
    # vLLM #20028: with tool_choice auto a streamed call only appeared (broken) at the end. Here the header
    # and argument text come while the call is being generated, after any content before it.
    fmt = tool_format(tokenizer)
    assert fmt is not None
    tokens = tokenizer.encode("Sure, let me check.", bos=False) + assistant_tokens(tokenizer, CALLS[:1])
    parser, deltas = parse(tokenizer, tokens)
    assert parser.content == "Sure, let me check."
    first_call = next(i for i, d in enumerate(deltas) if d.calls)
    assert "".join(d.content for d in deltas[:first_call]) == "Sure, let me check."
    before_end = [c for d in deltas[:-1] for c in d.calls if c.arguments]
    assert "".join(c.arguments for c in before_end).startswith('{"city"')
    assert json.loads(parser.calls[0].arguments) == {"city": "Paris"}


@pytest.mark.parametrize("version", ["v3", "v7", "v3-tekken"])
def test_repeated_call_lists_are_all_calls(version: str) -> None:
    # vLLM #11097: models write several `[TOOL_CALLS] [...]` lists, with a blank line between and the same
    # id twice; every call counts and each gets its own id.
    tokenizer = load(version)
    fmt = tool_format(tokenizer)
    assert fmt is not None
    tokens = []
    for city in ("Paris", "Rome"):
        text = json.dumps([{"arguments": {"city": city}, "name": "get_weather", "id": "fgGIFgbG4"}])
        tokens += [fmt.tool_calls, *tokenizer.encode(" " + text + "\n\n", bos=False)]
    parser, _ = parse(tokenizer, tokens)
    calls = parser.calls
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert len({c.id for c in calls}) == 2  # arguments came before the name: sent once the name is known


@pytest.mark.parametrize("call, arguments", [
    ({"name": "f", "arguments": '{"a": 1}'}, '{"a": 1}'),  # arguments as a JSON string holding the JSON
    ({"name": "f", "arguments": None}, "{}"),
    ({"name": "f"}, "{}"),
    ({"arguments": {"a": [1, "]"]}, "name": "f"}, '{"a": [1, "]"]}'),
])
def test_json_list_argument_forms(call: dict, arguments: str) -> None:
    tokenizer = load("v3-tekken")
    fmt = tool_format(tokenizer)
    assert fmt is not None
    parser, _ = parse(tokenizer, [fmt.tool_calls, *tokenizer.encode(json.dumps([call]), bos=False)])
    assert [(c.name, c.arguments) for c in parser.calls] == [("f", arguments)]


def test_text_naming_the_control_token_is_content(tokenizer: Tokenizer) -> None:
    text = 'I would write [TOOL_CALLS] [{"name": "x"}] here'
    parser, _ = parse(tokenizer, tokenizer.encode(text, bos=False))
    assert parser.calls == [] and parser.content == text


def test_a_call_cut_off_keeps_its_partial_arguments(tokenizer: Tokenizer) -> None:
    tokens = assistant_tokens(tokenizer, CALLS[:1])
    text = tokenizer.decode(tokens, keep_special=True)
    cut = next(i for i in range(len(tokens)) if '"Par' in tokenizer.decode(tokens[: i + 1]))
    parser, _ = parse(tokenizer, tokens[: cut + 1])
    [call] = parser.calls
    assert call.name == "get_weather" and call.arguments.startswith('{"city": "Par')
    assert '{"city": "Paris"}'.startswith(call.arguments) and call.arguments != '{"city": "Paris"}'
    assert parser.content == "", text


def test_cut_off_before_the_name_is_content() -> None:
    tokenizer = load("v3-tekken")
    fmt = tool_format(tokenizer)
    assert fmt is not None
    parser, _ = parse(tokenizer, [fmt.tool_calls, *tokenizer.encode('[{"name": "get_w', bos=False)])
    assert parser.calls == [] and parser.content == '[{"name": "get_w'


def test_not_a_call_list_is_content(tokenizer: Tokenizer) -> None:
    fmt = tool_format(tokenizer)
    assert fmt is not None
    if fmt.json_list:
        tokens = [fmt.tool_calls, *tokenizer.encode("hello there", bos=False)]
    else:  # no [ARGS] before the end: the name was text
        tokens = [fmt.tool_calls, *tokenizer.encode("hello there", bos=False)]
    parser, _ = parse(tokenizer, tokens)
    assert parser.calls == [] and parser.content.strip() == "hello there"


def test_v11_text_after_the_arguments_is_not_arguments() -> None:
    tokenizer = load("v11")
    fmt = tool_format(tokenizer)
    assert fmt is not None and fmt.args is not None
    tokens = [fmt.tool_calls, *tokenizer.encode("grep", bos=False), fmt.args,
              *tokenizer.encode(' {"pattern": "}{"}\n\nLet me search.', bos=False)]
    parser, _ = parse(tokenizer, tokens)
    assert [(c.name, c.arguments) for c in parser.calls] == [("grep", '{"pattern": "}{"}')]


def test_parallel_tool_calls_false_keeps_the_first(tokenizer: Tokenizer) -> None:
    parser, deltas = parse(tokenizer, assistant_tokens(tokenizer), max_calls=1)
    assert [json.loads(c.arguments) for c in parser.calls] == [{"city": "Paris"}]
    assert {c.index for d in deltas for c in d.calls} == {0}


def test_forced_call_opening_names_the_function(tokenizer: Tokenizer) -> None:
    fmt = tool_format(tokenizer)
    assert fmt is not None
    opening = forced_call_prefix(tokenizer, fmt, "get_weather")
    arguments = '{"city": "Oslo"}' + ("}]" if fmt.json_list else "")
    parser = OutputParser(tokenizer, fmt, new_id=_ids())
    first = parser.feed(opening)
    assert first.calls and first.calls[0].name == "get_weather"  # the header goes out with the opening
    parser.feed(tokenizer.encode(arguments, bos=False))
    parser.finish()
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [("get_weather", {"city": "Oslo"})]
    assert forced_call_prefix(tokenizer, fmt) == [fmt.tool_calls]


def test_v1_has_no_tool_format() -> None:
    assert tool_format(load("v1")) is None
    assert tool_format(load("v3")) == ToolFormat(3, 5)


def test_call_ids_map_to_mistral_format_and_back() -> None:
    assert mistral_call_id("abcDEF123") == "abcDEF123"
    mapped = mistral_call_id("call_9F3kq2LxYzWvB8sT0pAeRmN")
    assert CALL_ID_PATTERN.match(mapped) and mapped == mistral_call_id("call_9F3kq2LxYzWvB8sT0pAeRmN")
    assert mapped != mistral_call_id("call_9F3kq2LxYzWvB8sT0pAeRmM")
    ids = CallIds()
    assert ids.to_mistral("call_1") == mistral_call_id("call_1")
    assert ids.to_client(mistral_call_id("call_1")) == "call_1"
    assert ids.restore(f"Unexpected tool call id {mistral_call_id('call_1')}") == "Unexpected tool call id call_1"
    ids.to_mistral("abcDEF123")
    with pytest.raises(GenerationError, match="same 9-character id"):
        ids._client[mistral_call_id("call_2")] = "someone else"
        ids.to_mistral("call_2")


def test_merge_calls_by_index() -> None:
    from tramontane.serve.tools import CallDelta

    deltas = [CallDelta(0, "a", "f"), CallDelta(1, "b", "g"), CallDelta(0, arguments='{"x"'),
              CallDelta(1, arguments="{}"), CallDelta(0, arguments=": 1}")]
    assert [(c.id, c.name, c.arguments) for c in merge_calls(deltas)] == [("a", "f", '{"x": 1}'),
                                                                          ("b", "g", "{}")]


def test_stop_strings_hold_back_and_cut() -> None:
    stops = StopStrings(["END", "\n\n"])
    out, hit = stops.push("abc E")
    assert (out, hit) == ("abc", False)  # "E" might begin "END"
    out, hit = stops.push("N")
    assert (out, hit) == (" ", False)
    out, hit = stops.push("Dxyz")
    assert (out, hit) == ("", True)
    stops = StopStrings(["END"])
    assert stops.push("abcdef") == ("abcd", False) and stops.flush() == "ef"
    assert StopStrings([]).push("anything") == ("anything", False)


# -- OpenAI messages -> mistral_common ------------------------------------------------------------------------


def served(tokenizer: Tokenizer) -> ServedModel:
    model = random_model(tiny_args(vocab_size=tokenizer.vocab_size, dim=16, head_dim=8, n_layers=1))
    return ServedModel("text", model, model, tokenizer, "tiny")


@pytest.mark.parametrize("version", ["v3", "v7"])
def test_openai_tool_round_trip_prompt_equals_mistral_common(version: str) -> None:
    tokenizer = load(version)
    long_id = "call_9F3kq2LxYzWvB8sT0pAeRmN"
    request = api.ChatCompletionRequest.model_validate({
        "model": "tiny", "tools": TOOLS, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": long_id, "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": long_id, "content": "sunny"}]})
    prompt = chat_prompt(served(tokenizer), request)
    mapped = mistral_call_id(long_id)
    expected = tokenizer.encode_chat([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": mapped, "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": mapped, "content": "sunny"}], TOOLS)
    assert prompt.tokens == expected and prompt.forced == [] and prompt.tool_format is not None


def test_tool_choice_none_leaves_the_tools_out_and_required_opens_a_call() -> None:
    tokenizer = load("v3")
    base = {"model": "tiny", "tools": TOOLS, "messages": [{"role": "user", "content": "hi"}]}
    none = chat_prompt(served(tokenizer), api.ChatCompletionRequest.model_validate({**base, "tool_choice": "none"}))
    assert none.tokens == tokenizer.encode_chat([{"role": "user", "content": "hi"}]) and none.tool_format is None
    required = chat_prompt(served(tokenizer),
                           api.ChatCompletionRequest.model_validate({**base, "tool_choice": "required"}))
    assert required.tokens == tokenizer.encode_chat([{"role": "user", "content": "hi"}], TOOLS) + [5]


def test_unknown_tool_result_id_names_the_clients_id() -> None:
    tokenizer = load("v11")  # v11+ validators pair tool results with calls
    request = api.ChatCompletionRequest.model_validate({"model": "tiny", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "call_one", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_two", "content": "x"}]})
    with pytest.raises(api.ApiError) as err:
        chat_prompt(served(tokenizer), request)
    assert err.value.status == 400 and "call_two" in err.value.message


def test_images_to_a_text_model_and_remote_urls_are_refused() -> None:
    tokenizer = load("v3")
    request = api.ChatCompletionRequest.model_validate({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]})
    with pytest.raises(api.ApiError, match="does not read images"):
        chat_prompt(served(tokenizer), request)


# -- what a checkpoint folder holds ---------------------------------------------------------------------------


@pytest.mark.parametrize("config, kind", [
    ({"params.json": {"dim": 8}}, "text"),
    ({"params.json": {"dim": 8, "moe": {"num_experts": 2, "num_experts_per_tok": 1}}}, "text"),
    ({"params.json": {"dim": 8, "vision_encoder": {}}}, "vision"),
    ({"params.json": {"dim": 8, "multimodal": {"whisper_model_args": {}}}}, "audio"),
    ({"config.json": {"model_type": "mistral"}}, "text"),
    ({"config.json": {"model_type": "mixtral"}}, "text"),
    ({"config.json": {"model_type": "llava"}}, "vision"),
    ({"config.json": {"model_type": "mistral3"}}, "vision"),
    ({"config.json": {"model_type": "voxtral"}}, "audio"),
    ({"config.json": {"architectures": ["Mistral3ForConditionalGeneration"]}}, "vision"),
])
def test_detect_kind(tmp_path: Path, config: dict, kind: str) -> None:
    from tramontane.models.checkpoint import detect_kind

    for name, content in config.items():
        (tmp_path / name).write_text(json.dumps(content))
    assert detect_kind(tmp_path) == kind


def test_media_over_the_limits_is_413(tmp_path: Path) -> None:
    import base64
    import io

    from PIL import Image

    from tramontane.serve.prompt import MediaLimits, _fetch, _image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(api.ApiError) as err:
        _fetch(url, MediaLimits(max_bytes=10), "the image")
    assert err.value.status == 413 and "10 bytes" in err.value.message
    with pytest.raises(api.ApiError) as err:
        _image(buffer.getvalue(), MediaLimits(max_pixels=1000), "the image")
    assert err.value.status == 413 and "64x64" in err.value.message
    with pytest.raises(api.ApiError, match="not valid base64"):
        _fetch("data:image/png;base64,@@@@", MediaLimits(), "the image")
    with pytest.raises(api.ApiError, match="allow-remote-media"):
        _fetch("https://example.com/a.png", MediaLimits(), "the image")
