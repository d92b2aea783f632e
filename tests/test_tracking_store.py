"""use_store points MLflow's fluent API (and, asked to, its registry) at a store without leaving that store in the
process environment, where every later client made without a URI, in this process and in the processes it starts,
would read it instead of the user's setting."""
import os

import mlflow

from components.tracking import use_store


def test_use_store_sets_the_fluent_uris_and_leaves_the_environment_as_it_was(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:////users/own/registry.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    use_store(uri, registry=True)
    assert mlflow.get_tracking_uri() == uri
    assert mlflow.get_registry_uri() == uri
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert os.environ["MLFLOW_REGISTRY_URI"] == "sqlite:////users/own/registry.db"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    use_store(uri, registry=True)
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    assert "MLFLOW_REGISTRY_URI" not in os.environ


WORKER = """
import pathlib, sys, time
from components.tracking import TrackingConfig, ensure_experiment
import mlflow.tracking  # imported before the start line, so that the processes meet the new store together
uri, go = sys.argv[1], pathlib.Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
print(ensure_experiment(TrackingConfig(experiment="m1"), uri), flush=True)
"""


def test_processes_opening_a_new_sqlite_store_together_all_get_the_experiment(tmp_path):
    """Without store_lock, 3-4 of 4 such processes failed here (alembic: _alembic_tmp_experiments exists)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    uri, go = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, uri, str(go)], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert len({o.strip().splitlines()[-1] for o in outs}) == 1  # one experiment, the same id for all
