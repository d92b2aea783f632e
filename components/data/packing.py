"""Packing tokenised documents into fixed-length rows that keep document boundaries, and the Parquet
shard writer.

Row schema (one row = one training sequence of exactly seq_len tokens):
  input_ids     list<int32>  documents back to back, then tokenizer.pad_token_id
  position_ids  list<int32>  0,1,2,... restarting at every document; 0 on padding
  doc_ids       list<int32>  index of the document within the row (0,1,2,...); -1 on padding
  loss_mask     list<int8>   1 on assistant-response tokens (incl. the end-of-turn token), else 0

Packing is first-fit over a window of open rows: a document goes into the first open row with room,
else a new row is opened; when the window is full the fullest open row is written out. Memory is
bounded by the window, whatever the number of documents.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

PACKED_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("doc_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.int8())),
    ]
)


@dataclass
class _Bin:
    used: int = 0
    docs: list[tuple[list[int], list[int]]] = field(default_factory=list)


class Packer:
    def __init__(self, seq_len: int, pad_id: int, window: int, emit):
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.window = window
        self.emit = emit  # called with one row dict per finished sequence
        self.bins: list[_Bin] = []

    def add(self, ids: list[int], mask: list[int]) -> None:
        n = len(ids)
        if n == 0 or n > self.seq_len:
            raise ValueError(f"document of {n} tokens cannot be packed into {self.seq_len}")
        for b in self.bins:
            if self.seq_len - b.used >= n:
                b.docs.append((ids, mask))
                b.used += n
                if b.used == self.seq_len:
                    self.bins.remove(b)
                    self._emit(b)
                return
        if len(self.bins) >= self.window:
            fullest = max(self.bins, key=lambda x: x.used)
            self.bins.remove(fullest)
            self._emit(fullest)
        self.bins.append(_Bin(n, [(ids, mask)]))

    def flush(self) -> None:
        for b in self.bins:
            self._emit(b)
        self.bins = []

    def _emit(self, b: _Bin) -> None:
        ids, pos, docs, mask = [], [], [], []
        for d, (x, m) in enumerate(b.docs):
            ids += x
            pos += range(len(x))
            docs += [d] * len(x)
            mask += m
        pad = self.seq_len - len(ids)
        self.emit({
            "input_ids": ids + [self.pad_id] * pad,
            "position_ids": pos + [0] * pad,
            "doc_ids": docs + [-1] * pad,
            "loss_mask": mask + [0] * pad,
        })


def real_tokens(row: dict) -> int:
    return sum(1 for d in row["doc_ids"] if d >= 0)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Buffers rows and writes part-00000.parquet, part-00001.parquet, ... of rows_per_shard rows each."""

    def __init__(self, out_dir: str, schema: pa.Schema, rows_per_shard: int, count_tokens=None):
        self.out_dir = out_dir
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.count_tokens = count_tokens  # row -> number of real (non-padding) tokens
        self.buf: list[dict] = []
        self.files: list[dict] = []
        os.makedirs(out_dir, exist_ok=True)

    def write(self, row: dict) -> None:
        self.buf.append(row)
        if len(self.buf) >= self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self.buf:
            return
        name = f"part-{len(self.files):05d}.parquet"
        path = os.path.join(self.out_dir, name)
        table = pa.Table.from_pylist(self.buf, schema=self.schema)
        pq.write_table(table, path, compression="zstd")
        info = {"file": name, "rows": len(self.buf), "sha256": sha256_file(path)}
        if self.count_tokens:
            info["tokens"] = sum(self.count_tokens(r) for r in self.buf)
        self.files.append(info)
        self.buf = []

    def close(self) -> list[dict]:
        self._flush()
        return self.files
