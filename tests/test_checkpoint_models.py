"""MLflow-tracked checkpoints (issue 24, item 1): the checkpoint watcher of a training stage's run logs its
checkpoints and final model as MLflow logged models (models:/<model_id>) with their step, the run's metrics at
that step linked to the stage's datasets and its settings; tracking.log_checkpoints bounds what is uploaded
(all | final_and_best | final | none); a logged checkpoint loads through the pyfunc wrapper and predicts; the
registry version is created from the stage's final logged model. The stage is played by hand here (metrics on
its run, checkpoint folders as the loop writes them, then the published model), so each test takes seconds;
test_tiny_flow_logs_checkpoint_models runs the real stages through the flow (slow)."""
import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.entities import LoggedModelStatus

from components.config import load_config
from components.hashing import dvc_md5

LOSS = {1: 3.0, 2: 2.0, 3: 2.5}  # the best checkpoint by the default min:loss is step 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny converted hybrid with its tokenizer (what a checkpoint folder holds besides the trainer state)."""
    from components.model.convert import run as convert

    root = tmp_path_factory.mktemp("ckpt-models")
    return Path(convert(load_config("tiny", overrides={"run_dir": str(root / "run")})).model_dir)


def config_for(root: Path, policy: str, **tracking):
    return load_config("tiny", overrides={"run_dir": str(root / "run"), "tracking": {
        "uri": f"sqlite:///{root}/mlflow.db", "log_checkpoints": policy, **tracking}})


def client_of(cfg):
    from mlflow.tracking import MlflowClient

    from components.tracking import tracking_uri

    return MlflowClient(tracking_uri(cfg.tracking))


def write_checkpoint(root: Path, model_dir: Path, step: int) -> Path:
    """A checkpoint folder as components.train.checkpoint writes it: the model, trainer_state.pt, then
    trainer_state.json (written last: a folder without it is not a checkpoint yet)."""
    tmp = root / f".checkpoint_{step:06d}.partial"
    shutil.copytree(model_dir, tmp)
    (tmp / "trainer_state.pt").write_bytes(b"optimizer state" * 100)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "fingerprint": "fp-test"}))
    return tmp.rename(root / f"checkpoint_{step:06d}")


def wait_reported(client, run_id: str, step: int, timeout: float = 20.0) -> None:
    """Until the watcher has reported checkpoint `step` (metric checkpoint_step at that step)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(m.step == step for m in client.get_metric_history(run_id, "checkpoint_step")):
            return
        time.sleep(0.05)
    raise AssertionError(f"checkpoint {step} not reported within {timeout} s")


def play_stage(cfg, model_dir: Path, stage: str = "sft1", prune_after_seen: int | None = None):
    """A training stage under the watcher: steps 1-3 with loss LOSS[step] and ce on the run, a checkpoint each
    (`prune_after_seen`: deleted once reported, as keep_checkpoints does), held-out metrics at the last step, the
    published model and train_metrics.json. -> (runs, stage run id)."""
    from components.pipeline.mlflow_runs import PipelineRuns
    from components.tracking import Tracker

    runs = PipelineRuns(cfg, "test")
    runs.start()
    run_id = runs.start_stage(stage, "key-" + stage)
    data = Path(cfg.run_dir) / "data"
    for name in ("sft1", "sft1_heldout"):
        (data / name).mkdir(parents=True, exist_ok=True)
        (data / name / "rows.jsonl").write_text(f'{{"split": "{name}"}}\n')
    runs.log_datasets([run_id], {n: data / n for n in ("sft1", "sft1_heldout")}, context=stage)
    out = Path(cfg.run_dir) / stage
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    tracker = Tracker(run_id, uri=runs.uri)
    client = client_of(cfg)
    with runs.watch_checkpoints(run_id, stage, interval=0.05):
        for step in (1, 2, 3):
            tracker.log_metrics({"loss": LOSS[step], "ce": LOSS[step] / 2}, step=step)
            path = write_checkpoint(ckpts, model_dir, step)
            if step == prune_after_seen:
                wait_reported(client, run_id, step)
                for _ in range(400):  # until the watcher holds its files (hard links) as the best so far
                    if any(os.path.samefile(h, path / "model.safetensors")
                           for h in out.glob(".m1-best-*/model.safetensors")):
                        break
                    time.sleep(0.05)
                shutil.rmtree(path)
        tracker.log_metrics({"heldout/ppl": 9.5}, step=3)
        shutil.copytree(model_dir, out / "model", copy_function=shutil.copyfile)  # written now, as publish_model
        (out / "train_metrics.json").write_text(json.dumps({"steps": 3, "loss": 2.5, "heldout/ppl": 9.5}))
    runs.end_stage(run_id, "FINISHED")
    return runs, run_id


def logged_models(client, runs, run_id: str) -> dict:
    """{name: LoggedModel} of the stage run."""
    found = client.search_logged_models([runs.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    return {m.name: m for m in found}


def metrics_of(model) -> dict:
    return {m.key: (m.value, m.step, m.dataset_name) for m in model.metrics or []}


def predict(model_id: str, tmp_path) -> list:
    import mlflow

    dst = tmp_path / f"loaded-{model_id}"  # MLflow's own default is a temp dir it never removes
    dst.mkdir()
    model = mlflow.pyfunc.load_model(f"models:/{model_id}", dst_path=str(dst))
    return model.predict(pd.DataFrame({"prompt": ["What is 2 + 3?"]}), params={"max_new_tokens": 4})


def test_all_logs_every_checkpoint_and_the_final_model(model_dir, tmp_path):
    cfg = config_for(tmp_path, "all")
    runs, run_id = play_stage(cfg, model_dir)
    client = client_of(cfg)
    models = logged_models(client, runs, run_id)
    assert sorted(models) == ["sft1-final", "sft1-step-1", "sft1-step-2", "sft1-step-3"]
    for step in (1, 2, 3):
        m = models[f"sft1-step-{step}"]
        assert (m.tags["m1.step"], m.tags["m1.kind"], m.tags["m1.stage"]) == (str(step), "checkpoint", "sft1")
        assert m.tags["m1.fingerprint"] == "fp-test" and m.tags["m1.checkpoint"].endswith(f"checkpoint_{step:06d}")
        assert m.tags["m1.best"] == ("true" if step == 2 else "false")  # min:loss -> step 2
        assert metrics_of(m)["loss"] == (LOSS[step], step, "sft1")  # the run's metric at that step, on its dataset
        assert metrics_of(m)["ce"][0] == LOSS[step] / 2 and "checkpoint_step" not in metrics_of(m)
        assert m.params["max_steps"] == str(cfg.sft1.max_steps) and m.status == LoggedModelStatus.READY
    final = models["sft1-final"]
    assert (final.tags["m1.step"], final.tags["m1.kind"], final.tags["m1.best"]) == ("3", "final", "false")
    assert final.tags["m1.model_md5"] == dvc_md5(Path(cfg.run_dir) / "sft1" / "model")
    got = metrics_of(final)
    assert got["heldout/ppl"] == (9.5, 3, "sft1_heldout") and got["loss"] == (2.5, 3, "sft1")
    digests = {d.dataset.name: d.dataset.digest for d in client.get_run(run_id).inputs.dataset_inputs}
    assert json.loads(final.tags["m1.datasets"]) == {k: digests[k] for k in ("sft1", "sft1_heldout")}
    # the run's outputs: every logged model at its step
    outputs = sorted((o.step, o.model_id) for o in client.get_run(run_id).outputs.model_outputs)
    assert outputs == sorted([(1, models["sft1-step-1"].model_id), (2, models["sft1-step-2"].model_id),
                              (3, models["sft1-step-3"].model_id), (3, final.model_id)])
    # a checkpoint loads by its model URI through the pyfunc wrapper (without the trainer state) and predicts
    stored = next(Path(models["sft1-step-2"].artifact_location.removeprefix("file://")).rglob("model.safetensors"))
    assert {f.name for f in stored.parent.iterdir()} == {f.name for f in model_dir.iterdir()}  # no trainer_state.*
    out = predict(models["sft1-step-2"].model_id, tmp_path)
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)


def test_final_and_best_keeps_the_best_through_pruning(model_dir, tmp_path):
    """The default: the final model and the best checkpoint, logged at the end from files held when it was the
    best, although the loop pruned it meanwhile; nothing else is uploaded."""
    cfg = config_for(tmp_path, "final_and_best")
    assert load_config("tiny").tracking.log_checkpoints == "final_and_best"  # the default (params.yaml)
    runs, run_id = play_stage(cfg, model_dir, prune_after_seen=2)
    client = client_of(cfg)
    models = logged_models(client, runs, run_id)
    assert sorted(models) == ["sft1-final", "sft1-step-2"]
    best = models["sft1-step-2"]
    assert (best.tags["m1.best"], best.tags["m1.step"]) == ("true", "2")
    assert metrics_of(best)["loss"] == (2.0, 2, "sft1")
    assert not list((Path(cfg.run_dir) / "sft1").glob(".m1-*"))  # the held files are gone
    assert len(predict(best.model_id, tmp_path)) == 1  # the pruned checkpoint, from MLflow
    # three checkpoints reported on the run all the same
    assert sorted(m.step for m in client.get_metric_history(run_id, "checkpoint_step")) == [1, 2, 3]


def test_final_and_best_when_the_last_step_is_best(model_dir, tmp_path):
    cfg = config_for(tmp_path, "final_and_best", checkpoint_metric={"sft1": "max:loss"})  # step 1 best by max
    cfg2 = config_for(tmp_path / "b", "final_and_best", checkpoint_metric={"sft1": "min:ce"})
    runs, run_id = play_stage(cfg, model_dir)
    assert sorted(logged_models(client_of(cfg), runs, run_id)) == ["sft1-final", "sft1-step-1"]
    # the transformer arm's stage trains with sft1: its checkpoints and metric rule are sft1's
    runs, run_id = play_stage(cfg2, model_dir, stage="transformer_sft1")
    models = logged_models(client_of(cfg2), runs, run_id)
    assert sorted(models) == ["transformer_sft1-final", "transformer_sft1-step-2"]


@pytest.mark.parametrize("policy,expected", [("final", ["sft1-final"]), ("none", [])])
def test_final_and_none_bound_the_upload(model_dir, tmp_path, policy, expected):
    cfg = config_for(tmp_path, policy)
    runs, run_id = play_stage(cfg, model_dir)
    client = client_of(cfg)
    assert sorted(logged_models(client, runs, run_id)) == expected
    assert sorted(m.step for m in client.get_metric_history(run_id, "checkpoint_step")) == [1, 2, 3]


def test_a_cached_stage_logs_no_model(model_dir, tmp_path):
    """The published model predates the stage (a cached stage re-entering the watcher): nothing is logged."""
    from components.pipeline.mlflow_runs import PipelineRuns

    cfg = config_for(tmp_path, "all")
    out = Path(cfg.run_dir) / "sft1"
    shutil.copytree(model_dir, out / "model")
    old = time.time() - 60
    os.utime(out / "model" / "config.json", (old, old))
    runs = PipelineRuns(cfg, "test")
    runs.start()
    run_id = runs.start_stage("sft1")
    with runs.watch_checkpoints(run_id, "sft1", interval=0.05):
        pass
    assert logged_models(client_of(cfg), runs, run_id) == {}


def test_registry_version_comes_from_the_stage_logged_model(model_dir, tmp_path):
    """register finds the final model a training stage logged with the same files: the version's source is
    models:/<model_id>, its run the stage's; without one it logs the model itself and registers that the same way."""
    from components.pipeline import promotion

    cfg = config_for(tmp_path, "final")
    runs, run_id = play_stage(cfg, model_dir)
    client = client_of(cfg)
    final = logged_models(client, runs, run_id)["sft1-final"]
    out = promotion.run(cfg, {"model_dir": str(Path(cfg.run_dir) / "sft1" / "model"), "metrics": {"x": 1.0}})
    mv = client.get_model_version(out.model_name, out.version)
    assert (mv.source, mv.run_id) == (f"models:/{final.model_id}", run_id)
    assert mv.tags["m1.source_run"] == run_id and mv.tags["m1.model_md5"] == final.tags["m1.model_md5"]

    other = tmp_path / "other"  # weights no stage logged (m1 promote --model-dir)
    shutil.copytree(model_dir, other)
    (other / "NOTE.txt").write_text("other\n")
    out = promotion.run(cfg, {"model_dir": str(other), "metrics": {"x": 2.0}})
    mv = client.get_model_version(out.model_name, out.version)
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))  # logged by the registering run
    assert logged.source_run_id == mv.tags["m1.source_run"] == mv.run_id != run_id
    assert len(predict(logged.model_id, tmp_path)) == 1
