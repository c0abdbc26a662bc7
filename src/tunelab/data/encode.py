"""Checked examples -> token ids and labels, in chunks, over several processes, into Arrow.

Each chunk of examples is rendered (chat template, prompt styles), its segments tokenized
in one batch call of the fast tokenizer, and its samples cut, dropped or kept by the
length rules; the result is an Arrow table per chunk, so the token ids never live as
Python lists beyond one chunk. With more than one process the chunks are shared out to
forked workers that inherit the examples and the tokenizer (nothing is pickled on the
way in); the chunks come back in order, so the result is the same as with one process.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tunelab.config.schema import TuneConfig
from tunelab.data.chunking import chunk_text
from tunelab.data.documents import Document, Tokens, tokenize_document
from tunelab.data.formats import TextSample, VisionSample
from tunelab.data.records import Example, RawText, kinds_of
from tunelab.data.rows import Rows, RowWriter, to_table
from tunelab.data.tokenize import (
    IGNORE_INDEX,
    TemplateError,
    adds_bos,
    end_of_turn_tokens,
    sample_segments,
)
from tunelab.data.vision import tokenize_vision
from tunelab.errors import DataError

CHUNK = 256  # examples per chunk: one batch call of the tokenizer, one Arrow table
PARALLEL_FROM = 2000  # fewer examples than this are prepared in the calling process


def processes(config: TuneConfig, n_examples: int) -> int:
    """How many processes prepare ``n_examples``: ``dataset_processes`` if set, else one per
    CPU this process may use (one for small datasets, where starting workers costs more
    than it saves)."""
    if config.dataset_processes:
        return max(1, config.dataset_processes)
    if n_examples < PARALLEL_FROM:
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def _samples(ex: Example, tokenizer: Any, sequence_len: int, counts: Counter) -> list[Any]:
    """The samples of one example: raw text cut into chunks, a document of type chunked_text
    or pretrain tokenized (the tokens axolotl's length limit cuts off go to ``counts``)."""
    if isinstance(ex.sample, Document):
        try:
            done = tokenize_document(ex.sample, tokenizer, sequence_len)
        except DataError as exc:
            raise DataError(f"{ex.source}: {ex.where}: {exc.message}", exc.hint) from None
        if done.cut:
            counts.update(truncated=1, truncated_tokens=done.cut)
        return done.samples
    if not isinstance(ex.sample, RawText):
        return [ex.sample]
    s = ex.sample.source
    chunks = chunk_text(
        ex.sample.text, tokenizer, s.cutoff_len or sequence_len, s.overlap_len,
        s.newline_favor_len, s.hard_cut_string,
    )  # fmt: skip
    return [TextSample(((chunk, True),), eos=False) for chunk in chunks]


def _vision_tokens(ex: Example, processor: Any, config: TuneConfig) -> tuple[list, list]:
    if processor is None:
        raise DataError(
            f"{ex.source}: {ex.where}: image rows need a multimodal base model; "
            f"'{config.base_model}' is text-only",
            "choose a vision-language base model, or leave the image rows out",
        )
    try:
        return tokenize_vision(ex.sample, processor, config.train_on_inputs)
    except (TemplateError, ValueError, OSError) as exc:
        raise DataError(f"{ex.source}: {ex.where}: {exc}", getattr(exc, "hint", None)) from None


class Encoder:
    """Everything one chunk needs, fixed for a whole dataset."""

    def __init__(self, tokenizer: Any, config: TuneConfig, processor: Any, images: bool,
                 eot_tokens: list[str] | None) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.config = config
        self.processor = processor
        self.images = images
        self.eot_tokens = eot_tokens
        self.bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None

    def _pieces(self, examples: list[Example], counts: Counter) -> tuple[list, list[str]]:
        """Each sample as ready ids and labels, or as segments whose texts are tokenized
        together afterwards (their places in ``texts``)."""
        pieces, texts = [], []
        tokenizer, config = self.tokenizer, self.config
        for ex in examples:
            for sample in _samples(ex, tokenizer, config.sequence_len, counts):
                if isinstance(sample, VisionSample):
                    ids, labels = _vision_tokens(ex, self.processor, config)
                    pieces.append((ids, labels, list(sample.images)))
                elif isinstance(sample, Tokens):  # chunked_text and pretrain, as axolotl
                    pieces.append((list(sample.input_ids), list(sample.labels), None))
                else:
                    try:
                        segments = sample_segments(
                            sample, tokenizer, config.train_on_inputs, ex.rules, self.eot_tokens
                        )
                    except TemplateError as exc:
                        raise DataError(f"{ex.source}: {ex.where}: {exc}", exc.hint) from None
                    text = "".join(s.text for s in segments)
                    bos = self.bos is not None and not text.startswith(tokenizer.bos_token)
                    trained = [s.trained for s in segments]
                    pieces.append((len(texts), trained, bos))
                    texts += [s.text for s in segments]
        return pieces, texts

    def chunk(self, examples: list[Example]) -> tuple[Any, Counter]:
        """One chunk of examples as an Arrow table of samples, and what was cut or dropped."""
        counts: Counter = Counter()
        pieces, texts = self._pieces(examples, counts)
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        items = []
        for piece in pieces:
            if isinstance(piece[0], int):  # segments: assemble their ids
                start, trained, bos = piece
                ids = [self.bos] if bos else []
                labels = [IGNORE_INDEX] if bos else []
                for k, keep in enumerate(trained):
                    part = encoded[start + k]
                    ids += part
                    labels += part if keep else [IGNORE_INDEX] * len(part)
                images = None
            else:
                ids, labels, images = piece
            item = self._limited(ids, labels, images, counts)
            if item is not None:
                items.append(item)
        return to_table(items, self.images), counts

    def _limited(self, ids: list, labels: list, images: list | None, counts: Counter) -> Any:
        """The sample after the length rules (cut or dropped), or None if dropped."""
        config, limit = self.config, self.config.sequence_len
        if len(ids) > limit:
            if config.excess_length_strategy == "drop" or images is not None:
                counts.update(dropped=1, dropped_long=1)
                return None
            counts["truncated"] += 1
            counts["truncated_tokens"] += len(ids) - limit
            counts["truncated_over_half"] += len(ids) > 2 * limit  # lost most of itself
            ids, labels = ids[:limit], labels[:limit]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            counts.update(dropped=1, dropped_untrained=1)  # nothing left to learn from
            return None
        if config.min_sample_len and len(ids) < config.min_sample_len:
            counts.update(dropped=1, dropped_short=1)
            return None
        counts["tokens"] += len(ids)
        counts["trained_tokens"] += sum(label != IGNORE_INDEX for label in labels[1:])
        item = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
        if self.images:
            item["images"] = images or []
        return item


_WORK: tuple[Encoder, list[Example]] | None = None  # what forked workers inherit


def _work(bounds: tuple[int, int]) -> tuple[str, Any, Any]:
    encoder, examples = _WORK  # type: ignore[misc]
    try:
        table, counts = encoder.chunk(examples[bounds[0] : bounds[1]])
    except DataError as exc:  # sent back as text: the parent raises it
        return "error", exc.message, exc.hint
    return "ok", table, counts


def _chunks(
    encoder: Encoder, examples: list[Example], n_proc: int
) -> Iterator[tuple[Any, Counter]]:
    bounds = [(i, min(i + CHUNK, len(examples))) for i in range(0, len(examples), CHUNK)]
    if n_proc <= 1 or len(bounds) <= 1:
        for start, stop in bounds:
            yield encoder.chunk(examples[start:stop])
        return
    global _WORK
    _WORK = (encoder, examples)
    try:
        context = multiprocessing.get_context("fork")
        with context.Pool(min(n_proc, len(bounds))) as pool:
            for status, first, second in pool.imap(_work, bounds):
                if status == "error":
                    raise DataError(first, second)
                yield first, second
    finally:
        _WORK = None


def encode(
    examples: Sequence[Example], tokenizer: Any, config: TuneConfig, processor: Any = None,
    file: Path | None = None, kinds: set[str] | None = None,
) -> tuple[Rows, Counter]:  # fmt: skip
    """Token ids, attention mask and labels of ``examples``, as :class:`Rows`.

    Samples past ``sequence_len`` are cut or dropped, and those shorter than
    ``min_sample_len`` dropped; the counts say how many (and why: 'dropped_long',
    'dropped_short', 'dropped_untrained'), and how many tokens the cuts threw away. Image
    samples keep their image paths and are dropped, never cut, when too long.

    With ``file`` the rows are written there chunk by chunk and read back memory-mapped;
    otherwise they are kept as Arrow tables in memory. ``kinds``: what the examples need
    (see :func:`tunelab.data.prepare.kinds_of`), when known without reading them all.
    """
    if kinds is None:
        kinds = {kind for ex in examples for kind in kinds_of(ex)}
    eot_tokens = None
    if "rules" in kinds:
        eot_tokens, _ = end_of_turn_tokens(tokenizer, config.eot_tokens)
    images = "vision" in kinds
    encoder = Encoder(tokenizer, config, processor, images, eot_tokens)
    n_proc = 1 if processor is not None else processes(config, len(examples))
    counts: Counter = Counter()
    tables = []
    writer = RowWriter(file, images) if file is not None else None
    try:
        for table, chunk_counts in _chunks(encoder, examples, n_proc):
            counts += chunk_counts
            if writer is not None:
                writer.write(table)
            else:
                tables.append(table)
    finally:
        if writer is not None:
            writer.close()
    if file is not None:
        return Rows.from_file(file), counts
    return Rows.from_tables(tables, images), counts


def tokenize_examples(
    examples: list[Example], tokenizer: Any, config: TuneConfig, processor: Any = None
) -> tuple[list[dict[str, Any]], Counter]:
    """:func:`encode`, as a list of dicts (for small data: previews, perplexity, tests)."""
    rows, counts = encode(examples, tokenizer, config, processor)
    return list(rows), counts
