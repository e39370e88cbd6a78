"""OpenAI chat requests -> what the engine runs: prompt ids from mistral_common's chat template (always; the
server has no other), images and audio decoded under the server's limits, tool-call ids mapped to
mistral_common's format, `tool_choice` applied, and the input embeddings of a multimodal prompt.

`tool_choice`: "none" leaves the tools out of the prompt and parses no calls; "auto" puts them in and parses
what the model writes; "required" and a named function also append the assistant tokens that open a call
(`tools.forced_call_prefix`: `[TOOL_CALLS]`, or the whole call header up to the arguments). vLLM meets these
two with guided decoding (a JSON-schema grammar on the sampler), which this server does not do: the call is
started for the model, not constrained, so a model may still write arguments that are not valid JSON (or, for
"required", a name that is not a tool), which come back as written.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import torch

from tramontane.errors import DataError, TokenizerError
from tramontane.serve import protocol as api
from tramontane.serve.loading import ServedModel
from tramontane.serve.tools import CallIds, ToolFormat, forced_call_prefix, tool_format

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaLimits:
    """What a request may bring: remote URLs (off by default: the server would fetch what a client names,
    a request forgery risk), bytes per image or audio, pixels per image."""

    allow_remote: bool = False
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    timeout_s: float = 10.0


@dataclass
class ChatPrompt:
    tokens: list[int]  # the prompt ids, the forced assistant tokens included
    forced: list[int]  # assistant tokens appended for tool_choice; the output parser reads them first
    tool_format: ToolFormat | None  # None: the output is plain text
    images: list[torch.Tensor] = field(default_factory=list)  # [C, H, W] each, in prompt order
    audio: list[Any] = field(default_factory=list)  # mistral_common `Audio`s as its encoder prepared them
    ids: CallIds = field(default_factory=CallIds)


def _text(content: str | list[api.TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def _fetch(url: str, limits: MediaLimits, what: str) -> bytes:
    """The bytes behind a data: URL, or (when allowed) an http(s) URL; `ApiError` 400 / 413 otherwise."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise api.ApiError(400, f"{what}: a data URL must be base64, e.g. data:image/png;base64,...")
        if len(payload) * 3 // 4 > limits.max_bytes:
            raise api.ApiError(413, f"{what} is larger than the server's limit of {limits.max_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise api.ApiError(400, f"{what}: the data URL is not valid base64") from None
    if not url.startswith(("http://", "https://")):
        raise api.ApiError(400, f"{what}: expected a data: URL (or http(s) when the server allows it)")
    if not limits.allow_remote:
        raise api.ApiError(400, f"{what}: remote URLs are disabled on this server (it was not started with "
                                "--allow-remote-media); send the file inline as a data: URL")
    try:
        with urllib.request.urlopen(url, timeout=limits.timeout_s) as response:  # http(s) only, checked above
            data: bytes = response.read(limits.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise api.ApiError(400, f"{what}: cannot fetch {url} ({err})") from None
    if len(data) > limits.max_bytes:
        raise api.ApiError(413, f"{what} is larger than the server's limit of {limits.max_bytes} bytes")
    return data


def _image(data: bytes, limits: MediaLimits, what: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise api.ApiError(400, f"cannot read {what} ({type(exc).__name__}: {exc}); send a PNG, JPEG, WebP or "
                                "other image PIL can open") from None
    if image.width * image.height > limits.max_pixels:
        raise api.ApiError(413, f"{what} has {image.width}x{image.height} pixels, more than the server's limit "
                                f"of {limits.max_pixels}")
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - any failure to decode untrusted bytes is a bad image
        raise api.ApiError(400, f"cannot decode {what} ({type(exc).__name__}: {exc})") from None
    return image


def _audio(part: api.AudioPart, limits: MediaLimits, what: str) -> Any:
    from tramontane.models.audio import audio_chunk, decode_audio

    data = _fetch(f"data:audio/{part.input_audio.format};base64,{part.input_audio.data}", limits, what)
    return audio_chunk(decode_audio(data, what))


def _user_content(message: api.UserMessage, served: ServedModel, limits: MediaLimits, row: int) -> Any:
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk

    if isinstance(message.content, str):
        return message.content
    chunks: list[Any] = []
    for i, part in enumerate(message.content):
        what = f"messages[{row}].content[{i}]"
        if isinstance(part, api.TextPart):
            chunks.append(TextChunk(text=part.text))
        elif isinstance(part, api.ImagePart):
            if served.kind != "vision":
                raise api.ApiError(400, f"{what}: model {served.name!r} does not read images (a {served.kind} "
                                        "model)", param=f"messages.{row}.content")
            chunks.append(ImageChunk(image=_image(_fetch(part.image_url.url, limits, what), limits, what)))
        else:
            if served.kind != "audio":
                raise api.ApiError(400, f"{what}: model {served.name!r} does not hear audio (a {served.kind} "
                                        "model)", param=f"messages.{row}.content")
            try:
                chunks.append(_audio(part, limits, what))
            except DataError as err:
                raise api.ApiError(400, str(err), param=f"messages.{row}.content") from None
    return chunks


def _mistral_messages(request: api.ChatCompletionRequest, served: ServedModel, limits: MediaLimits,
                      ids: CallIds) -> list[Any]:
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall

    out: list[Any] = []
    names: dict[str, str] = {}  # mistral call id -> function name (v2 tool results carry the name)
    for row, message in enumerate(request.messages):
        if isinstance(message, api.SystemMessage):
            out.append(SystemMessage(content=_text(message.content)))
        elif isinstance(message, api.UserMessage):
            out.append(UserMessage(content=_user_content(message, served, limits, row)))
        elif isinstance(message, api.AssistantMessage):
            if message.tool_calls:
                calls = []
                for call in message.tool_calls:
                    mistral_id = ids.to_mistral(call.id)
                    names[mistral_id] = call.function.name
                    calls.append(ToolCall(id=mistral_id, function=FunctionCall(
                        name=call.function.name, arguments=call.function.arguments)))
                if _text(message.content).strip():  # mistral_common encodes one or the other
                    logger.debug("messages[%d]: content beside tool calls is not encoded", row)
                out.append(AssistantMessage(tool_calls=calls))
            else:
                out.append(AssistantMessage(content=_text(message.content)))
        else:
            mistral_id = ids.to_mistral(message.tool_call_id)
            out.append(ToolMessage(content=_text(message.content), tool_call_id=mistral_id,
                                   name=message.name or names.get(mistral_id)))
    return out


def chat_prompt(served: ServedModel, request: api.ChatCompletionRequest,
                limits: MediaLimits = MediaLimits()) -> ChatPrompt:
    """The prompt of a chat request (`ApiError` 400 / 413 for what the server cannot take)."""
    choice = request.effective_tool_choice
    fmt = tool_format(served.tokenizer)
    if request.tools and choice != "none" and fmt is None:
        raise api.ApiError(400, f"model {served.name!r} has a {served.tokenizer.version} tokenizer, which has "
                                "no tool-call format; leave out tools", param="tools")
    ids = CallIds()
    try:
        messages = _mistral_messages(request, served, limits, ids)
    except (ValueError, TypeError, AssertionError) as err:  # mistral_common's own checks of a message
        raise api.ApiError(400, ids.restore(f"invalid message: {err}"), param="messages") from None
    tools = None
    if request.tools and choice != "none":
        tools = [{"type": "function", "function": {
            "name": t.function.name, "description": t.function.description or "",
            "parameters": t.function.parameters or {"type": "object", "properties": {}}}}
            for t in request.tools]
    try:
        tokenized = served.tokenizer.encode_chat_full(messages, tools)
    except TokenizerError as err:
        raise api.ApiError(400, ids.restore(str(err)), param="messages") from None
    forced: list[int] = []
    if fmt is not None and tools is not None and choice == "required":
        forced = forced_call_prefix(served.tokenizer, fmt)
    elif fmt is not None and tools is not None and isinstance(choice, api.NamedToolChoice):
        forced = forced_call_prefix(served.tokenizer, fmt, choice.function.name)
    images = [torch.from_numpy(image.copy()) for image in tokenized.images]
    return ChatPrompt(list(tokenized.tokens) + forced, forced, fmt if tools is not None else None, images,
                      list(tokenized.audios), ids)


def prompt_embeddings(served: ServedModel, prompt: ChatPrompt, max_tokens: int) -> torch.Tensor | None:
    """The input embeddings [T, dim] of a prompt with images or audio (None for text): the Pixtral vision
    encoder's or Voxtral audio encoder's outputs in place of the placeholder tokens."""
    from tramontane.generation.multimodal import prompt_embeddings as splice

    if served.kind == "vision" and prompt.images:
        from tramontane.models.vision import VisionLanguageModel

        assert isinstance(served.model, VisionLanguageModel)
        with torch.inference_mode():
            return splice(served.model, prompt.tokens, prompt.images, max_tokens)
    if served.kind == "audio" and prompt.audio:
        from tramontane.models.audio import Voxtral, audio_features

        assert isinstance(served.model, Voxtral)
        with torch.inference_mode():
            features = torch.cat([audio_features(a, served.model.audio_args) for a in prompt.audio])
            return splice(served.model, prompt.tokens, features, max_tokens)
    return None


__all__ = ["ChatPrompt", "MediaLimits", "chat_prompt", "prompt_embeddings"]
