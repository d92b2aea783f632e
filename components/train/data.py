"""Packed training rows from the curate stage (Parquet shards with input_ids, position_ids, doc_ids, loss_mask,
each a list of seq_len values) and the order they are visited in.

The order is a pure function of (seed, step): epoch e visits a permutation seeded by (seed, e), and step s takes
the global rows [s * B, (s + 1) * B) of the concatenated epochs. So the data position of a checkpoint is just its
step, resuming needs no iterator state, and every worker computes the same global batch and takes its own slice.
Simplification: the shards are read into memory as int32 arrays (fine up to a few GB of tokens)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from components.errors import M1Error

COLUMNS = ("input_ids", "position_ids", "doc_ids", "loss_mask")


class PackedRows:
    def __init__(self, directory: str | Path):
        d = Path(directory)
        files = sorted(d.glob("*.parquet")) if d.is_dir() else []
        if not files:
            raise M1Error(f"no packed Parquet shards in {d} (run the curate stage first)")
        cols = {c: [] for c in COLUMNS}
        for f in files:
            t = pq.read_table(f, columns=list(COLUMNS))
            for c in COLUMNS:
                cols[c].append(np.asarray(t.column(c).to_pylist(), dtype=np.int32))
        self.arrays = {c: np.concatenate(v) for c, v in cols.items()}
        self.n, self.seq_len = self.arrays["input_ids"].shape
        self.files = [str(f) for f in files]

    def __len__(self) -> int:
        return self.n

    def batch(self, rows: list[int] | np.ndarray, device="cpu") -> dict[str, torch.Tensor]:
        idx = np.asarray(rows, dtype=np.int64)
        return {c: torch.from_numpy(self.arrays[c][idx].astype(np.int64)).to(device) for c in COLUMNS}

    def target_tokens(self, rows) -> int:
        """How many next-token predictions of these rows carry loss (see losses.target_mask)."""
        idx = np.asarray(rows, dtype=np.int64)
        lm, doc = self.arrays["loss_mask"][idx], self.arrays["doc_ids"][idx]
        m = (lm[:, 1:] > 0) & (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0)
        return int(m.sum())


def rows_for_step(step: int, batch_size: int, n_rows: int, seed: int) -> np.ndarray:
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_rows)
        perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
        take = min(batch_size - len(out), n_rows - offset)
        out.extend(perm[offset:offset + take].tolist())
    return np.asarray(out, dtype=np.int64)
