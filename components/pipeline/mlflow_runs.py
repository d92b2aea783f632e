"""MLflow runs of a pipeline run: one parent run, one nested run per stage (cached stages included, tagged
as such). While a stage runs, its run id is in the environment (MLFLOW_RUN_ID, MLFLOW_TRACKING_URI), so stage
code logs into it through components.tracking.Tracker, from this process or any Ray worker it starts.

Crashes and interrupts: every run is tagged with its owner (host:pid:process start, m1.owner). A run that ends by
Ctrl-C or a termination signal is KILLED; one whose process was killed outright stays RUNNING until the next
pipeline run of the profile finds its owner gone and marks it KILLED. A stage run again with the same cache key
after such an end (or a failure) continues that stage's earlier run, so a resumed training curve is one series."""
from __future__ import annotations

import json
import os
import socket
import threading
from contextlib import contextmanager, suppress
from pathlib import Path

from components.hashing import dvc_md5
from components.tracking import Tracker, ensure_experiment, run_link, tracking_uri


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def experiment_id(cfg, uri: str) -> str:
    return ensure_experiment(cfg, uri)


def _started(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, from /proc), None when there is no such process. With
    the pid it tells the owner of a run from a later process that got the same pid. Without /proc: existence only."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "-"
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22, after "(comm)"
    except (OSError, IndexError):
        return None


def process_owner(pid: int | None = None) -> str:
    """host:pid:start of this process (or `pid`): what m1.owner tags and Prefect's m1.owner label hold."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_started(pid)}"


def owner_alive(owner: str) -> bool:
    """False only when the owner is known to be gone: same host, and no process with its pid and start time.
    An owner on another host cannot be checked from here and counts as alive (its runs are left alone)."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3:
        return True
    host, pid, start = parts
    if host != socket.gethostname() or not pid.isdigit():
        return True
    return _started(int(pid)) == start


def checkpoint_root(config, stage: str) -> str | None:
    """Where a training stage keeps its checkpoints (the layout of components.train.harness); None for other
    stages."""
    section = getattr(config, stage, None)
    if not hasattr(section, "checkpoint_every"):
        return None
    return section.checkpoint_storage or str((Path(config.run_dir) / stage / "checkpoints").resolve())


def newest_checkpoint_step(config, stage: str) -> int | None:
    """The step of the newest complete checkpoint in the stage's checkpoint folder (any settings), if any."""
    root = checkpoint_root(config, stage)
    if root is None:
        return None
    from components.train.checkpoint import list_checkpoints

    steps = [step for step, _ in list_checkpoints(root)]
    return max(steps) if steps else None


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
        self.killed: list[str] = []  # runs of this profile found orphaned and marked KILLED by start()

    def start(self) -> str | None:
        if not self.enabled:
            return None
        self.experiment_id = experiment_id(self.config.tracking, self.uri)
        self.killed = self.kill_orphans()
        run = _client(self.uri).create_run(self.experiment_id, run_name=self.run_name,
                                           tags={"m1.profile": self.config.profile, "m1.owner": process_owner(),
                                                 **self.tags})
        self.parent_id = run.info.run_id
        Tracker(self.parent_id, uri=self.uri).log_params(
            {"profile": self.config.profile, "run_dir": self.config.run_dir, "seed": self.config.seed,
             "teacher": self.config.teacher.model_dump(mode="json")})
        return self.parent_id

    def kill_orphans(self) -> list[str]:
        """Mark this profile's runs that are still RUNNING but whose owning process is gone (kill -9, a lost
        machine) as KILLED; returns their ids. Only runs a pipeline created (tagged m1.owner) are touched, and
        none whose owner may still be alive (another host, or a live process on this one)."""
        client = _client(self.uri)
        found = client.search_runs([self.experiment_id], max_results=1000, filter_string=(
            f"attributes.status = 'RUNNING' and tags.`m1.profile` = '{self.config.profile}'"))
        killed, me = [], process_owner()
        for r in found:
            owner = r.data.tags.get("m1.owner")
            if owner and owner != me and not owner_alive(owner):
                client.set_tag(r.info.run_id, "m1.killed_because", f"its process {owner} was gone when {me} started")
                client.set_terminated(r.info.run_id, "KILLED")
                killed.append(r.info.run_id)
        return killed

    def start_stage(self, stage: str, cache_key: str | None = None) -> str | None:
        """The stage's run: a new one, or the stage's newest KILLED/FAILED run with the same cache key (same
        inputs, settings and code, so a training stage resumes its checkpoints), which continues under this
        pipeline run: one run id, so the metrics of a resumed stage continue at the resumed step."""
        if not self.enabled:
            return None
        client = _client(self.uri)
        tags = {"mlflow.parentRunId": self.parent_id, "m1.stage": stage, "m1.profile": self.config.profile,
                "m1.owner": process_owner(), **({"m1.cache_key": cache_key} if cache_key else {})}
        earlier = self._unfinished(client, stage, cache_key) if cache_key else None
        if earlier is None:
            return client.create_run(self.experiment_id, run_name=stage, tags=tags).info.run_id
        run_id = earlier.info.run_id
        client.update_run(run_id, status="RUNNING")
        for k, v in {**tags, "m1.continued_from_parent": earlier.data.tags.get("mlflow.parentRunId", ""),
                     "m1.continued_after": earlier.info.status}.items():
            client.set_tag(run_id, k, v)
        return run_id

    def _unfinished(self, client, stage: str, cache_key: str):
        found = client.search_runs([self.experiment_id], max_results=20, order_by=["attributes.start_time DESC"],
                                   filter_string=f"tags.`m1.stage` = '{stage}' and tags.`m1.cache_key` = "
                                                 f"'{cache_key}' and tags.`m1.profile` = '{self.config.profile}'")
        # the newest run of this key decides: when it finished (or is running elsewhere), nothing is continued
        newest = next((r for r in found if r.data.tags.get("m1.owner")), None)
        return newest if newest is not None and newest.info.status in ("KILLED", "FAILED") else None

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

    def end_stage(self, run_id: str | None, status: str) -> None:
        """status: FINISHED, FAILED, or KILLED (interrupted: Ctrl-C, a termination signal)."""
        if self.enabled and run_id:
            _client(self.uri).set_terminated(run_id, status)

    def end(self, status: str, metrics: dict | None = None) -> None:
        if not (self.enabled and self.parent_id):
            return
        if metrics:
            Tracker(self.parent_id, uri=self.uri).log_metrics(metrics)
        _client(self.uri).set_terminated(self.parent_id, status)

    @contextmanager
    def watch_checkpoints(self, run_id: str | None, stage: str, interval: float = 1.0):
        """While a training stage runs, report each checkpoint it writes (Tracker.log_checkpoint: printed, and on
        the stage's run). A thread polls the stage's local checkpoint folder, which the loop writes in this
        process or Ray Train from its workers, so neither has to know about this; a final look when the stage
        ends catches the last one. Checkpoints on S3 (checkpoint_storage) are not polled."""
        root = checkpoint_root(self.config, stage)
        if root is None or "://" in root:
            yield
            return
        from components.train.checkpoint import STATE_JSON, list_checkpoints

        def written() -> set:
            out = set()
            for step, path in list_checkpoints(root):
                try:
                    out.add((step, path, os.stat(os.path.join(path, STATE_JSON)).st_mtime_ns))
                except OSError:  # pruned meanwhile
                    pass
            return out

        seen = written()  # those of earlier runs are not news
        tracker = Tracker(run_id if self.enabled else None, uri=self.uri)
        done = threading.Event()

        def look() -> None:
            for step, path, mtime in sorted(written() - seen):
                seen.add((step, path, mtime))
                tracker.log_checkpoint(stage, step, path)

        def poll() -> None:
            while not done.wait(interval):
                with suppress(Exception):  # bookkeeping must never fail the stage
                    look()

        thread = threading.Thread(target=poll, name=f"m1-checkpoints-{stage}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            with suppress(Exception):
                look()

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
