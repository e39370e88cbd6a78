"""From engine token events to OpenAI choices: each choice's tokens go through the output parser (content and
tool calls, `tools.OutputParser`), stop strings and logprobs, and come out as streamed deltas; a non-streamed
response is the same deltas merged, so streamed and non-streamed output cannot differ.

Stop strings are matched on the decoded content (not inside tool-call arguments, which may legitimately hold
them): the text that could still begin one is held back, and at a match the request is cancelled and the
text cut before the stop string, as OpenAI does. `completion_tokens` counts every token the engine generated
for the choice (a stop token, and the tokens of a matched stop string, included; a tool_choice's forced call
opening is prompt).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field

from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from tramontane.serve import protocol as api
from tramontane.serve.engine import RequestStream, TokenEvent
from tramontane.serve.tools import CallDelta, OutputDelta, OutputParser, merge_calls
from tramontane.tokenizer import Tokenizer

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class StopStrings:
    """Finds the first stop string in streamed text; holds back the tail that could still begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text that is safe to send, whether a stop string was found: then nothing after it is sent)."""
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        cut = max(len(self._pending) - self._hold, 0)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


@dataclass
class TokenInfo:
    """One generated token for the logprobs fields: its text, bytes, log-probability and top alternatives."""

    text: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]]


@dataclass
class ChoiceDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    error: api.ApiError | None = None

    def __bool__(self) -> bool:
        return bool(self.content or self.calls or self.tokens or self.finish_reason or self.error)


def token_text(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    """A token as the logprobs fields show it: its text (sentencepiece's "▁" as a space, byte pieces as the
    byte) and its UTF-8 bytes (a piece of a character decodes with U+FFFD in `text`)."""
    raw = tokenizer.mistral.instruct_tokenizer.tokenizer
    if isinstance(raw, Tekkenizer):
        data = raw.id_to_byte_piece(token, SpecialTokenPolicy.KEEP)
    else:
        piece = raw.id_to_piece(token)
        byte = _BYTE_PIECE.match(piece)
        data = bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()
    return data.decode("utf-8", errors="replace"), list(data)


class ChoiceRun:
    """One choice: an engine stream, its output parser, stop strings and logprobs."""

    def __init__(self, index: int, stream: RequestStream, tokenizer: Tokenizer, parser: OutputParser,
                 stops: Sequence[str] = (), logprobs: bool = False, opening: OutputDelta | None = None) -> None:
        self.index = index
        self.stream = stream
        self.completion_tokens = 0
        self._tokenizer = tokenizer
        self._parser = parser
        self._stops = StopStrings(stops)
        self._logprobs = logprobs
        self._opening = opening or OutputDelta()

    def _token_info(self, event: TokenEvent) -> TokenInfo:
        assert event.token is not None and event.logprob is not None
        text, data = token_text(self._tokenizer, event.token)
        top = [(*token_text(self._tokenizer, t), lp) for t, lp in event.top_logprobs or ()]
        return TokenInfo(text, data, event.logprob, top)

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """The choice's deltas; the last one has a finish_reason (or an error)."""
        if self._opening:
            yield ChoiceDelta(self._opening.content, list(self._opening.calls))
        reason: str | None = None
        stopped = False
        async for event in self.stream:
            delta, infos = OutputDelta(), []
            if event.token is not None:
                self.completion_tokens += 1
                if event.finish_reason != "stop":  # a stop token is not output
                    delta = self._parser.feed([event.token])
                    if self._logprobs and event.logprob is not None:
                        infos.append(self._token_info(event))
            text, stopped = self._stops.push(delta.content)
            if stopped:
                self.stream.cancel()
                yield ChoiceDelta(text, delta.calls, infos)
                reason = "stop"
                break
            reason = event.finish_reason
            if reason in ("cancelled", "error"):
                message = event.error or "the request was cancelled (the server is shutting down)"
                status = 503 if reason == "cancelled" else 500
                yield ChoiceDelta(text, delta.calls, infos, error=api.ApiError(
                    status, message, type="server_error" if status == 500 else "service_unavailable"))
                return
            if text or delta.calls or infos:
                yield ChoiceDelta(text, delta.calls, infos)
            if reason is not None:
                break
        tail = OutputDelta()
        if not stopped:
            tail = self._parser.finish()
            text, stopped = self._stops.push(tail.content)
            tail.content = text if stopped else text + self._stops.flush()
        if reason == "stop" and not stopped and self._parser.call_deltas:
            reason = "tool_calls"
        yield ChoiceDelta(tail.content, tail.calls, finish_reason=reason or "stop")


async def merged(runs: Sequence[ChoiceRun]) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    """The deltas of several choices as they come, tagged with the choice index. Closing the iterator early
    cancels every choice's engine request."""
    queue: asyncio.Queue[tuple[int, ChoiceDelta | None]] = asyncio.Queue()

    async def pump(run: ChoiceRun) -> None:
        try:
            async for delta in run.deltas():
                queue.put_nowait((run.index, delta))
        finally:
            queue.put_nowait((run.index, None))

    tasks = [asyncio.create_task(pump(run)) for run in runs]
    try:
        running = len(runs)
        while running:
            index, delta = await queue.get()
            if delta is None:
                running -= 1
            else:
                yield index, delta
    finally:
        for run in runs:
            run.stream.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- OpenAI shapes --------------------------------------------------------------------------------------------


def chat_logprobs(tokens: Sequence[TokenInfo]) -> api.ChoiceLogprobs:
    return api.ChoiceLogprobs(content=[
        api.TokenLogprob(token=t.text, logprob=t.logprob, bytes=t.bytes,
                         top_logprobs=[api.TopLogprob(token=s, logprob=lp, bytes=b) for s, b, lp in t.top])
        for t in tokens])


def completion_logprobs(tokens: Sequence[TokenInfo], offset: int = 0) -> api.CompletionLogprobs:
    out = api.CompletionLogprobs(top_logprobs=[])
    for t in tokens:
        out.tokens.append(t.text)
        out.token_logprobs.append(t.logprob)
        assert out.top_logprobs is not None
        out.top_logprobs.append({s: lp for s, _, lp in t.top})
        out.text_offset.append(offset)
        offset += len(t.text)
    return out


def delta_tool_calls(calls: Sequence[CallDelta]) -> list[api.DeltaToolCall]:
    """Call deltas as OpenAI's, consecutive pieces of one call joined."""
    out: list[api.DeltaToolCall] = []
    for call in calls:
        last = out[-1] if out else None
        if last is not None and last.index == call.index and call.id is None:
            last.function.arguments = (last.function.arguments or "") + call.arguments
            continue
        out.append(api.DeltaToolCall(
            index=call.index, id=call.id, type="function" if call.id is not None else None,
            function=api.DeltaFunctionCall(name=call.name, arguments=call.arguments)))
    return out


@dataclass
class Collected:
    """A whole choice, merged from its deltas."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.content += delta.content
        self.calls.extend(delta.calls)
        self.tokens.extend(delta.tokens)
        self.finish_reason = delta.finish_reason or self.finish_reason

    def message(self) -> api.ResponseMessage:
        calls = [api.ResponseToolCall(id=c.id, function=api.ResponseFunctionCall(name=c.name,
                                                                                 arguments=c.arguments))
                 for c in merge_calls(self.calls)]
        return api.ResponseMessage(content=self.content if self.content or not calls else None,
                                   tool_calls=calls or None)


async def collect(runs: Sequence[ChoiceRun]) -> list[Collected]:
    """Every choice whole; `ApiError` if one failed."""
    out = [Collected() for _ in runs]
    async for index, delta in merged(runs):
        if delta.error is not None:
            raise delta.error
        out[index].add(delta)
    return out


def usage(prompt_tokens: int, runs: Sequence[ChoiceRun]) -> api.Usage:
    completion = sum(run.completion_tokens for run in runs)
    return api.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                     total_tokens=prompt_tokens + completion)


def sse(payload: api.ChatCompletionChunk | api.CompletionResponse | api.ErrorResponse) -> str:
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def chat_stream(runs: Sequence[ChoiceRun], *, request_id: str, model: str, prompt_tokens: int,
                      include_usage: bool, logprobs: bool) -> AsyncGenerator[str, None]:
    """The server-sent events of a streamed chat completion."""
    created = api.now()

    def chunk(choices: list[api.ChunkChoice], usage_: api.Usage | None = None) -> str:
        return sse(api.ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices,
                                           usage=usage_))

    for run in runs:
        yield chunk([api.ChunkChoice(index=run.index, delta=api.DeltaMessage(role="assistant", content=""))])
    async for index, delta in merged(runs):
        if delta.error is not None:
            yield sse(delta.error.response())
            break
        message = api.DeltaMessage(content=delta.content or None,
                                   tool_calls=delta_tool_calls(delta.calls) or None)
        yield chunk([api.ChunkChoice(index=index, delta=message, finish_reason=delta.finish_reason,
                                     logprobs=chat_logprobs(delta.tokens) if logprobs and delta.tokens else None)])
    else:
        if include_usage:
            yield chunk([], usage(prompt_tokens, runs))
    yield SSE_DONE


async def completion_stream(runs: Sequence[ChoiceRun], *, request_id: str, model: str, prompt_tokens: int,
                            include_usage: bool, logprobs: bool) -> AsyncGenerator[str, None]:
    """The server-sent events of a streamed text completion."""
    created = api.now()
    offsets = [0] * len(runs)
    async for index, delta in merged(runs):
        if delta.error is not None:
            yield sse(delta.error.response())
            break
        lp = completion_logprobs(delta.tokens, offsets[index]) if logprobs and delta.tokens else None
        offsets[index] += len(delta.content)
        yield sse(api.CompletionResponse(id=request_id, created=created, model=model, choices=[
            api.CompletionChoice(index=index, text=delta.content, logprobs=lp,
                                 finish_reason=delta.finish_reason)]))
    else:
        if include_usage:
            yield sse(api.CompletionResponse(id=request_id, created=created, model=model, choices=[],
                                             usage=usage(prompt_tokens, runs)))
    yield SSE_DONE


__all__ = [
    "ChoiceDelta", "ChoiceRun", "Collected", "StopStrings", "TokenInfo", "chat_logprobs", "chat_stream",
    "collect", "completion_logprobs", "completion_stream", "delta_tool_calls", "merged", "token_text", "usage",
]
