"""GRPO pieces against hand-computed examples: advantages, every loss option, reward edge cases."""
import json
import math

import pytest
import torch

from components.errors import M1Error
from components.grpo import rewards as R
from components.grpo.advantages import group_advantages, informative_groups
from components.grpo.loss import policy_loss


def test_group_normalised_and_drgrpo_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    a = group_advantages(r, "grpo", eps=0.0 + 1e-6)
    # group 0: mean 0.5, population std 0.5 -> +-1; group 1: all equal -> 0
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(a[1], torch.zeros(4))
    assert torch.allclose(group_advantages(r, "drgrpo")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert informative_groups(r).tolist() == [True, False]


def test_clipped_surrogate_with_clip_higher_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    # positive advantage: ratios 1.5 -> clipped at 1 + 0.28, 0.5 -> min(0.5, 0.8) = 0.5, 1.1 unclipped
    loss, st = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert abs(loss.item() - (-(1.28 + 0.5 + 1.1) / 3)) < 1e-6
    assert abs(st["clip_fraction"] - 1 / 3) < 1e-6
    # negative advantage: -min(r*A, clip(r)*A) = max(r, clip(r)) -> 1.5, 0.8, 1.1
    loss, st = policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert abs(loss.item() - (1.5 + 0.8 + 1.1) / 3) < 1e-6
    k3 = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    assert abs(st["approx_kl_old"] - k3) < 1e-6


def test_dual_clip_caps_negative_advantage_tokens_by_hand():
    logp = torch.log(torch.tensor([[10.0, 2.0, 0.5]]))  # ratios 10, 2, 0.5 against old log-prob 0
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    # A = -2: plain clipped loss per token max(r, clip(r)) * 2 = 20, 4, 1.6; dual clip c = 3 caps at 3 * 2 = 6
    loss, _ = policy_loss(logp, old, torch.tensor([-2.0]), mask, dual_clip=3.0)
    assert abs(loss.item() - (6 + 4 + 1.6) / 3) < 1e-5
    plain, _ = policy_loss(logp, old, torch.tensor([-2.0]), mask)
    assert abs(plain.item() - (20 + 4 + 1.6) / 3) < 1e-5
    # the capped token gives no gradient; positive advantages are untouched by the dual clip
    lp = logp.clone().requires_grad_(True)
    policy_loss(lp, old, torch.tensor([-2.0]), mask, dual_clip=3.0)[0].backward()
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[0, 1].item() != 0.0
    pos, _ = policy_loss(logp, old, torch.tensor([1.0]), mask, dual_clip=3.0)
    assert abs(pos.item() - (-(1.2 + 1.2 + 0.5) / 3)) < 1e-5


def test_rollout_logprob_gap_over_kept_tokens():
    from components.grpo.mismatch import rollout_logprob_gap

    rollout = [[-1.0, -2.0], [-0.5], [-3.0]]
    learner = [torch.tensor([-1.5, -2.0, 0.0]), torch.tensor([-0.25, 9.0]), torch.tensor([-100.0])]  # padded rows
    mean, mx = rollout_logprob_gap(rollout, learner, [True, True, False])  # the third is not kept
    assert abs(mean - (0.5 + 0.0 + 0.25) / 3) < 1e-6 and abs(mx - 0.5) < 1e-6
    assert rollout_logprob_gap([], [], []) == (0.0, 0.0)


def test_entropy_bonus_kl_term_and_token_mean_with_mask():
    logp = torch.zeros(2, 2)
    old = torch.zeros(2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    ent = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    ref = torch.full((2, 2), math.log(2.0))
    adv = torch.tensor([1.0, 2.0])
    loss, st = policy_loss(logp, old, adv, mask, ent, ref, entropy_coef=0.01, kl_coef=0.5)
    pg = -(1 + 1 + 2) / 3  # ratio 1 everywhere; masked token ignored
    entropy = (1 + 2 + 3) / 3
    k3 = 2 - math.log(2) - 1  # exp(d) - d - 1 with d = log 2
    assert abs(loss.item() - (pg - 0.01 * entropy + 0.5 * k3)) < 1e-6
    assert abs(st["entropy"] - entropy) < 1e-6 and abs(st["kl_ref"] - k3) < 1e-6
    # no KL term when kl_coef is 0 (the default)
    _, st0 = policy_loss(logp, old, adv, mask, ent, ref, entropy_coef=0.01, kl_coef=0.0)
    assert "kl_ref" not in st0


@pytest.mark.parametrize("completion,answer,reward,reason", [
    ("<think>half</think> The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0, "correct"),
    ("<think>x</think> so \\boxed{0.5}", "\\frac{1}{2}", 1.0, "correct"),
    ("<think>x</think> \\boxed{67^{\\circ}}", "67", 1.0, "correct"),  # a unit mark is no expression
    ("<think>x</think> \\boxed{1,000}", "1000", 1.0, "correct"),
    ("<think>x</think> \\boxed{x = 5}", "5", 1.0, "correct"),
    # equal in value but still an expression for a numeric reference: the question restated is no answer
    ("<think>x</think> \\boxed{34+44}", "78", 0.0, "unevaluated"),
    ("<think>x</think> \\boxed{156/2}", "78", 0.0, "unevaluated"),  # a division left undone
    ("<think>x</think> \\boxed{3/4}", "0.75", 1.0, "correct"),  # a fraction is a value for a fractional reference
    ("<think>x</think> \\boxed{\\frac{\\sqrt{4}}{4}}", "1/2", 0.0, "unevaluated"),
    ("<think>x</think> \\boxed{x^2-1}", "(x-1)(x+1)", 1.0, "correct"),  # symbolic references are not judged
    ("<think>x</think> \\boxed{3} then \\boxed{7}", "7", 1.0, "correct"),  # the last box counts
    ("<think>x</think> the answer is 7", "7", 0.0, "no_box"),
    ("\\boxed{7} <think>never closed", "7", 0.0, "no_think"),
    ("<think>\\boxed{7}</think> \\boxed{8}", "7", 0.0, "wrong"),  # a box inside the thinking does not count
    ("<think>x</think> so <think>\\boxed{7}", "7", 0.0, "no_box"),  # nor one inside a thinking reopened after it
])
def test_boxed_after_think_reward(completion, answer, reward, reason):
    r = R.score("boxed_after_think", completion, answer)
    assert (r.reward, r.reason) == (reward, reason)


def test_format_weight_and_raising_reward_scores_zero(monkeypatch):
    assert R.score("boxed_after_think", "<think>a</think>\\boxed{2}", "3", format_weight=0.1).reward == pytest.approx(0.1)
    assert R.score("boxed_after_think", "<think>a</think>\\boxed{1+2}", "3", format_weight=0.1).reward == pytest.approx(0.1)

    def broken(*a, **k):
        raise ValueError("boom")

    monkeypatch.setitem(R.REWARDS, "broken", broken)
    r = R.score("broken", "x", "1")
    assert (r.reward, r.reason) == (0.0, "error")


def test_paired_gain_by_hand(tmp_path):
    from components.errors import M1Error
    from components.grpo.loop import paired_gain

    def write(name, accs, problems=("a", "b", "c")):
        p = tmp_path / name
        p.write_text("".join(json.dumps({"problem": q, "accuracy": x}) + "\n" for q, x in zip(problems, accs)))
        return p

    before, after = write("b.jsonl", [0.0, 0.5, 1.0]), write("a.jsonl", [0.5, 0.5, 1.0])
    # differences 1/2, 0, 0: mean 1/6, sample variance ((1/3)^2 + 2 (1/6)^2) / 2 = 1/12, SE sqrt(1/12 / 3) = 1/6
    g = paired_gain(before, after)
    assert g["heldout/gain"] == pytest.approx(1 / 6) and g["heldout/gain_se"] == pytest.approx(1 / 6)
    with pytest.raises(M1Error, match="different held-out prompts"):
        paired_gain(before, write("c.jsonl", [0.5, 0.5, 1.0], ("a", "b", "x")))


def test_outcome_counts_and_stats_by_hand(tmp_path):
    from components.errors import M1Error
    from components.grpo.outcomes import correct_counts, outcome_stats, plot_outcomes

    reasons = [["correct"] * 2 + ["wrong"] * 2, ["wrong", "unevaluated", "no_box", "wrong"], ["correct"] * 4]
    for name in ("before", "after"):
        (tmp_path / f"heldout_{name}.jsonl").write_text("".join(json.dumps({"reasons": r}) + "\n" for r in reasons))
    counts, n = correct_counts(tmp_path / "heldout_before.jsonl")
    assert counts.tolist() == [2, 0, 4] and n == 4
    # pass@1 = 6 / 12; pass@4: 2 of 3 prompts; mixed (some right, some wrong): 1 of 3
    assert outcome_stats(counts, n) == {"pass_at_1": 0.5, "pass_at_n": 2 / 3, "mixed_fraction": 1 / 3, "samples": 4.0}
    assert plot_outcomes(tmp_path, tmp_path / "o.png").stat().st_size > 0
    (tmp_path / "bad.jsonl").write_text(json.dumps({"reasons": ["correct"]}) + "\n" + json.dumps({"reasons": []}) + "\n")
    with pytest.raises(M1Error, match="different sample counts"):
        correct_counts(tmp_path / "bad.jsonl")


def test_per_prompt_record_and_accuracy_by_kind(tmp_path):
    from components.errors import M1Error
    from components.grpo.outcomes import accuracy_by_kind, per_prompt, problem_kind

    problems = ["Modulo division: $7 % 3 =$", "Addition: $2+2=$", "Modulo division: $9 % 4 =$",
                "Find $x$: if $x^2 = 4$, what is $x$?"]
    before = [["correct", "wrong"], ["wrong", "wrong"], ["wrong", "wrong"], ["correct", "correct"]]
    after = [["correct", "correct"], ["wrong", "no_box"], ["correct", "wrong"], ["correct", "wrong"]]
    for name, reasons in (("before", before), ("after", after)):
        (tmp_path / f"heldout_{name}.jsonl").write_text("".join(
            json.dumps({"problem": p, "answer": "1", "reasons": r}) + "\n" for p, r in zip(problems, reasons)))
    rows = per_prompt(tmp_path)
    assert [(r["kind"], r["before_correct"], r["after_correct"]) for r in rows] == [
        ("Modulo division", 1, 2), ("Addition", 0, 0), ("Modulo division", 0, 1), ("other", 2, 1)]
    assert problem_kind("A sentence that runs on and on and on past forty characters: then $x$") == "other"
    # Modulo division: before 1 of 4 samples, after 3 of 4; the first type is the one with most prompts
    assert accuracy_by_kind(rows) == {"Modulo division": {"prompts": 2, "before": 0.25, "after": 0.75},
                                      "Addition": {"prompts": 1, "before": 0.0, "after": 0.0},
                                      "other": {"prompts": 1, "before": 1.0, "after": 0.5}}
    (tmp_path / "heldout_after.jsonl").write_text(json.dumps({"problem": "x", "answer": "1", "reasons": ["wrong"] * 2}) + "\n")
    with pytest.raises(M1Error, match="different held-out prompts"):
        per_prompt(tmp_path)


def test_curves_read_the_last_copy_of_a_resumed_step(tmp_path):
    from components.grpo.curves import plot_curves, read_metrics

    p = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "heldout/accuracy": 0.1, "heldout/accuracy_se": 0.01},
             {"step": 1, "reward_mean": 0.5, "approx_kl": 0.01}, {"step": 2, "reward_mean": 0.2},
             {"step": 2, "reward_mean": 0.7},  # step 2 again after a resume
             {"step": 2, "heldout/accuracy": 0.3}]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows, evals = read_metrics(p)
    assert [(r["step"], r["reward_mean"]) for r in rows] == [(1, 0.5), (2, 0.7)]
    assert [e["heldout/accuracy"] for e in evals] == [0.1, 0.3]
    assert plot_curves(p, tmp_path / "c.png").stat().st_size > 10_000


def test_refill_draws_for_the_missing_groups_at_the_observed_rate():
    from components.grpo.batch import refill_count

    assert refill_count(28, 4, 32, 256) == 224  # 4 of 32 informative: 28 more need 8x as many prompts
    assert refill_count(5, 30, 32, 256) == 6  # ceil(5 * 32 / 30)
    assert refill_count(3, 32, 32, 256) == 3  # never fewer than the groups still missing
    assert refill_count(28, 1, 32, 256) == 256  # capped
    assert refill_count(10, 0, 32, 256) == 256  # nothing informative yet: the cap


def test_unknown_reward_is_refused_at_load():
    from components.config import load_config

    with pytest.raises(Exception, match="unknown reward 'boxed_after_thinks'"):
        load_config(overrides={"grpo": {"reward": "boxed_after_thinks"}})


def test_draw_passes_over_solved_prompts_by_hand():
    from components.grpo.batch import draw, prompt_order

    P = prompt_order(0, 5, 10, seed=3)  # epochs 0 and 1 of the seeded order
    assert draw(0, 5, 3, 3, frozenset()) == (P[:3], 3, 0)
    # the first prompt of the order solved: passed over, and the cursor counts it
    assert draw(0, 5, 3, 3, frozenset({P[0]})) == (P[1:4], 4, 1)
    # across the epoch boundary: order 4 0 1 2 3 | 3 2 1 0 4 for this seed; from position 3 with 1 solved,
    # five picks pass over the second epoch's 1 (position 7) and end at position 9
    assert P == [4, 0, 1, 2, 3, 3, 2, 1, 0, 4]
    assert draw(3, 5, 5, 3, frozenset({1})) == ([2, 3, 3, 2, 0], 9, 1)
    with pytest.raises(M1Error, match="all 5 training prompts are solved"):
        draw(0, 5, 1, 3, frozenset(range(5)))


def test_unlikeliness_scale_by_hand():
    from components.grpo.advantages import unlikeliness_scale

    # mean log-probs -0.1, -0.5, -0.3, -0.9: least likely first is 3 (rank 0), 1, 2, 0 (rank 3); G = 4, beta 0.4
    lp = torch.tensor([[-0.1, -0.5, -0.3, -0.9], [-0.2, -0.2, -0.2, -0.2]])
    s = unlikeliness_scale(lp, 0.4)
    assert torch.allclose(s[0], torch.tensor([1 - 0.4 * 3 / 4, 1 - 0.4 * 1 / 4, 1 - 0.4 * 2 / 4, 1.0]))  # .7 .9 .8 1
    assert torch.allclose(s[1], torch.tensor([1.0, 0.9, 0.8, 0.7]))  # ties: ranked in group order
    assert torch.equal(unlikeliness_scale(lp, 0.0), torch.ones(2, 4))


class _ScriptedPool:
    """Returns fixed completions and sampler log-probs, as a rollout pool's generate() does."""

    def __init__(self, texts, logprobs):
        self.texts, self.logprobs = texts, logprobs

    def generate(self, prompts, G, max_new_tokens, temperature, top_p, seed):
        n = len(prompts) * G
        return {"prompt_ids": [[1, 2]] * n, "tokens": [[5] * len(lp) for lp in self.logprobs[:n]],
                "logprobs": self.logprobs[:n], "texts": self.texts[:n], "finish": ["stop"] * n,
                "seconds": 1.0, "versions": [0] * n}


def test_unlikeliness_reward_reaches_the_batch_by_hand():
    from components.grpo.batch import collect
    from components.grpo.config import GRPOConfig

    right, wrong = "<think>x</think> \\boxed{7}", "<think>x</think> \\boxed{8}"
    # group 0: correct, correct, wrong, correct with mean log-probs -0.1, -0.5, -0.3, -0.9 (ranks 3, 1, 2, 0);
    # group 1: all correct, so without the penalty it carries no signal and dynamic sampling would drop it
    pool = _ScriptedPool([right, right, wrong, right] + [right] * 4,
                         [[-0.1], [-0.4, -0.6], [-0.3], [-0.9, -0.9, -0.9], [-0.4], [-0.1], [-0.3], [-0.2]])
    rows = [{"prompt": f"p{i}", "answer": "7", "problem": f"q{i}"} for i in range(2)]
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, minibatch_prompts=2, unlikeliness_penalty=0.4,
                     dynamic_sampling=True)
    batch, _, stats, _ = collect(pool, rows, 0, cfg, seed=0)
    # group 1's mean log-probs -0.4, -0.1, -0.3, -0.2 rank 0, 3, 1, 2: factors 1.0, 0.7, 0.9, 0.8
    assert batch["rewards"] == pytest.approx([0.7, 0.9, 0.0, 1.0, 1.0, 0.7, 0.9, 0.8])
    assert stats["reward_mean"] == 7 / 8 and stats["zero_variance_groups"] == 0.0  # reported unscaled


def test_passk_advantages_by_hand():
    from components.grpo.advantages import passk_advantages

    c = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    a = passk_advantages(c, 2)
    # one right of 4, k 2: mean 1 - C(3,2)/C(4,2) = 1/2, sigma 1/2; right (1/2)/(1/2) = 1,
    # wrong (1 - 1/2 - C(2,1)/C(3,1)) / (1/2) = -1/3
    assert torch.allclose(a[0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    # two right: mean 1 - 1/6 = 5/6, sigma sqrt(5)/6; right (1/6)/sigma = 1/sqrt(5), wrong (1/6 - 1/3)/sigma
    assert torch.allclose(a[1], torch.tensor([1, 1, -1, -1]) / math.sqrt(5))
    assert torch.equal(a[2:], torch.zeros(3, 4))  # every pair holds a right answer; all right; all wrong
    # k = 1 is GRPO's advantage on 0/1 rewards
    assert torch.allclose(passk_advantages(c, 1), group_advantages(c.float(), "grpo", eps=0.0 + 1e-9), atol=1e-6)


def test_passk_refuses_settings_it_would_ignore():
    from components.grpo.config import GRPOConfig

    with pytest.raises(ValueError, match="passk_k 9 exceeds group_size 8"):
        GRPOConfig(advantage="passk", passk_k=9)
    with pytest.raises(ValueError, match="format_weight, unlikeliness_penalty would be ignored"):
        GRPOConfig(advantage="passk", format_weight=0.1, unlikeliness_penalty=0.25)


def test_passk_batch_drops_groups_solved_in_most_draws():
    from components.grpo.batch import collect
    from components.grpo.config import GRPOConfig

    right, wrong = "<think>x</think> \\boxed{7}", "<think>x</think> \\boxed{8}"
    # each round: a group with one right answer (signal) and one with three (every pair holds a right one: none)
    pool = _ScriptedPool([right, wrong, wrong, wrong, right, right, right, wrong], [[-0.5]] * 8)
    rows = [{"prompt": f"p{i}", "answer": "7", "problem": f"q{i}"} for i in range(2)]
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, minibatch_prompts=2, advantage="passk", passk_k=2,
                     dynamic_sampling=True, max_refill_rounds=1)
    batch, _, stats, _ = collect(pool, rows, 0, cfg, seed=0)
    assert batch["adv"] == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3] * 2)
    assert stats["rollout_rounds"] == 2.0 and stats["zero_variance_groups"] == 0.5
