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
