"""The OpenAI-compatible HTTP app (`tramontane serve`, as `vllm serve`): routes over one `ServedModel` and its
continuous-batching `Engine`, started and stopped with the app's lifespan.

    GET  /health                       liveness, never behind the API key
    GET  /v1/models, /v1/models/{id}   the served model; with a DP fine-tune's ledger, its privacy summary
    GET  /v1/models/{id}/privacy       the privacy card of that ledger (404 without one)
    POST /v1/chat/completions          chat (text, images for Pixtral, audio for Voxtral, tools), streamed or not
    POST /v1/completions               plain completion of a text or of token ids
    POST /v1/audio/transcriptions      speech to text (Voxtral)
    GET  /metrics                      Prometheus text: queue, running, tokens/s, time-to-first-token histogram

Every error is OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request
(validation errors included), 401 without the API key, 404 for an unknown model or route, 413 for a body or
media over the limits, 429 when the engine's queue is full, 503 while it shuts down, and 500 only for a fault
of the server itself (logged). A client that disconnects cancels its engine requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from tramontane.errors import (
    DataError,
    EngineStoppedError,
    PromptTooLongError,
    QueueFullError,
    TramontaneError,
)
from tramontane.serve import protocol as api
from tramontane.serve.engine import Engine, EngineConfig, EngineRequest, RequestStream
from tramontane.serve.loading import ServedModel
from tramontane.serve.metrics import CONTENT_TYPE, ServerMetrics
from tramontane.serve.prompt import MediaLimits, chat_prompt, prompt_embeddings
from tramontane.serve.serving import (
    ChoiceRun,
    chat_logprobs,
    chat_stream,
    collect,
    completion_logprobs,
    completion_stream,
    usage,
)
from tramontane.serve.tools import OutputParser

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 32 * 2**20
DEFAULT_MAX_MEDIA_BYTES = 20 * 2**20
DEFAULT_ENGINE_CONFIG = EngineConfig()
OPEN_PATHS = frozenset({"/health"})  # never behind the API key
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": api.ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def error_response(status: int, message: str, *, param: str | None = None, type: str | None = None,
                   code: str | None = None) -> JSONResponse:
    kind = type or {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                    500: "server_error", 503: "service_unavailable"}.get(status, "invalid_request_error")
    body = api.ErrorResponse(error=api.ErrorInfo(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


def _status_of(exc: TramontaneError) -> int:
    if isinstance(exc, api.ApiError):
        return exc.status
    if isinstance(exc, QueueFullError):
        return 429
    if isinstance(exc, EngineStoppedError):
        return 503
    return 400  # GenerationError (PromptTooLongError), TokenizerError, DataError, ConfigError: the request's


class _Guard:
    """Pure ASGI middleware around every route: the API key, the body limit, the one place where an
    unexpected exception becomes a logged 500, and the request counters of /metrics."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], api_key: str | None,
                 max_body_bytes: int, metrics: ServerMetrics) -> None:
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        api_key = None if self.api_key is None else self.api_key.encode()
        status: list[int] = []

        async def send_tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        async def reply(response: Response) -> None:
            await response(scope, receive, send_tracked)

        try:
            if api_key is not None and scope["path"] not in OPEN_PATHS:
                scheme, _, token = headers.get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), api_key):
                    await reply(error_response(401, "missing or wrong API key: send the header 'Authorization: "
                                                    "Bearer <key>'", code="invalid_api_key"))
                    return
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_body_bytes:
                await reply(error_response(413, f"the request body ({length} bytes) is larger than the server's "
                                                f"limit of {self.max_body_bytes} bytes"))
                return
            received = 0

            async def receive_limited() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise HTTPException(413, f"the request body is larger than the server's limit of "
                                                 f"{self.max_body_bytes} bytes")
                return message

            await self.app(scope, receive_limited, send_tracked)
        except ClientDisconnect:  # the client left mid-response: its engine requests are cancelled already
            logger.debug("client disconnected from %s", scope.get("path"))
        except Exception:
            logger.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if not status:
                await reply(error_response(500, "internal server error; see the server log"))
        finally:
            route = scope.get("route")
            self.metrics.observe_request(getattr(route, "path", "unmatched"), status[0] if status else 0)


class _Server:
    """The app's state: the model, its engine and the request-independent settings."""

    def __init__(self, served: ServedModel, config: EngineConfig, limits: MediaLimits) -> None:
        self.served, self.config, self.limits = served, config, limits
        self.engine = Engine(served.text_model, config)
        self.metrics = ServerMetrics()
        self._privacy: dict[str, Any] | None = None
        self._privacy_lock = asyncio.Lock()

    # -- checks -------------------------------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model != self.served.name:
            raise api.ApiError(404, f"the model {model!r} does not exist; this server serves "
                                    f"{self.served.name!r}", param="model", code="model_not_found")

    def budget(self, prompt_tokens: int, asked: int | None, what: str) -> int:
        """max_tokens for a prompt of `prompt_tokens`: `asked`, or the rest of the context; 400 if it does not
        fit (`max_model_len` named, as OpenAI and vLLM do)."""
        limit = self.config.max_model_len
        if asked is None and prompt_tokens >= limit:
            raise api.ApiError(400, f"This model's maximum context length is {limit} tokens, but the {what} "
                                    f"take {prompt_tokens} tokens (max_model_len={limit}); shorten them",
                               param=what, code="context_length_exceeded")
        if asked is not None and prompt_tokens + asked > limit:
            raise api.ApiError(400, f"This model's maximum context length is {limit} tokens "
                                    f"(max_model_len={limit}). However, you requested {prompt_tokens + asked} "
                                    f"tokens ({prompt_tokens} in the {what}, {asked} in the completion); reduce "
                                    "the length of the prompt or of max_tokens", param="max_tokens",
                               code="context_length_exceeded")
        return asked if asked is not None else limit - prompt_tokens

    # -- engine ------------------------------------------------------------------------------------------

    def submit(self, prompt: list[int], n: int, max_tokens: int, temperature: float, top_p: float,
               seed: int | None, logprobs: int | None, embeddings: Any = None) -> list[RequestStream]:
        """n engine requests for one prompt (seed + i for choice i); none stays queued if one is refused."""
        streams: list[RequestStream] = []
        try:
            for i in range(n):
                streams.append(self.engine.submit(EngineRequest(
                    prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                    seed=None if seed is None else seed + i, stop_token_ids=(self.served.tokenizer.eos_id,),
                    logprobs=logprobs, embeddings=embeddings)))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    def finished(self, runs: Sequence[ChoiceRun]) -> None:
        for run in runs:
            run.stream.cancel()  # a no-op for an ended stream
            if run.stream.ttft is not None:
                self.metrics.ttft.observe(run.stream.ttft)

    @contextlib.asynccontextmanager
    async def watching(self, request: Request, runs: Sequence[ChoiceRun]) -> AsyncIterator[None]:
        """Cancel the runs' engine requests if the client disconnects meanwhile."""

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            for run in runs:
                run.stream.cancel()

        watcher = asyncio.create_task(watch())
        try:
            yield
        finally:
            watcher.cancel()
            self.finished(runs)

    def streaming(self, request: Request, runs: Sequence[ChoiceRun],
                  events: AsyncGenerator[str, None]) -> Response:
        async def body() -> AsyncIterator[str]:
            async with self.watching(request, runs), contextlib.aclosing(events) as items:
                async for item in items:
                    yield item

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- privacy ------------------------------------------------------------------------------------------

    async def privacy(self) -> dict[str, Any] | None:
        """The statement and card of the served weights' ledger, computed once (composing a long ledger
        under the PLD accountant can take seconds)."""
        record = self.served.privacy
        if record is None:
            return None
        async with self._privacy_lock:
            if self._privacy is None:
                self._privacy = await asyncio.to_thread(_privacy_card, record)
        return self._privacy


def _privacy_card(record: dict[str, Any]) -> dict[str, Any]:
    from tramontane.accounting import PrivacyStatement
    from tramontane.audit.card import privacy_card

    statement = PrivacyStatement.of(record["ledger"], record["delta"], record.get("accountant", "rdp"),
                                    target_epsilon=record.get("target_epsilon"))
    card = json.loads(json.dumps(privacy_card(statement), default=float))
    return {"epsilon": statement.epsilon, "delta": statement.delta, "accountant": statement.accountant,
            "privacy_unit": record.get("privacy_unit", "example"), "target_epsilon": record.get("target_epsilon"),
            "max_examples_per_user": record.get("max_examples_per_user"), "card": card,
            "ledger": record["ledger"].to_dict()}


def create_app(served: ServedModel, *, engine_config: EngineConfig = DEFAULT_ENGINE_CONFIG, api_key: str | None = None,
               allow_remote_media: bool = False, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES) -> FastAPI:
    """The app serving `served`. Its engine (`app.state.engine`) starts and stops with the app's lifespan
    (or call its `start()` yourself when the ASGI server runs none). `max_model_len` is capped at the
    checkpoint's own context length when its config states one."""
    if served.max_seq_len is not None and served.max_seq_len < engine_config.max_model_len:
        logger.info("max_model_len %d capped at the model's context length %d", engine_config.max_model_len,
                    served.max_seq_len)
        engine_config = dataclasses.replace(engine_config, max_model_len=served.max_seq_len)
    server = _Server(served, engine_config, MediaLimits(allow_remote_media, max_media_bytes))
    tokenizer = served.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.shutdown)

    app = FastAPI(title="tramontane", summary="OpenAI-compatible server for Mistral-family models",
                  lifespan=lifespan)
    app.state.server = server
    app.state.engine = server.engine
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=server.metrics)

    @app.exception_handler(TramontaneError)
    async def library_error(request: Request, exc: TramontaneError) -> JSONResponse:
        if isinstance(exc, api.ApiError):
            return error_response(exc.status, exc.message, param=exc.param, type=exc.type, code=exc.code)
        status = _status_of(exc)
        code = "context_length_exceeded" if isinstance(exc, PromptTooLongError) else None
        return error_response(status, str(exc), code=code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
        where = ".".join(loc)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        return error_response(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid')}{more}",
                              param=where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    # -- routes --------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    async def model_card() -> api.ModelCard:
        privacy = await server.privacy()
        summary = None if privacy is None else api.PrivacySummary(
            epsilon=privacy["epsilon"], delta=privacy["delta"], privacy_unit=privacy["privacy_unit"],
            accountant=privacy["accountant"], card=f"/v1/models/{served.name}/privacy")
        return api.ModelCard(id=served.name, created=served.created, max_model_len=server.config.max_model_len,
                             kind=served.kind, privacy=summary)

    @app.get("/v1/models", response_model=api.ModelList, responses=_ERRORS)
    async def list_models() -> api.ModelList:
        return api.ModelList(data=[await model_card()])

    @app.get("/v1/models/{model_id}", response_model=api.ModelCard, responses=_ERRORS)
    async def get_model(model_id: str) -> api.ModelCard:
        server.check_model(model_id)
        return await model_card()

    @app.get("/v1/models/{model_id}/privacy", responses=_ERRORS)
    async def get_privacy(model_id: str) -> dict[str, Any]:
        server.check_model(model_id)
        privacy = await server.privacy()
        if privacy is None:
            raise api.ApiError(404, f"model {model_id!r} carries no differential-privacy ledger (it was not "
                                    "fine-tuned with DP by tramontane)", code="no_privacy_ledger")
        return {"model": model_id, **privacy}

    @app.post("/v1/chat/completions", response_model=api.ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Response:
        server.check_model(body.model)
        _refuse(body.unsupported())
        prompt = await asyncio.to_thread(chat_prompt, served, body, server.limits)
        max_tokens = server.budget(len(prompt.tokens), body.token_limit, "messages")
        embeddings = await asyncio.to_thread(prompt_embeddings, served, prompt, max_tokens)
        k = (body.top_logprobs or 0) if body.logprobs else None
        streams = server.submit(prompt.tokens, body.n, max_tokens, _temperature(body.temperature),
                                body.top_p if body.top_p is not None else 1.0, body.seed, k, embeddings)
        runs = []
        for i, stream in enumerate(streams):
            parser = OutputParser(tokenizer, prompt.tool_format,
                                  max_calls=1 if body.parallel_tool_calls is False else None)
            runs.append(ChoiceRun(i, stream, tokenizer, parser, body.stop_strings(), body.logprobs,
                                  parser.feed(prompt.forced)))
        request_id = api.new_id("chatcmpl")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return server.streaming(request, runs, chat_stream(
                runs, request_id=request_id, model=served.name, prompt_tokens=len(prompt.tokens),
                include_usage=include_usage, logprobs=body.logprobs))
        async with server.watching(request, runs):
            choices = await collect(runs)
        response = api.ChatCompletionResponse(
            id=request_id, created=api.now(), model=served.name, usage=usage(len(prompt.tokens), runs),
            choices=[api.ChatChoice(index=i, message=c.message(), finish_reason=c.finish_reason,
                                    logprobs=chat_logprobs(c.tokens) if body.logprobs else None)
                     for i, c in enumerate(choices)])
        return JSONResponse(response.model_dump(mode="json"))

    @app.post("/v1/completions", response_model=api.CompletionResponse, responses=_ERRORS)
    async def completions(body: api.CompletionRequest, request: Request) -> Response:
        server.check_model(body.model)
        _refuse(body.unsupported())
        if isinstance(body.prompt, str):
            prompt = await asyncio.to_thread(tokenizer.encode, body.prompt, True)
        else:
            prompt = list(body.prompt)
            vocab = served.text_model.args.vocab_size
            if any(t >= vocab for t in prompt):
                raise api.ApiError(400, f"the prompt holds token ids outside the vocabulary [0, {vocab})",
                                   param="prompt")
        max_tokens = server.budget(len(prompt), body.max_tokens, "prompt")
        streams = server.submit(prompt, body.n, max_tokens, _temperature(body.temperature),
                                body.top_p if body.top_p is not None else 1.0, body.seed, body.logprobs)
        runs = [ChoiceRun(i, stream, tokenizer, OutputParser(tokenizer, context=prompt), body.stop_strings(),
                          body.logprobs is not None) for i, stream in enumerate(streams)]
        request_id = api.new_id("cmpl")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return server.streaming(request, runs, completion_stream(
                runs, request_id=request_id, model=served.name, prompt_tokens=len(prompt),
                include_usage=include_usage, logprobs=body.logprobs is not None))
        async with server.watching(request, runs):
            choices = await collect(runs)
        response = api.CompletionResponse(
            id=request_id, created=api.now(), model=served.name, usage=usage(len(prompt), runs),
            choices=[api.CompletionChoice(index=i, text=c.content, finish_reason=c.finish_reason,
                                          logprobs=completion_logprobs(c.tokens) if body.logprobs is not None
                                          else None) for i, c in enumerate(choices)])
        return JSONResponse(response.model_dump(mode="json"))

    @app.post("/v1/audio/transcriptions", responses=_ERRORS,
              response_model=api.TranscriptionResponse)
    async def transcriptions(
        request: Request,
        file: Annotated[UploadFile, File(description="the audio file (WAV, FLAC, OGG, MP3)")],
        model: Annotated[str, Form()],
        language: Annotated[str | None, Form(description="ISO 639-1 code, e.g. en; default: the model's guess")]
        = None,
        response_format: Annotated[Literal["json", "text"], Form()] = "json",
        temperature: Annotated[float, Form(ge=0.0, le=2.0)] = 0.0,
        max_tokens: Annotated[int | None, Form(ge=1, description="tramontane extension: at most this many "
                                                                 "tokens")] = None,
    ) -> Response:
        server.check_model(model)
        if served.kind != "audio":
            raise api.ApiError(400, f"model {served.name!r} is a {served.kind} model; transcription needs a "
                                    "Voxtral (audio) checkpoint", param="model")
        data = await file.read()
        if len(data) > server.limits.max_bytes:
            raise api.ApiError(413, f"the audio file is larger than the server's limit of "
                                    f"{server.limits.max_bytes} bytes", param="file")
        tokens, features = await asyncio.to_thread(_transcription_prompt, served, data, language)
        budget = server.budget(len(tokens), max_tokens, "audio")
        embeddings = await asyncio.to_thread(_embed, served, tokens, features, budget)
        streams = server.submit(tokens, 1, budget, temperature, 1.0, None, None, embeddings)
        runs = [ChoiceRun(0, streams[0], tokenizer, OutputParser(tokenizer))]
        async with server.watching(request, runs):
            [result] = await collect(runs)
        if response_format == "text":
            return PlainTextResponse(result.content)
        return JSONResponse(api.TranscriptionResponse(text=result.content).model_dump(mode="json"))

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(server.metrics.render(server.engine.stats()), media_type=CONTENT_TYPE)

    return app


def _refuse(problems: list[tuple[str, str]]) -> None:
    if problems:
        param, message = problems[0]
        raise api.ApiError(400, message, param=param)


def _temperature(value: float | None) -> float:
    return 1.0 if value is None else value  # OpenAI's default


def _transcription_prompt(served: ServedModel, data: bytes, language: str | None) -> tuple[list[int], Any]:
    """Voxtral's transcription prompt (mistral_common's) and the audio's log-mel features."""
    from mistral_common.protocol.transcription.request import TranscriptionRequest
    from pydantic import TypeAdapter, ValidationError

    from tramontane.models.audio import Voxtral, audio_features, decode_audio, transcription_prompt

    if language is not None:
        try:  # mistral_common's own rule for the language, as the CLI checks it
            annotation = TranscriptionRequest.model_fields["language"].annotation
            assert annotation is not None
            TypeAdapter(annotation).validate_python(language)
        except ValidationError:
            raise api.ApiError(400, f"language must be an ISO 639-1 code such as en or fr, got {language!r}",
                               param="language") from None
    try:
        audio = decode_audio(data, "the uploaded file")
    except DataError as err:
        raise api.ApiError(400, str(err), param="file") from None
    assert isinstance(served.model, Voxtral)
    tokens, prepared = transcription_prompt(served.tokenizer, audio, language)
    return tokens, audio_features(prepared, served.model.audio_args)


def _embed(served: ServedModel, tokens: list[int], features: Any, max_tokens: int) -> Any:
    import torch

    from tramontane.generation.multimodal import prompt_embeddings as splice
    from tramontane.models.audio import Voxtral

    assert isinstance(served.model, Voxtral)
    with torch.inference_mode():
        return splice(served.model, tokens, features, max_tokens)


__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_MEDIA_BYTES", "create_app", "error_response"]
