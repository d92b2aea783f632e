"""Exact deduplication (hash of normalised text) and near-duplicate removal (MinHash LSH, datasketch).

Keys are computed where the rows are checked (worker processes); the indexes live in the main process,
one per split, and the first record seen wins.

Simplification: both indexes are in memory. The exact index costs 16 bytes per record; the LSH index
roughly num_perm x 8 bytes per record (about 1 GB for a million records at num_perm=128), so for
much larger sources lower num_perm or switch datasketch to a Redis/Cassandra storage backend.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np
from datasketch import MinHash, MinHashLSH

from components.data.config import DedupConfig

_WORD_RE = re.compile(r"\w+", re.UNICODE)
SCHEME = "affine32"  # signatures cross process boundaries, so the permutation scheme is pinned


def normalise(text: str) -> str:
    return " ".join(_WORD_RE.findall(text.lower()))


def dedup_text(problem: str, solution: str | None, key: str) -> str:
    return problem if key == "problem" or not solution else f"{problem}\n{solution}"


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=16).digest()


def shingles(text: str, k: int) -> set[bytes]:
    words = normalise(text).split()
    if len(words) <= k:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + k]).encode("utf-8") for i in range(len(words) - k + 1)}


_PERMUTATIONS: dict[int, object] = {}


def _minhash(num_perm: int, hashvalues=None):
    """A MinHash with permutations generated once per process (generating them dominates the cost)."""
    perm = _PERMUTATIONS.get(num_perm)
    if perm is None:
        perm = _PERMUTATIONS[num_perm] = MinHash(num_perm=num_perm, seed=1, scheme=SCHEME).permutations
    return MinHash(num_perm=num_perm, hashvalues=hashvalues, permutations=perm, scheme=SCHEME)


def minhash_values(text: str, cfg: DedupConfig) -> np.ndarray:
    m = _minhash(cfg.num_perm)
    m.update_batch(list(shingles(text, cfg.shingle_words)))
    return m.hashvalues


class Deduper:
    """Per-split exact and near-duplicate filter; `check` answers None (keep) or the reason to drop."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.seen: dict[str, set[bytes]] = {}
        self.lsh: dict[str, object] = {}

    def _lsh(self, split: str):
        if split not in self.lsh:
            self.lsh[split] = MinHashLSH(threshold=self.cfg.threshold, num_perm=self.cfg.num_perm)
        return self.lsh[split]

    def check(self, split: str, rec_id: str, key: bytes | None, hashvalues: np.ndarray | None) -> str | None:
        if self.cfg.exact and key is not None:
            seen = self.seen.setdefault(split, set())
            if key in seen:
                return "exact_duplicate"
            seen.add(key)
        if self.cfg.near and hashvalues is not None:
            m = _minhash(self.cfg.num_perm, hashvalues)
            lsh = self._lsh(split)
            if lsh.query(m):
                return "near_duplicate"
            lsh.insert(rec_id, m, check_duplication=False)
        return None
