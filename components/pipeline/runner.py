"""What the flow's tasks do, kept out of flows/ so the flow stays thin: validate everything before any stage runs,
run one stage with its MLflow run in the environment, hash and (optionally) mirror its outputs, and render the
per-stage and final summaries."""
from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

from components.errors import M1Error
from components.pipeline.keys import (
    StageResult,
    config_material,
    extract_metrics,
    hash_outputs,
)
from components.pipeline.mlflow_runs import stage_env
from components.pipeline.stages import ROOT, Stage, get_stage, plan

TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0",
                 "HF_HUB_DISABLE_TELEMETRY": "1"}


def quiet_env() -> None:
    """Telemetry off for every library (set before they are imported; the user's explicit values win)."""
    for k, v in TELEMETRY_OFF.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def preflight(config, stages: list[Stage]) -> None:
    """Everything that can be checked without running a stage: config keys, code paths, stage validators, and
    that the S3 endpoint the run would use accepts connections."""
    from components.hashing import code_version
    from components.pipeline.storage import check_reachable

    for s in stages:
        config_material(config, s)
        code_version(s.code_paths(), ROOT)
        s.function()  # the stage's module imports
        if s.validate:
            s.validate(config)
    p = config.pipeline
    uses = {"pipeline.result_storage": p.storage_location(), "pipeline.checkpoint_uri": p.mirror_location()}
    uses.update({f"{s.name}.checkpoint_storage": getattr(getattr(config, s.name, None), "checkpoint_storage", None)
                 for s in stages})
    uses = {k: v for k, v in uses.items() if isinstance(v, str) and v.startswith("s3://")}
    if uses:
        try:
            import s3fs  # noqa: F401
        except ImportError as e:  # pragma: no cover - installed with dvc[s3]
            raise M1Error("S3 result storage needs s3fs (pip install s3fs)") from e
        check_reachable(config, uses)


def selected_stages(config, stages: list[str] | None = None) -> list[Stage]:
    return plan(stages if stages is not None else config.pipeline.stages, config)


def needed_splits(config, stages: list[str]) -> dict[str, list[str]]:
    """Curated splits that these stages read ({split: [stage, ...]}): a training stage's `data` and `heldout`."""
    out: dict[str, list[str]] = {}
    for name in stages:
        section = get_stage(name, config).settings(config)
        for attr in ("data", "heldout"):
            split = getattr(section, attr, None)
            if isinstance(split, str):
                out.setdefault(split, []).append(name)
    return out


def check_splits(config, outputs, later: list[str]) -> None:
    """Refuse outputs with an empty split that a later stage of this run reads: cached, they would fail that stage
    with "no shards" instead of naming the split and what feeds it."""
    rows = getattr(outputs, "rows", None)
    if not isinstance(rows, dict):
        return
    for split, readers in needed_splits(config, later).items():
        if split in rows and not rows[split]:
            feeding = [s.name for s in config.data.sources if split.removesuffix("_heldout") in s.splits]
            report = getattr(outputs, "report_md", None)
            raise M1Error(f"curated split {split} is empty, but {', '.join(readers)} reads it; sources feeding it: "
                          f"{', '.join(feeding) or 'none'}" + (f" (see {report})" if report else ""))


def execute_stage(config, stage_name: str, inputs: dict, cache_key: str, mlflow_run_id: str | None,
                  tracking_uri: str | None, later: list[str] | None = None) -> StageResult:
    """The body of a stage task. Raises on failure (so nothing is cached); outputs are the stage's own, written
    atomically by the stage (temporary directory renamed on success). `later`: the stages of the run after this
    one, whose inputs are checked before this stage's result is cached."""
    from components.pipeline.storage import mirror_outputs

    stage = get_stage(stage_name, config)
    t0 = time.time()
    with stage_env(mlflow_run_id, tracking_uri, config.pipeline.ray_address):
        outputs = stage.function()(config, inputs, **stage.kwargs)
    check_splits(config, outputs, later or [])
    seconds = round(time.time() - t0, 2)
    hashes = hash_outputs(stage, outputs)
    mirror_outputs(config, stage.name, stage.output_paths(outputs))
    return StageResult(stage.name, cache_key, outputs, hashes, extract_metrics(outputs), seconds, mlflow_run_id)


def error_line(e: M1Error, run_dir: str | None) -> tuple[str, M1Error]:
    """The one line bad input ends a run with (`m1: error: ...`, what the CLI prints and the flow run's state
    message) and the error carrying it; the traceback goes to <run_dir>/logs/last_error.log, named in the line."""
    if run_dir:
        log = Path(run_dir) / "logs" / "last_error.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("".join(traceback.format_exception(e)))
            err = M1Error(f"{e} (traceback: {log})")
            err.__cause__ = e
            e = err
        except OSError:
            pass  # an unwritable run dir must not hide the error itself
    return f"m1: error: {e}", e


def where(stage: Stage, result: StageResult) -> str:
    model = stage.model_dir(result.outputs) if stage.model_output else None
    if model is not None:
        return _rel(model)
    paths = stage.output_paths(result.outputs)
    if hasattr(result.outputs, "model_uri"):
        return str(result.outputs.model_uri)
    return ", ".join(_rel(p) for p in paths.values()) or "-"


def _rel(p) -> str:
    p = Path(p).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def key_metrics(stage: Stage, result: StageResult, limit: int = 4) -> str:
    if stage.summary is not None:
        return stage.summary(result.outputs)
    names = [m for m in stage.summary_metrics if m in result.metrics] or sorted(result.metrics)[:limit]
    return ", ".join(f"{m}={fmt_value(result.metrics[m])}" for m in names[:limit]) or "-"


def fmt_value(v: float) -> str:
    return f"{int(v)}" if float(v).is_integer() and abs(v) < 1e15 else f"{v:.4g}"


def stage_markdown(stage: Stage, result: StageResult, cached: bool, link: str | None) -> str:
    """The stage's markdown artifact; its header says whether the stage ran or its result came from the cache."""
    if cached:
        head = (f"### {stage.name}: CACHED, not run again (the cached result took {result.seconds:.1f} s; "
                f"MLflow run it came from: `{result.mlflow_run_id or '-'}`)")
    else:
        head = f"### {stage.name}: ran in {result.seconds:.1f} s"
    lines = [head, "", f"{stage.description}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {fmt_value(v)} |" for k, v in sorted(result.metrics.items())]
    lines += ["", "| output | content hash (DVC md5) |", "|---|---|"]
    lines += [f"| {name} | `{h}` |" for name, h in result.output_hashes.items()]
    lines += ["", f"outputs: `{where(stage, result)}`", f"cache key: `{result.cache_key}`"]
    if link:
        lines.append(f"MLflow run: [{link}]({link})")
    return "\n".join(lines)


def summary_rows(rows: list[dict]) -> str:
    """Plain-text table: stage, status, seconds, key metrics, where the outputs/model went."""
    head = ("stage", "status", "seconds", "key metrics", "outputs")
    table = [head] + [(r["stage"], r["status"], f"{r['seconds']:.1f}", r["metrics"], r["where"]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| stage | status | seconds | key metrics | outputs |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | {r['metrics']} | `{r['where']}` |"
              for r in rows]
    return "\n".join(lines)


def ui_commands(tracking_uri: str | None) -> list[str]:
    from components.tracking import ui_command

    api = os.environ.get("PREFECT_API_URL")
    cmds = []
    if api:
        cmds.append(f"Prefect UI:  open {api.rstrip('/').removesuffix('/api')}")
    else:
        home = os.environ.get("PREFECT_HOME")
        prefix = f"PREFECT_HOME={home} " if home else ""
        cmds.append(f"Prefect UI:  {prefix}prefect server start --host 127.0.0.1 --port 4200   "
                    f"# then open http://127.0.0.1:4200")
    if tracking_uri:
        cmds.append(f"MLflow UI:   {ui_command(tracking_uri)}" +
                    ("   # then open http://127.0.0.1:5000" if not tracking_uri.startswith("http") else ""))
    return cmds
