"""S3 through the same code paths a user points at AWS or MinIO, against a moto server started here on
127.0.0.1 (random free port): boto3 checkpoint upload/download, training checkpoints on S3 (a stage's
checkpoint_storage, or the pipeline's checkpoint_uri mirror) that a killed run resumes from after its local
checkpoints are gone, MLflow artifacts (a registered model loaded back by alias), Prefect's stage cache and the
stage-output mirror, `dvc push` / `dvc pull` of a tracked directory (whose DVC hash equals the pipeline's own
content hash), and an unreachable endpoint refused in one line before anything runs."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from components.config import load_config

BUCKET = "m1-test"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with a bucket; AWS_* variables point every client at it. Ray is restarted
    around the module: its workers take credentials from the environment of ray.init (the runs forward only the
    endpoint and region to them)."""
    import boto3
    import ray

    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")  # open as long as the server runs
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}.items():
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    ray.shutdown()
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.3)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client
    finally:
        ray.shutdown()
        mp.undo()
        proc.terminate()
        proc.wait(10)
        log.close()


def keys(client, prefix: str) -> list[str]:
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def test_checkpoint_upload_and_download(s3, tmp_path):
    from components.pipeline.storage import (
        checkpoint_uri,
        download_dir,
        mirror_outputs,
        upload_dir,
    )

    _, client = s3
    src = tmp_path / "ckpt"
    (src / "shard").mkdir(parents=True)
    (src / "state.json").write_text('{"step": 3}')
    (src / "shard" / "w.bin").write_bytes(os.urandom(3000))
    assert upload_dir(src, f"s3://{BUCKET}/ckpts/run1") == 2
    assert sorted(keys(client, "ckpts/run1/")) == ["ckpts/run1/shard/w.bin", "ckpts/run1/state.json"]
    dst = tmp_path / "back"
    assert download_dir(f"s3://{BUCKET}/ckpts/run1", dst) == 2
    assert (dst / "shard" / "w.bin").read_bytes() == (src / "shard" / "w.bin").read_bytes()

    cfg = load_config("tiny", overrides={"run_dir": str(tmp_path / "runA"),
                                         "pipeline": {"checkpoint_uri": f"s3://{BUCKET}/mirror"}})
    assert checkpoint_uri(cfg, "distill") == f"s3://{BUCKET}/mirror/runA/distill/checkpoints"
    assert mirror_outputs(cfg, "convert", {"model_dir": src}) == [f"s3://{BUCKET}/mirror/runA/convert/model_dir"]
    assert len(keys(client, "mirror/runA/convert/model_dir/")) == 2


TRAIN = {"max_steps": 6, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "lr": 1e-3,
         "checkpoint_every": 2, "eval_rows": 4}


def _train(root, name, data, fail_after=None, **over):
    """Run distill on the tiny fixture the way the pipeline does (inside s3_environment); -> its summary metrics
    (None when failing after step `fail_after`). A Ray instance of an earlier test stays up: the run's M1_* and S3
    endpoint settings must reach its workers all the same."""
    from components.pipeline.storage import s3_environment
    from components.train.stage import run

    cfg = load_config(overrides={"run_dir": str(root / name), "teacher": {"source": "random:tiny"},
                                 "tracking": {"enabled": False}, **over,
                                 "distill": {**TRAIN, **over.get("distill", {})}})
    before = dict(os.environ)
    try:
        with s3_environment(cfg):
            if fail_after is None:
                return run(cfg, {"model_dir": root / "conv", "data_dir": data}, "distill").metrics
            os.environ["M1_FAIL_AFTER_STEP"] = str(fail_after)
            with pytest.raises(Exception, match="injected failure"):  # on Ray: its WorkerGroupError
                run(cfg, {"model_dir": root / "conv", "data_dir": data}, "distill")
            return None
    finally:
        os.environ.pop("M1_FAIL_AFTER_STEP", None)
        if cfg.distill.num_workers:  # Ray Train leaves a cleaner actor that logs to the driver for a while
            import ray

            ray.shutdown()
        def mine(env):  # ray.init adds RAY_* variables of its own
            return {k: v for k, v in env.items() if k.startswith(("AWS_", "MLFLOW_", "M1_"))}
        assert mine(os.environ) == mine(before)  # the run leaves no S3 setting behind for the next test


def _losses(root, name):
    lines = (root / name / "distill" / "history.jsonl").read_text().splitlines()
    return {h["step"]: h["loss"] for h in map(json.loads, lines)}


RAY = [pytest.mark.slow]


# On Ray one case: the mirror (rank 0 uploads from the worker, which needs the run's endpoint forwarded); Ray Train's
# own persistence to an S3 storage_filesystem is the same pyarrow filesystem the in-process cases exercise.
@pytest.mark.parametrize("where,workers", [("checkpoint_uri", 0), ("checkpoint_storage", 0),
                                           pytest.param("checkpoint_uri", 1, marks=RAY)])
def test_killed_training_resumes_from_s3_after_local_checkpoints_are_lost(s3, train_setup, where, workers):
    """pipeline.checkpoint_uri mirrors the local checkpoints of <run_dir>/distill/checkpoints to S3;
    distill.checkpoint_storage puts them only there. Killed after step 3 and its local checkpoints deleted, the run
    resumes from the step-2 checkpoint on S3 onto the uninterrupted loss curve; in-process and on a Ray Train
    worker."""
    _, client = s3
    root, data = train_setup
    if not (root / "straight" / "distill" / "history.jsonl").exists():  # shared by every case
        _train(root, "straight", data)
    name = f"killed-{where}-{workers}"
    over, prefix = ({"pipeline": {"checkpoint_uri": f"s3://{BUCKET}/mirror"}}, f"mirror/{name}/distill/checkpoints/")\
        if where == "checkpoint_uri" else ({"distill": {"checkpoint_storage": f"s3://{BUCKET}/{name}"}}, f"{name}/")
    over.setdefault("distill", {})["num_workers"] = workers
    _train(root, name, data, fail_after=3, **over)
    stored = [k for k in keys(client, prefix) if "/checkpoint_" in k]
    assert any(k.endswith("/trainer_state.json") for k in stored), stored
    assert any(k.endswith("/model.safetensors") for k in stored), stored
    shutil.rmtree(root / name / "distill" / "checkpoints", ignore_errors=True)  # the machine lost its disk

    downloads = set(Path(tempfile.gettempdir()).glob("m1-ckpt-*"))
    assert _train(root, name, data, **over)["resumed_from"] == 2
    assert set(Path(tempfile.gettempdir()).glob("m1-ckpt-*")) == downloads  # the copy read from S3 is removed
    straight, resumed = _losses(root, "straight"), _losses(root, name)
    for step in range(3, 7):
        assert abs(straight[step] - resumed[step]) < 1e-6, step
    # the whole stage directory lost (its cached result then points nowhere): the final checkpoint on S3 gives
    # the model back without training again
    shutil.rmtree(root / name / "distill")
    assert _train(root, name, data, **over)["resumed_from"] == 6
    assert (root / name / "distill" / "model" / "config.json").is_file()


def test_unreachable_s3_endpoint_is_one_line_before_anything_runs(tmp_path, capsys):
    from components.cli import main

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for setting in ("pipeline.result_storage", "pipeline.checkpoint_uri"):
        run_dir = tmp_path / setting
        rc = main(["pipeline", "--profile", "tiny", "--stages", "convert", "--set", f"run_dir={run_dir}",
                   "--set", f"{setting}=s3://{BUCKET}/x", "--set", f"pipeline.s3.endpoint_url={endpoint}"])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err.startswith(f"m1: error: S3 endpoint {endpoint} unreachable (") and err.count("\n") == 1, err
        assert f"{setting} s3://{BUCKET}/x" in err
        assert not run_dir.exists()  # nothing ran


def test_output_mirror_failure_is_one_line(tmp_path, monkeypatch):
    from components.errors import M1Error
    from components.pipeline.storage import mirror_outputs

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = load_config("tiny", overrides={"run_dir": str(tmp_path / "run"), "pipeline": {
        "checkpoint_uri": f"s3://{BUCKET}/mirror", "s3": {"endpoint_url": endpoint}}})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f.txt").write_text("x")
    with pytest.raises(M1Error) as e:
        mirror_outputs(cfg, "convert", {"model_dir": tmp_path / "out"})
    msg = str(e.value)
    assert msg.startswith(f"S3 endpoint {endpoint} unreachable (") and "\n" not in msg, msg
    assert f"s3://{BUCKET}/mirror/run/convert/model_dir" in msg


@pytest.mark.slow
def test_unreachable_result_storage_fails_the_flow_run(tmp_path):
    """Through the flow itself (a deployment run has no CLI in front): a Failed run with the one line, not a
    "Completed" run that saved no cache."""
    from prefect.settings import PREFECT_HOME, temporary_settings

    from flows.m1_pipeline import m1_pipeline

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    over = {"run_dir": str(tmp_path / "run"), "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
            "pipeline": {"result_storage": f"s3://{BUCKET}/prefect", "s3": {"endpoint_url": endpoint}}}
    from components.pipeline.prefect_local import stop_ephemeral_server

    with temporary_settings(updates={PREFECT_HOME: str(tmp_path / "prefect")}):
        try:
            state = m1_pipeline(profile="tiny", stages=["convert"], overrides=over, return_state=True)
        finally:
            stop_ephemeral_server()
    assert state.is_failed()
    assert state.message.startswith(f"m1: error: S3 endpoint {endpoint} unreachable ("), state.message
    assert not (tmp_path / "run" / "convert").exists()


@pytest.mark.slow
def test_mlflow_artifacts_and_registry_on_s3(s3, tmp_path):
    import mlflow
    import pandas as pd

    from components.model.convert import run as convert
    from components.pipeline import promotion
    from components.tracking import Tracker, standalone_run, use_store

    _, client = s3
    over = {"run_dir": str(tmp_path / "run"),
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": f"s3://{BUCKET}/mlflow",
                         "experiment": "s3-test"},
            "pipeline": {"promotion": {"gate": [], "max_new_tokens": 4}}}
    cfg = load_config("tiny", overrides=over)
    note = tmp_path / "note.txt"
    note.write_text("hello s3")
    with standalone_run(cfg.tracking, "artifact-check") as run_id:
        Tracker().log_artifact(note)
    assert f"mlflow/{run_id}/artifacts/note.txt" in keys(client, "mlflow/")

    model_dir = convert(cfg).model_dir
    out = promotion.run(cfg, {"model_dir": model_dir, "metrics": {"pass@1": 0.1}})
    assert out.promoted
    stored = keys(client, "mlflow/")
    assert any(k.endswith("model.safetensors") for k in stored), stored
    use_store(f"sqlite:///{tmp_path}/mlflow.db")  # mlflow.set_tracking_uri would set MLFLOW_TRACKING_URI for good
    shutil.rmtree(model_dir)  # the registry copy on S3 is what gets loaded
    (tmp_path / "loaded").mkdir()  # MLflow's own default is a temp dir it never removes
    model = mlflow.pyfunc.load_model(f"models:/{out.model_name}@champion", dst_path=str(tmp_path / "loaded"))
    texts = model.predict(pd.DataFrame({"prompt": ["1+1?"]}))
    assert len(texts) == 1 and isinstance(texts[0], str)


@pytest.mark.slow
def test_prefect_cache_and_output_mirror_on_s3(s3, tmp_path):
    from prefect.settings import PREFECT_HOME, temporary_settings

    from flows.m1_pipeline import m1_pipeline

    endpoint, client = s3
    over = {"run_dir": str(tmp_path / "run"), "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
            "pipeline": {"result_storage": f"s3://{BUCKET}/prefect", "checkpoint_uri": f"s3://{BUCKET}/outputs",
                         "s3": {"endpoint_url": endpoint}}}
    with temporary_settings(updates={PREFECT_HOME: str(tmp_path / "prefect")}):
        first = m1_pipeline(profile="tiny", stages=["convert"], overrides=over)
        assert [r["cached"] for r in first["stages"]] == [False]
        assert f"prefect/{first['stages'][0]['cache_key']}" in keys(client, "prefect/")
        assert any(k.endswith("model.safetensors") for k in keys(client, "outputs/run/convert/model_dir/"))
        again = m1_pipeline(profile="tiny", stages=["convert"], overrides=over)
        assert [r["cached"] for r in again["stages"]] == [True]
        from components.pipeline.prefect_local import stop_ephemeral_server

        stop_ephemeral_server()



@pytest.mark.slow
def test_dvc_push_pull_with_s3_remote(s3, tmp_path):
    from components.hashing import dvc_md5

    endpoint, client = s3
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}

    def sh(*cmd):
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False, timeout=300)
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
        return r.stdout

    sh("git", "init", "-q")
    sh("git", "config", "user.email", "t@example.com")
    sh("git", "config", "user.name", "t")
    sh("dvc", "init", "-q")
    sh("dvc", "remote", "add", "-d", "store", f"s3://{BUCKET}/dvc")
    sh("dvc", "remote", "modify", "store", "endpointurl", endpoint)
    data = repo / "data"
    (data / "shards").mkdir(parents=True)
    (data / "manifest.json").write_text('{"rows": 2}')
    (data / "shards" / "a.parquet").write_bytes(os.urandom(5000))
    sh("dvc", "add", "-q", "data")
    import yaml

    md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert md5 == dvc_md5(data)  # the pipeline's cache keys and MLflow dataset digests are DVC's own hash
    sh("dvc", "push", "-q")
    assert any(k.startswith("dvc/files/md5/") for k in keys(client, "dvc/"))
    original = (data / "shards" / "a.parquet").read_bytes()
    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    sh("dvc", "pull", "-q")
    assert (data / "shards" / "a.parquet").read_bytes() == original
