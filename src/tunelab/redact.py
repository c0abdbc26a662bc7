"""Credentials never reach a screen, a file or an answer: passwords in URLs are masked.

Keys and tokens are kept out of configs altogether (they come from the environment);
a URL such as ``https://user:password@host`` is accepted where a URL is asked for, used
as given, and shown or saved as ``https://user:***@host``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import Any

# scheme://user:password@ (the user is kept) or scheme://token@ (all of it is a secret)
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)(?:([^/\s:@]*):)?[^/\s@]+@")
MASK = "***"


def _mask(match: re.Match) -> str:
    scheme, user = match[1], match[2]
    return f"{scheme}{user}:{MASK}@" if user is not None else f"{scheme}{MASK}@"


def redact(text: str) -> str:
    """``text`` with the credentials of every ``scheme://user:password@host`` masked."""
    return _USERINFO.sub(_mask, text)


def redact_data(value: Any) -> Any:
    """A copy of plain data (dicts, lists, strings) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(item) for item in value]
    return value


def has_password(text: str) -> bool:
    return bool(_USERINFO.search(text))


class RedactedStream:
    """A text stream that masks credentials in everything written to it (libraries print
    their service's address, password included)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(redact(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def redacted_output() -> Iterator[None]:
    """Mask credentials in whatever is printed to stdout and stderr meanwhile."""
    with (
        redirect_stdout(RedactedStream(sys.stdout)),
        redirect_stderr(RedactedStream(sys.stderr)),
    ):
        yield
