"""Secret-sharer exposure (audit/exposure.py) against independent oracles: a brute-force pure-python rank of
hand-built models, exact enumeration vs the skew-normal estimate, one-sequence-at-a-time scoring vs the batched
padded one, and a tiny model that really memorises a repeated canary."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from tests.conftest import random_model, tiny_args
from tramontane.audit.exposure import (
    CANARY_USER_PREFIX,
    Canary,
    CanaryFormat,
    Exposure,
    canary_exposure,
    canary_exposures,
    canary_records,
    exposure_summary,
    make_canaries,
    sequence_log_perplexities,
)
from tramontane.errors import ConfigError, DataError

VOCAB = 97
BOS = 95


def encode(text: str) -> list[int]:
    """Printable ASCII -> ids 0..94, with a BOS: every id < the tiny models' vocabulary of 97."""
    return [BOS] + [ord(c) - 32 for c in text]


def merging_encode(text: str) -> list[int]:
    """Like `encode`, but " " followed by a digit is one token (id 96): a tokenizer whose merges cross the
    boundary between the template's prefix and the secret."""
    ids, i = [BOS], 0
    while i < len(text):
        if text[i] == " " and i + 1 < len(text) and text[i + 1].isdigit() and text[i + 1] in "05":
            ids.append(96)  # only some digits merge, so candidates disagree on the prefix's last token
            i += 1
        else:
            ids.append(ord(text[i]) - 32)
            i += 1
    return ids


class PositionModel:
    """A hand-built "model": logits depend only on the position, table[t] predicts token t + 1."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # [T_max, V]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        return self.table[:t].unsqueeze(0).expand(b, t, -1).clone()


def brute_force_scores(table: torch.Tensor, token_lists: list[list[int]]) -> list[float]:
    """-sum_t log softmax(table[t - 1])[x_t] over all tokens but the first, in python floats."""
    rows = table.double().tolist()
    lse = [math.log(sum(math.exp(v) for v in row)) for row in rows]
    return [-sum(rows[t - 1][x[t]] - lse[t - 1] for t in range(1, len(x))) for x in token_lists]


def brute_force_exposure(scores: list[float], i: int) -> tuple[int, float]:
    """Rank (1 = lowest log-perplexity, ties against the secret) and exposure of candidate i."""
    rank = 1 + sum(1 for j, s in enumerate(scores) if j != i and s <= scores[i])
    return rank, math.log2(len(scores)) - math.log2(rank)


# ---------------------------------------------------------------------------------------------- the format


def test_format_validates_and_enumerates() -> None:
    for bad in ({"template": "no placeholder"}, {"template": "{secret} and {secret}"}, {"length": 0},
                {"alphabet": "0012"}, {"alphabet": "a"}):
        with pytest.raises(ConfigError):
            CanaryFormat(**bad)  # type: ignore[arg-type]
    fmt = CanaryFormat("pin {secret}!", alphabet="abc", length=3)
    assert fmt.space_size == 27 and fmt.max_exposure == pytest.approx(math.log2(27))
    assert fmt.prefix == "pin " and fmt.render("cab") == "pin cab!"
    every = fmt.all_secrets()
    assert len(set(every)) == 27 and [fmt.index(s) for s in every] == list(range(27))
    with pytest.raises(ConfigError):
        fmt.render("abd")
    with pytest.raises(ConfigError):
        CanaryFormat(length=8).all_secrets()  # 10^8: too many to enumerate


def test_random_secrets_are_uniform() -> None:
    fmt = CanaryFormat(length=3)
    draws = fmt.random_secrets(30_000, np.random.default_rng(7))
    for pos in range(3):
        counts = Counter(s[pos] for s in draws)
        assert stats.chisquare([counts[d] for d in fmt.alphabet]).pvalue > 1e-4
    assert all(len(s) == 3 and s.isdigit() for s in draws)


def test_canaries_and_records() -> None:
    fmt = CanaryFormat(length=4)
    canaries = make_canaries(fmt, [1, 10], 3, np.random.default_rng(0), references=2)
    assert [c.repetitions for c in canaries] == [1, 1, 1, 10, 10, 10, 0, 0]
    assert len({c.secret for c in canaries}) == 8 and len({c.user_id for c in canaries}) == 8
    assert all(c.text == fmt.render(c.secret) and c.user_id.startswith(CANARY_USER_PREFIX) for c in canaries)
    records = canary_records(canaries)
    assert len(records) == 3 * 1 + 3 * 10
    per_user = Counter(r["user_id"] for r in records)
    for c in canaries:
        assert per_user.get(c.user_id, 0) == c.repetitions  # references are never inserted
        assert all(r["text"] == c.text for r in records if r["user_id"] == c.user_id)
    with pytest.raises(DataError):
        canary_records(canaries, existing_user_ids=["alice", canaries[0].user_id])
    assert [Canary.from_dict(c.to_dict()) for c in canaries] == canaries
    with pytest.raises(DataError):
        Canary.from_dict({"secret": "1234"})
    # distinctness holds even when the space is nearly full
    tight = make_canaries(CanaryFormat(alphabet="ab", length=3), [1], 8, np.random.default_rng(1), references=0)
    assert len({c.secret for c in tight}) == 8
    with pytest.raises(ConfigError):
        make_canaries(CanaryFormat(alphabet="ab", length=3), [1], 8, np.random.default_rng(1))
    with pytest.raises(ConfigError):
        make_canaries(fmt, [0, 1], 1)


# --------------------------------------------------------------------------------------------- the scoring


def test_batched_padded_scores_match_one_at_a_time() -> None:
    model = random_model(tiny_args(), seed=3)
    rng = np.random.default_rng(0)
    lists = [rng.integers(VOCAB, size=int(n)).tolist() for n in rng.integers(3, 20, size=11)]
    starts = [int(rng.integers(1, len(x))) for x in lists]
    batched = sequence_log_perplexities(model, lists, batch_size=4, start=starts, pad_id=5)
    with torch.no_grad():
        for x, s, got in zip(lists, starts, batched, strict=True):
            logp = torch.log_softmax(model(torch.tensor([x]))[0].double(), dim=-1)
            want = -sum(float(logp[t - 1, x[t]]) for t in range(s, len(x)))
            assert got == pytest.approx(want, abs=1e-4)
    with pytest.raises(DataError):
        sequence_log_perplexities(model, [[1, 2]], start=2)  # nothing to score


@pytest.mark.parametrize("tokenizer", [encode, merging_encode])
def test_hand_built_model_brute_force_ranks(tokenizer) -> None:
    fmt = CanaryFormat("the code is {secret}.", length=3)
    target = "724"
    prefix_len = len(fmt.prefix)  # characters; with `encode` also the position of the first secret token
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(32, VOCAB, generator=gen) * 2.0
    for k, ch in enumerate(target):  # strongly prefer the target's digits
        table[prefix_len + k, ord(ch) - 32] += 12.0
    model = PositionModel(table)

    secrets = fmt.all_secrets()
    token_lists = [tokenizer(fmt.render(s)) for s in secrets]
    oracle = brute_force_scores(table, token_lists)
    chosen = [target, "000", "505", "999", "123", "724"[::-1]]
    canaries = [Canary(s, fmt.render(s), 1, f"c{i}") for i, s in enumerate(chosen)]
    results = canary_exposures(model, tokenizer, canaries, fmt, batch_size=128)
    for canary, result in zip(canaries, results, strict=True):
        rank, want = brute_force_exposure(oracle, fmt.index(canary.secret))
        gap = min(abs(oracle[j] - oracle[fmt.index(canary.secret)]) for j in range(len(oracle))
                  if j != fmt.index(canary.secret))
        assert gap > 1e-4  # the oracle's rank is not decided by float rounding
        assert (result.method, result.rank, result.candidates) == ("exact", rank, 1000)
        assert result.exposure == pytest.approx(want, abs=1e-12)
    assert results[0].rank == 1 and results[0].exposure == pytest.approx(math.log2(1000))
    assert 0.0 <= min(r.exposure for r in results[1:]) and max(r.exposure for r in results[1:]) < math.log2(1000)


def test_uniform_model_ties_count_against_the_canary() -> None:
    fmt = CanaryFormat("code {secret}", length=3)
    model = PositionModel(torch.zeros(16, VOCAB))
    canary = make_canaries(fmt, [1], 1, np.random.default_rng(0), references=0)[0]
    exact = canary_exposure(model, encode, canary, fmt)
    assert exact.rank == 1000 and exact.exposure == 0.0
    sampled = canary_exposure(model, encode, canary, fmt, exact_limit=0, samples=200,
                              rng=np.random.default_rng(1))
    assert sampled.method == "skew-normal" and sampled.exposure == 0.0 and sampled.empirical_exposure == 0.0


def test_skew_normal_estimate_agrees_with_exact_enumeration() -> None:
    fmt = CanaryFormat("the code is {secret}.", length=4)
    model = random_model(tiny_args(), seed=1)
    secrets = fmt.all_secrets()
    scores = sequence_log_perplexities(model, [encode(fmt.render(s)) for s in secrets], batch_size=512)
    order = np.argsort(scores)
    # secrets from the top of the ranking down to the bottom, and some random ones
    picks = [int(order[r]) for r in (0, 10, 100, 1000, 5000, 9999)]
    picks += np.random.default_rng(2).integers(len(secrets), size=6).tolist()
    canaries = [Canary(secrets[i], fmt.render(secrets[i]), 1, f"c{i}") for i in picks]
    exact = canary_exposures(model, encode, canaries, fmt, batch_size=512)
    approx = canary_exposures(model, encode, canaries, fmt, exact_limit=0, samples=5000,
                              rng=np.random.default_rng(3), batch_size=512)
    assert [e.rank for e in exact[:6]] == [1, 11, 101, 1001, 5001, 10000]
    for e, a in zip(exact, approx, strict=True):
        assert a.method == "skew-normal" and a.rank is None and a.candidates == 5000
        assert a.log_perplexity == pytest.approx(e.log_perplexity, abs=1e-6)
        tolerance = 0.3 if e.exposure < 7 else 2.5  # the fitted tail is rougher past rank ~100 of 10^4
        assert abs(a.exposure - e.exposure) < tolerance, (e, a)
        assert a.empirical_exposure is not None
        assert abs(a.empirical_exposure - e.exposure) < max(tolerance, 0.3)
    assert approx[0].exposure > 10  # far-tail canaries are still reported as exposed


# --------------------------------------------------------------------------------------- memorisation


@pytest.mark.slow
def test_a_repeated_canary_is_memorised_and_a_reference_is_not() -> None:
    fmt = CanaryFormat("the code is {secret}.", length=4)
    rng = np.random.default_rng(0)
    canaries = make_canaries(fmt, [10], 1, rng, references=5)
    filler = [fmt.render(s) for s in fmt.random_secrets(200, rng)]  # the format, with other secrets once each
    texts = [r["text"] for r in canary_records(canaries)] + filler
    data = torch.tensor([encode(t) for t in texts])  # [N, T], one length: no padding needed

    model = random_model(tiny_args(), seed=1)
    before = canary_exposures(model, encode, canaries, fmt, batch_size=1000)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = data[torch.randint(len(data), (32,), generator=gen)]
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    after = canary_exposures(model, encode, canaries, fmt, batch_size=1000)

    inserted, references = after[0], after[1:]
    assert before[0].exposure < 6  # not exposed by chance before training
    assert inserted.repetitions == 10 and inserted.exposure > fmt.max_exposure - 1  # ranked first or second
    assert all(r.repetitions == 0 for r in references)
    assert float(np.median([r.exposure for r in references])) < 4
    summary = exposure_summary(after)
    assert summary["by_repetitions"]["10"]["median_excess"] > 8
    assert summary["by_repetitions"]["0"]["canaries"] == 5 and summary["methods"] == ["exact"]


def test_exposure_summary_groups_by_repetitions() -> None:
    def e(reps: int, value: float) -> Exposure:
        return Exposure(secret="0", repetitions=reps, exposure=value, max_exposure=10.0, rank=None,
                        method="skew-normal", log_perplexity=0.0, candidates=100)

    summary = exposure_summary([e(0, 1.0), e(0, 2.0), e(0, 3.0), e(10, 9.0), e(10, 7.0), e(1, 2.5)])
    assert summary["reference_median"] == 2.0 and summary["max_exposure"] == 10.0
    assert summary["by_repetitions"]["10"] == {"canaries": 2, "median": 8.0, "max": 9.0, "median_excess": 6.0}
    assert summary["by_repetitions"]["1"]["median_excess"] == 0.5
    assert exposure_summary([e(1, 2.0)])["by_repetitions"]["1"]["median_excess"] is None
