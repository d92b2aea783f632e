"""MLflow registry: the gate's decision rule and its default floor (pass@1 above 0); the registered name per
profile (m1-hybrid, m1-hybrid-<profile>); registering a tiny converted hybrid as m1-hybrid-tiny@candidate, the
gate moving `champion` only for a better candidate (decisions in version tags, left alone by a bare
`m1 promote`), identical weights reusing their version, versions tagged with the gate's metrics and lineage only, and
`mlflow.pyfunc.load_model("models:/m1-hybrid-tiny@champion")` generating text."""
import json
import shutil
from pathlib import Path

import pytest

from components.config import load_config
from components.hashing import dvc_md5
from components.pipeline.config import GateMetric
from components.pipeline.promotion import decide

GATE = [GateMetric(metric="pass@1", min_improvement=0.01), GateMetric(metric="latency_s", higher_is_better=False)]
NAME = "m1-hybrid-tiny"  # the tiny profile's registered model
OWN = "m1-test"  # a name set in the config: the tests of one behaviour each


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
    assert not decide(floor, {"pass@1": 0.5}, None, None).promoted  # the floor itself does not clear it
    assert decide([], {}, champ, "3").promoted  # an empty gate promotes every candidate
    assert decide(GATE, {"pass@1": 0.9, "latency_s": 1.0}, {}, "3").promoted  # champion without metrics


def test_default_gate_wants_pass_at_1_above_zero():
    gate = load_config("default").pipeline.promotion.gate
    assert [(g.metric, g.min_value, g.min_improvement) for g in gate] == [("hybrid/all/pass_at_1", 0.0, 0.0)]
    d = decide(gate, {"hybrid/all/pass_at_1": 0.0}, None, None)
    assert not d.promoted and d.reason == "hybrid/all/pass_at_1 0 does not clear the floor 0"
    assert decide(gate, {"hybrid/all/pass_at_1": 0.01}, None, None).reason == "no champion yet"


def test_registered_name_per_profile():
    from components.pipeline.promotion import model_name

    assert model_name(load_config("default")) == "m1-hybrid"
    assert model_name(load_config("tiny")) == NAME
    assert model_name(load_config("m1-3b")) == "m1-hybrid-m1-3b"
    set_by_profile = load_config("tiny", overrides={"pipeline": {"promotion": {"model_name": "m1-exp"}}})
    assert model_name(set_by_profile) == "m1-exp"


def m1(*argv) -> int:
    from components.cli import main

    return main(list(argv))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three tiny converted hybrids: the same weights with a different note each, so three content hashes."""
    from components.model.convert import run as convert

    root = tmp_path_factory.mktemp("registry")
    first = convert(load_config("tiny", overrides={"run_dir": str(root / "run")})).model_dir
    dirs = []
    for name in ("a", "b", "c"):
        d = root / name
        shutil.copytree(first, d)
        (d / "NOTE.txt").write_text(f"model {name}\n")
        dirs.append(str(d))
    return dirs


def store(tmp_path, gate=({"metric": "pass@1", "min_improvement": 0.01},), name: str | None = OWN):
    """A tiny config on a fresh sqlite store (version numbers start at 1); gate=None keeps the default gate,
    name=None the profile's model name."""
    promotion = {"max_new_tokens": 6, **({"gate": list(gate)} if gate is not None else {}),
                 **({"model_name": name} if name else {})}
    over = {"run_dir": str(tmp_path / "run"), "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
            "pipeline": {"promotion": promotion}}
    return load_config("tiny", overrides=over), over


def client_of(cfg):
    from mlflow.tracking import MlflowClient

    from components.tracking import tracking_uri

    uri = tracking_uri(cfg.tracking)
    return MlflowClient(uri, registry_uri=uri)  # not the registry another test left set in this process


def alias(client, name: str, alias: str) -> str:
    return str(client.get_model_version_by_alias(name, alias).version)


@pytest.mark.slow
def test_register_gate_and_load_champion(models, tmp_path, capsys):
    import mlflow
    import pandas as pd

    from components.pipeline import promotion
    from components.tracking import tracking_uri, use_store

    cfg, over = store(tmp_path, name=None)
    a, b, c = models
    first = promotion.run(cfg, {"model_dir": a, "metrics": {"pass@1": 0.20}})
    assert first.promoted and first.champion_version == first.version == "1" and first.model_name == NAME
    worse = promotion.run(cfg, {"model_dir": b, "metrics": {"pass@1": 0.205}})
    assert not worse.promoted and worse.version == "2" and worse.champion_version == "1"

    client = client_of(cfg)
    assert [m.name for m in client.search_registered_models()] == [NAME]  # never the default profile's m1-hybrid
    assert alias(client, NAME, "candidate") == "2" and alias(client, NAME, "champion") == "1"
    tags = client.get_model_version(NAME, "2").tags
    assert tags["gate.decision"] == "rejected" and tags["gate.compared_to"] == "1"
    assert tags["metric.pass_1"] == "0.205" and "improvement" in tags["gate.reason"]

    # m1 promote: register a better model from the command line (metrics passed explicitly)
    sets = ["--set", f"tracking.uri={over['tracking']['uri']}",
            "--set", "pipeline.promotion.gate=[{metric: pass@1, min_improvement: 0.01}]"]
    assert m1("promote", "--profile", "tiny", *sets, "--model-dir", c, "--metric", "pass@1=0.3") == 0
    assert "promoted to champion" in capsys.readouterr().out
    assert alias(client, NAME, "champion") == "3" and alias(client, NAME, "candidate") == "3"
    assert client.get_model_version(NAME, "1").tags["gate.superseded_by"] == "3"
    promoted = client.get_model_version(NAME, "3").tags
    assert promoted["gate.decision"] == "promoted" and promoted["gate.reason"] == "beats champion v1: pass@1 0.3 > 0.2"

    # a bare m1 promote re-gates the candidate, which is the champion: nothing changes, its tags included
    assert m1("promote", "--profile", "tiny", *sets) == 0
    assert capsys.readouterr().out == f"{NAME} v3: not promoted: version 3 already is the champion\n"
    assert client.get_model_version(NAME, "3").tags == promoted
    assert alias(client, NAME, "champion") == "3"
    assert m1("promote", "--profile", "tiny", *sets, "--version", "9") == 2
    assert f"{NAME} has no version 9" in capsys.readouterr().err

    use_store(tracking_uri(cfg.tracking), registry=True)  # mlflow.set_tracking_uri would also set the environment
    (tmp_path / "loaded").mkdir()  # MLflow's own default is a temp dir it never removes
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion", dst_path=str(tmp_path / "loaded"))
    texts = model.predict(pd.DataFrame({"prompt": ["What is 2 + 3?", "Name a prime."]}),
                          params={"max_new_tokens": 5, "temperature": 1.0})
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)


@pytest.mark.slow
def test_bare_promote_keeps_the_champions_decision(models, tmp_path, capsys):
    from components.pipeline import promotion

    cfg, over = store(tmp_path)
    assert promotion.run(cfg, {"model_dir": models[0], "metrics": {"pass@1": 0.2}}).promoted
    client = client_of(cfg)
    before = client.get_model_version(OWN, "1").tags
    assert (before["gate.decision"], before["gate.reason"]) == ("promoted", "no champion yet")
    sets = ["--set", f"tracking.uri={over['tracking']['uri']}", "--set", f"pipeline.promotion.model_name={OWN}"]
    assert m1("promote", "--profile", "tiny", *sets) == 0  # the candidate is the champion
    assert capsys.readouterr().out == f"{OWN} v1: not promoted: version 1 already is the champion\n"
    assert client.get_model_version(OWN, "1").tags == before
    assert alias(client, OWN, "champion") == "1"


@pytest.mark.slow
def test_identical_weights_reuse_their_version(models, tmp_path):
    from components.pipeline import promotion

    cfg, _ = store(tmp_path)
    a, b, _ = models
    client = client_of(cfg)
    first = promotion.run(cfg, {"model_dir": a, "metrics": {"pass@1": 0.20}})
    assert (first.version, first.promoted) == ("1", True)
    source_run = client.get_model_version(OWN, "1").tags["m1.source_run"]

    again = promotion.run(cfg, {"model_dir": a, "metrics": {"pass@1": 0.25}})  # re-evaluated, same weights
    assert (again.version, again.promoted, again.champion_version) == ("1", False, "1")
    assert again.decision == "version 1 already is the champion"
    assert [str(v.version) for v in client.search_model_versions(f"name = '{OWN}'")] == ["1"]
    tags = client.get_model_version(OWN, "1").tags
    assert tags["m1.model_md5"] == dvc_md5(a) and tags["m1.source_run"] == source_run
    assert tags["m1.reused_by_run"] != source_run and tags["metric.pass_1"] == "0.25"
    assert tags["gate.decision"] == "promoted" and tags["gate.reason"] == "no champion yet"

    other = promotion.run(cfg, {"model_dir": b, "metrics": {"pass@1": 0.10}})
    assert (other.version, other.promoted) == ("2", False)
    assert promotion.run(cfg, {"model_dir": b, "metrics": {"pass@1": 0.10}}).version == "2"
    assert alias(client, OWN, "candidate") == "2" and alias(client, OWN, "champion") == "1"
    assert promotion.run(cfg, {"model_dir": a, "metrics": {"pass@1": 0.25}}).version == "1"
    assert alias(client, OWN, "candidate") == "1"
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{OWN}'")) == ["1", "2"]


@pytest.mark.slow
def test_versions_carry_only_the_gate_metrics_and_lineage(models, tmp_path, monkeypatch):
    """Registered from a pipeline's register stage run: the version's tags are the gate's metric, its decision and
    the lineage (flow run id from the parent run, data hash from the curate stage run, git commit), nothing else;
    all 81 metrics stay on the run."""
    from components.pipeline import promotion
    from components.tracking import ensure_experiment, tracking_uri

    cfg, _ = store(tmp_path)
    client = client_of(cfg)
    exp = ensure_experiment(cfg.tracking, tracking_uri(cfg.tracking))
    parent = client.create_run(exp, run_name="tiny-flow", tags={"prefect.flow_run_id": "f-123"}).info.run_id
    client.create_run(exp, run_name="curate", tags={"mlflow.parentRunId": parent, "m1.stage": "curate",
                                                   "m1.output_md5.data_dir": "0123abcd.dir"})
    stage = client.create_run(exp, run_name="register", tags={"mlflow.parentRunId": parent, "m1.stage": "register"})
    monkeypatch.setenv("MLFLOW_RUN_ID", stage.info.run_id)
    monkeypatch.setattr(promotion, "git_commit", lambda: "c0ffee")
    metrics = {"pass@1": 0.2, **{f"hybrid/bench{i}/maj_at_{k}": i / 100 for i in range(20) for k in (1, 4, 8, 16)}}
    assert len(metrics) == 81
    promotion.run(cfg, {"model_dir": models[0], "metrics": metrics})
    tags = client.get_model_version(OWN, "1").tags
    assert {k: v for k, v in tags.items() if not k.startswith("gate.")} == {
        "metric.pass_1": "0.2", "m1.metrics": json.dumps({"pass@1": 0.2}), "m1.model_md5": dvc_md5(models[0]),
        "m1.model_dir": str(Path(models[0]).resolve()), "m1.profile": "tiny", "m1.source_run": stage.info.run_id,
        "prefect.flow_run_id": "f-123", "m1.data_md5": "0123abcd.dir", "m1.git_commit": "c0ffee"}
    assert sorted(k for k in tags if k.startswith("gate.")) == [
        "gate.compared_to", "gate.decision", "gate.pass_1.candidate", "gate.reason", "gate.time"]
    assert (tags["gate.decision"], tags["gate.pass_1.candidate"]) == ("promoted", "0.2")
    run_metrics = client.get_run(stage.info.run_id).data.metrics
    assert len(run_metrics) == 81 and run_metrics["hybrid/bench19/maj_at_16"] == 0.19  # the rest stay on the run

    # outside a pipeline (m1 promote): the data hash of <run_dir>/data, and the real git commit
    monkeypatch.undo()
    data = Path(cfg.run_dir) / "data"
    data.mkdir(parents=True)
    (data / "rows.jsonl").write_text("{}\n")
    promotion.run(cfg, {"model_dir": models[1], "metrics": {"pass@1": 0.5}})
    tags = client.get_model_version(OWN, "2").tags
    assert "prefect.flow_run_id" not in tags and tags["m1.data_md5"] == dvc_md5(data)
    assert tags["m1.git_commit"].removesuffix("-dirty") == promotion.git_commit().removesuffix("-dirty")
    assert len(tags["m1.git_commit"].removesuffix("-dirty")) == 40


@pytest.mark.slow
def test_a_model_solving_nothing_is_not_the_first_champion(models, tmp_path):
    from components.pipeline import promotion

    cfg, _ = store(tmp_path, gate=None)  # the default gate: hybrid/all/pass_at_1 above 0
    a, b, _ = models
    zero = promotion.run(cfg, {"model_dir": a, "metrics": {"hybrid/all/pass_at_1": 0.0}})
    assert (zero.version, zero.promoted, zero.champion_version) == ("1", False, None)
    assert zero.decision == "hybrid/all/pass_at_1 0 does not clear the floor 0"
    client = client_of(cfg)
    assert client.get_model_version(OWN, "1").tags["gate.decision"] == "rejected"
    assert alias(client, OWN, "candidate") == "1" and "champion" not in client.get_registered_model(OWN).aliases
    some = promotion.run(cfg, {"model_dir": b, "metrics": {"hybrid/all/pass_at_1": 0.02}})
    assert (some.version, some.promoted, some.champion_version) == ("2", True, "2")
    assert alias(client, OWN, "champion") == "2"
