"""Experiment tracking for stage code: one small Tracker over MLflow.

Stage code never opens the tracking server itself: the pipeline (or the CLI) decides where runs go and passes a
run id down (MLFLOW_RUN_ID in the environment, or `run_id=`), so Ray workers in other processes log into the same
run. Metrics are also appended to a local metrics.jsonl beside the stage's outputs, which DVC reads as plots."""
from __future__ import annotations

import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from components.config_base import Section


class TrackingConfig(Section):
    # sqlite file by default (no server needed); any MLflow server URI (http://...) when set.
    # MLFLOW_TRACKING_URI in the environment wins over this value.
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "m1"
    # Where new experiments keep artifacts: a local folder or s3://bucket/prefix (MLFLOW_S3_ENDPOINT_URL for MinIO).
    artifact_location: str | None = None
    enabled: bool = True
    # Which training checkpoints become MLflow logged models (models:/<model_id>, loadable by mlflow.pyfunc) with
    # their step and the metrics at that step (components/pipeline/mlflow_runs.py): `all` every checkpoint and the
    # final model; `final_and_best` the final model and the checkpoint best by checkpoint_metric; `final` the final
    # model; `none`. Each one uploads the weights (and the code): a 3B hybrid is ~6 GB a checkpoint, hence not `all`.
    log_checkpoints: Literal["all", "final_and_best", "final", "none"] = "final_and_best"
    # What makes a checkpoint the best, per training section (the transformer arm's stages use the hybrid's):
    # "min:<metric>" or "max:<metric>", read on the stage's run at the checkpoint's step.
    checkpoint_metric: dict[str, str] = {"align": "min:loss", "distill": "min:loss", "sft1": "min:loss",
                                         "sft2": "min:loss", "grpo": "max:reward_mean"}

    @field_validator("checkpoint_metric")
    @classmethod
    def _min_or_max(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [f"{k}: {m!r}" for k, m in v.items() if m.partition(":")[0] not in ("min", "max") or not m[4:]]
        if bad:
            raise ValueError(f"want 'min:<metric>' or 'max:<metric>', got {', '.join(bad)}")
        return v


# MLflow 3 UIs show an experiment as model training or as a GenAI app. Experiments made here are tagged as model
# training (the value the UI's own "Machine learning" choice writes). MLflow 3.17's UI decides by a switch of its
# own instead, remembered per browser and GenAI by default, which the URL parameter below sets: every link made
# here carries it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"


def tracking_uri(cfg: TrackingConfig) -> str:
    return absolute_uri(os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri)


def use_store(uri: str, registry: bool = False) -> None:
    """Point MLflow's fluent API at `uri` without touching the environment: mlflow.set_tracking_uri() also writes
    MLFLOW_TRACKING_URI and mlflow.set_registry_uri() MLFLOW_REGISTRY_URI (MLflow 3), which would make every later
    tracking_uri() or client in this process use this store instead of the user's setting."""
    import mlflow

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {name: os.environ.get(name) for name in names}
    mlflow.set_tracking_uri(uri)
    if registry:
        mlflow.set_registry_uri(uri)
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def absolute_uri(uri: str) -> str:
    """A relative sqlite path is made absolute (against the working directory) so that stage subprocesses and
    Ray workers started elsewhere write to the same database."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/") and ":memory:" not in uri:
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store; it names this environment's mlflow by its path, so it
    works pasted into a shell without the virtual environment activated."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    exe = Path(sys.executable).parent / "mlflow"
    return f"{exe if exe.exists() else 'mlflow'} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def experiment_link(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The UI address of an experiment (or one of its runs) in the model-training view: the server at `uri`, or
    the `mlflow ui` of ui_command for a local store."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + f"?{TRAINING_VIEW}"


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    return experiment_link(uri, experiment_id, run_id)


def setup_mlflow(cfg: TrackingConfig) -> str:
    """Point MLflow at the configured store and experiment (created on first use); returns the experiment id."""
    import mlflow

    uri = tracking_uri(cfg)
    use_store(uri)
    exp_id = ensure_experiment(cfg, uri)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def ensure_experiment(cfg: TrackingConfig, uri: str) -> str:
    """The id of cfg.experiment in the store at `uri`, created when missing, tagged as model training
    (EXPERIMENT_KIND_TAG) unless it already has a kind. Without an explicit artifact_location, a sqlite store
    keeps artifacts in mlruns/<experiment> beside the database file."""
    with store_lock(uri):
        return _ensure_experiment(cfg, uri)


@contextmanager
def store_lock(uri: str):
    """Held while a process first opens a sqlite store: MLflow migrates a new database's schema on first use, and
    two processes doing it at once collide (alembic: "table _alembic_tmp_experiments already exists", seen with
    two flow runs started together on a fresh store). A lock file beside the database; other stores need none."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or ":memory:" in uri:
        yield
        return
    import fcntl

    db = Path(uri[len(prefix):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ensure_experiment(cfg: TrackingConfig, uri: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = cfg.artifact_location
        if location is None and uri.startswith("sqlite:///"):
            location = str(Path(uri[len("sqlite:///"):]).parent / "mlruns" / cfg.experiment)
        try:
            return client.create_experiment(cfg.experiment, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
        except Exception:  # created by another process meanwhile
            exp = client.get_experiment_by_name(cfg.experiment)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made before this tag, or by another tool: a kind the user chose stays
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


class Tracker:
    """Logs to one MLflow run (by id) and to a local JSONL file; either may be absent."""

    def __init__(self, run_id: str | None = None, local_dir: str | Path | None = None, uri: str | None = None):
        self.run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.local = Path(local_dir) / "metrics.jsonl" if local_dir else None
        self._client = None
        if self.local:
            self.local.parent.mkdir(parents=True, exist_ok=True)

    @property
    def client(self):
        if self._client is None and self.run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri) if self.uri else MlflowClient()
        return self._client

    def log_params(self, params: dict[str, Any]) -> None:
        if self.client:
            flat = _flatten(params)
            from mlflow.entities import Param

            items = [Param(mlflow_key(k), str(v)[:6000]) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if self.local:
            with self.local.open("a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self.client:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), v, ts, step or 0)
                                                        for k, v in clean.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.client:
            p = Path(path)
            if p.is_dir():
                self.client.log_artifacts(self.run_id, str(p), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_checkpoint(self, stage: str, step: int, path: str) -> None:
        """A checkpoint was written: printed, and on the run as metric checkpoint_step (its step, at that step) and
        tag m1.checkpoint (where the newest is), so the run shows the steps a resume can start from."""
        print(f"[{stage}] checkpoint step {step} written: {path}", flush=True)
        if self.client:
            from mlflow.entities import Metric

            self.client.log_batch(self.run_id, metrics=[Metric("checkpoint_step", float(step),
                                                               int(time.time() * 1000), step)])
            self.set_tags({"m1.checkpoint": path})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.client:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, mlflow_key(k), str(v))


_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")


def mlflow_key(name: str) -> str:
    """MLflow accepts only alphanumerics, _ - . space : / in metric/param/tag names ("pass@1" -> "pass_1")."""
    return _BAD_KEY_CHARS.sub("_", str(name))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextmanager
def standalone_run(cfg: TrackingConfig, name: str, tags: dict | None = None):
    """For CLI use outside the pipeline: open an MLflow run unless one was handed down, expose it as MLFLOW_RUN_ID."""
    if not cfg.enabled or os.environ.get("MLFLOW_RUN_ID"):
        yield os.environ.get("MLFLOW_RUN_ID")
        return
    import mlflow

    setup_mlflow(cfg)
    had_uri = "MLFLOW_TRACKING_URI" in os.environ
    with mlflow.start_run(run_name=name, tags=tags) as run:
        os.environ["MLFLOW_RUN_ID"] = run.info.run_id
        os.environ.setdefault("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())
        try:
            yield run.info.run_id
        finally:
            # leave the environment as found: a later run in this process must not inherit this store
            os.environ.pop("MLFLOW_RUN_ID", None)
            if not had_uri:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
