"""MLflow registry: the gate's decision rule; registering a tiny converted hybrid as m1-hybrid@candidate, the
gate moving `champion` only for a better candidate (decisions in version tags), `m1 promote`, and
`mlflow.pyfunc.load_model("models:/m1-hybrid@champion")` generating text."""
import pytest

from components.config import load_config
from components.pipeline.config import GateMetric
from components.pipeline.registry import decide

GATE = [GateMetric(metric="pass@1", min_improvement=0.01), GateMetric(metric="latency_s", higher_is_better=False)]


def test_gate_rules():
    d = decide(GATE, {"pass@1": 0.30, "latency_s": 2.0}, None, None)
    assert d.promoted and d.reason == "no champion yet"
    champ = {"pass@1": 0.30, "latency_s": 2.0}
    d = decide(GATE, {"pass@1": 0.35, "latency_s": 1.5}, champ, "3")
    assert d.promoted and d.compared_to == "3" and d.details["pass@1"]["improvement"] == pytest.approx(0.05)
    d = decide(GATE, {"pass@1": 0.305, "latency_s": 1.0}, champ, "3")  # not enough accuracy gained
    assert not d.promoted and "pass@1" in d.reason
    d = decide(GATE, {"pass@1": 0.40, "latency_s": 2.5}, champ, "3")  # slower: lower is better
    assert not d.promoted and "latency_s" in d.reason
    d = decide(GATE, {"latency_s": 1.0}, champ, "3")
    assert not d.promoted and "candidate has no pass@1" in d.reason
    floor = [GateMetric(metric="pass@1", min_value=0.5)]
    assert not decide(floor, {"pass@1": 0.4}, None, None).promoted
    assert decide([], {}, champ, "3").promoted  # an empty gate promotes every candidate
    assert decide(GATE, {"pass@1": 0.9, "latency_s": 1.0}, {}, "3").promoted  # champion without metrics


def m1(*argv) -> int:
    from components.cli import main

    return main(list(argv))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from components.model.convert import run as convert

    root = tmp_path_factory.mktemp("registry")
    over = {"run_dir": str(root / "run"), "tracking": {"uri": f"sqlite:///{root}/mlflow.db"},
            "pipeline": {"promotion": {"gate": [{"metric": "pass@1", "min_improvement": 0.01}],
                                       "max_new_tokens": 6}}}
    cfg = load_config("tiny", overrides=over)
    out = convert(cfg)
    return cfg, out.model_dir, over


@pytest.mark.slow
def test_register_gate_and_load_champion(setup, capsys):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from components.pipeline import registry
    from components.tracking import tracking_uri

    cfg, model_dir, over = setup
    first = registry.run(cfg, {"model_dir": model_dir, "metrics": {"pass@1": 0.20}})
    assert first.promoted and first.champion_version == first.version == "1"
    worse = registry.run(cfg, {"model_dir": model_dir, "metrics": {"pass@1": 0.205}})
    assert not worse.promoted and worse.champion_version == "1"

    client = MlflowClient(tracking_uri(cfg.tracking))
    assert str(client.get_model_version_by_alias("m1-hybrid", "candidate").version) == "2"
    assert str(client.get_model_version_by_alias("m1-hybrid", "champion").version) == "1"
    tags = client.get_model_version("m1-hybrid", "2").tags
    assert tags["gate.decision"] == "rejected" and tags["gate.compared_to"] == "1"
    assert tags["metric.pass_1"] == "0.205" and "improvement" in tags["gate.reason"]

    # m1 promote: register a better model from the command line (metrics passed explicitly)
    sets = ["--set", f"tracking.uri={over['tracking']['uri']}",
            "--set", "pipeline.promotion.gate=[{metric: pass@1, min_improvement: 0.01}]"]
    assert m1("promote", "--profile", "tiny", *sets, "--model-dir", model_dir, "--metric", "pass@1=0.3") == 0
    assert "promoted to champion" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("m1-hybrid", "champion").version) == "3"
    assert client.get_model_version("m1-hybrid", "1").tags["gate.superseded_by"] == "3"
    assert m1("promote", "--profile", "tiny", *sets) == 0  # re-gating the champion changes nothing
    assert "already is the champion" in capsys.readouterr().out
    assert m1("promote", "--profile", "tiny", *sets, "--version", "9") == 2
    assert "has no version 9" in capsys.readouterr().err

    mlflow.set_tracking_uri(tracking_uri(cfg.tracking))
    model = mlflow.pyfunc.load_model("models:/m1-hybrid@champion")
    texts = model.predict(pd.DataFrame({"prompt": ["What is 2 + 3?", "Name a prime."]}),
                          params={"max_new_tokens": 5, "temperature": 1.0})
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
