"""Per-row filters and routing (components/data/checks.py)."""
from collections import Counter

import pytest

from components.data.checks import is_math_answer, route_row
from components.data.config import ChecksConfig
from components.data.record import (
    RowError,
    SourceRow,
    answer_text,
    check_text,
    stable_fraction,
)

CHECKS = ChecksConfig()


def route(row, splits=("sft1", "sft2", "rl"), holdout=0.0, checks=CHECKS):
    counts = Counter()
    recs, rej = route_row(row, "src", list(splits), checks, holdout, "src_heldout", 0, counts)
    return recs, rej, counts


def row(**kw):
    base = dict(id="1", problem="What is seven times six, minus two?", answer="40",
                solution="7 \\times 6 = 42 and 42 - 2 = 40, so the answer is $\\boxed{40}$.")
    base.update(kw)
    return SourceRow(**base)


def test_good_row_feeds_every_split_it_can():
    recs, rej, counts = route(row(trace="Six sevens are 42; minus two is 40.", final="$\\boxed{40}$"))
    assert rej == [] and [r.split for r in recs] == ["sft1", "sft2", "rl"]
    assert recs[1].metadata["final"] == "$\\boxed{40}$" and recs[2].solution is None
    recs, rej, counts = route(row())
    assert [r.split for r in recs] == ["sft1", "rl"] and counts["skipped_no_trace:sft2"] == 1


def test_answer_mismatch_rejects_only_that_split():
    recs, rej, _ = route(row(solution="7 \\times 6 = 42, so $\\boxed{42}$."))
    assert [r.split for r in recs] == ["rl"]
    assert [(r.reason, r.split) for r in rej] == [("answer_mismatch", "sft1")]
    # Equivalent forms agree (math-verify): 0.5 vs \frac{1}{2}.
    recs, rej, _ = route(row(answer="0.5", solution="Half of one is $\\boxed{\\frac{1}{2}}$."), splits=["sft1"])
    assert rej == [] and len(recs) == 1


def test_answer_filters():
    assert route(row(answer="No"))[1][0].reason == "non_math_answer"
    assert route(row(answer="98 values"))[1][0].reason == "non_math_answer"
    assert route(row(answer="\\frac{"))[1][0].reason == "unparseable_answer"
    assert route(row(answer="x" * 300))[1][0].reason == "answer_too_long"
    assert route(row(problem="2+2?"))[1][0].reason == "too_short"
    r = route(row(answer=None, solution="no box anywhere here at all"))[1][0]
    assert r.reason == "missing_field"
    # No answer column: the solution's last \boxed{} is the reference.
    recs, rej, _ = route(row(answer=None), splits=["rl"])
    assert rej == [] and recs[0].answer == "40"
    # Evaluation sets keep text answers that math-verify can still string-match.
    recs, rej, _ = route(row(answer="\\text{Bob}", problem="Who comes first: Evelyn or Bob?"), splits=["eval"])
    assert rej == [] and recs[0].split == "eval" and recs[0].metadata["eval_set"] == "src"
    for ok in ["239", "2^{n-1}", "(x-5)(x+3)", "\\sqrt{3}/3", "x=16, x=81", "\\frac{9}{4}"]:
        assert is_math_answer(ok), ok
    for prose in ["Yes", "At least 1 number", "The sequence does not exist"]:
        assert not is_math_answer(prose), prose


def test_trace_verification_and_source_evidence():
    # A trace whose final answer disagrees is rejected.
    recs, rej, _ = route(row(trace="I think it is 41.", final="$\\boxed{41}$"), splits=["sft2"])
    assert recs == [] and rej[0].reason == "answer_mismatch"
    # No extractable answer and no evidence: rejected.
    recs, rej, _ = route(row(trace="Six sevens, minus two, gives the number."), splits=["sft2"])
    assert recs == [] and rej[0].reason == "no_final_answer"
    # Same trace with the source's human annotation: accepted, with a boxed final appended.
    recs, rej, _ = route(row(trace="Six sevens, minus two, gives the number.", trace_verified_by="human"),
                         splits=["sft2"])
    assert rej == [] and recs[0].metadata["verified_by"] == "human"
    assert recs[0].metadata["final"] == "The final answer is $\\boxed{40}$."
    # Further traces of the same problem become their own records.
    recs, _, _ = route(row(trace="42 - 2 = 40.", final="\\boxed{40}", alt_traces=[("Again: 40.", "\\boxed{40}")]),
                       splits=["sft2"])
    assert [r.id for r in recs] == ["src/1", "src/1#1"]


def test_holdout_routing_is_seeded_by_id():
    ids = [str(i) for i in range(400)]
    held = [i for i in ids if route(row(id=i), holdout=0.25)[0][0].split == "eval"]
    assert 60 < len(held) < 140
    assert all(stable_fraction(f"src/{i}", 0) < 0.25 for i in held)
    recs = route(row(id=held[0]), holdout=0.25)[0]
    assert len(recs) == 1 and recs[0].metadata["eval_set"] == "src_heldout"


def test_field_validation():
    with pytest.raises(RowError) as e:
        check_text(None, "problem")
    assert e.value.reason == "missing_field"
    for bad, reason in [(3, "wrong_type"), (b"\xff\xfe", "invalid_utf8"), ("a\udcffb", "invalid_utf8"),
                        ("bad \ufffd text", "invalid_utf8"), ("nul\x00", "broken_text"), ("   ", "empty_field")]:
        with pytest.raises(RowError) as e:
            check_text(bad, "f")
        assert e.value.reason == reason
    assert answer_text(142.0) == "142" and answer_text(7) == "7" and answer_text(0.25) == "0.25"
    with pytest.raises(RowError):
        answer_text(True)
