"""Fine-tuning data: JSONL records -> token sequences with loss masks -> fixed-length rows per privacy unit.

One record per line of the JSONL file:

- a chat, `{"messages": [...], "tools": [...], "user_id": ...}`: OpenAI/Mistral chat messages (system, user,
  assistant with `content` and/or `tool_calls`, tool results with `tool_call_id`), so agent trajectories are
  first-class; `tools` (the function definitions) and `user_id` are optional;
- or plain text, `{"text": "...", "user_id": ...}`.

The path: `read_records` -> `encode_record` (tokens + loss mask) -> `units_for` (the privacy unit of each record)
-> `bound_contributions` (user level: at most k examples per user) -> `pack_examples` (rows [R, T] of inputs
and shifted labels, and the unit of each row, which the DP engine clips as one).

What is trained (the loss mask, True where a token is a target):
- a chat: the tokens of every assistant message, its content and/or tool calls ([TOOL_CALLS] included: the
  model emits it) and its closing EOS, as mistral-finetune (`finetune/data/tokenize.py`) trains; nothing of
  system, user or tool messages nor of the other control tokens ([INST], [AVAILABLE_TOOLS], [TOOL_RESULTS],
  BOS). The token sequence is exactly mistral_common's `encode_chat_completion` of the conversation in its
  fine-tuning validation mode (which lets a conversation end with an assistant message, as it must here).
  Tool-call ids are trained as they stand in the data (mistral-finetune drops the ids of the last message's
  calls). Mind that mistral_common writes the tool definitions (and, before v7, the system prompt) just before
  the LAST user message: in a conversation with several user turns, the assistant turns before the last user
  message are trained without them in their context (mistral-finetune trains only the last assistant message
  of conversations with tools). Give agent trajectories one user message; cutting a conversation into one
  record per user turn puts it in several records, hence several units at example level (use user level).
- a text: BOS + text + EOS, every token after BOS.

Privacy of the records: they are private training data, so nothing here ever puts their content into an error
message, a log line or a repr. Errors name the file, the 1-based line and the rule broken; errors raised by
mistral_common or pydantic (whose messages may quote the record) are replaced by their class and the path of
the offending field, with `from None` so that no traceback carries the original either.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest, InstructRequest
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.instruct import InstructTokenizerBase
from pydantic import ValidationError

from tramontane.errors import ConfigError, DataError, TokenizerError
from tramontane.tokenizer import Tokenizer
from tramontane.training.objectives import IGNORE_INDEX

PrivacyUnit = Literal["example", "user"]
PackMode = Literal["truncate", "split", "pack"]
UnitId = Hashable  # a record's privacy unit before numbering: its index (example level) or its user id

ROLES = ("system", "user", "assistant", "tool")
_KEYS = frozenset({"messages", "tools", "text", "user_id"})
_MEDIA_CHUNKS = frozenset({"image", "image_url", "input_audio", "audio_url"})
# What mistral_common raises while validating, normalising and encoding: its own exceptions, pydantic's
# ValidationError and other ValueErrors, and asserts.
_LIBRARY_ERRORS = (MistralCommonException, ValueError, KeyError, TypeError, AssertionError)


# -- records -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One training record: a chat (`messages`, optional `tools`) or a plain `text`; exactly one of `messages`
    and `text` is set. `line` (1-based) and `path` locate it for error messages. The content fields are left
    out of the repr: records are private."""

    messages: list[dict[str, Any]] | None = field(repr=False)
    tools: list[dict[str, Any]] | None = field(repr=False)
    text: str | None = field(repr=False)
    user_id: str | int | None = field(repr=False)
    line: int
    path: str = "<memory>"

    @property
    def where(self) -> str:
        return f"{self.path}, line {self.line}"

    @classmethod
    def from_dict(cls, obj: Any, *, line: int = 1, path: str = "<memory>") -> Record:
        """Check one decoded JSON record (the rules in `read_records`) and make it a Record."""
        where = f"{path}, line {line}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: the record is a JSON {_json_type(obj)}, not an object; write one object "
                            'per line, {"messages": [...]} or {"text": "..."}')
        unknown = set(obj) - _KEYS
        if unknown:  # the names are not shown: a key may be private too
            raise DataError(f"{where}: the record has {len(unknown)} key(s) other than messages, tools, text and "
                            "user_id (not shown: they may be private); remove them")
        if ("messages" in obj) == ("text" in obj):
            raise DataError(f"{where}: the record has {'both' if 'messages' in obj else 'neither'} of 'messages' "
                            "and 'text'; give exactly one: a chat or a plain text")
        user_id = obj.get("user_id")
        if user_id is not None and (isinstance(user_id, bool) or not isinstance(user_id, (str, int))
                                    or user_id == ""):
            raise DataError(f"{where}: user_id is a JSON {_json_type(user_id)}; it must be a non-empty string or "
                            "an integer (or be left out)")
        if "text" in obj:
            text = obj["text"]
            if not isinstance(text, str):
                raise DataError(f"{where}: 'text' is a JSON {_json_type(text)}, not a string")
            if not text:
                raise DataError(f"{where}: 'text' is empty; drop the record or give it some text")
            if obj.get("tools") is not None:
                raise DataError(f"{where}: 'tools' goes with 'messages' only, not with a plain 'text'")
            return cls(None, None, text, user_id, line, path)
        messages, tools = obj["messages"], obj.get("tools")
        _check_messages(messages, where)
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise DataError(f"{where}: 'tools' must be a list of objects "
                            '({"type": "function", "function": {"name", "description", "parameters"}})')
        try:  # the schema of messages and tools, as every tokenizer version reads it
            ChatCompletionRequest.model_validate({"messages": messages, "tools": tools})
        except ValidationError as exc:
            raise DataError(f"{where}: {_schema_problem(exc)}") from None
        return cls(messages, tools, None, user_id, line, path)


def read_records(path: str | Path) -> list[Record]:
    """Read and check a fine-tuning JSONL file (UTF-8, one JSON object per line; blank lines are skipped).

    Each record is a chat `{"messages": [...], "tools": [...]?, "user_id": ...?}` or a text `{"text": "...",
    "user_id": ...?}`; `user_id` is a non-empty string or an integer. A chat's messages have roles system,
    user, assistant or tool; an assistant message has non-empty `content` or `tool_calls`; a tool message has
    its `tool_call_id`; only text content (no images or audio); the last message is the assistant's (the one
    to learn). The rules of a tokenizer version (role order, tool-call ids) are checked by `encode_record`.

    Raises:
        DataError: naming the file, the 1-based line and the rule broken, never quoting the record.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the fine-tuning data {path}: {exc.strerror or type(exc).__name__}") from None
    records: list[Record] = []
    for number, line_bytes in enumerate(raw.splitlines(), start=1):
        where = f"{path}, line {number}"
        try:
            line = line_bytes.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not UTF-8 (byte {exc.start + 1}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); write one JSON object "
                            "per line") from None
        except RecursionError:
            raise DataError(f"{where}: the JSON is nested too deeply") from None
        records.append(Record.from_dict(obj, line=number, path=str(path)))
    if not records:
        raise DataError(f"{path} holds no record; write one JSON object per line")
    return records


def records_from_dicts(objs: Iterable[Mapping[str, Any]], source: str = "<memory>") -> list[Record]:
    """Records from in-memory dicts (a dataset already loaded, generated canaries), checked as `read_records`
    checks a file; `source` stands for the file name in error messages and the lines are numbered from 1."""
    return [Record.from_dict(dict(obj) if isinstance(obj, Mapping) else obj, line=i, path=source)
            for i, obj in enumerate(objs, start=1)]


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (str, "string"), (int, "number"), (float, "number"), (list, "array"),
                       (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _check_messages(messages: Any, where: str) -> None:
    """The structural rules that need no tokenizer, with messages that quote nothing of the record."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' is a JSON {_json_type(messages)}, not a list of messages")
    if not messages:
        raise DataError(f"{where}: 'messages' is empty; drop the record or give it a conversation")
    for i, message in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{at} is a JSON {_json_type(message)}, not an object with a role")
        role = message.get("role")
        if role not in ROLES:  # the role itself is not shown: an unknown one is content
            raise DataError(f"{at} has {'no role' if role is None else 'a role that is not allowed'}; "
                            f"use one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise DataError(f"{at} ({role}): content is a JSON {_json_type(content)}; give a string or a list "
                            "of text chunks")
        if isinstance(content, list) and any(isinstance(c, dict) and c.get("type") in _MEDIA_CHUNKS
                                             for c in content):
            raise DataError(f"{at} ({role}) holds an image or audio chunk; fine-tuning data is text only")
        if role == "assistant":
            if not content and not message.get("tool_calls"):
                raise DataError(f"{at} (assistant) has neither content nor tool_calls; give the answer or the "
                                "tool calls the model should learn")
        elif role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise DataError(f"{at} (tool) has no string tool_call_id; give the id of the call it answers")
        elif content is None:
            raise DataError(f"{at} ({role}) has no content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to learn; add the "
                        "assistant's answer")
    last = messages[-1]["role"]
    if last != "assistant":
        raise DataError(f"{where}: the conversation ends with a {last} message; end it with the assistant "
                        "message to learn (tokens after the last assistant message would never be trained)")


# pydantic's error types and field paths are safe to show; its messages are not (they may quote the input).
_SAFE_LOC = frozenset({*ROLES, "messages", "tools", "role", "content", "tool_calls", "tool_call_id", "name",
                       "function", "arguments", "id", "type", "text", "description", "parameters", "strict",
                       "prefix", "thinking", "closed", "function-after", "str", "list", "dict", "chunk"})
_PYDANTIC_TYPES = {"missing": "is missing", "extra_forbidden": "is a field mistral_common does not accept",
                   "string_type": "must be a string", "list_type": "must be a list", "dict_type": "must be an object",
                   "model_type": "must be an object", "bool_type": "must be true or false",
                   "union_tag_invalid": "has a type or role that is not allowed",
                   "union_tag_not_found": "has no type or role"}


def _schema_problem(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    first = errors[0]
    loc = "".join(f"[{part}]" if isinstance(part, int) else f".{part if part in _SAFE_LOC else '<key>'}"
                  for part in first["loc"]).lstrip(".")
    what = _PYDANTIC_TYPES.get(first["type"], f"is invalid ({first['type']})")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{loc or 'the record'} {what}{more}; see the OpenAI/Mistral chat format"


_HINTS = {
    "InvalidMessageStructureException": "check the order of the roles: a tool result after each tool call, "
                                        "user or tool messages between assistant turns",
    "InvalidFunctionCallException": "tool-call ids must be 9 letters or digits, function names letters, "
                                    "digits, _ or - (at most 64)",
    "InvalidToolMessageException": "a tool_call_id must be 9 letters or digits",
    "InvalidAssistantMessageException": "this tokenizer version takes content or tool_calls in one assistant "
                                        "message, not both",
    "InvalidToolSchemaException": "check the tool definitions",
    "InvalidToolException": "check the tool definitions",
    "UnsupportedTokenizerFeatureException": "the conversation uses a feature this tokenizer version lacks",
    "TokenizerException": "the conversation uses something this tokenizer version cannot encode (tool calls "
                          "need v2 or later)",
}


# -- encoding ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncodedExample:
    """One record's tokens and loss mask (True where the token is a training target, i.e. predicted)."""

    tokens: list[int] = field(repr=False)
    loss_mask: list[bool] = field(repr=False)

    def __post_init__(self) -> None:
        assert len(self.tokens) == len(self.loss_mask), "one mask entry per token"

    def __repr__(self) -> str:
        return f"EncodedExample({len(self.tokens)} tokens, {sum(self.loss_mask)} targets)"


def encode_record(tokenizer: Tokenizer, record: Record) -> EncodedExample:
    """A record's token sequence and loss mask (see the module docstring for what is trained).

    A chat is validated by mistral_common in fine-tuning mode (role order, tool-call ids, ...), normalised
    (consecutive messages of one role merged, system prompts placed as the tokenizer version wants) and encoded
    message by message with the instruct tokenizer's `encode_*_message`, as mistral-finetune does; the
    concatenation is checked against `encode_instruct` of the same request, i.e. `encode_chat_completion`.

    Raises:
        DataError: the conversation breaks a rule of this tokenizer version (naming the line, never quoting).
        TokenizerError: the tokenizer's template is not one whose assistant tokens this module can delimit.
    """
    if record.text is not None:
        tokens = tokenizer.encode(record.text, bos=True, eos=True)
        return EncodedExample(tokens, [False] + [True] * (len(tokens) - 1))
    assert record.messages is not None
    instruct = tokenizer.mistral.instruct_tokenizer
    if not isinstance(instruct, InstructTokenizerBase):
        raise TokenizerError(f"{tokenizer!r} has an instruct tokenizer ({type(instruct).__name__}) without the "
                             "per-message encoding fine-tuning masks need")
    version = tokenizer.mistral.version
    try:
        request = get_validator(version, ValidationMode.finetuning).validate_request(
            ChatCompletionRequest.model_validate({"messages": record.messages, "tools": record.tools}))
        normalized = get_normalizer(version, instruct.tokenizer.model_settings_builder
                                    ).from_chat_completion_request(request)
        pieces = _encode_messages(instruct, normalized)
        whole = instruct.encode_instruct(normalized)
    except ValidationError as exc:
        raise DataError(f"{record.where}: {_schema_problem(exc)}") from None
    except _LIBRARY_ERRORS as exc:
        name = type(exc).__name__
        hint = f"; {_HINTS[name]}" if name in _HINTS else ""
        raise DataError(f"{record.where}: mistral_common's {version.value} chat template rejects the "
                        f"conversation ({name}, its message withheld: it may quote the record){hint}") from None
    if whole.images or whole.audios:
        raise DataError(f"{record.where}: the conversation holds images or audio; fine-tuning data is text only")
    tokens = [t for piece, _ in pieces for t in piece]
    if tokens != whole.tokens:
        raise TokenizerError(f"the {version.value} tokenizer's encode_instruct differs from encoding its messages "
                             f"one by one (at {record.where}), so its assistant tokens cannot be delimited; this "
                             "mistral_common version or template is not supported for fine-tuning")
    mask = [trained for piece, trained in pieces for _ in piece]
    return EncodedExample(tokens, mask)


def _encode_messages(instruct: InstructTokenizerBase, request: InstructRequest) -> list[tuple[list[int], bool]]:
    """The tokens of each part of the request (BOS, then each message) and whether they are trained: the
    loop of mistral_common's `InstructTokenizerBase.encode_instruct` (1.13), per message."""
    users = [i for i, m in enumerate(request.messages) if isinstance(m, UserMessage)]
    first_user, last_user = (users[0], users[-1]) if users else (-1, -1)
    pieces: list[tuple[list[int], bool]] = [(instruct.start(), False)]
    for i, message in enumerate(request.messages):
        tokens: list[int]
        if isinstance(message, UserMessage):
            tokens, _, _ = instruct.encode_user_message(
                message, request.available_tools, i == last_user, i == first_user,
                system_prompt=request.system_prompt, force_img_first=True, settings=request.settings)
        elif isinstance(message, ToolMessage):
            tokens, _, _ = instruct.encode_tool_message(message, i < last_user)
        elif isinstance(message, AssistantMessage):
            tokens = instruct.encode_assistant_message(message, i < last_user)
        elif isinstance(message, SystemMessage):
            tokens, _ = instruct.encode_system_message(message)
        else:
            raise TokenizerError(f"mistral_common normalised a message into an unknown {type(message).__name__}")
        pieces.append((tokens, isinstance(message, AssistantMessage)))
    return pieces


# -- privacy units -----------------------------------------------------------------------------------------

def units_for(records: Sequence[Record], privacy_unit: PrivacyUnit | str) -> list[UnitId]:
    """The privacy unit of each record: its index in `records` (`"example"`: each record its own unit) or its
    `user_id` as a string (`"user"`: 7 and "7" are one user, so that a user is never split in two units).

    Raises:
        DataError: user level and a record without a user_id (naming its line).
    """
    if privacy_unit == "example":
        return list(range(len(records)))
    if privacy_unit != "user":
        raise ConfigError(f"privacy_unit is {privacy_unit!r}; choose 'example' or 'user'")
    missing = [r for r in records if r.user_id is None]
    if missing:
        more = f" (and {len(missing) - 1} more record(s))" if len(missing) > 1 else ""
        raise DataError(f"{missing[0].where}: the record has no user_id{more}, but the privacy unit is the user; "
                        "give every record a user_id, or use example-level privacy")
    return [str(r.user_id) for r in records]


def bound_contributions(units: Sequence[UnitId], max_examples_per_user: int,
                        rng: np.random.Generator) -> tuple[list[int], int]:
    """Keep at most `max_examples_per_user` examples of each unit, chosen uniformly without replacement.

    Returns the indices kept (in their original order) and the number of examples dropped. That number is
    computed from the private data and not protected by DP: it is for the data holder only.

    Why: with user-level DP-SGD each user's rows are clipped together, so the guarantee holds for any number of
    examples per user; the bound caps the work of one unit in a step and keeps a few heavy users from
    dominating (the contribution bounding of Amin et al. 2019, "Bounding User Contributions"; Chua et al.
    2024, "Mind the Privacy Unit!"). A trainer that clips examples one by one instead needs the bound for the
    guarantee itself: it then holds for groups of `max_examples_per_user` examples (group privacy).
    """
    if max_examples_per_user < 1:
        raise ConfigError(f"max_examples_per_user is {max_examples_per_user}; keep at least 1 example per user")
    groups: dict[UnitId, list[int]] = {}
    for i, unit in enumerate(units):
        groups.setdefault(unit, []).append(i)
    keep: list[int] = []
    for members in groups.values():  # in order of first appearance, so that a seed gives one choice
        if len(members) > max_examples_per_user:
            chosen = rng.choice(len(members), size=max_examples_per_user, replace=False)
            members = [members[j] for j in sorted(chosen.tolist())]
        keep.extend(members)
    keep.sort()
    return keep, len(units) - len(keep)


# -- rows --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedExamples:
    """Training rows. `inputs` [R, T] token ids, right-padded; `labels` [R, T] the next-token target of each
    position (IGNORE_INDEX where none is trained, and on padding); `unit_of_row` [R] int64 privacy unit of
    each row, numbered 0..U-1 in order of first appearance. `unit_names` [U]: the original unit ids (user ids)
    and the counts are computed from the private data: for the data holder only."""

    inputs: torch.Tensor
    labels: torch.Tensor
    unit_of_row: torch.Tensor
    unit_names: list[UnitId] = field(repr=False)
    truncated: int = 0  # examples whose tokens beyond max_len (+1) were dropped ("truncate" mode)
    empty_rows: int = 0  # rows left out because none of their positions is trained

    @property
    def num_units(self) -> int:
        return len(self.unit_names)

    def __repr__(self) -> str:
        return (f"PackedExamples(rows={tuple(self.inputs.shape)}, units={self.num_units}, "
                f"truncated={self.truncated}, empty_rows={self.empty_rows})")


def shifted(example: EncodedExample) -> tuple[list[int], list[int]]:
    """(inputs, labels) of one example: inputs = tokens[:-1], labels[t] = tokens[t + 1] where that token is a
    target, else IGNORE_INDEX."""
    tokens, mask = example.tokens, example.loss_mask
    return tokens[:-1], [tok if trained else IGNORE_INDEX for tok, trained in zip(tokens[1:], mask[1:])]


def pack_examples(encoded: Sequence[EncodedExample], units: Sequence[UnitId], max_len: int, *,
                  mode: PackMode | str = "truncate", pad_id: int | None = None) -> PackedExamples:
    """Fixed-length training rows, each row within one privacy unit.

    Each example is shifted first (`shifted`: position t predicts token t + 1), so no position ever predicts
    across two examples. Then, by `mode`:
    - "truncate": one row per example, its first `max_len` positions (the first max_len + 1 tokens); the rest
      is dropped (counted in `truncated`).
    - "split": one example over as many rows of `max_len` as it needs; nothing is dropped.
    - "pack": the examples of one unit concatenated in order and cut into rows of `max_len` (a long example
      spans several rows, a row may hold the end of one example and the start of the next). Rows never mix two
      units. Attention is not blocked at example boundaries (out of scope): a packed example attends to the
      earlier examples of its unit in the same row, as in mistral-finetune.

    A row without any trained position is left out (counted in `empty_rows`), and so is a unit left without
    rows, so that `unit_of_row.max() + 1 == num_units`. T is the longest row, at most `max_len`; shorter rows
    are padded with `pad_id` (None: 0) and IGNORE_INDEX.

    Args:
        encoded: the examples.
        units: the privacy unit of each example (`units_for`, after `bound_contributions`).
        max_len: positions per row.
        pad_id: the tokenizer's pad id (`Tokenizer.pad_id`; None where it has none).
    """
    if len(units) != len(encoded):
        raise DataError(f"{len(encoded)} examples but {len(units)} units; give one unit per example")
    if max_len < 1:
        raise ConfigError(f"max_len is {max_len}; give a positive number of positions per row")
    if mode not in ("truncate", "split", "pack"):
        raise ConfigError(f"mode is {mode!r}; choose 'truncate', 'split' or 'pack'")
    if not encoded:
        raise DataError("no example to pack")

    rows: list[tuple[UnitId, list[int], list[int]]] = []
    truncated = 0
    if mode == "pack":
        streams: dict[UnitId, tuple[list[int], list[int]]] = {}
        for example, unit in zip(encoded, units):
            x, y = shifted(example)
            stream = streams.setdefault(unit, ([], []))
            stream[0].extend(x)
            stream[1].extend(y)
        for unit, (xs, ys) in streams.items():
            rows.extend((unit, xs[s:s + max_len], ys[s:s + max_len]) for s in range(0, len(xs), max_len))
    else:
        for example, unit in zip(encoded, units):
            x, y = shifted(example)
            if mode == "truncate":
                truncated += len(x) > max_len
                rows.append((unit, x[:max_len], y[:max_len]))
            else:
                rows.extend((unit, x[s:s + max_len], y[s:s + max_len]) for s in range(0, len(x), max_len))

    kept = [row for row in rows if any(label != IGNORE_INDEX for label in row[2])]
    if not kept:
        raise DataError(f"none of the {len(encoded)} examples has a trained token within its rows of {max_len} "
                        "positions; raise max_len (or use mode='split' or 'pack')")
    number: dict[UnitId, int] = {}
    for unit, _, _ in kept:
        number.setdefault(unit, len(number))
    width = max(len(x) for _, x, _ in kept)
    inputs = torch.full((len(kept), width), 0 if pad_id is None else pad_id, dtype=torch.long)
    labels = torch.full((len(kept), width), IGNORE_INDEX, dtype=torch.long)
    for r, (_, x, y) in enumerate(kept):
        inputs[r, :len(x)] = torch.tensor(x, dtype=torch.long)
        labels[r, :len(y)] = torch.tensor(y, dtype=torch.long)
    unit_of_row = torch.tensor([number[unit] for unit, _, _ in kept], dtype=torch.long)
    return PackedExamples(inputs, labels, unit_of_row, list(number), truncated, len(rows) - len(kept))
