"""Reward functions, by name. A reward takes (completion text, reference answer, settings) and returns a
RewardResult; anything that raises inside scores 0 and is counted as an error, never failing the step.
math-verify calls go through components.mathcheck, bounded in time on any thread or Ray actor."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from components import mathcheck

THINK_CLOSE = mathcheck.THINK_CLOSE


@dataclass
class RewardResult:
    reward: float
    correct: bool
    reason: str  # "correct" | "wrong" | "unevaluated" | "no_think" | "no_box" | "error"


def _judge(boxed: str, answer: str, format_weight: float, timeout_s: float) -> RewardResult:
    # A boxed expression for a numeric reference (\boxed{34+44} for 78) verifies but is no answer: 0, counted.
    if not mathcheck.is_final_value(answer, boxed):
        return RewardResult(format_weight, False, "unevaluated")
    ok = bool(mathcheck.verify(answer, boxed, timeout_s=timeout_s))
    return RewardResult((1.0 if ok else 0.0) + format_weight, ok, "correct" if ok else "wrong")


def boxed_after_think(completion: str, answer: str, format_weight: float = 0.0, timeout_s: float = 5.0) -> RewardResult:
    """1 if a \\boxed{} answer after the last </think> (mathcheck.answer_region: not inside a <think> reopened there)
    verifies against the reference and is a value where the reference is a number (mathcheck.is_final_value),
    else 0 (+ format_weight when the completion is well formed: a closing </think> followed by a \\boxed{}).
    The evaluation reads answers by the same rule (evaluate.answer_in_think: false)."""
    if THINK_CLOSE not in completion:
        return RewardResult(0.0, False, "no_think")
    boxed = mathcheck.extract_boxed(mathcheck.answer_region(completion))
    if boxed is None:
        return RewardResult(0.0, False, "no_box")
    return _judge(boxed, answer, format_weight, timeout_s)


def boxed_anywhere(completion: str, answer: str, format_weight: float = 0.0, timeout_s: float = 5.0) -> RewardResult:
    """Like boxed_after_think without requiring </think> (for models not trained to think)."""
    boxed = mathcheck.extract_boxed(completion)
    if boxed is None:
        return RewardResult(0.0, False, "no_box")
    return _judge(boxed, answer, format_weight, timeout_s)


REWARDS: dict[str, Callable[..., RewardResult]] = {
    "boxed_after_think": boxed_after_think,
    "boxed_anywhere": boxed_anywhere,
}


def score(name: str, completion: str, answer: str, format_weight: float = 0.0, timeout_s: float = 5.0) -> RewardResult:
    fn = REWARDS[name]
    try:
        return fn(completion, answer, format_weight, timeout_s)
    except Exception:  # a broken reward must not kill the step: 0, counted as an error
        return RewardResult(0.0, False, "error")


def overlong_penalty(length: int, max_new_tokens: int, window: int, penalty: float) -> float:
    """DAPO's soft overlong punishment, added to the reward of a completion of `length` tokens: 0 up to
    max_new_tokens - window tokens, then linear down to -penalty at max_new_tokens (a length-based signal that
    is gentler than scoring every truncated completion as wrong, and starts before the cut-off). window 0: off."""
    if window <= 0:
        return 0.0
    over = min(max(length - (max_new_tokens - window), 0), window)
    return -penalty * over / window
