"""GRPO loss and sampling variants against hand-computed numbers: loss aggregation (DAPO token mean, GRPO sequence
mean, Dr. GRPO constant normaliser), GSPO's sequence-level ratio, DAPO's overlong shaping, the sampler/learner
mismatch statistics and its corrections (truncated IS, masking); each option refused with a one-line error when
bad, and all of them wired through a short run of the loop."""
import json
import math

import pytest
import torch

from components.config import load_config
from components.errors import M1Error
from components.grpo.loss import policy_loss, token_weights
from components.grpo.mismatch import (
    gap_stats,
    over_threshold,
    tis_stats,
    tis_weights,
    token_gaps,
)
from components.grpo.rewards import overlong_penalty


def _two_sequences():
    """Sequence A: 3 tokens, ratios 1.1, 0.9, 1.0, advantage +1; sequence B: 1 token (2 padded), ratio 1.1,
    advantage -2. Nothing clips at 0.2, so pg = -r A per token: A -1.1, -0.9, -1.0 (sum -3.0); B +2.2."""
    logp = torch.log(torch.tensor([[1.1, 0.9, 1.0], [1.1, 5.0, 5.0]]))
    old = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    return logp, old, torch.tensor([1.0, -2.0]), mask


@pytest.mark.parametrize("agg,expected", [
    ("token_mean", (-3.0 + 2.2) / 4),  # DAPO: 4 counted tokens
    ("seq_mean_token_mean", (-3.0 / 3 + 2.2 / 1) / 2),  # GRPO: each sequence's mean, then over 2 sequences
    ("seq_mean_token_sum_norm", (-3.0 / 5 + 2.2 / 5) / 2),  # Dr. GRPO: sums / max_len 5, over 2 sequences
])
def test_loss_aggregation_by_hand(agg, expected):
    logp, old, adv, mask = _two_sequences()
    loss, st = policy_loss(logp, old, adv, mask, loss_agg=agg, max_len=5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert st["pg_loss"] == pytest.approx(expected, abs=1e-6)
    # split into one micro-batch per sequence with the whole mini-batch's counts: the parts add up to the whole
    parts = [policy_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], loss_agg=agg, n_tokens=4,
                         n_seqs=2, max_len=5)[0].item() for i in range(2)]
    assert sum(parts) == pytest.approx(expected, abs=1e-6)


def test_entropy_follows_the_aggregation_and_diagnostics_stay_token_means():
    logp, old, adv, mask = _two_sequences()
    ent = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    loss, st = policy_loss(logp, old, adv, mask, ent, loss_agg="seq_mean_token_mean", entropy_coef=0.1)
    # entropy term: sequence means 2 and 4, their mean 3; diagnostic: token mean (1 + 2 + 3 + 4) / 4
    assert loss.item() == pytest.approx(0.6 - 0.1 * 3.0, abs=1e-6)
    assert st["entropy"] == pytest.approx(2.5)
    assert token_weights(mask, "seq_mean_token_mean").flatten().tolist() == pytest.approx([1 / 6] * 3 + [0.5, 0, 0])


def test_gspo_sequence_ratio_clipped_per_sequence_by_hand():
    # A: token ratios 1.5, 0.7 (token level: 1.5 clips to 1.2); B: one token at 1.3 (clips to 1.2); both A = +1
    logp = torch.log(torch.tensor([[1.5, 0.7], [1.3, 9.0]]))
    old = torch.zeros(2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, 1.0])
    tok, st = policy_loss(logp, old, adv, mask)
    assert tok.item() == pytest.approx(-(1.2 + 0.7 + 1.2) / 3, abs=1e-6)
    assert st["clip_fraction"] == pytest.approx(2 / 3)
    # sequence level: s_A = exp(mean(log 1.5, log 0.7)) = sqrt(1.05), inside the clip; s_B = 1.3 -> 1.2
    s_a = math.sqrt(1.05)
    lp = logp.clone().requires_grad_(True)
    seq, st = policy_loss(lp, old, adv, mask, ratio_level="sequence", loss_agg="seq_mean_token_mean")
    assert seq.item() == pytest.approx(-(s_a + 1.2) / 2, abs=1e-6)
    assert st["clip_fraction"] == pytest.approx(1 / 3)  # B's one token
    # every token of A gets the same gradient, d/dlogp_t of -s_A / 2 = -s_A / (2 * 2); B is clipped: none
    seq.backward()
    assert lp.grad[0].tolist() == pytest.approx([-s_a / 4] * 2, abs=1e-6)
    assert lp.grad[1].tolist() == [0.0, 0.0]
    # with the token mean each sequence's loss counts once per token
    tm, _ = policy_loss(logp, old, adv, mask, ratio_level="sequence")
    assert tm.item() == pytest.approx(-(2 * s_a + 1.2) / 3, abs=1e-6)


def test_overlong_penalty_at_three_lengths():
    # budget 100, window 20, penalty 0.5: free up to 80 tokens, then linear down to -0.5 at 100
    assert overlong_penalty(80, 100, 20, 0.5) == 0.0
    assert overlong_penalty(90, 100, 20, 0.5) == pytest.approx(-0.25)
    assert overlong_penalty(100, 100, 20, 0.5) == pytest.approx(-0.5)
    assert overlong_penalty(50, 100, 20, 0.5) == 0.0
    assert overlong_penalty(100, 100, 0, 0.5) == 0.0  # window 0: off


def test_mismatch_distribution_by_hand():
    # gaps 0.0, 0.1, ..., 1.0: the sampler says 0, the learner -gap; the third sequence is not kept
    sampler = [[0.0] * 5, [0.0] * 6, [0.0]]
    learner = [torch.tensor([-0.0, -0.1, -0.2, -0.3, -0.4, 7.0]),  # a padded row: the 7 is past the tokens
               torch.tensor([-0.5, -0.6, -0.7, -0.8, -0.9, -1.0]), torch.tensor([-50.0])]
    gaps = token_gaps(sampler, learner, [True, True, False])
    assert [len(g) for g in gaps] == [5, 6, 0]
    s = gap_stats(gaps, threshold=0.8)
    assert s["rollout_logprob_gap"] == pytest.approx(0.5)
    assert s["rollout_logprob_gap_p50"] == pytest.approx(0.5)
    assert s["rollout_logprob_gap_p90"] == pytest.approx(0.9)
    assert s["rollout_logprob_gap_p99"] == pytest.approx(0.99)
    assert s["rollout_logprob_gap_max"] == pytest.approx(1.0)
    # sequence maxima 0.4, 1.0 and means 0.2, 0.75 against 0.8: one of two over by its max, none by its mean
    assert s["rollout_gap_seqs_max_over"] == 0.5 and s["rollout_gap_seqs_mean_over"] == 0.0
    assert gap_stats([torch.zeros(0)], 1.0)["rollout_logprob_gap_max"] == 0.0


def test_tis_weights_are_capped():
    learner_old = [torch.tensor([-1.0, -0.5, 3.0]), torch.tensor([-2.0])]  # first row padded
    sampler = [[-2.0, -0.4], [-2.0]]
    w = tis_weights(learner_old, sampler, cap=2.0)
    # exp(1) = 2.72 -> capped at 2; exp(-0.1); exp(0) = 1
    assert w[0].tolist() == pytest.approx([2.0, math.exp(-0.1)]) and w[1].tolist() == pytest.approx([1.0])
    st = tis_stats(w, [True, False], cap=2.0)
    assert st["tis_weight_mean"] == pytest.approx((2.0 + math.exp(-0.1)) / 2) and st["tis_capped_fraction"] == 0.5
    # in the loss: ratio 1, A = +1, pg = -1 per token times its weight; token mean over the 2 tokens
    loss, _ = policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool),
                          is_weight=w[0][None])
    assert loss.item() == pytest.approx(-(2.0 + math.exp(-0.1)) / 2, abs=1e-6)


def test_mask_drops_exactly_the_sequences_over_threshold():
    sampler = [[-1.0, -1.0], [-1.0], [-1.0], [-1.0]]
    learner = [torch.tensor([-1.1, -1.6]), torch.tensor([-1.5]), torch.tensor([-3.0]), torch.tensor([-1.0])]
    gaps = token_gaps(sampler, learner, [True, True, False, True])
    # maxima 0.6 (> 0.5: dropped), 0.5 (not strictly over: kept), not kept (left as it is), 0
    assert over_threshold(gaps, 0.5) == [True, False, False, False]


@pytest.mark.parametrize("key,value,message", [
    ("loss_agg", "seq_mean", "grpo.loss_agg: Input should be"),
    ("ratio_level", "sentence", "grpo.ratio_level: Input should be"),
    ("mismatch_correction", "is", "grpo.mismatch_correction: Input should be"),
    ("tis_cap", 0.5, "grpo.tis_cap: Input should be greater than or equal to 1"),
    ("mask_threshold", 0, "grpo.mask_threshold: Input should be greater than 0"),
    ("overlong_penalty", -1, "grpo.overlong_penalty: Input should be greater than or equal to 0"),
    ("overlong_window", 5000, "overlong_window 5000 must be below max_new_tokens"),
])
def test_bad_variant_settings_are_refused_in_one_line(key, value, message):
    with pytest.raises(M1Error, match=message) as e:
        load_config(overrides={"grpo": {key: value}})
    assert str(e.value).startswith("invalid config: ") and "\n" not in str(e.value)


def test_defaults_are_the_reference_behaviour():
    g = load_config().grpo
    assert (g.loss_agg, g.ratio_level, g.overlong_window, g.mismatch_correction) == ("token_mean", "token", 0, "none")


def test_loop_runs_with_every_variant_and_logs_it(rl_setup, monkeypatch):
    """The sampler's log-probabilities of every other completion are made 2 nats too low, a mismatch the fp32
    sampler and learner do not have (< 1e-3): mask must drop exactly those completions, TIS must cap them."""
    from test_grpo_loop import _cfg

    from components.grpo.rollout import RolloutWorker
    from components.grpo.stage import run
    from components.model import HybridForCausalLM

    generate = RolloutWorker.generate

    def skewed(self, *a, **k):
        out = generate(self, *a, **k)
        out["logprobs"] = [[x - 2.0 for x in lp] if i % 2 == 0 else lp for i, lp in enumerate(out["logprobs"])]
        return out

    monkeypatch.setattr(RolloutWorker, "generate", skewed)
    root = rl_setup
    inputs = {"model_dir": root / "policy", "data_dir": root / "data"}
    runs = {"tis": {"loss_agg": "seq_mean_token_sum_norm", "ratio_level": "sequence", "mismatch_correction": "tis",
                    "overlong_window": 3, "overlong_penalty": 0.5},
            "mask": {"loss_agg": "seq_mean_token_mean", "mismatch_correction": "mask", "mask_threshold": 1.0}}
    before = HybridForCausalLM.from_pretrained(root / "policy").state_dict()
    for name, opts in runs.items():
        out = run(_cfg(root, f"variant_{name}", max_steps=2, heldout_prompts=0, **opts), inputs)
        after = HybridForCausalLM.from_pretrained(out.model_dir).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
        lines = (root / f"variant_{name}" / "grpo" / "metrics.jsonl").read_text().splitlines()
        steps = [s for s in map(json.loads, lines) if "pg_loss" in s]
        assert len(steps) == 2
        for s in steps:
            assert 0 <= s["rollout_logprob_gap_p50"] <= s["rollout_logprob_gap_p90"] <= s["rollout_logprob_gap_p99"] \
                <= s["rollout_logprob_gap_max"] == pytest.approx(2.0, abs=1e-3)
            # 2 prompts x 2 completions, the 1st and 3rd skewed: half the sequences over 1 nat, and their tokens
            # (weight exp(2) > cap 2) capped
            assert s["rollout_gap_seqs_max_over"] == 0.5 and s["rollout_gap_seqs_mean_over"] == 0.5
            assert 0 < s["tis_capped_fraction"] < 1 and 1 < s["tis_weight_mean"] < 2
            if name == "tis":
                # 6-token budget, 3-token window, penalty 0.5: each completion's shaping is in [-0.5, 0]
                assert -0.5 <= s["overlong_penalty_mean"] <= 0 and s["mismatch_masked_fraction"] == 0
            else:
                assert s["mismatch_masked_fraction"] == 0.5 and s["overlong_penalty_mean"] == 0
