"""Pipeline config and plan, without running a stage: bad profiles, keys and types fail up front naming the key;
the registry only lists importable stages; cache keys react to what they should and nothing else; the
dry run of every profile (m1-3b included) validates and prints the resources each stage asks for."""
from pathlib import Path

import pytest
import yaml

from components.cli import main
from components.config import ROOT, load_config
from components.errors import M1Error
from components.pipeline.keys import cache_key, extract_metrics
from components.pipeline.stages import get_stage, plan, registered_stages, stage_names

PROFILES = ["default", "tiny", "gpu", "gpu2", "gpu2-arms", "gpu2-grpo", "m1-3b", "m1-3b-scale"]  # gpu2 extends gpu,
# *-arms, *-grpo and *-scale their base


def m1(*argv) -> int:

    return main(list(argv))


def test_registry_lists_only_existing_stages():
    names = stage_names()
    assert names[:2] == ["curate", "convert"]
    for s in registered_stages():
        assert callable(s.function()), s.name
        for rel in s.code_paths():
            assert (ROOT / rel).exists(), (s.name, rel)
    # register waits for an evaluate stage: it is absent until one is registered
    assert ("register" in names) == ("evaluate" in names)


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_validate_with_every_stage_key(profile):
    from components.pipeline.keys import config_material

    cfg = load_config(profile)
    for s in registered_stages():
        config_material(cfg, s)  # every key a stage is cached on exists in every profile


def test_plan_pulls_in_upstream_stages():
    assert [s.name for s in plan(["convert"])] == ["convert"]
    assert [s.name for s in plan(None)] == stage_names()
    with pytest.raises(M1Error, match="unknown stage 'nope'"):
        plan(["nope"])


def test_cache_key_depends_on_own_sections_only(tmp_path):
    base = {"run_dir": str(tmp_path)}
    conv, cur = get_stage("convert"), get_stage("curate")
    a = load_config("tiny", overrides=base)
    b = load_config("tiny", overrides={**base, "convert": {"attn_layers": [0, 3]}})
    c = load_config("tiny", overrides={**base, "data": {"num_proc": 2}, "pipeline": {"retries": {"retries": 5}}})
    assert cache_key(a, conv, {}) != cache_key(b, conv, {})
    assert cache_key(a, cur, {}) == cache_key(b, cur, {})
    assert cache_key(a, conv, {}) == cache_key(c, conv, {})  # data and pipeline settings do not touch convert
    assert cache_key(a, cur, {}) != cache_key(c, cur, {})
    d = load_config("tiny", overrides={"run_dir": str(tmp_path / "other")})
    assert cache_key(a, conv, {}) != cache_key(d, conv, {})


def test_cache_key_follows_upstream_content(tmp_path, monkeypatch):
    from components.pipeline.stages import Stage

    down = Stage("down", "components.model.convert:run", config_keys=("seed",), upstream=("curate",))
    cfg = load_config("tiny", overrides={"run_dir": str(tmp_path)})
    assert cache_key(cfg, down, {"curate": "a"}) != cache_key(cfg, down, {"curate": "b"})
    with pytest.raises(M1Error, match="upstream results missing"):
        cache_key(cfg, down, {})


def test_dvc_style_hashes_are_cached_by_stat(tmp_path):
    from components.hashing import StatCache, dvc_md5

    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("hello")
    (d / "sub" / "b.bin").write_bytes(b"\x00\x01")
    cache = StatCache(tmp_path / "c.json")
    h1 = dvc_md5(d, cache)
    assert h1.endswith(".dir") and dvc_md5(d / "a.txt", cache) == "5d41402abc4b2a76b9719d911017c592"
    assert (tmp_path / "c.json").is_file()
    (d / "a.txt").write_text("hellO")
    assert dvc_md5(d, cache) != h1


def test_metrics_are_flattened_from_outputs():
    from components.model.convert import ConvertOutputs

    assert extract_metrics(ConvertOutputs("x", 12, [1], "mamba1")) == {"num_parameters": 12.0}


@pytest.mark.parametrize("override, key", [
    ({"convert": {"mixr": "mamba1"}}, "convert.mixr: unknown key"),
    ({"convert": {"d_state": "sixteen"}}, "convert.d_state"),
    ({"pipeline": {"retries": {"retries": -1}}}, "pipeline.retries.retries"),
    ({"pipeline": {"stages": ["convert", "distil"]}}, "pipeline.stages"),
    ({"pipeline": {"result_storage": "gs://bucket/x"}}, "pipeline.result_storage"),
    ({"pipeline": {"promotion": {"gate": [{"metric": "pass@1", "min_improvment": 0.1}]}}},
     "pipeline.promotion.gate.0.min_improvment"),
])
def test_bad_params_fail_before_any_stage_naming_the_key(tmp_path, capsys, override, key):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, value in override.items():
        params.setdefault(section, {}).update(value)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    assert m1("pipeline", "--params", str(p)) == 2
    err = capsys.readouterr().err
    assert err.startswith("m1: error: invalid config") and key in err, err


def test_unknown_profile_and_bad_attention_layers_fail_up_front(capsys):
    assert m1("pipeline", "--profile", "nope") == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
    assert m1("pipeline", "--profile", "tiny", "--set", "convert.attn_layers=[1,9]") == 2
    assert "convert.attn_layers" in capsys.readouterr().err


@pytest.mark.parametrize("profile", ["tiny", "m1-3b"])
def test_dry_run_prints_stages_keys_and_resources(profile, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert m1("pipeline", "--profile", profile, "--dry-run") == 0
    out = capsys.readouterr().out
    for name in stage_names(load_config(profile)):  # the profile's arms and optional stages
        assert f"  {name} " in out
    assert "key m1-curate-" in out and "asks for" in out
    if profile == "m1-3b":  # Ray stages count their workers and actors, driver-side stages the driver's GPU
        asks = [line.split("asks for ", 1)[1] for line in out.splitlines() if "asks for " in line]
        train = "1 CPU, 8 GPU: driver 1 CPU + Ray 8 workers x (0 CPU, 1 GPU); uses Ray"
        assert asks == ["32 CPU, 128 GB", "8 CPU, 64 GB", train, train, train,
                        ("33 CPU, 8 GPU: driver 1 CPU + Ray 4 learners x (0 CPU, 1 GPU) + 4 rollout actors x "
                         "(8 CPU, 1 GPU); uses Ray"), "1 CPU, 1 GPU", "1 CPU"]
        assert "largest request (stages run one after another): 1 node(s), 33 CPU, 8 GPU, 128 GB per node" in out
        assert "driver at most 32 CPU, 1 GPU, 128 GB; Ray workers and actors of one stage at most 32 CPU, 8 GPU" in out
        assert "s3://m1-pipeline" in out


def test_profiles_dir_holds_the_documented_profiles():
    names = sorted(p.stem for p in (ROOT / "configs" / "profiles").glob("*.yaml"))
    assert {"tiny", "gpu", "m1-3b"} <= set(names)
    tiny = yaml.safe_load(Path(ROOT / "configs/profiles/tiny.yaml").read_text())
    assert tiny["teacher"]["source"] == "random:tiny" and tiny["convert"]["attn_layers"] == [1, 3]


def test_stage_runs_with_its_mlflow_run_and_ray_address_in_the_environment(tmp_path, monkeypatch):
    import importlib
    import os

    from components.model.convert import ConvertOutputs
    from components.pipeline.runner import execute_stage

    seen = {}

    def fake(config, inputs=None):
        seen.update({k: os.environ.get(k) for k in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")})
        d = tmp_path / "model"
        d.mkdir()
        (d / "config.json").write_text("{}")
        return ConvertOutputs(str(d), 7, [1, 3], "mamba1")

    monkeypatch.setattr(importlib.import_module("components.model.convert"), "run", fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = load_config("tiny", overrides={"run_dir": str(tmp_path), "pipeline": {"ray_address": "ray://10.0.0.5:10001"}})
    res = execute_stage(cfg, "convert", {}, "k", "run123", "sqlite:////x/mlflow.db")
    assert seen == {"MLFLOW_RUN_ID": "run123", "MLFLOW_TRACKING_URI": "sqlite:////x/mlflow.db",
                    "RAY_ADDRESS": "ray://10.0.0.5:10001"}
    assert "RAY_ADDRESS" not in os.environ and "MLFLOW_RUN_ID" not in os.environ
    assert res.metrics == {"num_parameters": 7.0} and res.output_hashes["model_dir"].endswith(".dir")


def test_dvc_yaml_is_generated_from_the_registry():
    from components.pipeline.dvc_stages import dvc_stages

    st = dvc_stages(load_config("default"))["stages"]
    assert st["convert"]["cmd"] == "m1 stage convert" and st["convert"]["outs"] == ["runs/default/convert/model"]
    assert "components/model" in st["convert"]["deps"] and st["convert"]["params"] == ["convert", "teacher", "seed"]
    assert st["curate"]["outs"] == ["runs/default/data"]
    tiny = dvc_stages(load_config("tiny"))["stages"]
    assert tiny["curate"]["cmd"] == "m1 stage curate --profile tiny"
    assert "configs/profiles/tiny.yaml" in tiny["curate"]["deps"]
    assert tiny["grpo"]["plots"] == [{"runs/tiny/grpo/metrics.jsonl": {"cache": False}}]
    assert "transformer_sft1" in tiny and "align" not in tiny and "align" in dvc_stages(load_config("gpu"))["stages"]


def test_committed_dvc_yaml_is_current():
    """dvc.yaml is what `m1 pipeline --dvc-yaml` writes from today's registry, code imports and params.yaml: a
    stage whose code or settings moved without it would let `dvc repro` skip (or miss) work."""
    from components.pipeline.dvc_stages import dvc_yaml_text

    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml_text(load_config("default")), \
        "dvc.yaml is stale: regenerate it with `m1 pipeline --dvc-yaml > dvc.yaml`"


@pytest.fixture
def profiles(tmp_path, monkeypatch):
    """A profiles folder of our own: `base` and `child` (extends base), each YAML text as given."""
    import components.config as config_module

    monkeypatch.setattr(config_module, "PROFILES_DIR", tmp_path)

    def write(base: str, child: str):
        (tmp_path / "base.yaml").write_text(base)
        (tmp_path / "child.yaml").write_text("extends: base\n" + child)
        return tmp_path / "base.yaml", tmp_path / "child.yaml"
    return write


@pytest.mark.parametrize("child, message", [
    # values pydantic used to coerce silently: true -> 1, "10" -> 10, 10.0 -> 10, "yes" -> True
    ("distill: {max_steps: true}\n", "distill.max_steps: Input should be a valid integer, got True"),
    ("distill: {max_steps: '10'}\n", "distill.max_steps: Input should be a valid integer, got '10'"),
    ("distill: {max_steps: 10.0}\n", "distill.max_steps: Input should be a valid integer, got 10.0"),
    ("convert: {conv_bias: 'yes'}\n", "convert.conv_bias: Input should be a valid boolean, got 'yes'"),
    # reported before, but not which of the stacked files to fix
    ("distill: {max_steps: ten}\n",
     "distill.max_steps: Input should be a valid integer, unable to parse string as an integer"),
    ("sft1: [1, 2]\n", "sft1: Input should be a valid dictionary or instance of TrainConfig"),
    ("convert: {attn_layers: {first: 1}}\n", "convert.attn_layers: Input should be a valid list"),
    ("data:\n  sources: [{kind: synthetic, name: s, splits: [sft1], n: '5'}]\n",
     "data.sources.0.synthetic.n: Input should be a valid integer, got '5'"),
])
def test_wrong_type_in_a_profile_names_the_key_and_the_file(profiles, capsys, child, message):
    _, child_file = profiles("distill: {max_steps: 4}\n", child)
    with pytest.raises(M1Error) as e:
        load_config("child")
    assert str(e.value) == f"invalid config: {message} (in {child_file})"
    assert m1("pipeline", "--profile", "child", "--dry-run") == 2
    assert capsys.readouterr().err == f"m1: error: invalid config: {message} (in {child_file})\n"


def test_profile_extends_keeps_working_and_errors_name_the_base_file(profiles):
    profiles("distill: {max_steps: 4, lr: 0.5}\nsft1: {max_steps: 3}\n", "distill: {max_steps: 6}\n")
    cfg = load_config("child")
    assert (cfg.distill.max_steps, cfg.distill.lr, cfg.sft1.max_steps) == (6, 0.5, 3)
    # overrides (--set, the Python API) keep pydantic's coercion: `--set distill.lr=1e-4` is the string '1e-4'
    assert load_config("child", overrides={"distill": {"lr": "1e-4"}}).distill.lr == 1e-4
    base_file, _ = profiles("sft1: {max_steps: true}\n", "distill: {max_steps: 6}\n")
    with pytest.raises(M1Error) as e:
        load_config("child")
    assert str(e.value) == f"invalid config: sft1.max_steps: Input should be a valid integer, got True (in {base_file})"


def test_empty_split_a_later_stage_reads_is_refused(tmp_path):
    from types import SimpleNamespace

    from components.pipeline.runner import check_splits

    cfg = load_config("tiny", overrides={"run_dir": str(tmp_path)})
    out = SimpleNamespace(rows={"sft1": 9, "sft1_heldout": 2, "sft2": 0, "rl": 5}, report_md=tmp_path / "report.md")
    check_splits(cfg, out, ["distill", "sft1"])  # no later stage reads sft2
    with pytest.raises(M1Error) as e:
        check_splits(cfg, out, ["convert", "distill", "sft1", "sft2", "grpo"])
    assert str(e.value) == ("curated split sft2 is empty, but sft2 reads it; sources feeding it: synth_sft2 "
                            f"(see {tmp_path / 'report.md'})")
