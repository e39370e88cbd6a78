"""Shared by the `tramontane serve` tests: tiny checkpoints with real tokenizer files, a model rigged to write
a given token sequence, and a live uvicorn server on a free loopback port (in a thread)."""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Self

import mistral_common
import pytest
import torch
import uvicorn
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from tests.conftest import random_model, tiny_args
from tramontane.models.checkpoint import save_model
from tramontane.serve.engine import Engine
from tramontane.tokenizer import Tokenizer

ARGS, CALL_ID = 32, 33  # the ranks of [ARGS] and [CALL_ID] in Mistral's v11+ tekken files


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread while a server runs: its engine thread, the event loop and the clients share two
    cores, and OpenMP workers spinning for a tiny model's matmuls slow every engine step tenfold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tekken_tokenizer(version: str, path: Path) -> Tokenizer:
    """A v11+ tekken tokenizer built offline: the tekken vocabulary mistral_common ships, with the control
    tokens of the released v11+ files ([ARGS], [CALL_ID], ...) and the version set. mistral_common ships no
    v11+ file itself."""
    data = json.loads((Path(mistral_common.__file__).parent / "data" / "tekken_240911.json").read_text())
    special = [dict(t) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    names = {24: "[AUDIO]", 25: "[BEGIN_AUDIO]", ARGS: "[ARGS]", CALL_ID: "[CALL_ID]", 34: "[THINK]",
             35: "[/THINK]"}
    special += [{"rank": i, "token_str": names.get(i, f"<SPECIAL_{i}>"), "is_control": True}
                for i in range(len(special), data["config"]["default_num_special_tokens"])]
    data["special_tokens"] = special
    data["config"]["version"] = version
    data.pop("image", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return Tokenizer.from_file(path)


def text_checkpoint(path: Path, tokenizer: Tokenizer, seed: int = 21, file_name: str | None = None) -> Path:
    """A random 2-layer model sized for `tokenizer`, with the tokenizer file beside it."""
    save_model(random_model(tiny_args(vocab_size=tokenizer.vocab_size, dim=32, head_dim=8), seed=seed), path)
    shutil.copy(tokenizer.path, path / (file_name or tokenizer.path.name))
    return path


def rigged_checkpoint(path: Path, tokenizer: Tokenizer, chain: Sequence[int], file_name: str) -> Path:
    """A model whose greedy next token depends only on the current token: `chain[i]` -> `chain[i + 1]`.

    Attention and feed-forward outputs are zero, so the last hidden state is the token's embedding; the
    chain's tokens embed as basis vectors and the output head maps basis vector i to token chain[i + 1]. The
    chain's tokens (all but the last) must be distinct and fewer than `dim`.
    """
    heads = list(chain[:-1])
    assert len(set(heads)) == len(heads), "a lookup model needs distinct tokens"
    dim = 64
    assert len(heads) < dim
    model = random_model(tiny_args(vocab_size=tokenizer.vocab_size, dim=dim, head_dim=16, n_layers=1), seed=3)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.norm.weight.fill_(1.0)
        model.output.weight.zero_()
        for i, (token, following) in enumerate(itertools.pairwise(chain)):
            model.tok_embeddings.weight[token].zero_()
            model.tok_embeddings.weight[token, i] = 1.0
            model.output.weight[following, i] = 10.0
    save_model(model, path)
    shutil.copy(tokenizer.path, path / file_name)
    return path


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a thread (its lifespan starts and stops the engine)."""

    def __init__(self, app: object) -> None:
        self.app = app
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
        assert not self._thread.is_alive(), "the server did not stop"


def wait_idle(engine: Engine, timeout: float = 20.0) -> None:
    """Until the engine has nothing queued or running (AssertionError after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats.queued == 0 and stats.running == 0:
            return
        assert time.monotonic() < deadline, f"the engine is still busy: {stats}"
        time.sleep(0.02)
