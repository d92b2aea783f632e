"""What every source adapter shares: the Adapter interface (raw rows streamed in the main process, `to_row` mapping
one raw row to a SourceRow in worker processes), per-source seeds, and error rows (a row that cannot be read or
mapped becomes a reject with its reason, never an exception that stops the source)."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from components.data.record import RowError, SourceRow, answer_text, check_text, preview

_ERR = "__row_error__"


def derived_seed(global_seed: int, name: str, seed: int = 0) -> int:
    h = hashlib.blake2b(f"{global_seed}/{name}/{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def error_row(reason: str, detail: str, raw: Any = "") -> dict:
    return {_ERR: [reason, detail], "raw": preview(raw)}


def raise_if_error(raw: Any) -> None:
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


