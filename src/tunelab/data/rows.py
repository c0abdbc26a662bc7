"""Token rows kept as Arrow columns: compact in memory, memory-mapped when read from disk.

A prepared dataset of a hundred thousand samples holds tens of millions of token ids; as
Python lists of ints that is gigabytes, as Arrow ``int32`` columns a tenth of it, and a
dataset saved on disk is read by mapping its files, not by loading them. :class:`Rows` is
the sequence of samples the rest of tunelab reads (``rows[0]["input_ids"]``, ``len``,
iteration); ``rows.dataset`` is the ``datasets.Dataset`` the trainer gets without a copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

BATCH = 1000  # rows per Arrow record batch read when iterating


def schema(images: bool = False) -> Any:
    """The columns of token rows (``images``: image samples' file paths as well)."""
    import pyarrow as pa

    fields = [
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("attention_mask", pa.list_(pa.int8())),
        pa.field("labels", pa.list_(pa.int32())),
    ]
    if images:
        fields.append(pa.field("images", pa.list_(pa.string())))
    return pa.schema(fields)


def to_table(items: list[dict[str, Any]], images: bool = False) -> Any:
    """Rows as dicts -> one Arrow table (``images``: every row has an ``images`` list)."""
    import pyarrow as pa

    names = schema(images).names
    columns = {name: [item[name] for item in items] for name in names}
    return pa.table(columns, schema=schema(images))


class Rows(Sequence):
    """Samples as a read-only sequence of dicts over a ``datasets.Dataset``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    @classmethod
    def from_tables(cls, tables: Iterable[Any], images: bool = False) -> Rows:
        import pyarrow as pa
        from datasets import Dataset

        tables = list(tables)
        table = pa.concat_tables(tables) if tables else schema(images).empty_table()
        return cls(Dataset(table))

    @classmethod
    def from_file(cls, path: Path) -> Rows:
        """An Arrow stream file written by :class:`RowWriter`, memory-mapped."""
        from datasets import Dataset

        return cls(Dataset.from_file(str(path)))

    @classmethod
    def load(cls, folder: Path) -> Rows:
        """A dataset saved with ``save_to_disk``, memory-mapped."""
        from datasets import load_from_disk

        return cls(load_from_disk(str(folder)))

    @property
    def columns(self) -> list[str]:
        return list(self.dataset.column_names)

    def __len__(self) -> int:
        return self.dataset.num_rows

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(self._rows(self.dataset.select(range(*index.indices(len(self))))))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.dataset[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._rows(self.dataset)

    @staticmethod
    def _rows(dataset: Any) -> Iterator[dict[str, Any]]:
        for batch in dataset.with_format("arrow").iter(batch_size=BATCH):
            yield from batch.to_pylist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (Rows, list)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # compared by content, like a list

    def lengths(self) -> Any:
        """Tokens per row, as a numpy array (read from the offsets, no ids decoded)."""
        import numpy as np
        import pyarrow.compute as pc

        column = self.dataset.data.column("input_ids")
        if self.dataset._indices is not None:  # a selection: read through it
            return np.array([len(ids) for ids in self.dataset["input_ids"]], dtype=np.int64)
        return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)

    def extended(self, items: list[dict[str, Any]]) -> Rows:
        """These rows followed by ``items`` (dicts with the same columns)."""
        if not items:
            return self
        from datasets import Dataset, concatenate_datasets

        more = Dataset(to_table(items, "images" in self.columns))
        return Rows(concatenate_datasets([self.dataset, more]))

    def batches(self) -> Iterator[Any]:
        """The rows as Arrow tables of up to ``BATCH`` rows."""
        yield from self.dataset.with_format("arrow").iter(batch_size=BATCH)


def write(path: Path, rows: Rows | list[dict[str, Any]]) -> Rows:
    """``rows`` (token rows, or packed rows of several samples each) written to an Arrow
    stream file at ``path``, and read back from it memory-mapped."""
    import pyarrow as pa

    if isinstance(rows, Rows):
        tables: Iterable[Any] = rows.batches()
        columns = rows.dataset.features.arrow_schema
    else:
        table = pa.Table.from_pylist(rows) if rows else schema().empty_table()
        tables, columns = [table], table.schema
    writer = RowWriter(path, columns=columns)
    try:
        for table in tables:
            writer.write(table)
    finally:
        writer.close()
    return Rows.from_file(path)


class RowWriter:
    """Arrow record batches appended to a stream file, as ``datasets`` writes its own."""

    def __init__(self, path: Path, images: bool = False, columns: Any = None) -> None:
        import pyarrow as pa

        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, columns or schema(images))

    def write(self, table: Any) -> None:
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()
        self._sink.close()
