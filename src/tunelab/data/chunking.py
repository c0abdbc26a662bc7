"""Raw text -> training chunks, with text-generation-webui's semantics.

1. The text is split at every ``hard_cut_string`` first; no chunk contains it and no
   chunk spans it.
2. Each piece is tokenized and cut into windows of ``cutoff_len`` tokens, neighbours
   sharing ``overlap_len`` tokens.
3. With ``newline_favor_len`` > 0, a cut inside a piece moves to the nearest newline
   when one lies within that many characters of it (the chunk's start moves forward
   to just after a newline, its end back to just before one).
"""

from __future__ import annotations

from typing import Any

from tunelab.errors import DataError


def windows(n_tokens: int, cutoff_len: int, overlap_len: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) covering ``n_tokens``."""
    if overlap_len >= cutoff_len:
        raise DataError(
            f"overlap_len ({overlap_len}) must be smaller than cutoff_len ({cutoff_len})",
            "lower overlap_len",
        )
    step = cutoff_len - overlap_len
    spans, start = [], 0
    while True:
        end = min(start + cutoff_len, n_tokens)
        spans.append((start, end))
        if end >= n_tokens:
            return spans
        start += step


def favor_newline(text: str, limit: int, cut_start: bool, cut_end: bool) -> str:
    """Move a chunk's inner cuts to a newline within ``limit`` characters."""
    if limit <= 0 or "\n" not in text:
        return text
    if cut_start:
        first = text.find("\n")
        if first + 1 <= limit:  # characters dropped from the start
            text = text[first + 1 :]
    if cut_end and "\n" in text:
        last = text.rfind("\n")
        if len(text) - last <= limit:  # characters dropped from the end
            text = text[:last]
    return text


def chunk_text(
    text: str,
    tokenizer: Any,
    cutoff_len: int,
    overlap_len: int = 0,
    newline_favor_len: int = 0,
    hard_cut_string: str = "\n\n\n",
) -> list[str]:
    """The chunks of ``text``, as text, in order; empty ones are left out."""
    pieces = text.split(hard_cut_string) if hard_cut_string else [text]
    chunks = []
    for piece in pieces:
        if not piece.strip():
            continue
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        spans = windows(len(ids), cutoff_len, overlap_len)
        for start, end in spans:
            chunk = tokenizer.decode(ids[start:end])
            chunk = favor_newline(chunk, newline_favor_len, start > 0, end < len(ids))
            if chunk.strip():
                chunks.append(chunk)
    return chunks
