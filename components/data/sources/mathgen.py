"""PyPI mathgenerator problems: short exact answers, no worked solutions (direct traces are written for them when
asked)."""
from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from components.data.record import SourceRow, check_text
from components.data.sources.base import (
    Adapter,
    derived_seed,
    error_row,
    first_line,
    raise_if_error,
)
from components.errors import M1Error

# mathgenerator is imported where the source is read (raw_rows): a missing or broken package fails this source alone,
# by name.


class MathgenAdapter(Adapter):
    """mathgenerator problems (answers only, no worked solutions); seeded per row, global random restored."""

    def expected_rows(self) -> int | None:
        return min(self.spec.n, self.spec.max_rows or self.spec.n)

    def raw_rows(self) -> Iterator[Any]:
        try:
            import mathgenerator
        except Exception as e:
            raise M1Error(f"source {self.spec.name} (mathgenerator) cannot be imported: {first_line(e)}") from None
        known = {g[0]: g for g in mathgenerator.genList}
        bad = [i for i in self.spec.generator_ids if i not in known]
        if bad:
            raise M1Error(f"source {self.spec.name}: unknown mathgenerator ids {bad}")
        base = derived_seed(self.global_seed, self.spec.name, self.spec.seed)

        def rows():
            for i in range(self.spec.n):
                gid = self.spec.generator_ids[i % len(self.spec.generator_ids)]
                state = random.getstate()
                try:
                    random.seed(base + i)
                    problem, answer = known[gid][2]()
                except Exception as e:  # a generator bug is one bad row, not a failed stage
                    yield error_row("generator_error", f"generator {gid}: {first_line(e)}")
                    continue
                finally:
                    random.setstate(state)
                yield {"id": f"{i:07d}", "generator": gid, "title": known[gid][1], "problem": problem, "answer": answer}

        yield from self.capped(rows())

    def to_row(self, raw: Any, index: int) -> SourceRow:
        raise_if_error(raw)
        problem = check_text(raw.get("problem"), "problem")
        answer = check_text(str(raw.get("answer")) if raw.get("answer") is not None else None, "answer")
        answer = answer.replace("$", "").strip()
        problem = f"{raw['title']}: {problem}"
        direct = self.spec.direct_traces
        return SourceRow(
            id=raw["id"],
            problem=problem,
            answer=answer,
            solution=f"The answer is $\\boxed{{{answer}}}$.",
            trace=f"The question: {problem}\nSo the answer is {answer}." if direct else None,
            final=f"The final answer is $\\boxed{{{answer}}}$." if direct else None,
            metadata={"generator": raw.get("generator")},
        )


# ----------------------------------------------------------------------------- synthetic


