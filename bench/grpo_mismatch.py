"""Sampler/learner mismatch of GRPO runs (issue 22, item 3): per step, the distribution of |log p_sampler - log p_learner|
over the kept tokens (mean, 50/90/99th percentiles, max), the share of sequences whose mean or max gap passes the
mask threshold, and what truncated importance sampling would do (mean weight, share of capped tokens), from the
runs' metrics.jsonl (the GRPO stage logs these every step, components/grpo/mismatch.py). Writes a JSON summary and a
figure of the percentiles per step.

    python bench/grpo_mismatch.py base-s0=RUN/grpo/metrics.jsonl tis-s0=... --out docs/results/X/mismatch.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.figures import save_figure  # noqa: E402
from components.grpo.curves import read_metrics  # noqa: E402

GAP = ("rollout_logprob_gap", "rollout_logprob_gap_p50", "rollout_logprob_gap_p90", "rollout_logprob_gap_p99",
       "rollout_logprob_gap_max")
OTHER = ("rollout_gap_seqs_mean_over", "rollout_gap_seqs_max_over", "tis_weight_mean", "tis_capped_fraction",
         "mismatch_masked_fraction", "approx_kl")


def summarise(steps: list[dict]) -> dict:
    keys = [k for k in GAP + OTHER if any(k in s for s in steps)]
    return {"steps": len(steps), **{k: {"min": min(s[k] for s in steps if k in s),
                                        "max": max(s[k] for s in steps if k in s)} for k in keys}}


def plot(runs: dict[str, list[dict]], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, steps in runs.items():
        x = [s["step"] for s in steps]
        for a, k in zip(ax, ("rollout_logprob_gap_p99", "rollout_logprob_gap_max")):
            a.plot(x, [max(s.get(k, 0.0), 1e-9) for s in steps], label=name)
    for a, t in zip(ax, ("99th percentile token", "largest token")):
        a.set_yscale("log")
        a.set_xlabel("step")
        a.set_ylabel("|log p sampler - log p learner| (nats)")
        a.set_title(t)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return save_figure(fig, png, "sampler/learner log-prob gap per step "
                                 "(the JSON holds the mean, median and 90th percentile too)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="NAME=METRICS_JSONL")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            ap.error(f"{item!r}: expected NAME=PATH to an existing metrics.jsonl")
        steps = [s for s in read_metrics(Path(path))[0] if "rollout_logprob_gap" in s]
        if not steps:
            ap.error(f"{path}: no step logs the rollout/learner gap")
        runs[name] = steps
    record = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
              "runs": {n: {"summary": summarise(s), "per_step": [{"step": x["step"], **{k: x[k] for k in GAP + OTHER
                                                                                       if k in x}} for x in s]}
                       for n, s in runs.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(plot(runs, args.out.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
