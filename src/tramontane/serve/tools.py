"""Tool calls in Mistral model output, parsed into OpenAI tool calls while they stream, and the tool-call ids
between OpenAI clients and mistral_common.

The formats are mistral_common's (`InstructTokenizerV2..V13._encode_tool_calls_in_assistant_message`), which
is how the models were trained to write calls:

    v2, v3, v7    [TOOL_CALLS] [{"name": "f", "arguments": {...}, "id": "abcDEF123"}, {...}]
    v11           [TOOL_CALLS]f[CALL_ID]abcDEF123[ARGS]{...}     ([CALL_ID]... only for a call with an id)
    v13, v15      [TOOL_CALLS]f[ARGS]{...}

Parallel calls are one JSON list (v2-v7) or one `[TOOL_CALLS]` per call (v11+); models also write several
`[TOOL_CALLS] [...]` lists in a row, each with a newline between and the same id twice (vLLM #11097): every
call of every list is a call, and ids are never taken from the model (each call gets a fresh one).

`OutputParser` works on token ids: `[TOOL_CALLS]`, `[ARGS]`, `[CALL_ID]` are recognised by id, never by their
text (decoding drops control tokens, and a user who types "[TOOL_CALLS]" writes ordinary text). Text before
the first call is content. A call's first delta carries its index, id, type and name; its arguments follow
as text pieces, as soon as they are generated, in both formats (a parser that needs a complete JSON list
before it can say anything is what broke streamed calls in vLLM #20028). A non-streamed response is the
same deltas merged, so the two cannot disagree. Arguments are the model's JSON text exactly as written
(text after the closing brace is dropped); a call cut off by `max_tokens` keeps its partial arguments, as
OpenAI does ("the model does not always generate valid JSON").
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tramontane.errors import GenerationError
from tramontane.tokenizer import IncrementalDecoder, Tokenizer

logger = logging.getLogger(__name__)

CALL_ID_PATTERN = re.compile(r"^[a-zA-Z0-9]{9}$")  # mistral_common's validator's rule for tool-call ids
_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ALPHANUMERIC = string.ascii_letters + string.digits


# -- the format of a tokenizer --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolFormat:
    """How a tokenizer's model writes tool calls: the ids of its control tokens."""

    version: int  # the tokenizer version's number: 2, 3, 7, 11, 13, ...
    tool_calls: int  # [TOOL_CALLS]
    args: int | None = None  # [ARGS] (v11+); None: the JSON-list format of v2-v7
    call_id: int | None = None  # [CALL_ID], when the vocabulary has it

    @property
    def json_list(self) -> bool:
        return self.args is None


def _control_token(tokenizer: Tokenizer, text: str) -> int | None:
    raw = tokenizer.mistral.instruct_tokenizer.tokenizer
    try:
        token = raw.get_special_token(text)
    except (ValueError, KeyError):  # tekken: unknown control token
        return None
    # sentencepiece answers <unk> (0) for a control token its vocabulary lacks
    return token if raw.id_to_piece(token) == text else None


def tool_format(tokenizer: Tokenizer) -> ToolFormat | None:
    """The tool-call format of `tokenizer`, or None when it has none (v1)."""
    version = int(tokenizer.version.lstrip("v"))
    tool_calls = _control_token(tokenizer, "[TOOL_CALLS]")
    if version < 2 or tool_calls is None:
        return None
    if version < 11:
        return ToolFormat(version, tool_calls)
    args = _control_token(tokenizer, "[ARGS]")
    if args is None:
        return None
    return ToolFormat(version, tool_calls, args, _control_token(tokenizer, "[CALL_ID]"))


def forced_call_prefix(tokenizer: Tokenizer, fmt: ToolFormat, name: str | None = None) -> list[int]:
    """Assistant tokens that commit the model to a tool call (`tool_choice` "required": `[TOOL_CALLS]`) or to
    a call of function `name`, written as mistral_common writes it; appended to the prompt and fed to the
    `OutputParser` as if the model had generated them."""
    if name is None:
        return [fmt.tool_calls]
    if fmt.json_list:  # json.dumps of mistral_common's call dict starts so
        return [fmt.tool_calls, *tokenizer.encode(f'[{{"name": {json.dumps(name)}, "arguments": ', bos=False)]
    ids = [fmt.tool_calls, *tokenizer.encode(name, bos=False)]
    if fmt.version == 11 and fmt.call_id is not None:  # v11 writes the id of a call that has one
        ids += [fmt.call_id, *tokenizer.encode(random_call_id(), bos=False)]
    return ids + [fmt.args] if fmt.args is not None else ids


# -- tool-call ids --------------------------------------------------------------------------------------------


def random_call_id() -> str:
    """A fresh id in mistral_common's format: 9 characters a-z, A-Z, 0-9 (what its validator requires)."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


def mistral_call_id(client_id: str) -> str:
    """A client's tool-call id (e.g. OpenAI's `call_...`, any length) as a mistral_common id: itself when it
    already has the format, else 9 base-62 digits of its SHA-256, so that the same id maps the same way in
    every request of a conversation (the assistant call and its tool result always agree)."""
    if CALL_ID_PATTERN.match(client_id):
        return client_id
    number = int.from_bytes(hashlib.sha256(client_id.encode()).digest(), "big")
    digits = []
    for _ in range(9):
        number, digit = divmod(number, len(_ALPHANUMERIC))
        digits.append(_ALPHANUMERIC[digit])
    return "".join(digits)


class CallIds:
    """The tool-call ids of one request: client id -> mistral_common id (`mistral_call_id`), and back, so that
    mistral_common's messages about an id name the client's own."""

    def __init__(self) -> None:
        self._client: dict[str, str] = {}

    def to_mistral(self, client_id: str) -> str:
        mistral = mistral_call_id(client_id)
        earlier = self._client.setdefault(mistral, client_id)
        if earlier != client_id:
            raise GenerationError(f"tool-call ids {earlier!r} and {client_id!r} map to the same 9-character id "
                                  f"{mistral!r} that Mistral tokenizers need; rename one of them")
        return mistral

    def to_client(self, mistral_id: str) -> str:
        return self._client.get(mistral_id, mistral_id)

    def restore(self, text: str) -> str:
        """`text` (e.g. an error message) with each mapped id replaced by the client's."""
        for mistral, client in self._client.items():
            if mistral != client:
                text = text.replace(mistral, client)
        return text

    @property
    def mapping(self) -> Mapping[str, str]:
        return dict(self._client)


# -- parsing model output -------------------------------------------------------------------------------------


@dataclass
class CallDelta:
    """A piece of one tool call: the first one of a call has its id and name, later ones argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class OutputDelta:
    """What a few more tokens added to the output: content text and tool-call pieces."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)

    def add(self, other: OutputDelta) -> None:
        self.content += other.content
        self.calls.extend(other.calls)


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


def merge_calls(deltas: Iterable[CallDelta]) -> list[ParsedCall]:
    """Merge call deltas by index, as OpenAI clients do with a stream."""
    calls: dict[int, ParsedCall] = {}
    for delta in deltas:
        if delta.index not in calls:
            assert delta.id is not None and delta.name is not None, "a call's first delta names it"
            calls[delta.index] = ParsedCall(delta.id, delta.name)
        calls[delta.index].arguments += delta.arguments
    return [calls[i] for i in sorted(calls)]


class _JsonStrings:
    """Whether JSON text read one character at a time is inside a string literal (escapes honoured)."""

    def __init__(self) -> None:
        self.inside = False
        self._escape = False

    def step(self, char: str) -> bool:
        """Read `char`; True when it is part of a string literal, its quotes included (no structure)."""
        if self.inside:
            if self._escape:
                self._escape = False
            elif char == "\\":
                self._escape = True
            elif char == '"':
                self.inside = False
            return True
        if char == '"':
            self.inside = True
            return True
        return False


class _JsonValue:
    """Finds where one JSON value ends in streamed text: `feed` returns the part of the text that belongs to
    the value (leading whitespace dropped); `done` once its closing bracket came. A value that does not start
    with `{` or `[` is taken whole (it has no reliable end)."""

    def __init__(self) -> None:
        self.started = False
        self.done = False
        self._bracketed = False
        self._depth = 0
        self._strings = _JsonStrings()

    def feed(self, text: str) -> str:
        if self.done:
            return ""
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started, self._bracketed = True, text[0] in "{["
        if not self._bracketed:
            return text
        for i, char in enumerate(text):
            if self._strings.step(char):
                continue
            if char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return text[: i + 1]
        return text


class _Call:
    """One call being parsed: the deltas it has sent."""

    def __init__(self, index: int | None) -> None:
        self.index = index  # None: over `max_calls`, parsed but not sent
        self.name: str | None = None
        self.sent_header = False
        self.sent_arguments = False


class _JsonCalls:
    """The v2-v7 format after one `[TOOL_CALLS]`: a JSON list of call objects (or one object), scanned one
    character at a time so that each call's header goes out when its name completes and its arguments as
    they come. Keys may come in any order; arguments seen before the name wait for it."""

    EXPECT_KEY, IN_KEY, EXPECT_COLON, EXPECT_VALUE, IN_VALUE, AFTER_VALUE = range(6)

    def __init__(self, parser: OutputParser) -> None:
        self._parser = parser
        self.text = ""  # the segment's text so far
        self._pos = 0
        self.status = "start"  # start -> list -> done, or "content" (not a call list)
        self.named_calls = 0  # calls whose name was read
        self._depth = 0
        self._strings = _JsonStrings()
        self._state = self.EXPECT_KEY
        self._key = ""
        self._start = 0  # of the key or value being read
        self._scalar = False
        self._value_depth = 0
        self._call: _Call | None = None
        self._arguments_start: int | None = None  # where the "arguments" value starts in self.text
        self._arguments_end: int | None = None  # ... and ends, once it has
        self._arguments_sent_to = 0

    def feed(self, text: str, out: OutputDelta) -> None:
        self.text += text
        while self._pos < len(self.text) and self.status not in ("done", "content"):
            self._step(self.text[self._pos], out)
            self._pos += 1
        if self.status == "content":  # everything from here on is text
            out.content += self.text[self._pos:]
            self._pos = len(self.text)
        self._stream_arguments(out)

    def _step(self, char: str, out: OutputDelta) -> None:
        if self.status == "start":
            if char.isspace():
                return
            if char not in "[{":  # not a call list: the segment is text (`feed` sends the rest)
                self.status = "content"
                out.content += self.text[: self._pos]
                self._pos -= 1
                return
            self.status = "list"
            if char == "[":
                self._depth = 1
                return
            self._depth = 1  # a bare object: a list of one
        was_inside = self._strings.inside
        if self._strings.step(char):
            if was_inside and not self._strings.inside:  # the string just closed
                if self._depth == 2 and self._state == self.IN_KEY:
                    self._key = _loads_str(self.text[self._start: self._pos + 1]) or ""
                    self._state = self.EXPECT_COLON
                elif self._depth == 2 and self._state == self.IN_VALUE and self._value_depth == 0:
                    self._value_done(self._pos + 1, out)
            elif not was_inside:  # the string just opened
                if self._depth == 2 and self._state == self.EXPECT_KEY:
                    self._state, self._start = self.IN_KEY, self._pos
                elif self._depth == 2 and self._state == self.EXPECT_VALUE:
                    self._begin_value(scalar=False)
            return
        if char in "{[":
            if self._depth == 1 and char == "{":
                self._begin_call()
            elif self._depth == 2 and self._state == self.EXPECT_VALUE:
                self._begin_value(scalar=False)
                self._value_depth = 1
            elif self._depth > 2:
                self._value_depth += 1
            self._depth += 1
            return
        if char in "}]":
            if self._depth > 2:
                self._value_depth -= 1
                self._depth -= 1
                if self._depth == 2 and self._value_depth == 0 and self._state == self.IN_VALUE:
                    self._value_done(self._pos + 1, out)
                return
            if self._depth == 2 and char == "}":  # the call object closes
                if self._state == self.IN_VALUE:
                    self._value_done(self._pos, out)
                self._end_call(out)
            self._depth -= 1
            if self._depth <= 0:
                self.status = "done"
            return
        if self._depth == 2:
            if char == ":" and self._state == self.EXPECT_COLON:
                self._state = self.EXPECT_VALUE
            elif char == "," and self._state == self.IN_VALUE:
                self._value_done(self._pos, out)
                self._state = self.EXPECT_KEY
            elif char == "," and self._state == self.AFTER_VALUE:
                self._state = self.EXPECT_KEY
            elif not char.isspace() and self._state == self.EXPECT_VALUE:
                self._begin_value(scalar=True)

    def _begin_call(self) -> None:
        self._call = _Call(self._parser._next_index())
        self._state, self._key = self.EXPECT_KEY, ""
        self._arguments_start = self._arguments_end = None

    def _begin_value(self, scalar: bool) -> None:
        self._state, self._start, self._scalar, self._value_depth = self.IN_VALUE, self._pos, scalar, 0
        if self._key == "arguments":
            self._arguments_start = self._arguments_sent_to = self._pos

    def _value_done(self, end: int, out: OutputDelta) -> None:
        value = self.text[self._start: end].strip()
        self._state = self.AFTER_VALUE
        call = self._call
        if call is None:
            return
        if self._key == "name" and call.name is None:
            name = _loads_str(value)
            if name is not None:
                call.name = name
                self.named_calls += 1
                self._send_header(out)
        elif self._key == "arguments" and self._arguments_start is not None:
            self._arguments_end = end
            self._send_arguments_to(end, out, final=True)  # waits for the header if the name is to come

    def _send_header(self, out: OutputDelta) -> None:
        call = self._call
        assert call is not None and call.name is not None
        if call.index is not None and not call.sent_header:
            out.calls.append(CallDelta(call.index, self._parser._new_id(), call.name))
            call.sent_header = True
            if self._arguments_end is not None:  # they came before the name
                self._send_arguments_to(self._arguments_end, out, final=True)

    def _stream_arguments(self, out: OutputDelta) -> None:
        """Send the part of an object- or list-valued "arguments" scanned so far."""
        call = self._call
        if (call is not None and call.sent_header and self._state == self.IN_VALUE and self._key == "arguments"
                and self._arguments_start is not None and not self._scalar
                and self.text[self._arguments_start] in "{["):
            self._send_arguments_to(self._pos, out, final=False)

    def _send_arguments_to(self, end: int, out: OutputDelta, final: bool) -> None:
        call = self._call
        assert call is not None and self._arguments_start is not None
        if not call.sent_header or call.index is None:
            return
        raw = self.text[self._arguments_start: end]
        if final and raw.lstrip()[:1] not in ("{", "["):  # a JSON string holding the JSON, or null
            value = raw.strip()
            decoded = _loads_str(value)
            piece = decoded if decoded is not None else ("{}" if value == "null" else value)
        else:
            piece = self.text[self._arguments_sent_to: end]
            self._arguments_sent_to = end
        if piece:
            out.calls.append(CallDelta(call.index, arguments=piece))
            call.sent_arguments = True

    def _end_call(self, out: OutputDelta) -> None:
        call = self._call
        self._call = None
        if call is None or call.index is None:
            return
        if call.name is None:  # no name: nothing can be sent for it
            logger.debug("dropped a tool call without a name: %r", self.text[-200:])
            self._parser._unsend_index(call.index)
        elif not call.sent_arguments:
            out.calls.append(CallDelta(call.index, arguments="{}"))

    def finish(self, out: OutputDelta) -> None:
        self._stream_arguments(out)
        if self._call is not None and self._call.index is not None and not self._call.sent_header:
            self._parser._unsend_index(self._call.index)
        if self.status in ("start", "list") and self.named_calls == 0 and self.text.strip():
            out.content += self.text  # cut off before any call had a name: it was text


def _loads_str(text: str) -> str | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


class OutputParser:
    """Generated token ids -> content text and OpenAI tool-call deltas (see the module docstring).

    `fmt` None parses no calls (tool_choice "none", or a tokenizer without a tool format): everything is
    content. `max_calls` (1 for `parallel_tool_calls: false`) drops the calls after that many. `new_id` makes
    call ids (tests pass a deterministic one). `context` (a text completion's prompt) sets the spacing of the
    first content token, so that prompt + content reads as the decoded whole; without it the content is
    `Tokenizer.decode` of the output tokens (a chat reply).
    """

    def __init__(self, tokenizer: Tokenizer, fmt: ToolFormat | None = None, *, max_calls: int | None = None,
                 new_id: Callable[[], str] = random_call_id, context: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._fmt = fmt
        self._max_calls = max_calls
        self._new_id = new_id
        self._indices = 0
        self._segment: str = "content"  # content | v11-name | v11-id | v11-args | json
        self._decoder: IncrementalDecoder = tokenizer.incremental_decoder(context)
        self._name_ids: list[int] = []
        self._v11_call: _Call | None = None
        self._v11_args = _JsonValue()
        self._json: _JsonCalls | None = None
        self.content = ""
        self.call_deltas: list[CallDelta] = []

    @property
    def calls(self) -> list[ParsedCall]:
        return merge_calls(self.call_deltas)

    def _next_index(self) -> int | None:
        if self._max_calls is not None and self._indices >= self._max_calls:
            return None
        self._indices += 1
        return self._indices - 1

    def _unsend_index(self, index: int) -> None:
        if index == self._indices - 1:  # an index never announced can be given to the next call
            self._indices -= 1

    def feed(self, ids: Iterable[int]) -> OutputDelta:
        out = OutputDelta()
        fmt = self._fmt
        for token in ids:
            if fmt is not None and token == fmt.tool_calls:
                self._end_segment(out)
                self._segment = "json" if fmt.json_list else "v11-name"
                self._decoder = self._tokenizer.incremental_decoder()
                if fmt.json_list:
                    self._json = _JsonCalls(self)
                else:
                    self._name_ids = []
            elif self._segment == "content":
                out.content += self._decoder.push([token])
            elif self._segment == "json":
                assert self._json is not None
                self._json.feed(self._decoder.push([token]), out)
            elif self._segment in ("v11-name", "v11-id"):
                self._v11_token(token, out)
            else:  # v11-args
                self._v11_arguments(self._decoder.push([token]), out)
        self._record(out)
        return out

    def finish(self) -> OutputDelta:
        """The end of the output: what was held back, and the last call closed."""
        out = OutputDelta()
        self._end_segment(out)
        self._segment = "content"
        self._record(out)
        return out

    def _record(self, out: OutputDelta) -> None:
        self.content += out.content
        self.call_deltas.extend(out.calls)

    def _v11_token(self, token: int, out: OutputDelta) -> None:
        fmt = self._fmt
        assert fmt is not None
        if token == fmt.call_id:
            self._segment = "v11-id"  # the model's id is not used: calls get fresh ones
        elif token == fmt.args:
            name = self._tokenizer.decode(self._name_ids).strip()
            if not _FUNCTION_NAME.match(name):  # not a call after all: its text is content
                self._segment = "content"
                self._decoder = self._tokenizer.incremental_decoder()
                out.content += self._tokenizer.decode(self._name_ids)
                return
            call = _Call(self._next_index())
            call.name = name
            if call.index is not None:
                out.calls.append(CallDelta(call.index, self._new_id(), name))
                call.sent_header = True
            self._v11_call, self._v11_args = call, _JsonValue()
            self._segment = "v11-args"
            self._decoder = self._tokenizer.incremental_decoder()
        elif self._segment == "v11-name":
            self._name_ids.append(token)

    def _v11_arguments(self, text: str, out: OutputDelta) -> None:
        call = self._v11_call
        piece = self._v11_args.feed(text)
        if call is not None and call.index is not None and piece:
            out.calls.append(CallDelta(call.index, arguments=piece))
            call.sent_arguments = True

    def _end_segment(self, out: OutputDelta) -> None:
        if self._segment == "content":
            out.content += self._decoder.flush()
        elif self._segment == "json":
            assert self._json is not None
            self._json.feed(self._decoder.flush(), out)
            self._json.finish(out)
            self._json = None
        elif self._segment in ("v11-name", "v11-id"):
            if self._name_ids:  # cut off before [ARGS]: the text was not a call
                out.content += self._tokenizer.decode(self._name_ids)
        else:
            self._v11_arguments(self._decoder.flush(), out)
            call = self._v11_call
            if call is not None and call.index is not None and not call.sent_arguments:
                out.calls.append(CallDelta(call.index, arguments="{}"))
            self._v11_call = None


__all__ = [
    "CALL_ID_PATTERN", "CallDelta", "CallIds", "OutputDelta", "OutputParser", "ParsedCall", "ToolFormat",
    "forced_call_prefix", "merge_calls", "mistral_call_id", "random_call_id", "tool_format",
]
