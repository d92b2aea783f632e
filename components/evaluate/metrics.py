"""Accuracy metrics over n sampled completions per problem.

Definitions (problem i has n_i samples, c_i of them correct; P problems):

* answer of a completion: the content of its last \\boxed{...}; a completion without one has no answer, is wrong,
  and abstains from votes. A sample is correct when math-verify finds its answer equivalent to the reference.
* pass@1 = (1/P) * sum_i c_i / n_i, with standard error SE = stdev_i(c_i / n_i) / sqrt(P) (sample standard
  deviation, ddof = 1; SE = 0 for a single problem).
* pass@k (unbiased, Chen et al. 2021) = (1/P) * sum_i [1 - C(n_i - c_i, k) / C(n_i, k)], computed as
  1 - prod_{j = n-c+1..n} (1 - k/j), which equals the binomial ratio without overflow; 1 when n - c < k.
* maj@k: among the first k samples (in sample order) the answers are grouped by math-verify equivalence; the
  largest group wins; a tie between groups of equal size goes to the group whose earliest member comes first in
  sample order; samples without an answer abstain; with no answer at all maj@k is wrong. maj@k is correct when
  the winning group's representative answer (its earliest member) verifies against the reference.

Grouping is done once per problem over all n samples, greedily in sample order: an answer joins the first
existing group whose representative it is equivalent to, else opens a new group. Because greedy grouping never
revisits earlier samples, the groups restricted to the first k samples are exactly those that grouping only the
first k samples would give, so one grouping serves every k (and the time-budget sweep).

Simplification: math-verify equivalence need not be transitive; comparing with a group's representative only
(not with every member) is what makes the grouping well defined and order-stable.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from components.mathcheck import normalize_answer_text


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for j in range(n - c + 1, n + 1):
        prod *= 1.0 - k / j
    return 1.0 - prod


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std, ddof=1; 0 for fewer than two values)."""
    p = len(values)
    if p == 0:
        return float("nan"), float("nan")
    mean = sum(values) / p
    if p < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (p - 1)
    return mean, math.sqrt(var / p)


def group_answers(answers: Sequence[str | None], equivalent: Callable[[str, str], bool]) -> tuple[list[int | None], list[str]]:
    """Group labels per sample (None = no answer) and each group's representative answer, greedily in order."""
    reps: list[str] = []
    rep_norm: list[str] = []
    labels: list[int | None] = []
    for a in answers:
        if a is None or not a.strip():
            labels.append(None)
            continue
        norm = normalize_answer_text(a)
        label = None
        # Identical normalised text needs no math-verify call (the common case for a confident model).
        for g, rn in enumerate(rep_norm):
            if rn == norm:
                label = g
                break
        if label is None:
            for g, rep in enumerate(reps):
                if equivalent(rep, a):
                    label = g
                    break
        if label is None:
            label = len(reps)
            reps.append(a)
            rep_norm.append(norm)
        labels.append(label)
    return labels, reps


def majority_group(labels: Sequence[int | None], k: int) -> int | None:
    """Winning group among the first k labels: most votes; ties -> the group seen first; None if all abstain."""
    counts: dict[int, int] = {}
    first: dict[int, int] = {}
    for i, g in enumerate(labels[:k]):
        if g is None:
            continue
        counts[g] = counts.get(g, 0) + 1
        first.setdefault(g, i)
    if not counts:
        return None
    return min(counts, key=lambda g: (-counts[g], first[g]))


@dataclass
class ProblemScore:
    """Everything the metrics need about one problem's samples."""
    benchmark: str
    id: str
    source: str
    reference: str
    answers: list[str | None]  # extracted answer per sample
    correct: list[bool]  # per sample
    n_tokens: list[int]  # generated tokens per sample
    finished: list[bool]  # stopped on EOS / stop string (not cut off at max_new_tokens)
    labels: list[int | None] = field(default_factory=list)  # answer group per sample
    group_correct: list[bool] = field(default_factory=list)  # per group: representative verifies

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def c(self) -> int:
        return sum(self.correct)

    def maj_at(self, k: int) -> bool:
        g = majority_group(self.labels, k)
        return g is not None and self.group_correct[g]


def aggregate(problems: Sequence[ProblemScore], ks: Sequence[int]) -> dict[str, float]:
    """Metrics of a set of problems (flat keys: pass_at_1, pass_at_1_se, pass_at_k, maj_at_k, ...).
    Keys of a k larger than some problem's sample count are left out."""
    if not problems:
        return {"problems": 0.0}
    per_problem = [p.c / p.n for p in problems]
    p1, se = mean_and_se(per_problem)
    out = {"problems": float(len(problems)), "samples": float(sum(p.n for p in problems)),
           "pass_at_1": p1, "pass_at_1_se": se}
    n_min = min(p.n for p in problems)
    for k in ks:
        if k > n_min:
            continue
        out[f"pass_at_{k}"] = sum(pass_at_k(p.n, p.c, k) for p in problems) / len(problems)
        out[f"maj_at_{k}"] = sum(p.maj_at(k) for p in problems) / len(problems)
    total = sum(p.n for p in problems)
    out["no_answer_rate"] = sum(a is None for p in problems for a in p.answers) / total
    out["truncated_rate"] = sum(not f for p in problems for f in p.finished) / total
    out["mean_tokens"] = sum(t for p in problems for t in p.n_tokens) / total
    return out
