"""MLflow runs of a pipeline run: one parent run, one nested run per stage (cached stages included, tagged
as such). While a stage runs, its run id is in the environment (MLFLOW_RUN_ID, MLFLOW_TRACKING_URI), so stage
code logs into it through components.tracking.Tracker, from this process or any Ray worker it starts."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from components.pipeline.hashing import dvc_md5
from components.tracking import Tracker, ensure_experiment, run_link, tracking_uri


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def experiment_id(cfg, uri: str) -> str:
    return ensure_experiment(cfg, uri)


class PipelineRuns:
    """The parent run and its nested stage runs; every method is a no-op when tracking is disabled."""

    def __init__(self, config, run_name: str, tags: dict | None = None):
        self.config = config
        self.enabled = config.tracking.enabled
        self.uri = tracking_uri(config.tracking) if self.enabled else None
        self.experiment_id = None
        self.parent_id = None
        self.run_name = run_name
        self.tags = tags or {}

    def start(self) -> str | None:
        if not self.enabled:
            return None
        self.experiment_id = experiment_id(self.config.tracking, self.uri)
        run = _client(self.uri).create_run(self.experiment_id, run_name=self.run_name,
                                           tags={"m1.profile": self.config.profile, **self.tags})
        self.parent_id = run.info.run_id
        Tracker(self.parent_id, uri=self.uri).log_params(
            {"profile": self.config.profile, "run_dir": self.config.run_dir, "seed": self.config.seed,
             "teacher": self.config.teacher.model_dump(mode="json")})
        return self.parent_id

    def start_stage(self, stage: str) -> str | None:
        if not self.enabled:
            return None
        run = _client(self.uri).create_run(
            self.experiment_id, run_name=stage,
            tags={"mlflow.parentRunId": self.parent_id, "m1.stage": stage, "m1.profile": self.config.profile})
        return run.info.run_id

    def log_stage(self, run_id: str | None, params: dict, result, cached: bool) -> None:
        if not (self.enabled and run_id):
            return
        t = Tracker(run_id, uri=self.uri)
        t.log_params(params)
        t.log_metrics({**result.metrics, "stage_seconds": result.seconds})
        t.set_tags({"m1.cached": str(cached).lower(), "m1.cache_key": result.cache_key,
                    **{f"m1.output_md5.{k}": v for k, v in result.output_hashes.items()},
                    **({"m1.cached_from_run": result.mlflow_run_id} if cached and result.mlflow_run_id else {})})

    def log_datasets(self, run_ids: list[str | None], datasets: dict[str, Path], context: str) -> dict[str, str]:
        """Log datasets (their DVC hashes as digests) as inputs of the given runs; returns {name: dvc md5}."""
        hashes = {name: dvc_md5(path) for name, path in datasets.items()}
        if not self.enabled or not datasets:
            return hashes
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for name, path in datasets.items():
            md5 = hashes[name]
            source = json.dumps({"uri": str(Path(path).resolve()), "dvc_md5": md5})
            ds = Dataset(name=name, digest=md5, source_type="dvc", source=source,
                         profile=json.dumps({"dvc_md5": md5}))
            inputs.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)]))
        client = _client(self.uri)
        for run_id in run_ids:
            if run_id:
                client.log_inputs(run_id, datasets=inputs)
        return hashes

    def end_stage(self, run_id: str | None, ok: bool) -> None:
        if self.enabled and run_id:
            _client(self.uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def end(self, ok: bool, metrics: dict | None = None) -> None:
        if not (self.enabled and self.parent_id):
            return
        if metrics:
            Tracker(self.parent_id, uri=self.uri).log_metrics(metrics)
        _client(self.uri).set_terminated(self.parent_id, "FINISHED" if ok else "FAILED")

    def link(self, run_id: str | None) -> str | None:
        if not (self.enabled and run_id):
            return None
        return run_link(self.uri, self.experiment_id, run_id)


@contextmanager
def stage_env(run_id: str | None, uri: str | None, ray_address: str | None = None):
    """The environment a stage runs in, restored afterwards: its MLflow run (MLFLOW_RUN_ID, MLFLOW_TRACKING_URI)
    and the Ray cluster to join (RAY_ADDRESS, from pipeline.ray_address), which Ray workers inherit."""
    updates = {"MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": uri if run_id else None, "RAY_ADDRESS": ray_address}
    updates = {k: v for k, v in updates.items() if v}
    saved = {k: os.environ.get(k) for k in updates}
    try:
        os.environ.update(updates)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
