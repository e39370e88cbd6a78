"""One exception hierarchy for everything tramontane raises on bad input.

Every message says what is wrong and what to do about it. Internal invariants use asserts;
allowed-but-unsafe settings use warnings (see `TramontaneWarning`).
"""

from __future__ import annotations


class TramontaneError(Exception):
    """Base class of every error tramontane raises on purpose."""


class ConfigError(TramontaneError, ValueError):
    """A configuration (params.json, config.json, a dataclass argument) is invalid or incomplete."""


class CheckpointError(TramontaneError):
    """A checkpoint directory or file is missing, ambiguous, truncated or does not match the model."""


class TokenizerError(TramontaneError):
    """A tokenizer file cannot be found or loaded, or a request cannot be encoded."""


class GenerationError(TramontaneError, ValueError):
    """A generation request is invalid (empty prompt, prompt too long, bad sampling parameters)."""


class PromptTooLongError(GenerationError):
    """A prompt plus its `max_tokens` do not fit the model length the server allows (HTTP 400)."""


class QueueFullError(TramontaneError, RuntimeError):
    """The inference engine's waiting queue is full; retry later (HTTP 429). Not the request's fault."""


class EngineStoppedError(TramontaneError, RuntimeError):
    """The inference engine was shut down and takes no more requests (HTTP 503)."""


class PrivacyError(TramontaneError):
    """Base class of errors about differential-privacy parameters and budgets."""


class PrivacyParameterError(PrivacyError, ValueError):
    """A privacy parameter is out of range (sampling rate, noise multiplier, delta, epsilon, steps)."""


class PldTooLargeError(PrivacyParameterError):
    """A privacy loss distribution would be too large to compose in reasonable time and memory
    (`tramontane.accounting.PLD_MAX_POINTS`); the RDP accountant answers instead."""


class PrivacyBudgetError(PrivacyError):
    """An operation would spend more privacy budget than was allowed; nothing was spent."""


class UnsupportedModuleError(TramontaneError):
    """A module cannot be trained with per-example clipping (e.g. it mixes examples, like BatchNorm)."""


class DPInputError(TramontaneError, ValueError):
    """The DP engine got input that breaks its contract: losses that are not one per example, example ids
    of the wrong shape, a batch whose size differs from the one announced."""


class DPUsageError(TramontaneError, RuntimeError):
    """The DP engine's calls came in an order it cannot record privately: nested `record()` blocks, a
    backward pass outside one, a second forward in one, noise added in the middle of a recording."""


class SchemaError(TramontaneError, ValueError):
    """Tabular data does not match its public schema, or a schema is malformed."""


class DataError(TramontaneError, ValueError):
    """Input data cannot be read (empty, wrong encoding, unreadable file)."""


class TramontaneWarning(UserWarning):
    """Allowed-but-unsafe settings: a fixed noise seed, non-Poisson sampling, non-DP schema inference."""


class SandboxUnavailableError(TramontaneError, RuntimeError):
    """The agent's command sandbox (bubblewrap) is missing or cannot create its namespaces here; install
    bubblewrap or run without isolation on purpose (`--unsafe-no-sandbox`)."""


class EndpointError(TramontaneError, RuntimeError):
    """An OpenAI-compatible endpoint failed or answered something unusable. `status` is the HTTP status (None
    when no answer came); `retryable` says whether the same request may succeed later; `code` is the error code
    of OpenAI's error shape (e.g. "context_length_exceeded"), when the body had one."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.code = code


class DistributedError(TramontaneError, RuntimeError):
    """The processes of a distributed run disagree (replicas diverged) or one of them failed."""
