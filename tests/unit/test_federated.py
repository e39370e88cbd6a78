"""DP-FedAvg's mechanism without a federation: clipping, the server's noise, Poisson client sampling, the
budget, CANIFE's canary, and the Flower app folder.

Statistical properties are tested statistically, with seeds, and with bounds a broken implementation fails:
noise added twice, divided by the realised cohort instead of the expected one, or fixed-size sampling.
"""

from __future__ import annotations

import logging
import math
import tomllib
import warnings

import dp_accounting
import numpy as np
import pytest

from tramontane import accounting
from tramontane.errors import (
    ConfigError,
    DPInputError,
    PrivacyBudgetError,
    PrivacyParameterError,
    TramontaneWarning,
)
from tramontane.federated.canary import canary_score, craft_canary_update, design_pool, flatten, unflatten
from tramontane.federated.clipping import clip_update, sum_clipped_updates, update_norm
from tramontane.federated.dp_fedavg import DPFedAvgConfig, DPFedAvgServer

logging.getLogger("absl").setLevel(logging.ERROR)


def _server(**overrides) -> DPFedAvgServer:
    settings = {"num_clients": 10, "clients_per_round": 4.0, "noise_multiplier": 1.5, "max_update_norm": 0.5,
                "seed": 3}
    settings.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TramontaneWarning)  # seeded on purpose
        return DPFedAvgServer(DPFedAvgConfig(**settings))


# ------------------------------------------------------------------------------------------------ clipping


def test_each_clipped_update_is_within_the_clipping_norm() -> None:
    rng = np.random.default_rng(0)
    for scale in (1e-4, 0.3, 1.0, 7.0, 1e5):
        for dtype in (np.float32, np.float64):
            update = {"w": (rng.normal(size=(17, 5)) * scale).astype(dtype),
                      "b": (rng.normal(size=3) * scale).astype(dtype)}
            clipped, norm = clip_update(update, 1.0)
            assert norm == pytest.approx(update_norm(update))
            assert update_norm(clipped) <= 1.0  # exactly, in float64, after the cast
            assert all(clipped[k].dtype == dtype for k in update)
            if norm <= 1.0:  # inside the ball: untouched
                assert all(np.array_equal(clipped[k], update[k]) for k in update)
            else:  # on the sphere, same direction
                assert update_norm(clipped) == pytest.approx(1.0, rel=1e-5)
                cos = flatten(clipped) @ flatten(update) / (update_norm(clipped) * norm)
                assert cos == pytest.approx(1.0, abs=1e-6)
    zero = {"w": np.zeros(4, np.float32)}
    assert update_norm(clip_update(zero, 1.0)[0]) == 0.0
    with pytest.raises(DPInputError):
        clip_update({"w": np.array([np.nan], np.float32)}, 1.0)
    with pytest.raises(PrivacyParameterError):
        clip_update(zero, 0.0)


def test_the_sum_reclips_and_checks_every_update() -> None:
    template = {"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)}
    honest = {"w": np.array([0.3, 0.0, 0.0], np.float32), "b": np.array([0.4], np.float32)}  # norm 0.5
    greedy = {"w": np.array([30.0, 0.0, 0.0], np.float32), "b": np.array([40.0], np.float32)}  # norm 50
    total, count = sum_clipped_updates([honest, greedy], template, 0.5)
    assert count == 2
    np.testing.assert_allclose(total["w"], [0.6, 0, 0], rtol=1e-6)  # the greedy one counts as norm 0.5 only
    np.testing.assert_allclose(total["b"], [0.8], rtol=1e-6)
    with pytest.raises(DPInputError):
        sum_clipped_updates([{"w": np.zeros(3, np.float32)}], template, 0.5)
    with pytest.raises(DPInputError):
        sum_clipped_updates([{"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}], template, 0.5)


# --------------------------------------------------------------------------------------------- the server


def test_noise_is_added_once_to_the_sum_with_std_sigma_c_over_the_expected_cohort() -> None:
    # A sum of 2 clipped updates (the realised cohort) and 400,000 coordinates: the released step is
    # eta_s (S + Z) / (qN) with Z ~ N(0, (sigma C)^2). Dividing by the realised 2 instead of qN = 4, adding
    # the noise per client (std x sqrt 2) or forgetting it all miss the +-1% window by far.
    server = _server(server_learning_rate=2.0)
    params = {"w": np.zeros(400_000, np.float32), "b": np.zeros(1, np.float32)}
    clipped_sum = {"w": np.full(400_000, 0.25), "b": np.zeros(1)}
    new = server.release(params, clipped_sum)
    step = new["w"].astype(np.float64)
    sigma_c = 1.5 * 0.5
    expected_std = 2.0 * sigma_c / 4.0
    assert step.std() == pytest.approx(expected_std, rel=0.01)
    assert step.mean() == pytest.approx(2.0 * 0.25 / 4.0, abs=4 * expected_std / math.sqrt(step.size))
    z = step * 4.0 / 2.0 - 0.25  # the noise itself
    assert abs(float(np.mean(z**3))) < 0.02 * sigma_c**3 and float(np.mean(z**4)) == pytest.approx(
        3 * sigma_c**4, rel=0.03)  # Gaussian, not uniform
    assert len(server.ledger) == 1 and server.rounds == 1
    # the replay stream is a different one: an audit never re-draws the released noise
    replayed = server.replay(params, clipped_sum)["w"].astype(np.float64)
    assert abs(np.corrcoef(replayed, step)[0, 1]) < 0.01
    assert len(server.ledger) == 1  # a replay records nothing
    # without noise (a non-private run) the step is exactly the average over the expected cohort
    with pytest.warns(TramontaneWarning, match="NON-PRIVATE"):
        plain = DPFedAvgServer(DPFedAvgConfig(num_clients=10, clients_per_round=4.0, noise_multiplier=0.0,
                                              max_update_norm=0.5))
    np.testing.assert_array_equal(plain.release(params, clipped_sum)["w"], np.float32(0.25 / 4.0))
    assert len(plain.ledger) == 0 and plain.epsilon() == math.inf


def test_seeded_noise_is_reproducible_and_unseeded_noise_is_fresh() -> None:
    params, clipped_sum = {"w": np.zeros(64, np.float32)}, {"w": np.zeros(64)}
    a, b = _server(seed=5), _server(seed=5)
    np.testing.assert_array_equal(a.release(params, clipped_sum)["w"], b.release(params, clipped_sum)["w"])
    fresh = [DPFedAvgServer(DPFedAvgConfig(10, 4.0, 1.0, 1.0)) for _ in range(2)]
    assert not np.array_equal(*(f.release(params, clipped_sum)["w"] for f in fresh))


def test_clients_are_poisson_sampled_at_rate_q() -> None:
    # 40 clients, q = 0.3, 3,000 rounds. Poisson: each client in Binomial(3000, 0.3) rounds, cohort sizes
    # Binomial(40, 0.3) with variance 8.4, independent clients. Flower's fixed-size sampling (always 12)
    # has variance 0 and fails; so does a sampler biased towards low node indices.
    server = _server(num_clients=40, clients_per_round=12.0, seed=9)
    rounds = 3000
    member = np.zeros((rounds, 40), dtype=bool)
    for t in range(rounds):
        member[t, server.sample_cohort(t)] = True
    rate = member.mean(0)
    sd = math.sqrt(0.3 * 0.7 / rounds)
    assert np.all(np.abs(rate - 0.3) < 4.5 * sd)  # every client, Bonferroni over 40 at ~4.5 sd
    sizes = member.sum(1)
    assert sizes.mean() == pytest.approx(12.0, abs=4 * math.sqrt(8.4 / rounds))
    assert sizes.var() == pytest.approx(40 * 0.3 * 0.7, rel=0.1)
    corr = np.corrcoef(member[:, :10].T.astype(float))
    assert np.abs(corr[~np.eye(10, dtype=bool)]).max() < 0.1
    # a round's draw depends on (seed, round) only, as a resumed run needs
    again = _server(num_clients=40, clients_per_round=12.0, seed=9)
    assert server.sample_cohort(17) == again.sample_cohort(17)


def test_the_ledger_matches_dp_accounting_and_the_budget_refuses_a_round() -> None:
    q, sigma, delta = 0.4, 1.5, 1e-5
    one = accounting.epsilon(accounting.DpSgdEvent(q, sigma, 1), delta)
    two = accounting.epsilon(accounting.DpSgdEvent(q, sigma, 2), delta)
    server = _server(target_epsilon=(one + two) / 2, delta=delta)
    params, zero = {"w": np.zeros(2, np.float32)}, {"w": np.zeros(2)}
    server.check_budget()
    server.release(params, zero)
    with pytest.raises(PrivacyBudgetError, match="round 2"):
        server.check_budget()
    assert server.rounds == 1 and len(server.ledger) == 1
    acc = dp_accounting.rdp.RdpAccountant(orders=list(accounting.RDP_ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    assert server.epsilon() == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert server.ledger.events[0].label == "dp-fedavg"


@pytest.mark.parametrize("bad", [{"clients_per_round": 0.0}, {"clients_per_round": 11.0},
                                 {"num_clients": 0}, {"noise_multiplier": -1.0}, {"max_update_norm": 0.0},
                                 {"delta": 0.0}, {"target_epsilon": -1.0}, {"accountant": "moments"},
                                 {"seed": True}, {"server_learning_rate": 0.0}])
def test_config_refuses_bad_settings(bad: dict) -> None:
    settings = {"num_clients": 10, "clients_per_round": 4.0, "noise_multiplier": 1.0, "max_update_norm": 1.0}
    with pytest.raises((ConfigError, PrivacyParameterError)):
        DPFedAvgConfig(**{**settings, **bad})


# --------------------------------------------------------------------------------------------- the canary


def test_the_crafted_canary_is_orthogonal_to_its_design_pool_and_saturates_the_clip() -> None:
    rng = np.random.default_rng(2)
    params = {"weight": np.zeros(30, np.float32), "bias": np.zeros(1, np.float32)}
    x = rng.normal(size=(200, 30)).astype(np.float32)

    def train(rows: np.ndarray) -> dict[str, np.ndarray]:  # a stand-in for local training: a data mean
        return {"weight": x[rows].mean(0) * 5, "bias": np.array([len(rows) / 100.0], np.float32)}

    pool = design_pool(params, 200, 8, 0.5, train, seed=1)
    assert pool.shape == (8, 31)
    assert np.all(np.linalg.norm(pool, axis=1) <= 0.5 + 1e-9)
    canary = craft_canary_update(pool, 0.5, seed=1)
    assert np.linalg.norm(canary) == pytest.approx(0.5, rel=1e-9)
    assert np.abs(pool @ canary).max() < 1e-9
    # the score reads the update along the canary: linear, scale-free in the canary's norm
    before = params
    as_arrays = unflatten(canary, params)
    after = {k: before[k] + 3 * as_arrays[k] for k in params}
    assert canary_score(as_arrays, before, after) == pytest.approx(1.5, rel=1e-5)
    longer = {k: 7 * v for k, v in as_arrays.items()}
    assert canary_score(longer, before, after) == pytest.approx(1.5, rel=1e-5)
    with pytest.raises(PrivacyParameterError):
        design_pool(params, 5, 8, 0.5, train)


# --------------------------------------------------------------------------------------------- Flower side


def test_the_flower_app_folder_names_our_apps_and_the_run_config(tmp_path) -> None:
    pytest.importorskip("flwr")
    from flwr.common.config import validate_fields_in_config

    from tramontane.federated.app import DEFAULT_RUN_CONFIG, dp_config, write_flower_app

    changes = {"noise-multiplier": 2.0, "output": "r.json", "num-rounds": 5}
    folder = write_flower_app(tmp_path / "app", changes)
    config = tomllib.loads((folder / "pyproject.toml").read_text())
    valid, errors, _ = validate_fields_in_config(config)
    assert valid, errors
    app = config["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "tramontane.federated.app:server_app",
                                 "clientapp": "tramontane.federated.app:client_app"}
    assert app["config"] == {**DEFAULT_RUN_CONFIG, **changes}
    parsed = dp_config(app["config"])
    assert (parsed.noise_multiplier, parsed.seed, parsed.target_epsilon) == (2.0, None, None)
    with pytest.raises(ConfigError):
        write_flower_app(tmp_path / "bad", {"no-such-key": 1})
    with pytest.raises(ConfigError):
        write_flower_app(tmp_path / "bad", {"num-rounds": "3"})


def test_canife_needs_a_strategy_it_can_replay() -> None:
    pytest.importorskip("flwr")
    from flwr.serverapp.strategy import FedAvg

    from tramontane.federated.auditing import CanifeConfig, CanifeStrategy

    with pytest.raises(ConfigError, match="replay_train"):
        CanifeStrategy(FedAvg(), sample_rate=0.5, noise_multiplier=1.0, max_update_norm=1.0, delta=1e-5)
    with pytest.raises(ConfigError):
        CanifeConfig(trials=5)
    with pytest.raises(ConfigError):
        CanifeConfig(zero_error="lenient")
