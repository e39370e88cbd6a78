"""64 concurrent streamed chats against a live server, a third of the clients walking away mid-stream: nothing
hangs, the server keeps answering, the engine ends with nothing running or queued (a disconnect cancels its
request), and the process's memory comes back near where it was after a warm-up round."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import psutil
import pytest

from tests.integration.serve_fixtures import LiveServer, one_torch_thread, text_checkpoint, wait_idle  # noqa: F401
from tramontane.serve.app import create_app
from tramontane.serve.engine import Engine, EngineConfig
from tramontane.serve.loading import load_served_model
from tramontane.tokenizer import Tokenizer

CONCURRENT = 64
MAX_MODEL_LEN = 160


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Engine]]:
    path: Path = text_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", Tokenizer.builtin("v3"),
                                 file_name="tokenizer.model.v3")
    app = create_app(load_served_model(path), engine_config=EngineConfig(
        max_batch=16, max_queue=CONCURRENT, max_model_len=MAX_MODEL_LEN))
    with LiveServer(app) as live:
        yield live.url, app.state.engine


async def one_chat(client: httpx.AsyncClient, url: str, rng: random.Random, index: int) -> tuple[str, int]:
    """A streamed chat; a third of them leave after a few chunks. (outcome, chunks read)."""
    leave_after = rng.randint(1, 4) if index % 3 == 0 else None
    body = {"model": "tiny", "stream": True, "temperature": 1.0, "seed": index,
            "max_tokens": 120 if leave_after else rng.randint(4, 24),
            "messages": [{"role": "user", "content": f"Story number {index}, please."}]}
    chunks = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "done", chunks
            payload = json.loads(line[len("data: "):])
            assert "error" not in payload, payload
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                return "left", chunks  # leaving the block closes the connection mid-stream
    return "cut", chunks


async def one_round(url: str, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=CONCURRENT * 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.wait_for(
            asyncio.gather(*(one_chat(client, url, rng, i) for i in range(CONCURRENT))), timeout=90)


def test_concurrent_streams_with_disconnects(server: tuple[str, Engine]) -> None:
    url, engine = server
    process = psutil.Process()
    asyncio.run(one_round(url, seed=0))  # warm-up: allocator pools, lazily built tables
    wait_idle(engine)
    baseline = process.memory_info().rss
    for round_ in range(1, 4):
        before = engine.stats().generated_tokens_total
        outcomes = asyncio.run(one_round(url, seed=round_))
        assert sorted({o for o, _ in outcomes}) == ["done", "left"]
        assert sum(o == "left" for o, _ in outcomes) == (CONCURRENT + 2) // 3
        wait_idle(engine)  # every request, finished or abandoned, has left the engine
        generated = engine.stats().generated_tokens_total - before
        # Abandoned requests asked for 120 tokens each; had they not been cancelled they would all be here.
        assert generated < 120 * sum(o == "left" for o, _ in outcomes)
    stats = engine.stats()
    assert stats.running == 0 and stats.queued == 0
    growth = process.memory_info().rss - baseline
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over three rounds"
    # The server still answers, streamed and not.
    response = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "still there?"}]})
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert "tramontane_requests_running 0" in httpx.get(f"{url}/metrics").text
