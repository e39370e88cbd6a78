"""A replay endpoint: an OpenAI-compatible chat-completions server that answers with a fixed script.

It stands in for a model wherever a conversation must be reproducible: the agent loop's tests, the harness's
"model that applies the known fix" and "model that does nothing", demonstrations. It is built on the standard
library's `http.server` (not the FastAPI stack of `tramontane serve`), so the agent is also tested against an
OpenAI-compatible server that shares no code with ours.

Each `POST /v1/chat/completions` gets the next scripted assistant message (its `content` and/or `tool_calls`)
as a `chat.completion` object with a fresh id, `finish_reason` "tool_calls" or "stop", and `usage` counted as
one token per 4 characters of the request's messages and of the reply (the server has no tokenizer; the
counts are deterministic, which is what tests need). A tool call without an `id` gets a random one of 9
letters and digits (the form Mistral tokenizers accept). `GET /v1/models` lists the one model. Once the script
is used up the server answers 409, other paths 404, a body that is not a JSON object 400, a streamed request
400 (it does not stream). Every chat-completions request with a JSON body is recorded (`requests`) before it
is answered, the refused ones included.
"""

from __future__ import annotations

import json
import secrets
import string
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from tramontane.errors import ConfigError

_ALPHANUMERIC = string.ascii_letters + string.digits
_MAX_BODY = 64 * 2**20


def _reply_message(reply: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A scripted reply as an OpenAI assistant message (checked; ids filled in)."""
    unknown = set(reply) - {"role", "content", "tool_calls"}
    if unknown:
        raise ConfigError(f"replies[{index}] has key(s) {sorted(unknown)}; a reply is an assistant message with "
                          "'content' and/or 'tool_calls'")
    content = reply.get("content")
    if content is not None and not isinstance(content, str):
        raise ConfigError(f"replies[{index}].content must be a string or null")
    calls = []
    for j, call in enumerate(reply.get("tool_calls") or []):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments"), str):
            raise ConfigError(f"replies[{index}].tool_calls[{j}] must be {{'function': {{'name': str, "
                              "'arguments': str (JSON text)}}, 'id': str (optional)}")
        call_id = call.get("id") or "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": function["name"], "arguments": function["arguments"]}})
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message


class ReplayServer:
    """Serves `replies` (assistant messages), one per chat-completions request, on `host` and a free port.

    A context manager: entering starts the server in a daemon thread, leaving stops it. `url` is the base URL
    (ending in /v1); `requests` the JSON bodies of the chat-completions requests received, in order;
    `remaining` the replies not yet served.
    """

    def __init__(self, replies: Sequence[Mapping[str, Any]], *, model: str = "replay",
                 host: str = "127.0.0.1") -> None:
        self.replies = [_reply_message(r, i) for i, r in enumerate(replies)]
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self._next = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def remaining(self) -> int:
        with self._lock:
            return len(self.replies) - self._next

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()

    # -- answers ------------------------------------------------------------------------------------------------

    def _models(self) -> tuple[int, dict[str, Any]]:
        return 200, {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                 "owned_by": "replay"}]}

    def _chat(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(body)
            if body.get("stream"):
                return 400, _error("the replay server does not stream; send stream: false", "unsupported")
            if self._next >= len(self.replies):
                return 409, _error(f"the replay script is exhausted: all {len(self.replies)} replies were served",
                                   "script_exhausted")
            message = self.replies[self._next]
            self._next += 1
        prompt = len(json.dumps(body.get("messages", []))) // 4
        completion = len(json.dumps(message)) // 4
        return 200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read `requests` instead
                pass

            def _send(self, status: int, payload: Mapping[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self) -> str:
                return self.path.split("?", 1)[0].rstrip("/")

            def do_GET(self) -> None:
                if self._route() == "/v1/models":
                    self._send(*server._models())
                else:
                    self._send(404, _error(f"no route GET {self._route()}", "not_found"))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > _MAX_BODY:
                    self.close_connection = True
                    self._send(413, _error("the request body is too large", "too_large"))
                    return
                raw = self.rfile.read(length)
                if self._route() != "/v1/chat/completions":
                    self._send(404, _error(f"no route POST {self._route()}", "not_found"))
                    return
                try:
                    body = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    body = None
                if not isinstance(body, dict):
                    self._send(400, _error("the body is not a JSON object", "invalid_request"))
                    return
                self._send(*server._chat(body))

        return Handler


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
