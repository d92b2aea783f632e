"""The evaluate stage end to end on a tiny random teacher and its converted hybrid (fixture eval sets): same seed,
same numbers; metrics recomputable from samples.jsonl; every output written; a model that does not load is one
line; `m1 eval` logs to MLflow."""
import json
import os
from pathlib import Path

import pytest

from components.config import load_config
from components.errors import M1Error
from components.evaluate.metrics import ProblemScore
from components.evaluate.report import model_metrics

FIX = Path(__file__).parent / "fixtures" / "eval"

EVAL = {"benchmarks": [{"kind": "curated", "name": "*"}], "max_problems": None, "n_samples": 3, "ks": [1, 2, 3],
        "max_new_tokens": 6, "batch_size": 8, "temperature": 1.0,
        "time_budget": {"points": 5},
        "speed": {"batch_sizes": [1, 2], "decode_lens": [4], "prompt_len": 8, "engines": ["hybrid", "attention"]}}


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory, tiny_teacher):
    from components.data.tokenizer_cache import cached_tokenizer
    from components.model import convert

    d = tmp_path_factory.mktemp("tiny") / "hybrid"
    convert(tiny_teacher, [1, 3], seed=0).save_pretrained(d, tokenizer=cached_tokenizer("smollm2"))
    return str(d)


def _config(tmp_path, **ev):
    return load_config(overrides={"run_dir": str(tmp_path / "run"), "teacher": {"source": "random:tiny"},
                                  "evaluate": {**EVAL, **ev}})


def _deterministic(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "/timing/" not in k and not k.startswith("speed/")}


def test_same_seed_same_metrics_and_outputs(tmp_path, hybrid_dir, monkeypatch):
    from components.evaluate.run import run

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    models = {"hybrid": hybrid_dir, "teacher": "random:tiny"}
    cfg = _config(tmp_path)
    a = run(cfg, {"models": models, "data_dir": str(FIX / "data")})
    cfg2 = _config(tmp_path, speed={"enabled": False}, time_budget={"enabled": False})
    b = run(cfg2, {"models": models, "data_dir": str(FIX / "data"), "out_dir": str(tmp_path / "again")})
    assert _deterministic(a.metrics) == _deterministic(b.metrics)
    texts = [[json.loads(x)["completion"] for x in (d / "completions_sample.jsonl").read_text().splitlines()]
             for d in (a.eval_dir, tmp_path / "again")]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1
    c = run(_config(tmp_path, seed=1, speed={"enabled": False}, time_budget={"enabled": False}),
            {"models": {"teacher": "random:tiny"}, "data_dir": str(FIX / "data"), "out_dir": str(tmp_path / "seed1")})
    other = [json.loads(x)["completion"] for x in (tmp_path / "seed1" / "completions_sample.jsonl").read_text().splitlines()]
    assert other != [t for t, x in zip(texts[0], (a.eval_dir / "completions_sample.jsonl").read_text().splitlines())
                     if json.loads(x)["model"] == "teacher"]
    assert c.metrics["teacher/all/problems"] == 6
    assert a.metrics["hybrid/all/problems"] == 6 and a.metrics["teacher/mini/samples"] == 12
    assert a.metrics["data/mini/excluded"] == 1 and a.excluded == {"mini": 1, "mini2": 0}
    for key in ("pass_at_1", "pass_at_1_se", "pass_at_3", "maj_at_1", "maj_at_3"):
        assert f"teacher/all/{key}" in a.metrics and f"hybrid/source/arith/{key}" in a.metrics

    out = a.eval_dir
    assert out == tmp_path / "run" / "eval"
    for name in ("metrics.json", "results.csv", "results.md", "by_source.csv", "by_source.md", "samples.jsonl",
                 "completions_sample.jsonl", "excluded.jsonl", "models.json", "time_budget.csv", "time_budget.png",
                 "speed.csv", "speed.json", "speed.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "metrics.json").read_text()) == a.metrics
    assert json.loads((tmp_path / "run" / "metrics" / "evaluate.json").read_text()) == a.metrics
    assert sorted(p.name for p in a.dvc_plots) == ["speed.csv", "speed.png", "time_budget.csv", "time_budget.png"]
    assert all(p.parent == tmp_path / "run" / "plots" / "eval" and p.is_file() for p in a.dvc_plots)
    assert a.model_dir == hybrid_dir and b.model_dir == hybrid_dir
    assert [json.loads(x)["reason"] for x in (out / "excluded.jsonl").read_text().splitlines()] == ["unparseable_reference"]
    assert "| hybrid | mini | 1 |" in (out / "results.md").read_text()
    assert not (tmp_path / "again" / "time_budget.csv").exists()

    # metrics.json is what the per-sample records give
    by_model: dict = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_model.setdefault(r.pop("model"), []).append(
            ProblemScore(r["benchmark"], r["id"], r["source"], r["reference"], r["answers"], r["correct"],
                         r["n_tokens"], r["finished"], r["labels"], r["group_correct"]))
    recomputed = {}
    for m, ps in by_model.items():
        recomputed.update(model_metrics(m, ps, [1, 2, 3]))
    assert recomputed == {k: v for k, v in a.metrics.items() if k in recomputed}
    assert len(recomputed) == len([k for k in a.metrics if not k.startswith(("data/", "speed/")) and "/timing/" not in k])

    rows = (out / "time_budget.csv").read_text().splitlines()
    assert rows[0].startswith("model,benchmark,strategy,budget_s")
    assert {r.split(",")[0] for r in rows[1:]} == {"hybrid", "teacher"}
    info = json.loads((out / "models.json").read_text())
    assert info["teacher"]["kind"] == "teacher" and info["teacher"]["attn_layers"] == [0, 1, 2, 3]
    assert info["hybrid"]["kind"] == "hybrid" and info["hybrid"]["attn_layers"] == [1, 3]
    # a batch decodes until its longest sample ends: each sample's tokens after its first cost one row-step, and
    # rows that stopped early keep costing until then, so generated - samples <= row-steps <= samples x (max - 1)
    for m, ps in by_model.items():
        generated, n = sum(sum(p.n_tokens) for p in ps), sum(len(p.n_tokens) for p in ps)
        assert a.metrics[f"{m}/timing/generated_tokens"] == generated
        assert generated - n <= a.metrics[f"{m}/timing/decode_row_steps"] <= n * (EVAL["max_new_tokens"] - 1)
        assert a.metrics[f"{m}/timing/decode_s"] > 0 and a.metrics[f"{m}/timing/prefill_s"] > 0


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_a_model_directory_that_does_not_load_is_one_line(tmp_path, hybrid_dir):
    import shutil

    from components.evaluate.models import load_eval_model
    from components.evaluate.run import run

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(Path(hybrid_dir) / "config.json", no_weights)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(hybrid_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    broken_cfg = tmp_path / "broken_cfg"
    broken_cfg.mkdir()
    (broken_cfg / "config.json").write_text('{"model_type": "m1_hybrid", ')
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()

    with pytest.raises(M1Error) as e:
        load_eval_model("h", str(no_weights))
    assert "model h" in _one_line(e) and "model.safetensors" in str(e.value)
    with pytest.raises(M1Error) as e:
        load_eval_model("h", str(corrupt))
    assert "does not load" in _one_line(e)
    with pytest.raises(M1Error) as e:
        load_eval_model("h", str(not_a_model))
    assert "does not load" in _one_line(e)
    for bad in (broken_cfg, tmp_path / "missing"):
        with pytest.raises(M1Error) as e:  # checked before any benchmark or weight is read
            run(_config(tmp_path), {"models": {"h": str(bad)}, "data_dir": str(FIX / "data")})
        assert f"model h ({bad}) does not load" in _one_line(e)


def test_m1_eval_cli_logs_to_mlflow(tmp_path, hybrid_dir, monkeypatch, capsys):
    import yaml
    from mlflow.tracking import MlflowClient

    from components.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "teacher": {"source": "random:tiny"},
        "tracking": {"experiment": "eval-test", "artifact_location": str(tmp_path / "artifacts")},
        "evaluate": {**EVAL, "speed": {"enabled": False}}}))
    rc = main(["eval", "--params", str(params), "--model", f"hyb={hybrid_dir}", "--data-dir", str(FIX / "data"),
               "--n-samples", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| hyb | mini |" in out and "| teacher | all |" in out and "excluded rows" in out
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("eval-test")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.data.metrics["hyb/all/problems"] == 6
    assert "teacher/all/maj_at_2" in r.data.metrics and "hyb/mini/pass_at_1_se" in r.data.metrics
    assert r.data.params["evaluate.n_samples"] == "2"
    arts = {a.path for a in client.list_artifacts(r.info.run_id, "eval")}
    assert {"eval/metrics.json", "eval/results.md", "eval/time_budget.png", "eval/completions_sample.jsonl"} <= arts

    rc = main(["eval", "--params", str(params), "--model", str(tmp_path / "nowhere"), "--no-teacher",
               "--data-dir", str(FIX / "data")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("m1: error: model nowhere") and "\n" not in err
    assert not os.environ.get("MLFLOW_RUN_ID")


def test_models_from_inputs(tmp_path):
    from components.evaluate.run import models_from_inputs

    cfg = _config(tmp_path, models={"base": "random:tiny"})
    assert models_from_inputs(cfg, {"models": {"a": "x"}}) == {"a": "x"}
    assert models_from_inputs(cfg, {"model_dir": "d/sft2/model"}) == {
        "hybrid": "d/sft2/model", "teacher": "random:tiny", "base": "random:tiny"}
    no_teacher = _config(tmp_path, include_teacher=False)
    with pytest.raises(M1Error) as e:  # no hybrid under run_dir and no teacher: nothing to score
        models_from_inputs(no_teacher, {})
    assert "no model to evaluate" in _one_line(e)
    conv = tmp_path / "run" / "convert" / "model"
    conv.mkdir(parents=True)
    (conv / "config.json").write_text("{}")
    assert models_from_inputs(no_teacher, {}) == {"hybrid": str(conv)}
