"""A GRPO run's curves from its metrics.jsonl (one JSON object per logged step): reward and accuracy with the
held-out accuracy before and after (+- one standard error), response length and truncation, entropy, and the
policy-change diagnostics (approximate KL to the old policy, clip fraction, rollout/learner log-prob gap) on a
log scale, where a run that comes apart shows first. The grpo stage writes it beside its metrics; any run's file:

    python -m components.grpo.curves runs/gpu/grpo/metrics.jsonl grpo_curves.png
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from components.errors import M1Error
from components.figures import figure_main, save_figure

# matplotlib is imported where the figure is drawn: seconds of start-up otherwise.


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(per-step rows, held-out evaluations) of a metrics.jsonl; a resumed run's repeated steps keep the last."""
    steps: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "heldout/accuracy" in row:
            evals[int(row["step"])] = row
        if "reward_mean" in row:
            steps[int(row["step"])] = row
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]


def plot_curves(metrics_path: Path, png: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, evals = read_metrics(metrics_path)
    if not rows:
        raise M1Error(f"{metrics_path}: no GRPO step metrics to plot")
    x = [r["step"] for r in rows]

    def col(k: str) -> list[float]:
        return [r.get(k, float("nan")) for r in rows]

    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    a = ax[0, 0]
    a.plot(x, col("reward_mean"), label="reward (rollouts)")
    a.plot(x, col("accuracy"), label="accuracy (rollouts)")
    if evals:
        a.errorbar([e["step"] for e in evals], [e["heldout/accuracy"] for e in evals],
                   yerr=[e.get("heldout/accuracy_se", 0.0) for e in evals], fmt="o", capsize=4, color="k",
                   label="held-out accuracy +- SE")
    a.set_title("reward and accuracy")
    a.legend(fontsize=8)
    a = ax[0, 1]
    a.plot(x, col("response_length_mean"), label="mean length (tokens)")
    a.plot(x, col("response_length_max"), label="max length", alpha=0.5)
    a.set_title("response length")
    a.legend(fontsize=8, loc="upper left")
    b = a.twinx()
    b.plot(x, col("truncated_fraction"), color="tab:red", label="truncated fraction")
    b.plot(x, col("no_think_fraction"), color="tab:purple", label="no </think> fraction")
    b.set_ylim(0, 1)
    b.legend(fontsize=8, loc="upper right")
    a = ax[1, 0]
    a.plot(x, col("entropy"), label="token entropy (nats)")
    a.plot(x, col("zero_variance_groups"), label="zero-variance groups")
    a.set_title("exploration and signal")
    a.legend(fontsize=8)
    a = ax[1, 1]
    for k, label in (("approx_kl", "approx KL to old policy"), ("clip_fraction", "clip fraction"),
                     ("rollout_logprob_gap", "rollout/learner log-prob gap (mean)"),
                     ("rollout_logprob_gap_p99", "gap, 99th percentile token"), ("rollout_logprob_gap_max", "gap, max")):
        v = [y if y > 0 else math.nan for y in col(k)]  # NaN > 0 is False: absent values stay NaN
        if not all(math.isnan(y) for y in v):  # absent (older runs) or all zero: nothing to draw on a log axis
            a.plot(x, v, label=label)
    a.set_yscale("log")
    a.set_title("policy change")
    a.legend(fontsize=8)
    for a in ax.flat:
        a.set_xlabel("step")
    return save_figure(fig, Path(png), title)


def main(argv: list[str]) -> int:
    return figure_main(argv, "python -m components.grpo.curves METRICS_JSONL OUT_PNG [TITLE]", plot_curves)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
