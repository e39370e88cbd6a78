"""Schemathesis over the server's OpenAPI document, every route, valid and invalid requests (in-process ASGI
calls, a tiny model behind an API key): no request may get a 5xx, and none may hang."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, Case, GenerationMode

from tests.integration.serve_fixtures import one_torch_thread, text_checkpoint, wait_idle  # noqa: F401
from tramontane.serve.app import create_app
from tramontane.serve.engine import EngineConfig
from tramontane.serve.loading import load_served_model
from tramontane.tokenizer import Tokenizer

AUTH = {"Authorization": "Bearer fuzz"}
EXAMPLES = 40  # per route and mode: about 500 requests in all, under a minute on 2 cores


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    path = text_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", Tokenizer.builtin("v3"),
                           file_name="tokenizer.model.v3")
    # A short context bounds every generation (valid requests may ask for n=16 and no max_tokens).
    app = create_app(load_served_model(path), api_key="fuzz", max_body_bytes=256 * 1024,
                     engine_config=EngineConfig(max_batch=16, max_queue=256, max_model_len=48))
    app.state.engine.start()  # whether or not the ASGI client runs the lifespan
    yield app
    app.state.engine.shutdown()


def fuzz(operation: APIOperation, mode: GenerationMode, seen: dict[str, set[int]], failures: list[str]) -> None:
    """Up to EXAMPLES requests of `operation` in `mode`: statuses into `seen`, any 5xx into `failures`."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Case) -> None:
        if mode == GenerationMode.POSITIVE:  # name the served model, so valid requests get answers
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "tiny"
            if case.path_parameters and "model_id" in case.path_parameters:
                case.path_parameters["model_id"] = "tiny"
        response = case.call(headers={**(case.headers or {}), **AUTH}, timeout=60)
        seen.setdefault(operation.label, set()).add(response.status_code)
        if response.status_code >= 500:
            failures.append(f"{operation.label} -> {response.status_code}: {response.text[:300]}\n"
                            f"  {case.as_curl_command()}")

    try:
        run()
    except Unsatisfiable:  # no invalid request exists (no parameters, or only free strings)
        assert mode == GenerationMode.NEGATIVE and not operation.body, operation.label


def test_no_route_answers_a_server_error(app: FastAPI) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/health", "/v1/models", "/v1/models/{model_id}/privacy", "/v1/chat/completions", "/v1/completions",
            "/v1/audio/transcriptions", "/metrics"} <= paths
    failures: list[str] = []
    seen: dict[str, set[int]] = {}
    start = time.monotonic()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode, seen, failures)
    assert not failures, "\n".join(failures[:10])
    # Valid requests got answers and invalid ones 4xx, on the routes that take a body.
    assert 200 in seen["POST /v1/chat/completions"] and 400 in seen["POST /v1/chat/completions"]
    assert 200 in seen["POST /v1/completions"]
    assert time.monotonic() - start < 300
    wait_idle(app.state.engine)  # nothing is left running or queued


def test_without_the_key_every_route_but_health_is_401(app: FastAPI) -> None:
    from starlette.testclient import TestClient

    client = TestClient(app)
    assert client.get("/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                         ("POST", "/v1/audio/transcriptions"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                         ("GET", "/v1/models/tiny/privacy"), ("GET", "/nowhere")]:
        response = client.request(method, path, json={})
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_body_over_the_limit_is_413(app: FastAPI, tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    client = TestClient(app)
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 300_000}]}
    response = client.post("/v1/chat/completions", json=big, headers=AUTH)
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it is read
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 10_000
        yield b'"}]}'

    response = client.post("/v1/chat/completions", content=chunks(),
                           headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413
