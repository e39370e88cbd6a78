"""The Flower app: DP-FedAvg on UCI Adult, optionally audited by CANIFE, for Flower's deployment runtime.

Why a Flower app and not `tramontane federated server|client` commands: in Flower 1.42's deployment runtime
the user runs no server or client program. A SuperLink (`flower-superlink`) and the SuperNodes
(`flower-supernode`, one per client, each told its data by `--node-config`) are long-running services that
Flower operates; `flwr run APP_DIR CONNECTION` ships the app to the SuperLink, whose SuperExec starts the
ServerApp, and every SuperNode starts the ClientApp for each message. Our commands could only wrap those
processes, the home-made process management the runtime exists to replace. So the app is two objects,
`server_app` and `client_app`, and `write_flower_app` (`tramontane federated app DIR`) writes the app
directory (a pyproject.toml naming them) that `flwr run` takes.

A local federation on loopback, without TLS (what tests/integration/test_federated.py runs):

    flower-superlink --insecure --port 9093 --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9100 \
        --node-config 'partition-id=0 num-partitions=3'   # and partition-id=1, 2 on --port 9101, 9102
    tramontane federated app ./dp-fedavg
    # $FLWR_HOME/config.toml:  [superlink] default = "local"
    #                          [superlink.local] address = "127.0.0.1:9093"  insecure = true
    flwr run ./dp-fedavg local --stream --run-config 'audit-every=1 output="/abs/path/run.json"'
    tramontane federated report /abs/path/run.json

tramontane must be installed where the SuperLink and SuperNodes run: the runtime's own dependency
installation (`uv sync` into a fresh environment) is disabled above. The run's settings are the app's run
config (`DEFAULT_RUN_CONFIG`, overridable with `--run-config`); the ServerApp writes its report (ledger,
epsilon, rounds, accuracy, CANIFE's audits) as JSON to `output` (mode 0600, the operator's: its
`fields` say which parts are DP; only the ledger's may be shared), a path on the SuperLink's machine (make it
absolute: the ServerApp runs in the SuperLink's process tree, not where `flwr run` was typed). Each SuperNode
on one machine needs its own `--port` (its Runtime API).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tramontane.errors import ConfigError, PrivacyBudgetError
from tramontane.federated import INSTALL_HINT, task
from tramontane.federated.canary import (
    ACTION_KEY,
    CANARY_ONLY,
    CANARY_RECORD,
    POOL_KEY,
    craft_canary_update,
    design_pool,
    unflatten,
)
from tramontane.federated.flower import (
    ARRAYS_KEY,
    CONFIG_KEY,
    MAX_NORM_KEY,
    METRICS_KEY,
    ROUND_KEY,
    DPFedAvg,
    clipping_mod,
    record_number,
    to_arrays,
    to_record,
)
from tramontane.files import HOLDER_MODE, SHAREABLE_MODE, write_atomic, write_json_atomic
from tramontane.seeding import derived_seed, numpy_rng

try:
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(INSTALL_HINT) from err

if TYPE_CHECKING:  # server side only: client processes do not load dp-accounting and torch
    from tramontane.federated.dp_fedavg import DPFedAvgConfig

logger = logging.getLogger(__name__)

REPORT_FORMAT = "tramontane.federated_run"
REPORT_VERSION = 1

# The app's run config, with its defaults: what `flwr run --run-config 'key=value ...'` may override.
DEFAULT_RUN_CONFIG: dict[str, int | float | str] = {
    "num-rounds": 3,
    "num-clients": 3,  # N: the population; this many SuperNodes must connect
    "clients-per-round": 2.0,  # qN: the expected cohort
    "noise-multiplier": 1.0,  # sigma; 0 is a non-private run
    "max-update-norm": 0.5,  # C
    "server-learning-rate": 1.0,
    "delta": 1e-5,
    "target-epsilon": 0.0,  # 0: no budget
    "accountant": "rdp",
    "local-epochs": 1,
    "local-batch-size": 64,
    "local-learning-rate": 0.5,
    "audit-every": 0,  # 0: no CANIFE; k: audit rounds 1, 1 + k, ...
    "audit-trials": 200,
    "audit-design-pool": 16,
    "seed": -1,  # -1: fresh OS entropy (secure); else a fixed seed (reproducible, NOT secure)
    "round-timeout": 600.0,
    "connect-timeout": 300.0,
    "output": "",  # where the ServerApp writes its JSON report ("" : nowhere)
}


def _setting(run_config: Mapping[str, Any], key: str) -> Any:
    default = DEFAULT_RUN_CONFIG[key]
    value = run_config.get(key, default)
    if isinstance(default, bool) or isinstance(value, bool):
        raise ConfigError(f"run config {key!r} must be a {type(default).__name__}, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        if not isinstance(value, int):
            raise ConfigError(f"run config {key!r} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)):
            raise ConfigError(f"run config {key!r} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"run config {key!r} must be a string, got {value!r}")
    return value


def _seed(run_config: Mapping[str, Any]) -> int | None:
    seed = _setting(run_config, "seed")
    return None if seed < 0 else seed


def dp_config(run_config: Mapping[str, Any]) -> DPFedAvgConfig:
    """The mechanism's settings from the app's run config."""
    from tramontane.federated.dp_fedavg import DPFedAvgConfig

    unknown = sorted(set(run_config) - set(DEFAULT_RUN_CONFIG))
    if unknown:
        raise ConfigError(f"unknown run config keys {unknown}; known: {sorted(DEFAULT_RUN_CONFIG)}")
    target = _setting(run_config, "target-epsilon")
    return DPFedAvgConfig(
        num_clients=_setting(run_config, "num-clients"),
        clients_per_round=_setting(run_config, "clients-per-round"),
        noise_multiplier=_setting(run_config, "noise-multiplier"),
        max_update_norm=_setting(run_config, "max-update-norm"),
        server_learning_rate=_setting(run_config, "server-learning-rate"),
        delta=_setting(run_config, "delta"),
        target_epsilon=target if target > 0 else None,
        accountant=_setting(run_config, "accountant"),
        seed=_seed(run_config),
    )


def local_training(run_config: Mapping[str, Any]) -> task.LocalTraining:
    return task.LocalTraining(epochs=_setting(run_config, "local-epochs"),
                              batch_size=_setting(run_config, "local-batch-size"),
                              learning_rate=_setting(run_config, "local-learning-rate"))


# ------------------------------------------------------------------------------------------------ server


def run_server(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The ServerApp's work: DP-FedAvg (wrapped in CANIFE when `audit-every` > 0) for `num-rounds` rounds,
    evaluated on Adult's test split after every round; returns the report (and writes it to `output`)."""
    from tramontane.federated.auditing import CanifeConfig, CanifeStrategy

    config = dp_config(run_config)
    num_rounds = _setting(run_config, "num-rounds")
    audit_every = _setting(run_config, "audit-every")
    strategy = DPFedAvg(config, connect_timeout=_setting(run_config, "connect-timeout"))
    audit: CanifeStrategy | None = None
    if audit_every > 0:
        canife = CanifeConfig(audit_every=audit_every, trials=_setting(run_config, "audit-trials"),
                              design_pool=_setting(run_config, "audit-design-pool"), seed=config.seed)
        audit = CanifeStrategy(strategy, sample_rate=config.sample_rate,
                               noise_multiplier=config.noise_multiplier,
                               max_update_norm=config.max_update_norm, delta=config.delta, config=canife)
    x_test, y_test = task.held_out_data()
    evaluation: dict[int, dict[str, float]] = {}

    def evaluate(server_round: int, arrays: Any) -> MetricRecord:
        loss, accuracy = task.evaluate(to_arrays(arrays), x_test, y_test)
        evaluation[server_round] = {"loss": loss, "accuracy": accuracy}
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    started = time.monotonic()
    stopped = None
    try:
        (audit or strategy).start(grid, to_record(task.initial_params()), num_rounds=num_rounds,
                                  timeout=_setting(run_config, "round-timeout"), evaluate_fn=evaluate)
    except PrivacyBudgetError as err:
        stopped = str(err)
        logger.warning("stopped: %s", err)
    rounds_run = len(strategy.history)
    epsilon = strategy.epsilon()
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION,
        "run_config": {**DEFAULT_RUN_CONFIG, **dict(run_config)},
        "rounds_run": rounds_run, "stopped": stopped, "seconds": time.monotonic() - started,
        "privacy": {"epsilon": epsilon if math.isfinite(epsilon) else "inf", "delta": config.delta,
                    "accountant": config.accountant, "sample_rate": config.sample_rate,
                    "noise_multiplier": config.noise_multiplier, "max_update_norm": config.max_update_norm,
                    "num_clients": config.num_clients, "ledger": strategy.server.ledger.to_dict()},
        "rounds": [r.to_dict() for r in strategy.history],
        "evaluation": {str(k): v for k, v in sorted(evaluation.items())},
        "audit": None if audit is None else audit.report(rounds_run),
        "fields": REPORT_FIELDS,
    }
    output = _setting(run_config, "output")
    if output:  # the operator's file (0600): only "privacy" and "run_config" may be shared from it
        write_json_atomic(output, report, HOLDER_MODE)
    return report


# What each part of the run report is: the released models are covered by the ledger; the rest is computed
# from the clients' updates or the held-out rows without noise, for the federation's operator only.
REPORT_FIELDS = {
    "run_config": "public input (the run's settings)",
    "privacy": "DP: the ledger of the released models and its epsilon",
    "rounds": "operator only, not DP: the Poisson cohort of each round (who was sampled must stay secret for "
              "the sampling's amplification) and the clipped updates' norms",
    "evaluation": "operator only, not DP: loss and accuracy on the held-out rows",
    "audit": "operator only, not DP: CANIFE's replays read the noise-free sum of the clipped updates",
}


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    # dp-accounting's RDP logs, through absl, each fractional order whose series it gives up on (the order is
    # then left out, which is safe); CANIFE's compositions at q = 2/3 would fill the run's log with them
    logging.getLogger("absl").setLevel(logging.ERROR)
    run_server(grid, dict(context.run_config))


# ------------------------------------------------------------------------------------------------ client


def _node_setting(context: Context, key: str) -> int:
    value = context.node_config.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"this SuperNode needs an integer {key!r} in its --node-config "
                          f"('partition-id=0 num-partitions=3'), got {value!r}")
    return value


def train_client(msg: Message, context: Context) -> Message:
    """The ClientApp's train handler: local training on this node's Adult shard (new parameters under
    "arrays", clipped into an update by `clipping_mod`), and, when the CANIFE strategy asks, a crafted
    canary update under "canary"."""
    run_config = dict(context.run_config)
    partition = _node_setting(context, "partition-id")
    x, y = task.client_data(partition, _node_setting(context, "num-partitions"))
    config = msg.content.config_records[CONFIG_KEY]
    server_round = int(record_number(config, ROUND_KEY, 0))
    action = str(config.get(ACTION_KEY, ""))
    params = to_arrays(msg.content.array_records[ARRAYS_KEY])
    training = local_training(run_config)
    seed = _seed(run_config)
    records: dict[str, Any] = {}
    metrics: dict[str, int | float | list[int] | list[float]] = {"num-examples": len(y)}
    if action != CANARY_ONLY:
        rng = numpy_rng(seed, "local training", partition, server_round)
        records[ARRAYS_KEY] = to_record(task.local_train(params, x, y, training, rng))
    if action:
        pool_size = int(record_number(config, POOL_KEY))
        max_norm = record_number(config, MAX_NORM_KEY)
        pool_rng = numpy_rng(seed, "canary design training", partition, server_round)
        pool = design_pool(params, len(y), pool_size, max_norm,
                           lambda rows: task.local_train(params, x[rows], y[rows], training, pool_rng),
                           seed=derived_seed(seed, "canary design pool", server_round))
        canary = craft_canary_update(pool, max_norm, seed=derived_seed(seed, "canary", server_round))
        records[CANARY_RECORD] = to_record(unflatten(canary, params))
        metrics[POOL_KEY] = pool_size
    records[METRICS_KEY] = MetricRecord(metrics)
    return Message(RecordDict(records), reply_to=msg)


client_app = ClientApp()


@client_app.train(mods=[clipping_mod])
def _client_train(msg: Message, context: Context) -> Message:
    return train_client(msg, context)


# ------------------------------------------------------------------------------------------- app folder


def _toml_value(value: float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    return str(value)


def write_flower_app(directory: str | Path, overrides: Mapping[str, int | float | str] | None = None) -> Path:
    """Write the Flower app directory for `flwr run` (its pyproject.toml) and return its path.

    `overrides` replace defaults of the run config (`DEFAULT_RUN_CONFIG`); `flwr run --run-config` can
    still override them per run.
    """
    overrides = dict(overrides or {})
    config = {**DEFAULT_RUN_CONFIG, **overrides}
    dp_config(config)  # refuse a bad configuration now rather than on the SuperLink
    for key, value in overrides.items():
        if type(value) is not type(DEFAULT_RUN_CONFIG[key]) and not (
                isinstance(DEFAULT_RUN_CONFIG[key], float) and isinstance(value, int)):
            raise ConfigError(f"run config {key!r} must be a {type(DEFAULT_RUN_CONFIG[key]).__name__}, "
                              f"got {value!r}")
    lines = [
        "# A Flower app: DP-FedAvg with user-level DP on UCI Adult, audited by CANIFE",
        "# (written by tramontane.federated.app.write_flower_app).",
        "# Run it on a Flower federation (see tramontane/federated/app.py):",
        "#     flwr run <this folder> <connection> --stream --run-config 'noise-multiplier=2.0'",
        "",
        "[project]",
        'name = "tramontane-dp-fedavg"',
        'version = "1.0.0"',
        'description = "DP-FedAvg with user-level differential privacy and CANIFE audits"',
        'license = "Apache-2.0"',
        'dependencies = ["tramontane[federated]"]',
        "",
        "[tool.flwr.app]",
        'publisher = "tramontane"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "tramontane.federated.app:server_app"',
        'clientapp = "tramontane.federated.app:client_app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {_toml_value(value)}" for key, value in config.items()),
        "",
    ]
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "pyproject.toml", "\n".join(lines), SHAREABLE_MODE)
    return folder


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def report_summary(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows that sum a run report up: what the CLI prints."""
    privacy = report["privacy"]
    rows = [("rounds run", str(report["rounds_run"])),
            ("ledger epsilon", (f"{_fmt(privacy['epsilon'])} at delta {privacy['delta']:g} "
                                f"({privacy['accountant']})")),
            ("q, sigma, C", (f"{privacy['sample_rate']:.4g}, {privacy['noise_multiplier']:g}, "
                             f"{privacy['max_update_norm']:g}"))]
    evaluation = report.get("evaluation") or {}
    if evaluation:
        last = max(evaluation, key=int)
        rows.append(("test accuracy", f"{evaluation[last]['accuracy']:.4f} after round {last}"))
    audit = report.get("audit")
    if audit:
        for r in audit["rounds"]:
            e = r["estimate"]
            measured = (f"{_fmt(e['epsilon'])} [{_fmt(e['low'])}, {_fmt(e['high'])}] at delta "
                        f"{e['delta']:.3g}; one-step theory {_fmt(r['theoretical_epsilon'])}")
            rows.append((f"CANIFE round {r['round']}", measured))
        if audit["composed"]:
            c = audit["composed"]
            composed = (f"{_fmt(c['epsilon'])} [{_fmt(c['low'])}, {_fmt(c['high'])}] at delta {c['delta']:g} "
                        "(compare the lower end with the ledger)")
            rows.append(("CANIFE composed", composed))
    if report.get("stopped"):
        rows.append(("stopped", str(report["stopped"])))
    return rows


__all__ = ["DEFAULT_RUN_CONFIG", "client_app", "dp_config", "report_summary", "run_server", "server_app",
           "train_client", "write_flower_app"]

