"""`dvc repro` of the stages generated from the registry (tiny profile) in a scratch git+DVC repository holding
a copy of the code: the first repro runs curate and convert through `m1 stage`, the second does nothing, and
the recorded output hashes are the pipeline's own content hashes."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import ROOT, load_config
from components.hashing import dvc_md5
from components.pipeline.dvc_stages import dvc_yaml_text
from components.pipeline.stages import registered_stages

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_dvc_repro_twice_is_a_no_op(tmp_path):
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "components", repo / "components", ignore=ignore)
    shutil.copytree(ROOT / "configs", repo / "configs", ignore=ignore)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(dvc_yaml_text(load_config("tiny")))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}

    def sh(*cmd):
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False, timeout=600)
        assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
        return r.stdout + r.stderr

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    first = sh("dvc", "repro")
    stages = [s.name for s in registered_stages(load_config("tiny")) if s.dvc_outs]
    for name in stages:
        assert f"Running stage '{name}'" in first, first
    assert (repo / "runs/tiny/metrics/convert.json").is_file()
    second = sh("dvc", "repro")
    assert "Running stage" not in second and "up to date" in second, second
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    data = next(o for o in lock["stages"]["curate"]["outs"] if o["path"] == "runs/tiny/data")
    assert data["md5"] == dvc_md5(repo / "runs/tiny/data")
