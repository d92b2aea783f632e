"""The local stack end to end: `infra/local-stack.sh start --s3` on free ports, a run of the deployment
m1-pipeline/local (tiny profile) through the Prefect server and the process worker, its MLflow runs on the
MLflow server, its cached results and stage outputs in the moto S3 server; `stop` ends exactly the recorded
processes. Started again with another artifact destination for the same MLflow database, it refuses."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from components.config import ROOT

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


SCRIPT = str(ROOT / "infra" / "local-stack.sh")


def script_env(tmp_path, stack) -> tuple[dict, dict]:
    """(environment for the script on free ports with its folders under tmp_path, the ports)."""
    ports = {"PREFECT_PORT": free_port(), "MLFLOW_PORT": free_port(), "S3_PORT": free_port()}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "M1_STACK_DIR": str(stack),
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "S3_BUCKET": "m1-stack-test", "M1_VENV": str(BIN.parent)}
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL",
              "M1_RESULT_STORAGE", "M1_CHECKPOINT_URI", "AWS_PROFILE"):
        env.pop(k, None)
    return env, ports


def sourced(stack: Path, env: dict) -> dict:
    """The environment after `source <stack>/env.sh` in a shell started with `env`."""
    out = subprocess.run(["bash", "-c", f"source {stack}/env.sh && env -0"], env=env, capture_output=True,
                         check=True, timeout=60).stdout.decode()
    return dict(item.partition("=")[::2] for item in out.split("\0") if item)


def test_stack_runs_a_deployment_with_s3(tmp_path):
    stack = tmp_path / "stack"
    env, ports = script_env(tmp_path, stack)
    started = subprocess.run(["bash", SCRIPT, "start", "--s3"], env=env, capture_output=True, text=True,
                             timeout=400, check=False)
    pids = []
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        pids = [int(line.split()[1]) for line in (stack / "pids").read_text().splitlines()]
        assert len(pids) == 4 and all(alive(p) for p in pids)

        stack_env = sourced(stack, {**env, "PATH": "/usr/bin:/bin"})  # a fresh shell: the venv not activated
        assert stack_env["PREFECT_API_URL"] == f"http://127.0.0.1:{ports['PREFECT_PORT']}/api"
        assert stack_env["PATH"] == f"{BIN}:/usr/bin:/bin"
        params = {"profile": "tiny", "stages": ["convert"], "overrides": {"run_dir": str(tmp_path / "run")}}
        run = subprocess.run(["prefect", "deployment", "run", "m1-pipeline/local", "--params",  # as printed by start
                              json.dumps(params), "--watch", "--watch-timeout", "400"],
                             env=stack_env, capture_output=True, text=True, timeout=450, check=False)
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]

        import boto3
        from mlflow.tracking import MlflowClient

        client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
        exp = client.get_experiment_by_name("m1")
        names = {r.info.run_name for r in client.search_runs([exp.experiment_id])}
        assert "convert" in names
        s3 = boto3.client("s3", endpoint_url=stack_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="m1-stack-test").get("Contents", [])]
        assert any(k.startswith("prefect-results/m1-convert-") for k in keys), keys
        assert any(k.startswith("checkpoints/run/convert/model_dir/") for k in keys), keys
    finally:
        stopped = subprocess.run(["bash", SCRIPT, "stop"], env=env, capture_output=True, text=True, timeout=120,
                                 check=False)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(alive(p) for p in pids)
    assert not (stack / "pids").exists()


def test_restart_with_another_artifact_destination_is_refused(tmp_path):
    """Started without --s3 (artifacts in <stack>/mlartifacts) and stopped, the stack refuses `start --s3` for the
    same MLflow database in one line, before starting anything: its runs would point at artifacts elsewhere."""
    stack = tmp_path / "stack"
    env, ports = script_env(tmp_path, stack)

    def sh(*args, timeout=400):
        return subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    started = sh("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        # it ends with the UI addresses (MLflow's opens the pipeline's experiment as model training) and the
        # next command, which works in a fresh shell once env.sh is sourced
        from mlflow.tracking import MlflowClient

        from components.tracking import EXPERIMENT_KIND_TAG

        exp = MlflowClient(f"http://127.0.0.1:{ports['MLFLOW_PORT']}").get_experiment_by_name("m1")
        assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
        lines = started.stdout.splitlines()
        assert lines[1].split()[:3] == ["Prefect", "UI", f"http://127.0.0.1:{ports['PREFECT_PORT']}"]
        assert lines[2].split()[:3] == ["MLflow", "UI", f"http://127.0.0.1:{ports['MLFLOW_PORT']}/#/experiments/"
                                        f"{exp.experiment_id}?workflowType=machine_learning"]
        assert lines[-1].strip() == (f"source {stack}/env.sh && prefect deployment run m1-pipeline/local "
                                     "-p profile=tiny --watch")
        fresh = sourced(stack, {**env, "PATH": "/usr/bin:/bin"})
        assert subprocess.run(["prefect", "--version"], env=fresh, capture_output=True, timeout=120).returncode == 0
    finally:
        assert sh("stop", timeout=120).returncode == 0
    assert (stack / "mlflow.db").is_file()

    refused = sh("start", "--s3")
    if refused.returncode == 0:
        sh("stop", timeout=120)
    assert refused.returncode != 0, refused.stdout
    assert refused.stderr.startswith(f"local-stack: {stack}/mlflow.db keeps its artifacts in {stack}/mlartifacts, "
                                     "not s3://m1-stack-test/mlflow"), refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert not (stack / "pids").exists()  # nothing was started
    assert (stack / "mlflow.db.artifacts").read_text().strip() == str(stack / "mlartifacts")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ports["S3_PORT"]), timeout=1).close()
