"""Precomputed top-k teacher log-probabilities for distillation (`teacher_topk: k` in a training section).

Instead of running the frozen teacher beside the student at every step, the teacher's k most likely tokens and
their log-probabilities are computed once per packed row and stored; training then needs no teacher in memory
(the held-out measurement still loads it, so reported KL stays exact), and runs that revisit the same rows (a
changed learning rate, a resumed or repeated distillation) reuse the store.

Simplification: the teacher distribution is rebuilt as its exact top-k log-probabilities plus the remaining
mass spread uniformly over the other V - k tokens. Every KL kind is then computed against that dense
distribution; with k = V it is the exact teacher. A temperature other than 1 divides these rebuilt
log-probabilities, not the teacher's logits, so the tail stays flat: an approximation of the alongside teacher.

Store layout (one directory per teacher + packed data + k, written atomically): meta.json, row_ids.npy (which
packed rows are stored, ascending), values.npy float32 and indices.npy int32, each (rows, seq_len, k)."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from components.errors import M1Error
from components.train.teacher_engine import load_teacher_engine


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., V) logits -> the k largest log-probabilities (fp32) and their token ids (int32)."""
    vals, idx = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)
    return vals, idx.to(torch.int32)


def dense_logprobs(values: torch.Tensor, indices: torch.Tensor, vocab: int) -> torch.Tensor:
    """(..., k) top-k log-probs and ids -> (..., V) log-probs: the top-k exact, the rest of the mass uniform."""
    k = values.shape[-1]
    values = values.float()
    if k >= vocab:
        return torch.full((*values.shape[:-1], vocab), -math.inf, device=values.device).scatter(
            -1, indices.long(), values)
    # log(1 - sum p_topk), computed stably; clamped so an (almost) one-hot teacher keeps a finite tail
    top_mass = torch.logsumexp(values, -1, keepdim=True).clamp(max=0.0)
    tail = torch.log((-torch.expm1(top_mass)).clamp(min=1e-12)) - math.log(vocab - k)
    out = tail.expand(*values.shape[:-1], vocab).clone()
    return out.scatter_(-1, indices.long(), values)


def store_key(teacher_source: str, data_dir: Path, k: int) -> str:
    manifest = Path(data_dir).parent / "manifest.json"
    h = hashlib.sha256(json.dumps({"teacher": teacher_source, "k": k, "split": Path(data_dir).name}).encode())
    h.update(manifest.read_bytes() if manifest.is_file() else str(Path(data_dir).resolve()).encode())
    return h.hexdigest()[:16]


class TopkStore:
    """Read side: look up the stored top-k of packed rows; a row that was not precomputed is an error."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        if not (d / "meta.json").is_file():
            raise M1Error(f"no precomputed teacher top-k in {d} (meta.json missing)")
        self.dir, self.meta = d, json.loads((d / "meta.json").read_text())
        self.row_ids = np.load(d / "row_ids.npy")
        self.values = np.load(d / "values.npy", mmap_mode="r")
        self.indices = np.load(d / "indices.npy", mmap_mode="r")
        self.k, self.vocab, self.seq_len = self.meta["k"], self.meta["vocab"], self.meta["seq_len"]

    def positions(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.searchsorted(self.row_ids, rows)
        ok = (pos < len(self.row_ids)) & (self.row_ids[np.minimum(pos, len(self.row_ids) - 1)] == rows)
        if not ok.all():
            raise M1Error(f"teacher top-k store {self.dir} lacks packed rows {rows[~ok][:5].tolist()}")
        return pos

    def dense(self, rows, device) -> torch.Tensor:
        """(len(rows), seq_len, vocab) teacher log-probs, usable wherever teacher logits are."""
        pos = self.positions(rows)
        v = torch.from_numpy(np.ascontiguousarray(self.values[pos])).to(device)
        i = torch.from_numpy(np.ascontiguousarray(self.indices[pos])).to(device)
        return dense_logprobs(v, i, self.vocab)


@torch.no_grad()
def precompute(teacher_source: str, data, data_dir: Path, rows, k: int, store_dir: Path, device,
               dtype=torch.float32, batch_size: int = 4, teacher=None) -> dict:
    """Make sure store_dir holds the top-k of every row in `rows` (adding only the missing ones). Returns
    {"rows": stored rows, "computed": rows computed now}. `data` is the PackedRows of data_dir."""

    store_dir = Path(store_dir)
    want = np.unique(np.asarray(rows, dtype=np.int64))
    old = TopkStore(store_dir) if (store_dir / "meta.json").is_file() else None
    if old is not None and (old.k != k or old.seq_len != data.seq_len or old.meta.get("teacher") != teacher_source):
        raise M1Error(f"teacher top-k store {store_dir} was made for k={old.k}, seq_len={old.seq_len}, "
                      f"teacher {old.meta.get('teacher')}; expected k={k}, seq_len={data.seq_len}, {teacher_source}")
    have = old.row_ids if old is not None else np.zeros(0, dtype=np.int64)
    missing = np.setdiff1d(want, have)
    if len(missing) == 0:
        return {"rows": len(have), "computed": 0}
    teacher = teacher if teacher is not None else load_teacher_engine(teacher_source, device, dtype)
    vocab = teacher.config.vocab_size
    if k > vocab:
        raise M1Error(f"teacher_topk {k} exceeds the teacher's vocabulary ({vocab})")
    new_v = np.zeros((len(missing), data.seq_len, k), dtype=np.float32)
    new_i = np.zeros((len(missing), data.seq_len, k), dtype=np.int32)
    for s in tqdm(range(0, len(missing), batch_size), desc=f"teacher top-{k}", unit="batch", leave=False):
        b = data.batch(missing[s:s + batch_size], device)
        logits = teacher(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
        v, i = topk_logprobs(logits, k)
        new_v[s:s + len(v)], new_i[s:s + len(v)] = v.cpu().numpy(), i.cpu().numpy()
    ids = np.concatenate([have, missing])
    order = np.argsort(ids, kind="stable")
    values = np.concatenate([np.asarray(old.values), new_v]) if old is not None else new_v
    indices = np.concatenate([np.asarray(old.indices), new_i]) if old is not None else new_i
    tmp = store_dir.with_name(store_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "row_ids.npy", ids[order])
    np.save(tmp / "values.npy", values[order])
    np.save(tmp / "indices.npy", indices[order])
    (tmp / "meta.json").write_text(json.dumps({"teacher": teacher_source, "k": k, "vocab": vocab,
                                               "seq_len": data.seq_len, "data_dir": str(data_dir),
                                               "rows": len(ids)}, indent=2))
    del old  # release the memory maps before the directory is replaced
    shutil.rmtree(store_dir, ignore_errors=True)
    tmp.rename(store_dir)
    return {"rows": len(ids), "computed": len(missing)}
