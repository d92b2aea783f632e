"""A hand-built set of completions scored to hand-computed pass@1 / pass@k / maj@k, and the time-budget curves
computed from it by hand."""
import math

import pytest

from components.evaluate.benchmarks import Problem
from components.evaluate.report import model_metrics
from components.evaluate.sampling import Completion
from components.evaluate.scoring import score_problem
from components.evaluate.timebudget import budget_grid, curves


def C(text, n=10, reason="eos"):
    return Completion(text, n, reason)


@pytest.fixture(scope="module")
def scores():
    probs = [
        # c = 2: 0.5 and \frac{1}{2} are the reference 1/2; one sample has no boxed answer
        (Problem("set", "p1", "arith", "half of one?", "1/2"),
         [C("so \\boxed{0.5}"), C("it is $\\boxed{\\frac{1}{2}}$"), C("I do not know", 20, "length"), C("\\boxed{3}")]),
        # c = 2 (42.0 == 42), but 41 comes first and ties 2-2 with 42: every maj@k is wrong
        (Problem("set", "p2", "arith", "six times seven?", "42"),
         [C("\\boxed{41}"), C("\\boxed{42}"), C("\\boxed{41}"), C("\\boxed{42.0}", 30)]),
        # c = 0: 14/2 is 7 in value but restates the question; it neither counts nor votes, so 8 wins maj@k
        (Problem("other", "p3", "algebra", "x if 2x = 14?", "7"),
         [C("\\boxed{8}"), C("\\boxed{14/2}"), C("\\boxed{9}"), C("no idea", 20, "length")]),
    ]
    return [score_problem(p, cs, timeout_s=10) for p, cs in probs]


def test_per_sample_scores(scores):
    p1, p2, p3 = scores
    assert p1.answers == ["0.5", "\\frac{1}{2}", None, "3"]
    assert p1.correct == [True, True, False, False]
    assert p1.labels == [0, 0, None, 1]
    assert p2.correct == [False, True, False, True]
    assert p2.labels == [0, 1, 0, 1]
    assert p3.correct == [False] * 4
    assert p3.answers[1] == "14/2" and p3.labels == [0, None, 1, None]
    assert p3.finished == [True, True, True, False]


def test_hand_computed_metrics(scores):
    m = model_metrics("hybrid", scores, [1, 2, 4])
    a = "hybrid/all/"
    assert m[a + "problems"] == 3 and m[a + "samples"] == 12
    assert m[a + "pass_at_1"] == pytest.approx((2 / 4 + 2 / 4 + 0) / 3)
    # per-problem means 1/2, 1/2, 0: sample variance 1/12
    assert m[a + "pass_at_1_se"] == pytest.approx(math.sqrt(1 / 12) / math.sqrt(3))
    # pass@2 for c=2 of n=4: 1 - C(2,2)/C(4,2) = 5/6
    assert m[a + "pass_at_2"] == pytest.approx((5 / 6 + 5 / 6 + 0) / 3)
    assert m[a + "pass_at_4"] == pytest.approx(2 / 3)
    # maj@1: p1 right (0.5), p2 wrong (41), p3 wrong; maj@2: p1 {0.5, 1/2} wins, p2 ties 41/42 -> 41 first
    assert m[a + "maj_at_1"] == pytest.approx(1 / 3)
    assert m[a + "maj_at_2"] == pytest.approx(1 / 3)
    assert m[a + "maj_at_4"] == pytest.approx(1 / 3)
    assert m[a + "no_answer_rate"] == pytest.approx(2 / 12)
    assert m[a + "truncated_rate"] == pytest.approx(2 / 12)
    assert m[a + "mean_tokens"] == pytest.approx((10 * 9 + 20 + 30 + 20) / 12)
    # per benchmark and per source
    assert m["hybrid/set/pass_at_1"] == pytest.approx(0.5)
    assert m["hybrid/other/pass_at_1"] == 0.0
    assert m["hybrid/source/arith/maj_at_1"] == pytest.approx(0.5)
    assert m["hybrid/source/algebra/pass_at_4"] == 0.0


def test_time_budget_curves_by_hand(scores):
    # 100 tokens/s; mean sample length over the pool = 170/12 tokens
    rows = curves({"m": scores}, {"m": 100.0}, [0.1, 0.3, 0.6, 2.0], max_new_tokens=30)
    sc = {r["budget_s"]: r for r in rows if r["benchmark"] == "all" and r["strategy"] == "self_consistency"}
    mean = 170 / 12
    assert [sc[b]["samples"] for b in (0.1, 0.3, 0.6, 2.0)] == [0, 2, 4, 4]
    assert sc[0.3]["samples"] == int(30 // mean)
    assert sc[0.1]["accuracy"] == 0.0  # not even one sample affordable
    assert sc[0.3]["accuracy"] == pytest.approx(1 / 3)  # maj@2
    assert sc[0.3]["se"] == pytest.approx(1 / 3)  # per problem [1, 0, 0]: sd 1/sqrt(3), over sqrt(3) problems
    assert not sc[0.6]["capped"] and sc[2.0]["capped"]  # 200 tokens buy 14 samples, the pool has 4
    ml = {r["budget_s"]: r for r in rows if r["benchmark"] == "all" and r["strategy"] == "max_length"}
    # L = 10 tokens: the correct samples of 10 tokens count (p1: 2, p2: 1 of 4); at L >= 30 p2's 42.0 counts too
    assert ml[0.1]["max_len"] == 10 and ml[0.1]["accuracy"] == pytest.approx(3 / 12)
    assert ml[0.1]["se"] == pytest.approx((0.0625 / 3) ** 0.5)  # per problem [2/4, 1/4, 0]: variance 1/16
    assert ml[0.3]["accuracy"] == pytest.approx(4 / 12)
    assert ml[2.0]["capped"] and ml[2.0]["max_len"] == 30
    per_set = [r for r in rows if r["benchmark"] == "set" and r["strategy"] == "max_length" and r["budget_s"] == 0.3]
    assert per_set[0]["accuracy"] == pytest.approx(4 / 8)


def test_budget_grid_spans_one_sample_to_the_whole_pool():
    grid = budget_grid({"fast": (200.0, 20.0), "slow": (50.0, 20.0)}, n_samples=4, max_new_tokens=40, points=5)
    assert grid[0] == pytest.approx(0.5 * 20 / 200)
    assert grid[-1] == pytest.approx(1.5 * 80 / 50)
    assert all(b > a for a, b in zip(grid, grid[1:]))


# (completion, the evaluation's answer by default, its answer with answer_in_think=True); reference 7.
THINK_CASES = [
    ("<think>so 7</think> \\boxed{7}", "7", "7"),
    ("<think>maybe \\boxed{7}", None, "7"),  # thinking never closed: no answer, as in the reward
    ("<think>maybe \\boxed{7}</think> I am not sure", None, "7"),  # the only box is inside the thinking
    ("<think>\\boxed{7}</think> \\boxed{8}", "8", "8"),
    ("<think>a</think> so <think>\\boxed{7}", None, "7"),  # a thinking reopened after </think>
    ("\\boxed{7} <think>never closed", None, "7"),
    ("</think> \\boxed{7}", "7", "7"),  # the prompt opened the thinking
]


@pytest.mark.parametrize("text,answer,answer_anywhere", THINK_CASES)
def test_thinking_completions_answer_after_think_like_the_reward(text, answer, answer_anywhere):
    from components.grpo.rewards import score

    prob = Problem("set", "t", "arith", "q", "7")
    s = score_problem(prob, [C(text)], timeout_s=10)
    assert s.answers == [answer] and s.correct == [answer == "7"]
    assert s.labels == [None if answer is None else 0]  # no answer abstains from votes
    assert score("boxed_after_think", text, "7").correct is (answer == "7")  # the GRPO reward agrees
    anywhere = score_problem(prob, [C(text)], timeout_s=10, answer_in_think=True)
    assert anywhere.answers == [answer_anywhere] and anywhere.correct == [answer_anywhere == "7"]


def test_completion_without_think_tags_answers_anywhere_and_config_default():
    from components.config import load_config

    s = score_problem(Problem("set", "t", "arith", "q", "7"), [C("so \\boxed{7}")], timeout_s=10)
    assert s.answers == ["7"] and s.correct == [True]  # a teacher that does not think is still scored
    assert load_config().evaluate.answer_in_think is False
    assert load_config(overrides={"evaluate": {"answer_in_think": True}}).evaluate.answer_in_think is True


def test_arms_comparison_gap_lead_and_crossing_by_hand():
    from components.evaluate.arms import compare, metrics

    def row(arm, b, acc, se=0.0, capped=False, strategy="self_consistency"):
        return {"model": arm, "benchmark": "all", "strategy": strategy, "budget_s": b, "accuracy": acc, "se": se,
                "capped": capped}

    rows = [row("hybrid", 1, 0.10, 0.03), row("transformer", 1, 0.20, 0.04),  # transformer ahead by 10 points
            row("hybrid", 2, 0.30), row("transformer", 2, 0.25),              # hybrid ahead: the curves crossed
            row("hybrid", 4, 0.40), row("transformer", 4, 0.40),              # level
            row("hybrid", 8, 0.90, capped=True), row("transformer", 8, 0.40),  # capped: left out of the verdict
            row("teacher", 1, 0.5)]
    c = compare(rows)["self_consistency"]
    p1 = c["points"][0]
    assert p1["gap_points"] == pytest.approx(-10) and p1["gap_se_points"] == pytest.approx(5)  # 100*sqrt(.03²+.04²)
    assert [p["lead"] for p in c["points"]] == ["transformer", "hybrid", "tie", "hybrid"]
    assert c["crossings_s"] == [2] and c["uncapped"] == 3
    assert (c["hybrid_ahead"], c["transformer_ahead"]) == (1, 1)
    assert c["mean_gap_points"] == pytest.approx((-10 + 5 + 0) / 3)
    assert c["largest_gap_points"] == pytest.approx(5) and c["largest_gap_at_s"] == 2
    assert c["verdict"] == "mixed: hybrid ahead at 1, transformer at 1 of 3 uncapped budgets"
    assert compare(rows)["max_length"]["verdict"] == "no budget where neither curve is capped"
    assert metrics(compare(rows))["arms/self_consistency/mean_gap_points"] == pytest.approx(-5 / 3)
