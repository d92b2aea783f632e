"""The m1-pipeline Prefect flow on the tiny profile, in-process (ephemeral Prefect API): end to end, again from
cache without executing any stage, a failing stage that leaves nothing cached and is resumed on the next run,
retries of transient failures, and cached results whose outputs vanished being recomputed."""
import csv
import importlib
import json
import time
from pathlib import Path

import pytest

from components.config import load_config
from components.pipeline.keys import cache_key
from components.pipeline.stages import get_stage, stage_names

pytestmark = pytest.mark.slow
TINY = load_config("tiny")  # its stages: both arms, align off
# components.model re-exports the convert() function under the submodule's name: patch the module itself
CONVERT = importlib.import_module("components.model.convert")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from prefect.settings import PREFECT_HOME, temporary_settings

    root = tmp_path_factory.mktemp("flow")
    with temporary_settings(updates={PREFECT_HOME: str(root / "prefect")}):
        yield root
    from components.pipeline.prefect_local import stop_ephemeral_server

    stop_ephemeral_server()



def overrides(root: Path, **extra) -> dict:
    o = {"run_dir": str(root / "run"), "tracking": {"uri": f"sqlite:///{root}/mlflow.db"},
         "pipeline": {"retries": {"retries": 1, "delay_s": 0.2}}}
    for k, v in extra.items():
        o[k] = v
    return o


def run(root: Path, stages: list[str] | None = None, **extra):
    from flows.m1_pipeline import m1_pipeline

    return m1_pipeline(profile="tiny", stages=stages, overrides=overrides(root, **extra))


def statuses(summary) -> dict:
    return {r["stage"]: r["cached"] for r in summary["stages"]}


def task_runs(summary) -> tuple[dict, dict]:
    """The flow run's task runs by name, and {task run name: {artifact key: artifact}} of the artifacts on each."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterTaskRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        found = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[summary["flow_run_id"]])))
        runs = {t.name: t for t in found}
        artifacts = {name: {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            task_run_id=ArtifactFilterTaskRunId(any_=[t.id])))} for name, t in runs.items()}
    return runs, artifacts


@pytest.fixture(scope="module")
def first(env):
    t0 = time.time()
    summary = run(env)
    return summary, time.time() - t0


def test_tiny_end_to_end(first, env, tmp_path):
    summary, seconds = first
    assert [r["stage"] for r in summary["stages"]] == stage_names(TINY)
    assert not any(statuses(summary).values())
    run_dir = env / "run"
    assert (run_dir / "data" / "manifest.json").is_file()
    assert (run_dir / "convert" / "model" / "model.safetensors").is_file()
    assert (run_dir / "grpo" / "model" / "config.json").is_file() and (run_dir / "eval" / "metrics.json").is_file()
    # the transformer arm (tiny has both arms) beside the hybrid; evaluate put both on the same time budgets, each
    # priced at the throughput measured for it
    for name in ("transformer_init", "transformer_sft1", "transformer_sft2", "transformer_grpo"):
        assert (run_dir / name / "model" / "config.json").is_file(), name
    rows = list(csv.DictReader((run_dir / "eval" / "time_budget.csv").open()))
    assert {r["model"] for r in rows} == {"hybrid", "transformer", "teacher"}
    measured = {m: i["throughput"]["tokens_per_s"]
                for m, i in json.loads((run_dir / "eval" / "models.json").read_text()).items()}
    for r in rows:
        assert float(r["tokens_per_s"]) == pytest.approx(measured[r["model"]], rel=1e-4)
        assert float(r["tokens_allowed"]) == pytest.approx(float(r["budget_s"]) * measured[r["model"]], rel=1e-4)
    assert {r["budget_s"] for r in rows if r["model"] == "hybrid"} == {r["budget_s"] for r in rows
                                                                      if r["model"] == "transformer"}
    compared = json.loads((run_dir / "eval" / "arms.json").read_text())
    assert set(compared) == {"self_consistency", "max_length"}
    assert len(compared["max_length"]["points"]) == len({r["budget_s"] for r in rows})
    # MLflow: a parent run with a nested run per stage, datasets logged with their DVC hashes
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["mlflow"]["uri"])
    parent = summary["mlflow"]["parent_run_id"]
    children = client.search_runs([summary["mlflow"]["experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == sorted(stage_names(TINY))
    # the real distill's checkpoints as MLflow logged models (final_and_best): each at its step with the loop's
    # metrics there, the final one with the held-out metrics on their dataset, loadable by its model URI
    from test_checkpoint_models import metrics_of, predict

    distill_id = next(r.info.run_id for r in children if r.info.run_name == "distill")
    logged = {m.name: m for m in client.search_logged_models([summary["mlflow"]["experiment_id"]],
                                                             filter_string=f"source_run_id = '{distill_id}'")}
    last = TINY.distill.max_steps
    history = {m.step: m.value for m in client.get_metric_history(distill_id, "loss")}
    for name, m in logged.items():
        step = int(m.tags["m1.step"])
        assert name == ("distill-final" if m.tags["m1.kind"] == "final" else f"distill-step-{step}")
        assert metrics_of(m)["loss"][:2] == (history[step], step)
    final = metrics_of(logged["distill-final"])
    assert logged["distill-final"].tags["m1.step"] == str(last)
    assert final["heldout/kl"][2] == "sft1_heldout" and final["loss"][2] == "sft1"
    from components.tracking import use_store

    use_store(summary["mlflow"]["uri"])  # not mlflow.set_tracking_uri: it sets MLFLOW_TRACKING_URI for later tests
    assert len(predict(logged["distill-final"].model_id, tmp_path)) == 1
    curate_run = next(r for r in children if r.info.run_name == "curate")
    assert curate_run.data.metrics["records.sft1"] > 0
    assert curate_run.data.params["data.num_proc"] == "1"
    inputs = client.get_run(parent).inputs.dataset_inputs
    names = {d.dataset.name: d.dataset.digest for d in inputs}
    assert {"sft1", "sft2", "rl"} <= set(names) and names["sft1"].endswith(".dir")
    assert "curate" in summary["table"] and "mlflow ui" in "\n".join(summary["ui"])
    # Prefect artifacts: a markdown table per stage, a link to its MLflow run, the summary
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        keys = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["m1-curate", "m1-convert-mlflow", "m1-pipeline-summary"])))}
    assert set(keys) == {"m1-curate", "m1-convert-mlflow", "m1-pipeline-summary"}
    assert "| records.sft1 |" in keys["m1-curate"].data and "MLflow run" in keys["m1-curate"].data
    assert "/#/experiments/" in keys["m1-convert-mlflow"].data
    # ... each on its stage's own task run, which waited for its upstream stages' task runs (the graph's arrows)
    from components.config import load_config
    from components.pipeline.prefect_progress import training_section

    cfg = load_config("tiny", overrides=overrides(env))
    runs, artifacts = task_runs(summary)
    assert set(runs) == set(stage_names(cfg))
    for name in stage_names(cfg):
        upstream = {runs[u].id for u in get_stage(name, cfg).upstream}  # evaluate: grpo and transformer_grpo too
        assert {i.id for i in runs[name].task_inputs.get("wait_for", [])} == upstream, name
        assert not any(v for k, v in runs[name].task_inputs.items() if k != "wait_for"), name  # no false arrows
        assert artifacts[name][f"m1-{name.replace('_', '-')}"].data.startswith(f"### {name}: ran in "), name
    assert {k for k in artifacts["curate"]} == {"m1-curate", "m1-curate-metrics", "m1-curate-mlflow",
                                                  "m1-curate-plots"}
    table = {r["metric"]: r["value"] for r in json.loads(artifacts["curate"]["m1-curate-metrics"].data)}
    assert int(table["records.sft1"]) == curate_run.data.metrics["records.sft1"]
    # figures as data: URIs: curate's token lengths, loss curves of every SFT/distill stage, GRPO's, evaluate's
    plots = {name: a[f"m1-{name.replace('_', '-')}-plots"] for name, a in artifacts.items()
             if f"m1-{name.replace('_', '-')}-plots" in a}
    assert plots["curate"].description == "curate: token lengths"
    for name in ("distill", "sft1", "sft2", "transformer_sft1", "transformer_sft2"):
        assert plots[name].description == f"{name}: loss curves", name
    assert plots["grpo"].description == "grpo: grpo curves, heldout outcomes"
    assert plots["evaluate"].description == "evaluate: time budget, speed"
    assert plots["evaluate"].data.count("](data:image/png;base64,") == 2
    assert max(len(p.data) for p in plots.values()) < 400_000  # downscaled
    # training stages' progress at checkpoints, finished
    for name in ("distill", "sft1", "sft2", "grpo", "transformer_sft1", "transformer_sft2", "transformer_grpo"):
        section = training_section(cfg, get_stage(name, cfg))
        progress = artifacts[name][f"m1-{name.replace('_', '-')}-progress"]
        assert float(progress.data) == 100.0, name
        assert progress.description == (f"{name}: {section.max_steps} steps, a checkpoint every "
                                         f"{section.checkpoint_every}; finished: {section.max_steps}/"
                                         f"{section.max_steps} steps")
    assert "m1-convert-progress" not in artifacts["convert"]


def test_second_run_is_all_cached(first, env, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a cached stage was executed")

    monkeypatch.setattr("components.data.curate.run", boom)
    monkeypatch.setattr(CONVERT, "run", boom)
    monkeypatch.setattr(CONVERT, "run_transformer", boom)
    monkeypatch.setattr("components.train.stage.run", boom)
    monkeypatch.setattr("components.grpo.stage.run", boom)
    summary = run(env)
    assert all(statuses(summary).values()), summary["table"]
    # visibly cached in Prefect: the task runs are named so and their markdown says it; artifacts still attached
    runs, artifacts = task_runs(summary)
    assert set(runs) == {f"{n} (cached)" for n in stage_names(TINY)}
    assert all(r.state.name == "Cached" for r in runs.values())
    assert artifacts["curate (cached)"]["m1-curate"].data.startswith("### curate: CACHED, not run again")
    assert "m1-distill-plots" in artifacts["distill (cached)"]
    assert {i.id for i in runs["distill (cached)"].task_inputs["wait_for"]} == {runs["curate (cached)"].id,
                                                                               runs["convert (cached)"].id}
    assert [r["cache_key"] for r in summary["stages"]] == [r["cache_key"] for r in first[0]["stages"]]


def test_failed_stage_is_not_cached_and_resumes(first, env, monkeypatch):
    from components.config import load_config
    from components.pipeline.dryrun import cached_result

    real = CONVERT.run
    calls = []

    def broken(config, inputs=None):
        calls.append(1)
        partial = Path(config.run_dir) / "convert" / "model.partial"
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "half.bin").write_bytes(b"x")
        raise ValueError("disk on fire")  # not an M1Error: retried once, then the run fails

    monkeypatch.setattr(CONVERT, "run", broken)
    extra = {"convert": {"attn_layers": [1, 3], "seed": 7}}
    with pytest.raises(ValueError, match="disk on fire"):
        run(env, ["convert"], **extra)
    assert len(calls) == 2  # first try + one retry
    cfg = load_config("tiny", overrides=overrides(env, **extra))
    key = cache_key(cfg, get_stage("convert"), {})
    assert cached_result(cfg, key) is None  # nothing cached for the failed stage

    monkeypatch.setattr(CONVERT, "run", real)
    summary = run(env, ["convert"], **extra)
    assert statuses(summary) == {"convert": False}  # convert has no upstream: the target runs alone
    assert cached_result(cfg, key) is not None


def test_transient_failure_is_retried(first, env, monkeypatch):

    real = CONVERT.run
    calls = []

    def flaky(config, inputs=None):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("network blip")
        return real(config, inputs)

    monkeypatch.setattr(CONVERT, "run", flaky)
    summary = run(env, ["convert"], convert={"attn_layers": [1, 3], "seed": 8})
    assert len(calls) == 2 and statuses(summary)["convert"] is False


def test_bad_input_is_not_retried(first, env, monkeypatch):
    from components.errors import M1Error

    calls = []

    def bad(config, inputs=None):
        calls.append(1)
        raise M1Error("teacher weights unreadable")

    monkeypatch.setattr(CONVERT, "run", bad)
    with pytest.raises(M1Error):
        run(env, ["convert"], convert={"attn_layers": [1, 3], "seed": 9})
    assert len(calls) == 1


def test_vanished_outputs_are_recomputed(first, env):
    import shutil

    shutil.rmtree(env / "run" / "convert" / "model")
    summary = run(env, ["convert"])
    assert statuses(summary) == {"convert": False}  # convert has no upstream: the target runs alone
    assert (env / "run" / "convert" / "model" / "config.json").is_file()


def test_flow_refuses_bad_profile_before_any_stage(first, env, monkeypatch):
    from components.errors import M1Error
    from flows.m1_pipeline import m1_pipeline

    def boom(*a, **k):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(CONVERT, "run", boom)
    with pytest.raises(M1Error, match="unknown profile 'huge'"):
        m1_pipeline(profile="huge")
    with pytest.raises(M1Error, match="convert.mixer"):
        m1_pipeline(profile="tiny", overrides=overrides(env, convert={"mixer": "mamba3"}))


def test_bad_input_in_a_stage_ends_the_flow_run_with_one_line(env, monkeypatch):
    # The flow run's state message is the line `m1 pipeline` prints (a deployment run shows only the state), the
    # traceback goes to <run_dir>/logs/last_error.log; called plainly, the flow still raises the M1Error.
    from components.config import available_profiles
    from components.errors import M1Error
    from flows.m1_pipeline import m1_pipeline

    def bad(config, inputs=None):
        raise M1Error("teacher weights unreadable")

    monkeypatch.setattr(CONVERT, "run", bad)
    over = overrides(env, convert={"attn_layers": [1, 3], "seed": 10})
    log = env / "run" / "logs" / "last_error.log"
    line = f"m1: error: teacher weights unreadable (traceback: {log})"
    state = m1_pipeline(profile="tiny", stages=["convert"], overrides=over, return_state=True)
    assert state.is_failed() and state.message == line
    assert 'raise M1Error("teacher weights unreadable")' in log.read_text()
    with pytest.raises(M1Error) as e:
        m1_pipeline(profile="tiny", stages=["convert"], overrides=over)
    assert f"m1: error: {e.value}" == line
    # bad input before there is a run dir to log into: the line alone
    state = m1_pipeline(profile="huge", return_state=True)
    assert state.message == f"m1: error: unknown profile 'huge'; available: {', '.join(available_profiles())}"
