"""infra/offline/node-pipeline.sh on CPU (no Ray head: the flow starts its own local Ray instance): the flow runs
detached, `wait` sees it finish, `m1 pipeline --summary-json` records it, and the GPU-run report reads it back.
A second start completes from the Prefect cache. `branches` runs the arms' branches as flow runs side by side
and then a last flow that finds them in the cache; `bench` runs any command in place of the flow."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path("infra") / "offline" / "node-pipeline.sh"
REPORT = Path("bench") / "gpu_pipeline_report.py"


def checkout(tmp_path: Path) -> Path:
    """A copy of what the script runs, as a checkout on the node holds it. The script works in the checkout it
    lives in (runs/<profile>, its Prefect home and cache there): run from the repository itself, an earlier run of
    the tiny profile there (this test's own, last time) served the first run from its cache."""
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("components", "flows", "configs"):
        shutil.copytree(ROOT / d, repo / d, ignore=ignore)
    for f in ("params.yaml", SCRIPT, REPORT):
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, repo / f)
    return repo


def _node(repo: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / SCRIPT), *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.slow
def test_detached_flow_summary_report_and_second_run_from_cache(tmp_path):
    repo = checkout(tmp_path)
    run_dir = repo / "runs" / "tiny"
    env = {**os.environ, "M1_RAY_HEAD": "0", "M1_PYTHON": sys.executable, "MLFLOW_TRACKING_URI":
           f"sqlite:///{tmp_path}/mlflow.db", "PREFECT_HOME": str(tmp_path / "prefect")}
    summaries = []
    for _ in range(2):
        (run_dir / "pipeline.rc").unlink(missing_ok=True)
        started = _node(repo, "start", "tiny", "--stages", "curate", env=env)
        assert started.returncode == 0, started.stderr
        waited = _node(repo, "wait", "tiny", "300", env=env)
        assert waited.stdout.strip().endswith("finished with exit status 0"), waited.stdout + waited.stderr
        summaries.append(json.loads((run_dir / "pipeline_summary.json").read_text()))
    first, second = summaries
    assert [s["stage"] for s in first["stages"]] == ["curate"]
    assert first["flow_run_id"] != second["flow_run_id"]
    assert second["stages"][0]["cached"] is True and second["stages"][0]["cache_key"] == first["stages"][0]["cache_key"]
    (tmp_path / "first.json").write_text(json.dumps(first))
    out = tmp_path / "report.json"
    rep = subprocess.run([sys.executable, str(REPORT), "--profile", "tiny", "--summary", str(tmp_path / "first.json"),
                          "--cached-summary", str(run_dir / "pipeline_summary.json"), "--out", str(out)],
                         cwd=repo, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert rep.returncode == 0, rep.stderr
    rec = json.loads(out.read_text())
    assert rec["prefect_flow_run"] == first["flow_run_id"] and rec["gpus"] == 0
    assert [(s["stage"], s["status"]) for s in rec["stages"]] == [("curate", "completed")]
    assert rec["second_run"]["stages"] == [{"stage": "curate", "cached": True,
                                            "seconds": round(second["stages"][0]["seconds"], 2)}]


@pytest.mark.slow
def test_branches_run_side_by_side_and_the_last_flow_takes_them_from_the_cache(tmp_path):
    """`branches`: curate, then one flow run per branch at once (each its target and what it depends on), then
    the last flow, here limited by --stages to the branches' targets, finds every stage in the cache."""
    repo = checkout(tmp_path)
    run_dir = repo / "runs" / "tiny"
    env = {**os.environ, "M1_RAY_HEAD": "0", "M1_PYTHON": sys.executable, "M1_BRANCHES": "distill transformer_init",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PREFECT_HOME": str(tmp_path / "prefect")}
    started = _node(repo, "branches", "tiny", "--stages", "distill", "transformer_init", env=env)
    assert started.returncode == 0, started.stderr
    waited = _node(repo, "wait", "tiny", "500", env=env)
    logs = "".join((p.name + ":\n" + p.read_text()[-2000:]) for p in sorted(run_dir.glob("*.log")))
    assert waited.stdout.strip().endswith("finished with exit status 0"), waited.stdout + logs

    def stages(name: str) -> dict[str, bool]:
        return {s["stage"]: s["cached"] for s in json.loads((run_dir / name).read_text())["stages"]}

    # each branch found curate in the cache (the run before them made it) and ran its own stages
    assert stages("branch-distill.json") == {"curate": True, "convert": False, "distill": False}
    assert stages("branch-transformer_init.json") == {"transformer_init": False}
    assert stages("pipeline_summary.json") == {"curate": True, "convert": True, "distill": True,
                                               "transformer_init": True}


def test_bench_runs_a_command_detached_with_the_run_dirs_stores(tmp_path):
    """`bench`: any command in place of the flow, detached, with the profile's Prefect home and MLflow store in its
    environment; `wait` reports its exit status, which is the command's own."""
    repo = checkout(tmp_path)
    run_dir = repo / "runs" / "tiny"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_HOME")}
    env.update({"M1_RAY_HEAD": "0", "M1_PYTHON": sys.executable})
    show = "import os; print('home', os.environ['PREFECT_HOME']); print('mlflow', os.environ['MLFLOW_TRACKING_URI'])"
    started = _node(repo, "bench", "tiny", sys.executable, "-c", show, env=env)
    assert started.returncode == 0, started.stderr
    waited = _node(repo, "wait", "tiny", "120", env=env)
    assert waited.stdout.strip().endswith("finished with exit status 0"), waited.stdout + waited.stderr
    assert f"home {run_dir}/prefect" in waited.stdout
    assert "disk under the run dir: " in waited.stdout and " free of " in waited.stdout
    assert f"mlflow sqlite:///{run_dir}/mlflow.db" in waited.stdout
    started = _node(repo, "bench", "tiny", sys.executable, "-c", "raise SystemExit(3)", env=env)
    assert started.returncode == 0, started.stderr
    assert _node(repo, "wait", "tiny", "120", env=env).stdout.strip().endswith("finished with exit status 3")
    refused = _node(repo, "bench", "tiny", env=env)
    assert refused.returncode == 2 and "usage: node-pipeline.sh bench PROFILE COMMAND" in refused.stderr
