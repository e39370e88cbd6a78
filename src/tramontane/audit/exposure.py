"""Secret-exposure canaries for language models (Carlini, Liu, Erlingsson, Kos and Song, "The secret sharer:
evaluating and testing unintended memorization in neural networks", arXiv 1802.08232).

The test, as `tramontane finetune --canaries N` runs it:
1. `make_canaries`: draw distinct random secrets of a known `CanaryFormat` ("my secret code is {secret}",
   secrets uniform over R = alphabet ** length) and give each a repetition count (e.g. 1 and 10), plus
   reference canaries (repetitions 0) drawn the same way but never inserted;
2. `canary_records`: the training records of the inserted canaries, each canary under a user id of its own
   (`CANARY_USER_PREFIX`); the caller appends them to the training data *before* training. They are part of
   the private training set: they enter DP training (sampling, clipping, noise, the privacy ledger) like any
   other unit, which is what makes the test measure the run's guarantee and not a side channel;
3. after training, `canary_exposures`: exposure = log2 |R| - log2 rank of the canary's secret among all |R|
   secrets of the format, ranked by the model's log-perplexity of the whole canary text (most likely first);
4. `exposure_summary`: per repetition count, exposures next to the reference canaries'.

What to expect: a never-inserted canary's rank is uniform over R, so its exposure is -log2 U for U uniform on
(0, 1]: about 1.44 bits on average, above k bits with probability 2^-k. A model that memorised a canary ranks
it first: exposure log2 |R|, the maximum. Under (epsilon, delta)-DP with the canary as one unit, the chance
that the secret ranks in the top fraction p is at most e^epsilon p + delta, so a DP run leaves inserted
canaries close to the references, while a non-private run typically exposes canaries repeated 10 times.

Scoring (`sequence_log_perplexities`): the model is any callable tokens [B, T] -> logits [B, T, V]
(log-probabilities are accepted as well, since log_softmax leaves them unchanged), e.g. a
`tramontane.models.Transformer` in eval mode. A sequence's score is the summed negative log-likelihood
-sum_t log p(x_t | x_<t) of its tokens from a start position on. `canary_exposures` starts at the first
token where the encoded candidates may differ from the encoded template prefix (the longest common prefix of
every scored sequence with `encode(prefix)`): the tokens before it, and their contexts, are the same for every
candidate, so they add the same constant to every score and change no rank. Everything after is scored: the
secret's tokens and the template's suffix (whose likelihood depends on the secret), as in Carlini's
log-perplexity of the whole canary. Token merges across the prefix/secret boundary are handled because the
start is computed on the token ids, not on the text.

Ranking: exact when |R| <= `exact_limit` (all secrets scored; ties count against the canary, i.e. it is
placed last among equal scores, so exposure is never overstated: a model that scores every secret alike gives
exposure 0). Otherwise the paper's estimate (§4.3, "approximation by distribution modeling"): score `samples`
secrets drawn uniformly from R, fit a skew-normal to their log-perplexities and take
exposure = -log2 CDF(canary's log-perplexity), clipped to [0, log2 |R|]; the empirical estimate from the
canary's rank among the samples, log2(n + 1) - log2 rank (at most log2(n + 1)), is reported next to it.

Assumptions: secrets are drawn uniformly and independently of the training data and of the model (a fresh
`rng`, not one that the training also uses); the model is evaluated in eval mode by the caller; the first
token of a sequence has no context and is never scored, so `encode` should add a BOS token when the template
starts with the secret (a warning says so otherwise).
"""

from __future__ import annotations

import itertools
import math
import statistics
import string
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats

from tramontane.audit.membership import exposure
from tramontane.errors import ConfigError, DataError, TramontaneWarning
from tramontane.seeding import numpy_rng

CANARY_USER_PREFIX = "tramontane-canary-"
_ENUMERATION_LIMIT = 10_000_000  # all_secrets() refuses larger spaces: memory, and hours of scoring


@dataclass(frozen=True)
class CanaryFormat:
    """The public format of canary secrets: `template` with `placeholder` once, filled with `length`
    characters of `alphabet`, so R has len(alphabet) ** length elements (the randomness space of §3)."""

    template: str = "my secret code is {secret}"
    alphabet: str = string.digits
    length: int = 6
    placeholder: str = "{secret}"

    def __post_init__(self) -> None:
        if not self.placeholder or self.template.count(self.placeholder) != 1:
            raise ConfigError(f"the canary template {self.template!r} must contain the placeholder "
                              f"{self.placeholder!r} exactly once, e.g. 'my secret code is {{secret}}'")
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ConfigError(f"canary secret length must be an integer >= 1, got {self.length!r}")
        if len(self.alphabet) < 2 or len(set(self.alphabet)) != len(self.alphabet):
            raise ConfigError(f"the canary alphabet {self.alphabet!r} needs at least 2 distinct characters "
                              "and no repeats (a repeated character would make secrets non-uniform)")

    @property
    def space_size(self) -> int:
        """|R|, the number of possible secrets."""
        return len(self.alphabet) ** self.length

    @property
    def max_exposure(self) -> float:
        """log2 |R|: the exposure of a secret that the model ranks first."""
        return self.length * math.log2(len(self.alphabet))

    @property
    def prefix(self) -> str:
        """The template's text before the secret (the same for every candidate)."""
        return self.template.split(self.placeholder)[0]

    def render(self, secret: str) -> str:
        """The canary text of `secret`."""
        self.check(secret)
        return self.template.replace(self.placeholder, secret)

    def check(self, secret: str) -> None:
        """Raise ConfigError unless `secret` is in R."""
        if len(secret) != self.length or any(c not in self.alphabet for c in secret):
            raise ConfigError(f"secret {secret!r} is not {self.length} characters of {self.alphabet!r}")

    def random_secret(self, rng: np.random.Generator) -> str:
        """One secret drawn uniformly from R."""
        return self.random_secrets(1, rng)[0]

    def random_secrets(self, count: int, rng: np.random.Generator) -> list[str]:
        """`count` secrets drawn uniformly from R, independently (repeats possible)."""
        digits = rng.integers(len(self.alphabet), size=(count, self.length))
        return ["".join(self.alphabet[d] for d in row) for row in digits]

    def index(self, secret: str) -> int:
        """The position of `secret` in `all_secrets()` (base-len(alphabet) digits, alphabet order)."""
        self.check(secret)
        base, value = len(self.alphabet), 0
        for c in secret:
            value = value * base + self.alphabet.index(c)
        return value

    def all_secrets(self) -> list[str]:
        """Every secret of R in `index` order; only for small spaces (at most 10 million)."""
        if self.space_size > _ENUMERATION_LIMIT:
            raise ConfigError(f"{self.space_size} secrets are too many to enumerate (limit {_ENUMERATION_LIMIT}); "
                              "use a shorter secret or the sampled (skew-normal) exposure estimate")
        return ["".join(chars) for chars in itertools.product(self.alphabet, repeat=self.length)]


@dataclass(frozen=True)
class Canary:
    """One canary: a secret of the format, its text, how many times it is inserted in the training data
    (0 for a reference canary, never inserted) and the user id its records carry."""

    secret: str
    text: str
    repetitions: int
    user_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"secret": self.secret, "text": self.text, "repetitions": self.repetitions,
                "user_id": self.user_id}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Canary:
        """The inverse of `to_dict` (e.g. canaries saved with a run's setup)."""
        try:
            return cls(secret=str(data["secret"]), text=str(data["text"]), repetitions=int(data["repetitions"]),
                       user_id=str(data["user_id"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"not a saved canary ({err!r}): expected secret, text, repetitions, user_id") from err


def make_canaries(fmt: CanaryFormat, repetitions: Sequence[int], per_repetition: int,
                  rng: np.random.Generator | None = None, *, references: int | None = None) -> list[Canary]:
    """`per_repetition` canaries for each count in `repetitions` (each >= 1), then `references` reference
    canaries with repetitions 0 (default: `per_repetition`). All secrets are distinct and drawn uniformly
    from R with `rng` (default: fresh OS entropy); user ids are CANARY_USER_PREFIX + index."""
    counts = list(repetitions)
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in counts):
        raise ConfigError(f"canary repetitions must be integers >= 1, got {counts}; reference canaries "
                          "(never inserted) are asked for with `references`")
    n_ref = per_repetition if references is None else references
    if per_repetition < 0 or n_ref < 0:
        raise ConfigError(f"canary counts must be >= 0, got per_repetition={per_repetition}, "
                          f"references={n_ref}")
    plan = [r for r in counts for _ in range(per_repetition)] + [0] * n_ref
    if len(plan) > fmt.space_size:
        raise ConfigError(f"{len(plan)} distinct canaries do not fit in {fmt.space_size} possible secrets; "
                          "use a longer secret or fewer canaries")
    rng = numpy_rng(None) if rng is None else rng
    chosen: list[str] = []
    seen: set[str] = set()
    while len(chosen) < len(plan):  # rejection keeps each secret uniform given distinctness
        for secret in fmt.random_secrets(len(plan) - len(chosen), rng):
            if secret not in seen and len(chosen) < len(plan):
                seen.add(secret)
                chosen.append(secret)
    return [Canary(secret=s, text=fmt.render(s), repetitions=r, user_id=f"{CANARY_USER_PREFIX}{i}")
            for i, (s, r) in enumerate(zip(chosen, plan, strict=True))]


def canary_records(canaries: Sequence[Canary], existing_user_ids: Iterable[str] = ()) -> list[dict[str, str]]:
    """Plain-text training records {"text", "user_id"}: each canary's text `repetitions` times (reference
    canaries give none), under the canary's own user id.

    These records are private training data: append them to the training set before sampling, so that the
    DP run (Poisson sampling, per-unit clipping, noise, accounting) treats each canary like any other
    user. Passing the real data's user ids in `existing_user_ids` checks that no canary shares a user with
    real records (that would merge a canary into a real user's unit)."""
    ids = [c.user_id for c in canaries]
    if len(set(ids)) != len(ids):
        raise DataError("canary user ids must be distinct, one user per canary; build them with make_canaries")
    clash = set(ids) & set(existing_user_ids)
    if clash:
        raise DataError(f"canary user ids {sorted(clash)} are already used by training records; rename "
                        f"those users (ids starting with {CANARY_USER_PREFIX!r} are reserved for canaries)")
    return [{"text": c.text, "user_id": c.user_id} for c in canaries for _ in range(c.repetitions)]


def _model_device(model: Callable[[torch.Tensor], torch.Tensor]) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def sequence_log_perplexities(model: Callable[[torch.Tensor], torch.Tensor],
                              token_lists: Sequence[Sequence[int]], batch_size: int = 64, *,
                              start: int | Sequence[int] = 1, pad_id: int = 0,
                              device: torch.device | str | None = None) -> np.ndarray:
    """[N] float64 log-perplexities: for each sequence x, -sum_{start <= t < len(x)} log p(x_t | x_<t)
    (natural log), under `model`: tokens [B, T] long -> logits (or log-probabilities) [B, T, V].

    `start` (>= 1, one for all or one per sequence) skips tokens whose score is not wanted; the first token
    has no context and is never scored. Sequences are sorted by length and right-padded with `pad_id`: a
    causal model's outputs at real positions do not depend on the padding after them. Batched, no_grad;
    `device` defaults to the device of the model's first parameter (CPU for plain callables)."""
    n = len(token_lists)
    starts = [start] * n if isinstance(start, int) else list(start)
    if len(starts) != n:
        raise DataError(f"got {len(starts)} start positions for {n} sequences")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    for i, (seq, s) in enumerate(zip(token_lists, starts, strict=True)):
        if s < 1 or s >= len(seq):
            raise DataError(f"sequence {i} has {len(seq)} tokens, none to score from position {s} "
                            "(the first token is never scored; start must be >= 1)")
    dev = torch.device(device) if device is not None else _model_device(model)
    order = sorted(range(n), key=lambda i: len(token_lists[i]))
    out = np.empty(n, dtype=np.float64)
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            idx = order[lo:lo + batch_size]
            lengths = torch.tensor([len(token_lists[i]) for i in idx])
            tokens = torch.full((len(idx), int(lengths.max())), pad_id, dtype=torch.long)  # [B, T]
            for row, i in enumerate(idx):
                tokens[row, :len(token_lists[i])] = torch.as_tensor(token_lists[i], dtype=torch.long)
            logits = model(tokens.to(dev))
            if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
                raise DataError(f"the model returned {tuple(logits.shape)} for tokens {tuple(tokens.shape)}; "
                                "it must return logits [B, T, V]")
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T-1, V], predicts tokens 1..T-1
            targets = tokens[:, 1:].to(logp.device)
            token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().cpu()  # [B, T-1]
            pos = torch.arange(1, tokens.shape[1])
            first = torch.tensor([starts[i] for i in idx])
            scored = (pos >= first[:, None]) & (pos < lengths[:, None])
            nll = -torch.where(scored, token_logp, torch.zeros_like(token_logp)).sum(dim=1)
            out[idx] = nll.numpy()
    if np.isnan(out).any():
        raise DataError("the model gave NaN log-probabilities; check its weights and dtype before measuring "
                        "exposure (a NaN would rank a canary arbitrarily)")
    return out


@dataclass(frozen=True)
class Exposure:
    """The exposure of one canary. The secret is synthetic (drawn for the test), so it may be reported.

    `exposure` is exact (`method` "exact", with `rank` among all |R| secrets, 1 = most likely) or the
    skew-normal estimate ("skew-normal", `rank` None, `empirical_exposure` from the canary's rank among
    `candidates` sampled secrets). `log_perplexity` is the canary's score (see the module docstring for which
    tokens count)."""

    secret: str
    repetitions: int
    exposure: float
    max_exposure: float
    rank: int | None
    method: str
    log_perplexity: float
    candidates: int
    empirical_exposure: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"secret": self.secret, "repetitions": self.repetitions, "exposure": self.exposure,
                "max_exposure": self.max_exposure, "rank": self.rank, "method": self.method,
                "log_perplexity": self.log_perplexity, "candidates": self.candidates,
                "empirical_exposure": self.empirical_exposure}


def _common_start(prefix_ids: Sequence[int], token_lists: Sequence[Sequence[int]]) -> int:
    """The first position where some scored sequence may differ from the encoded prefix (at least 1)."""
    start = len(prefix_ids)
    for tokens in token_lists:
        common = 0
        for a, b in zip(prefix_ids[:start], tokens):
            if a != b:
                break
            common += 1
        start = min(start, common)
    if start == 0:
        warnings.warn("the canary's first token has no context and is not scored: let `encode` add a BOS "
                      "token, or start the template with text before the secret", TramontaneWarning,
                      stacklevel=3)
    return max(start, 1)


def skew_normal_exposure(canary_log_perplexity: float, sample_log_perplexities: Sequence[float] | np.ndarray,
                         max_exposure: float) -> float:
    """Carlini et al. §4.3: -log2 CDF(canary) of a skew-normal fitted (maximum likelihood) to the
    log-perplexities of secrets sampled uniformly from R, clipped to [0, max_exposure]."""
    sample = np.asarray(sample_log_perplexities, dtype=float)
    if np.ptp(sample) == 0.0:  # a degenerate fit; ties count against the canary
        return 0.0 if canary_log_perplexity >= sample[0] else max_exposure
    a, loc, scale = stats.skewnorm.fit(sample)
    log_cdf = float(stats.skewnorm.logcdf(canary_log_perplexity, a, loc, scale))
    return float(np.clip(-log_cdf / math.log(2.0), 0.0, max_exposure))


def canary_exposures(model: Callable[[torch.Tensor], torch.Tensor], encode: Callable[[str], list[int]],
                     canaries: Sequence[Canary], fmt: CanaryFormat, *, exact_limit: int = 100_000,
                     samples: int = 10_000, rng: np.random.Generator | None = None, batch_size: int = 64,
                     device: torch.device | str | None = None) -> list[Exposure]:
    """The exposure of each canary (all of format `fmt`) under `model`, scoring the candidates once for all.

    Exact ranks when |R| <= `exact_limit` (every secret is scored, so the cost is |R| sequences); otherwise
    `samples` secrets drawn uniformly from R with `rng` (default: fresh OS entropy) and the skew-normal
    estimate. `encode(text) -> list[int]` is the tokenizer (with BOS if it adds one). See the module
    docstring for the scored tokens and tie handling."""
    for c in canaries:
        if fmt.render(c.secret) != c.text:
            raise ConfigError(f"canary {c.user_id} text {c.text!r} is not the format's rendering of its secret")
    prefix_ids = list(encode(fmt.prefix))
    if fmt.space_size <= exact_limit:
        secrets = fmt.all_secrets()
        token_lists = [list(encode(fmt.render(s))) for s in secrets]
        ppl = sequence_log_perplexities(model, token_lists, batch_size,
                                        start=_common_start(prefix_ids, token_lists), device=device)
        result = []
        for c in canaries:
            i = fmt.index(c.secret)
            others = np.delete(ppl, i)
            rank = 1 + int((others <= ppl[i]).sum())  # ties count against the canary
            result.append(Exposure(secret=c.secret, repetitions=c.repetitions,
                                   exposure=exposure(-ppl[i], -others), max_exposure=fmt.max_exposure,
                                   rank=rank, method="exact", log_perplexity=float(ppl[i]),
                                   candidates=fmt.space_size))
        return result
    if samples < 2:
        raise ConfigError(f"the skew-normal estimate needs samples >= 2 (thousands in practice), got {samples}")
    rng = numpy_rng(None) if rng is None else rng
    token_lists = [list(encode(fmt.render(s))) for s in fmt.random_secrets(samples, rng)]
    token_lists += [list(encode(c.text)) for c in canaries]
    ppl = sequence_log_perplexities(model, token_lists, batch_size,
                                    start=_common_start(prefix_ids, token_lists), device=device)
    sampled, canary_ppl = ppl[:samples], ppl[samples:]
    return [Exposure(secret=c.secret, repetitions=c.repetitions,
                     exposure=skew_normal_exposure(float(p), sampled, fmt.max_exposure),
                     max_exposure=fmt.max_exposure, rank=None, method="skew-normal", log_perplexity=float(p),
                     candidates=samples, empirical_exposure=exposure(-p, -sampled))
            for c, p in zip(canaries, canary_ppl, strict=True)]


def canary_exposure(model: Callable[[torch.Tensor], torch.Tensor], encode: Callable[[str], list[int]],
                    canary: Canary, fmt: CanaryFormat, *, exact_limit: int = 100_000, samples: int = 10_000,
                    rng: np.random.Generator | None = None, batch_size: int = 64,
                    device: torch.device | str | None = None) -> Exposure:
    """The exposure of one canary; `canary_exposures` scores the candidates once for many canaries."""
    return canary_exposures(model, encode, [canary], fmt, exact_limit=exact_limit, samples=samples, rng=rng,
                            batch_size=batch_size, device=device)[0]


def exposure_summary(exposures: Sequence[Exposure]) -> dict[str, Any]:
    """For a JSON report: per repetition count, the count, median and max exposure, and the medians' excess
    over the reference (0-repetition) canaries'. Keys are the counts as strings; "0" is the reference."""
    by_count: dict[int, list[float]] = {}
    for e in exposures:
        by_count.setdefault(e.repetitions, []).append(e.exposure)
    reference = statistics.median(by_count[0]) if 0 in by_count else None
    groups = {}
    for count in sorted(by_count):
        values = by_count[count]
        median = statistics.median(values)
        groups[str(count)] = {"canaries": len(values), "median": median, "max": max(values),
                              "median_excess": None if reference is None else median - reference}
    return {"max_exposure": max((e.max_exposure for e in exposures), default=None),
            "methods": sorted({e.method for e in exposures}), "reference_median": reference,
            "by_repetitions": groups}


__all__ = [
    "CANARY_USER_PREFIX", "Canary", "CanaryFormat", "Exposure", "canary_exposure", "canary_exposures",
    "canary_records", "exposure_summary", "make_canaries", "sequence_log_perplexities", "skew_normal_exposure",
]
