"""`GET /metrics`: the engine's load and the server's latencies in Prometheus' text format (0.0.4), written out
here rather than through prometheus_client (not a dependency): gauges, counters and one histogram."""

from __future__ import annotations

import bisect
import collections
from collections.abc import Sequence

from tramontane.serve.engine import EngineStats

PREFIX = "tramontane"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Cumulative bucket counts, their sum and count, as Prometheus histograms carry them."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {self.total!r}", f"{name}_count {self.count}"]


class ServerMetrics:
    """What the HTTP layer observes itself (the engine's counters come from `Engine.stats()`)."""

    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()  # (route, status)

    def observe_request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def render(self, stats: EngineStats) -> str:
        def metric(name: str, kind: str, help: str, value: float) -> list[str]:
            return [f"# HELP {PREFIX}_{name} {help}", f"# TYPE {PREFIX}_{name} {kind}", f"{PREFIX}_{name} {value!r}"]

        lines = [
            *metric("requests_queued", "gauge", "Requests waiting for a slot in the running batch.", stats.queued),
            *metric("requests_running", "gauge", "Sequences in the running batch.", stats.running),
            *metric("generation_tokens_per_second", "gauge", "Generated tokens per second, recent window.",
                    float(stats.tokens_per_s)),
            *metric("generation_tokens_total", "counter", "Tokens generated.", stats.generated_tokens_total),
            *metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", stats.prompt_tokens_total),
            *metric("engine_requests_total", "counter", "Engine requests finished, any reason.",
                    stats.requests_total),
            *metric("engine_steps_total", "counter", "Engine forward steps.", stats.steps_total),
            f"# HELP {PREFIX}_time_to_first_token_seconds Time from submission to the first generated token.",
            f"# TYPE {PREFIX}_time_to_first_token_seconds histogram",
            *self.ttft.lines(f"{PREFIX}_time_to_first_token_seconds"),
            f"# HELP {PREFIX}_http_requests_total HTTP requests answered, by route and status.",
            f"# TYPE {PREFIX}_http_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'{PREFIX}_http_requests_total{{route="{route}",status="{status}"}} {n}')
        return "\n".join(lines) + "\n"


__all__ = ["CONTENT_TYPE", "Histogram", "ServerMetrics"]
