"""MLflow runs of a pipeline run: one parent run, one nested run per stage (cached stages included, tagged
as such). While a stage runs, its run id is in the environment (MLFLOW_RUN_ID, MLFLOW_TRACKING_URI), so stage
code logs into it through components.tracking.Tracker, from this process or any Ray worker it starts.

Crashes and interrupts: every run is tagged with its owner (host:pid:process start, m1.owner). A run that ends by
Ctrl-C or a termination signal is KILLED; one whose process was killed outright stays RUNNING until the next
pipeline run of the profile finds its owner gone and marks it KILLED. A stage run again with the same cache key
after such an end (or a failure) continues that stage's earlier run, so a resumed training curve is one series.

Checkpoints: while a training stage runs, watch_checkpoints reports each checkpoint it writes and, as
tracking.log_checkpoints says, logs it as an MLflow logged model of the stage's run (CheckpointModels): its step,
the run's metrics at that step (linked to the stage's datasets), its settings as params, loadable by
`models:/<model_id>` through the pyfunc wrapper; the final published model too, which the register stage
registers."""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from components.hashing import dvc_md5
from components.tracking import (
    Tracker,
    _flatten,
    ensure_experiment,
    mlflow_key,
    run_link,
    tracking_uri,
    use_store,
)


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


def training_section(config, stage: str):
    """(name, typed section) a training stage trains with: its own (distill, sft1, sft2, grpo), or the hybrid's for
    the transformer arm's stages (transformer_sft1 -> sft1); None for other stages."""
    for name in (stage, stage.removeprefix("transformer_")):
        section = getattr(config, name, None)
        if hasattr(section, "checkpoint_every"):
            return name, section
    return None


def checkpoint_root(config, stage: str) -> str | None:
    """Where a training stage keeps its checkpoints (the layout of components.train.harness); None for other
    stages."""
    found = training_section(config, stage)
    if found is None:
        return None
    return found[1].checkpoint_storage or str((Path(config.run_dir) / stage / "checkpoints").resolve())


def newest_checkpoint_step(config, stage: str) -> int | None:
    """The step of the newest complete checkpoint in the stage's checkpoint folder (any settings), if any."""
    root = checkpoint_root(config, stage)
    if root is None:
        return None
    from components.train.checkpoint import list_checkpoints

    steps = [step for step, _ in list_checkpoints(root)]
    return max(steps) if steps else None


def _model_files(src: Path, dest: Path) -> Path:
    """The model of a checkpoint or model directory, without the trainer state (optimizer, RNG) and hidden files:
    hard links (a copy across file systems) in `dest`, which then loads by HybridForCausalLM.from_pretrained."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        if f.is_dir() or rel.parts[0].startswith((".", "trainer_state")):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, dest / rel)
        except OSError:
            shutil.copy2(f, dest / rel)
    return dest


class CheckpointModels:
    """The logged models of one training stage's run, as tracking.log_checkpoints says: `all` logs each checkpoint
    when it appears and the final model; `final_and_best` the final model and, at the end, the checkpoint best by
    tracking.checkpoint_metric (hard links keep its files when the loop prunes it; none when the best is the final
    step: the final model is that one, tagged m1.best); `final` the final model; `none` nothing.

    A logged model (name `<stage>-step-<N>` or `<stage>-final`) is the stage run's output at its step, with the
    run's metrics at that step (heldout/* linked to the stage's held-out dataset, the rest to its training set, as
    the run's dataset inputs name them), the stage's settings as params and tags m1.stage, m1.step, m1.kind
    (checkpoint | final), m1.best, m1.checkpoint (the folder), m1.fingerprint, m1.datasets; the final model also
    m1.model_md5 (its DVC hash: the registry finds it by that). Logging never fails the stage: an error is one
    printed line."""

    def __init__(self, runs: PipelineRuns, run_id: str | None, stage: str):
        config = runs.config
        self.policy = config.tracking.log_checkpoints if runs.enabled and run_id else "none"
        self.runs, self.run_id, self.stage = runs, run_id, stage
        self.out_dir = Path(config.run_dir) / stage
        section_name, section = training_section(config, stage)
        spec = config.tracking.checkpoint_metric.get(section_name, "")
        self.best_sign = -1.0 if spec.startswith("min:") else 1.0
        self.best_key = spec.partition(":")[2] or None
        self.data = {"train": getattr(section, "data", None),
                     "heldout": getattr(section, "heldout", None) or getattr(section, "data", None)}
        self.params = {mlflow_key(k): str(v)[:6000] for k, v in
                       _flatten(section.model_dump(mode="json")).items()}
        self.max_new_tokens = config.pipeline.promotion.max_new_tokens
        self.started = time.time_ns()
        self.logged: dict[int, str] = {}  # step -> model id of the checkpoints logged
        self.best: dict | None = None  # step, value, path, metrics, held (hard-linked files) of the best so far
        self._client = None

    @property
    def client(self):
        if self._client is None:
            use_store(self.runs.uri)  # mlflow.pyfunc.log_model and finalize_logged_model use the fluent store
            self._client = _client(self.runs.uri)
        return self._client

    def checkpoint(self, step: int, path: str) -> None:
        """A checkpoint appeared (polled from the watcher's thread)."""
        if self.policy not in ("all", "final_and_best"):
            return
        metrics = self.metrics_at(step)
        if self.policy == "all":
            self._try(step, lambda: self.logged.__setitem__(step, self.log(Path(path), step, metrics, path)))
        value = metrics.get(mlflow_key(self.best_key or ""))
        if value is None or (self.best is not None and not self.best_sign * (value - self.best["value"]) > 0):
            return
        held = None
        if self.policy == "final_and_best":
            held = Path(tempfile.mkdtemp(prefix=".m1-best-", dir=self.out_dir))
            try:
                _model_files(Path(path), held)
                complete = (held / "config.json").is_file() and any(held.glob("*.safetensors"))
            except OSError:
                complete = False
            if not complete:  # pruned meanwhile: the earlier best stays
                shutil.rmtree(held, ignore_errors=True)
                return
        self.close()
        self.best = {"step": step, "value": value, "path": path, "metrics": metrics, "held": held}

    def finish(self) -> None:
        """The stage ended normally: log its final model (unless it was not written by this run: a cached stage)
        and the best checkpoint."""
        final = self.out_dir / "model"
        if self.policy == "none" or not (final / "config.json").is_file():
            return
        if (final / "config.json").stat().st_mtime_ns < self.started - 1_000_000_000:
            return  # published before this stage started: cached, nothing new
        summary = {}
        for f in sorted(self.out_dir.glob("*_metrics.json")):  # the loop's summary (train_ / grpo_metrics.json)
            with suppress(OSError, ValueError):
                summary.update({k: float(v) for k, v in json.loads(f.read_text()).items()
                                if isinstance(v, (int, float))})
        step = int(summary.get("steps") or max([*self.logged, self.best["step"] if self.best else 0]))
        best = self.best
        final_is_best = best is not None and best["step"] == step
        self._try(step, lambda: self.log(final, step, {**self.metrics_at(step), **summary}, None, best=final_is_best,
                                         tags={"m1.model_md5": dvc_md5(final)}))
        if best is None or final_is_best:
            return
        if self.policy == "all" and best["step"] in self.logged:
            self._try(best["step"], lambda: self.client.set_logged_model_tags(self.logged[best["step"]],
                                                                              {"m1.best": "true"}))
        elif self.policy == "final_and_best":
            self._try(best["step"], lambda: self.log(best["held"], best["step"], best["metrics"], best["path"],
                                                     best=True))

    def close(self) -> None:
        if self.best and self.best["held"]:
            shutil.rmtree(self.best["held"], ignore_errors=True)

    def metrics_at(self, step: int) -> dict[str, float]:
        """The stage run's metrics logged at `step` (the newest value of each; checkpoint_step left out)."""
        out: dict[str, tuple[int, float]] = {}
        client = self.client
        for key in client.get_run(self.run_id).data.metrics:
            if key == "checkpoint_step":
                continue
            for m in client.get_metric_history(self.run_id, key):
                if m.step == step and m.model_id is None and (key not in out or m.timestamp >= out[key][0]):
                    out[key] = (m.timestamp, m.value)
        return {k: v for k, (_, v) in out.items()}

    def log(self, model_dir: Path, step: int, metrics: dict[str, float], checkpoint: str | None,
            best: bool = False, tags: dict | None = None) -> str:
        """One logged model of the stage run from `model_dir` (a checkpoint when `checkpoint` names its folder,
        else the final model); returns its id."""
        from mlflow.entities import LoggedModelOutput, Metric

        from components.pipeline.pyfunc_model import log_hybrid

        client = self.client
        run = client.get_run(self.run_id)
        digests = {d.dataset.name: d.dataset.digest for d in (run.inputs.dataset_inputs if run.inputs else [])}
        linked = {kind: (name, digests[name]) for kind, name in self.data.items() if name in digests}
        meta = {}
        if checkpoint:
            with suppress(OSError, ValueError):
                meta = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        model = client.create_logged_model(
            run.info.experiment_id, name=f"{self.stage}-step-{step}" if checkpoint else f"{self.stage}-final",
            source_run_id=self.run_id, params=self.params, model_type="m1-hybrid",
            tags={"m1.stage": self.stage, "m1.step": str(step), "m1.kind": "checkpoint" if checkpoint else "final",
                  "m1.best": str(best).lower(), "m1.profile": self.runs.config.profile,
                  "m1.datasets": json.dumps({n: d for n, d in linked.values()}),
                  **({"m1.checkpoint": checkpoint} if checkpoint else {}),
                  **({"m1.fingerprint": meta["fingerprint"]} if meta.get("fingerprint") else {}), **(tags or {})})
        with tempfile.TemporaryDirectory(prefix=".m1-model-", dir=self.out_dir) as tmp:
            # the artifact folder is named after the checkpoint (checkpoint_000002), or `model` for the final
            files = _model_files(model_dir, Path(tmp) / Path(checkpoint).name) if checkpoint else model_dir
            log_hybrid(files, self.max_new_tokens, model_id=model.model_id, step=step, name=model.name)
        client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])
        ts = int(time.time() * 1000)
        batch = []
        for k, v in metrics.items():
            name, digest = linked.get("heldout" if k.startswith("heldout/") else "train", (None, None))
            batch.append(Metric(mlflow_key(k), float(v), ts, step, model_id=model.model_id, dataset_name=name,
                                dataset_digest=digest))
        for i in range(0, len(batch), 500):
            client.log_batch(self.run_id, metrics=batch[i:i + 500])
        return model.model_id

    def _try(self, step: int, action) -> None:
        try:
            action()
        except Exception as e:  # noqa: BLE001 - bookkeeping must never fail the stage
            print(f"[{self.stage}] could not log the model of step {step} to MLflow: "
                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", flush=True)


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
        the stage's run) and log it as a model as tracking.log_checkpoints says (CheckpointModels); when the stage
        ends normally, its final model (and the best checkpoint) too. A thread polls the stage's local checkpoint
        folder, which the loop writes in this process or Ray Train from its workers, so neither has to know about
        this; a final look when the stage ends catches the last one. Checkpoints on S3 (checkpoint_storage) are
        not polled: only the final model is logged then."""
        root = checkpoint_root(self.config, stage)
        if root is None:
            yield
            return
        from components.train.checkpoint import STATE_JSON, list_checkpoints

        polled = "://" not in root

        def written() -> set:
            out = set()
            for step, path in list_checkpoints(root) if polled else []:
                try:
                    out.add((step, path, os.stat(os.path.join(path, STATE_JSON)).st_mtime_ns))
                except OSError:  # pruned meanwhile
                    pass
            return out

        seen = written()  # those of earlier runs are not news
        tracker = Tracker(run_id if self.enabled else None, uri=self.uri)
        models = CheckpointModels(self, run_id, stage)
        done = threading.Event()

        def look() -> None:
            for step, path, mtime in sorted(written() - seen):
                seen.add((step, path, mtime))
                tracker.log_checkpoint(stage, step, path)
                models.checkpoint(step, path)

        def poll() -> None:
            while not done.wait(interval):
                with suppress(Exception):  # bookkeeping must never fail the stage
                    look()

        thread = threading.Thread(target=poll, name=f"m1-checkpoints-{stage}", daemon=True)
        thread.start()
        ended = False
        try:
            yield
            ended = True
        finally:
            done.set()
            # interrupted or failed: a few seconds at most for a checkpoint being logged, so that the run ends
            # promptly (the next run of the stage logs what this one could not)
            thread.join(None if ended else 5.0)
            if not thread.is_alive():
                with suppress(Exception):
                    look()
            if ended:
                with suppress(Exception):  # each model's logging reports its own failure (CheckpointModels._try)
                    models.finish()
            models.close()

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
