"""GRPO learns: a policy that starts its answer with a newline about 30% of the time (the tiny random model with
its final norm scaled up 12x, so its first token is peaked on "\n") is rewarded only for that newline; a few
steps must make it the usual outcome on the held-out prompts. Checks the loop's sign conventions end to end:
advantages, loss, optimizer step and the weights the rollout workers sample from."""
import json

import pytest
import torch
from test_grpo_loop import _cfg

from components.grpo import rewards as R
from components.grpo.stage import run
from components.model import HybridForCausalLM


def starts_with_newline(completion: str, answer: str, format_weight: float = 0.0, timeout_s: float = 5.0):
    ok = completion.startswith("\n")
    return R.RewardResult(float(ok), ok, "correct" if ok else "wrong")


@pytest.fixture
def peaked(rl_setup, smollm2_tokenizer, monkeypatch):
    monkeypatch.setitem(R.REWARDS, "starts_with_newline", starts_with_newline)
    if not (rl_setup / "peaked" / "config.json").is_file():
        policy = HybridForCausalLM.from_pretrained(rl_setup / "policy")
        with torch.no_grad():
            policy.model.norm.weight.mul_(12.0)
        policy.save_pretrained(rl_setup / "peaked", tokenizer=smollm2_tokenizer)
    return rl_setup


def test_grpo_raises_a_learnable_reward(peaked):
    root = peaked
    cfg = _cfg(root, "learn", reward="starts_with_newline", heldout_prompts=4, eval_samples=16, prompts_per_step=4,
               group_size=8, max_new_tokens=1, minibatch_prompts=4, micro_batch=32, max_steps=10,
               checkpoint_every=10, lr=1e-3, entropy_coef=0.0, eval_temperature=0.9)
    out = run(cfg, {"model_dir": root / "peaked", "data_dir": root / "data"}).metrics
    before, after = out["heldout/accuracy_before"], out["heldout/accuracy"]
    assert 0.1 < before < 0.5, before
    assert after > 0.8, (before, after)
    assert out["heldout/gain"] == pytest.approx(after - before)


def test_dynamic_sampling_refills_with_informative_groups_only(peaked):
    """Groups of 2 at p ~ 0.3 tie half the time: refill rounds must top the batch up to 4 informative groups."""
    root = peaked
    cfg = _cfg(root, "dyn_refill", reward="starts_with_newline", heldout_prompts=0, prompts_per_step=4, group_size=2,
               max_new_tokens=1, minibatch_prompts=4, max_steps=3, checkpoint_every=3, lr=1e-4,
               dynamic_sampling=True, max_refill_rounds=4)
    run(cfg, {"model_dir": root / "peaked", "data_dir": root / "data"})
    steps = [json.loads(ln) for ln in (root / "dyn_refill" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "batch_prompts" in s]
    assert [s["batch_prompts"] for s in steps] == [4.0, 4.0, 4.0]
    assert any(s["rollout_rounds"] > 1 for s in steps) and all(s["zero_variance_groups"] > 0 for s in steps)
