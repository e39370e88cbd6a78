"""DP-FedAvg on Flower's Message API: a server `Strategy` and the client mod that clips.

The mechanism itself is `tramontane.federated.dp_fedavg` (sampling, noise, ledger) and `clipping`; this
module only moves arrays between them and Flower's messages. A client process loads `clipping` (numpy) and
not the server's side (torch, dp-accounting), which `DPFedAvg` imports when it is built.

- `DPFedAvg` (ServerApp side): a `flwr.serverapp.strategy.Strategy`, run by `Strategy.start` like Flower's
  own. `configure_train` refuses a round that would exceed the budget (`PrivacyBudgetError`, nothing spent),
  draws the cohort by Poisson sampling over the population fixed at the first round (the node ids of the
  `num_clients` first connected SuperNodes, sorted), and sends each sampled node the global model and the
  clipping norm. `aggregate_train` sums the clipped updates the replies carry (`sum_clipped_updates`),
  releases theta + eta_s (S + Z) / (qN) and records the round on the ledger. Federated evaluation is not
  configured: evaluate on the server with `Strategy.start(evaluate_fn=...)` on public data, or account
  for it separately.
- `clipping_mod` (ClientApp side): wraps a train handler that replies with its NEW parameters under the
  ArrayRecord key it received them ("arrays"), and replaces them by the clipped update
  clip(new - received, C) (`clip_update`), C read from the message's config. Any Flower ClientApp written
  the usual way becomes a DP-FedAvg client with `@app.train(mods=[clipping_mod])`. Flower's
  `fixedclipping_mod` is not used: it returns received + clipped update in float32, from which the
  server's subtraction can exceed C by rounding; and Flower's DP wrappers it pairs with average through
  FedAvg's weights (examples per client) instead of McMahan et al.'s sum over the expected cohort.

Secure aggregation. The strategy needs the SUM of the cohort's clipped updates and nothing else
(`aggregate_train` -> `_clipped_sum` -> `sum_clipped_updates`). In Flower 1.42, SecAgg+ is a workflow
(`flwr.server.workflow.SecAggPlusWorkflow`, with `flwr.client.mod.secaggplus_mod` on the clients) that runs
inside `DefaultWorkflow` on a `LegacyContext`, i.e. with the legacy `flwr.server.strategy` strategies and a
client manager, not with Message-API strategies like this one; it returns a weighted average of the
clients' parameters over the survivors. To plug it in, each client would send its clipped update with weight
1 through `secaggplus_mod`, the workflow's average times the number of survivors is S (its clipping range
must cover [-C, C] per coordinate; quantisation error then adds to S), and `_clipped_sum` would return that
S; the server would no longer re-clip single updates, so the norm bound would have to be enforced inside
the protocol (see `sum_clipped_updates`). Nothing of this is wired here: the sum is plaintext.

flwr is an optional dependency: `pip install 'tramontane[federated]'`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tramontane.errors import ConfigError, TramontaneError
from tramontane.federated import INSTALL_HINT
from tramontane.federated.clipping import Arrays, check_like, clip_update, sum_clipped_updates, update_norm

try:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp.typing import ClientAppCallable
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(INSTALL_HINT) from err

if TYPE_CHECKING:  # the server's side, imported when a DPFedAvg is built: client processes never load it
    from tramontane.federated.dp_fedavg import DPFedAvgConfig

logger = logging.getLogger(__name__)

ARRAYS_KEY = "arrays"  # the message's ArrayRecord: the global model out, the clipped update back
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
MAX_NORM_KEY = "max-update-norm"  # the clipping norm C, in the train message's config
ROUND_KEY = "server-round"


def to_arrays(record: ArrayRecord) -> Arrays:
    """An ArrayRecord as named numpy arrays, in its order."""
    return {k: np.asarray(v.numpy()) for k, v in record.items()}


def to_record(arrays: Arrays) -> ArrayRecord:
    """Named numpy arrays as an ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_number(record: ConfigRecord | MetricRecord, key: str, default: float | None = None) -> float:
    """A number from a Flower record; `ConfigError` when it is missing (without default) or not a number."""
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"record entry {key!r} must be a number, got {value!r}")
    return float(value)


def clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: the train handler's new parameters -> the clipped update (module docstring).

    Leaves other message types, error replies and replies without the "arrays" record (e.g. a canary-only
    reply) untouched. Adds "clipped" (1 if the update was longer than C) to the reply's "metrics" record: a
    diagnostic for the operator, about one client, that plaintext aggregation sees anyway (secure
    aggregation would not) and that is not differentially private.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is None or MAX_NORM_KEY not in config:
        raise ConfigError(f"a DP-FedAvg train message must carry {MAX_NORM_KEY!r} in its {CONFIG_KEY!r} "
                          "record; is the server running tramontane's DPFedAvg strategy?")
    max_norm = record_number(config, MAX_NORM_KEY)
    received = to_arrays(msg.content.array_records[ARRAYS_KEY])
    reply = call_next(msg, context)
    if reply.has_error() or ARRAYS_KEY not in reply.content.array_records:
        return reply
    new = to_arrays(reply.content.array_records[ARRAYS_KEY])
    check_like(new, received, "the client's new parameters")
    delta = {k: new[k].astype(np.float64) - received[k].astype(np.float64) for k in received}
    clipped, norm = clip_update({k: d.astype(received[k].dtype) for k, d in delta.items()}, max_norm)
    reply.content.array_records[ARRAYS_KEY] = to_record(clipped)
    metrics = reply.content.metric_records.get(METRICS_KEY)
    if metrics is not None:
        metrics["clipped"] = int(norm > max_norm)
    return reply


@dataclass(frozen=True)
class RoundRecord:
    """What one DP-FedAvg round did: counts, times and the budget. The counts of sampled, replying and clipped
    clients and the largest norm are diagnostics for the operator of a trusted server, NOT differentially
    private (they depend on who took part and on their data): keep them out of what is released with the
    model. Under secure aggregation the last two would not be available."""

    round: int
    sampled: int  # clients drawn
    replied: int  # clipped updates summed
    dropped: int  # sampled clients that did not reply or replied with an error
    clipped: int  # replies whose update was clipped on the client (as they report it)
    largest_norm: float  # the largest norm of an update as received, before the server's own check
    epsilon: float  # spent after this round, at the config's delta
    seconds: float  # configure_train to the end of aggregate_train: the round's wall time on the server

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["epsilon"] = out["epsilon"] if np.isfinite(out["epsilon"]) else "inf"
        return out


class DPFedAvg(Strategy):
    """DP-FedAvg with user-level DP as a Flower strategy (module docstring; mechanism in `dp_fedavg`).

    Args:
        config: the mechanism's settings; `config.num_clients` nodes must connect before the first round.
        connect_timeout: seconds to wait for them.
    """

    def __init__(self, config: DPFedAvgConfig, *, connect_timeout: float = 300.0) -> None:
        from tramontane.federated.dp_fedavg import DPFedAvgServer

        super().__init__()
        self.config = config
        self.server = DPFedAvgServer(config)
        self.connect_timeout = connect_timeout
        self.population: list[int] | None = None
        self.history: list[RoundRecord] = []
        self._pending: dict[int, tuple[Arrays, list[int], float]] = {}
        self._last: tuple[int, Arrays, list[int]] | None = None  # the last aggregated round, for replays

    def __repr__(self) -> str:
        return f"DPFedAvg({self.config})"

    def summary(self) -> None:
        c = self.config
        logger.info("DP-FedAvg: N = %d clients, q = %.4g (%.4g expected per round), sigma = %g, C = %g, "
                    "delta = %g, target epsilon %s", c.num_clients, c.sample_rate, c.clients_per_round,
                    c.noise_multiplier, c.max_update_norm, c.delta, c.target_epsilon)

    def epsilon(self) -> float:
        """Epsilon spent so far at the config's delta (inf after a non-private round)."""
        return self.server.epsilon()

    def _population(self, grid: Grid) -> list[int]:
        if self.population is None:
            deadline = time.monotonic() + self.connect_timeout
            while len(nodes := sorted(grid.get_node_ids())) < self.config.num_clients:
                if time.monotonic() > deadline:
                    raise ConfigError(f"only {len(nodes)} of num_clients = {self.config.num_clients} clients "
                                      f"connected within {self.connect_timeout:g} s; start more SuperNodes "
                                      "or lower num-clients")
                time.sleep(1.0)
            self.population = nodes[:self.config.num_clients]
            logger.info("DP-FedAvg population: %d nodes", len(self.population))
        return self.population

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        started = time.monotonic()
        self.server.check_budget()  # raises before anything is sampled or sent
        population = self._population(grid)
        cohort = [population[i] for i in self.server.sample_cohort()]
        config[MAX_NORM_KEY] = self.config.max_update_norm
        config[ROUND_KEY] = server_round
        self._pending[server_round] = (to_arrays(arrays), cohort, started)
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        logger.info("round %d: %d of %d clients sampled", server_round, len(cohort), len(population))
        return [Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in cohort]

    def _clipped_sum(self, replies: list[Message], params: Arrays, cohort: list[int],
                     extra: Iterable[Arrays] = ()) -> tuple[Arrays, int, int, float]:
        """(S, updates summed, updates clipped on their client, largest norm received) over the cohort's
        valid replies (and `extra` updates, for audits)."""
        updates: list[Arrays] = []
        clipped = 0
        for reply in replies:
            source = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning("client %d failed (%s): counted as a zero update", source, reply.error.reason)
                continue
            if source not in cohort:
                logger.warning("ignoring a reply from node %d, which was not sampled", source)
                continue
            if ARRAYS_KEY not in reply.content.array_records:
                logger.warning("client %d replied without an update: counted as zero", source)
                continue
            updates.append(to_arrays(reply.content.array_records[ARRAYS_KEY]))
            metrics = reply.content.metric_records.get(METRICS_KEY)
            if metrics is not None:
                clipped += int(record_number(metrics, "clipped", 0))
        largest = max((update_norm(u) for u in updates), default=0.0)
        total, count = sum_clipped_updates([*updates, *extra], params, self.config.max_update_norm)
        return total, count, clipped, largest

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        params, cohort, started = self._pending.pop(server_round)
        replies = list(replies)
        total, count, clipped, largest = self._clipped_sum(replies, params, cohort)
        new = self.server.release(params, total)
        record = RoundRecord(round=server_round, sampled=len(cohort), replied=count,
                             dropped=len(cohort) - count, clipped=clipped, largest_norm=largest,
                             epsilon=self.server.epsilon(), seconds=time.monotonic() - started)
        self.history.append(record)
        self._last = (server_round, params, cohort)
        metrics = MetricRecord({"sampled": record.sampled, "replied": record.replied,
                                "epsilon": record.epsilon if np.isfinite(record.epsilon) else -1.0})
        return to_record(new), metrics

    def replay_train(self, server_round: int, replies: list[Message], extra: list[Arrays]) -> ArrayRecord:
        """The model `aggregate_train` would release for this round's replies plus the `extra` clipped
        updates, with fresh noise from a separate stream, recording nothing (audits only: CANIFE)."""
        if self._last is None or self._last[0] != server_round:
            raise TramontaneError(f"round {server_round} is not the last aggregated round: nothing to replay")
        _, params, cohort = self._last
        total, _, _, _ = self._clipped_sum(replies, params, cohort, extra)
        return to_record(self.server.replay(params, total))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
