"""Benchmark problems for evaluation: the curate stage's held-out sets (<data_dir>/eval/<name>.jsonl), hub
benchmarks through the data stage's registry (MATH-500, AIME 2024/2025, AMC 2023, OlympiadBench), and local
JSONL/Parquet/CSV files with a column mapping. Reading reuses the data stage's adapters, so a hub set's columns
are mapped exactly as curation maps them.

A row whose reference answer is missing or does not parse (math-verify, or a plain number) is excluded and
reported with its reason, never scored as wrong; so is a row the adapter rejects (missing problem, bad UTF-8).

Simplification: `max_problems` (per benchmark, else evaluate.max_problems) keeps the problems with the smallest seeded hash of their id (a subset that is
stable when a set grows), after the bad rows are excluded; the exclusion count covers every row read.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from components.data.config import FieldMap, HubSource, LocalSource
from components.data.record import RowError
from components.data.sources import HubAdapter, LocalAdapter
from components.errors import M1Error
from components.evaluate.config import (
    CuratedBenchmark,
    EvalConfig,
    EvalFieldMap,
    HubBenchmark,
    LocalBenchmark,
)
from components.mathcheck import is_plain_number, parse_answer


@dataclass
class Problem:
    benchmark: str
    id: str
    source: str
    problem: str
    answer: str
    prompt: str | None = None  # chat-templated prompt shipped with the set, if any


@dataclass
class Excluded:
    benchmark: str
    id: str
    reason: str
    detail: str = ""


@dataclass
class Benchmark:
    name: str
    problems: list[Problem]
    excluded: list[Excluded] = field(default_factory=list)
    rows_read: int = 0


CURATED_FIELDS = EvalFieldMap(problem="problem", answer="answer", id="id", prompt="prompt", source="source")


def _local_rows(name: str, path: str, fmt: str | None, fields: EvalFieldMap):
    """(index, id, problem, answer, prompt, source) per row via the data stage's local reader; RowError rows
    come back as exceptions to record."""
    fmap = FieldMap(problem=fields.problem, solution=None, answer=fields.answer, id=fields.id)
    adapter = LocalAdapter(LocalSource(name=name, splits=["eval"], path=path, format=fmt, fields=fmap), 0)
    for i, raw, row in _adapter_rows(adapter):
        if isinstance(row, RowError):
            yield i, row
            continue
        prompt = raw.get(fields.prompt) if fields.prompt else None
        source = raw.get(fields.source) if fields.source else None
        yield i, (row.id, row.problem, row.answer, prompt if isinstance(prompt, str) and prompt.strip() else None,
                  str(source) if source not in (None, "") else name)


def _hub_rows(spec: HubBenchmark):
    src = HubSource(name=spec.name, splits=["eval"], dataset=spec.dataset or spec.name, config=spec.config,
                    split=spec.split, revision=spec.revision, data_files=spec.data_files)
    for i, _, row in _adapter_rows(HubAdapter(src, 0)):
        yield i, (row if isinstance(row, RowError) else (row.id, row.problem, row.answer, None, spec.name))


def _adapter_rows(adapter):
    """(index, raw row, normalised row or the RowError that rejects it) for every row of a data-stage adapter."""
    for i, raw in enumerate(adapter.raw_rows()):
        try:
            yield i, raw, adapter.to_row(raw, i)
        except RowError as e:
            yield i, raw, e
        except Exception as e:  # whatever an odd row triggers is that row's problem, not the benchmark's
            yield i, raw, RowError("bad_row", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _reference_problem(answer: str | None, timeout_s: float) -> tuple[str, str] | None:
    """None when the reference answer is usable, else (reason, detail)."""
    if answer is None or not str(answer).strip():
        return "missing_reference", "no reference answer"
    if is_plain_number(answer):
        return None
    parsed = parse_answer(answer, timeout_s=timeout_s)
    # math-verify falls back to the raw string when it extracts nothing ("???" -> ["???"]): that is no answer
    if not parsed or all(isinstance(x, str) for x in parsed):
        return "unparseable_reference", f"reference answer {answer[:80]!r} does not parse"
    return None


def _rank(seed: int, bench: str, pid: str) -> bytes:
    return hashlib.blake2b(f"{seed}/{bench}/{pid}".encode(), digest_size=8).digest()


def load_benchmark(name: str, rows, max_problems: int | None, seed: int, timeout_s: float) -> Benchmark:
    problems, excluded, seen = [], [], set()
    n = 0
    for i, item in rows:
        n += 1
        if isinstance(item, RowError):
            excluded.append(Excluded(name, f"#{i}", item.reason, item.detail))
            continue
        pid, problem, answer, prompt, source = item
        bad = _reference_problem(answer, timeout_s)
        if bad:
            excluded.append(Excluded(name, pid, *bad))
            continue
        base, j = pid, 1
        while pid in seen:  # sets without an id column repeat nothing, but hand-made files might
            j += 1
            pid = f"{base}#{j}"
        seen.add(pid)
        problems.append(Problem(name, pid, source, problem, str(answer).strip(), prompt))
    if max_problems is not None and len(problems) > max_problems:
        keep = set(sorted(range(len(problems)), key=lambda k: _rank(seed, name, problems[k].id))[:max_problems])
        problems = [p for k, p in enumerate(problems) if k in keep]
    return Benchmark(name, problems, excluded, n)


def curated_set_names(data_dir: str | Path) -> list[str]:
    return sorted(p.stem for p in (Path(data_dir) / "eval").glob("*.jsonl"))


def load_benchmarks(cfg: EvalConfig, data_dir: str | Path | None, seed: int) -> list[Benchmark]:
    out: list[Benchmark] = []
    t = cfg.verify_timeout_s
    for spec in cfg.benchmarks:
        cap = spec.max_problems if spec.max_problems is not None else cfg.max_problems
        if isinstance(spec, CuratedBenchmark):
            if data_dir is None:
                raise M1Error(f"benchmark {spec.name}: curated sets need a data directory (the curate stage's output)")
            eval_dir = Path(data_dir) / "eval"
            names = curated_set_names(data_dir) if spec.name == "*" else [spec.name]
            if not names:
                raise M1Error(f"no evaluation sets in {eval_dir} (run `m1 data curate` first)")
            for name in names:
                path = eval_dir / f"{name}.jsonl"
                if not path.is_file() and not spec.required:
                    continue
                if not path.is_file():
                    have = ", ".join(curated_set_names(data_dir)) or "none"
                    raise M1Error(f"evaluation set {name} not found: {path} (sets there: {have})")
                rows = _local_rows(name, str(path), "jsonl", CURATED_FIELDS)
                out.append(load_benchmark(name, rows, cap, seed, t))
        elif isinstance(spec, HubBenchmark):
            out.append(load_benchmark(spec.name, _hub_rows(spec), cap, seed, t))
        elif isinstance(spec, LocalBenchmark):
            rows = _local_rows(spec.name, spec.path, spec.format, spec.fields)
            out.append(load_benchmark(spec.name, rows, cap, seed, t))
    if not out:
        have = ", ".join(curated_set_names(data_dir)) if data_dir and Path(data_dir, "eval").is_dir() else "none"
        raise M1Error(f"no benchmark to evaluate: none of {[b.name for b in cfg.benchmarks]} exists "
                      f"(curated sets in {data_dir}: {have})")
    if not any(b.problems for b in out):
        reasons = Counter(e.reason for b in out for e in b.excluded)
        why = ", ".join(f"{r} x{c}" for r, c in reasons.most_common()) or "no rows"
        raise M1Error(f"no scorable problems in {', '.join(b.name for b in out)} ({why})")
    return out
