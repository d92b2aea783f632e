"""Trainer: held-out KL falls under distillation, loss curves are invariant to micro-batching and to Ray
workers, and a run killed mid-way resumes from its checkpoint onto the uninterrupted curve; checkpoints of other
code or settings are never resumed nor crowd out the run's own, and trainer state that would run code is refused."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from components.config import load_config
from components.errors import M1Error
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


def _fail_after_step_3(cfg, root, data) -> None:
    """A distill run killed by fault injection right after step 3 (its checkpoint at step 2 is kept)."""
    os.environ["M1_FAIL_AFTER_STEP"] = "3"
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            run(cfg, {"model_dir": root / "conv", "data_dir": data}, "distill")
    finally:
        del os.environ["M1_FAIL_AFTER_STEP"]


def test_killed_run_resumes_on_the_uninterrupted_curve(train_setup):
    root, data = train_setup
    cfg = _cfg(root, "killed")
    _fail_after_step_3(cfg, root, data)
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


def test_code_change_retrains_instead_of_resuming_the_finished_run(train_setup, monkeypatch):
    """A finished run's checkpoint at max_steps, after a code change: training starts over."""
    from components import hashing

    root, data = train_setup
    shutil.copytree(root / "straight" / "distill" / "checkpoints", root / "recoded" / "distill" / "checkpoints")
    code_version = hashing.code_version
    monkeypatch.setattr(hashing, "code_version", lambda paths, r: "edited" + code_version(paths, r))
    out = run(_cfg(root, "recoded"), {"model_dir": root / "conv", "data_dir": data}, "distill")
    assert out.metrics["resumed_from"] == 0
    straight, recoded = _losses(root, "straight"), _losses(root, "recoded")
    assert straight.keys() == recoded.keys() and all(abs(straight[k] - recoded[k]) < 1e-6 for k in straight)


def test_foreign_checkpoints_neither_hide_nor_prune_the_runs_own(train_setup):
    """Higher-numbered checkpoints of an earlier configuration in the same root: the killed run keeps its own
    checkpoint (keep_checkpoints=2) and resumes from it onto the uninterrupted curve."""
    root, data = train_setup
    ckpts = root / "mixed" / "distill" / "checkpoints"
    shutil.copytree(root / "straight" / "distill" / "checkpoints", ckpts)
    for meta in ckpts.glob("checkpoint_*/trainer_state.json"):
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "fingerprint": "earlier-settings"}))
    cfg = _cfg(root, "mixed")
    _fail_after_step_3(cfg, root, data)
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint_000002", "checkpoint_000004", "checkpoint_000006"]
    out = run(cfg, {"model_dir": root / "conv", "data_dir": data}, "distill")
    assert out.metrics["resumed_from"] == 2
    straight, resumed = _losses(root, "straight"), _losses(root, "mixed")
    for step in range(3, 7):
        assert abs(straight[step] - resumed[step]) < 1e-6, step


def _write_marker(path):
    Path(path).write_text("code ran")


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _write_marker, (self.marker,)


def test_resume_refuses_trainer_state_that_would_run_code(train_setup, tmp_path):
    root, data = train_setup
    ckpt = root / "evil" / "distill" / "checkpoints" / "checkpoint_000004"
    shutil.copytree(root / "straight" / "distill" / "checkpoints" / "checkpoint_000004", ckpt)
    marker = tmp_path / "marker"
    torch.save({"optimizer": _RunsCodeWhenUnpickled(str(marker)), "scheduler": {}, "rng": {}},
               ckpt / "trainer_state.pt")
    with pytest.raises(M1Error) as e:
        run(_cfg(root, "evil"), {"model_dir": root / "conv", "data_dir": data}, "distill")
    assert str(ckpt / "trainer_state.pt") in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


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
    # rank 0 staged each checkpoint in the root and renamed it there; Ray Train registered it in place (no second
    # copy) and kept the newest 2, and no staging folder is left
    ckpts = root / "ray" / "distill" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["checkpoint_000004", "checkpoint_000006"]


@pytest.mark.slow
def test_ray_fsdp2_two_cpu_workers_match_in_process(train_setup):
    """FSDP2 shards every layer over 2 gloo workers; the gathered checkpoints and final model are full."""
    import ray

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


def test_ray_train_hears_of_checkpoints_only(train_setup, count_ray_reports):
    """Every ray.train.report waits until Ray Train's controller has taken the previous one (it polls every 2 s),
    so a report per step held Ray-run training to one step per 2 s: the loops report at checkpoints only. Run as a
    Ray worker would (ctx.ray) with the reports counted: 6 steps, a checkpoint every 2, 3 reports."""
    from components.train import loop as train_loop

    calls = count_ray_reports(train_loop)
    root, data = train_setup
    run(_cfg(root, "reports"), {"model_dir": root / "conv", "data_dir": data}, "distill")
    assert calls == [(2, True), (4, True), (6, True)]


def test_checkpoint_every_0_writes_no_checkpoint_and_trains_the_same(train_setup, count_ray_reports):
    """A measurement run (m1-3b-scale) keeps no checkpoints: a 3B one is 39 GB, and two stages' filled a node's
    disk. The steps and the published model are those of a run that checkpoints; Ray Train hears of nothing."""
    from components.train import loop as train_loop

    calls = count_ray_reports(train_loop)
    root, data = train_setup
    out = run(_cfg(root, "no_ckpt", checkpoint_every=0), {"model_dir": root / "conv", "data_dir": data}, "distill")
    assert calls == []
    ckpts = root / "no_ckpt" / "distill" / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir())
    straight, plain = _losses(root, "straight"), _losses(root, "no_ckpt")
    assert straight.keys() == plain.keys() and all(abs(straight[k] - plain[k]) < 1e-6 for k in straight)
    assert (Path(out.model_dir) / "config.json").is_file()
