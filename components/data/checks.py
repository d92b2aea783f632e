"""Per-row checks and routing: a SourceRow becomes records for the splits its source feeds, or rejects.

Order of checks: problem length; a reference answer exists (taken from the solution's last \\boxed{}
when the source has no answer column); the answer is mathematics rather than prose (training sources
only: an evaluation set keeps its own answers as long as math-verify parses them); the answer parses;
held-out routing; then per split, the solution's or trace's own final answer must agree with the
reference (math-verify, time-bounded). Token-length limits are applied later, when templating.

Simplification: a trace with no extractable final answer passes only when its source carries its
own correctness evidence (CHAMP's human annotations, OpenR1's correctness flags).
"""
from __future__ import annotations

import re
from collections import Counter

from components import mathcheck
from components.data.config import ChecksConfig
from components.data.record import Record, Reject, RowError, SourceRow, stable_fraction

# Function names and LaTeX words that may appear in a mathematical answer.
_MATH_WORDS = {
    "sqrt", "frac", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "pi", "infty", "cdot", "times",
    "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "mod", "pmod", "gcd", "lcm", "det", "max", "min",
    "deg", "degree", "degrees", "circ", "text", "mathrm", "mathbf", "left", "right", "begin", "end",
    "pmatrix", "bmatrix", "matrix", "cup", "cap", "emptyset", "ldots", "cdots", "dots",
}
# Short English words that make an answer prose ("No", "yes", "at least 1").
_PROSE = {"no", "yes", "not", "and", "or", "the", "all", "any", "none", "only", "is", "are", "at", "least", "most",
          "true", "false", "there", "if"}


def is_math_answer(answer: str) -> bool:
    s = re.sub(r"\\[A-Za-z]+", " ", answer)
    for w in re.findall(r"[A-Za-z]+", s):
        lw = w.lower()
        if lw in _PROSE or (len(w) >= 4 and lw not in _MATH_WORDS):
            return False
    return True


def answer_parses(answer: str, timeout_s: float, allow_text: bool = False) -> bool:
    """math-verify turns the answer into mathematics. A bare string is its fallback for text it could not
    parse: accepted only for evaluation sets (graded by string match), never for training data."""
    if mathcheck.is_plain_number(answer):
        return True
    parsed = mathcheck.parse_answer(answer, timeout_s=timeout_s)
    return bool(parsed) and (allow_text or any(not isinstance(x, str) for x in parsed))


def _final_for(row_final: str | None, answer: str) -> str:
    if row_final and mathcheck.extract_boxed(row_final) is not None:
        return row_final
    tail = f"The final answer is $\\boxed{{{answer}}}$."
    return f"{row_final}\n\n{tail}" if row_final else tail


def route_row(
    row: SourceRow,
    source: str,
    splits: list[str],
    checks: ChecksConfig,
    holdout_fraction: float,
    eval_set: str | None,
    seed: int,
    counts: Counter,
) -> tuple[list[Record], list[Reject]]:
    """Records for each split this row can feed, and rejects for what fails. `counts` gets
    'skipped_no_<field>:<split>' for rows that simply lack what a split needs."""
    rid = f"{source}/{row.id}"
    eval_only = splits == ["eval"] or "eval" in splits
    t = checks.verify_timeout_s

    def reject(reason: str, detail: str = "", split: str | None = None) -> Reject:
        return Reject(source=source, id=rid, reason=reason, detail=detail, split=split, row=row.problem[:200])

    if len(row.problem) < checks.min_problem_chars:
        return [], [reject("too_short", f"problem has {len(row.problem)} chars")]
    answer = row.answer
    if answer is None:
        answer = mathcheck.extract_boxed(row.solution) or mathcheck.extract_boxed(row.final)
        if answer is None:
            return [], [reject("missing_field", "answer (and no \\boxed{} answer in the solution)")]
    if len(answer) > checks.max_answer_chars:
        return [], [reject("answer_too_long", f"{len(answer)} chars")]
    if checks.require_math_answer and not eval_only and not is_math_answer(answer):
        return [], [reject("non_math_answer", answer[:100])]
    if not answer_parses(answer, t, allow_text=eval_only):
        return [], [reject("unparseable_answer", answer[:100])]

    meta = dict(row.metadata)
    if holdout_fraction > 0 and stable_fraction(rid, seed) < holdout_fraction:
        meta["eval_set"] = eval_set
        return [Record(rid, source, row.problem, None, answer, "eval", meta)], []

    records, rejects = [], []
    for split in splits:
        if split in ("rl", "eval"):
            m = dict(meta)
            if split == "eval":
                m["eval_set"] = source
            records.append(Record(rid, source, row.problem, None, answer, split, m))
        elif split == "sft1":
            if row.solution is None:
                counts[f"skipped_no_solution:{split}"] += 1
                continue
            if len(row.solution) < checks.min_solution_chars:
                rejects.append(reject("too_short", f"solution has {len(row.solution)} chars", split))
                continue
            if checks.verify_solutions and not mathcheck.verify(answer, row.solution, timeout_s=t):
                own = mathcheck.extract_boxed(row.solution)
                rejects.append(reject("answer_mismatch" if own is not None else "no_final_answer",
                                      f"solution says {own!r}, reference {answer!r}", split))
                continue
            records.append(Record(rid, source, row.problem, row.solution, answer, split, dict(meta)))
        elif split == "sft2":
            if row.trace is None:
                counts[f"skipped_no_trace:{split}"] += 1
                continue
            for k, (trace, final) in enumerate([(row.trace, row.final)] + list(row.alt_traces)):
                kid = rid if k == 0 else f"{rid}#{k}"
                if len(trace) < checks.min_solution_chars:
                    rejects.append(Reject(source, kid, "too_short", f"trace has {len(trace)} chars", split))
                    continue
                own_text = final if final and mathcheck.extract_boxed(final) is not None else trace
                has_own = mathcheck.extract_boxed(own_text) is not None
                if checks.verify_solutions and (has_own or not row.trace_verified_by):
                    if not mathcheck.verify(answer, own_text, timeout_s=t):
                        rejects.append(Reject(source, kid, "answer_mismatch" if has_own else "no_final_answer",
                                              f"trace says {mathcheck.extract_boxed(own_text)!r}, reference {answer!r}",
                                              split, row=row.problem[:200]))
                        continue
                m = dict(meta, final=_final_for(final, answer))
                if not has_own and row.trace_verified_by:
                    m["verified_by"] = row.trace_verified_by
                records.append(Record(kid, source, row.problem, trace, answer, split, m))
    return records, rejects


def row_error_reject(source: str, index: int, raw_preview: str, e: RowError) -> Reject:
    return Reject(source=source, id=f"{source}/#{index}", reason=e.reason, detail=e.detail, row=raw_preview)
