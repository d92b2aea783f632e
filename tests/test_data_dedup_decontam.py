"""Exact/near deduplication and n-gram decontamination."""
import pytest

from components.data.config import DedupConfig
from components.data.decontam import EvalIndex
from components.data.dedup import Deduper, dedup_text, exact_key, minhash_values
from components.data.sources.synthetic import generate

LONG = ("A farmer has a rectangular field that is 120 meters long and 45 meters wide. He plants corn on two thirds "
        "of the field and wheat on the rest. Each square meter of corn yields 3 kilograms and each square meter "
        "of wheat yields 2 kilograms. How many kilograms of grain does the field produce in total?")


def check(d, split, i, text, cfg):
    return d.check(split, str(i), exact_key(text), minhash_values(text, cfg))


def test_exact_and_near_duplicates_counted():
    cfg = DedupConfig()
    d = Deduper(cfg)
    texts = [
        LONG,
        "  " + LONG.upper().replace(" ", "   "),  # same text up to case and spacing
        LONG.replace("How many kilograms", "In total, how many kilograms"),  # one phrase added
        "What is the sum of the first 50 positive odd integers?",
        "Find the product of the roots of x^2 - 7x + 10 = 0.",
    ]
    results = [check(d, "sft1", i, t, cfg) for i, t in enumerate(texts)]
    assert results == [None, "exact_duplicate", "near_duplicate", None, None]
    # Splits are independent indexes.
    assert check(d, "rl", 9, LONG, cfg) is None
    # The same problem with a different solution is a duplicate under key=problem, not under problem_solution.
    assert dedup_text("p", "s1", "problem") == dedup_text("p", "s2", "problem")
    assert dedup_text("p", "s1", "problem_solution") != dedup_text("p", "s2", "problem_solution")


def test_exact_only_and_threshold():
    cfg = DedupConfig(near=False)
    d = Deduper(cfg)
    assert d.check("x", "1", exact_key(LONG), None) is None
    assert d.check("x", "2", exact_key(LONG.replace("How many", "In total, how many")), None) is None
    with pytest.raises(ValueError, match="threshold"):
        DedupConfig(threshold=0.999)
    strict = DedupConfig(threshold=0.97)
    d2 = Deduper(strict)
    assert check(d2, "x", 1, LONG, strict) is None
    assert check(d2, "x", 2, LONG.replace("How many kilograms", "In total, how many kilograms"), strict) is None


def test_planted_evaluation_problem_is_found():
    idx = EvalIndex(8, 0.5)
    idx.add("math500", "math500/test/1", LONG)
    idx.add("math500", "math500/test/2", "Compute the number of ordered pairs of integers (a, b) with 1 <= a, b <= 30 "
                                          "such that a^2 + b^2 is divisible by 5.")
    idx.finalize()
    m = idx.matches("Here is a problem. " + LONG + " Think carefully.")
    assert len(m) == 1 and m[0].item.id == "math500/test/1" and m[0].overlap == 1.0
    # A paraphrase keeping most of the wording still matches; an unrelated problem does not.
    assert idx.matches(LONG.replace("He plants corn", "The farmer plants corn"))
    assert idx.matches("What is the sum of the first 50 positive odd integers?") == []


def test_template_siblings_are_not_contamination():
    # Held-out synthetic problems share template phrasing with training ones but not their numbers.
    held = list(generate(60, seed=11))
    idx = EvalIndex(8, 0.5, boilerplate_df=3)
    for r in held:
        idx.add("synthetic_heldout", r["id"], r["problem"])
    idx.finalize()
    train = list(generate(300, seed=12))
    flagged = sum(bool(idx.matches(r["problem"])) for r in train)
    assert flagged < 0.15 * len(train)
    assert idx.matches(held[7]["problem"])[0].item.id == held[7]["id"]


def test_short_evaluation_problems():
    idx = EvalIndex(8, 0.5)
    idx.add("tiny", "t1", "Compute 17 times 23.")  # 4 words: matched as a whole word sequence
    idx.add("tiny", "t2", "Why?")  # too short to index
    idx.finalize()
    assert len(idx) == 1
    assert idx.matches("Warm-up: compute 17 times 23. Then add 5.")[0].item.id == "t1"
    assert idx.matches("Compute 17 times 24.") == []
