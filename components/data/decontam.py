"""Decontamination: word n-gram overlap between training text and evaluation problems.

Every evaluation problem is indexed by its word n-grams (lower-cased alphanumeric words). A training
record is contaminated by an evaluation item when the record's text contains at least `min_overlap`
of that item's informative n-grams; the match names the item and the overlap so the report can show it.

An n-gram found in more than `boilerplate_df` different evaluation problems is phrasing shared by many
problems ("what is the value of", a generator's template text), not evidence that one specific problem
leaked, so it does not count (an item made only of such n-grams keeps all of its own). Without this,
two instances of one template that differ only in their numbers would count as contamination.

Simplification: an evaluation problem shorter than n words is indexed as one shorter n-gram (its
whole word sequence); problems of fewer than 3 words are not indexed at all, as they would match
almost anything.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_WORD_RE = re.compile(r"[a-z0-9]+")
MIN_EVAL_WORDS = 3


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def ngrams(ws: list[str], n: int) -> set[int]:
    if len(ws) < n:
        return {hash(tuple(ws))} if ws else set()
    return {hash(tuple(ws[i : i + n])) for i in range(len(ws) - n + 1)}


@dataclass
class EvalItem:
    eval_set: str
    id: str
    problem: str
    n_grams: int
    short_len: int  # word count when shorter than n (matched as one shorter n-gram), else 0


@dataclass
class Match:
    item: EvalItem
    overlap: float


class EvalIndex:
    def __init__(self, n: int, min_overlap: float, boilerplate_df: int = 3):
        self.n = n
        self.min_overlap = min_overlap
        self.boilerplate_df = boilerplate_df
        self.items: list[EvalItem] = []
        self.index: dict[int, list[int]] = {}
        self.short_lengths: set[int] = set()
        self._final = False

    def add(self, eval_set: str, item_id: str, problem: str) -> None:
        ws = words(problem)
        if len(ws) < MIN_EVAL_WORDS:
            return
        grams = ngrams(ws, self.n)
        short = len(ws) if len(ws) < self.n else 0
        if short:
            self.short_lengths.add(short)
        idx = len(self.items)
        self.items.append(EvalItem(eval_set, item_id, problem, len(grams), short))
        for g in grams:
            self.index.setdefault(g, []).append(idx)

    def __len__(self) -> int:
        return len(self.items)

    def finalize(self) -> None:
        """Drop boilerplate n-grams (call once all evaluation sets are added)."""
        boiler = {g for g, idxs in self.index.items() if len(idxs) > self.boilerplate_df}
        informative = Counter(i for g, idxs in self.index.items() if g not in boiler for i in idxs)
        for i, item in enumerate(self.items):
            if informative[i] == 0:
                continue  # all of its n-grams are common: keep them all for this item
            item.n_grams = informative[i]
        keep_all = {i for i in range(len(self.items)) if informative[i] == 0}
        for g in boiler:
            kept = [i for i in self.index[g] if i in keep_all]
            if kept:
                self.index[g] = kept
            else:
                del self.index[g]
        self._final = True

    def matches(self, text: str) -> list[Match]:
        """Evaluation items this text is contaminated by, best overlap first."""
        if not self.items:
            return []
        if not self._final:
            self.finalize()
        ws = words(text)
        grams = ngrams(ws, self.n)
        for k in self.short_lengths:
            grams |= ngrams(ws, k) if len(ws) >= k else set()
        hits: Counter = Counter()
        for g in grams:
            for idx in self.index.get(g, ()):
                hits[idx] += 1
        out = []
        for idx, c in hits.items():
            item = self.items[idx]
            overlap = c / item.n_grams
            if overlap >= self.min_overlap:
                out.append(Match(item, round(min(overlap, 1.0), 4)))
        out.sort(key=lambda m: -m.overlap)
        return out
