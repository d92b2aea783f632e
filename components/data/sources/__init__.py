"""Source adapters. Each adapter streams raw rows in the main process (`raw_rows`, never the whole
source at once) and maps one raw row to a SourceRow (`to_row`, pure, run in worker processes).
A row that cannot be mapped raises RowError and becomes a reject; a source that cannot be opened
raises M1Error naming it.

Simplifications: local JSONL/CSV/Parquet files are read with our own streaming readers (not
`datasets`) so that one undecodable or malformed line becomes one reject instead of failing the
whole file; hub datasets (and local mirrors of them, via `data_files`) go through
`datasets.load_dataset(..., streaming=True)`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
from collections.abc import Iterator
from typing import Any

from components.data.config import (
    ChampSource,
    HubSource,
    LocalSource,
    MathgenSource,
    SyntheticSource,
)
from components.data.record import RowError, SourceRow, answer_text, check_text, preview
from components.data.sources import registry, synthetic
from components.errors import M1Error

_ERR = "__row_error__"


def derived_seed(global_seed: int, name: str, seed: int = 0) -> int:
    h = hashlib.blake2b(f"{global_seed}/{name}/{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def error_row(reason: str, detail: str, raw: Any = "") -> dict:
    return {_ERR: [reason, detail], "raw": preview(raw)}


def _raise_if_error(raw: Any) -> None:
    if isinstance(raw, dict) and _ERR in raw:
        reason, detail = raw[_ERR]
        raise RowError(reason, detail)
    if not isinstance(raw, dict):
        raise RowError("wrong_type", f"row is {type(raw).__name__}, expected an object")


class Adapter:
    def __init__(self, spec, global_seed: int):
        self.spec = spec
        self.global_seed = global_seed

    def raw_rows(self) -> Iterator[Any]:
        raise NotImplementedError

    def to_row(self, raw: Any, index: int) -> SourceRow:
        raise NotImplementedError

    def expected_rows(self) -> int | None:
        return self.spec.max_rows

    def capped(self, it: Iterator[Any]) -> Iterator[Any]:
        cap = self.spec.max_rows
        for i, raw in enumerate(it):
            if cap is not None and i >= cap:
                return
            yield raw


# ----------------------------------------------------------------------------- hub


def _builder_for(files: list[str]) -> str:
    ext = {os.path.splitext(f.removesuffix(".gz"))[1].lower() for f in files}
    if ext <= {".jsonl", ".json"}:
        return "json"
    if ext <= {".parquet"}:
        return "parquet"
    if ext <= {".csv"}:
        return "csv"
    raise M1Error(f"data_files must all be .jsonl/.json, .parquet or .csv, got {sorted(ext)}")


class HubAdapter(Adapter):
    def __init__(self, spec: HubSource, global_seed: int):
        super().__init__(spec, global_seed)
        self.entry = registry.lookup(spec.dataset)
        if self.entry is None and spec.fields is None:
            raise M1Error(
                f"source {spec.name}: unknown hub dataset {spec.dataset!r}; known: {', '.join(sorted(registry.REGISTRY))} "
                f"(or give `fields` to map an unregistered dataset's columns)"
            )

    def _streams(self):
        from datasets import load_dataset

        s, e = self.spec, self.entry
        if s.data_files:
            files = sorted(f for pat in s.data_files for f in (glob.glob(pat) or [pat]))
            missing = [f for f in files if not os.path.exists(f)]
            if missing:
                raise M1Error(f"source {s.name}: data file not found: {missing[0]}")
            yield load_dataset(_builder_for(files), data_files=files, split="train", streaming=True)
            return
        hub_id = e.hub_id if e else s.dataset
        configs = [s.config] if s.config else list(e.configs if e else (None,))
        for cfg in configs:
            yield load_dataset(hub_id, cfg, split=s.split or (e.split if e else "train"), streaming=True,
                               revision=s.revision)

    def raw_rows(self) -> Iterator[Any]:
        where = self.spec.data_files or self.spec.dataset
        try:
            def rows():
                for ds in self._streams():
                    for row in ds:
                        if self.entry and self.entry.row_filter and not self.entry.row_filter(row):
                            continue
                        yield row

            yield from self.capped(rows())
        except M1Error:
            raise
        except Exception as e:  # network, auth, missing dataset, corrupt shard: one line naming the source
            raise M1Error(f"source {self.spec.name} ({where}) cannot be read: {_first_line(e)}") from None

    def to_row(self, raw: Any, index: int) -> SourceRow:
        _raise_if_error(raw)
        if self.entry:
            return self.entry.convert(raw, index, self.spec.max_traces_per_problem)
        return map_fields(raw, index, self.spec.fields)


def map_fields(raw: dict, index: int, f) -> SourceRow:
    for col in (f.problem, f.solution, f.trace, f.final, f.answer, f.id):
        if col is not None and col not in raw:
            raise RowError("missing_field", col)
    ident = raw.get(f.id) if f.id else None
    return SourceRow(
        id=str(ident) if ident not in (None, "") else str(index),
        problem=check_text(raw.get(f.problem), f.problem),
        solution=check_text(raw.get(f.solution), f.solution, required=False) if f.solution else None,
        trace=check_text(raw.get(f.trace), f.trace, required=False) if f.trace else None,
        final=check_text(raw.get(f.final), f.final, required=False) if f.final else None,
        answer=answer_text(raw.get(f.answer), f.answer, required=False) if f.answer else None,
    )


# ----------------------------------------------------------------------------- local files


def _jsonl_rows(path: str) -> Iterator[Any]:
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield error_row("invalid_utf8", f"{os.path.basename(path)}:{lineno}: {e.reason} at byte {e.start}",
                                line[:200].decode("utf-8", "replace"))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield error_row("malformed_json", f"{os.path.basename(path)}:{lineno}: {e.msg}", text[:200])
                continue
            yield obj if isinstance(obj, dict) else error_row("wrong_type", f"line {lineno} is not an object", obj)


def _parquet_rows(path: str) -> Iterator[Any]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _csv_rows(path: str) -> Iterator[Any]:
    import pandas as pd

    bad: list[list[str]] = []

    def on_bad(fields):
        bad.append(fields)

    reader = pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=1024, engine="python",
                         encoding="utf-8", encoding_errors="surrogateescape", on_bad_lines=on_bad)
    for chunk in reader:
        while bad:
            yield error_row("malformed_csv", "wrong number of fields", bad.pop(0))
        for row in chunk.to_dict("records"):
            yield {k: (v if v != "" else None) for k, v in row.items()}
    while bad:
        yield error_row("malformed_csv", "wrong number of fields", bad.pop(0))


class LocalAdapter(Adapter):
    def files(self) -> list[str]:
        files = sorted(glob.glob(self.spec.path)) if any(c in self.spec.path for c in "*?[") else [self.spec.path]
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise M1Error(f"source {self.spec.name}: no file at {self.spec.path}")
        return files

    def raw_rows(self) -> Iterator[Any]:
        readers = {"jsonl": _jsonl_rows, "parquet": _parquet_rows, "csv": _csv_rows}
        files = self.files()

        def rows():
            for f in files:
                fmt = self.spec.format or {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
                                           ".csv": "csv"}.get(os.path.splitext(f)[1].lower())
                if fmt is None:
                    raise M1Error(f"source {self.spec.name}: cannot tell the format of {f}; set `format`")
                try:
                    yield from readers[fmt](f)
                except M1Error:
                    raise
                except Exception as e:
                    raise M1Error(f"source {self.spec.name} ({f}) cannot be read: {_first_line(e)}") from None

        yield from self.capped(rows())

    def to_row(self, raw: Any, index: int) -> SourceRow:
        _raise_if_error(raw)
        return map_fields(raw, index, self.spec.fields)


# ----------------------------------------------------------------------------- CHAMP


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
            raise M1Error(f"source {self.spec.name} (champ-dataset {self.spec.version}) cannot be read: {_first_line(e)}") from None

        def rows():
            for pid, p in ds.problems.items():
                traces = []
                for key, ann in sorted((p.fws_annotations or {}).items()):
                    prompt = key.split("|", 1)[-1]
                    if prompt in self.spec.trace_prompts and ann.start_idx is None and ann.text:
                        # Our user turn has no hints, so a solution that talks about "the hint" would not fit it.
                        if "w/ H" in prompt and re.search(r"\bhints?\b", ann.text, re.I):
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
        _raise_if_error(raw)
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


class MathgenAdapter(Adapter):
    """mathgenerator problems (answers only, no worked solutions); seeded per row, global random restored."""

    def expected_rows(self) -> int | None:
        return min(self.spec.n, self.spec.max_rows or self.spec.n)

    def raw_rows(self) -> Iterator[Any]:
        try:
            import mathgenerator
        except Exception as e:
            raise M1Error(f"source {self.spec.name} (mathgenerator) cannot be imported: {_first_line(e)}") from None
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
                    yield error_row("generator_error", f"generator {gid}: {_first_line(e)}")
                    continue
                finally:
                    random.setstate(state)
                yield {"id": f"{i:07d}", "generator": gid, "title": known[gid][1], "problem": problem, "answer": answer}

        yield from self.capped(rows())

    def to_row(self, raw: Any, index: int) -> SourceRow:
        _raise_if_error(raw)
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


class SyntheticAdapter(Adapter):
    def expected_rows(self) -> int | None:
        return min(self.spec.n, self.spec.max_rows or self.spec.n)

    def raw_rows(self) -> Iterator[Any]:
        seed = derived_seed(self.global_seed, self.spec.name, self.spec.seed)
        try:
            yield from self.capped(synthetic.generate(self.spec.n, seed, self.spec.templates))
        except ValueError as e:
            raise M1Error(f"source {self.spec.name}: {e}") from None

    def to_row(self, raw: Any, index: int) -> SourceRow:
        _raise_if_error(raw)
        return SourceRow(id=raw["id"], problem=raw["problem"], answer=raw["answer"], solution=raw["solution"],
                         trace=raw["trace"], final=raw["final"], metadata={"template": raw["template"]})


ADAPTERS = {"hub": HubAdapter, "local": LocalAdapter, "champ": ChampAdapter, "mathgenerator": MathgenAdapter,
            "synthetic": SyntheticAdapter}


def make_adapter(spec, global_seed: int) -> Adapter:
    return ADAPTERS[spec.kind](spec, global_seed)


__all__ = [
    "Adapter",
    "ChampSource",
    "HubSource",
    "LocalSource",
    "MathgenSource",
    "SyntheticSource",
    "derived_seed",
    "make_adapter",
]
