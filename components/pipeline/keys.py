"""Cache keys of stages and the record a finished stage leaves in the cache.

key = sha256 of canonical JSON over: the stage's name and call kwargs, the values of its config sections, the
absolute run_dir (outputs are written there, so another run_dir is another result), the code version (sources
of the stage's package and of every repo module it imports), the versions of the libraries that shape results,
the stage's key_extra (register: the registry it writes to) and the content hashes of its upstream stages'
outputs. A stage whose inputs did not change therefore gets the same key and Prefect returns its persisted
result."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.errors import M1Error
from components.hashing import (
    canonical_sha256,
    code_version,
    dvc_md5,
    library_versions,
)
from components.pipeline.stages import ROOT, Stage

_MISSING = object()


def config_value(config, dotted: str):
    node: Any = config.model_dump(mode="json")
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise M1Error(f"stage config key {dotted!r} does not exist in the config")
        node = node[part]
    return node


def config_material(config, stage: Stage) -> dict:
    return {k: config_value(config, k) for k in stage.config_keys}


def key_material(config, stage: Stage, upstream_hashes: dict[str, str]) -> dict:
    missing = [u for u in stage.upstream if u not in upstream_hashes]
    if missing:
        raise M1Error(f"stage {stage.name}: upstream results missing for {missing}")
    material = {
        "stage": stage.name,
        "kwargs": stage.kwargs,
        "config": config_material(config, stage),
        "run_dir": str(Path(config.run_dir).resolve()),
        "code": code_version(stage.code_paths(ROOT), ROOT),
        "libraries": library_versions(),
        "upstream": {u: upstream_hashes[u] for u in stage.upstream},
    }
    if stage.key_extra is not None:
        material["extra"] = stage.key_extra(config)
    return material


def cache_key(config, stage: Stage, upstream_hashes: dict[str, str]) -> str:
    return f"m1-{stage.name}-{canonical_sha256(key_material(config, stage, upstream_hashes))}"


@dataclass
class StageResult:
    """What the cache holds for a finished stage (pickled by Prefect): its outputs and their content hashes."""

    stage: str
    cache_key: str
    outputs: Any
    output_hashes: dict[str, str]
    metrics: dict[str, float]
    seconds: float
    mlflow_run_id: str | None = None
    finished_at: float = field(default_factory=time.time)

    @property
    def output_hash(self) -> str:
        return canonical_sha256(self.output_hashes)

    def outputs_intact(self, stage: Stage) -> bool:
        """True when every hashed output still exists with the content it had when the stage finished."""
        try:
            return hash_outputs(stage, self.outputs) == self.output_hashes
        except (FileNotFoundError, M1Error):
            return False


def hash_outputs(stage: Stage, outputs) -> dict[str, str]:
    return {name: dvc_md5(p) for name, p in sorted(stage.output_paths(outputs).items())}


def extract_metrics(outputs) -> dict[str, float]:
    """`metrics` of the outputs when present, else the numeric fields (dicts flattened as a.b)."""
    import dataclasses

    src = getattr(outputs, "metrics", None)
    if src is None and dataclasses.is_dataclass(outputs):
        src = {f.name: getattr(outputs, f.name) for f in dataclasses.fields(outputs)}
    flat: dict[str, float] = {}

    def put(prefix: str, v) -> None:
        if isinstance(v, bool):
            return
        if isinstance(v, (int, float)):
            flat[prefix] = float(v)
        elif isinstance(v, dict):
            for k, vv in v.items():
                put(f"{prefix}.{k}" if prefix else str(k), vv)

    put("", src or {})
    return flat
