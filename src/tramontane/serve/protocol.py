"""The OpenAI API subset `tramontane serve` speaks, as pydantic models: requests (chat completions,
completions, transcriptions), responses, streamed chunks and errors. Only the wire format lives here; what a
request does is `app.py`'s (vLLM keeps `entrypoints/openai/protocol.py` apart from its serving code the same way).

Requests ignore fields they do not know (clients send many); a known field whose value asks for something the
server cannot do (penalties, logit bias, JSON mode: they need logits processors or guided decoding) is refused
with a 400 by `unsupported()`, never silently ignored. Bounds that need the model (its context, vocabulary) are
checked by the app.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tramontane.errors import TramontaneError

# Function names as mistral_common accepts them (its validator's rule) and OpenAI documents them.
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_STOP = 16  # stop strings per request
MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and the engine's default `max_logprobs`
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit
INT64 = 2**63


class ApiError(TramontaneError):
    """A request the server answers with an HTTP error in OpenAI's shape (`ErrorResponse`)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code))


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# -- chat messages --------------------------------------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str = Field(description="a data: URL (data:image/png;base64,...); http(s) URLs only when the server "
                                 "allows remote media")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Request):
    data: str = Field(description="base64-encoded audio file")
    format: Literal["wav", "mp3", "flac", "ogg"] = "wav"


class AudioPart(_Request):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class SystemMessage(_Request):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Request):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None


class FunctionCall(_Request):
    name: str
    arguments: str = Field(description="the arguments as a JSON text")


class ToolCall(_Request):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Request):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None


class ToolMessage(_Request):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str = Field(min_length=1)
    name: str | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


# -- tools ----------------------------------------------------------------------------------------------------


class FunctionDefinition(_Request):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Request):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = "text"


# -- requests -------------------------------------------------------------------------------------------------


class _Sampling(_Request):
    """What chat and text completions share."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def sampling_problems(self) -> list[tuple[str, str]]:
        """(param, message) for each asked-for feature the server does not implement, or misuse."""
        out = []
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                out.append((name, f"{name} is not supported by this server (leave it out or 0)"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported by this server"))
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            out.append(("stop", f"at most {MAX_STOP} stop strings, got {len(stops)}"))
        if self.stream_options is not None and not self.stream:
            out.append(("stream_options", "stream_options is only allowed with stream=true"))
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI: max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = self.sampling_problems()
        if self.top_logprobs and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs needs logprobs=true"))
        if self.response_format is not None and self.response_format.type != "text":
            out.append(("response_format", (f"response_format {self.response_format.type!r} needs guided "
                                            "decoding, which this server does not do; use 'text'")))
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            out.append(("tool_choice", "tool_choice needs tools"))
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            names = [t.function.name for t in self.tools]
            if self.tool_choice.function.name not in names:
                out.append(("tool_choice", (f"tool_choice names function {self.tool_choice.function.name!r}, "
                                            f"which is not among the tools ({', '.join(names)})")))
        if self.tools:
            names = [t.function.name for t in self.tools]
            if len(set(names)) != len(names):
                out.append(("tools", "tool function names must be unique"))
        return out

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def effective_tool_choice(self) -> ToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=1, description="default 16, as OpenAI's")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def unsupported(self) -> list[tuple[str, str]]:
        out = self.sampling_problems()
        if self.echo:
            out.append(("echo", "echo is not supported by this server"))
        if self.suffix:
            out.append(("suffix", "suffix (fill-in-the-middle) is not supported by this server"))
        if self.best_of is not None and self.best_of != self.n:
            out.append(("best_of", "best_of is not supported by this server (leave it out or equal to n)"))
        return out


# -- responses ------------------------------------------------------------------------------------------------


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None = None


class ResponseFunctionCall(_Response):
    name: str
    arguments: str


class ResponseToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(_Response):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TranscriptionResponse(_Response):
    text: str


class PrivacySummary(_Response):
    epsilon: float
    delta: float
    privacy_unit: str
    accountant: str
    card: str = Field(description="the route of the full privacy card")


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tramontane"
    max_model_len: int
    kind: Literal["text", "vision", "audio"]
    privacy: PrivacySummary | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


__all__ = [
    "ApiError", "AssistantMessage", "AudioPart", "ChatChoice", "ChatCompletionChunk", "ChatCompletionRequest",
    "ChatCompletionResponse", "ChoiceLogprobs", "ChunkChoice", "CompletionChoice", "CompletionLogprobs",
    "CompletionRequest", "CompletionResponse", "ContentPart", "DeltaFunctionCall", "DeltaMessage",
    "DeltaToolCall", "ErrorInfo", "ErrorResponse", "FunctionCall", "FunctionDefinition", "ImagePart",
    "ImageURL", "InputAudio", "Message", "ModelCard", "ModelList", "NamedToolChoice", "PrivacySummary",
    "ResponseFunctionCall", "ResponseMessage", "ResponseToolCall", "StreamOptions", "SystemMessage",
    "TextPart", "TokenLogprob", "Tool", "ToolCall", "ToolChoice", "ToolMessage", "TopLogprob",
    "TranscriptionResponse", "Usage", "UserMessage",
]
