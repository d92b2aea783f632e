"""Serving the champion over REST: `m1 serve` runs `mlflow models serve -m models:/<name>@champion --env-manager
local` with the profile's tracking store and the virtual environment's bin on PATH (MLflow starts `uvicorn` by
name: from a shell without the venv activated the bare command exits 127), and the served model answers
POST /invocations with one text per prompt."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from components.commands.serve import serve_command
from components.config import load_config

NAME = "m1-serve-test"


def config(tmp_path):
    return load_config("tiny", overrides={
        "run_dir": str(tmp_path / "run"), "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "pipeline": {"promotion": {"gate": [], "max_new_tokens": 4, "model_name": NAME}}})


def test_serve_command_brings_its_path_and_store(tmp_path):
    bindir = Path(sys.executable).parent
    argv, env = serve_command(config(tmp_path), port=5123)
    assert argv == [str(bindir / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager",
                    "local", "-h", "127.0.0.1", "-p", "5123"]
    assert env["PATH"].split(os.pathsep)[0] == str(bindir) and (bindir / "uvicorn").exists()
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert serve_command(config(tmp_path), version="3")[0][4] == f"models:/{NAME}/3"


def test_serve_without_the_model_is_one_line(tmp_path, capsys):
    from components.cli import main

    assert main(["serve", "--profile", "tiny", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                 "--set", f"pipeline.promotion.model_name={NAME}"]) == 2
    assert f"{NAME} has no alias 'champion' in the registry" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_champion_answers_rest(tmp_path):
    from components.model.convert import run as convert
    from components.pipeline import promotion

    cfg = config(tmp_path)
    out = promotion.run(cfg, {"model_dir": convert(cfg).model_dir, "metrics": {"pass@1": 0.1}})
    assert out.promoted and out.model_name == NAME
    port = free_port()
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # a fresh shell: the venv not activated
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "m1"), "serve", "--profile", "tiny",
                             "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                             "--set", f"pipeline.promotion.model_name={NAME}", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120  # a failure guard: `mlflow models serve` starts slowly beside other tests
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{base}/ping", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        body = {"dataframe_split": {"columns": ["prompt"], "data": [["What is 2 + 3?"], ["Name a prime."]]},
                "params": {"max_new_tokens": 3}}
        req = urllib.request.Request(f"{base}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
        assert list(answer) == ["predictions"] and len(answer["predictions"]) == 2
        assert all(isinstance(t, str) for t in answer["predictions"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert f"models serve -m models:/{NAME}@champion --env-manager local" in (tmp_path / "serve.log").read_text()
