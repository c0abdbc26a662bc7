"""Credentials never reach a screen, a file or an answer: passwords in URLs are masked.

Keys and tokens are kept out of configs altogether (they come from the environment);
a URL such as ``https://user:password@host`` is accepted where a URL is asked for, used
as given, and shown or saved as ``https://user:***@host`` (a token alone,
``https://token@host``, as ``https://***@host``).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import Any

# scheme://USERINFO@ where USERINFO runs to the last @ before the path: a password may hold
# an @ that nobody percent-encoded
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)([^/\s?#]*)@")
MASK = "***"


def _mask(match: re.Match) -> str:
    scheme, userinfo = match[1], match[2]
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{user}:{MASK}@" if colon else f"{scheme}{MASK}@"


def redact(text: str) -> str:
    """``text`` with the credentials of every ``scheme://user:password@host`` masked."""
    return _USERINFO.sub(_mask, text)


def is_masked(text: str) -> bool:
    """Whether a URL in ``text`` had its credentials masked by :func:`redact`."""
    return any(m[2] == MASK or m[2].endswith(f":{MASK}") for m in _USERINFO.finditer(text))


def redact_data(value: Any) -> Any:
    """A copy of plain data (dicts, lists, strings) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(item) for item in value]
    return value


class RedactedStream:
    """A text stream that masks credentials in everything written to it (libraries print
    their service's address, password included)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(redact(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _console_handlers() -> list[logging.StreamHandler]:
    """Logging handlers that write to this process's stdout or stderr (libraries make theirs
    when imported, holding the stream itself, so a redirect alone would miss them)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [
        h for logger in loggers for h in getattr(logger, "handlers", [])
        if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
        and not isinstance(getattr(type(h), "stream", None), property)  # follows sys.stderr
    ]  # fmt: skip


@contextmanager
def redacted_output() -> Iterator[None]:
    """Mask credentials in whatever is printed to stdout and stderr, or logged there,
    meanwhile."""
    if isinstance(sys.stdout, RedactedStream):  # already inside (the CLI wraps every command)
        yield
        return
    handlers = [(h, h.stream) for h in _console_handlers()]
    for handler, stream in handlers:
        handler.setStream(RedactedStream(stream))
    try:
        with (
            redirect_stdout(RedactedStream(sys.stdout)),
            redirect_stderr(RedactedStream(sys.stderr)),
        ):
            yield
    finally:
        for handler, stream in handlers:
            handler.setStream(stream)
