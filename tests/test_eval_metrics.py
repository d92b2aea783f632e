"""pass@k against the binomial closed form, pass@1 standard error, maj@k voting with equivalent answer forms."""
import math

import pytest

from components.evaluate.metrics import (
    ProblemScore,
    aggregate,
    group_answers,
    majority_group,
    mean_and_se,
    pass_at_k,
)
from components.mathcheck import answers_equivalent


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 64])
def test_pass_at_k_matches_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(4, 0, 4) == 0.0  # no correct sample: never passes
    assert pass_at_k(4, 1, 4) == 1.0  # k = n: passes as soon as one sample is correct
    assert pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    # large n: the product form does not overflow where the binomials are astronomically large
    assert pass_at_k(1000, 10, 500) == pytest.approx(closed_form(1000, 10, 500), rel=1e-9)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_mean_and_se():
    mean, se = mean_and_se([0.5, 0.5, 0.0])
    assert mean == pytest.approx(1 / 3)
    assert se == pytest.approx(math.sqrt((1 / 12) / 3))  # sample variance 1/12 over 3 problems
    assert mean_and_se([0.25]) == (0.25, 0.0)


def _equiv(a, b):
    return answers_equivalent(a, b, timeout_s=10)


def test_equivalent_forms_vote_together():
    labels, reps = group_answers(["1/2", "0.5", "\\frac{1}{2}", "3", None, "\\dfrac12"], _equiv)
    assert labels == [0, 0, 0, 1, None, 0]
    assert reps == ["1/2", "3"]


def test_majority_tie_goes_to_the_group_seen_first_and_no_answer_abstains():
    labels, _ = group_answers(["7", "0.5", "7", "\\frac{1}{2}", None, None, "1/2"], _equiv)
    assert labels == [0, 1, 0, 1, None, None, 1]
    assert majority_group(labels, 1) == 0
    assert majority_group(labels, 2) == 0  # 1 vote each: "7" came first
    assert majority_group(labels, 4) == 0  # 2 votes each: "7" came first
    assert majority_group(labels, 6) == 0  # the two abstentions change nothing
    assert majority_group(labels, 7) == 1  # 3 votes for one half
    assert majority_group([None, None], 2) is None
    assert majority_group([None, 3, 3, 1], 4) == 3


def test_maj_at_k_with_equivalent_forms_against_the_reference():
    answers = ["7", "0.5", "7", "\\frac{1}{2}", "1/2"]
    labels, reps = group_answers(answers, _equiv)
    p = ProblemScore("b", "p1", "s", "1/2", answers, [a != "7" for a in answers], [10] * 5, [True] * 5,
                     labels, [r != "7" for r in reps])
    assert [p.maj_at(k) for k in range(1, 6)] == [False, False, False, False, True]
    agg = aggregate([p], [1, 5])
    assert agg["maj_at_1"] == 0.0 and agg["maj_at_5"] == 1.0
    assert agg["pass_at_1"] == pytest.approx(3 / 5)
    assert agg["pass_at_5"] == 1.0
