"""Per-task Prefect artifacts, dependency edges, cached marking and progress (components/pipeline/prefect_artifacts.py,
prefect_progress.py), on a small flow of stand-in stages with an ephemeral Prefect API: fast, no stage runs. The tiny
pipeline end to end checks the same on the real flow (tests/test_pipeline_flow.py, slow)."""
import base64
import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from components.pipeline import prefect_artifacts as pa
from components.pipeline.keys import StageResult
from components.pipeline.stages import get_stage
from components.train.harness import RunOutputs


def _png(path: Path, size=(1600, 400)) -> Path:
    Image.new("RGB", size, (250, 250, 250)).save(path)
    return path


def _decoded(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_png_data_uri_is_downscaled(tmp_path):
    im = _decoded(pa.png_data_uri(_png(tmp_path / "wide.png")))
    assert im.size == (800, 200)
    assert _decoded(pa.png_data_uri(_png(tmp_path / "small.png", (300, 100)))).size == (300, 100)


def _training_result(run_dir: Path, stage: str = "distill") -> StageResult:
    folder = run_dir / stage
    (folder / "model").mkdir(parents=True)
    rows = [{"step": s, "loss": 1.0 / s, "kl": 1.0 / s, "ce": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 9.0}
            for s in (1, 2, 3)]
    (folder / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _png(folder / "grpo_curves.png")
    out = RunOutputs(model_dir=str(folder / "model"), checkpoint_root=str(folder / "checkpoints"))
    return StageResult(stage, "key", out, {}, {"kl": 0.25, "steps": 3.0}, 1.5, "run123")


def test_training_stage_figures(tmp_path):
    result = _training_result(tmp_path)
    figures = pa.stage_figures(get_stage("distill"), result)
    assert [c for c, _ in figures] == ["grpo curves", "loss curves"]
    curves = tmp_path / "distill" / "loss_curves.png"
    assert figures[1][1] == curves and curves.stat().st_size > 1000
    mtime = curves.stat().st_mtime_ns
    pa.stage_figures(get_stage("distill"), result)  # not drawn again while history.jsonl is older
    assert curves.stat().st_mtime_ns == mtime
    markdown, captions = pa.plots_markdown(get_stage("distill"), figures)
    assert captions == ["grpo curves", "loss curves"] and markdown.count("](data:image/png;base64,") == 2


def test_markdown_header_says_cached(tmp_path):
    from components.pipeline.runner import stage_markdown

    result = _training_result(tmp_path)
    assert stage_markdown(get_stage("distill"), result, False, None).startswith("### distill: ran in 1.5 s")
    cached = stage_markdown(get_stage("distill"), result, True, "http://mlflow/x")
    assert cached.startswith("### distill: CACHED, not run again (the cached result took 1.5 s; MLflow run it "
                             "came from: `run123`)")
    assert "| kl | 0.25 |" in cached and "MLflow run: [http://mlflow/x](http://mlflow/x)" in cached


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory):
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    from components.pipeline.prefect_local import stop_ephemeral_server

    # a loaded 2-core machine can take longer than the default 20 s to start the temporary API server
    with temporary_settings(updates={PREFECT_HOME: str(tmp_path_factory.mktemp("prefect")),
                                     PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 90}):
        yield
    stop_ephemeral_server()


def test_task_runs_carry_artifacts_edges_progress_and_cached_mark(prefect_home, tmp_path, monkeypatch):
    import prefect.artifacts
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterTaskRunId

    from components.pipeline.prefect_progress import stage_progress

    updates = []
    real_update = prefect.artifacts.update_progress_artifact
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact",
                        lambda artifact_id, progress, description=None, **k: (
                            updates.append((progress, description)), real_update(artifact_id, progress, description))[1])
    config = SimpleNamespace(run_dir=str(tmp_path), distill=SimpleNamespace(checkpoint_every=1, max_steps=2,
                                                                           checkpoint_storage=None))
    ckpts = tmp_path / "distill" / "checkpoints"

    @task(persist_result=True, cache_key_fn=lambda ctx, params: f"m1-test-{params['name']}-{tmp_path.name}",
          result_storage=tmp_path / "results")
    def stage_task(name: str) -> str:
        if name == "distill":
            with stage_progress(config, get_stage("distill"), interval=0.05):
                for step in (1, 2):
                    d = ckpts / f"checkpoint_{step:06d}"
                    d.mkdir(parents=True)
                    (d / "trainer_state.json").write_text(json.dumps({"step": step}))
                    time.sleep(0.5)  # the poller sees each checkpoint
        return name

    @flow
    def two_stages():
        curate = pa.call_task(stage_task, ("curate",), [])
        distill = pa.call_task(stage_task, ("distill",), [curate])
        again = pa.call_task(stage_task, ("curate",), [])  # the same key: Cached
        result = _training_result(tmp_path / "run")
        for state, cached in ((distill, False), (again, True)):
            pa.publish_stage(get_stage("distill"), result, cached, "http://mlflow/run", "### md",
                             state.state_details.task_run_id)
        return curate, distill, again

    curate, distill, again = two_stages()
    assert again.name == "Cached" and curate.name != "Cached"
    with get_client(sync_client=True) as client:
        run = {s: client.read_task_run(st.state_details.task_run_id) for s, st in
               (("curate", curate), ("distill", distill), ("again", again))}

        def artifacts(task_run_id):
            return {a.key: a for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(task_run_id=ArtifactFilterTaskRunId(any_=[task_run_id])))}

        on_distill, on_again, on_curate = (artifacts(run[s].id) for s in ("distill", "again", "curate"))
    # the edge curate -> distill, as the flow run graph reads it
    # (and nothing else: the quoted parameters record no inputs)
    assert {k: [i.id for i in v] for k, v in run["distill"].task_inputs.items() if v} == {"wait_for": [run["curate"].id]}
    assert not any(run["again"].task_inputs.values())
    assert run["again"].name.endswith(" (cached)") and not run["curate"].name.endswith(" (cached)")
    assert set(on_distill) == {"m1-distill", "m1-distill-metrics", "m1-distill-mlflow", "m1-distill-plots",
                               "m1-distill-progress"}
    assert set(on_again) == {"m1-distill", "m1-distill-metrics", "m1-distill-mlflow", "m1-distill-plots"}
    assert on_curate == {}
    assert on_distill["m1-distill"].data == "### md"
    assert on_distill["m1-distill-mlflow"].data == "[MLflow run of distill](http://mlflow/run)"
    assert json.loads(on_distill["m1-distill-metrics"].data) == [{"metric": "kl", "value": "0.25"},
                                                               {"metric": "steps", "value": "3"}]
    assert on_distill["m1-distill-plots"].data.count("](data:image/png;base64,") == 2
    progress = on_distill["m1-distill-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.description == "distill: 2 steps, a checkpoint every 1; finished: 2/2 steps"
    assert updates[0] == (50.0, "distill: 2 steps, a checkpoint every 1; checkpoint step 1/2")
    assert updates[-1][0] == 100.0


def test_an_interrupted_stage_does_not_wait_for_its_progress_update(tmp_path, monkeypatch):
    """Ctrl-C inside a training stage: the progress block re-raises while its last update ("stopped at step ...")
    is still waiting on the API (Prefect's client retries a busy server for about a minute), instead of holding
    the run until it returns."""
    import threading

    import prefect.artifacts

    from components.pipeline import prefect_progress

    release, events = threading.Event(), []

    def update(artifact_id, progress, description=None, **kw):
        events.append(("update", description))
        release.wait(30)  # a request that does not come back
        events.append(("update returned", description))

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", lambda *a, **k: "artifact-id")
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", update)
    monkeypatch.setattr(prefect_progress, "STOP_GRACE_S", 0.2)
    config = SimpleNamespace(run_dir=str(tmp_path), distill=SimpleNamespace(checkpoint_every=1, max_steps=4,
                                                                           checkpoint_storage=None))
    with pytest.raises(KeyboardInterrupt):
        with prefect_progress.stage_progress(config, get_stage("distill"), interval=0.05):
            raise KeyboardInterrupt
    returned_first = [e for e in events if e[0] == "update returned"]  # what the block waited for
    release.set()
    assert returned_first == []
    note = "distill: 4 steps, a checkpoint every 1; stopped at step 0/4 (newest checkpoint)"
    deadline = time.time() + 30  # the update was sent (from its own thread, however slowly that starts)
    while ("update returned", note) not in events and time.time() < deadline:
        time.sleep(0.05)
    assert events == [("update", note), ("update returned", note)]
