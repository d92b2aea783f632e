"""Killed during a training stage and run again, the pipeline resumes: the finished stages come from the cache
and the training stage continues from its last checkpoint. The first run is a separate `m1 pipeline` process
killed with SIGKILL once a checkpoint exists; the second runs in-process. Skipped until a training stage
(distill) is registered."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.config import ROOT
from components.pipeline.stages import stage_names

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif("distill" not in stage_names(), reason="no training stage registered yet")]

TRAIN = {"max_steps": 5, "global_batch_size": 2, "micro_batch_size": 1, "warmup_steps": 0, "checkpoint_every": 1,
         "eval_rows": 2}


def test_killed_training_stage_resumes_from_checkpoint(tmp_path):
    from prefect.settings import PREFECT_HOME, temporary_settings

    from components.train.checkpoint import list_checkpoints

    run_dir = tmp_path / "run"
    sets = [f"run_dir={run_dir}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    sets += [f"distill.{k}={v}" for k, v in TRAIN.items()]
    cmd = [sys.executable, "-m", "components.cli", "pipeline", "--profile", "tiny", "--stages", "distill"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ckpts = run_dir / "distill" / "checkpoints"
    try:
        deadline = time.time() + 400
        while not (ckpts.is_dir() and list_checkpoints(str(ckpts.resolve()))):
            assert proc.poll() is None, Path(log.name).read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within the time limit"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert not (run_dir / "distill" / "model" / "config.json").exists()  # killed before finishing

    from flows.m1_pipeline import m1_pipeline

    overrides = {"run_dir": str(run_dir), "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}, "distill": TRAIN}
    with temporary_settings(updates={PREFECT_HOME: str(tmp_path / "prefect")}):
        summary = m1_pipeline(profile="tiny", stages=["distill"], overrides=overrides)
        from components.pipeline.prefect_local import stop_ephemeral_server

        stop_ephemeral_server()
    rows = {r["stage"]: r for r in summary["stages"]}
    assert rows["curate"]["cached"] and rows["convert"]["cached"] and not rows["distill"]["cached"]
    assert rows["distill"]["all_metrics"]["resumed_from"] >= 1
    assert (run_dir / "distill" / "model" / "config.json").is_file()
