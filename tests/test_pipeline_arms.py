"""The transformer arm (config.arms): which stages a config runs, that the arms never share a cache entry, a
checkpoint root or a resume fingerprint, that evaluate waits for both arms, and that only the hybrid is registered.
The arms running end to end through the flow is tests/test_pipeline_flow.py."""
from pathlib import Path
from types import SimpleNamespace

import pytest

from components.config import load_config
from components.errors import M1Error
from components.pipeline.keys import cache_key, key_material
from components.pipeline.stages import get_stage, plan, stage_names

ARM = ["transformer_init", "transformer_sft1", "transformer_sft2", "transformer_grpo"]


@pytest.fixture
def configs(tmp_path):
    base = {"run_dir": str(tmp_path / "run")}
    return (load_config("tiny", overrides={**base, "arms": ["hybrid"]}),
            load_config("tiny", overrides={**base, "arms": ["hybrid", "transformer"]}))


def test_arms_choose_the_stages(configs):
    hybrid_only, both = configs
    assert not set(ARM) & set(stage_names(hybrid_only))
    assert stage_names(both) == ["curate", "convert", "distill", "sft1", "sft2", "grpo", *ARM, "evaluate",
                                 "register"]
    assert get_stage("evaluate", hybrid_only).upstream == ("curate", "grpo")
    assert get_stage("evaluate", both).upstream == ("curate", "grpo", "transformer_grpo")
    assert [s.name for s in plan(["transformer_sft1"], both)] == ["curate", "transformer_init", "transformer_sft1"]
    with pytest.raises(M1Error, match=r"^stage 'transformer_sft2' belongs to an arm this run does not have "
                                      r"\(arms: hybrid\)$"):
        plan(["transformer_sft2"], hybrid_only)
    assert load_config("default").arms == ["hybrid"] and load_config("gpu").arms == ["hybrid", "transformer"]
    with pytest.raises(M1Error, match="arms: .*must hold hybrid once"):
        load_config("tiny", overrides={"arms": ["transformer"]})


def test_arms_share_settings_but_never_a_cache_entry(configs):
    _, cfg = configs
    for hybrid, arm in (("sft1", "transformer_sft1"), ("sft2", "transformer_sft2"), ("grpo", "transformer_grpo")):
        h, t = get_stage(hybrid, cfg), get_stage(arm, cfg)
        up = {"curate": "data-hash", h.upstream[1]: "model-hash", t.upstream[1]: "model-hash"}
        # the same section of the config trains both: same settings, learning-rate schedule and seed
        assert key_material(cfg, h, up)["config"] == key_material(cfg, t, up)["config"]
        assert cache_key(cfg, h, {u: up[u] for u in h.upstream}) != cache_key(cfg, t, {u: up[u] for u in t.upstream})
        assert t.kwargs["stage"] == arm and t.dvc_outs == (f"{arm}/model",)


def test_arms_never_resume_each_others_checkpoints(configs, tmp_path):
    from components.train.harness import RunContext

    _, cfg = configs
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "data"
    (data / "sft").mkdir(parents=True)
    (data / "manifest.json").write_text("{}")
    inputs = {"model_dir": model, "data_dir": data}
    a = RunContext.build(cfg, "sft1", cfg.sft1, inputs, "sft")
    b = RunContext.build(cfg, "transformer_sft1", cfg.sft1, inputs, "sft")
    assert a.checkpoint_root != b.checkpoint_root
    assert Path(b.checkpoint_root) == Path(cfg.run_dir).resolve() / "transformer_sft1" / "checkpoints"
    assert a.context.fingerprint != b.context.fingerprint  # same inputs and settings, another run
    g = RunContext.build(cfg, "grpo", cfg.grpo, inputs, "rl")
    tg = RunContext.build(cfg, "transformer_grpo", cfg.grpo, inputs, "rl")
    assert g.context.fingerprint != tg.context.fingerprint and g.checkpoint_root != tg.checkpoint_root


def test_only_the_hybrid_is_registered(configs):
    from components.pipeline.stages import _register_inputs

    _, cfg = configs
    register = get_stage("register", cfg)
    finished = {name: SimpleNamespace(model_dir=f"/runs/{name}/model")
                for name in stage_names(cfg) if name not in ("curate", "evaluate", "register")}
    finished["evaluate"] = SimpleNamespace(metrics={"hybrid/all/pass_at_1": 0.5})  # scored nothing of its own
    assert register.build_inputs(finished, cfg)["model_dir"] == Path("/runs/grpo/model")
    assert _register_inputs(finished, cfg)["metrics"] == {"hybrid/all/pass_at_1": 0.5}


def test_evaluate_scores_both_arms_and_the_teacher(configs):
    hybrid_only, both = configs
    ev = get_stage("evaluate", both)
    finished = {"curate": SimpleNamespace(data_dir="/runs/data"), "grpo": SimpleNamespace(model_dir="/runs/grpo/m"),
                "transformer_grpo": SimpleNamespace(model_dir="/runs/transformer_grpo/m")}
    models = ev.build_inputs(finished, both)["models"]
    assert models["hybrid"] == "/runs/grpo/m" and models["transformer"] == "/runs/transformer_grpo/m"
    assert "teacher" in models
    assert "transformer" not in get_stage("evaluate", hybrid_only).build_inputs(finished, hybrid_only)["models"]
    assert set(stage_names()) >= set(stage_names(both))  # the catalogue holds every arm's stages
