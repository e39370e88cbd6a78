"""Thin adapter over mistral_common: load a Mistral tokenizer, encode prompts and chats, decode and stream.

Everything that defines the token streams (sentencepiece / tekken vocabularies, control tokens, the chat
template of each tokenizer version v1/v2/v3/v7/..., tool-call formats, image and audio placeholders) is
mistral_common's; this module only

- finds the tokenizer file of a checkpoint directory, or beside a .gguf file (`Tokenizer.from_model_dir`),
- turns plain dicts into mistral_common requests (`encode_chat`),
- decodes a token stream incrementally for printing (`IncrementalDecoder`),
- and re-raises mistral_common's assorted exceptions as `TokenizerError` with the file and the cause.

Anything not wrapped here (FIM, transcription, image arrays) is reachable through `Tokenizer.mistral`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import ChatMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Tool
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, Tokenized
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece
from mistral_common.tokens.tokenizers.tekken import Tekkenizer, is_tekken

from tramontane.errors import TokenizerError

logger = logging.getLogger(__name__)

# The tokenizers mistral_common ships inside its package (`mistral_common/data/`), by the public
# constructor that loads each one. None of them carries an audio section.
_BUILTIN: dict[str, Callable[[], MistralTokenizer]] = {
    "v1": MistralTokenizer.v1,
    "v2": MistralTokenizer.v2,
    "v3": MistralTokenizer.v3,
    "v3-tekken": lambda: MistralTokenizer.v3(is_tekken=True),
    "v3-tekken-mm": lambda: MistralTokenizer.v3(is_tekken=True, is_mm=True),
    "v7": MistralTokenizer.v7,
    "v7-mm": lambda: MistralTokenizer.v7(is_mm=True),
}
BUILTIN_VERSIONS: tuple[str, ...] = tuple(_BUILTIN)

# What mistral_common raises on a bad file or request: its own exceptions, pydantic's ValidationError (a
# ValueError), json/KeyError from a malformed tekken file, RuntimeError from sentencepiece, and asserts.
_LIBRARY_ERRORS = (MistralCommonException, ValueError, KeyError, TypeError, RuntimeError, OSError,
                   AssertionError)

_LOOKED_FOR = "tekken*.json, *.model.v<N>[m<M>] (e.g. tokenizer.model.v3) or a bare *.model"

MessageLike = Mapping[str, Any] | ChatMessage
ToolLike = Mapping[str, Any] | Tool


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


class Tokenizer:
    """A loaded Mistral tokenizer: one `MistralTokenizer` plus the file it came from."""

    def __init__(self, mistral: MistralTokenizer, path: Path | None = None) -> None:
        self.mistral = mistral
        self._raw = mistral.instruct_tokenizer.tokenizer  # sentencepiece or tekken, for encode/ids
        self.path = path if path is not None else Path(self._raw.file_path)

    # -- loading ---------------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a `tekken*.json` or `tokenizer.model.v*` file."""
        path = Path(path)
        if path.is_dir():
            raise TokenizerError(f"{path} is a directory; use Tokenizer.from_model_dir() or pass the file")
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        if not (is_tekken(path) or is_sentencepiece(path)):
            raise TokenizerError(
                f"{path.name} is not a name mistral_common recognises as a tokenizer; expected {_LOOKED_FOR}"
            )
        try:
            mistral = MistralTokenizer.from_file(path)
        except _LIBRARY_ERRORS as exc:
            raise TokenizerError(
                f"cannot load tokenizer {path} (corrupt, truncated or unsupported file?): {_cause(exc)}"
            ) from exc
        return cls(mistral, path)

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str]) -> Tokenizer:
        """Load the one tokenizer file of a consolidated or Hugging Face checkpoint directory, or of the folder
        holding a one-file checkpoint (a llama.cpp `.gguf`, whose own vocabulary is not used).

        Versioned files (`tekken*.json`, `*.model.v3`, ...) win over a bare `tokenizer.model` (which
        mistral_common reads as v1; HF repos of v3 models ship both). Several versioned files are
        ambiguous: pass the one you mean to `from_file`.
        """
        model_dir = Path(model_dir)
        model_file = model_dir if model_dir.is_file() else None
        if model_file is not None:
            model_dir = model_file.parent
        if not model_dir.is_dir():
            raise TokenizerError(f"model directory not found: {model_dir}")
        files = sorted(p for p in model_dir.iterdir() if is_tekken(p) or is_sentencepiece(p))
        versioned = [p for p in files if not p.name.endswith(".model")]
        candidates = versioned or files
        if not candidates and model_file is not None:
            raise TokenizerError(
                f"no tokenizer file next to {model_file.name} in {model_dir}: looked for {_LOOKED_FOR}. The "
                "vocabulary inside a GGUF file is not used (tramontane tokenizes with mistral_common): copy the "
                "model's tekken.json or tokenizer.model.v3 (from its original Mistral repository) into that folder"
            )
        if not candidates:
            raise TokenizerError(f"no tokenizer file in {model_dir}: looked for {_LOOKED_FOR}")
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise TokenizerError(
                f"several tokenizer files in {model_dir} ({names}); "
                "pass the one to use to Tokenizer.from_file"
            )
        logger.debug("tokenizer file for %s: %s", model_dir, candidates[0].name)
        return cls.from_file(candidates[0])

    @classmethod
    def builtin(cls, version: str) -> Tokenizer:
        """One of the tokenizers shipped inside the mistral_common package (see `BUILTIN_VERSIONS`)."""
        try:
            make = _BUILTIN[version]
        except KeyError:
            raise TokenizerError(
                f"unknown built-in tokenizer {version!r}; choose one of {', '.join(BUILTIN_VERSIONS)}"
            ) from None
        try:
            return cls(make())
        except _LIBRARY_ERRORS as exc:
            raise TokenizerError(
                f"cannot load mistral_common's built-in {version} tokenizer: {_cause(exc)}"
            ) from exc

    # -- vocabulary ------------------------------------------------------------------------------------

    @property
    def version(self) -> str:
        """mistral_common's tokenizer version ("v1", "v3", "v7", ...); tekken or not is `is_tekken`."""
        return self.mistral.version.value

    @property
    def is_tekken(self) -> bool:
        return isinstance(self._raw, Tekkenizer)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, control tokens included (the model's embedding rows)."""
        return self._raw.n_words

    @property
    def bos_id(self) -> int:
        return self._raw.bos_id

    @property
    def eos_id(self) -> int:
        return self._raw.eos_id

    @property
    def pad_id(self) -> int | None:
        """The `<pad>` id, or None: sentencepiece files report -1 and some tekken files have none."""
        try:
            pad = self._raw.pad_id
        except ValueError:  # tekken without a <pad> special token
            return None
        return pad if pad >= 0 else None

    def __repr__(self) -> str:
        kind = "tekken" if self.is_tekken else "sentencepiece"
        return f"Tokenizer({self.version} {kind}, vocab_size={self.vocab_size}, path={str(self.path)!r})"

    # -- text ------------------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Raw text to ids, no chat template (for plain completion). Control-token names in `text`
        (e.g. "[INST]") are encoded as ordinary text, never as control tokens."""
        return self._raw.encode(text, bos=bos, eos=eos)

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        """Ids to text. Control tokens (`<s>`, `[INST]`, ...) are dropped unless `keep_special`.

        With `keep_special`, sentencepiece tokenizers return raw pieces ("▁Hello", "<0x0A>"), as
        mistral_common does; tekken returns normal text with the control tokens spelled out.
        """
        policy = SpecialTokenPolicy.KEEP if keep_special else SpecialTokenPolicy.IGNORE
        return self.mistral.decode([int(i) for i in ids], special_token_policy=policy)

    def incremental_decoder(self, context: Sequence[int] = ()) -> IncrementalDecoder:
        """A streaming decoder; `context` (e.g. the prompt's ids) fixes spacing of the first new token."""
        return IncrementalDecoder(self, context)

    # -- chat ------------------------------------------------------------------------------------------

    def encode_chat(
        self, messages: Sequence[MessageLike], tools: Sequence[ToolLike] | None = None
    ) -> list[int]:
        """Chat messages to prompt ids with the template of this tokenizer's version.

        `messages` are dicts as in the OpenAI/Mistral API ({"role": "user", "content": "..."}, assistant
        "tool_calls", tool "tool_call_id"), or mistral_common message objects. For images or audio use
        `encode_chat_full`, which also returns the media arrays.
        """
        tokenized = self.encode_chat_full(messages, tools)
        if tokenized.images or tokenized.audios:
            raise TokenizerError(
                "the chat contains images or audio, whose arrays encode_chat would drop; use encode_chat_full"
            )
        return list(tokenized.tokens)

    def encode_chat_full(
        self, messages: Sequence[MessageLike], tools: Sequence[ToolLike] | None = None
    ) -> Tokenized:
        """Like `encode_chat` but returns mistral_common's `Tokenized`: `.tokens`, `.images`, `.audios`."""
        try:
            # model_validate: the dicts among the messages and tools become mistral_common objects
            request: ChatCompletionRequest[ChatMessage] = ChatCompletionRequest.model_validate(
                {"messages": list(messages), "tools": None if tools is None else list(tools)}
            )
            return self.mistral.encode_chat_completion(request)
        except _LIBRARY_ERRORS as exc:
            raise TokenizerError(
                f"cannot encode the chat with the {self.version} tokenizer: {_cause(exc)}"
            ) from exc


class IncrementalDecoder:
    """Turns a growing id stream into text deltas whose concatenation equals `decode(all ids)`.

    Each step decodes a short window, `decode(ids[prefix:]) - decode(ids[prefix:read])`, so that
    sentencepiece's dropped leading space of a window's first token cancels out; a delta that ends in
    U+FFFD (an incomplete UTF-8 character split over byte tokens) is held back until it completes.
    This is the scheme of vLLM's `detokenize_incrementally` and TGI.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = [int(i) for i in context]
        self._prefix = 0  # ids[prefix:read] is already printed; decoded only as context
        self._read = len(self._ids)

    def push(self, new_ids: Iterable[int]) -> str:
        """Add ids; return the text they complete ("" while a character is still incomplete)."""
        self._ids.extend(int(i) for i in new_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Return what is still held back (an unfinished character comes out as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        printed = decode(self._ids[self._prefix : self._read])
        text = decode(self._ids[self._prefix :])
        if len(text) <= len(printed) or (text.endswith("\ufffd") and not final):
            return ""
        # Drop ids before the window; only ids[prefix:] are ever decoded again.
        self._ids = self._ids[self._read :]
        self._prefix, self._read = 0, len(self._ids)
        return text[len(printed) :]
