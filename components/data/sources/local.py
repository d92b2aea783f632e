"""Local JSONL / CSV / Parquet files, read with our own streaming readers (not `datasets`) so that one
undecodable or malformed line becomes one reject instead of failing the whole file."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq

from components.data.record import SourceRow
from components.data.sources.base import (
    Adapter,
    error_row,
    first_line,
    map_fields,
    raise_if_error,
)
from components.errors import M1Error

# pandas is imported where a CSV is read (_csv_rows): only CSV sources need it, and it costs a second of start-up.


def _jsonl_rows(path: str) -> Iterator[Any]:
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield error_row("invalid_utf8", f"{os.path.basename(path)}:{lineno}: {e.reason} at byte {e.start}",
                                line[:200].decode("utf-8", "replace"))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield error_row("malformed_json", f"{os.path.basename(path)}:{lineno}: {e.msg}", text[:200])
                continue
            yield obj if isinstance(obj, dict) else error_row("wrong_type", f"line {lineno} is not an object", obj)


def _parquet_rows(path: str) -> Iterator[Any]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _csv_rows(path: str) -> Iterator[Any]:
    import pandas as pd

    bad: list[list[str]] = []

    def on_bad(fields):
        bad.append(fields)

    reader = pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=1024, engine="python",
                         encoding="utf-8", encoding_errors="surrogateescape", on_bad_lines=on_bad)
    for chunk in reader:
        while bad:
            yield error_row("malformed_csv", "wrong number of fields", bad.pop(0))
        for row in chunk.to_dict("records"):
            yield {k: (v if v != "" else None) for k, v in row.items()}
    while bad:
        yield error_row("malformed_csv", "wrong number of fields", bad.pop(0))


class LocalAdapter(Adapter):
    def files(self) -> list[str]:
        files = sorted(glob.glob(self.spec.path)) if any(c in self.spec.path for c in "*?[") else [self.spec.path]
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise M1Error(f"source {self.spec.name}: no file at {self.spec.path}")
        return files

    def raw_rows(self) -> Iterator[Any]:
        readers = {"jsonl": _jsonl_rows, "parquet": _parquet_rows, "csv": _csv_rows}
        files = self.files()

        def rows():
            for f in files:
                fmt = self.spec.format or {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
                                           ".csv": "csv"}.get(os.path.splitext(f)[1].lower())
                if fmt is None:
                    raise M1Error(f"source {self.spec.name}: cannot tell the format of {f}; set `format`")
                try:
                    yield from readers[fmt](f)
                except M1Error:
                    raise
                except Exception as e:
                    raise M1Error(f"source {self.spec.name} ({f}) cannot be read: {first_line(e)}") from None

        yield from self.capped(rows())

    def to_row(self, raw: Any, index: int) -> SourceRow:
        raise_if_error(raw)
        return map_fields(raw, index, self.spec.fields)


# ----------------------------------------------------------------------------- CHAMP


