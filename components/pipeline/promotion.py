"""The MLflow model registry: the final hybrid is registered under model_name(config) (m1-hybrid for the default
profile, m1-hybrid-<profile> for the others) with the alias `candidate`; the promotion gate moves `champion` to it
only when its evaluation metrics beat the current champion's by more than the thresholds in
`pipeline.promotion.gate`. Every decision is written to the candidate version's tags (gate.decision,
gate.reason, gate.<metric>.*). Besides the gate's metrics (`metric.<name>` tags, and JSON in `m1.metrics`, which
later gates compare against without looking up runs) a version carries only its lineage (LINEAGE): the run that
logged it, the Prefect flow run, the DVC hash of the curated data, the git commit, the model's own DVC hash;
every metric stays on the run. Weights already registered (same content hash, tag `m1.model_md5`) reuse their
version instead of adding one.

A version is created from a logged model (source `models:/<model_id>`): the final model the training stage logged
(components/pipeline/mlflow_runs.py: same weights, found by `m1.model_md5`), which carries its step, metrics and
datasets; when no stage logged it (tracking.log_checkpoints: none, `m1 promote --model-dir`), one logged in the
registering run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from components.errors import M1Error
from components.hashing import dvc_md5
from components.tracking import mlflow_key, tracking_uri, use_store

ROOT = Path(__file__).resolve().parent.parent.parent
METRIC_TAG = "metric."  # one tag per metric, for reading in the UI (names made MLflow-safe)
METRICS_TAG = "m1.metrics"  # the gate's metrics as JSON under their own names: what the gate compares
CONTENT_TAG = "m1.model_md5"  # DVC hash of the model directory: identical weights reuse their version
FLOW_RUN_TAG = "prefect.flow_run_id"  # the pipeline's parent MLflow run carries it too
DATA_TAG = "m1.data_md5"  # DVC hash of the curated data directory (curate's output `data_dir`)
GIT_TAG = "m1.git_commit"  # HEAD of the code that registered the version, "-dirty" when tracked files differ
# The tags of a version besides the gate's: where it comes from. The source run tag is m1.source_run for the
# run that logged the model, m1.reused_by_run for a later run that found the same weights registered.
LINEAGE = (CONTENT_TAG, "m1.model_dir", "m1.profile", "m1.source_run", "m1.reused_by_run", FLOW_RUN_TAG, DATA_TAG,
           GIT_TAG)


@dataclass
class GateDecision:
    promoted: bool
    reason: str
    compared_to: str | None  # champion version, or None when there was none
    details: dict[str, dict] = field(default_factory=dict)
    version: str | None = None  # the version that was gated

    def tags(self) -> dict[str, str]:
        t = {"gate.decision": "promoted" if self.promoted else "rejected", "gate.reason": self.reason,
             "gate.compared_to": self.compared_to or "none", "gate.time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime())}
        for metric, d in self.details.items():
            for k, v in d.items():
                t[mlflow_key(f"gate.{metric}.{k}")] = str(v)
        return t


@dataclass
class RegisterOutputs:
    model_name: str
    version: str
    model_uri: str
    promoted: bool
    decision: str
    champion_version: str | None
    metrics: dict[str, float] = field(default_factory=dict)


def decide(gate, candidate: dict[str, float], champion: dict[str, float] | None,
           champion_version: str | None) -> GateDecision:
    """Pure gate logic: every gate metric must clear its floor and beat the champion by > min_improvement."""
    details: dict[str, dict] = {}
    failures: list[str] = []
    for g in gate:
        c = candidate.get(g.metric)
        d: dict = {"candidate": c}
        details[g.metric] = d
        if c is None or (isinstance(c, float) and math.isnan(c)):
            failures.append(f"candidate has no {g.metric}")
            continue
        sign = 1.0 if g.higher_is_better else -1.0
        if g.min_value is not None and not sign * (c - g.min_value) > 0:
            failures.append(f"{g.metric} {c:g} does not clear the floor {g.min_value:g}")
        ch = champion.get(g.metric) if champion is not None else None
        if ch is None:
            continue
        improvement = sign * (c - ch)
        d.update(champion=ch, improvement=round(improvement, 10), min_improvement=g.min_improvement)
        if not improvement > g.min_improvement:
            failures.append(f"{g.metric} {c:g} vs champion {ch:g}: improvement {improvement:+g} "
                            f"not above {g.min_improvement:g}")
    if failures:
        return GateDecision(False, "; ".join(failures), champion_version, details)
    if champion_version is None:
        return GateDecision(True, "no champion yet", None, details)
    beaten = ", ".join(f"{m} {d['candidate']:g} > {d['champion']:g}" for m, d in details.items() if "champion" in d)
    return GateDecision(True, f"beats champion v{champion_version}" + (f": {beaten}" if beaten else ""),
                        champion_version, details)


def model_name(config) -> str:
    return config.pipeline.promotion.registered_name(config.profile)


def _client(config):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri(config.tracking), registry_uri=tracking_uri(config.tracking))


def _version_by_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def version_metrics(mv) -> dict[str, float]:
    """The metrics a version was registered with (names as the evaluation reported them)."""
    raw = (mv.tags or {}).get(METRICS_TAG)
    if raw:
        return {k: float(v) for k, v in json.loads(raw).items()}
    out = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith(METRIC_TAG):
            try:
                out[k[len(METRIC_TAG):]] = float(v)
            except ValueError:
                pass
    return out


def _version_with_content(client, name: str, content: str):
    """The newest version of `name` registered with these exact model files, or None."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{CONTENT_TAG}` = '{content}'",
                                         order_by=["version_number DESC"], max_results=1)
    return found[0] if found else None


def git_commit() -> str | None:
    """HEAD of the repository the code runs from, "-dirty" appended when tracked files differ; None outside git."""
    def git(*args: str):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        return head.stdout.strip() + ("-dirty" if git("diff", "--quiet", "HEAD", "--").returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return None


def lineage(config, client, run_id: str) -> dict[str, str]:
    """The lineage tags a version gets from the run that registers it (LINEAGE): inside a pipeline run, the
    Prefect flow run id of the parent MLflow run and the data hash its curate stage run recorded; outside one
    (`m1 stage register` under DVC, `m1 promote`), PREFECT__FLOW_RUN_ID and the hash of <run_dir>/data when
    present. The git commit always, when the code runs from a git checkout."""
    run = client.get_run(run_id)
    tags: dict[str, str | None] = {FLOW_RUN_TAG: os.environ.get("PREFECT__FLOW_RUN_ID"), DATA_TAG: None,
                                   GIT_TAG: git_commit() or run.data.tags.get("mlflow.source.git.commit")}
    parent = run.data.tags.get("mlflow.parentRunId")
    if parent:
        tags[FLOW_RUN_TAG] = client.get_run(parent).data.tags.get(FLOW_RUN_TAG) or tags[FLOW_RUN_TAG]
        curate = client.search_runs([run.info.experiment_id], max_results=1, filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent}' and tags.`m1.stage` = 'curate'"))
        if curate:
            tags[DATA_TAG] = curate[0].data.tags.get("m1.output_md5.data_dir")
    data = Path(config.run_dir) / "data"
    if tags[DATA_TAG] is None and not parent and data.is_dir():
        tags[DATA_TAG] = dvc_md5(data)
    return {k: v for k, v in tags.items() if v}


def stage_logged_model(client, experiment: str, content: str):
    """The newest finished logged model of the experiment holding these model files (tag m1.model_md5: a training
    stage's final model), or None."""
    from mlflow.entities import LoggedModelStatus

    found = client.search_logged_models([experiment], filter_string=f"tags.`{CONTENT_TAG}` = '{content}'",
                                        order_by=[{"field_name": "creation_time", "ascending": False}])
    return next((m for m in found if m.status == LoggedModelStatus.READY), None)


def _version_from_logged_model(client, name: str, model):
    """A new version of `name` whose source is the logged model (models:/<model_id>), linked to its run."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return client.create_model_version(name, source=f"models:/{model.model_id}", run_id=model.source_run_id,
                                       model_id=model.model_id, await_creation_for=60)


def register_model(config, model_dir: str | Path, metrics: dict[str, float], tags: dict | None = None) -> str:
    """Register `model_dir` from its logged model (the one a training stage logged with the same files, else one
    logged now as a pyfunc model in the current stage run, MLFLOW_RUN_ID, or a new run), or reuse the version that
    holds the same files; tag the version with the gate's metrics and point the candidate alias at it; returns the
    version. Every metric is logged to the registering run; the version keeps the gate's metrics and its lineage
    (m1.source_run: the run that logged the model), and loses tags of an earlier registration that are neither."""
    import mlflow

    from components.pipeline.mlflow_runs import experiment_id
    from components.pipeline.pyfunc_model import log_hybrid

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise M1Error(f"not a hybrid model directory (no config.json): {model_dir}")
    promo = config.pipeline.promotion
    name = model_name(config)
    uri = tracking_uri(config.tracking)
    use_store(uri, registry=True)
    client = _client(config)
    content = dvc_md5(model_dir)
    same = _version_with_content(client, name, content)
    run_id = os.environ.get("MLFLOW_RUN_ID")
    exp = experiment_id(config.tracking, uri)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp,
                          run_name=None if run_id else "register") as run:
        this_run = model_run = run.info.run_id
        if same is None:
            logged = stage_logged_model(client, exp, content)
            if logged is None:
                logged = client.get_logged_model(log_hybrid(model_dir, promo.max_new_tokens).model_id)
            model_run = logged.source_run_id or this_run
            version = str(_version_from_logged_model(client, name, logged).version)
        else:
            version = str(same.version)
        if metrics:
            mlflow.log_metrics({mlflow_key(k): float(v) for k, v in metrics.items()})
    gated = {g.metric: metrics[g.metric] for g in promo.gate if g.metric in metrics}
    version_tags = {mlflow_key(f"{METRIC_TAG}{k}"): v for k, v in gated.items()}
    version_tags.update({METRICS_TAG: json.dumps(gated), CONTENT_TAG: content, "m1.model_dir": str(model_dir.resolve()),
                         "m1.profile": config.profile,
                         **({"m1.source_run": model_run} if same is None else {"m1.reused_by_run": this_run}),
                         **lineage(config, client, this_run), **(tags or {})})
    if same is not None:  # metric tags of an earlier evaluation that the gate no longer reads, stale lineage
        for k in same.tags:
            if (k.startswith(METRIC_TAG) or k in LINEAGE) and k not in version_tags and k != "m1.source_run":
                client.delete_model_version_tag(name, version, k)
    for k, v in version_tags.items():
        client.set_model_version_tag(name, version, k, str(v))
    client.set_registered_model_alias(name, promo.candidate_alias, version)
    return version


def promote(config, version: str | None = None) -> GateDecision:
    """Gate `version` (default: the candidate) against the champion; move `champion` when it passes."""
    promo = config.pipeline.promotion
    name = model_name(config)
    client = _client(config)
    if version is None:
        mv = _version_by_alias(client, name, promo.candidate_alias)
        if mv is None:
            raise M1Error(f"no version of {name} has the alias {promo.candidate_alias!r}; "
                          f"register one first (the pipeline's register stage, or m1 promote --model-dir)")
    else:
        from mlflow.exceptions import MlflowException

        try:
            mv = client.get_model_version(name, str(version))
        except MlflowException:
            raise M1Error(f"{name} has no version {version}") from None
    champ = _version_by_alias(client, name, promo.champion_alias)
    version = str(mv.version)
    champ_version = str(champ.version) if champ is not None else None
    if champ_version == version:  # nothing to decide: the tags of the decision that promoted it stay
        return GateDecision(False, f"version {version} already is the champion", champ_version, version=version)
    decision = decide(promo.gate, version_metrics(mv), version_metrics(champ) if champ else None, champ_version)
    for k, v in decision.tags().items():
        client.set_model_version_tag(name, version, k, v)
    if decision.promoted:
        client.set_registered_model_alias(name, promo.champion_alias, version)
        if champ_version is not None:
            client.set_model_version_tag(name, champ_version, "gate.superseded_by", version)
    decision.version = version
    return decision


def run(config, inputs: dict | None = None) -> RegisterOutputs:
    """Stage entry point: inputs {"model_dir": final hybrid, "metrics": its evaluation metrics}."""
    inputs = inputs or {}
    if not inputs.get("model_dir"):
        raise M1Error("register: no model directory given (inputs['model_dir'])")
    metrics = {k: float(v) for k, v in (inputs.get("metrics") or {}).items()}
    version = register_model(config, inputs["model_dir"], metrics, tags=inputs.get("tags"))
    decision = promote(config, version)
    name = model_name(config)
    champ = _version_by_alias(_client(config), name, config.pipeline.promotion.champion_alias)
    return RegisterOutputs(name, version, f"models:/{name}/{version}", decision.promoted, decision.reason,
                           str(champ.version) if champ else None, metrics)
