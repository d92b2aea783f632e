"""Accuracy under a fixed generation-time budget, from each model's measured throughput and its pool of samples.

Throughput: decode tokens/s of the model's own engine (components.model.generate, the same code for teacher and
hybrid), measured at the evaluation batch size after a prompt of the mean prompt length, decoding
`throughput_tokens` tokens per row with EOS disabled; prefill and CUDA-graph capture are left out (long
generations are dominated by decoding, and on CPU a short measurement would be dominated by the prefill). The
budget B is wall-clock seconds of generation per
problem when problems are decoded in batches at that throughput, so a problem's token allowance is
A(B) = B x tokens/s.

  (a) self-consistency: with mean sample length Lbar (generated tokens, over the model's pool for the set), a
      budget affords m = floor(A / Lbar) samples; accuracy = maj@m over the first m samples of each problem
      (definitions in components/evaluate/metrics.py); m = 0 scores 0.
  (b) longer maximum length: a single sample may use L = floor(A) tokens; a sample counts as correct at L when it
      stopped by itself (EOS / stop string) within L tokens and its answer is correct; a sample cut off earlier has
      no answer. Accuracy is averaged over all n samples of each problem (the expected single-sample accuracy).

Simplifications: the costs are what the pool shows (prompt prefill is charged to no sample);
beyond the pool (m > n samples, or L > max_new_tokens) the curve cannot grow and such points are flagged `capped`;
(b) simulates length limits by truncating samples generated with the full max_new_tokens instead of re-generating.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from components.evaluate.metrics import ProblemScore
from components.evaluate.speed import time_generation
from components.figures import save_figure

# matplotlib is imported where the figure is drawn: seconds of start-up otherwise.

FIELDS = ["model", "benchmark", "strategy", "budget_s", "tokens_allowed", "samples", "max_len", "accuracy", "se",
          "capped", "tokens_per_s", "mean_tokens"]


def measure_throughput(model, batch: int, prompt_len: int, decode_tokens: int, device, seed: int = 0) -> dict:
    r = time_generation("hybrid", model, batch, max(1, prompt_len), decode_tokens, device, seed, warmup=True)
    return {"tokens_per_s": r["decode_tokens_per_s"], "batch": batch, "prompt_len": prompt_len,
            "decode_tokens": decode_tokens, "prefill_s": r["ttft_s"], "seconds": r["total_s"],
            "ms_per_step": r["decode_ms_per_token"]}


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean over problems and its standard error (sample sd / sqrt(n); 0 for a single problem)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _mean_tokens(problems: Sequence[ProblemScore]) -> float:
    toks = [t for p in problems for t in p.n_tokens]
    return sum(toks) / len(toks) if toks else float("nan")


def budget_grid(stats: dict[str, tuple[float, float]], n_samples: int, max_new_tokens: int, points: int) -> list[float]:
    """Geometric grid from half the cost of one mean sample of the fastest model to 1.5x the cost of the whole pool
    (n samples, or one sample of max_new_tokens) of the slowest. stats: model -> (tokens_per_s, mean_tokens)."""
    lo = min(mt / tps for tps, mt in stats.values() if tps > 0 and mt > 0) * 0.5
    hi = max(max(n_samples * mt, max_new_tokens) / tps for tps, mt in stats.values() if tps > 0) * 1.5
    if points < 2 or hi <= lo:
        return [lo]
    r = (hi / lo) ** (1 / (points - 1))
    return [lo * r ** i for i in range(points)]


def curves(scores: dict[str, list[ProblemScore]], throughput: dict[str, float], budgets: Sequence[float],
           max_new_tokens: int) -> list[dict]:
    """Rows of time_budget.csv: per model, per benchmark and "all", per strategy and budget."""
    rows = []
    for model, probs in scores.items():
        tps = throughput[model]
        groups = {"all": probs}
        for p in probs:
            groups.setdefault(p.benchmark, []).append(p)
        for bench, ps in groups.items():
            if not ps:
                continue
            mean_len = _mean_tokens(ps)
            n_min = min(p.n for p in ps)
            for b in budgets:
                allowed = b * tps
                m = int(allowed // mean_len) if mean_len > 0 else n_min
                m_eff = min(m, n_min)
                acc, se = mean_se([float(p.maj_at(m_eff)) if m_eff >= 1 else 0.0 for p in ps])
                rows.append({"model": model, "benchmark": bench, "strategy": "self_consistency", "budget_s": b,
                             "tokens_allowed": allowed, "samples": m_eff, "max_len": None, "accuracy": acc,
                             "se": se, "capped": m > n_min, "tokens_per_s": tps, "mean_tokens": mean_len})
                L = math.floor(allowed)
                hits = [sum(bool(f and t <= L and c) for f, t, c in zip(p.finished, p.n_tokens, p.correct))
                        for p in ps]
                acc = sum(hits) / sum(p.n for p in ps)  # every sample counts once (problems' n may differ)
                _, se = mean_se([h / p.n for h, p in zip(hits, ps)])
                rows.append({"model": model, "benchmark": bench, "strategy": "max_length", "budget_s": b,
                             "tokens_allowed": allowed, "samples": 1, "max_len": min(L, max_new_tokens),
                             "accuracy": acc, "se": se, "capped": L > max_new_tokens, "tokens_per_s": tps,
                             "mean_tokens": mean_len})
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()})
    return path


def plot(rows: list[dict], path: Path, benchmark: str = "all", title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    panels = (("self_consistency", "(a) self-consistency: maj@m, m = samples affordable"),
              ("max_length", "(b) longer maximum length: one sample, L = tokens affordable"))
    for ax, (strategy, label) in zip(axes, panels):
        for i, model in enumerate(models):
            pts = sorted((r["budget_s"], r["accuracy"], r["capped"], r["tokens_per_s"]) for r in rows
                         if r["model"] == model and r["strategy"] == strategy and r["benchmark"] == benchmark)
            if not pts:
                continue
            c = colors[i % len(colors)]
            free = [(b, a) for b, a, cap, _ in pts if not cap]
            first_cap = next(((b, a) for b, a, cap, _ in pts if cap), None)
            line = free + ([first_cap] if first_cap else [])
            ax.step([b for b, _ in line], [a for _, a in line], where="post", color=c,
                    label=f"{model} ({pts[0][3]:.0f} tok/s)")
            capped = [(b, a) for b, a, cap, _ in pts if cap]
            if capped:
                ax.plot([b for b, _ in capped], [a for _, a in capped], ":", color=c, alpha=0.6)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("generation seconds per problem")
        ax.set_title(label, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    top = max([r["accuracy"] for r in rows if r["benchmark"] == benchmark] or [0.0])
    axes[0].set_ylim(-0.01, min(1.02, max(0.1, top * 1.15)))
    axes[0].set_ylabel(f"accuracy ({benchmark})")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path, title)
