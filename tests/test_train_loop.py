"""Trainer: held-out KL falls under distillation, loss curves are invariant to micro-batching and to Ray
workers, and a run killed mid-way resumes from its checkpoint onto the uninterrupted curve."""
import json
import os

import pytest

from components.config import load_config
from components.train.stage import run


def _cfg(root, name, **train):
    t = {"max_steps": 6, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "lr": 1e-3,
         "checkpoint_every": 2, "eval_rows": 4, **train}
    return load_config(overrides={"run_dir": str(root / name), "teacher": {"source": "random:tiny"}, "distill": t,
                                  "tracking": {"enabled": False}})


def _losses(root, name):
    lines = (root / name / "distill" / "history.jsonl").read_text().splitlines()
    return {h["step"]: h["loss"] for h in map(json.loads, lines)}


def test_distillation_lowers_heldout_kl(train_setup):
    root, data = train_setup
    out = run(_cfg(root, "straight"), {"model_dir": root / "conv", "data_dir": data}, "distill")
    m = out.metrics
    assert m["heldout/kl"] < m["heldout/kl_before"]
    assert abs(m["heldout/ppl"] - m["heldout/teacher_ppl"]) < abs(m["heldout/ppl_before"] - m["heldout/teacher_ppl"])
    assert (root / "straight" / "distill" / "model" / "config.json").is_file()


def test_micro_batching_does_not_change_the_loss_curve(train_setup):
    root, data = train_setup
    run(_cfg(root, "mb1", micro_batch_size=1), {"model_dir": root / "conv", "data_dir": data}, "distill")
    a, b = _losses(root, "straight"), _losses(root, "mb1")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


def test_killed_run_resumes_on_the_uninterrupted_curve(train_setup):
    root, data = train_setup
    cfg = _cfg(root, "killed")
    os.environ["M1_FAIL_AFTER_STEP"] = "3"
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            run(cfg, {"model_dir": root / "conv", "data_dir": data}, "distill")
    finally:
        del os.environ["M1_FAIL_AFTER_STEP"]
    assert not (root / "killed" / "distill" / "model").exists()  # no final model from a failed run
    out = run(cfg, {"model_dir": root / "conv", "data_dir": data}, "distill")
    assert out.metrics["resumed_from"] == 2  # last checkpoint before the failure
    straight, resumed = _losses(root, "straight"), _losses(root, "killed")
    for step in range(3, 7):
        assert abs(straight[step] - resumed[step]) < 1e-6, step


def test_changed_settings_do_not_resume_foreign_checkpoints(train_setup):
    root, data = train_setup
    out = run(_cfg(root, "killed", lr=5e-4), {"model_dir": root / "conv", "data_dir": data}, "distill")
    assert out.metrics["resumed_from"] == 0


@pytest.mark.slow
def test_ray_two_cpu_workers_match_in_process(train_setup):
    import ray

    root, data = train_setup
    try:
        out = run(_cfg(root, "ray", num_workers=2), {"model_dir": root / "conv", "data_dir": data}, "distill")
    finally:
        ray.shutdown()
    a, b = _losses(root, "straight"), _losses(root, "ray")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    assert out.metrics["heldout/kl"] < out.metrics["heldout/kl_before"]


@pytest.mark.slow
def test_ray_fsdp2_two_cpu_workers_match_in_process(train_setup):
    """FSDP2 shards every layer over 2 gloo workers; the gathered checkpoints and final model are full."""
    import ray
    import torch

    from components.model import HybridForCausalLM

    root, data = train_setup
    try:
        out = run(_cfg(root, "fsdp2", num_workers=2, strategy="fsdp2"), {"model_dir": root / "conv", "data_dir": data},
                  "distill")
    finally:
        ray.shutdown()
    a, b = _losses(root, "straight"), _losses(root, "fsdp2")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    straight = HybridForCausalLM.from_pretrained(root / "straight" / "distill" / "model").state_dict()
    sharded = HybridForCausalLM.from_pretrained(out.model_dir).state_dict()
    assert straight.keys() == sharded.keys()
    assert max(float((straight[k] - sharded[k]).abs().max()) for k in straight) < 1e-4
