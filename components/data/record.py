"""The normalised record every source is mapped to, the reject that replaces a bad row, and the
field-level validation (type, UTF-8, emptiness) shared by all adapters."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


class RowError(Exception):
    """A row that cannot become a record; `reason` is a short code counted in the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SourceRow:
    """What an adapter makes of one raw row, before it is routed to splits."""

    id: str
    problem: str
    answer: str | None = None
    solution: str | None = None  # worked solution (SFT-1)
    trace: str | None = None  # reasoning trace (SFT-2), without <think> tags
    final: str | None = None  # the answer part that follows the trace, if the source has one
    trace_verified_by: str | None = None  # the source's own correctness evidence for the trace
    alt_traces: list = field(default_factory=list)  # further (trace, final) pairs for the same problem
    metadata: dict = field(default_factory=dict)


@dataclass
class Record:
    """One normalised record. `solution` holds the worked solution for sft1 and the reasoning trace for
    sft2 (its answer part in metadata['final'] when the source has one); rl and eval records have none."""

    id: str
    source: str
    problem: str
    solution: str | None
    answer: str | None
    split: str
    metadata: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Record:
        return cls(**json.loads(line))


@dataclass
class Reject:
    source: str
    id: str | None
    reason: str
    detail: str = ""
    split: str | None = None
    stage: str = "check"
    row: str = ""  # a truncated repr of the offending input

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def preview(value: Any, limit: int = 400) -> str:
    try:
        s = json.dumps(value, ensure_ascii=True, default=repr)
    except Exception:
        s = repr(value)
    return s if len(s) <= limit else s[:limit] + "..."


def check_text(value: Any, name: str, required: bool = True) -> str | None:
    """A stripped, valid UTF-8 string, or RowError (missing_field / wrong_type / invalid_utf8 / empty_field)."""
    if value is None:
        if required:
            raise RowError("missing_field", name)
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowError("invalid_utf8", f"{name}: {e.reason} at byte {e.start}") from None
    if not isinstance(value, str):
        raise RowError("wrong_type", f"{name} is {type(value).__name__}, expected str")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates: what undecodable bytes become under surrogateescape, or a broken \ud8xx escape.
        raise RowError("invalid_utf8", f"{name} holds undecodable bytes") from None
    if "\ufffd" in value:
        raise RowError("invalid_utf8", f"{name} holds U+FFFD (text was decoded with replacement upstream)")
    if "\x00" in value:
        raise RowError("broken_text", f"{name} holds NUL characters")
    value = value.strip()
    if not value:
        if required:
            raise RowError("empty_field", name)
        return None
    return value


def answer_text(value: Any, name: str = "answer", required: bool = True) -> str | None:
    """Reference answers may be numbers in some sets (AMC's are floats): render them exactly."""
    if isinstance(value, bool):
        raise RowError("wrong_type", f"{name} is bool")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RowError("unparseable_answer", f"{name} is {value}")
        return str(int(value)) if value.is_integer() else repr(value)
    return check_text(value, name, required)


def stable_fraction(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key): selects held-out rows without holding the stream."""
    h = hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64
