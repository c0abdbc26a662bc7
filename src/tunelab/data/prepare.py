"""Sources -> validated examples -> train/validation split -> token ids and labels.

Every row is read and checked before any model is loaded; problems name the file, the
row or line, and the key.
"""

from __future__ import annotations

import hashlib
import json
import random
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tunelab.config.schema import DatasetSource, TuneConfig
from tunelab.data import cache
from tunelab.data.documents import DOCUMENT_KINDS, Document
from tunelab.data.encode import encode, tokenize_examples
from tunelab.data.formats import (
    FORMATS,
    OPENAI,
    ROLE_NAMES,
    Mapping,
    RowError,
    TextSample,
    TurnRules,
    VisionSample,
    conversation_to_messages,
    describe_formats,
    detect_format,
    text_field,
    text_to_text,
)
from tunelab.data.lazy import Chain, Converted, Picked, is_lazy
from tunelab.data.packing import efficiency, pack
from tunelab.data.pretraining import check_sources, read_pretraining
from tunelab.data.prompt_styles import PROMPTED_FORMATS
from tunelab.data.records import (
    Example,
    LoadedData,
    PreparedData,
    RawText,
    SourceReport,
    kinds_of,
)
from tunelab.data.sources import Table, expand, reduce_preferences
from tunelab.data.templates import DataTemplate, FormatFile, apply_chat_template
from tunelab.data.tokenize import end_of_turn_tokens
from tunelab.errors import DataError

__all__ = ["load_examples", "prepare_data", "tokenize_all", "tokenize_examples"]


def _columns(table: Table) -> set[str]:
    return {key for row in table.rows[:100] for key in row.data}


def _converter(source: DatasetSource, table: Table) -> tuple[str, Callable[[dict], Any]]:
    """The format name and row converter for one table of a source."""
    if source.format_file:
        return "format_file", FormatFile(source.format_file)
    if source.data_template:
        template = DataTemplate(source.data_template)
        template.check_columns(_columns(table), table.name)
        return "data_template", template
    if source.type == "chat_template":
        return "chat_template", _chat_template_converter(source)
    if source.field_messages or source.message_property_mappings:
        props = source.message_property_mappings or {}
        mapping = Mapping(
            messages=source.field_messages or "messages",
            role=props.get("role", OPENAI.role),
            content=props.get("content", OPENAI.content),
        )
        return "chat_template", lambda row: conversation_to_messages(row, mapping)
    if source.type in PROMPTED_FORMATS:
        _, convert = PROMPTED_FORMATS[source.type]
        style = source.prompt_style
        return source.type, lambda row: convert(row, style)
    name = source.type if source.type != "auto" else table.format
    if name is None:
        name = _detect(table)
    if name in ("sharegpt", "openai") and table.mapping is not None:
        mapping = table.mapping
        return name, lambda row: conversation_to_messages(row, mapping)
    column = "text" if table.text is not None else source.field or "text"  # a .txt line is text
    if name == "raw":
        return "raw", lambda row: RawText(text_field(row, column, required=True), source)
    if name in DOCUMENT_KINDS:
        return name, lambda row: Document(text_field(row, column, required=True), name)
    if name == "text":
        return "text", lambda row: text_to_text(row, column)
    return name, FORMATS[name].convert


def _role_names(source: DatasetSource) -> dict[str, str]:
    """``roles`` ({ours: [theirs, ...]}) as a map from the data's names to ours."""
    return {theirs: ours for ours, names in (source.roles or {}).items() for theirs in names}


def turn_rules(source: DatasetSource) -> TurnRules | None:
    """How a ``type: chat_template`` source's conversations are masked (None for others)."""
    if source.type != "chat_template":
        return None
    names = _role_names(source)
    eos = source.train_on_eos or "turn"
    trained = source.roles_to_train if source.roles_to_train is not None else ["assistant"]
    return TurnRules(
        roles=tuple(names.get(r, ROLE_NAMES.get(r, r)) for r in trained),
        eos=eos,
        eot=source.train_on_eot or eos,
    )


CHAT_TEMPLATE_KEYS = (
    "roles_to_train", "train_on_eos", "train_on_eot", "roles", "field_thinking",
    "template_thinking_key", "drop_system_message",
)  # fmt: skip
MASK_KEYS = ("roles_to_train", "train_on_eos", "train_on_eot")


def ignored_keys(
    where: str, source: DatasetSource, name: str, table: Table, images: bool = False
) -> list[str]:
    """Notes naming the keys of a dataset entry that the format it is read as does not use
    (``name``: the format of ``table``; ``images``: whether it gave image rows)."""
    given = [key for key in CHAT_TEMPLATE_KEYS if getattr(source, key) not in (None, False)]
    notes = []
    if source.type != "chat_template" or name != "chat_template":
        for key in given:
            notes.append(f"{where}.{key} applies to type chat_template only; ignored for {name}")
    elif images and any(key in MASK_KEYS for key in given):
        keys = " and ".join(key for key in given if key in MASK_KEYS)
        notes.append(
            f"{where}: {keys} apply to its text rows only; image rows are masked by tunelab's "
            "rule (the assistant turns, each with its end-of-turn token, are trained)"
        )
    if source.field not in (None, "text"):
        if table.text is not None:
            notes.append(f"{where}.field is ignored for a .txt file (it has no columns)")
        elif name not in ("raw", "text", *DOCUMENT_KINDS):
            notes.append(
                f"{where}.field applies to types raw, text, chunked_text and pretrain only; "
                f"ignored for {name}"
            )
    if source.prompt_style != "instruct" and name not in PROMPTED_FORMATS:
        notes.append(
            f"{where}.prompt_style applies to types alpaca_prompt and jeopardy only; "
            f"ignored for {name}"
        )
    return notes


def _chat_template_converter(source: DatasetSource) -> Callable[[dict], Any]:
    """``type: chat_template``: a conversation with the dataset's names for roles, keys and
    reasoning; its mask comes from :func:`turn_rules`."""
    props = source.message_property_mappings or {}
    names = _role_names(source)
    mapping = Mapping(
        messages=source.field_messages or "messages",
        role=props.get("role", OPENAI.role),
        content=props.get("content", OPENAI.content),
        roles=names,
        thinking=source.field_thinking or "reasoning_content",
        thinking_key=source.template_thinking_key or "reasoning_content",
    )

    def convert(row: dict) -> list | VisionSample:
        sample = conversation_to_messages(row, mapping)
        messages = sample.messages if isinstance(sample, VisionSample) else sample
        if source.drop_system_message and messages[0]["role"] == "system":
            messages = messages[1:]
        if isinstance(sample, VisionSample):
            return replace(sample, messages=messages)
        return messages

    return convert


def _detect(table: Table) -> str:
    """The one format of a table's rows; a file whose rows differ in format is an error."""
    fmt = detect_format(_columns(table))
    if fmt is None:
        raise DataError(
            f"{table.name}: cannot tell the format from its columns {sorted(_columns(table))}",
            f"known formats: {describe_formats()}; rename the columns or set the type",
        )
    first: dict[str, str] = {}
    for row in table.rows[:1000]:
        row_fmt = detect_format(row.data)  # rows missing a column are reported when read
        if row_fmt is not None:
            first.setdefault(row_fmt.name, row.where)
    if len(first) > 1:
        seen = ", ".join(f"{name} (first at {where})" for name, where in first.items())
        raise DataError(
            f"{table.name}: its rows are in different formats: {seen}",
            "put each format in its own file, or set the dataset's type",
        )
    return fmt.name


def _with_system(sample: Any, system: str | None) -> Any:
    if not system:
        return sample
    if isinstance(sample, list) and sample[0]["role"] != "system":
        return [{"role": "system", "content": system}, *sample]
    if isinstance(sample, VisionSample) and sample.messages[0]["role"] != "system":
        parts = [{"type": "text", "text": system}]  # the form image-text templates read
        return replace(sample, messages=[{"role": "system", "content": parts}, *sample.messages])
    return sample


def _with_images(sample: Any, folder: Path | None) -> Any:
    """Image paths made absolute (relative ones are read beside the data file) and checked."""
    if not isinstance(sample, VisionSample):
        return sample
    paths = []
    for name in sample.images:
        path = Path(name).expanduser()
        if not path.is_absolute() and folder is not None:
            path = folder / path
        if not path.is_file():
            raise RowError(sample.column, f"names a file that does not exist: {path}")
        paths.append(str(path.resolve()))
    return replace(sample, images=tuple(paths))


def _convert(
    table: Table, source: DatasetSource, system: str | None
) -> tuple[str, Sequence[Example], set[str]]:
    """The format name, the examples and their kinds (see :func:`kinds_of`). Every row is
    converted here; the examples of a table read lazily are converted again when read."""
    name, convert = _converter(source, table)
    rows = table.rows[: source.max_examples]
    if name == "raw" and table.text is not None:  # a whole .txt file is one document
        return name, [Example(RawText(table.text, source), table.name, "the whole file")], set()
    rules = turn_rules(source)

    def example(row: Any) -> Example:
        sample = _with_images(_with_system(convert(row.data), system), table.folder)
        return Example(sample, table.name, row.where, rules)

    lazy = is_lazy(rows)
    examples, failures, first, kinds = [], Counter(), {}, set()
    for row in rows:
        try:
            ex = example(row)
        except RowError as exc:
            failures[str(exc)] += 1
            first.setdefault(str(exc), row.where)
            continue
        kinds |= kinds_of(ex)
        if not lazy:
            examples.append(ex)
    if failures:
        lines = [
            f"{count} row{'s' if count > 1 else ''}: {problem} (first at {first[problem]})"
            for problem, count in failures.most_common()
        ]
        raise DataError(
            f"{table.name}: {sum(failures.values())} of {len(rows)} rows "
            f"cannot be read as {name}:\n  " + "\n  ".join(lines),
            "fix those rows, or set the dataset's type if the format was detected wrongly",
        )
    return name, (Converted(rows, example) if lazy else examples), kinds


def _pick(examples: Sequence[Example], indices: list[int]) -> Sequence[Example]:
    """``examples`` at ``indices``: a list from a list, a view (row numbers only) from a
    lazily read sequence."""
    if is_lazy(examples):
        return Picked(examples, array("q", indices))
    return [examples[i] for i in indices]


def _key(sample: Any) -> str:
    if isinstance(sample, VisionSample):
        return json.dumps([sample.messages, sample.images], sort_keys=True)
    if isinstance(sample, RawText):
        return "raw:" + sample.text
    if isinstance(sample, Document):
        return f"{sample.kind}:{sample.text}"
    if isinstance(sample, TextSample):
        return json.dumps(sample.parts)
    return json.dumps(sample, sort_keys=True)


def load_examples(config: TuneConfig, read_hub: bool = True) -> LoadedData:
    """Read and check every row of every source; no tokenizer or model needed.

    With ``read_hub=False`` hub datasets are skipped (nothing is downloaded).
    """
    notes: list[str] = []
    parts: list[Sequence[Example]] = []
    reports: list[SourceReport] = []
    kinds: set[str] = set()
    for n, source in enumerate(config.datasets):
        tables = expand(
            source.path, source.split, notes, read_hub, source.name, source.data_files, source.query
        )
        for table in tables:
            if not len(table.rows) and not (table.text or "").strip():
                raise DataError(f"{table.name}: the dataset is empty (no rows)", "add examples")
            reduce_preferences(table)
            if table.preference:
                notes.append(f"{table.name}: preference pairs; training on the chosen answers")
            name, converted, found = _convert(table, source, config.default_system_message)
            kinds |= found
            for note in ignored_keys(f"datasets.{n}", source, name, table, "vision" in found):
                if note not in notes:
                    notes.append(note)
            parts.append(converted)
            reports.append(SourceReport(table.name, name, len(table.rows), table.sha256))
    examples: Sequence[Example]
    if any(is_lazy(part) for part in parts):
        examples = Chain(parts)
    else:
        examples = [ex for part in parts for ex in part]
    duplicates = 0
    if config.dataset_exact_deduplication:
        seen: set[bytes] = set()
        kept = []
        for i, ex in enumerate(examples):
            key = _key(ex.sample) + repr(ex.rules)  # the same conversation masked otherwise
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
            if digest not in seen:
                seen.add(digest)
                kept.append(i)
        duplicates, examples = len(examples) - len(kept), _pick(examples, kept)
    if config.shuffle_merged_datasets:
        order = list(range(len(examples)))
        random.Random(config.seed).shuffle(order)  # as shuffling the examples themselves
        examples = _pick(examples, order)
    if config.max_examples:
        examples = examples[: config.max_examples]
    if config.pretraining_dataset:
        notes += check_sources(config)
    return LoadedData(examples, reports, duplicates, notes, kinds)


def split_examples(examples: list[Example], val_set_size: float, seed: int) -> tuple[list, list]:
    """Hold out a share (< 1) or a count (>= 1) for validation, chosen with ``seed``."""
    if not examples:  # only pretraining_dataset, which is never held out
        return [], []
    order = list(range(len(examples)))
    random.Random(seed + 1).shuffle(order)
    n_val = int(val_set_size) if val_set_size >= 1 else int(len(examples) * val_set_size)
    if n_val >= len(examples):
        raise DataError(
            f"val_set_size {val_set_size} leaves no rows to train on ({len(examples)} rows in all)",
            "use a smaller val_set_size",
        )
    held = set(order[:n_val])
    return (
        _pick(examples, [i for i in range(len(examples)) if i not in held]),
        _pick(examples, [i for i in range(len(examples)) if i in held]),
    )


def prepare_data(
    config: TuneConfig, tokenizer: Any, loaded: LoadedData | None = None, processor: Any = None
) -> PreparedData:
    """The whole data step for a run. ``loaded`` reuses :func:`load_examples`; ``processor``
    is a multimodal model's processor, needed for image samples."""
    loaded = loaded or load_examples(config)
    if "conversation" in loaded.kinds or config.chat_template or config.chat_template_jinja:
        _add_notes(loaded, apply_chat_template(tokenizer, config.chat_template,
                                               config.chat_template_jinja))  # fmt: skip
    if "rules" in loaded.kinds:
        _check_end_rules(config, tokenizer)
        _add_notes(loaded, end_of_turn_tokens(tokenizer, config.eot_tokens)[1])
    if not config.dataset_prepared_path:
        return tokenize_all(config, tokenizer, loaded, processor)
    root = Path(config.dataset_prepared_path).expanduser()
    key = cache.cache_key(config, loaded.sources, tokenizer)
    data = cache.load(root, key)
    if data is not None:
        read = [n for n in data.notes if n.startswith("pretraining_dataset: ")]
        data.notes = [
            *loaded.notes,
            *read,
            *truncation_notes(data.stats, config.sequence_len),
            f"reused the prepared dataset in {root / key}",
        ]
        return data
    data = cache.build(root, key, lambda folder: tokenize_all(config, tokenizer, loaded,
                                                              processor, folder))  # fmt: skip
    data.notes.append(f"saved the prepared dataset in {root / key}")
    return data


def _add_notes(loaded: LoadedData, notes: list[str]) -> None:
    loaded.notes += [note for note in notes if note not in loaded.notes]


def _check_end_rules(config: TuneConfig, tokenizer: Any) -> None:
    """As axolotl: when the EOS token is one of the given eot_tokens, train_on_eos and
    train_on_eot must agree, since they would rule on the same token."""
    if not config.eot_tokens or tokenizer.eos_token not in config.eot_tokens:
        return
    for n, source in enumerate(config.datasets):
        eos = source.train_on_eos or "turn"
        eot = source.train_on_eot or eos
        if source.type == "chat_template" and eos != eot:
            raise DataError(
                f"datasets[{n}]: train_on_eos '{eos}' and train_on_eot '{eot}' differ, but the "
                f"EOS token {tokenizer.eos_token} is one of the eot_tokens",
                "give both the same value, or leave the EOS token out of eot_tokens",
            )


def tokenize_all(
    config: TuneConfig, tokenizer: Any, loaded: LoadedData, processor: Any = None,
    folder: Path | None = None,
) -> PreparedData:  # fmt: skip
    """Split and tokenize checked examples; the statistics describe the result. With
    ``folder`` (a prepared-data entry being built) the splits are written there as they
    are made, and read back memory-mapped, unless pretraining text or packing changes them
    afterwards (then :func:`cache.build` writes them)."""
    train_ex, val_ex = split_examples(loaded.examples, config.val_set_size, config.seed)
    direct = folder is not None and not (config.pretraining_dataset or config.sample_packing)
    files = [cache.split_file(folder if direct else None, name) for name in ("train", "eval")]
    train, train_counts = encode(train_ex, tokenizer, config, processor, files[0], loaded.kinds)
    val, val_counts = encode(val_ex, tokenizer, config, processor, files[1], loaded.kinds)
    sources = list(loaded.sources)
    if config.pretraining_dataset:
        read, more = _read_pretraining(config, tokenizer, loaded, train_counts)
        sources += more
        train = train.extended(read)
    if not len(train):
        raise _nothing_left(config, len(train_ex), train_counts)
    counts = train_counts + val_counts
    lengths = train.lengths()
    lengths.sort()
    n_train, n_val = len(train), len(val)
    packing = {}
    if config.sample_packing and "images" in train.columns:
        raise DataError(
            "sample_packing does not work with image samples", "set sample_packing: false"
        )
    rows: tuple[Any, Any] = (train, val)
    if config.sample_packing:
        rows = pack(list(train), config.sequence_len), pack(list(val), config.sequence_len)
        packing = {
            "packed_rows": len(rows[0]),
            "packing_efficiency": round(efficiency(rows[0], config.sequence_len), 4),
            "samples_per_row": round(n_train / len(rows[0]), 2),
        }
    stats = {
        "rows": sum(s.rows for s in sources),
        "duplicates": loaded.duplicates,
        "examples": len(loaded.examples),
        "train_samples": n_train,
        "eval_samples": n_val,
        "truncated": counts["truncated"],
        "truncated_tokens": counts["truncated_tokens"],
        "truncated_over_half": counts["truncated_over_half"],
        "dropped": counts["dropped"],
        "train_tokens": train_counts["tokens"],
        "trained_tokens": train_counts["trained_tokens"],
        "min_length": int(lengths[0]),
        "median_length": int(lengths[len(lengths) // 2]),
        "max_length": int(lengths[-1]),
        "mean_length": round(float(lengths.mean()), 1),
        **packing,
    }
    if config.pretraining_dataset:
        stats["pretraining_chunks"] = train_counts["pretraining_chunks"]
    if config.min_sample_len:
        stats["dropped_short"] = counts["dropped_short"]
    notes = [*loaded.notes, *truncation_notes(stats, config.sequence_len)]
    return PreparedData(rows[0], rows[1], sources, stats, notes)


def _nothing_left(config: TuneConfig, n: int, counts: Counter) -> DataError:
    """The error for a training split that tokenizing left empty, saying why samples went."""
    reasons = {
        "dropped_long": f"longer than sequence_len={config.sequence_len}",
        "dropped_short": f"shorter than min_sample_len={config.min_sample_len}",
        "dropped_untrained": "with no response left after the cut",
    }
    why = ", ".join(f"{counts[k]} {text}" for k, text in reasons.items() if counts[k])
    hints = []
    if counts["dropped_long"] or counts["dropped_untrained"] or not why:
        hints.append(
            "raise sequence_len, use excess_length_strategy: truncate, or shorten the prompts"
        )
    if counts["dropped_short"]:
        hints.append(f"lower min_sample_len ({config.min_sample_len} tokens) or leave it out")
    return DataError(
        f"nothing left to train on: all {n} training samples were dropped"
        + (f" ({why})" if why else ""),
        "; or ".join(hints),
    )


def _read_pretraining(
    config: TuneConfig, tokenizer: Any, loaded: LoadedData, counts: Counter
) -> tuple[list[dict[str, list[int]]], list[SourceReport]]:
    """``pretraining_dataset``'s chunks (their tokens added to ``counts``); the notes say
    how many rows were read. Returns the chunks and the sources, with the rows read."""
    read = read_pretraining(config, tokenizer)
    _add_notes(loaded, read.notes)
    tokens = sum(len(chunk["input_ids"]) for chunk in read.chunks)
    counts.update(tokens=tokens, trained_tokens=tokens - len(read.chunks))
    counts["pretraining_chunks"] += len(read.chunks)
    sources = [SourceReport(name, "pretraining", n, None) for name, n in read.rows.items()]
    return read.chunks, sources


def truncation_notes(stats: dict[str, Any], sequence_len: int) -> list[str]:
    """A loud note when cutting samples to ``sequence_len`` threw most of some away: a
    "1 truncated" count hides a document of millions of tokens trained as its first few."""
    n = stats.get("truncated_over_half", 0)
    if not n:
        return []
    return [
        f"{n} sample{'s' if n > 1 else ''} lost more than half of {'their' if n > 1 else 'its'} "
        f"tokens to sequence_len={sequence_len}: {stats['truncated_tokens']:,} tokens were "
        "thrown away in all. Raise sequence_len, or for long documents (text rows, .txt "
        "files) set the dataset's type: raw (--dataset-format raw), which cuts them into "
        "chunks that are all trained"
    ]
