"""tramontane.finetune.data: records, loss masks, privacy units and rows.

The loss masks are checked against mistral_common itself, by a route the module does not take: the module
encodes the messages one by one (`encode_user_message`, `encode_assistant_message`, ...); the oracle calls
`encode_chat_completion` on the conversation prefixes that end just before and just after each assistant
message, so each assistant span is found from whole-conversation encodings only. The rows are checked
against plain Python loops over positions.
"""

from __future__ import annotations

import functools
import json
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from tramontane.errors import ConfigError, DataError
from tramontane.finetune.data import (
    EncodedExample,
    Record,
    bound_contributions,
    encode_record,
    pack_examples,
    read_records,
    records_from_dicts,
    units_for,
)
from tramontane.tokenizer import Tokenizer
from tramontane.training.objectives import IGNORE_INDEX, LanguageModelingObjective

VERSIONS = ["v3", "v7", "v3-tekken"]
SECRET = "Zanzibar-7731-secret"


@functools.cache
def ours(version: str) -> Tokenizer:
    return Tokenizer.builtin(version)


@functools.cache
def oracle_tokenizers(version: str) -> tuple[MistralTokenizer, MistralTokenizer]:
    """mistral_common's tokenizer from the same file twice: test mode (a prompt ends with a user or tool
    message) and fine-tuning mode (a conversation ends with the assistant message to learn)."""
    path = ours(version).path
    return (MistralTokenizer.from_file(path, mode=ValidationMode.test),
            MistralTokenizer.from_file(path, mode=ValidationMode.finetuning))


def chat_completion(mistral: MistralTokenizer, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None) -> list[int]:
    request = ChatCompletionRequest.model_validate({"messages": messages, "tools": tools})
    return list(mistral.encode_chat_completion(request).tokens)


def oracle(version: str, messages: list[dict[str, Any]],
           tools: list[dict[str, Any]] | None) -> tuple[list[int], list[bool]]:
    """The whole conversation's tokens, and True on the tokens of each assistant message: the tokens that
    the prefix ending with the message adds to the prefix ending just before it."""
    test_mode, finetuning_mode = oracle_tokenizers(version)
    full = chat_completion(finetuning_mode, messages, tools)
    mask = [False] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = chat_completion(test_mode, messages[:i], tools)
        upto = chat_completion(finetuning_mode, messages[:i + 1], tools)
        # the prefixes must be prefixes of the whole encoding for the spans to carry over (see the test of
        # conversations where they are not, below)
        assert upto[:len(before)] == before and full[:len(upto)] == upto, "oracle does not apply"
        assert len(upto) > len(before)
        mask[len(before):len(upto)] = [True] * (len(upto) - len(before))
    return full, mask


def call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def tool(name: str, description: str, **properties: str) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {k: {"type": v} for k, v in properties.items()},
                       "required": list(properties)}}}


TOOLS = [tool("get_weather", "Current weather of a city", city="string"),
         tool("convert", "Celsius to Fahrenheit", celsius="number")]

TOOL_CHAT = [
    {"role": "system", "content": "You are a terse weather assistant."},
    {"role": "user", "content": "How warm is it in Paris?"},
    {"role": "assistant", "tool_calls": [call("a1b2c3d4e", "get_weather", {"city": "Paris"})]},
    {"role": "tool", "tool_call_id": "a1b2c3d4e", "name": "get_weather", "content": '{"celsius": 21}'},
    {"role": "assistant", "content": "21 degrees Celsius, a mild day."},
]

AGENT_TRAJECTORY = [  # two rounds of tool calls, the second with two calls at once
    {"role": "user", "content": "Weather in Oslo and Rome, in Fahrenheit please."},
    {"role": "assistant", "tool_calls": [call("Abc123xyz", "get_weather", {"city": "Oslo"})]},
    {"role": "tool", "tool_call_id": "Abc123xyz", "name": "get_weather", "content": '{"celsius": -3}'},
    {"role": "assistant", "tool_calls": [call("Q1w2e3r4t", "get_weather", {"city": "Rome"}),
                                         call("Z9x8c7v6b", "convert", {"celsius": -3})]},
    {"role": "tool", "tool_call_id": "Q1w2e3r4t", "name": "get_weather", "content": '{"celsius": 18}'},
    {"role": "tool", "tool_call_id": "Z9x8c7v6b", "name": "convert", "content": "26.6"},
    {"role": "assistant", "content": "Oslo is at 26.6 F; Rome is at 18 C, I will convert it next."},
]

MULTI_TURN = [
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "And a larger one?"},
    {"role": "assistant", "content": "Eleven, then thirteen."},
]

# Tools and (before v7) the system prompt go into the last user message, so here the encoding of an early
# prefix is not a prefix of the whole conversation's.
MULTI_TURN_TOOLS = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Lyon?"},
    {"role": "assistant", "tool_calls": [call("LyOn12345", "get_weather", {"city": "Lyon"})]},
    {"role": "tool", "tool_call_id": "LyOn12345", "name": "get_weather", "content": '{"celsius": 15}'},
    {"role": "assistant", "content": "15 degrees."},
    {"role": "user", "content": "Thanks. And is that warm?"},
    {"role": "assistant", "content": "Mild rather than warm."},
]


def record(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, **extra: Any) -> Record:
    obj: dict[str, Any] = {"messages": messages, **extra}
    if tools is not None:
        obj["tools"] = tools
    [rec] = records_from_dicts([obj])
    return rec


# -- loss masks against mistral_common -----------------------------------------------------------------------

SYSTEM_FIRST = [{"role": "system", "content": "Be exact."}, *MULTI_TURN]
ORACLE_CASES = [(version, name, messages, tools)
                for version in VERSIONS
                for name, messages, tools in [("tool chat", TOOL_CHAT, TOOLS),
                                              ("agent trajectory", AGENT_TRAJECTORY, TOOLS),
                                              ("multi-turn", MULTI_TURN, None),
                                              ("multi-turn, system first", SYSTEM_FIRST, None)]
                # v3 puts the system prompt in the last user message: see the test of such conversations below
                if not (version != "v7" and messages is SYSTEM_FIRST)]


@pytest.mark.parametrize("version, name, messages, tools", ORACLE_CASES,
                         ids=[f"{v}-{name}" for v, name, _, _ in ORACLE_CASES])
def test_mask_is_mistral_commons_assistant_spans(version, name, messages, tools):
    full, expected = oracle(version, messages, tools)
    encoded = encode_record(ours(version), record(messages, tools))
    assert encoded.tokens == full
    assert encoded.loss_mask == expected
    assert sum(expected) > 0 and not expected[0]


def test_v7_assistant_content_with_tool_calls():
    messages = [{"role": "user", "content": "Is it raining in Bergen?"},
                {"role": "assistant", "content": "Let me check.",
                 "tool_calls": [call("B3rg3n000", "get_weather", {"city": "Bergen"})]},
                {"role": "tool", "tool_call_id": "B3rg3n000", "content": '{"rain": true}'},
                {"role": "assistant", "content": "Yes, as usual."}]
    full, expected = oracle("v7", messages, TOOLS)
    encoded = encode_record(ours("v7"), record(messages, TOOLS))
    assert (encoded.tokens, encoded.loss_mask) == (full, expected)


def masked_runs(encoded: EncodedExample) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = False
    for token, trained in zip(encoded.tokens, encoded.loss_mask):
        if trained:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = trained
    return runs


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("messages, tools", [
    (MULTI_TURN_TOOLS, TOOLS),
    (SYSTEM_FIRST, None),
])
def test_mask_when_early_prefixes_are_encoded_differently(version, messages, tools):
    """Where the prefix oracle does not apply: the whole sequence is still encode_chat_completion's, and the
    trained runs are exactly the assistant messages, each closed by EOS, in order."""
    tokenizer = ours(version)
    _, finetuning_mode = oracle_tokenizers(version)
    encoded = encode_record(tokenizer, record(messages, tools))
    assert encoded.tokens == chat_completion(finetuning_mode, messages, tools)
    assistants = [m for m in messages if m["role"] == "assistant"]
    runs = masked_runs(encoded)
    assert len(runs) == len(assistants)
    for run, message in zip(runs, assistants):
        assert run[-1] == tokenizer.eos_id and tokenizer.eos_id not in run[:-1]
        text = tokenizer.decode(run)
        if message.get("content"):
            assert text.strip() == message["content"]
        for tool_call in message.get("tool_calls") or []:
            assert tool_call["function"]["name"] in text and tool_call["id"] in text
    if tools is not None:  # the early turns are trained without the tool list in their context
        with_tools = tokenizer.decode(encoded.tokens, keep_special=True)
        assert with_tools.index("[AVAILABLE_TOOLS]") > with_tools.index("[TOOL_CALLS]")


@pytest.mark.parametrize("version", VERSIONS)
def test_mask_oracle_can_fail(version):
    """The oracle tells a mask that also trains the tool result from the right one."""
    _, expected = oracle(version, TOOL_CHAT, TOOLS)
    encoded = encode_record(ours(version), record(TOOL_CHAT, TOOLS))
    wrong = list(encoded.loss_mask)
    last_true = max(i for i, m in enumerate(wrong) if m)
    first_of_last = max(i for i in range(last_true) if not wrong[i])
    wrong[first_of_last] = True  # the token just before the answer (end of the tool result)
    assert wrong != expected and encoded.loss_mask == expected


@pytest.mark.parametrize("version", VERSIONS)
def test_text_record(version):
    tokenizer = ours(version)
    [rec] = records_from_dicts([{"text": "Plain text: [INST] is not a control token here.", "user_id": 4}])
    encoded = encode_record(tokenizer, rec)
    raw = tokenizer.mistral.instruct_tokenizer.tokenizer
    assert encoded.tokens == raw.encode("Plain text: [INST] is not a control token here.", bos=True, eos=True)
    assert encoded.tokens[0] == tokenizer.bos_id and encoded.tokens[-1] == tokenizer.eos_id
    assert encoded.loss_mask == [False] + [True] * (len(encoded.tokens) - 1)


# -- reading and validation ----------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_jsonl(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


def full_text(exc: BaseException) -> str:
    """Everything a traceback of `exc` would print, chained exceptions included."""
    return "".join(traceback.format_exception(exc))


def test_read_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        json.dumps({**GOOD, "user_id": "alice"}), "", "   ",
        json.dumps({"text": "some text", "user_id": 7}),
        json.dumps({"messages": TOOL_CHAT, "tools": TOOLS}),
    ])
    records = read_records(path)
    assert [r.line for r in records] == [1, 4, 5]
    assert records[0].messages == GOOD["messages"] and records[0].user_id == "alice" and records[0].text is None
    assert records[1].text == "some text" and records[1].user_id == 7 and records[1].messages is None
    assert records[2].tools == TOOLS and records[2].user_id is None
    assert all(r.path == str(path) for r in records)
    assert "hello" not in repr(records[0]) and "alice" not in repr(records[0])


def chat(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"messages": list(messages)}


USER = {"role": "user", "content": f"my {SECRET}"}
ANSWER = {"role": "assistant", "content": f"your {SECRET}"}

BAD_LINES: list[tuple[str | bytes, str]] = [
    (f'{{"text": "{SECRET}', "not valid JSON"),
    (json.dumps([SECRET]), "not an object"),
    (json.dumps({"text": SECRET, **chat(USER, ANSWER)}), "both"),
    (json.dumps({"user_id": SECRET}), "neither"),
    (json.dumps({"text": "x", SECRET: 1}), "key(s) other than"),
    (json.dumps({"messages": []}), "'messages' is empty"),
    (json.dumps({"messages": SECRET}), "not a list"),
    (json.dumps({"text": ""}), "'text' is empty"),
    (json.dumps({"text": 3}), "not a string"),
    (json.dumps({"text": SECRET, "tools": TOOLS}), "'tools' goes with 'messages'"),
    (json.dumps(chat({"role": SECRET, "content": "x"}, ANSWER)), "role that is not allowed"),
    (json.dumps(chat({"content": SECRET}, ANSWER)), "no role"),
    (json.dumps(chat(USER, {"role": "assistant", "content": "", "tool_calls": []})), "neither content nor tool_calls"),
    (json.dumps(chat(USER, {"role": "assistant"})), "neither content nor tool_calls"),
    (json.dumps(chat(USER)), "no assistant message"),
    (json.dumps(chat(USER, ANSWER, USER)), "ends with a user message"),
    (json.dumps(chat(USER, ANSWER, {"role": "tool", "content": SECRET, "tool_call_id": "abcdefghi"})),
     "ends with a tool message"),
    (json.dumps(chat(USER, {"role": "tool", "content": SECRET}, ANSWER)), "no string tool_call_id"),
    (json.dumps(chat({"role": "user"}, ANSWER)), "(user) has no content"),
    (json.dumps(chat({"role": "user", "content": {"x": SECRET}}, ANSWER)), "content is a JSON object"),
    (json.dumps(chat({"role": "user", "content": [{"type": "image_url", "image_url": SECRET}]}, ANSWER)),
     "image or audio"),
    (json.dumps({**chat(USER, ANSWER), "user_id": 1.5}), "user_id is a JSON number"),
    (json.dumps({**chat(USER, ANSWER), "user_id": True}), "user_id is a JSON boolean"),
    (json.dumps({**chat(USER, ANSWER), "user_id": ""}), "user_id"),
    (json.dumps({**chat(USER, ANSWER), "tools": SECRET}), "'tools' must be a list"),
    # the schema, checked by mistral_common's pydantic models (whose messages quote the input)
    (json.dumps(chat(USER, {"role": "assistant", "tool_calls": [
        {"id": "abcdefghi", "function": {"name": "f", "arguments": 5}}]})),
     "messages[1].assistant.tool_calls[0].function.arguments must be a string"),
    (json.dumps(chat({"role": "user", "content": "x", SECRET: 1}, ANSWER)),
     "messages[0].user.<key> is a field mistral_common does not accept"),
    (json.dumps({**chat(USER, ANSWER), "tools": [{"type": "function", "function": {"name": SECRET}}]}),
     "tools[0].function.parameters is missing"),
    (b'{"text": "\xff\xfe ' + SECRET.encode() + b'"}', "not UTF-8"),
]


@pytest.mark.parametrize("line, rule", BAD_LINES, ids=[rule for _, rule in BAD_LINES])
def test_bad_record_names_file_line_and_rule_never_content(tmp_path, line, rule):
    path = write_jsonl(tmp_path / "train.jsonl", [json.dumps(GOOD), "", line, json.dumps(GOOD)])
    with pytest.raises(DataError) as caught:
        read_records(path)
    message = str(caught.value)
    assert message.startswith(f"{path}, line 3: "), message
    assert rule in message
    assert SECRET not in full_text(caught.value)
    assert "hello" not in full_text(caught.value)  # nor the good records'


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="holds no record"):
        read_records(write_jsonl(tmp_path / "blank.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="cannot read"):
        read_records(tmp_path / "absent.jsonl")


ENCODE_ERRORS = [  # accepted by the schema, refused by a tokenizer version's rules (mistral_common)
    ("v3", chat(USER, {"role": "assistant", "tool_calls": [call(f"x{SECRET}", "f", {"a": SECRET})]},
                {"role": "tool", "tool_call_id": "abcdefghi", "content": SECRET}, ANSWER),
     "InvalidFunctionCallException"),
    ("v7", chat(USER, {"role": "assistant", "tool_calls": [call("abcdefghi", f"bad name {SECRET}", {})]},
                {"role": "tool", "tool_call_id": "abcdefghi", "content": SECRET}, ANSWER),
     "InvalidFunctionCallException"),
    ("v3-tekken", chat(USER, {"role": "tool", "tool_call_id": "abcdefghi", "content": SECRET}, ANSWER),
     "InvalidMessageStructureException"),
    ("v3", chat(USER, {"role": "assistant", "content": SECRET, "tool_calls": [call("abcdefghi", "f", {})]},
                {"role": "tool", "tool_call_id": "abcdefghi", "content": SECRET}, ANSWER),
     "InvalidAssistantMessageException"),
    ("v3", chat(USER, {"role": "assistant", "tool_calls": [call("abcdefghi", "f", {})]},
                {"role": "tool", "tool_call_id": f"y{SECRET}", "content": SECRET}, ANSWER),
     "InvalidToolMessageException"),
]


@pytest.mark.parametrize("version, obj, cause", ENCODE_ERRORS, ids=[c for _, _, c in ENCODE_ERRORS])
def test_encode_error_names_line_never_content(tmp_path, version, obj, cause):
    path = write_jsonl(tmp_path / "train.jsonl", [json.dumps(GOOD), json.dumps(obj)])
    records = read_records(path)
    encode_record(ours(version), records[0])
    with pytest.raises(DataError) as caught:
        encode_record(ours(version), records[1])
    message = str(caught.value)
    assert message.startswith(f"{path}, line 2: ") and cause in message, message
    assert SECRET not in full_text(caught.value)


# -- privacy units -------------------------------------------------------------------------------------------

def test_units_for():
    records = records_from_dicts([{"text": "a", "user_id": "u"}, {"text": "b", "user_id": 7},
                                  {"text": "c", "user_id": "7"}, {"text": "d", "user_id": "u"}])
    assert units_for(records, "example") == [0, 1, 2, 3]
    assert units_for(records, "user") == ["u", "7", "7", "u"]  # 7 and "7": one user, never two units
    anonymous = records_from_dicts([{"text": "a", "user_id": "u"}, {"text": "b"}, {"text": "c"}], source="f.jsonl")
    assert units_for(anonymous, "example") == [0, 1, 2]
    with pytest.raises(DataError, match=r"^f\.jsonl, line 2: .*no user_id \(and 1 more"):
        units_for(anonymous, "user")
    with pytest.raises(ConfigError):
        units_for(records, "row")


def test_bound_contributions():
    units = ["a", "b", "a", "c", "a", "b", "a"]
    keep, dropped = bound_contributions(units, 2, np.random.default_rng(0))
    assert keep == sorted(keep) and dropped == 2 and len(keep) == 5
    kept_units = [units[i] for i in keep]
    assert kept_units.count("a") == 2 and kept_units.count("b") == 2 and kept_units.count("c") == 1
    assert bound_contributions(units, 2, np.random.default_rng(0)) == (keep, dropped)
    assert bound_contributions(units, 10, np.random.default_rng(0)) == (list(range(7)), 0)
    with pytest.raises(ConfigError):
        bound_contributions(units, 0, np.random.default_rng(0))


def test_bound_contributions_chooses_uniformly():
    """Each of a user's 5 examples is kept with probability 2/5 (binomial bounds, 2000 draws: z < 4.5)."""
    rng = np.random.default_rng(1)
    counts = np.zeros(6)
    for _ in range(2000):
        keep, _ = bound_contributions([0, 0, 0, 0, 0, 1], 2, rng)
        counts[keep] += 1
    assert counts[5] == 2000
    expected, sd = 2000 * 0.4, np.sqrt(2000 * 0.4 * 0.6)
    assert np.all(np.abs(counts[:5] - expected) < 4.5 * sd), counts


# -- rows ----------------------------------------------------------------------------------------------------

def make_example(tokens: list[int], mask: list[bool]) -> EncodedExample:
    return EncodedExample(list(tokens), list(mask))


def random_examples(rng: np.random.Generator, n: int, units: list[int]) -> list[EncodedExample]:
    """Tokens of unit u in [1000 u, 1000 u + 999], so that a row's tokens tell its unit."""
    out = []
    for i in range(n):
        length = int(rng.integers(2, 30))
        tokens = (1000 * units[i] + rng.integers(0, 1000, length)).tolist()
        mask = [False] + (rng.random(length - 1) < 0.7).tolist()
        mask[-1] = True
        out.append(make_example(tokens, mask))
    return out


def expected_pairs(example: EncodedExample) -> tuple[list[int], list[int]]:
    xs, ys = [], []
    for t in range(len(example.tokens) - 1):
        xs.append(example.tokens[t])
        ys.append(example.tokens[t + 1] if example.loss_mask[t + 1] else IGNORE_INDEX)
    return xs, ys


PAD = -1  # not a token id, so a row's real positions are the ones whose input is not PAD


def real_row(packed, r: int) -> tuple[list[int], list[int]]:
    x, y = packed.inputs[r].tolist(), packed.labels[r].tolist()
    assert all(label == IGNORE_INDEX for tok, label in zip(x, y) if tok == PAD)
    n = sum(tok != PAD for tok in x)
    assert all(tok != PAD for tok in x[:n]), "padding only at the end"
    return x[:n], y[:n]


def test_truncate_labels_and_lengths():
    rng = np.random.default_rng(3)
    units = list(range(12))
    examples = random_examples(rng, 12, units)
    max_len = 10
    packed = pack_examples(examples, units, max_len, mode="truncate", pad_id=0)
    lengths = [min(len(e.tokens) - 1, max_len) for e in examples]
    assert packed.inputs.shape == (12, max(lengths)) and packed.inputs.dtype == torch.long
    assert packed.unit_of_row.tolist() == units and packed.unit_names == units
    assert packed.truncated == sum(len(e.tokens) - 1 > max_len for e in examples)
    for r, example in enumerate(examples):
        xs, ys = expected_pairs(example)
        assert packed.inputs[r, :lengths[r]].tolist() == xs[:max_len]
        assert packed.labels[r, :lengths[r]].tolist() == ys[:max_len]
        assert (packed.labels[r, lengths[r]:] == IGNORE_INDEX).all()
        assert (packed.inputs[r, lengths[r]:] == 0).all()


def test_width_is_longest_row_not_max_len():
    examples = [make_example([1, 5, 6, 2], [False, True, True, True]), make_example([1, 7, 2], [False] + [True] * 2)]
    packed = pack_examples(examples, [0, 1], 100, pad_id=9)
    assert packed.inputs.tolist() == [[1, 5, 6], [1, 7, 9]]
    assert packed.labels.tolist() == [[5, 6, 2], [7, 2, IGNORE_INDEX]]
    assert packed.truncated == 0


def test_truncate_keeps_first_max_len_plus_one_tokens():
    example = make_example(list(range(1, 11)), [False] + [True] * 9)
    packed = pack_examples([example], [0], 4)
    assert packed.inputs.tolist() == [[1, 2, 3, 4]] and packed.labels.tolist() == [[2, 3, 4, 5]]
    assert packed.truncated == 1


def test_split_keeps_every_position_in_rows_of_one_example():
    rng = np.random.default_rng(4)
    units = [0, 1, 0, 2, 1]
    examples = random_examples(rng, 5, units)
    packed = pack_examples(examples, units, 6, mode="split", pad_id=PAD)
    expected = []
    for example, unit in zip(examples, units):
        xs, ys = expected_pairs(example)
        for s in range(0, len(xs), 6):
            if any(y != IGNORE_INDEX for y in ys[s:s + 6]):
                expected.append((unit, xs[s:s + 6], ys[s:s + 6]))
    got = [(packed.unit_names[int(packed.unit_of_row[r])], *real_row(packed, r))
           for r in range(packed.inputs.shape[0])]
    assert got == expected
    assert packed.truncated == 0 and packed.inputs.shape[1] == 6


def test_pack_never_mixes_units_and_loses_nothing():
    rng = np.random.default_rng(5)
    units = rng.integers(0, 4, 40).tolist()
    examples = random_examples(rng, 40, units)
    units_named = [f"user{u}" for u in units]
    packed = pack_examples(examples, units_named, 16, mode="pack", pad_id=PAD)
    assert packed.inputs.shape[1] == 16 and packed.truncated == 0 and packed.empty_rows == 0
    streams: dict[str, tuple[list[int], list[int]]] = {}
    for r in range(packed.inputs.shape[0]):
        name = packed.unit_names[int(packed.unit_of_row[r])]
        u = int(name.removeprefix("user"))
        x, y = real_row(packed, r)
        # every position of the row comes from its own unit (tokens 1000 u ...)
        assert all(tok // 1000 == u for tok in x)
        assert all(label == IGNORE_INDEX or label // 1000 == u for label in y)
        stream = streams.setdefault(name, ([], []))
        stream[0].extend(x)
        stream[1].extend(y)
    # concatenating a unit's rows gives its examples' shifted pairs, in order
    for name in set(units_named):
        xs, ys = [], []
        for example, unit in zip(examples, units_named):
            if unit == name:
                ex, ey = expected_pairs(example)
                xs += ex
                ys += ey
        assert streams[name] == (xs, ys)
    assert packed.unit_names == list(dict.fromkeys(units_named))
    assert int(packed.unit_of_row.max()) + 1 == packed.num_units
    LanguageModelingObjective(packed.inputs, packed.labels, example_of_row=packed.unit_of_row)


def test_rows_without_targets_are_dropped_and_units_renumbered():
    prompt_only_beyond = make_example([1, 3, 3, 3, 3, 3, 4, 2], [False] * 6 + [True, True])
    fine = make_example([1, 5, 2], [False, True, True])
    packed = pack_examples([prompt_only_beyond, fine], ["a", "b"], 3, mode="truncate")
    assert packed.unit_names == ["b"] and packed.unit_of_row.tolist() == [0]
    assert packed.empty_rows == 1 and packed.truncated == 1
    split = pack_examples([prompt_only_beyond, fine], ["a", "b"], 3, mode="split")
    assert split.unit_names == ["a", "b"] and split.empty_rows == 1  # the first 3 positions train nothing
    assert split.inputs.tolist() == [[3, 3, 3], [4, 0, 0], [1, 5, 0]]
    assert split.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 4], [2, IGNORE_INDEX, IGNORE_INDEX],
                                     [5, 2, IGNORE_INDEX]]
    with pytest.raises(DataError, match="raise max_len"):
        pack_examples([prompt_only_beyond], [0], 3)


def test_pack_argument_errors():
    example = make_example([1, 5, 2], [False, True, True])
    with pytest.raises(DataError, match="one unit per example"):
        pack_examples([example], [0, 1], 4)
    with pytest.raises(ConfigError):
        pack_examples([example], [0], 0)
    with pytest.raises(ConfigError):
        pack_examples([example], [0], 4, mode="bucket")
    with pytest.raises(DataError):
        pack_examples([], [], 4)


def test_file_to_rows(tmp_path):
    """The whole path on a small file: user-level units, the bound, packing."""
    lines = [json.dumps({"messages": TOOL_CHAT, "tools": TOOLS, "user_id": "ann"}),
             json.dumps({"text": "A note from Bob.", "user_id": "bob"}),
             json.dumps({**GOOD, "user_id": "ann"}),
             json.dumps({"messages": MULTI_TURN, "user_id": "ann"})]
    records = read_records(write_jsonl(tmp_path / "train.jsonl", lines))
    tokenizer = ours("v7")
    encoded = [encode_record(tokenizer, r) for r in records]
    units = units_for(records, "user")
    keep, dropped = bound_contributions(units, 2, np.random.default_rng(0))
    assert dropped == 1
    packed = pack_examples([encoded[i] for i in keep], [units[i] for i in keep], 64, mode="pack",
                           pad_id=tokenizer.pad_id)
    assert packed.unit_names == list(dict.fromkeys(units[i] for i in keep))
    assert set(packed.unit_names) == {"ann", "bob"}
    trained = int((packed.labels != IGNORE_INDEX).sum())
    assert trained == sum(sum(encoded[i].loss_mask) for i in keep)
    assert "ann" not in repr(packed)


def test_a_run_set_up_before_a_setting_existed_resumes_with_its_default(tmp_path: Path) -> None:
    from tramontane.finetune.run import ADDED_SETTING_DEFAULTS, FinetuneConfig, _setup

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    run_dir = tmp_path / "run" / "state"
    run_dir.mkdir(parents=True)
    config = FinetuneConfig(private=False, steps=1)
    setup = _setup(run_dir, config, data, resume=False)
    older = {k: v for k, v in setup["config"].items() if k not in ADDED_SETTING_DEFAULTS}
    (run_dir / "setup.json").write_text(json.dumps({**setup, "config": older}))
    assert _setup(run_dir, config, data, resume=True)["config"] == older
    with pytest.raises(ConfigError, match="quantize"):  # the run had no quantization: int8 is a change
        _setup(run_dir, FinetuneConfig(private=False, steps=1, quantize="int8"), data, resume=True)
