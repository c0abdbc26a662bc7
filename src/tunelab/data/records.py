"""The records data preparation passes around: examples as read, and token rows as prepared.

A leaf of the data package, so that preparing and caching share them without importing
each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.config.schema import DatasetSource
from tunelab.data.documents import Document
from tunelab.data.formats import Sample, TurnRules, VisionSample


@dataclass(frozen=True)
class RawText:
    """A document to be cut into chunks once a tokenizer is at hand."""

    text: str
    source: DatasetSource


@dataclass(frozen=True)
class Example:
    """One sample, where it came from, and for ``type: chat_template`` how it is masked."""

    sample: Sample | RawText | Document
    source: str
    where: str
    rules: TurnRules | None = None


@dataclass(frozen=True)
class SourceReport:
    path: str
    format: str
    rows: int
    sha256: str | None  # None for hub and saved datasets


@dataclass
class LoadedData:
    examples: Sequence[Example]  # a list, or a view of rows read when needed (data.lazy)
    sources: list[SourceReport]
    duplicates: int = 0
    notes: list[str] = field(default_factory=list)
    kinds: set[str] = field(default_factory=set)  # what the examples need (prepare.kinds_of)


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    sources: list[SourceReport]
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def kinds_of(ex: Example) -> set[str]:
    """What preparing an example needs: 'conversation' (a chat template), 'vision' (a
    processor), 'rules' (type chat_template's masking); empty for plain text."""
    kinds = set()
    if isinstance(ex.sample, list):
        kinds.add("conversation")
    elif isinstance(ex.sample, VisionSample):
        kinds.add("vision")
    if ex.rules is not None:
        kinds.add("rules")
    return kinds
