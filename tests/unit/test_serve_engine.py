"""The continuous-batching engine against `generate()` (the static-batch loop) and against itself run alone:
greedy tokens and logprobs, batch invariance with staggered arrivals, seeded sampling, stop conditions,
limits, cancel, shutdown, asyncio consumers, embeddings input and step failures.

Every blocking read goes through `_collect`, which gives up after a timeout, and every engine is shut down by
the `engines` fixture, so that a broken engine fails the test instead of hanging the run.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest
import torch

from tests.conftest import random_model, tiny_args
from tramontane.errors import (
    ConfigError,
    EngineStoppedError,
    GenerationError,
    PromptTooLongError,
    QueueFullError,
)
from tramontane.generation import SamplingParams, generate
from tramontane.models import Transformer
from tramontane.models.cpu_linear import prepack_for_inference
from tramontane.models.quant import HAS_DYNAMIC_INT8, QuantConfig, quantize_model
from tramontane.serve import engine as engine_module
from tramontane.serve.engine import Engine, EngineConfig, EngineRequest, RequestStream, TokenEvent

TIMEOUT_S = 60.0

# prefill_chunk 6 < window 8 < the longer prompts, so that chunks, windows and decodes all interleave.
SMALL = EngineConfig(max_batch=4, max_model_len=96, max_queue=8, prefill_chunk=6, max_step_tokens=12)


@pytest.fixture
def engines() -> Iterator[Callable[..., Engine]]:
    made: list[Engine] = []

    def make(model: Transformer, config: EngineConfig = SMALL, start: bool = True) -> Engine:
        engine = Engine(model, config)
        made.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    for engine in made:
        engine.shutdown()


@pytest.fixture(params=["dense", "moe", "full"])
def model(request) -> Transformer:
    """Window 8 (dense and MoE), and full attention, whose caches differ in size from request to request."""
    window = None if request.param == "full" else 8
    return random_model(tiny_args(moe=request.param == "moe", sliding_window=window), seed=21)


def _collect(stream: RequestStream | Iterator[TokenEvent], timeout: float = TIMEOUT_S) -> list[TokenEvent]:
    out: list[TokenEvent] = []
    reader = threading.Thread(target=lambda: out.extend(stream), daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), f"stream did not end within {timeout} s"
    return out


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=gen).tolist() for n in lengths]


def _tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token for e in events if e.token is not None]


def _slow_steps(model: Transformer, seconds: float) -> torch.utils.hooks.RemovableHandle:
    """Make every forward step take at least `seconds`, so that requests overlap in time."""
    return model.layers[0].register_forward_pre_hook(lambda *_: time.sleep(seconds))


@pytest.mark.parametrize("window", [8, None], ids=["window8", "full"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_single_requests_equal_generate(engines, moe: bool, window: int | None) -> None:
    """Prompts shorter and longer than the window (8) and than prefill_chunk (6), one at a time."""
    model = random_model(tiny_args(moe=moe, sliding_window=window), seed=22)
    engine = engines(model)
    for prompt in _prompts([1, 5, 13, 30], seed=1):
        events = _collect(engine.submit(EngineRequest(prompt, max_tokens=12, logprobs=0)))
        expected = generate(model, [prompt], SamplingParams(max_tokens=12, logprobs=True))[0]
        assert _tokens(events) == expected.tokens
        assert [e.logprob for e in events] == pytest.approx(expected.logprobs, abs=1e-4)
        assert [e.finish_reason for e in events] == [None] * 11 + ["length"]
        assert all(e.top_logprobs is None for e in events)


def test_output_head_equals_the_models_layer(engines) -> None:
    """The engine's head (`models.cpu_linear.pack_linear`: a oneDNN-packed copy of the weight where that is
    faster, else the layer itself) gives the model's own logits to float32 rounding, for one row and for a
    decode step's many, and to bfloat16 rounding in bfloat16; a model already packed keeps its own head."""
    model = random_model(tiny_args(vocab_size=4099), seed=5)
    half = random_model(tiny_args(), seed=5).to(torch.bfloat16)
    with torch.inference_mode():
        for rows in (1, 3, 16):
            x = torch.randn(rows, model.args.dim)
            head = engines(model, start=False)._head
            torch.testing.assert_close(head(x), model.output(x), rtol=1e-5, atol=1e-5)
        x = torch.randn(4, half.args.dim, dtype=torch.bfloat16)
        torch.testing.assert_close(engines(half, start=False)._head(x), half.output(x), rtol=3e-2, atol=3e-2)
    packed = prepack_for_inference(random_model(tiny_args(), seed=5), always=True)
    assert engines(packed, start=False)._head is packed.output


def test_a_packed_model_serves_the_plain_models_greedy_tokens(engines) -> None:
    """Every linear layer packed for oneDNN (`prepack_for_inference`, as `serve` loads models): the engine's
    greedy tokens equal `generate()` on the plain model."""
    model = random_model(tiny_args(), seed=21)
    packed = prepack_for_inference(random_model(tiny_args(), seed=21), always=True)
    prompts = _prompts([5, 9, 14], seed=3)
    expected = [r.tokens for r in generate(model, prompts, SamplingParams(max_tokens=10))]
    engine = engines(packed)
    streams = [engine.submit(EngineRequest(prompt, max_tokens=10)) for prompt in prompts]
    assert [_tokens(_collect(stream)) for stream in streams] == expected


@pytest.mark.skipif(not HAS_DYNAMIC_INT8, reason="torch's fbgemm quantized engine is missing")
def test_a_w8a8_model_is_batch_invariant(engines) -> None:
    """int8 weights with dynamic int8 activations (`serve --quantize w8a8`): each row's activations are
    quantized on their own grid, so requests served together, in chunks and decode batches, give exactly the
    tokens and logprobs of `generate()` on each prompt alone."""
    model = quantize_model(random_model(tiny_args(), seed=21), QuantConfig("int8", output=True, activations="int8"))
    model.eval()
    prompts = _prompts([5, 9, 14, 3], seed=4)
    expected = [generate(model, [p], SamplingParams(max_tokens=10, logprobs=True))[0] for p in prompts]
    engine = engines(model)
    streams = [engine.submit(EngineRequest(prompt, max_tokens=10, logprobs=0)) for prompt in prompts]
    for stream, want in zip(streams, expected):
        events = _collect(stream)
        assert _tokens(events) == want.tokens
        assert [e.logprob for e in events] == want.logprobs


def test_top_logprobs_are_the_best_alternatives_sorted(engines, model) -> None:
    prompt = _prompts([9], seed=2)[0]
    events = _collect(engines(model).submit(EngineRequest(prompt, max_tokens=5, logprobs=3)))
    seq = prompt + _tokens(events)
    with torch.no_grad():
        logp = model(torch.tensor([seq]))[0].float().log_softmax(-1)
    for i, event in enumerate(events):
        row = logp[len(prompt) - 1 + i]
        best = row.topk(3)
        assert event.top_logprobs is not None and [t for t, _ in event.top_logprobs] == best.indices.tolist()
        assert [lp for _, lp in event.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert event.logprob == pytest.approx(float(row[event.token]), abs=1e-4)
        assert event.top_logprobs[0][0] == event.token  # greedy picks the best


@pytest.mark.parametrize("solo_row_cost", [engine_module.SOLO_ROW_COST, 0], ids=["batched", "rows-alone"])
def test_batch_invariance_with_staggered_arrivals(engines, model, monkeypatch, solo_row_cost: int) -> None:
    """Requests of different prompt lengths and max_tokens, some joining while others decode or prefill,
    each give exactly their solo tokens (and `generate()`'s), whether decodes attend in one batched call or
    the longer rows alone."""
    monkeypatch.setattr(engine_module, "SOLO_ROW_COST", solo_row_cost)
    build, alone = engine_module._DecodePlan.build, [0]

    def counting_build(*args):
        plan = build(*args)
        alone[0] += len(plan.solo)
        return plan

    monkeypatch.setattr(engine_module._DecodePlan, "build", counting_build)
    lengths, max_tokens = [3, 17, 9, 26, 1, 12], [20, 9, 15, 6, 12, 18]
    prompts = _prompts(lengths, seed=3)
    solo_engine = engines(model)
    solo = [_tokens(_collect(solo_engine.submit(EngineRequest(p, m)))) for p, m in zip(prompts, max_tokens)]
    for p, m, tokens in zip(prompts, max_tokens, solo):
        assert tokens == generate(model, [p], SamplingParams(max_tokens=m))[0].tokens

    engine = engines(model)
    most_running = [0]

    def watch(*_) -> None:
        time.sleep(0.002)
        most_running[0] = max(most_running[0], engine.stats().running)

    handle = model.layers[0].register_forward_pre_hook(watch)
    try:
        streams = [engine.submit(EngineRequest(p, m)) for p, m in zip(prompts[:2], max_tokens[:2])]
        first = iter(streams[0])
        head = [next(first), next(first), next(first)]  # request 0 is decoding when the others arrive
        streams += [engine.submit(EngineRequest(p, m)) for p, m in zip(prompts[2:4], max_tokens[2:4])]
        time.sleep(0.02)
        streams += [engine.submit(EngineRequest(p, m)) for p, m in zip(prompts[4:], max_tokens[4:])]
        results = [head + _collect(first)] + [_collect(s) for s in streams[1:]]
    finally:
        handle.remove()
    assert most_running[0] >= 3
    assert (alone[0] > 0) == (solo_row_cost == 0)
    for events, tokens, m in zip(results, solo, max_tokens):
        assert _tokens(events) == tokens
        assert events[-1].finish_reason == "length" and len(events) == m


def test_seeded_sampling_is_reproducible_in_any_batch(engines, model) -> None:
    prompt = _prompts([11], seed=4)[0]
    request = {"max_tokens": 15, "temperature": 1.3, "top_p": 0.9, "seed": 1234}
    alone = _tokens(_collect(engines(model).submit(EngineRequest(prompt, **request))))
    assert alone == generate(model, [prompt], SamplingParams(**request))[0].tokens

    engine = engines(model)
    others = [engine.submit(EngineRequest(p, max_tokens=15, temperature=1.0)) for p in _prompts([4, 20], 5)]
    crowded = _tokens(_collect(engine.submit(EngineRequest(prompt, **request))))
    greedy_neighbour = engine.submit(EngineRequest(prompt, max_tokens=15))
    assert crowded == alone
    for stream in others + [greedy_neighbour]:
        _collect(stream)
    unseeded = {tuple(_tokens(_collect(engine.submit(EngineRequest(prompt, max_tokens=15, temperature=1.3)))))
                for _ in range(3)}
    assert len(unseeded) > 1


def test_stop_token_is_reported_and_ends_the_stream(engines, model) -> None:
    prompt = _prompts([7], seed=6)[0]
    engine = engines(model)
    free = _tokens(_collect(engine.submit(EngineRequest(prompt, max_tokens=10))))
    stop = free[4]
    cut = free.index(stop)
    events = _collect(engine.submit(EngineRequest(prompt, max_tokens=10, stop_token_ids=(96, stop))))
    assert _tokens(events) == free[: cut + 1]
    assert events[-1].token == stop and events[-1].finish_reason == "stop"
    assert all(e.finish_reason is None for e in events[:-1])


def test_invalid_requests_raise_before_anything_is_queued(engines, model) -> None:
    engine = engines(model, start=False)
    dim = model.args.dim
    bad = [
        (EngineRequest([], 4), "empty"),
        (EngineRequest([1, 97], 4), "outside the vocabulary"),
        (EngineRequest([1, -1], 4), "outside the vocabulary"),
        (EngineRequest([1, 2], 0), "max_tokens"),
        (EngineRequest([1, 2], 4, temperature=-0.5), "temperature"),
        (EngineRequest([1, 2], 4, top_p=0.0), "top_p"),
        (EngineRequest([1, 2], 4, logprobs=21), "logprobs"),
        (EngineRequest([1, 2], 4, stop_token_ids=(500,)), "stop_token_ids"),
        (EngineRequest([1, 2], 4, embeddings=torch.zeros(3, dim)), r"\[2, 64\]"),
        (EngineRequest([1, 2], 4, embeddings=torch.full((2, dim), float("nan"))), "finite"),
    ]
    for request, message in bad:
        with pytest.raises(GenerationError, match=message):
            engine.submit(request)
    with pytest.raises(PromptTooLongError, match="max_model_len=96") as err:
        engine.submit(EngineRequest(list(range(90)), max_tokens=7))
    assert "90" in str(err.value) and "97" in str(err.value)
    engine.submit(EngineRequest(list(range(90)), max_tokens=6))  # exactly max_model_len fits
    assert engine.stats().queued == 1
    with pytest.raises(ConfigError, match="max_step_tokens"):
        EngineConfig(max_batch=8, max_step_tokens=4)


def test_queue_full_then_everything_is_served(engines, model) -> None:
    config = EngineConfig(max_batch=2, max_model_len=64, max_queue=3, prefill_chunk=8, max_step_tokens=16)
    engine = engines(model, config, start=False)
    prompts = _prompts([5, 6, 7, 8, 9, 10], seed=7)
    streams = [engine.submit(EngineRequest(p, max_tokens=4)) for p in prompts[:5]]  # 2 slots + 3 waiting
    with pytest.raises(QueueFullError):
        engine.submit(EngineRequest(prompts[5], max_tokens=4))
    assert engine.stats().queued == 5
    engine.start()
    for prompt, stream in zip(prompts, streams):
        assert _tokens(_collect(stream)) == generate(model, [prompt], SamplingParams(max_tokens=4))[0].tokens
    stats = engine.stats()
    assert (stats.queued, stats.running, stats.requests_total) == (0, 0, 5)
    assert stats.generated_tokens_total == 20 and stats.prompt_tokens_total == sum(range(5, 10))
    assert len(stats.ttft_samples) == 5 and all(t > 0 for t in stats.ttft_samples)


def test_queue_full_while_running(engines, model) -> None:
    config = EngineConfig(max_batch=1, max_model_len=256, max_queue=1, prefill_chunk=8, max_step_tokens=8)
    engine = engines(model, config)
    handle = _slow_steps(model, 0.005)
    try:
        running = engine.submit(EngineRequest([1, 2, 3], max_tokens=200))
        next(iter(running))  # admitted: the only slot is taken
        engine.submit(EngineRequest([4, 5], max_tokens=2))
        with pytest.raises(QueueFullError, match="retry"):
            engine.submit(EngineRequest([6], max_tokens=2))
        running.cancel()
    finally:
        handle.remove()


def test_cancel_frees_the_slot_and_the_cache(engines, model) -> None:
    config = EngineConfig(max_batch=1, max_model_len=512, max_queue=4, prefill_chunk=8, max_step_tokens=8)
    engine = engines(model, config)
    handle = _slow_steps(model, 0.002)
    try:
        long = engine.submit(EngineRequest([1, 2, 3], max_tokens=500))
        events = iter(long)
        head = [next(events) for _ in range(3)]
        waiting = engine.submit(EngineRequest([4, 5, 6], max_tokens=5))
        assert (engine.stats().running, engine.stats().queued) == (1, 1)
        cache = weakref.ref(engine._running[0].cache)  # type: ignore[arg-type]
        long.cancel()
        rest = _collect(events)
        served = _collect(waiting)
    finally:
        handle.remove()
    assert rest[-1] == TokenEvent(None, finish_reason="cancelled")
    assert len(head) + len(rest) < 500
    assert _tokens(served) == generate(model, [[4, 5, 6]], SamplingParams(max_tokens=5))[0].tokens
    assert engine.stats().running == 0
    assert cache() is None  # nothing holds the cancelled sequence's cache any more
    long.cancel()  # cancelling a finished stream is a no-op


def test_shutdown_ends_every_stream(engines, model) -> None:
    config = EngineConfig(max_batch=2, max_model_len=512, max_queue=4, prefill_chunk=8, max_step_tokens=8)
    engine = engines(model, config)
    handle = _slow_steps(model, 0.002)
    try:
        streams = [engine.submit(EngineRequest([1 + i, 2, 3], max_tokens=400)) for i in range(3)]
        next(iter(streams[0]))
        engine.shutdown()
    finally:
        handle.remove()
    for stream in streams:
        events = _collect(stream)
        assert events[-1].finish_reason == "cancelled" and events[-1].token is None
    with pytest.raises(EngineStoppedError):
        engine.submit(EngineRequest([1], max_tokens=2))
    engine.shutdown()  # idempotent

    never_started = engines(model, config, start=False)
    queued = never_started.submit(EngineRequest([1], max_tokens=2))
    never_started.shutdown()
    assert _collect(queued)[-1].finish_reason == "cancelled"


def test_async_consumers_share_the_engine(engines, model) -> None:
    prompts = _prompts([4, 15, 8, 2], seed=8)
    max_tokens = [10, 6, 12, 8]
    expected = [generate(model, [p], SamplingParams(max_tokens=m))[0].tokens
                for p, m in zip(prompts, max_tokens)]
    engine = engines(model)
    handle = _slow_steps(model, 0.002)

    async def consume(prompt: list[int], m: int) -> list[TokenEvent]:
        return [event async for event in engine.submit(EngineRequest(prompt, m))]

    async def main() -> tuple[list[list[TokenEvent]], int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:  # runs only if nobody blocks the loop
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())
        results = await asyncio.wait_for(
            asyncio.gather(*(consume(p, m) for p, m in zip(prompts, max_tokens))), TIMEOUT_S)
        done.set()
        await tick_task
        return list(results), ticks

    try:
        results, ticks = asyncio.run(main())
    finally:
        handle.remove()
    assert [_tokens(r) for r in results] == expected
    assert all(r[-1].finish_reason == "length" for r in results)
    assert ticks >= 10


def test_embeddings_input_equals_generate(engines, model) -> None:
    gen = torch.Generator().manual_seed(9)
    prompt = _prompts([14], seed=9)[0]
    embeddings = torch.randn(14, model.args.dim, generator=gen) * 0.5
    expected = generate(model, [prompt], SamplingParams(max_tokens=8, logprobs=True),
                        prompt_embeddings=[embeddings])[0]
    assert expected.tokens != generate(model, [prompt], SamplingParams(max_tokens=8))[0].tokens
    engine = engines(model)
    neighbour = engine.submit(EngineRequest(_prompts([10], seed=10)[0], max_tokens=8))
    events = _collect(engine.submit(EngineRequest(prompt, max_tokens=8, logprobs=0, embeddings=embeddings)))
    _collect(neighbour)
    assert _tokens(events) == expected.tokens
    assert [e.logprob for e in events] == pytest.approx(expected.logprobs, abs=1e-4)


def test_a_failing_step_ends_its_streams_and_the_engine_keeps_serving(engines, model) -> None:
    engine = engines(model)
    secret = [11, 22, 33, 44]
    failures = [1]

    def fail_once(*_) -> None:
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError(f"boom {secret}")

    handle = model.layers[1].register_forward_pre_hook(fail_once)
    try:
        events = _collect(engine.submit(EngineRequest(secret, max_tokens=5)))
    finally:
        handle.remove()
    assert events[-1].finish_reason == "error" and events[-1].token is None
    assert events[-1].error and "RuntimeError" in events[-1].error and "22" not in events[-1].error
    after = _collect(engine.submit(EngineRequest(secret, max_tokens=5)))
    assert _tokens(after) == generate(model, [secret], SamplingParams(max_tokens=5))[0].tokens
    assert engine.stats().running == 0


def test_a_failed_admission_ends_only_that_request(engines, model, monkeypatch) -> None:
    engine = engines(model, start=False)
    acquire = engine._pool.acquire
    calls = [0]

    def first_fails(size: int):
        calls[0] += 1
        if calls[0] == 1:
            raise MemoryError("no room")
        return acquire(size)

    monkeypatch.setattr(engine._pool, "acquire", first_fails)
    failed = engine.submit(EngineRequest([1, 2, 3], max_tokens=4))
    served = engine.submit(EngineRequest([4, 5, 6], max_tokens=4))
    engine.start()
    last = _collect(failed)[-1]
    assert (last.finish_reason, last.token) == ("error", None) and "MemoryError" in (last.error or "")
    assert _tokens(_collect(served)) == generate(model, [[4, 5, 6]], SamplingParams(max_tokens=4))[0].tokens


def test_memory_does_not_grow_with_requests_served(engines, model) -> None:
    """Keys and values live in one pool whose size is set by the longest request and max_batch; every
    finished or cancelled request gives its row back."""
    engine = engines(model)
    prompts = _prompts([3, 12, 7, 20, 5], seed=11)
    for wave in range(4):
        streams = [engine.submit(EngineRequest(p, max_tokens=9 - wave)) for p in prompts]
        streams[wave].cancel()
        for stream in streams:
            _collect(stream)
        pool = engine._pool
        if wave == 0:
            size = (pool.rows, pool.slots, [k.data_ptr() for k in pool.keys])
        assert (pool.rows, pool.slots, [k.data_ptr() for k in pool.keys]) == size
        assert not pool._caches and sorted(pool._free) == list(range(SMALL.max_batch))
    assert size[0] <= SMALL.max_batch and size[1] <= 2 * (20 + 9)  # grown by doubling
    assert not engine._running and not engine._waiting


def test_a_scheduler_failure_ends_pending_requests_and_serving_goes_on(engines, model, monkeypatch) -> None:
    engine = engines(model, start=False)
    drop, failures = engine._drop_cancelled, [1]

    def fail_once() -> None:
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("scheduler bug")
        drop()

    monkeypatch.setattr(engine, "_drop_cancelled", fail_once)
    pending = [engine.submit(EngineRequest([1, 2, 3], max_tokens=4)) for _ in range(2)]
    engine.start()
    for stream in pending:
        assert _collect(stream)[-1].finish_reason == "error"
    assert len(_tokens(_collect(engine.submit(EngineRequest([1, 2, 3], max_tokens=4))))) == 4
