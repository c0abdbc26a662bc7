"""Plain text tokenized as axolotl tokenizes it, in token space: ``chunked_text`` and ``pretrain``.

``chunked_text`` is axolotl's ``type: completion`` (``CompletionPromptTokenizingStrategy``):
the text with the tokenizer's special tokens (its BOS where it adds one), cut at
64 x ``sequence_len`` tokens, then the EOS token unless the ids already end with it or were
cut there; the ids are sliced into consecutive pieces of ``sequence_len`` tokens (the last
may be shorter).

``pretrain`` is axolotl's ``type: pretrain`` (``PretrainTokenizationStrategy``): the
tokenizer's own overlapping windows of ``sequence_len - 1`` tokens (special tokens in each,
``stride`` min(256, (sequence_len - 1) // 2) tokens shared by neighbours), each followed by
the EOS token.

Every token of both is trained (labels are the ids). Nothing is decoded back to text.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from tunelab.errors import DataError

DocumentKind = Literal["chunked_text", "pretrain"]
DOCUMENT_KINDS: tuple[DocumentKind, ...] = ("chunked_text", "pretrain")
COMPLETION_MAX_FACTOR = 64  # axolotl's completion loader: max_length = sequence_len * 64


@dataclass(frozen=True)
class Document:
    """A row's text for ``type: chunked_text`` or ``pretrain``, tokenized once a tokenizer
    is at hand."""

    text: str
    kind: DocumentKind


@dataclass(frozen=True)
class Tokens:
    """An already-tokenized sample, passed through as it is (``labels``: what is trained)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @classmethod
    def trained(cls, ids: list[int]) -> Tokens:
        return cls(tuple(ids), tuple(ids))


@dataclass(frozen=True)
class Tokenized:
    """A document's samples, and how many of its tokens axolotl's length limit cut off."""

    samples: list[Tokens]
    cut: int = 0


@contextmanager
def _truncating(tokenizer: Any) -> Iterator[None]:
    """A fast tokenizer keeps the truncation of its last call in its Rust backend (where it
    would be saved with it, and change its JSON): restore the one it had."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    before = backend.truncation if backend is not None else None
    try:
        yield
    finally:
        if backend is not None and backend.truncation != before:
            if before is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**before)


def completion_chunks(text: str, tokenizer: Any, sequence_len: int) -> Tokenized:
    """axolotl's ``type: completion``: see the module docstring. Empty text gives nothing."""
    if not text:
        return Tokenized([])
    limit = sequence_len * COMPLETION_MAX_FACTOR
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    cut = 0
    if len(ids) > limit:  # axolotl tokenizes with truncation at max_length
        with _truncating(tokenizer):
            kept = tokenizer(text, add_special_tokens=True, truncation=True, max_length=limit)
        cut, ids = len(ids) - len(kept["input_ids"]), list(kept["input_ids"])
    if not ids:
        return Tokenized([])
    eos = tokenizer.eos_token_id
    if eos is not None and ids[-1] != eos and len(ids) < limit:
        ids.append(eos)
    pieces = [ids[i : i + sequence_len] for i in range(0, len(ids), sequence_len)]
    return Tokenized([Tokens.trained(piece) for piece in pieces], cut)


def pretrain_stride(sequence_len: int) -> int:
    return min(256, (sequence_len - 1) // 2)


def pretrain_windows(text: str, tokenizer: Any, sequence_len: int) -> list[list[int]]:
    """axolotl's ``type: pretrain``: the tokenizer's overlapping windows, each + EOS."""
    length, stride = sequence_len - 1, pretrain_stride(sequence_len)
    room = length - tokenizer.num_special_tokens_to_add()
    if stride >= room:  # the tokenizer would panic
        raise DataError(
            f"sequence_len {sequence_len} is too short for type pretrain's windows: "
            f"{room} tokens of text each, overlapping by {stride}",
            "raise sequence_len",
        )
    with _truncating(tokenizer):
        windows = tokenizer(
            text,
            truncation=True,
            max_length=length,
            stride=stride,
            return_overflowing_tokens=True,
            add_special_tokens=True,
        )["input_ids"]
    if windows and not isinstance(windows[0], list):  # a slow tokenizer gives one window
        raise DataError(
            "type pretrain needs a fast (Rust) tokenizer, which cuts text into windows",
            "use the model's fast tokenizer (tokenizer.json)",
        )
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [[*window, *eos] for window in windows]


def tokenize_document(doc: Document, tokenizer: Any, sequence_len: int) -> Tokenized:
    """The samples of one document, as its kind makes them."""
    if doc.kind == "chunked_text":
        return completion_chunks(doc.text, tokenizer, sequence_len)
    windows = pretrain_windows(doc.text, tokenizer, sequence_len)
    return Tokenized([Tokens.trained(window) for window in windows])
