"""Continuous batching on one device: many requests share every forward step (vLLM's scheduling, Sarathi's
chunked prefill), each sequence attending only to its own rolling KV cache.

One background thread runs the step loop. At every step finished and cancelled sequences leave, waiting
requests join (up to `max_batch`), and one forward call runs, bounded by `max_step_tokens`: one token for
every decoding sequence first, then chunks of at most `prefill_chunk` prompt tokens of the sequences still
prefilling, in arrival order. The tokens of all sequences are flattened into one row set [1, N], so norms,
projections, the feed-forward (dense or MoE) and the output head run once for the whole step, through the
model's own modules (the weights are never copied, except the output head's on CPU where a oneDNN-packed copy
is faster: `models.cpu_linear.pack_linear`, a no-op on a model already packed by the loader); only the
attention core is done per sequence, by the `AttentionContext.core` hook of the model's `Attention`:
- the keys and values of all running sequences live in one pool (`_KVPool`), a row per sequence, and each
  sequence's `KVCache` (`models/cache.py`: the model's rolling window, position p in slot p mod size) is a
  view of its row, so prefill chunks go through the model's own cache code, one sequence at a time;
- the decodes of all sequences are written and attended to in one batched call over the pool, with a length
  mask (rows much longer than the others are attended to alone, so that they do not make every row read as
  far).

A request's output does not depend on the batch it ran in: rows of different sequences meet only in row-wise
ops and each request samples from its own generator (batched matmuls of another shape may round the last
bit differently, which can flip a greedy token only at a near tie). It equals `generation.generate` for the
prompt alone, seeded sampling included.

Threads: `submit` and `RequestStream.cancel` may be called from any thread; a stream is read by one consumer,
blocking (`for event in stream`) or from asyncio (`async for event in stream`, which never blocks the loop).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
import numbers
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, fields

import torch

from tramontane.errors import (
    ConfigError,
    EngineStoppedError,
    GenerationError,
    PromptTooLongError,
    QueueFullError,
)
from tramontane.generation.text import sample_next, sampling_problems
from tramontane.models.cache import CacheStep, KVCache
from tramontane.models.cpu_linear import pack_linear
from tramontane.models.layers import AttentionContext, attention_core, cache_mask
from tramontane.models.rope import rotary_angles
from tramontane.models.transformer import Transformer

logger = logging.getLogger(__name__)

TTFT_SAMPLES = 1000  # first-token latencies kept for `stats()` (the most recent ones)
RATE_WINDOW_S = 10.0  # `stats().tokens_per_s` counts the tokens generated over this many seconds


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling limits of an `Engine` (validated on construction)."""

    max_batch: int = 16  # sequences in the running batch
    max_model_len: int = 4096  # prompt + max_tokens of one request, at most
    max_queue: int = 64  # requests waiting for a slot; one more -> QueueFullError
    prefill_chunk: int = 256  # prompt tokens of one sequence per engine step (chunked prefill)
    max_step_tokens: int = 512  # tokens per engine step: every running decode first, then prefill chunks
    max_logprobs: int = 20  # the largest `EngineRequest.logprobs` (alternatives per token) accepted

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if f.name in (
                    "max_queue", "max_logprobs") else 1):
                raise ConfigError(f"EngineConfig.{f.name} must be a positive integer, got {value!r}")
        if self.max_step_tokens < self.max_batch:
            raise ConfigError(
                f"EngineConfig.max_step_tokens={self.max_step_tokens} must be >= max_batch={self.max_batch}: "
                "every running sequence decodes one token per step"
            )


@dataclass
class EngineRequest:
    """One completion request, in token ids."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # e.g. (eos_id,); the stop token is reported, finish_reason "stop"
    logprobs: int | None = None  # None: no logprobs; 0: the chosen token's; k > 0: also the top k
    embeddings: torch.Tensor | None = None  # [len(prompt), dim] input embeddings (multimodal prompts)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, or the end of a stream; the last event of a stream has a `finish_reason`."""

    token: int | None  # None only on a final event that carries no token (cancelled, error)
    logprob: float | None = None  # log p(token) under the model, before temperature and top-p
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # the top k (token, logprob), best first
    finish_reason: str | None = None  # None while running; then "stop", "length", "cancelled" or "error"
    error: str | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and throughput."""

    queued: int  # requests waiting for a slot
    running: int  # sequences in the running batch
    generated_tokens_total: int
    prompt_tokens_total: int  # prompt tokens prefilled
    requests_total: int  # requests finished (any finish_reason)
    steps_total: int
    ttft_samples: tuple[float, ...]  # the latest first-token latencies in seconds (at most TTFT_SAMPLES)
    tokens_per_s: float  # generated tokens per second over the last RATE_WINDOW_S seconds


class RequestStream:
    """The events of one submitted request, in order; the last one has a `finish_reason`.

    Iterate it once, from one consumer: blocking (`for event in stream`) or in asyncio (`async for`). A
    consumer that goes away (a client disconnects) calls `cancel()`; leaving the loop does not cancel.
    """

    def __init__(self, request_id: str, prompt_tokens: int, wake_engine: _Waker) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.ttft: float | None = None  # seconds from submit to the first token
        self.finish_reason: str | None = None
        self.submitted_at = time.perf_counter()
        self._events: collections.deque[TokenEvent] = collections.deque()
        self._lock = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancelled = False
        self._wake_engine = wake_engine

    def cancel(self) -> None:
        """Ask the engine to drop this request; it ends the stream ("cancelled") and frees the sequence's
        cache at its next step. A no-op once the stream has ended."""
        self._cancelled = True
        self._wake_engine()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done(self) -> bool:
        """Whether the final event has been produced (it may not have been read yet)."""
        return self.finish_reason is not None

    def _push(self, event: TokenEvent) -> None:
        """Engine side: append an event (ignored after the final one) and wake the consumer."""
        with self._lock:
            if self.finish_reason is not None:
                return
            self.finish_reason = event.finish_reason
            self._events.append(event)
            self._lock.notify_all()
            waiters = list(self._async_waiters)
        for loop, ready in waiters:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._lock:
                while not self._events:
                    self._lock.wait()
                event = self._events.popleft()
            yield event
            if event.finish_reason is not None:
                return

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._iter_async()

    async def _iter_async(self) -> AsyncIterator[TokenEvent]:
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._async_waiters.append(waiter)
        try:
            while True:
                with self._lock:
                    event = self._events.popleft() if self._events else None
                    if event is None:
                        waiter[1].clear()  # under the lock: a later push sets it again
                if event is None:
                    await waiter[1].wait()
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            with self._lock:
                self._async_waiters.remove(waiter)


class _Waker:
    """Wakes the engine thread (a callable the streams hold, so that they do not hold the engine)."""

    def __init__(self, condition: threading.Condition) -> None:
        self._condition = condition

    def __call__(self) -> None:
        with self._condition:
            self._condition.notify_all()


@dataclass(eq=False)
class _Sequence:
    """Engine-side state of one admitted or waiting request."""

    stream: RequestStream
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: frozenset[int]
    logprobs: int | None
    embeddings: torch.Tensor | None  # [P, dim] on the model's device and dtype
    generator: torch.Generator | None  # None: greedy
    cache: KVCache | None = None  # a view of row `row` of the engine's pool while running
    row: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    generated: int = 0
    last_token: int = -1

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)

    @property
    def slots(self) -> int:
        assert self.cache is not None, "only a running sequence has a cache"
        return self.cache.size


@dataclass(eq=False)
class _Segment:
    """The rows [start, end) of one sequence in a step, and how they read and write its cache."""

    seq: _Sequence
    start: int
    end: int
    step: CacheStep | None = None
    mask: torch.Tensor | None = None
    causal: bool = False


class _KVPool:
    """The keys and values of every running sequence: [R, K, C, D] per layer, one row per sequence.

    A sequence's `KVCache` is a view of the first `size` slots of its row, so its prefill chunks go through
    the model's own rolling-cache code (`models/cache.py`), while the decodes of all rows are written and
    attended to at once (`decode_attention`). Rows and slots grow by doubling, up to `max_rows` and the
    largest size a request may need, and stay allocated: memory is bounded by the configuration, never by
    the number of requests served. Released rows are reused lowest first, which keeps the live rows dense.
    """

    def __init__(self, model: Transformer, max_rows: int, max_slots: int) -> None:
        args = model.args
        self.n_layers, self.n_kv_heads, self.head_dim = args.n_layers, args.n_kv_heads, args.head_dim
        self.dtype, self.device = model.dtype, model.device
        self.max_rows, self.max_slots = max_rows, max_slots
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = self.slots = 0
        self._free = list(range(max_rows))  # a heap
        self._caches: dict[int, KVCache] = {}

    def acquire(self, size: int) -> tuple[int, KVCache]:
        """A free row and an empty cache of `size` slots over it."""
        row = self._free[0]
        self._grow(row + 1, size)
        heapq.heappop(self._free)
        keys = [k[row: row + 1, :, :size] for k in self.keys]
        values = [v[row: row + 1, :, :size] for v in self.values]
        for v in values:
            # Batched decodes weigh padding slots by 0, and 0 * NaN (a previous occupant's) is not 0.
            v.zero_()
        cache = self._caches[row] = KVCache.over(keys, values)
        return row, cache

    def release(self, row: int) -> None:
        if self._caches.pop(row, None) is not None:
            heapq.heappush(self._free, row)

    def _grow(self, rows: int, slots: int) -> None:
        if rows <= self.rows and slots <= self.slots:
            return
        new_rows = min(self.max_rows, max(rows, 2 * self.rows)) if rows > self.rows else self.rows
        new_slots = min(self.max_slots, max(slots, 2 * self.slots)) if slots > self.slots else self.slots
        shape = (new_rows, self.n_kv_heads, new_slots, self.head_dim)

        def grown(old: torch.Tensor | None) -> torch.Tensor:
            new = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if old is not None:
                new[: self.rows, :, : self.slots] = old
            return new

        # Built in full before being swapped in, so that running out of memory leaves the pool as it was.
        keys = [grown(self.keys[layer] if self.keys else None) for layer in range(self.n_layers)]
        values = [grown(self.values[layer] if self.values else None) for layer in range(self.n_layers)]
        self.keys, self.values, self.rows, self.slots = keys, values, new_rows, new_slots
        for row, cache in self._caches.items():  # re-point the live caches at the new buffers
            cache.keys = [k[row: row + 1, :, : cache.size] for k in self.keys]
            cache.values = [v[row: row + 1, :, : cache.size] for v in self.values]

    def decode_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         plan: _DecodePlan, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One new token for each of B decoding rows: store k, v [B, K, D] in the rows' rolling slots, then
        attend q [B, H, 1, D] to each row's cached keys -> [B, H, 1, D]."""
        keys, values = self.keys[layer], self.values[layer]
        keys[plan.rows, :, plan.slots] = k
        values[plan.rows, :, plan.slots] = v
        if plan.read == 0:
            out = torch.empty_like(q)
        else:
            q_all = q
            if not plan.dense:  # rows without a batched decode in [0, hi): a dummy query, output dropped
                q_all = q.new_zeros(plan.hi, *q.shape[1:])
                q_all[plan.rows] = q
            out = attention_core(q_all, keys[: plan.hi, :, : plan.read], values[: plan.hi, :, : plan.read],
                                 AttentionContext(cos, sin, plan.mask))
            out = out if plan.dense else out[plan.rows]
        for i, row, n in plan.solo:
            one_row = slice(row, row + 1)
            out[i: i + 1] = attention_core(q[i: i + 1], keys[one_row, :, :n], values[one_row, :, :n],
                                           AttentionContext(cos, sin, None))
        return out


# Attending to a row alone costs about this many slots of batched attention more (the per-call overhead); it
# pays for rows much longer than the others, since a batched call reads `read` slots of every row.
SOLO_ROW_COST = 1024


@dataclass(eq=False)
class _DecodePlan:
    """Where the step's decodes live in the pool. A token at position p of a row with `size` slots goes to
    slot p mod size (`models/cache.py`); after that write, the row's first min(size, p + 1) slots hold
    exactly the keys it may see (the last `size` <= window positions), so a length mask is all it needs.

    Rows are attended to in one batched call over slots [0, read), except the longest ones when reading
    them alone is cheaper than making every row read as far (`solo`).
    """

    rows: torch.Tensor  # B: pool row of each decode, ascending
    slots: torch.Tensor  # B
    hi: int  # rows [0, hi) are read by the batched call
    read: int  # slots [0, read) are read by the batched call (0: no batched call)
    dense: bool  # rows == 0..hi-1
    mask: torch.Tensor | None  # hi 1 1 read boolean, None when every row reads all `read` slots
    solo: list[tuple[int, int, int]]  # (index among the decodes, row, slots to read) of the rows read alone

    @staticmethod
    def build(rows: list[int], positions: list[int], sizes: list[int], device: torch.device) -> _DecodePlan:
        hi = rows[-1] + 1
        lengths = [min(size, p + 1) for p, size in zip(positions, sizes)]
        # Batch the rows of length <= read, for the read that minimises hi * read + sum over longer rows.
        ranked = sorted(lengths)
        read, best, longer = ranked[-1], hi * ranked[-1], 0
        for j in range(len(ranked) - 1, -1, -1):  # rows ranked[j:] alone, ranked[:j] batched
            longer += ranked[j] + SOLO_ROW_COST
            batched = hi * ranked[j - 1] if j else 0
            if j and ranked[j - 1] == ranked[j]:
                continue  # equal lengths go the same way
            if batched + longer < best:
                read, best = (ranked[j - 1] if j else 0), batched + longer
        solo = [(i, row, n) for i, (row, n) in enumerate(zip(rows, lengths)) if n > read]
        dense = len(rows) == hi and not solo
        mask = None
        if read and (not dense or min(lengths) < read):
            visible = [1] * hi  # rows without a batched decode see one (finite) slot
            for row, n in zip(rows, lengths):
                if n <= read:
                    visible[row] = n
            mask = (torch.arange(read, device=device)
                    < torch.tensor(visible, device=device)[:, None])[:, None, None, :]
        return _DecodePlan(torch.tensor(rows, device=device),
                           torch.tensor([p % size for p, size in zip(positions, sizes)], device=device),
                           hi, read, dense, mask, solo)


@dataclass
class _Counters:
    generated_tokens: int = 0
    prompt_tokens: int = 0
    requests: int = 0
    steps: int = 0
    ttft: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=TTFT_SAMPLES))
    recent: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)  # (time, tokens)


class Engine:
    """Serves `EngineRequest`s on `model` with continuous batching (see the module docstring)."""

    def __init__(self, model: Transformer, config: EngineConfig = EngineConfig()) -> None:
        self.model = model
        self.config = config
        self._condition = threading.Condition()
        self._waker = _Waker(self._condition)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []  # engine thread only, arrival order
        self._n_running = 0  # len(self._running), readable under the condition's lock
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counters = _Counters()
        self._started_at = time.perf_counter()
        self._pool = self._new_pool()
        self._head = pack_linear(model.output)  # model.output itself unless packed is faster

    # -- public surface --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background engine thread (idempotent). Requests submitted before wait for it."""
        with self._condition:
            if self._stopping:
                raise EngineStoppedError("the engine was shut down; create a new Engine")
            if self._thread is not None:
                return
            self._started_at = time.perf_counter()
            self._thread = threading.Thread(target=self._loop, name="tramontane-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the engine thread; every pending stream ends with finish_reason "cancelled"."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._condition:
            leftover = list(self._waiting) + self._running
            self._waiting.clear()
            self._running = []
            self._n_running = 0
        for seq in leftover:
            self._end(seq, TokenEvent(None, finish_reason="cancelled"))
        self._pool = self._new_pool()  # frees the keys and values

    def _new_pool(self) -> _KVPool:
        longest = KVCache.size_for(self.model.args, self.config.max_model_len)
        return _KVPool(self.model, self.config.max_batch, longest)

    def submit(self, request: EngineRequest) -> RequestStream:
        """Validate `request` and queue it; raises `GenerationError` (invalid, `PromptTooLongError`),
        `QueueFullError` or `EngineStoppedError` before anything is queued."""
        seq = self._admit_check(request)
        with self._condition:
            if self._stopping:
                raise EngineStoppedError("the engine is shut down and takes no more requests")
            free_slots = self.config.max_batch - self._n_running
            if len(self._waiting) - free_slots >= self.config.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting (max_queue={self.config.max_queue}); "
                    "retry later"
                )
            self._waiting.append(seq)
            self._condition.notify_all()
        return seq.stream

    def stats(self) -> EngineStats:
        now = time.perf_counter()
        with self._condition:
            c = self._counters
            recent = sum(n for t, n in c.recent if t > now - RATE_WINDOW_S)
            span = min(RATE_WINDOW_S, max(now - self._started_at, 1e-9))
            return EngineStats(
                queued=len(self._waiting), running=self._n_running, generated_tokens_total=c.generated_tokens,
                prompt_tokens_total=c.prompt_tokens, requests_total=c.requests, steps_total=c.steps,
                ttft_samples=tuple(c.ttft), tokens_per_s=recent / span,
            )

    # -- validation ------------------------------------------------------------------------------------------

    def _admit_check(self, request: EngineRequest) -> _Sequence:
        """The engine-side sequence of a valid request; GenerationError naming the first problem otherwise."""
        args, cfg = self.model.args, self.config
        prompt = request.prompt
        if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
            raise GenerationError("the prompt is empty: start it with at least the BOS token")
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
            raise GenerationError("the prompt must be a list of integer token ids")
        bad = [int(t) for t in prompt if not 0 <= t < args.vocab_size]
        if bad:
            raise GenerationError(
                f"the prompt holds {len(bad)} token id(s) outside the vocabulary [0, {args.vocab_size})"
            )
        problems = sampling_problems(request.max_tokens, request.temperature, request.top_p)
        if problems:
            raise GenerationError("; ".join(f"{name} {rule}" for name, rule in problems.items()))
        if request.max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {request.max_tokens}")
        total = len(prompt) + int(request.max_tokens)
        if total > cfg.max_model_len:
            raise PromptTooLongError(
                f"the prompt's {len(prompt)} tokens + max_tokens {request.max_tokens} = {total} exceed "
                f"max_model_len={cfg.max_model_len}; shorten the prompt or lower max_tokens"
            )
        stop = request.stop_token_ids
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < args.vocab_size
                   for t in stop):
            raise GenerationError(f"stop_token_ids must be token ids in [0, {args.vocab_size}), got {stop!r}")
        k = request.logprobs
        top_k = min(cfg.max_logprobs, args.vocab_size)
        if k is not None and not (isinstance(k, numbers.Integral) and not isinstance(k, bool)
                                  and 0 <= k <= top_k):
            raise GenerationError(f"logprobs must be null or an integer in [0, {top_k}], got {k!r}")
        seed = request.seed
        if seed is not None and not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
                                     and -(2**63) <= seed < 2**64):
            raise GenerationError(f"seed must be null or a 64-bit integer, got {seed!r}")
        embeddings = request.embeddings
        if embeddings is not None:
            if not isinstance(embeddings, torch.Tensor) or tuple(embeddings.shape) != (len(prompt), args.dim):
                shape = list(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings)
                raise GenerationError(
                    f"embeddings must be a tensor of shape [{len(prompt)}, {args.dim}] (prompt length, model "
                    f"dim), got {shape}"
                )
            if not embeddings.is_floating_point() or not bool(torch.isfinite(embeddings).all()):
                raise GenerationError("embeddings must be finite floating-point numbers")
            # A copy: the caller may reuse its tensor while the request waits.
            embeddings = embeddings.detach().to(device=self.model.device, dtype=self.model.dtype, copy=True)
        generator = None
        if request.temperature > 0:
            generator = torch.Generator(device=self.model.device)
            if seed is not None:
                generator.manual_seed(int(seed))
            else:
                generator.seed()
        stream = RequestStream(f"req-{uuid.uuid4().hex}", len(prompt), self._waker)
        return _Sequence(stream, [int(t) for t in prompt], int(request.max_tokens),
                         float(request.temperature), float(request.top_p), frozenset(int(t) for t in stop),
                         k, embeddings, generator)

    # -- the engine thread -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                self._serve()
        except BaseException:  # the thread itself is dying: take no more requests, end the pending ones
            logger.critical("the engine thread stopped on an unexpected error", exc_info=True)
            with self._condition:
                self._stopping = True
                pending = self._running + list(self._waiting)
                self._waiting.clear()
            for seq in pending:
                self._fail(seq, "the engine stopped on an internal error; see the log")
            raise
        # On a normal stop, shutdown() cancels whatever is left once this thread has returned.

    def _serve(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and not self._waiting and not self._running:
                    self._condition.wait()
                if self._stopping:
                    return
            try:
                self._step()
            except Exception:  # a bug in scheduling itself: end every request so as not to loop on it
                logger.exception("engine step failed outside the forward call")
                with self._condition:
                    pending = self._running + list(self._waiting)
                    self._waiting.clear()
                for seq in pending:
                    self._fail(seq, "internal error in the engine's scheduler; see the log")

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if not self._running:
            return
        decodes = sorted((s for s in self._running if s.decoding), key=lambda s: s.row)
        budget = self.config.max_step_tokens - len(decodes)
        chunks: list[tuple[_Sequence, int]] = []
        for seq in self._running:
            if budget == 0:
                break
            if not seq.decoding:
                n = min(self.config.prefill_chunk, len(seq.prompt) - seq.prefilled, budget)
                chunks.append((seq, n))
                budget -= n
        in_step = decodes + [s for s, _ in chunks]
        try:
            emitted = self._forward(decodes, chunks)
        except Exception as exc:
            logger.exception("engine forward step failed; ending its %d request(s)", len(in_step))
            for seq in in_step:
                self._fail(seq, f"internal error in an engine step ({type(exc).__name__}); see the log")
            return
        now = time.perf_counter()
        for seq, n in chunks:
            seq.prefilled += n
        for seq, event in emitted:
            seq.generated += 1
            seq.last_token = event.token if event.token is not None else -1
            if seq.generated == 1:
                seq.stream.ttft = now - seq.stream.submitted_at
        # Counters and slots are up to date before any event goes out, so that a consumer that has seen its
        # final event also sees it in `stats()` and finds its slot free.
        with self._condition:
            c = self._counters
            c.steps += 1
            c.prompt_tokens += sum(n for _, n in chunks)
            c.generated_tokens += len(emitted)
            c.recent.append((now, len(emitted)))
            while c.recent and c.recent[0][0] <= now - RATE_WINDOW_S:
                c.recent.popleft()
            c.ttft.extend(seq.stream.ttft for seq, _ in emitted if seq.generated == 1 and seq.stream.ttft)
        for seq, event in emitted:
            if event.finish_reason is not None:
                self._release(seq)
            seq.stream._push(event)

    def _drop_cancelled(self) -> None:
        with self._condition:
            cancelled = [s for s in self._waiting if s.stream.cancelled]
            for seq in cancelled:
                self._waiting.remove(seq)
        cancelled += [s for s in self._running if s.stream.cancelled]
        for seq in cancelled:
            self._end(seq, TokenEvent(None, finish_reason="cancelled"))

    def _admit(self) -> None:
        while len(self._running) < self.config.max_batch:
            with self._condition:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
                self._running.append(seq)  # in one critical section, so that `submit` counts it once
                self._n_running = len(self._running)
            try:
                size = KVCache.size_for(self.model.args, len(seq.prompt) + seq.max_tokens)
                seq.row, seq.cache = self._pool.acquire(size)
            except Exception as exc:  # e.g. out of memory: this request fails, the others go on
                logger.exception("could not allocate a KV cache")
                self._end(seq, TokenEvent(None, finish_reason="error",
                                          error=f"could not allocate the KV cache ({type(exc).__name__})"))

    def _release(self, seq: _Sequence) -> None:
        if seq.row >= 0:
            self._pool.release(seq.row)
        seq.row, seq.cache = -1, None
        seq.embeddings = None
        with self._condition:
            if seq in self._running:
                self._running.remove(seq)
                self._n_running = len(self._running)
            self._counters.requests += 1

    def _end(self, seq: _Sequence, event: TokenEvent) -> None:
        self._release(seq)
        seq.stream._push(event)

    def _fail(self, seq: _Sequence, message: str) -> None:
        self._end(seq, TokenEvent(None, finish_reason="error", error=message))

    # -- one forward call over the flattened step ------------------------------------------------------------

    def _forward(self, decodes: list[_Sequence], chunks: list[tuple[_Sequence, int]]
                 ) -> list[tuple[_Sequence, TokenEvent]]:
        """Run one step: decodes (one token each) then prefill chunks; the sequences that produce a token
        this step (every decode, and every prompt whose last chunk this is) with their event."""
        model, device = self.model, self.model.device
        tokens: list[int] = []
        positions: list[int] = []
        segments: list[_Segment] = []
        for seq in decodes:
            tokens.append(seq.last_token)
            positions.append(len(seq.prompt) + seq.generated - 1)
        n_dec = len(decodes)
        plan = None if not decodes else _DecodePlan.build(
            [seq.row for seq in decodes], positions, [seq.slots for seq in decodes], device)
        for seq, n in chunks:
            segments.append(_Segment(seq, len(tokens), len(tokens) + n))
            tokens.extend(seq.prompt[seq.prefilled: seq.prefilled + n])
            positions.extend(range(seq.prefilled, seq.prefilled + n))
        token_t = torch.tensor(tokens, dtype=torch.long, device=device)[None]  # 1 N
        position_t = torch.tensor(positions, dtype=torch.long, device=device)[None]  # 1 N
        window = model.args.sliding_window
        for seg in segments:
            assert seg.seq.cache is not None
            seg_positions = position_t[:, seg.start: seg.end]
            seg.step = seg.seq.cache.plan(seg_positions)
            seg.mask, seg.causal = cache_mask(seg_positions, seg.step, window)

        h = model.tok_embeddings(token_t)  # 1 N dim
        for seg, (seq, n) in zip(segments, chunks):
            if seq.embeddings is not None:
                h[0, seg.start: seg.end] = seq.embeddings[seq.prefilled: seq.prefilled + n]
        cos, sin = rotary_angles(position_t, model.inverse_frequencies(device))

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
            out = torch.empty_like(q)  # 1 H N D
            if plan is not None:
                dec = slice(0, n_dec)
                decoded = self._pool.decode_attention(
                    layer, q[0, :, dec].transpose(0, 1)[:, :, None], k[0, :, dec].transpose(0, 1),
                    v[0, :, dec].transpose(0, 1), plan, cos, sin)  # B H 1 D
                out[0, :, dec] = decoded[:, :, 0].transpose(0, 1)
            for seg in segments:
                rows = slice(seg.start, seg.end)
                ctx = AttentionContext(cos, sin, seg.mask, seg.causal, seg.seq.cache, seg.step, layer)
                out[:, :, rows] = attention_core(q[:, :, rows], k[:, :, rows], v[:, :, rows], ctx)
            return out

        for i, layer in enumerate(model.layers):
            h = layer(h, AttentionContext(cos, sin, None, layer=i, core=core))
        for seg in segments:
            assert seg.seq.cache is not None and seg.step is not None
            seg.seq.cache.commit(seg.step)

        emitting = list(decodes)
        last_rows = list(range(n_dec))
        for seg in segments:
            if seg.seq.prefilled + (seg.end - seg.start) == len(seg.seq.prompt):
                emitting.append(seg.seq)
                last_rows.append(seg.end - 1)
        if not emitting:
            return []
        hidden = h[0, :n_dec] if len(last_rows) == n_dec else h[0, torch.tensor(last_rows, device=device)]
        logits = self._head(model.norm(hidden)).float()  # M V
        return self._sample(emitting, logits)

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[tuple[_Sequence, TokenEvent]]:
        """Pick each sequence's next token from its row of logits [M, V] and build its event."""
        chosen = logits.argmax(dim=-1)
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                chosen[row] = sample_next(logits[row: row + 1], seq.temperature, seq.top_p, seq.generator)[0]
        want = [row for row, seq in enumerate(seqs) if seq.logprobs is not None]
        chosen_lp: dict[int, float] = {}
        top: dict[int, tuple[tuple[int, float], ...]] = {}
        if want:
            index = torch.tensor(want, device=logits.device)
            logp = torch.log_softmax(logits[index], dim=-1)  # W V
            picked = logp.gather(-1, chosen[index][:, None]).squeeze(-1).tolist()
            k = max(seqs[row].logprobs or 0 for row in want)
            top_lp_l: list[list[float]] = []
            top_ids_l: list[list[int]] = []
            if k > 0:
                top_lp, top_ids = torch.topk(logp, k, dim=-1)
                top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
            for i, row in enumerate(want):
                chosen_lp[row] = picked[i]
                kr = seqs[row].logprobs or 0
                if kr > 0:
                    top[row] = tuple(zip(top_ids_l[i][:kr], top_lp_l[i][:kr]))
        out = []
        for row, (seq, token) in enumerate(zip(seqs, chosen.tolist())):
            reason = ("stop" if token in seq.stop
                      else "length" if seq.generated + 1 >= seq.max_tokens else None)
            out.append((seq, TokenEvent(token, chosen_lp.get(row), top.get(row), reason)))
        return out


__all__ = ["Engine", "EngineConfig", "EngineRequest", "EngineStats", "RequestStream", "TokenEvent"]
