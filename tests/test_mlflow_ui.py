"""MLflow UI fit for training: the experiments the pipeline creates carry MLflow 3's experiment-kind tag with the
model-training value (an existing experiment without a kind gets it; a kind chosen in the UI stays), and every
link the product prints opens the model-training view (MLflow 3.17 chooses the view by a per-browser switch,
GenAI by default, which the URL parameter sets)."""
import sys
from pathlib import Path

from components.tracking import (
    EXPERIMENT_KIND_TAG,
    TRAINING_KIND,
    TrackingConfig,
    ensure_experiment,
    experiment_link,
    run_link,
    ui_command,
)


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_new_and_old_experiments_open_as_model_training(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = client(uri)
    exp = ensure_experiment(TrackingConfig(uri=uri, experiment="fresh"), uri)
    assert c.get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == "custom_model_development" == TRAINING_KIND
    assert ensure_experiment(TrackingConfig(uri=uri, experiment="fresh"), uri) == exp

    old = c.create_experiment("made-before")  # e.g. by an earlier version of the pipeline: no kind
    assert EXPERIMENT_KIND_TAG not in c.get_experiment(old).tags
    assert ensure_experiment(TrackingConfig(uri=uri, experiment="made-before"), uri) == old
    assert c.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"

    chosen = c.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert ensure_experiment(TrackingConfig(uri=uri, experiment="chosen"), uri) == chosen
    assert c.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_the_kind_is_what_the_installed_ui_knows():
    """The tag and the view parameter are the values of the installed MLflow's UI bundle."""
    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    main = next(js.glob("main.*.js")).read_text(errors="ignore")
    assert 'CUSTOM_MODEL_DEVELOPMENT="custom_model_development"' in main
    assert '"mlflow.experimentKind"' in main and 'MACHINE_LEARNING="machine_learning"' in main


def test_links_open_the_training_view():
    assert run_link("sqlite:////x/mlflow.db", "3", "abc") == \
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert experiment_link("http://127.0.0.1:5005/", "1") == \
        "http://127.0.0.1:5005/#/experiments/1?workflowType=machine_learning"


def test_ui_command_works_without_the_venv_on_path():
    cmd = ui_command("sqlite:////x/mlflow.db")
    assert cmd == f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri sqlite:////x/mlflow.db " \
                  "--host 127.0.0.1 --port 5000"
    assert ui_command("http://127.0.0.1:5000") == "open http://127.0.0.1:5000"
