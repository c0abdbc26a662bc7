"""`tunelab eval perplexity`: how well models predict a dataset, kept in a results table.

The data goes through the same reading and tokenization as training, so a dataset in
any supported format works and the tokens scored are the tokens training learns from
(every token of text data, the answers of instruction data). The examples are joined
into one token stream, which a window of ``max_length`` tokens crosses ``stride`` tokens
at a time; each token is scored once, with up to ``max_length - stride`` tokens of
context before it (text-generation-webui's method, and transformers' guide's).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import DataError, TunelabError
from tunelab.files import write_atomic
from tunelab.rundir import RunLayout

COLUMNS = (
    "date", "model", "adapter", "data", "perplexity", "tokens", "stride", "max_length", "comment"
)  # fmt: skip
TABLE = "evaluations.csv"
DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class TokenStream:
    """Every example's token ids and labels, one after another."""

    ids: list[int]
    labels: list[int]
    scored: int  # how many labels are scored at all


def token_stream(data: str, tokenizer: Any, fmt: str | None = None) -> TokenStream:
    """Read ``data`` like training does (a ``.txt`` file is one document) and join it."""
    from tunelab.config import load_config
    from tunelab.data.prepare import load_examples, tokenize_examples
    from tunelab.data.templates import apply_chat_template

    if fmt is None and Path(data).suffix.lower() == ".txt":
        fmt = "raw"
    source: dict[str, Any] = {"path": data, "type": fmt or "auto"}
    config = load_config(
        overrides={
            "datasets": [source],
            "val_set_size": 0,
            "shuffle_merged_datasets": False,
            "dataset_exact_deduplication": False,
            "sequence_len": 1 << 30,
        }  # fmt: skip
    ).config
    loaded = load_examples(config)
    if any(isinstance(ex.sample, list) for ex in loaded.examples):
        apply_chat_template(tokenizer, None)
    rows, _ = tokenize_examples(loaded.examples, tokenizer, config)
    ids = [t for r in rows for t in r["input_ids"]]
    labels = [t for r in rows for t in r["labels"]]
    scored = sum(label != IGNORE_INDEX for label in labels[1:])
    if scored == 0:
        raise DataError(f"{data}: nothing to score (no text or answers in it)", "give other data")
    return TokenStream(ids, labels, scored)


def perplexity(model: Any, stream: TokenStream, max_length: int, stride: int) -> tuple[float, int]:
    """(perplexity, tokens scored) of ``model`` on ``stream``, with a sliding window.

    The first window scores its ``max_length`` tokens; each next one moves ``stride``
    tokens on and scores only those, with the rest of the window as context. Every token
    but the very first is scored exactly once.
    """
    import torch
    import torch.nn.functional as F

    if not 1 <= stride < max_length:
        raise TunelabError(
            f"stride {stride} with max_length {max_length}: the stride must be at least 1 and "
            "smaller than max_length, so that each window has context for what it scores",
            "use e.g. --stride 512 --max-length 2048",
        )
    ids, labels = torch.tensor(stream.ids), torch.tensor(stream.labels)
    total, count, scored_until = 0.0, 0, 1  # the first token has nothing to be predicted from
    model.eval()
    while scored_until < len(ids):
        end = min(max_length if scored_until == 1 else scored_until + stride, len(ids))
        begin = max(0, end - max_length)
        scored = end - scored_until  # the window's last tokens; the rest is context
        with torch.no_grad():
            out = model(input_ids=ids[None, begin:end].to(model.device), use_cache=False)
        logits = out.logits[0, -scored - 1 : -1].float()  # position p predicts token p + 1
        target = labels[scored_until:end].to(logits.device)
        total += F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((target != IGNORE_INDEX).sum())
        scored_until = end
    return math.exp(total / count), count


def table_path(given: str | None, runs: list[Path]) -> Path:
    """``--table``, else the first evaluated run's table, else outputs/evaluations.csv."""
    if given:
        return Path(given)
    return RunLayout(runs[0]).evaluations if runs else Path("outputs") / TABLE


def read_table(path: Path) -> list[dict[str, str]]:
    """The rows of a results table; a CSV with other columns is refused, never rewritten."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise TunelabError(
            f"{path}: not a tunelab results table (its columns are "
            f"{', '.join(reader.fieldnames or []) or 'none'})",
            "give another --table; this file was left as it was",
        )
    return rows


def _score(row: dict[str, str]) -> float:
    try:
        return float(row["perplexity"])
    except (TypeError, ValueError):  # a row edited by hand: listed last
        return math.inf


def append_rows(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Add ``rows`` to the table at ``path`` (written whole, atomically); returns all rows."""
    existing = read_table(path)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in existing + rows:
        writer.writerow(row)
    write_atomic(path, out.getvalue())
    return read_table(path)


def result_row(
    model: str, adapter: str, data: str, ppl: float, tokens: int, stride: int, max_length: int
) -> dict[str, Any]:
    """One line of the results table (its comment left empty)."""
    if Path(model).is_dir():  # a model directory (the built-in model's cache): its name
        model = Path(model).name
    return {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "model": model, "adapter": adapter,
        "data": data, "perplexity": f"{ppl:.4f}", "tokens": tokens, "stride": stride,
        "max_length": max_length, "comment": "",
    }  # fmt: skip


def print_table(rows: list[dict[str, str]], new: int, title: str) -> None:
    """The table sorted by perplexity (lowest first); the ``new`` latest rows marked."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    shown = ("perplexity", "model", "adapter", "data", "tokens", "stride", "max_length", "date",
             "comment")  # fmt: skip
    table = Table(title=Text(title), title_justify="left")
    for col in shown:
        table.add_column(col, justify="right" if col in ("perplexity", "tokens") else "left")
    latest = {id(r) for r in rows[len(rows) - new :]}
    for r in sorted(rows, key=_score):  # Text: paths and comments are never read as markup
        table.add_row(*(Text(r[c] or "") for c in shown), style="bold" if id(r) in latest else None)
    import sys

    Console(width=None if sys.stdout.isatty() else 200).print(table)
