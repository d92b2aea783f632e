"""GRPO loop on a tiny random model: runs, syncs weights to rollout workers, resumes exactly, and refuses an empty
dynamic-sampling batch with a clear message."""
import json
import os

import pytest
import torch

from components.config import load_config
from components.errors import M1Error
from components.grpo.batch import split_prompts
from components.grpo.rollout import RolloutPool
from components.grpo.stage import run
from components.model import HybridForCausalLM


def _cfg(root, name, **g):
    grpo = {"heldout_prompts": 2, "eval_samples": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 6,
            "minibatch_prompts": 1, "micro_batch": 2, "max_steps": 3, "checkpoint_every": 1, "lr": 1e-3, **g}
    return load_config(overrides={"run_dir": str(root / name), "teacher": {"source": "random:tiny"}, "grpo": grpo,
                                  "tracking": {"enabled": False}})


def test_prompts_without_answers_are_rejected_and_counted():
    rows = [{"id": "a", "prompt": "p", "answer": "1"}, {"id": "b", "prompt": "p", "answer": ""},
            {"id": "c", "prompt": "p", "answer": None}]
    train, _, rejected = split_prompts(rows, 0, 0)
    assert rejected == 2 and [r["id"] for r in train] == ["a"]


def test_grpo_runs_and_resumes_onto_the_same_weights(rl_setup):
    root = rl_setup
    inputs = {"model_dir": root / "policy", "data_dir": root / "data"}
    out = run(_cfg(root, "straight"), inputs)
    for k in ("heldout/accuracy", "heldout/accuracy_before", "heldout/accuracy_se", "heldout/gain_se",
              "heldout/pass_at_n", "heldout/mixed_fraction"):
        assert k in out.metrics
    assert (root / "straight" / "grpo" / "heldout_outcomes.png").is_file()
    # the paired gain is the mean of the per-prompt changes written beside the model
    per = [[json.loads(ln) for ln in (root / "straight" / "grpo" / f"heldout_{w}.jsonl").read_text().splitlines()]
           for w in ("before", "after")]
    assert len(per[0]) == 2 and len(per[0][0]["completions"]) == 2
    assert out.metrics["heldout/gain"] == pytest.approx(sum(b["accuracy"] - a["accuracy"] for a, b in zip(*per)) / 2)
    assert out.metrics["heldout/accuracy"] - out.metrics["heldout/accuracy_before"] == \
        pytest.approx(out.metrics["heldout/gain"])
    os.environ["M1_FAIL_AFTER_STEP"] = "1"
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            run(_cfg(root, "killed"), inputs)
    finally:
        del os.environ["M1_FAIL_AFTER_STEP"]
    out2 = run(_cfg(root, "killed"), inputs)
    assert out2.metrics["resumed_from"] == 1
    a = HybridForCausalLM.from_pretrained(root / "straight" / "grpo" / "model").state_dict()
    b = HybridForCausalLM.from_pretrained(root / "killed" / "grpo" / "model").state_dict()
    changed = HybridForCausalLM.from_pretrained(root / "policy").state_dict()
    assert any(not torch.equal(a[k], changed[k]) for k in a)  # the policy moved
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    lines = (root / "straight" / "grpo" / "metrics.jsonl").read_text().splitlines()
    assert any("sync_seconds" in ln and "clip_fraction" in ln and "entropy" in ln for ln in lines)
    # the learner (fp32) reads the sampled tokens' log-probabilities as the rollout workers recorded them
    steps = [json.loads(ln) for ln in lines if "rollout_logprob_gap_max" in ln]
    assert len(steps) == 3 and all(s["rollout_logprob_gap_max"] < 1e-3 for s in steps)
    assert [s["policy_lag"] for s in steps] == [0, 0, 0]  # on-policy: sampled with the learner's own weights
    assert (root / "straight" / "grpo" / "grpo_curves.png").stat().st_size > 10_000


def test_rollout_workers_generate_with_synced_weights(rl_setup):
    root = rl_setup
    pool = RolloutPool(str(root / "policy"), 0, {}, "cpu")
    prompts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    before = pool.generate(prompts, 2, 5, 0.0, 1.0, seed=0)["tokens"]
    new = HybridForCausalLM.from_pretrained(root / "policy")
    with torch.no_grad():
        new.model.norm.weight.mul_(-1.0)  # negated logits: greedy picks what it avoided
    pool.set_weights(new.state_dict(), 7)
    assert pool.versions() == [7]
    w = pool.workers[0].model.state_dict()
    assert all(torch.equal(w[k], v) for k, v in new.state_dict().items())
    with torch.no_grad():  # the worker holds a copy: the learner's next update does not reach it unsynced
        new.model.norm.weight.add_(1.0)
    assert not torch.equal(pool.workers[0].model.model.norm.weight, new.model.norm.weight)
    after = pool.generate(prompts, 2, 5, 0.0, 1.0, seed=0)["tokens"]
    assert after != before


def test_one_step_off_policy_samples_one_update_behind_and_resumes_exactly(rl_setup):
    """Step t+1's batch is generated (in a thread, while step t learns) with the weights before step t's update:
    the measured lag is one update after the first step; a run killed after a checkpoint resumes with the batch
    that was in flight and ends on the straight run's weights."""
    root = rl_setup
    inputs = {"model_dir": root / "policy", "data_dir": root / "data"}
    straight = run(_cfg(root, "offp", one_step_off_policy=True, entropy_coef=0.5), inputs)
    rows = [json.loads(ln) for ln in (root / "offp" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "policy_lag" in r]
    assert [s["policy_lag"] for s in steps] == [0, 1, 1]
    assert [s["rollout_weights_version"] for s in steps] == [0, 0, 1]
    os.environ["M1_FAIL_AFTER_STEP"] = "2"
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            run(_cfg(root, "offp_killed", one_step_off_policy=True, entropy_coef=0.5), inputs)
    finally:
        del os.environ["M1_FAIL_AFTER_STEP"]
    resumed = run(_cfg(root, "offp_killed", one_step_off_policy=True, entropy_coef=0.5), inputs)
    assert resumed.metrics["resumed_from"] == 2
    a = HybridForCausalLM.from_pretrained(straight.model_dir).state_dict()
    b = HybridForCausalLM.from_pretrained(resumed.model_dir).state_dict()
    start = HybridForCausalLM.from_pretrained(root / "policy").state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    last = [json.loads(ln) for ln in (root / "offp_killed" / "grpo" / "metrics.jsonl").read_text().splitlines()
            if "policy_lag" in ln][-1]
    assert last["policy_lag"] == 1 and last["reward_mean"] == steps[-1]["reward_mean"]
    assert last["prompt_cursor"] == steps[-1]["prompt_cursor"]


def test_a_failing_step_stops_the_rollout_prefetch_thread(rl_setup, monkeypatch):
    """With one-step off-policy the next batch is generated in a thread while the learner runs; when learning fails,
    that thread ends instead of idling on beside the failed stage (the traceback keeps the loop's frame alive)."""
    import threading
    import time

    from components.grpo import loop

    def failing_loss(*a, **k):
        raise RuntimeError("learner failed")

    monkeypatch.setattr(loop, "policy_loss", failing_loss)
    root = rl_setup
    inputs = {"model_dir": root / "policy", "data_dir": root / "data"}
    with pytest.raises(RuntimeError, match="learner failed") as failed:
        run(_cfg(root, "offp_fail", one_step_off_policy=True), inputs)
    deadline = time.time() + 60
    while time.time() < deadline and any(t.name.startswith("m1-rollout") for t in threading.enumerate()):
        time.sleep(0.1)
    assert failed.value is not None  # the traceback, and with it the loop's executor, is still referenced here
    assert not [t.name for t in threading.enumerate() if t.name.startswith("m1-rollout")]


def test_empty_dynamic_sampling_batch_stops_with_a_message(rl_setup):
    root = rl_setup
    cfg = _cfg(root, "dyn", dynamic_sampling=True, max_refill_rounds=0, max_steps=1)
    with pytest.raises(M1Error, match="dynamic sampling left an empty batch"):
        run(cfg, {"model_dir": root / "policy", "data_dir": root / "data"})


@pytest.mark.slow
def test_ray_rollout_actors_receive_weights(rl_setup):
    import ray

    from components.ray_utils import ensure_ray

    root = rl_setup
    ensure_ray(num_cpus=2)
    try:
        pool = RolloutPool(str(root / "policy"), 2, {"CPU": 1}, "cpu")
        new = HybridForCausalLM.from_pretrained(root / "policy")
        with torch.no_grad():
            new.model.norm.weight.mul_(-1.0)
        secs = pool.set_weights(new.state_dict(), 3)
        assert pool.versions() == [3, 3] and secs >= 0
        local = RolloutPool(str(root / "policy"), 0, {}, "cpu")
        local.set_weights(new.state_dict(), 3)
        prompts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
        assert pool.generate(prompts, 2, 5, 0.0, 1.0, 0)["tokens"] == local.generate(prompts, 2, 5, 0.0, 1.0, 0)["tokens"]
    finally:
        ray.shutdown()


def test_steps_without_reward_signal_can_be_skipped(rl_setup):
    """The random tiny policy is never rewarded: every group is zero-variance, so with skip_no_signal the policy
    must come out unchanged (without it, the entropy bonus alone moves it: the resume test above)."""
    root = rl_setup
    out = run(_cfg(root, "skip", skip_no_signal=True, max_steps=2), {"model_dir": root / "policy", "data_dir": root / "data"})
    before = HybridForCausalLM.from_pretrained(root / "policy").state_dict()
    after = HybridForCausalLM.from_pretrained(out.model_dir).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lines = [json.loads(ln) for ln in (root / "skip" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["skipped_update"] for ln in lines if "skipped_update" in ln] == [1.0, 1.0]


@pytest.mark.slow
def test_ray_learner_and_rollout_actor_equal_the_in_process_run(rl_setup, monkeypatch):
    """The product's GPU layout on CPU: the learner as a Ray Train worker, sampling in a separate Ray actor that
    receives the weights each step. Same seeds, same numbers as the in-process run."""
    monkeypatch.setenv("RAY_ADDRESS", "local")
    root = rl_setup
    inputs = {"model_dir": root / "policy", "data_dir": root / "data"}
    local = run(_cfg(root, "in_process", max_steps=2), inputs)
    ray_out = run(_cfg(root, "on_ray", max_steps=2, learner_workers=1, rollout_workers=1), inputs)
    for k in ("heldout/accuracy_before", "heldout/accuracy", "heldout/gain"):
        assert ray_out.metrics[k] == pytest.approx(local.metrics[k])
    a = HybridForCausalLM.from_pretrained(root / "in_process" / "grpo" / "model").state_dict()
    b = HybridForCausalLM.from_pretrained(root / "on_ray" / "grpo" / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    steps = [json.loads(ln) for ln in (root / "on_ray" / "grpo" / "metrics.jsonl").read_text().splitlines()
             if "sync_share" in ln]
    assert len(steps) == 2 and all(0 < s["sync_share"] < 1 and s["step_seconds"] > 0 for s in steps)


def test_ray_train_hears_of_grpo_checkpoints_only(rl_setup, count_ray_reports):
    """As in the trainer (tests/test_train_loop.py): a report per step would wait for Ray Train's 2 s poll."""
    from components.grpo import loop as grpo_loop

    calls = count_ray_reports(grpo_loop)
    root = rl_setup
    run(_cfg(root, "reports", checkpoint_every=2, max_steps=3), {"model_dir": root / "policy", "data_dir": root / "data"})
    assert calls == [(2, True), (3, True)]


def test_grpo_with_checkpoint_every_0_writes_none(rl_setup, count_ray_reports):
    from components.grpo import loop as grpo_loop

    calls = count_ray_reports(grpo_loop)
    root = rl_setup
    out = run(_cfg(root, "no_ckpt", checkpoint_every=0, max_steps=2),
              {"model_dir": root / "policy", "data_dir": root / "data"})
    assert calls == []
    ckpts = root / "no_ckpt" / "grpo" / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir())
    assert (root / "no_ckpt" / "grpo" / "model" / "config.json").is_file() and "heldout/accuracy" in out.metrics


@pytest.mark.parametrize("off_policy", [False, True])
def test_solved_prompts_are_not_drawn_again_and_a_resume_draws_the_same(rl_setup, monkeypatch, off_policy):
    """skip_solved: a prompt whose every completion was correct leaves the draw for the rest of the run. A scorer
    that always rewards five answers (and half the others' completions, by a checksum of their text) stands in for
    a policy that has solved them; a run killed after a checkpoint resumes with the same solved set, cursor and
    weights as the straight run, with one-step off-policy too (the batch in flight is saved with its solved set)."""
    import zlib

    from components.grpo import batch as batch_module
    from components.grpo.rewards import RewardResult

    easy = {"1", "5", "9", "13", "17"}
    seen: list[tuple[str, str]] = []  # (run, answer) per scored completion, in order

    def fake_score(name, text, answer, format_weight, timeout_s):
        seen.append((os.environ.get("M1_TEST_RUN", ""), answer))
        ok = answer in easy or zlib.crc32(text.encode()) % 2 == 0
        return RewardResult(float(ok), ok, "correct" if ok else "wrong")

    monkeypatch.setattr(batch_module, "score", fake_score)
    root = rl_setup
    inputs = {"model_dir": root / "policy", "data_dir": root / "data"}
    settings = {"skip_solved": True, "max_steps": 5, "entropy_coef": 0.5, "one_step_off_policy": off_policy}
    monkeypatch.setenv("M1_TEST_RUN", "straight")
    name = f"solved-{off_policy}"
    straight = run(_cfg(root, name, **settings), inputs)
    steps = [json.loads(ln) for ln in (root / name / "grpo" / "metrics.jsonl").read_text().splitlines()
             if "solved_prompts" in ln]
    G = 2
    answers = [a for r, a in seen if r == "straight"][::G]  # one per drawn prompt, in draw order
    solved_at, drawn_after = set(), []
    for a in answers:
        drawn_after.append(a in solved_at)
        if a in easy:
            solved_at.add(a)
    assert solved_at and not any(drawn_after)  # an easy prompt, once drawn (and solved), is never drawn again
    assert steps[-1]["solved_prompts"] >= len(solved_at)  # others can be solved by the checksum too
    assert [s["solved_prompts"] for s in steps] == sorted(s["solved_prompts"] for s in steps)
    assert steps[-1]["prompt_cursor"] > 10  # past the first epoch of the 10 training prompts

    monkeypatch.setenv("M1_TEST_RUN", "killed")
    monkeypatch.setenv("M1_FAIL_AFTER_STEP", "3")
    with pytest.raises(RuntimeError, match="injected failure"):
        run(_cfg(root, f"{name}-killed", **settings), inputs)
    monkeypatch.delenv("M1_FAIL_AFTER_STEP")
    resumed = run(_cfg(root, f"{name}-killed", **settings), inputs)
    assert resumed.metrics["resumed_from"] == 3
    again = [json.loads(ln) for ln in (root / f"{name}-killed" / "grpo" / "metrics.jsonl").read_text().splitlines()
             if "solved_prompts" in ln][-2:]
    keys = ("prompt_cursor", "solved_prompts", "solved_passed_over", "reward_mean")
    assert [[s[k] for k in keys] for s in again] == [[s[k] for k in keys] for s in steps[-2:]]
    a = HybridForCausalLM.from_pretrained(straight.model_dir).state_dict()
    b = HybridForCausalLM.from_pretrained(resumed.model_dir).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_gradient_checkpointing_gives_the_same_weights(rl_setup, monkeypatch):
    import components.model.hybrid as hybrid

    calls = []

    def counted(fn, *args, **kw):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kw)

    monkeypatch.setattr(hybrid, "checkpoint", counted)
    root = rl_setup
    inputs = {"model_dir": root / "policy", "data_dir": root / "data"}
    run(_cfg(root, "plain", max_steps=2, gradient_checkpointing=False), inputs)  # params.yaml turns it on
    assert calls == []
    run(_cfg(root, "recomputed", max_steps=2, gradient_checkpointing=True), inputs)
    assert calls  # the learner's layers ran under checkpoint
    a = HybridForCausalLM.from_pretrained(root / "plain" / "grpo" / "model").state_dict()
    b = HybridForCausalLM.from_pretrained(root / "recomputed" / "grpo" / "model").state_dict()
    changed = HybridForCausalLM.from_pretrained(root / "policy").state_dict()
    assert any(not torch.equal(a[k], changed[k]) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_learners_micro_batch_leaves_the_weights_unchanged(rl_setup):
    """micro_batch is a memory knob: one forward/backward of a minibatch's 4 sequences (padded to the longest) takes
    the same optimiser steps as four of one sequence each, so a GPU profile may raise it for speed."""
    root = rl_setup
    inputs = {"model_dir": root / "policy", "data_dir": root / "data"}
    run(_cfg(root, "mb1", max_steps=2, prompts_per_step=2, minibatch_prompts=2, micro_batch=1), inputs)
    run(_cfg(root, "mb4", max_steps=2, prompts_per_step=2, minibatch_prompts=2, micro_batch=4), inputs)
    a = HybridForCausalLM.from_pretrained(root / "mb1" / "grpo" / "model").state_dict()
    b = HybridForCausalLM.from_pretrained(root / "mb4" / "grpo" / "model").state_dict()
    changed = HybridForCausalLM.from_pretrained(root / "policy").state_dict()
    assert any(not torch.equal(a[k], changed[k]) for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
