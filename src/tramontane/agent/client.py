"""A small client for OpenAI-compatible chat-completions endpoints, on the standard library alone.

The agent talks to any server that speaks the OpenAI API (`tramontane serve`, vLLM, a hosted API) through two
routes: `GET {endpoint}/models` (the default model id) and `POST {endpoint}/chat/completions`, never streamed.
`endpoint` is the base URL the `openai` package calls `base_url`, e.g. `http://127.0.0.1:8000/v1`.

Failures become `EndpointError` with the HTTP status (None when no answer came), whether trying again may help
(connection failures, timeouts, HTTP 408, 425, 429, 500 and 502-504), OpenAI's error code when the body has one,
and a one-line summary of the error body: OpenAI's `{"error": {"message": ...}}`, FastAPI's `{"detail": ...}` or
the first characters of the text. Retrying is the caller's decision (the agent loop retries a bounded number of
times).
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tramontane.errors import ConfigError, EndpointError

_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_SUMMARY_CHARS = 500


@dataclass(frozen=True)
class ChatReply:
    """The first choice of a chat completion: the assistant `message` as OpenAI writes it (role, content,
    tool_calls), why generation stopped, and the token counts of `usage` (None when the server sent none)."""

    message: dict[str, Any]
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    raw: dict[str, Any]


class ChatClient:
    """`GET /models` and non-streamed `POST /chat/completions` against one OpenAI-compatible endpoint.

    Args:
        endpoint: the API's base URL (http or https), e.g. `http://127.0.0.1:8000/v1`.
        api_key: sent as `Authorization: Bearer KEY` when given.
        timeout: seconds to wait for the connection and for each read of the answer.
    """

    def __init__(self, endpoint: str, *, api_key: str | None = None, timeout: float = 600.0) -> None:
        parsed = urllib.parse.urlsplit(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"the endpoint {endpoint!r} is not an http(s) URL; give the API's base URL, e.g. "
                              "http://127.0.0.1:8000/v1")
        if not timeout > 0:
            raise ConfigError(f"the request timeout must be positive seconds, got {timeout}")
        self.endpoint = endpoint.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        return f"ChatClient({self.endpoint!r}, api_key={'set' if self.api_key else None}, timeout={self.timeout})"

    # -- routes -------------------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        """The model ids the endpoint lists (`GET /models`), in its order."""
        body = self._request("GET", "/models")
        data = body.get("data")
        if not isinstance(data, list):
            raise EndpointError(f"{self.endpoint}/models answered JSON without a 'data' list; is this an "
                                "OpenAI-compatible API? (the endpoint is the base URL, usually ending in /v1)")
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def default_model(self) -> str:
        """The first model id of `GET /models` (what a server with one model serves)."""
        ids = self.models()
        if not ids:
            raise EndpointError(f"{self.endpoint}/models lists no model; name one with --model")
        return ids[0]

    def chat(self, body: Mapping[str, Any], *, timeout: float | None = None) -> ChatReply:
        """One chat completion (`POST /chat/completions` with `body`, forced non-streamed); its first choice.
        `timeout` replaces the client's for this call."""
        raw = self._request("POST", "/chat/completions", {**body, "stream": False}, timeout=timeout)
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) \
                or not isinstance(choices[0].get("message"), dict):
            raise EndpointError(f"{self.endpoint}/chat/completions answered JSON without choices[0].message; "
                                f"is this an OpenAI-compatible chat API? ({_clip(json.dumps(raw))})")
        choice = choices[0]
        message = choice["message"]
        usage: dict[str, Any] = raw["usage"] if isinstance(raw.get("usage"), dict) else {}
        return ChatReply(message=_assistant_message(message), finish_reason=choice.get("finish_reason"),
                         prompt_tokens=_count(usage.get("prompt_tokens")),
                         completion_tokens=_count(usage.get("completion_tokens")), raw=raw)

    # -- transport ----------------------------------------------------------------------------------------------

    def _request(self, method: str, route: str, body: Mapping[str, Any] | None = None, *,
                 timeout: float | None = None) -> dict[str, Any]:
        url = self.endpoint + route
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            try:
                text = err.read()
            except (OSError, http.client.HTTPException):
                text = b""
            finally:
                err.close()
            raise EndpointError(f"{method} {url} failed with HTTP {err.code}: {_summary(text)}"
                                f"{_hint(err.code)}", status=err.code, retryable=err.code in _RETRYABLE_STATUS,
                                code=_error_code(text)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, reset, timed out
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            raise EndpointError(f"{method} {url} got no answer ({_clip(str(reason)) or type(reason).__name__}); "
                                "is the server running and the endpoint right?", status=None,
                                retryable=True) from None
        try:
            decoded = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EndpointError(f"{method} {url} answered something that is not JSON ({_summary(payload)}); is "
                                "the endpoint an OpenAI-compatible API?") from None
        if not isinstance(decoded, dict):
            raise EndpointError(f"{method} {url} answered a JSON {type(decoded).__name__}, not an object")
        return decoded


def _assistant_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI fields of an assistant message, normalised: content a string or None, tool_calls a list of
    {id, type, function: {name, arguments}} or left out (servers differ in what they send for "none")."""
    content = message.get("content")
    if isinstance(content, list):  # a list of text parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    out: dict[str, Any] = {"role": "assistant", "content": content if isinstance(content, str) else None}
    calls = []
    for call in message.get("tool_calls") or []:
        if not isinstance(call, dict):
            continue
        function: dict[str, Any] = call["function"] if isinstance(call.get("function"), dict) else {}
        arguments = function.get("arguments")
        if not isinstance(arguments, str):  # some servers send the object itself
            arguments = json.dumps(arguments) if arguments is not None else ""
        calls.append({"id": call.get("id") if isinstance(call.get("id"), str) else "", "type": "function",
                      "function": {"name": str(function.get("name") or ""), "arguments": arguments}})
    if calls:
        out["tool_calls"] = calls
    return out


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SUMMARY_CHARS else text[:_SUMMARY_CHARS] + "..."


def _summary(body: bytes) -> str:
    """One line from an error body: the message of OpenAI's or FastAPI's error shape, else the text."""
    text = body.decode("utf-8", errors="replace")
    try:
        decoded = json.loads(text)
    except json.JSONDecodeError:
        return _clip(text) or "(empty body)"
    if isinstance(decoded, dict):
        error = decoded.get("error")
        if isinstance(error, dict) and error.get("message"):
            return _clip(str(error["message"]))
        if isinstance(error, str):
            return _clip(error)
        if "detail" in decoded:
            return _clip(json.dumps(decoded["detail"]) if not isinstance(decoded["detail"], str)
                         else decoded["detail"])
    return _clip(text)


def _error_code(body: bytes) -> str | None:
    """The `error.code` of OpenAI's error shape, if the body has one."""
    try:
        decoded = json.loads(body.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return None
    error = decoded.get("error") if isinstance(decoded, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _hint(status: int) -> str:
    if status == 401:
        return " (give the server's key with --api-key)"
    if status == 404:
        return " (the endpoint is the API's base URL, usually ending in /v1; --model must be an id of GET /models)"
    return ""
