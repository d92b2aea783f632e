"""Scoring completions against reference answers (definitions in components/evaluate/metrics.py).

Each distinct answer of a problem is verified once (cached by its normalised text), and equivalence checks between
answers go through components.mathcheck, time-bounded; a timeout counts as "not equivalent" / "wrong". An answer
that is still an expression where the reference is a number (\\boxed{34+44} for 78, mathcheck.is_final_value) is
wrong and abstains from majority votes: math-verify would evaluate it, a grader would not.

The answer is the last \\boxed{} where the GRPO reward (boxed_after_think) reads it, mathcheck.answer_region: in a
thinking completion only after its last </think> (a box inside the thinking, closed or not, is no answer); in a
completion without think tags (a teacher that does not think) anywhere. answer_in_think=True reads any box.
"""
from __future__ import annotations

from collections.abc import Sequence

from components.evaluate.benchmarks import Problem
from components.evaluate.metrics import ProblemScore, group_answers
from components.evaluate.sampling import Completion
from components.mathcheck import (
    answer_region,
    answers_equivalent,
    extract_boxed,
    is_final_value,
    normalize_answer_text,
    verify,
)


def score_problem(problem: Problem, completions: Sequence[Completion], timeout_s: float = 5.0,
                  answer_in_think: bool = False) -> ProblemScore:
    answers = [extract_boxed(answer_region(c.text, answer_in_think)) for c in completions]
    answers = [a if a is not None and a.strip() else None for a in answers]
    votes = [a if a is not None and is_final_value(problem.answer, a) else None for a in answers]
    verdict: dict[str, bool] = {}

    def is_correct(a: str | None) -> bool:
        if a is None:
            return False
        key = normalize_answer_text(a)
        if key not in verdict:
            verdict[key] = bool(verify(problem.answer, a, timeout_s=timeout_s))
        return verdict[key]

    labels, reps = group_answers(votes, lambda x, y: answers_equivalent(x, y, timeout_s=timeout_s))
    return ProblemScore(
        benchmark=problem.benchmark, id=problem.id, source=problem.source, reference=problem.answer,
        answers=answers, correct=[is_correct(a) for a in votes], n_tokens=[c.n_tokens for c in completions],
        finished=[c.finish_reason != "length" for c in completions], labels=labels,
        group_correct=[is_correct(r) for r in reps])
