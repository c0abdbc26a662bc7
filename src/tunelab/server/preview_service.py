"""The server's dataset preview process (``tunelab data inspect --serve``): one long-lived
process that answers ``tunelab data inspect`` requests one at a time, so that torch,
transformers and each model's tokenizer are loaded once, not once per keystroke.

The server itself never imports torch, so this runs as its child. The protocol is JSON
lines: the server writes ``{"argv": [...]}`` (the arguments of ``tunelab data inspect``),
the process answers one line, ``{"stdout": TEXT}`` (what the command prints) or
``{"failure": RECORD}`` (what it writes to ``TUNELAB_RESULT_FILE``). Anything else printed
(notes, library warnings, tracebacks) goes to stderr, the server's log file, so that it can
never break the protocol or fill a pipe nobody reads.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

TOKENIZERS = 4  # models whose tokenizer is kept loaded

Answer = Callable[[list[str]], dict[str, Any]]


def serve(answer: Answer) -> int:
    """Answer each request line on stdin with ``answer(argv)`` on one line, until stdin
    closes (the server stopped us or is gone)."""
    replies = _reply_stream()
    cache_tokenizers()
    while line := sys.stdin.readline():
        replies.write(json.dumps(_answer_line(line, answer)) + "\n")
        replies.flush()
    return 0


def _answer_line(line: str, answer: Answer) -> dict[str, Any]:
    """The reply to one request line; a line that is not a request is answered, not fatal."""
    try:
        argv = json.loads(line)["argv"]
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise TypeError("argv must be a list of strings")
    except (ValueError, KeyError, TypeError) as exc:
        record = {"exit_code": 2, "error": f"bad preview request: {exc}", "hint": None,
                  "problems": None}  # fmt: skip
        return {"failure": record}
    return answer(argv)


def _reply_stream() -> TextIO:
    """The replies get this process's stdout to themselves: what anything else prints to
    stdout from now on (Python or a library's C code) lands in stderr instead."""
    sys.stdout.flush()
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    return replies


def cache_tokenizers(size: int = TOKENIZERS) -> None:
    """Load each model's tokenizer once (the slow part of an inspection after the imports,
    seconds for a large vocabulary); the ``size`` models used last are kept.

    Planning changes the tokenizer it gets. Setting an attribute (a chat template) changes
    only the shallow copy it is given; adding tokens changes the vocabulary the copies share,
    so a cached tokenizer whose vocabulary or special tokens changed is loaded again (a deep
    copy would take longer than loading)."""
    from tunelab.train import plan

    load = plan.load_tokenizer_and_processor
    cache: OrderedDict[tuple[Any, ...], tuple[tuple[Any, Any], str]] = OrderedDict()

    def cached(location: str, ref: Any, multimodal: bool, trust_remote_code: bool = False):
        key = (location, multimodal, trust_remote_code, _stamp(location))
        kept = cache.pop(key, None)
        if kept is None or _vocabulary(kept[0][0]) != kept[1]:
            loaded = load(location, ref, multimodal, trust_remote_code)
            kept = (loaded, _vocabulary(loaded[0]))
        cache[key] = kept
        while len(cache) > size:
            cache.popitem(last=False)
        return _copies(*kept[0])

    plan.load_tokenizer_and_processor = cached


def _vocabulary(tokenizer: Any) -> str:
    """What adding tokens changes: the vocabulary's size and the special tokens."""
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return f"{len(tokenizer)} {special}"


def _copies(tokenizer: Any, processor: Any) -> tuple[Any, Any]:
    """Shallow copies, the processor's holding the tokenizer's copy."""
    tokenizer = copy.copy(tokenizer)
    if processor is not None:
        processor = copy.copy(processor)
        processor.tokenizer = tokenizer
    return tokenizer, processor


def _stamp(location: str) -> tuple[tuple[str, int], ...] | None:
    """The files of a local model directory with their times: a tokenizer saved again there
    is loaded again. None for a Hub id."""
    folder = Path(location)
    if not folder.is_dir():
        return None
    return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
