"""How a GRPO run changed the held-out prompts, from its heldout_before.jsonl / heldout_after.jsonl: per prompt,
how many of its n samples were right. The mean (pass@1) can stay flat while the policy changes a lot: sharpening
turns prompts right 6 of 8 times into 8 of 8 and prompts right once by luck into never, which pass@n (any sample
right) and the share of mixed prompts (some right, some wrong: the only ones whose groups carry a GRPO signal)
show. The grpo stage writes the figure beside its metrics; any run's files:

    python -m components.grpo.outcomes runs/gpu/grpo heldout_outcomes.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from components.errors import M1Error
from components.figures import figure_main, save_figure

# matplotlib is imported where the figure is drawn: seconds of start-up otherwise.


def _read(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise M1Error(f"{path}: no held-out prompts")
    return rows


def _samples(rows: list[dict], path: Path) -> int:
    n = {len(r["reasons"]) for r in rows}
    if len(n) != 1:
        raise M1Error(f"{path}: prompts have different sample counts {sorted(n)}")
    return n.pop()


def read_pair(before: Path, after: Path) -> tuple[list[dict], list[dict]]:
    """The held-out records before and after GRPO, refused unless they hold the same prompts in the same order."""
    b, a = _read(before), _read(after)
    if len(b) != len(a) or any(x["problem"] != y["problem"] for x, y in zip(b, a)):
        raise M1Error(f"{before} and {after} hold different held-out prompts: no paired comparison")
    return b, a


def _correct(row: dict) -> int:
    return sum(x == "correct" for x in row["reasons"])


def correct_counts(path: Path) -> tuple[np.ndarray, int]:
    """(per-prompt count of correct samples, samples per prompt) of a heldout_*.jsonl."""
    rows = _read(path)
    return np.asarray([_correct(r) for r in rows]), _samples(rows, path)


def problem_kind(problem: str) -> str:
    """A generated problem's type is the label before its first colon ("Modulo division: $57 % 9 =$"); a
    competition problem has none (or a sentence there) and is "other"."""
    head, sep, _ = problem.partition(":")
    return head.strip() if sep and len(head) <= 40 and "$" not in head else "other"


def per_prompt(run_dir: Path) -> list[dict]:
    """The run's paired record: per held-out prompt, its type and correct samples before and after GRPO."""
    paths = [Path(run_dir) / f"heldout_{k}.jsonl" for k in ("before", "after")]
    before, after = read_pair(*paths)
    n = _samples(before, paths[0])
    if _samples(after, paths[1]) != n:
        raise M1Error(f"{run_dir}: samples per prompt differ before and after")
    return [{"problem": b["problem"], "answer": b["answer"], "kind": problem_kind(b["problem"]), "samples": n,
             "before_correct": _correct(b), "after_correct": _correct(a)} for b, a in zip(before, after)]


def accuracy_by_kind(rows: list[dict]) -> dict[str, dict[str, float]]:
    """pass@1 before and after per problem type, most prompts first (where a gain comes from)."""
    kinds: dict[str, list[dict]] = {}
    for r in rows:
        kinds.setdefault(r["kind"], []).append(r)
    return {k: {"prompts": len(v), "before": sum(r["before_correct"] for r in v) / sum(r["samples"] for r in v),
                "after": sum(r["after_correct"] for r in v) / sum(r["samples"] for r in v)}
            for k, v in sorted(kinds.items(), key=lambda kv: -len(kv[1]))}


def outcome_stats(counts: np.ndarray, n: int) -> dict[str, float]:
    return {"pass_at_1": float(counts.mean() / n), "pass_at_n": float((counts > 0).mean()),
            "mixed_fraction": float(((counts > 0) & (counts < n)).mean()), "samples": float(n)}


def plot_outcomes(run_dir: Path, png: Path, title: str = "") -> Path:
    """Bars of prompts by correct samples (0..n) before and after, with each side's stats in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    n_max = 0
    for i, (name, color) in enumerate((("before", "tab:gray"), ("after", "tab:blue"))):
        counts, n = correct_counts(run_dir / f"heldout_{name}.jsonl")
        n_max = max(n_max, n)
        s = outcome_stats(counts, n)
        hist = np.bincount(counts, minlength=n + 1)
        ax.bar(np.arange(n + 1) + (i - 0.5) * 0.4, hist, width=0.4, color=color,
               label=f"{name}: pass@1 {s['pass_at_1']:.3f}, pass@{n} {s['pass_at_n']:.3f}, "
                     f"mixed {s['mixed_fraction']:.3f}")
    ax.set_yscale("log")
    ax.set_xticks(range(n_max + 1))
    ax.set_xlabel(f"correct samples of {n_max} per held-out prompt")
    ax.set_ylabel("prompts")
    ax.legend(fontsize=8)
    return save_figure(fig, Path(png), title)


def main(argv: list[str]) -> int:
    return figure_main(argv, "python -m components.grpo.outcomes GRPO_RUN_DIR OUT_PNG [TITLE]", plot_outcomes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
