"""components.mathcheck: extraction, equivalence, and time bounds on and off the main thread."""
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from components import mathcheck as mc

# Expanding two degree-3000 polynomials keeps sympy busy far beyond any timeout used here. A call that ran its
# expansion to the end inside C before the timer could raise leaves it in sympy's cache, so a second call on the same
# pair can finish in time: each timed call below gets a pair of its own.
SLOW_GOLD, SLOW_PRED = r"(x+1)^{3000}", r"(x+2)^{3000}"
SLOW_GOLD_2, SLOW_PRED_2 = r"(x+3)^{3000}", r"(x+4)^{3000}"


def test_extract_boxed_last_nested_and_fbox():
    assert mc.extract_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert mc.extract_boxed(r"\boxed{x^{2}+\{1,2\}}") == r"x^{2}+\{1,2\}"
    assert mc.extract_boxed(r"so \fbox{42}.") == "42"
    assert mc.extract_boxed(r"the answer is \boxed 7$") == "7"
    assert mc.extract_boxed("no box here") is None
    assert mc.extract_boxed(r"\boxed{3} and \boxed{unbalanced") == "3"
    assert mc.extract_boxed(None) is None


@pytest.mark.parametrize(
    "gold,pred,expected",
    [
        ("1/2", "0.5", True),
        (r"\frac{1}{2}", "0.5", True),
        ("0.5", r"so the result is \boxed{\frac{1}{2}}.", True),
        ("3", "4", False),
        ("(x-5)(x+3)", "x^2-2x-15", True),
        ("x=15, y=-20", "$x = 15$, $y = -20$", True),
    ],
)
def test_verify_equivalence(gold, pred, expected):
    assert mc.verify(gold, pred) is expected
    assert mc.answers_equivalent(gold, pred) is expected


def test_parse_answer_and_bad_input():
    assert mc.parse_answer("239")[0] == 239
    assert mc.parse_answer("") is None
    assert mc.parse_answer(None) is None
    assert mc.verify("", "1") is False
    assert mc.verify(None, "1") is False


def test_main_thread_timeout_returns_false_and_keeps_outer_timer(monkeypatch):
    fired = []
    timeouts = []

    def raise_timeout(signum, frame):  # the module's own handler, counted: the call ended by our timer
        timeouts.append(signum)
        raise mc._Timeout()

    monkeypatch.setattr(mc, "_raise_timeout", raise_timeout)
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 600.0)
    try:
        assert mc.verify(SLOW_GOLD, SLOW_PRED, timeout_s=0.5) is False
        assert timeouts == [signal.SIGALRM] and fired == []
        assert mc._call("verify", (SLOW_GOLD_2, SLOW_PRED_2), 0.5) is None  # cut off, not a completed "unequal"
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < remaining <= 600.0  # the outer timer was re-armed, not cancelled
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert mc.verify("2", "2.0") is True


def test_a_timeout_swallowed_by_the_library_still_counts_as_cut_off(monkeypatch):
    # sympy and math-verify have bare `except:` blocks: if the timer fires inside one, the call returns an
    # ordinary False. It must still read as cut off (None), not as a completed "unequal".
    def swallowing(gold, pred):
        try:
            while True:
                time.sleep(0.01)
        except BaseException:
            return False

    monkeypatch.setitem(mc._OPS, "verify", swallowing)
    assert mc._run_local("verify", ("1", "2"), 0.2) is None
    monkeypatch.setitem(mc._OPS, "verify", lambda gold, pred: False)
    assert mc._run_local("verify", ("1", "2"), 0.2) is False  # finished in time: a real "unequal"


def test_worker_thread_calls_and_timeout():
    def job():
        return (
            mc.verify("1/2", "0.5"),
            mc.answers_equivalent(r"\frac{3}{4}", "0.75"),
            mc.parse_answer(r"\boxed{7}")[0] == 7,
            mc.verify(SLOW_GOLD, SLOW_PRED, timeout_s=0.5),
            mc._call("verify", (SLOW_GOLD_2, SLOW_PRED_2), 0.5),  # None: cut off, not a completed "unequal"
            mc.verify("3", "4"),
            mc.verify("10", r"\boxed{10}"),
        )

    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda _: job(), range(2)))
    for ok_half, ok_frac, ok_parse, slow, cut_off, wrong, after in results:
        assert ok_half and ok_frac and ok_parse
        assert slow is False and cut_off is None
        assert wrong is False
        assert after is True  # the pool recovered after a timed-out call
    assert threading.current_thread() is threading.main_thread()


# A boxed answer as written (currency signs, separators, unit words, mixed numbers), its reference, and the verdict.
# The GRPO reward and the evaluation share mathcheck's normalisation, so both must agree with the table.
ANSWER_FORMS = [
    (r"\$18", "18", "correct"),
    (r"\$4,000", "4000", "correct"),
    (r"\$18.00", "18", "correct"),
    (r"18\$", "18", "correct"),
    (r"\text{\$18}", "18", "correct"),
    (r"\text{\$}18", "18", "correct"),
    (r"118{,}000", "118000", "correct"),
    (r"\$18{,}000", "18000", "correct"),
    (r"18 \mathrm{~dollars}", "18", "correct"),
    (r"18\ \text{dollars}", "18", "correct"),
    (r"18~\text{dollars}", "18", "correct"),
    (r"3\frac{1}{2}", "3.5", "correct"),
    (r"-3\frac{1}{2}", "-3.5", "correct"),
    (r"\$19", "18", "wrong"),
    # a numeric reference wants the value: an expression, or a fraction for an integer, is unevaluated (and wrong)
    (r"34+44", "78", "unevaluated"),
    (r"\$34+44", "78", "unevaluated"),
    (r"3\frac{1}{2}", "3", "unevaluated"),
]


@pytest.mark.parametrize("boxed,reference,verdict", ANSWER_FORMS)
def test_answer_forms_scored_alike_by_reward_and_evaluation(boxed, reference, verdict):
    from components.evaluate.benchmarks import Problem
    from components.evaluate.sampling import Completion
    from components.evaluate.scoring import score_problem
    from components.grpo import rewards as R

    completion = rf"<think>work</think> The answer is $\boxed{{{boxed}}}$."
    r = R.score("boxed_after_think", completion, reference)
    assert (r.correct, r.reason) == (verdict == "correct", verdict)
    s = score_problem(Problem("set", "p", "src", "q", reference), [Completion(completion, 5, "eos")], timeout_s=10)
    assert s.correct == [verdict == "correct"]
    assert s.labels == ([None] if verdict == "unevaluated" else [0])  # an unevaluated answer abstains from votes


def test_normalize_answer_text_drops_currency_and_latex_spacing():
    assert mc.normalize_answer_text(r"18\$") == "18"
    assert mc.normalize_answer_text(r"$\$4{,}000$") == "4,000"
    assert mc.normalize_answer_text(r"18\ \text{dollars}") == r"18\text{dollars}"
    assert mc.normalize_answer_text(r"18~\mathrm{cm}") == r"18\mathrm{cm}"
    assert mc.normalize_answer_text(r"\begin{matrix}1\\ 2\end{matrix}") == r"\begin{matrix}1\\2\end{matrix}"  # row break kept
    assert mc.is_plain_number(r"\$18") and not mc.is_plain_number(r"\$18+1")


@pytest.mark.parametrize("completion,in_think,region", [
    ("<think>a</think> b", False, " b"),
    ("<think>a</think> b <think> c", False, " b "),  # a reopened thinking is not the answer
    ("<think>a</think> b </think> c", False, " c"),  # the last close counts
    ("</think> b", False, " b"),  # the prompt opened the thinking
    ("<think> a, never closed", False, None),
    ("no tags at all", False, "no tags at all"),  # a model that does not think
    ("<think> a, never closed", True, "<think> a, never closed"),
])
def test_answer_region(completion, in_think, region):
    assert mc.answer_region(completion, in_think) == region
