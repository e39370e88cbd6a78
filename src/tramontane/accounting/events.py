"""Privacy events and the append-only privacy ledger that training checkpoints carry.

A DP-SGD run (Abadi et al. 2016) is modelled as the Poisson-subsampled Gaussian mechanism: every example
enters each step's batch independently with probability `sample_rate` (q), per-example gradients are
clipped to L2 norm C, and Gaussian noise of standard deviation `noise_multiplier * C` (sigma) is added to
their sum. `steps` such steps compose adaptively. This is the event Opacus and dp-accounting account for:
`SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)`, under the add-or-remove-one
neighbouring relation. The accounting is only valid if training really samples that way (Poisson, not
shuffled fixed-size batches) and really clips and adds that noise; the ledger cannot check either.

Besides DP-SGD runs the ledger records plain Gaussian mechanisms (sensitivity 1, noise `noise_multiplier`,
released `count` times), exponential-mechanism selections (`ExponentialMechanismEvent`) and (epsilon, delta)-DP events declared by a component that does its own
accounting (e.g. a DP schema-inference step spending a declared share). The latter have no dp-accounting
`DpEvent`; accountants compose them by basic composition (epsilons and deltas add up).

The ledger is append-only: `append` is its only mutation. Consecutive DP-SGD events with identical
(sample_rate, noise_multiplier, label) merge by adding steps, which is exact because composition is
commutative and associative. `to_dict`/`from_dict` give a stable, versioned JSON form.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

import dp_accounting

from tramontane.errors import PrivacyParameterError

LEDGER_FORMAT = "tramontane.privacy_ledger"
LEDGER_VERSION = 1


def _as_float(value: float, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise PrivacyParameterError(f"{name} must be a number, got {value!r}") from exc


def check_sample_rate(sample_rate: float, name: str = "sample_rate") -> float:
    """Return `sample_rate` as a float, or raise if it is not a probability.

    `name` is what the message calls the value: the parameter, or the command-line option ("--sample-rate").
    The other `check_*` functions take it too.
    """
    q = _as_float(sample_rate, name)
    if not 0.0 <= q <= 1.0:  # also rejects NaN
        raise PrivacyParameterError(
            f"{name} must be in [0, 1] (expected batch size / dataset size), got {sample_rate}"
        )
    return q


def check_noise_multiplier(noise_multiplier: float, name: str = "noise_multiplier") -> float:
    """Return `noise_multiplier` as a float, or raise if it is not a positive finite number."""
    sigma = _as_float(noise_multiplier, name)
    if sigma == 0.0:
        raise PrivacyParameterError(
            f"{name}=0 adds no noise, so epsilon is infinite; use a positive {name} (for a target epsilon, "
            "`tramontane account --epsilon E` or calibrate_noise_multiplier calibrates one)"
        )
    if not (sigma > 0.0 and math.isfinite(sigma)):
        raise PrivacyParameterError(f"{name} must be positive and finite, got {noise_multiplier}")
    return sigma


def check_count(value: int, name: str, minimum: int = 0) -> int:
    """Return `value` as an int if it is an integer >= `minimum` (steps, releases, sizes), else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PrivacyParameterError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise PrivacyParameterError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_label(label: str) -> None:
    if not isinstance(label, str):
        raise PrivacyParameterError(f"an event label must be a string, got {label!r}")


def check_delta(delta: float, name: str = "delta") -> float:
    """Return `delta` as a float, or raise if it is not in the open interval (0, 1)."""
    d = _as_float(delta, name)
    if not 0.0 < d < 1.0:
        raise PrivacyParameterError(
            f"{name} must be in (0, 1), got {delta}; a common choice is delta < 1 / dataset_size"
        )
    return d


def check_epsilon(epsilon: float, name: str = "epsilon", *, positive: bool = False) -> float:
    """Return `epsilon` as a float, or raise if it is NaN, infinite, negative or (`positive`) zero."""
    e = _as_float(epsilon, name)
    if positive and not (e > 0.0 and math.isfinite(e)):
        raise PrivacyParameterError(f"{name} must be finite and positive, got {epsilon}")
    if not (e >= 0.0 and math.isfinite(e)):
        raise PrivacyParameterError(f"{name} must be finite and >= 0, got {epsilon}")
    return e


@dataclass(frozen=True)
class DpSgdEvent:
    """`steps` steps of DP-SGD: Poisson sampling at `sample_rate`, Gaussian noise `noise_multiplier`."""

    sample_rate: float
    noise_multiplier: float
    steps: int
    label: str = "dp-sgd"

    kind: ClassVar[str] = "dp_sgd"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_rate", check_sample_rate(self.sample_rate))
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "steps", check_count(self.steps, "steps"))
        _check_label(self.label)

    @property
    def spends_nothing(self) -> bool:
        return self.sample_rate == 0.0 or self.steps == 0

    def to_dp_event(self) -> dp_accounting.DpEvent:
        step = dp_accounting.PoissonSampledDpEvent(
            self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(step, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "sample_rate": self.sample_rate, "noise_multiplier": self.noise_multiplier,
                "steps": self.steps, "label": self.label}


@dataclass(frozen=True)
class GaussianEvent:
    """The Gaussian mechanism on a sensitivity-1 query, released `count` times without sampling."""

    noise_multiplier: float
    count: int = 1
    label: str = "gaussian"

    kind: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "count", check_count(self.count, "count"))
        _check_label(self.label)

    @property
    def spends_nothing(self) -> bool:
        return self.count == 0

    def to_dp_event(self) -> dp_accounting.DpEvent:
        release = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        return dp_accounting.SelfComposedDpEvent(release, self.count)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "noise_multiplier": self.noise_multiplier, "count": self.count,
                "label": self.label}


@dataclass(frozen=True)
class EpsilonDeltaEvent:
    """A step that is (epsilon, delta)-DP by its own analysis, e.g. DP schema inference spending a share.

    dp-accounting has no event for this, so `to_dp_event` returns `UnsupportedDpEvent`: a dp-accounting
    accountant then refuses the ledger instead of silently leaving this spend out.
    """

    epsilon: float
    delta: float
    label: str

    kind: ClassVar[str] = "epsilon_delta"

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", check_epsilon(self.epsilon))
        d = _as_float(self.delta, "delta")
        if not 0.0 <= d < 1.0:
            raise PrivacyParameterError(f"an (epsilon, delta) event needs delta in [0, 1), got {self.delta}")
        object.__setattr__(self, "delta", d)
        _check_label(self.label)
        if not self.label:
            raise PrivacyParameterError("an (epsilon, delta) event needs a label saying what spent it")

    @property
    def spends_nothing(self) -> bool:
        return self.epsilon == 0.0 and self.delta == 0.0

    def to_dp_event(self) -> dp_accounting.DpEvent:
        return dp_accounting.UnsupportedDpEvent()

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "epsilon": self.epsilon, "delta": self.delta, "label": self.label}


@dataclass(frozen=True)
class ExponentialMechanismEvent:
    """`count` selections by the exponential mechanism at `epsilon`: a candidate r drawn with probability
    proportional to exp(epsilon u(r) / (2 sensitivity(u))).

    Each selection is epsilon-DP and, more tightly, epsilon-bounded-range, hence epsilon^2 / 8-zCDP (Cesar
    and Rogers 2021, "Bounding, Concentrating, and Truncating", Lemma 3.2), the analysis AIM (McKenna et al.
    2022) uses. The rdp accountant composes it as `ZCDpEvent(count epsilon^2 / 8)` (Renyi divergence
    alpha epsilon^2 / 8 at every order); the pld accountant as `count` pure epsilon-DP mechanisms (the
    randomized-response pair, which dominates every epsilon-DP mechanism): sound, looser than zCDP when
    many are composed.
    """

    epsilon: float
    count: int = 1
    label: str = "selection"

    kind: ClassVar[str] = "exponential_mechanism"

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", check_epsilon(self.epsilon))
        object.__setattr__(self, "count", check_count(self.count, "count"))
        _check_label(self.label)

    @property
    def spends_nothing(self) -> bool:
        return self.count == 0 or self.epsilon == 0.0

    @property
    def rho(self) -> float:
        """The zCDP parameter of the `count` selections together."""
        return self.count * self.epsilon**2 / 8.0

    def to_dp_event(self) -> dp_accounting.DpEvent:
        return dp_accounting.ZCDpEvent(self.rho)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "epsilon": self.epsilon, "count": self.count, "label": self.label}


PrivacyEvent: TypeAlias = DpSgdEvent | GaussianEvent | ExponentialMechanismEvent | EpsilonDeltaEvent
EVENT_CLASSES = (DpSgdEvent, GaussianEvent, ExponentialMechanismEvent, EpsilonDeltaEvent)
_EVENT_TYPES: dict[str, type[PrivacyEvent]] = {cls.kind: cls for cls in EVENT_CLASSES}


def event_from_dict(data: Mapping[str, Any]) -> PrivacyEvent:
    """Inverse of `event.to_dict()`; raises `PrivacyParameterError` on unknown types or fields."""
    fields = dict(data)
    kind = fields.pop("type", None)
    cls = _EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise PrivacyParameterError(
            f"unknown privacy event type {kind!r}; expected one of {sorted(_EVENT_TYPES)}"
        )
    try:
        return cls(**fields)
    except TypeError as exc:
        raise PrivacyParameterError(f"malformed {kind!r} privacy event {dict(data)!r}: {exc}") from exc


class PrivacyLedger:
    """Append-only record of every privacy-relevant release of a dataset, in order.

    There is deliberately no way to remove, replace or reorder events. `events` returns a tuple copy.
    """

    __slots__ = ("_events",)

    def __init__(self, events: Iterable[PrivacyEvent] = ()) -> None:
        self._events: list[PrivacyEvent] = []
        for event in events:
            self.append(event)

    def append(self, event: PrivacyEvent) -> None:
        """Record `event`; a DP-SGD event identical in (q, sigma, label) to the last one extends it."""
        if not isinstance(event, EVENT_CLASSES):
            names = ", ".join(cls.__name__ for cls in EVENT_CLASSES)
            raise PrivacyParameterError(f"a ledger records one of {names}, got {type(event).__name__}")
        last = self._events[-1] if self._events else None
        if (isinstance(event, DpSgdEvent) and isinstance(last, DpSgdEvent)
                and (last.sample_rate, last.noise_multiplier, last.label)
                == (event.sample_rate, event.noise_multiplier, event.label)):
            self._events[-1] = DpSgdEvent(last.sample_rate, last.noise_multiplier, last.steps + event.steps,
                                          last.label)
        else:
            self._events.append(event)

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        return tuple(self._events)

    def __iter__(self) -> Iterator[PrivacyEvent]:
        return iter(tuple(self._events))

    def __len__(self) -> int:
        return len(self._events)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivacyLedger):
            return NotImplemented
        return self._events == other._events

    __hash__ = None  # type: ignore[assignment]  # mutable (it grows)

    def __repr__(self) -> str:
        return f"PrivacyLedger({self._events!r})"

    def to_dp_event(self) -> dp_accounting.DpEvent:
        """The dp-accounting event for the whole ledger (composition of all events, in order).

        (epsilon, delta) events appear as `UnsupportedDpEvent`, so dp-accounting refuses such a ledger;
        use `tramontane.accounting.epsilon`, which composes them by basic composition.
        """
        return dp_accounting.ComposedDpEvent([event.to_dp_event() for event in self._events])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable, versioned description (plain dicts, lists, strings, numbers)."""
        return {"format": LEDGER_FORMAT, "version": LEDGER_VERSION,
                "events": [event.to_dict() for event in self._events]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        """Inverse of `to_dict`; refuses other formats and versions newer than this code knows."""
        if not isinstance(data, Mapping) or data.get("format") != LEDGER_FORMAT:
            raise PrivacyParameterError(f"not a privacy ledger: expected format {LEDGER_FORMAT!r}")
        version = data.get("version")
        if version != LEDGER_VERSION:
            raise PrivacyParameterError(
                f"privacy ledger version {version!r} is not supported (this tramontane reads version "
                f"{LEDGER_VERSION}); upgrade tramontane to read it"
            )
        events = data.get("events")
        if not isinstance(events, list):
            raise PrivacyParameterError("privacy ledger has no 'events' list")
        ledger = cls()
        # Restore exactly what was stored: no re-merging, so to_dict(from_dict(d)) == d.
        ledger._events = [event_from_dict(event) for event in events]
        return ledger
