"""Known Hugging Face hub datasets and how their real columns map to the normalised record.

Each entry names the hub id, the default subset/split, what the set is good for, and a `convert`
function from one raw row (a dict with the set's own column names) to a SourceRow. Column layouts
follow the dataset cards:

* nvidia/OpenMathInstruct-2: problem, generated_solution, expected_answer, problem_source
* open-r1/OpenR1-Math-220k: problem, solution, answer, problem_type, question_type, source, uuid,
  is_reasoning_complete[], generations[], correctness_math_verify[], correctness_llama[],
  finish_reasons[], correctness_count, messages[]
* open-r1/OpenThoughts-114k-math: source, problem, solution, messages[], system, conversations[{from,
  value}], generated_token_count, correct
* ServiceNow-AI/R1-Distill-SFT (v0): id, reannotated_assistant_content, problem, source, solution,
  verified, quality_metrics
* agentica-org/DeepScaleR-Preview-Dataset: problem, answer, solution
* HuggingFaceH4/MATH-500: problem, solution, answer, subject, level, unique_id
* HuggingFaceH4/aime_2024: id, problem, solution, answer, url, year
* opencompass/AIME2025 (subsets AIME2025-I, AIME2025-II): question, answer
* AI-MO/aimo-validation-amc: id, problem, answer (float), url  -- AMC 2022 and 2023; amc23 keeps 2023
* Hothan/OlympiadBench (OE_TO_maths_en_COMP): id, question, solution[], final_answer[], context,
  is_multiple_answer, unit, answer_type, subfield, ...

Simplification: for R1-style outputs the trace is the text inside <think>...</think> (or OpenThoughts'
<|begin_of_thought|> markers) and the final part is what follows; rows whose output lacks the closing
marker are treated as unfinished and rejected.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from components.data.record import RowError, SourceRow, answer_text, check_text
from components.mathcheck import extract_boxed


@dataclass(frozen=True)
class HubDataset:
    key: str
    hub_id: str
    configs: tuple[str | None, ...]
    split: str
    good_for: tuple[str, ...]
    convert: Callable[[dict, int, int], SourceRow]  # (row, index, max_traces) -> SourceRow
    row_filter: Callable[[dict], bool] | None = None
    notes: str = ""
    columns: tuple[str, ...] = field(default=())


def _id(row: dict, index: int, col: str | None) -> str:
    v = row.get(col) if col else None
    return str(v) if v is not None and str(v).strip() else str(index)


def split_think(text: str) -> tuple[str, str]:
    """(trace, final) of an R1-style output; RowError when the thinking never closes."""
    for open_tag, close_tag in (("<think>", "</think>"), ("<|begin_of_thought|>", "<|end_of_thought|>")):
        if close_tag in text:
            head, tail = text.split(close_tag, 1)
            trace = head.split(open_tag, 1)[-1].strip()
            final = tail.replace("<|begin_of_solution|>", "").replace("<|end_of_solution|>", "").strip()
            if not trace:
                raise RowError("empty_field", "trace")
            return trace, final
    raise RowError("unfinished_trace", "no closing </think> marker")


def _list(row: dict, name: str) -> list:
    v = row.get(name)
    if v is None:
        raise RowError("missing_field", name)
    if not isinstance(v, (list, tuple)):
        raise RowError("wrong_type", f"{name} is {type(v).__name__}, expected list")
    return list(v)


def openmathinstruct2(row: dict, i: int, _k: int) -> SourceRow:
    return SourceRow(
        id=_id(row, i, None),
        problem=check_text(row.get("problem"), "problem"),
        solution=check_text(row.get("generated_solution"), "generated_solution"),
        answer=answer_text(row.get("expected_answer"), "expected_answer"),
        metadata={"problem_source": row.get("problem_source")},
    )


def openr1_math(row: dict, i: int, max_traces: int) -> SourceRow:
    problem = check_text(row.get("problem"), "problem")
    answer = answer_text(row.get("answer"), "answer")
    gens = _list(row, "generations")
    mv = _list(row, "correctness_math_verify")
    complete = row.get("is_reasoning_complete") or [True] * len(gens)
    llama = row.get("correctness_llama") or [None] * len(gens)
    if len(mv) != len(gens):
        raise RowError("wrong_type", "correctness_math_verify and generations differ in length")
    picked = []
    for g, ok_mv, ok_llama, done in zip(gens, mv, llama, complete):
        if (ok_mv or ok_llama) and done and isinstance(g, str):
            try:
                picked.append(split_think(check_text(g, "generations[]")))
            except RowError:
                continue
        if len(picked) >= max_traces:
            break
    if not picked:
        raise RowError("no_correct_trace", "no generation both complete and marked correct")
    trace, final = picked[0]
    return SourceRow(
        id=_id(row, i, "uuid"),
        problem=problem,
        answer=answer,
        solution=check_text(row.get("solution"), "solution", required=False),
        trace=trace,
        final=final,
        trace_verified_by="openr1_correctness_flags",
        metadata={"source": row.get("source"), "problem_type": row.get("problem_type")},
        alt_traces=picked[1:],
    )


def openthoughts_math(row: dict, i: int, _k: int) -> SourceRow:
    if row.get("correct") is False:
        raise RowError("marked_incorrect", "the source marks this generation incorrect")
    problem = check_text(row.get("problem"), "problem")
    solution = check_text(row.get("solution"), "solution")
    answer = extract_boxed(solution)
    if answer is None:
        raise RowError("missing_field", "no \\boxed{} answer in the reference solution")
    convs = _list(row, "conversations")
    reply = next((c.get("value") for c in convs if isinstance(c, dict) and c.get("from") == "assistant"), None)
    trace, final = split_think(check_text(reply, "conversations[assistant]"))
    return SourceRow(id=_id(row, i, None), problem=problem, answer=answer, solution=solution, trace=trace,
                     final=final, metadata={"source": row.get("source")})


def r1_distill_sft(row: dict, i: int, _k: int) -> SourceRow:
    problem = check_text(row.get("problem"), "problem")
    solution = check_text(row.get("solution"), "solution")
    answer = extract_boxed(solution)
    if answer is None:
        raise RowError("missing_field", "no \\boxed{} answer in the reference solution")
    trace, final = split_think(check_text(row.get("reannotated_assistant_content"), "reannotated_assistant_content"))
    return SourceRow(id=_id(row, i, "id"), problem=problem, answer=answer, solution=solution, trace=trace,
                     final=final, metadata={"source": row.get("source")})


def deepscaler(row: dict, i: int, _k: int) -> SourceRow:
    return SourceRow(id=_id(row, i, None), problem=check_text(row.get("problem"), "problem"),
                     answer=answer_text(row.get("answer")),
                     solution=check_text(row.get("solution"), "solution", required=False))


def math500(row: dict, i: int, _k: int) -> SourceRow:
    return SourceRow(id=_id(row, i, "unique_id"), problem=check_text(row.get("problem"), "problem"),
                     answer=answer_text(row.get("answer")),
                     solution=check_text(row.get("solution"), "solution", required=False),
                     metadata={"subject": row.get("subject"), "level": row.get("level")})


def aime24(row: dict, i: int, _k: int) -> SourceRow:
    return SourceRow(id=_id(row, i, "id"), problem=check_text(row.get("problem"), "problem"),
                     answer=answer_text(row.get("answer")),
                     solution=check_text(row.get("solution"), "solution", required=False),
                     metadata={"url": row.get("url"), "year": row.get("year")})


def aime25(row: dict, i: int, _k: int) -> SourceRow:
    return SourceRow(id=_id(row, i, None), problem=check_text(row.get("question"), "question"),
                     answer=answer_text(row.get("answer")))


def amc(row: dict, i: int, _k: int) -> SourceRow:
    return SourceRow(id=_id(row, i, "id"), problem=check_text(row.get("problem"), "problem"),
                     answer=answer_text(row.get("answer")), metadata={"url": row.get("url")})


def olympiadbench(row: dict, i: int, _k: int) -> SourceRow:
    finals = _list(row, "final_answer")
    if not finals:
        raise RowError("missing_field", "final_answer is empty")
    parts = [answer_text(f, "final_answer[]") for f in finals]
    answer = ", ".join(p.strip().strip("$").strip() for p in parts)
    question = check_text(row.get("question"), "question")
    context = check_text(row.get("context"), "context", required=False)
    sols = row.get("solution") or []
    return SourceRow(id=_id(row, i, "id"), problem=f"{context}\n\n{question}" if context else question,
                     answer=answer, solution=sols[0] if sols and isinstance(sols[0], str) else None,
                     metadata={"answer_type": row.get("answer_type"), "unit": row.get("unit"),
                               "subfield": row.get("subfield")})


def _amc_2023(row: dict) -> bool:
    return "2023" in str(row.get("url") or "")


CATALOGUE: dict[str, HubDataset] = {
    d.key: d
    for d in [
        HubDataset("openmathinstruct2", "nvidia/OpenMathInstruct-2", (None,), "train", ("sft1",), openmathinstruct2,
                   columns=("problem", "generated_solution", "expected_answer", "problem_source")),
        HubDataset("openr1_math", "open-r1/OpenR1-Math-220k", ("default",), "train", ("sft2",), openr1_math,
                   columns=("problem", "solution", "answer", "problem_type", "question_type", "source", "uuid",
                            "is_reasoning_complete", "generations", "correctness_math_verify",
                            "correctness_llama", "finish_reasons", "correctness_count", "messages")),
        HubDataset("openthoughts_math", "open-r1/OpenThoughts-114k-math", (None,), "train", ("sft2",),
                   openthoughts_math,
                   columns=("source", "problem", "solution", "messages", "system", "conversations",
                            "generated_token_count", "correct")),
        HubDataset("r1_distill_sft", "ServiceNow-AI/R1-Distill-SFT", ("v0",), "train", ("sft2",), r1_distill_sft,
                   columns=("id", "reannotated_assistant_content", "problem", "source", "solution", "verified",
                            "quality_metrics")),
        HubDataset("deepscaler", "agentica-org/DeepScaleR-Preview-Dataset", (None,), "train", ("rl",), deepscaler,
                   columns=("problem", "answer", "solution")),
        HubDataset("math500", "HuggingFaceH4/MATH-500", (None,), "test", ("eval",), math500,
                   columns=("problem", "solution", "answer", "subject", "level", "unique_id")),
        HubDataset("aime24", "HuggingFaceH4/aime_2024", (None,), "train", ("eval",), aime24,
                   columns=("id", "problem", "solution", "answer", "url", "year")),
        HubDataset("aime25", "opencompass/AIME2025", ("AIME2025-I", "AIME2025-II"), "test", ("eval",), aime25,
                   columns=("question", "answer")),
        HubDataset("amc23", "AI-MO/aimo-validation-amc", (None,), "train", ("eval",), amc, row_filter=_amc_2023,
                   notes="AMC 2022+2023 set; rows whose url names 2023 are kept",
                   columns=("id", "problem", "answer", "url")),
        HubDataset("olympiadbench", "Hothan/OlympiadBench", ("OE_TO_maths_en_COMP",), "train", ("eval",),
                   olympiadbench,
                   columns=("id", "question", "solution", "final_answer", "context", "modality", "difficulty",
                            "is_multiple_answer", "unit", "answer_type", "error", "question_type", "subfield",
                            "subject", "language")),
    ]
}
_BY_HUB_ID = {d.hub_id.lower(): d for d in CATALOGUE.values()}


def lookup(name: str) -> HubDataset | None:
    return CATALOGUE.get(name) or _BY_HUB_ID.get(name.lower())

