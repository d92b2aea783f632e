"""The `m1-pipeline` Prefect flow: one cached task per registered stage (components/pipeline/stages.py).

Each task is cached on its stage's cache key (config sections, upstream output hashes, code version) with the
result persisted (local folder by default, S3 when pipeline.result_storage says so): a stage whose inputs did
not change is not run again, and a run started again after a failure skips the finished stages and re-runs the
failed one (training stages resume from their own checkpoints). A failed task raises, so Prefect stores
nothing for it. Transient failures retry with exponential backoff; bad input (M1Error) does not, and ends the run
as a Failed state whose message is the one line `m1: error: ...` (the traceback goes to <run_dir>/logs/last_error.log).
Interrupted (Ctrl-C, a termination signal) the run ends Crashed with its MLflow runs KILLED, and the exception
names the stage it stopped (`m1_stage`); a run whose process was killed outright is marked so by the profile's next
run (components/pipeline/mlflow_runs.py, prefect_local.claim_flow_run).

In the Prefect UI: each task waits for its upstream stages' task runs (wait_for), so the flow run graph draws
curate -> convert -> distill -> ...; each task run carries its own artifacts (markdown, metrics table, MLflow link,
plots; a cached one is renamed `<stage> (cached)`: components/pipeline/prefect_artifacts.py), and a training stage
has a progress artifact moved at each checkpoint (components/pipeline/prefect_progress.py).

    m1 pipeline --profile tiny                                  # in-process, no server needed
    prefect deployment run m1-pipeline/local -p profile=tiny    # through a server + worker (infra/)
"""
from __future__ import annotations

import logging
import time

from components.pipeline.runner import quiet_env

quiet_env()

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.states import Failed

from components.errors import M1Error
from components.pipeline import runner
from components.pipeline.keys import StageResult, cache_key
from components.pipeline.mlflow_runs import PipelineRuns, owner_alive, process_owner
from components.pipeline.prefect_artifacts import call_task, publish_stage
from components.pipeline.prefect_local import claim_flow_run
from components.pipeline.prefect_progress import stage_progress
from components.pipeline.stages import get_stage
from components.pipeline.storage import result_storage, s3_environment


def _cache_key(context, parameters) -> str:
    return parameters["cache_key"]


def _transient(task, task_run, state) -> bool:
    """Retry anything but bad input: an M1Error fails the same way every time."""
    try:
        state.result()
    except M1Error:
        return False
    except BaseException:  # noqa: BLE001 - anything else may be transient
        return True
    return True


class _NoBadInputTraceback(logging.Filter):
    """A task that fails with no retries left is logged with its traceback; for bad input (M1Error) the message is
    the news and the traceback goes to the run's log file (runner.error_line), not the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], M1Error):
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("prefect.task_runs").addFilter(_NoBadInputTraceback())


@task(persist_result=True, cache_key_fn=_cache_key, result_serializer="pickle", cache_result_in_memory=False,
      retry_condition_fn=_transient)
def run_stage(stage: str, config, inputs: dict, cache_key: str, mlflow_run_id: str | None,
              tracking_uri: str | None, later: list[str] | None = None) -> StageResult:
    with stage_progress(config, get_stage(stage, config)):  # training stages: progress at checkpoints
        return runner.execute_stage(config, stage, inputs, cache_key, mlflow_run_id, tracking_uri, later)


def _stage_task(stage, config, storage, refresh: bool = False):
    r = config.pipeline.retries
    return run_stage.with_options(
        name=stage.name, task_run_name=stage.name, result_storage=storage, refresh_cache=refresh,
        retries=r.retries, retry_delay_seconds=[r.delay_s * 2 ** i for i in range(r.retries)] or 0,
        retry_jitter_factor=r.jitter if r.retries else None)


@flow(name="m1-pipeline", persist_result=False, validate_parameters=True)
def m1_pipeline(profile: str = "default", params: str | None = None, stages: list[str] | None = None,
                overrides: dict | None = None) -> dict:
    """Run the registered stages for `profile` (params.yaml + configs/profiles/<profile>.yaml [+ overrides])."""
    from components.config import load_config

    config = None
    try:
        config = load_config(profile, params, overrides)  # bad input fails here, before any stage
        with s3_environment(config):
            return _run(config, stages)
    except M1Error as e:
        # Returned, not raised: the run's state message is then the one line (what `prefect flow-run inspect` and
        # the UI show for a deployment run) and Prefect logs no traceback; calling the flow still raises `error`.
        line, error = runner.error_line(e, config.run_dir if config is not None else None)
        return Failed(message=line, data=error)


def _run(config, stages: list[str] | None) -> dict:
    started = time.time()
    logger = get_run_logger()
    plan = runner.selected_stages(config, stages)
    runner.preflight(config, plan)
    storage = result_storage(config)
    flow_run = get_run_context().flow_run
    try:  # bookkeeping of earlier crashed runs must not stop this one
        crashed = claim_flow_run(flow_run.id, config.profile, process_owner(), owner_alive)
        if crashed:
            logger.warning(f"marked {len(crashed)} earlier flow run(s) of profile {config.profile} whose process "
                           f"is gone as Crashed: {', '.join(crashed)}")
    except Exception as e:  # noqa: BLE001
        logger.warning(f"could not check for crashed earlier flow runs: {e}")
    runs = PipelineRuns(config, f"{config.profile}-{flow_run.name}", {"prefect.flow_run_id": str(flow_run.id)})
    runs.start()
    if runs.killed:
        logger.warning(f"marked {len(runs.killed)} MLflow run(s) whose process is gone as KILLED")
    finished: dict[str, StageResult] = {}
    states: dict = {}  # each stage's final task run state: its downstream tasks wait_for it (the graph's edges)
    datasets: dict[str, dict] = {}
    rows: list[dict] = []
    status = "FAILED"
    try:
        for i, stage in enumerate(plan):
            later = [s.name for s in plan[i + 1:]]
            key = cache_key(config, stage, {u: finished[u].output_hash for u in stage.upstream})
            inputs = stage.build_inputs({n: r.outputs for n, r in finished.items()}, config)
            run_id = runs.start_stage(stage.name, key)
            for u in stage.upstream:
                if u in datasets:
                    runs.log_datasets([run_id], datasets[u], context=stage.name)
            # the upstream task runs (finished) as wait_for: nothing to wait for, but Prefect records them in the
            # task run's task_inputs, which the flow run graph draws as dependency arrows
            upstream = [states[u] for u in stage.upstream if u in states]
            t0 = time.time()
            try:
                with runs.watch_checkpoints(run_id, stage.name):
                    args = (stage.name, config, inputs, key, run_id, runs.uri, later)
                    state = call_task(_stage_task(stage, config, storage), args, upstream)
                    result: StageResult = state.result()
                    cached = state.name == "Cached"
                    if cached and not result.outputs_intact(stage):
                        logger.warning(f"{stage.name}: cached outputs are missing or changed on disk; "
                                       "running it again")
                        state = call_task(_stage_task(stage, config, storage, refresh=True), args, upstream)
                        result, cached = state.result(), False
                runner.check_splits(config, result.outputs, later)  # also a result cached by a run of fewer stages
            except BaseException as e:
                # KeyboardInterrupt or a termination signal: KILLED (the next run of this key continues this run)
                interrupted = not isinstance(e, Exception)
                runs.end_stage(run_id, "KILLED" if interrupted else "FAILED")
                if interrupted:
                    e.m1_stage = stage.name  # for the CLI's one line `m1: interrupted at <stage> ...`
                raise
            seconds = time.time() - t0
            runs.log_stage(run_id, runner.config_material(config, stage), result, cached)
            if stage.datasets:
                datasets[stage.name] = stage.datasets(result.outputs)
                runs.log_datasets([runs.parent_id, run_id], datasets[stage.name], context=stage.name)
            runs.end_stage(run_id, "FINISHED")
            link = runs.link(run_id)
            # on the stage's own task run (a cached one too): markdown, metrics table, MLflow link, plots
            publish_stage(stage, result, cached, link, runner.stage_markdown(stage, result, cached, link),
                          state.state_details.task_run_id, logger)
            finished[stage.name] = result
            states[stage.name] = state
            rows.append({"stage": stage.name, "status": f"cached ({result.seconds:.0f} s saved)" if cached else "ran",
                         "seconds": seconds, "metrics": runner.key_metrics(stage, result),
                         "where": runner.where(stage, result), "cached": cached, "mlflow_run_id": run_id,
                         "cache_key": result.cache_key, "all_metrics": result.metrics})
        status = "FINISHED"
    except BaseException as e:
        if not isinstance(e, Exception):
            status = "KILLED"
        raise
    finally:
        # the parent run carries every stage's metrics (<stage>/<metric>) to compare pipeline runs side by side
        runs.end(status, {**{f"{r['stage']}/{k}": v for r in rows for k, v in r["all_metrics"].items()},
                      **{f"{r['stage']}/seconds": r["seconds"] for r in rows}})
    table = runner.summary_rows(rows)
    create_markdown_artifact(key="m1-pipeline-summary", markdown=runner.summary_markdown(rows),
                             description=f"m1 pipeline, profile {config.profile}")
    ui = runner.ui_commands(runs.uri)
    logger.info("summary\n" + table + "\n" + "\n".join(ui))
    return {"profile": config.profile, "run_dir": config.run_dir, "seconds": round(time.time() - started, 2),
            "stages": rows, "table": table, "ui": ui, "flow_run_id": str(flow_run.id),
            "mlflow": {"uri": runs.uri, "experiment_id": runs.experiment_id, "parent_run_id": runs.parent_id,
                       "link": runs.link(runs.parent_id)}}


if __name__ == "__main__":
    import sys

    print(m1_pipeline(*(sys.argv[1:2] or ["default"]))["table"])
