"""The records data preparation passes around: examples as read, and token rows as prepared.

A leaf of the data package, so that preparing and caching share them without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunelab.config.schema import DatasetSource
from tunelab.data.documents import Document
from tunelab.data.formats import Sample, TurnRules


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
    examples: list[Example]
    sources: list[SourceReport]
    duplicates: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    sources: list[SourceReport]
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
