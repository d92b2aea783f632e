"""Settings of the pipeline itself (`pipeline:` in params.yaml): which stages run, where Prefect keeps cached
results, retries, the model registry and its promotion gate, S3 and Ray. Stage settings live in their own
sections; nothing here changes what a stage computes, so none of it keys a stage's cache."""
from __future__ import annotations

import os
import re

from pydantic import Field, field_validator, model_validator

from components.config_base import Section

_ALIAS = r"^[a-z][a-z0-9_-]*$"


class RetryConfig(Section):
    # Transient failures (network, a preempted worker, OOM on a shared GPU) are retried; bad input (M1Error)
    # never is. Delays grow as delay_s * 2**attempt.
    retries: int = Field(2, ge=0)
    delay_s: float = Field(10.0, ge=0)
    jitter: float = Field(0.2, ge=0, le=1)


class GateMetric(Section):
    # A key of the evaluation metrics as the evaluate stage reports them (<model>/<benchmark>/<metric>, the
    # evaluated hybrid being "hybrid", all benchmarks pooled under "all").
    metric: str = Field(min_length=1)
    # The candidate must beat the champion by more than this (absolute, in the metric's units).
    min_improvement: float = Field(0.0, ge=0)
    higher_is_better: bool = True
    # Floor every promotion must clear, including the first one (when there is no champion yet): the metric
    # must be strictly better than it (above it, or below when lower is better).
    min_value: float | None = None


class PromotionConfig(Section):
    # Registered model name; None = "m1-hybrid" for the default profile and "m1-hybrid-<profile>" for the
    # others, so that a tiny or test run never competes with the default profile's champion.
    model_name: str | None = Field(None, min_length=1)
    candidate_alias: str = Field("candidate", pattern=_ALIAS)
    champion_alias: str = Field("champion", pattern=_ALIAS)
    # Every listed metric must pass for `champion` to move; an empty list promotes every candidate. By default
    # pass@1 must beat the champion's and be above 0: a model that solves nothing never becomes the first champion.
    gate: list[GateMetric] = Field(default_factory=lambda: [GateMetric(metric="hybrid/all/pass_at_1", min_value=0.0)])
    # Tokens the pyfunc wrapper generates per prompt unless the caller passes max_new_tokens.
    max_new_tokens: int = Field(256, gt=0)

    def registered_name(self, profile: str) -> str:
        if self.model_name:
            return self.model_name
        return "m1-hybrid" if profile == "default" else f"m1-hybrid-{profile}"

    @model_validator(mode="after")
    def _aliases_differ(self):
        if self.candidate_alias == self.champion_alias:
            raise ValueError(f"candidate_alias and champion_alias are both {self.candidate_alias!r}")
        names = [g.metric for g in self.gate]
        if len(set(names)) != len(names):
            raise ValueError(f"gate lists a metric twice: {names}")
        return self


class S3Config(Section):
    # S3-compatible endpoint (MinIO, a moto server, ...); None = AWS itself, or AWS_ENDPOINT_URL /
    # MLFLOW_S3_ENDPOINT_URL when set in the environment.
    endpoint_url: str | None = None
    region: str | None = None

    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")


class StageResources(Section):
    # What one stage asks of the cluster; printed by `m1 pipeline --dry-run` and passed to Ray by stages
    # that fan out.
    nodes: int = Field(1, ge=1)
    cpus: float = Field(1, gt=0)
    gpus: float = Field(0, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    gpu_type: str | None = None


class PipelineConfig(Section):
    # Stages to run (their upstream stages are included, from cache when unchanged); None = all registered.
    stages: list[str] | None = None
    # Where Prefect persists stage results (the cache): a local path or s3://bucket/prefix; None =
    # $M1_RESULT_STORAGE, else <run_dir>/.prefect-results.
    result_storage: str | None = None
    # s3://bucket/prefix to mirror each finished stage's outputs (checkpoints, models) to; None =
    # $M1_CHECKPOINT_URI, else local only.
    checkpoint_uri: str | None = None
    retries: RetryConfig = RetryConfig()
    promotion: PromotionConfig = PromotionConfig()
    s3: S3Config = S3Config()
    # Ray cluster to join ("ray://host:10001" or "auto"); None = RAY_ADDRESS from the environment, else a
    # local cluster started by the stage that needs it.
    ray_address: str | None = None
    resources: dict[str, StageResources] = Field(default_factory=dict)

    def storage_location(self) -> str | None:
        return self.result_storage or os.environ.get("M1_RESULT_STORAGE") or None

    def mirror_location(self) -> str | None:
        uri = self.checkpoint_uri or os.environ.get("M1_CHECKPOINT_URI") or None
        if uri is not None and not uri.startswith("s3://"):
            from components.errors import M1Error

            raise M1Error(f"M1_CHECKPOINT_URI must be an s3://bucket/prefix URI, got {uri!r}")
        return uri

    @field_validator("checkpoint_uri")
    @classmethod
    def _s3_only(cls, v):
        if v is not None and not v.startswith("s3://"):
            raise ValueError(f"must be an s3://bucket/prefix URI, got {v!r}")
        return v

    @field_validator("result_storage")
    @classmethod
    def _storage(cls, v):
        if v is not None and re.match(r"^[a-z0-9]+://", v) and not v.startswith(("s3://", "file://")):
            raise ValueError(f"must be a local path or an s3://bucket/prefix URI, got {v!r}")
        return v

    @field_validator("stages")
    @classmethod
    def _known_stage_list(cls, v):
        from components.pipeline.stages import stage_names

        known = stage_names()
        for name in v or []:
            if name not in known:
                raise ValueError(f"unknown stage {name!r}; registered stages: {', '.join(known)}")
        return v

    @field_validator("resources")
    @classmethod
    def _known_stage_resources(cls, v):
        from components.pipeline.stages import stage_names

        known = stage_names()
        for name in v:
            if name not in known:
                raise ValueError(f"unknown stage {name!r}; registered stages: {', '.join(known)}")
        return v
