"""CHAMP (PyPI champ-dataset): competition problems with step solutions (SFT-1) and human-verified model
solutions (SFT-2 traces); its answers are rewritten into LaTeX that math-verify parses."""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from components.data.record import SourceRow, answer_text, check_text
from components.data.sources.base import Adapter, first_line, raise_if_error
from components.errors import M1Error

# champ_dataset is imported where the source is read (raw_rows): a missing or broken package fails this source alone,
# by name.

_SQRT_RE = re.compile(r"(?<!\\)sqrt\(")
_CHAMP_PATTERNS = [
    (re.compile(r"^(.+?),? or equivalently (.+)$", re.IGNORECASE), 2),  # "C(10, 5), or equivalently 252"
    (re.compile(r"^(.+?),? or approximately .+$", re.IGNORECASE), 1),  # "5/14, or approximately 35.7%"
    (re.compile(r"^(.+?) is the only possible value$", re.IGNORECASE), 1),
    (re.compile(r"^the limit exists and is equal to (.+)$", re.IGNORECASE), 1),
    (re.compile(r"^the only possible value for the limit is (.+)$", re.IGNORECASE), 1),
    (re.compile(r"^(-?\d+) [a-z]+$", re.IGNORECASE), 1),  # "98 values", "0 pairs"
]


def _latex_sqrt(s: str) -> str:
    """sqrt(x) -> \\sqrt{x}, parentheses matched."""
    out, i = "", 0
    for m in _SQRT_RE.finditer(s):
        if m.start() < i:
            continue
        depth, j = 1, m.end()
        while j < len(s) and depth:
            depth += {"(": 1, ")": -1}.get(s[j], 0)
            j += 1
        if depth:
            return s
        out += s[i:m.start()] + "\\sqrt{" + _latex_sqrt(s[m.end():j - 1]) + "}"
        i = j
    return out + s[i:]


def champ_answer(answer: str) -> str:
    """CHAMP writes answers as plain text ("0 is the only possible value", "sqrt(3)", "1 and 3"); keep the
    mathematical part so it can be checked. What stays prose is rejected later as non_math_answer."""
    a = re.sub(r"\s*\((?:i\.e\.|e\.g\.)[^)]*\)\s*$", "", answer.strip())
    for pat, group in _CHAMP_PATTERNS:
        m = pat.match(a)
        if m:
            a = m.group(group).strip()
    if " and " in a and "," not in a and not re.search(r"[A-Za-z]{2,}", a.replace(" and ", " ")):
        a = a.replace(" and ", ", ")  # "1 and 3" -> "1, 3" (a list of values)
    return _latex_sqrt(a)


class ChampAdapter(Adapter):
    """CHAMP (PyPI champ-dataset): 270 competition problems with answers, step solutions and model-written
    solutions; a model solution is a trace only if CHAMP's annotators found no mistake in it."""

    def raw_rows(self) -> Iterator[Any]:
        try:
            import champ_dataset

            ds = champ_dataset.load(self.spec.version)
        except Exception as e:
            raise M1Error(f"source {self.spec.name} (champ-dataset {self.spec.version}) cannot be read: {first_line(e)}") from None

        def rows():
            for pid, p in ds.problems.items():
                traces = []
                for key, ann in sorted((p.fws_annotations or {}).items()):
                    prompt = key.split("|", 1)[-1]
                    if prompt in self.spec.trace_prompts and ann.start_idx is None and ann.text:
                        # Our user turn has no hints, so a solution that talks about "the hint" would not fit it.
                        if "w/ H" in prompt and re.search(r"\bhints?\b", ann.text, re.IGNORECASE):
                            continue
                        traces.append({"key": key, "text": ann.text})
                yield {
                    "identifier": pid,
                    "category": p.category,
                    "text": p.text,
                    "answer": p.answer,
                    "steps": [s.text for s in (p.solution.steps if p.solution else [])],
                    "traces": traces,
                }

        yield from self.capped(rows())

    def expected_rows(self) -> int | None:
        return min(270, self.spec.max_rows or 270)

    def to_row(self, raw: Any, index: int) -> SourceRow:
        raise_if_error(raw)
        raw_answer = answer_text(raw.get("answer"))
        answer = champ_answer(raw_answer)
        steps = [check_text(s, "steps[]") for s in raw.get("steps") or []]
        solution = None
        if steps:
            solution = "\n".join(steps) + f"\nTherefore, the final answer is $\\boxed{{{answer}}}$."
        traces = [(check_text(t["text"], "trace"), None) for t in raw.get("traces") or []]
        k = self.spec.max_traces_per_problem
        return SourceRow(
            id=str(raw.get("identifier") or index),
            problem=check_text(raw.get("text"), "text"),
            answer=answer,
            solution=solution,
            trace=traces[0][0] if traces else None,
            trace_verified_by="champ_human_annotation" if traces else None,
            alt_traces=traces[1:k],
            metadata={"category": raw.get("category"), "raw_answer": raw_answer,
                      "trace_model": (raw.get("traces") or [{}])[0].get("key")},
        )


# ----------------------------------------------------------------------------- mathgenerator


