"""Input formats: each is a pure function from one row to a list of chat messages.

Nothing after this module knows which format a row came in. ``auto`` picks a format
from a file's columns, trying the entries of :data:`FORMATS` in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]


class RowError(ValueError):
    """A row that does not fit its format; ``key`` names the field at fault."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"'{key}' {problem}")
        self.key = key


def _text(row: dict[str, Any], key: str, required: bool) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise RowError(key, "is missing")
        return ""
    if not isinstance(value, str):
        raise RowError(key, f"must be text, found {type(value).__name__}")
    return value


def alpaca_to_messages(row: dict[str, Any]) -> list[Message]:
    """``instruction`` (+ ``input``) -> user, ``output`` -> assistant.

    Optional ``system`` becomes the system message and ``history`` (a list of
    ``[instruction, response]`` pairs) becomes earlier turns.
    """
    instruction = _text(row, "instruction", required=True)
    extra = _text(row, "input", required=False)
    output = _text(row, "output", required=True)
    if not instruction.strip() and not extra.strip():
        raise RowError("instruction", "is empty")
    if not output.strip():
        raise RowError("output", "is empty")
    messages: list[Message] = []
    system = _text(row, "system", required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowError("history", "must be a list of [instruction, response] pairs")
    for turn in history:
        if not (
            isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
        ):
            raise RowError("history", "must be a list of [instruction, response] pairs")
        messages += [
            {"role": "user", "content": turn[0]},
            {"role": "assistant", "content": turn[1]},
        ]
    prompt = (
        f"{instruction}\n\n{extra}"
        if instruction.strip() and extra.strip()
        else instruction + extra
    )
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return messages


@dataclass(frozen=True)
class Format:
    """A named format: the columns that identify it and its row converter."""

    name: str
    required: tuple[str, ...]
    to_messages: Callable[[dict[str, Any]], list[Message]]


# Detection order for ``type: auto``: the first format whose required columns are all
# present wins.
FORMATS: dict[str, Format] = {
    "alpaca": Format("alpaca", ("instruction", "output"), alpaca_to_messages),
}


def detect_format(columns: Iterable[str]) -> Format | None:
    """The first format (in :data:`FORMATS` order) whose required columns are present."""
    present = set(columns)
    for fmt in FORMATS.values():
        if set(fmt.required) <= present:
            return fmt
    return None


def describe_formats() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.required)})" for f in FORMATS.values())
