"""Hub datasets (and local mirrors of them through `data_files`) read with `datasets.load_dataset(...,
streaming=True)`; known datasets map their columns through the catalogue in hub_catalogue.py."""
from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from typing import Any

from components.data.config import HubSource
from components.data.record import SourceRow
from components.data.sources import hub_catalogue
from components.data.sources.base import Adapter, first_line, map_fields, raise_if_error
from components.errors import M1Error

# datasets is imported where a hub source is streamed (_streams): seconds of start-up, and offline sources never need
# it.


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
        self.entry = hub_catalogue.lookup(spec.dataset)
        if self.entry is None and spec.fields is None:
            raise M1Error(
                f"source {spec.name}: unknown hub dataset {spec.dataset!r}; known: {', '.join(sorted(hub_catalogue.CATALOGUE))} "
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
            raise M1Error(f"source {self.spec.name} ({where}) cannot be read: {first_line(e)}") from None

    def to_row(self, raw: Any, index: int) -> SourceRow:
        raise_if_error(raw)
        if self.entry:
            return self.entry.convert(raw, index, self.spec.max_traces_per_problem)
        return map_fields(raw, index, self.spec.fields)


