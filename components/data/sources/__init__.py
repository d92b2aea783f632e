"""Source adapters, one module each: hub.py (hub datasets), local.py (local files), champ.py (CHAMP), mathgen.py
(mathgenerator) and the seeded synthetic word problems below; base.py holds the Adapter interface they share.
Each adapter streams raw rows in the main process (`raw_rows`, never the whole source at once) and maps one raw
row to a SourceRow (`to_row`, pure, run in worker processes). A row that cannot be mapped raises RowError and
becomes a reject; a source that cannot be opened raises M1Error naming it."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from components.data.config import (
    ChampSource,
    HubSource,
    LocalSource,
    MathgenSource,
    SyntheticSource,
)
from components.data.record import SourceRow
from components.data.sources import synthetic
from components.data.sources.base import Adapter, derived_seed, raise_if_error
from components.data.sources.champ import ChampAdapter, champ_answer
from components.data.sources.hub import HubAdapter
from components.data.sources.local import LocalAdapter
from components.data.sources.mathgen import MathgenAdapter
from components.errors import M1Error

__all__ = ["ADAPTERS", "Adapter", "ChampAdapter", "HubAdapter", "LocalAdapter", "MathgenAdapter", "SyntheticAdapter",
           "champ_answer", "make_adapter"]


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
        raise_if_error(raw)
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
