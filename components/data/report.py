"""Curation statistics: per-source counts for every filter, reject reasons, output sizes, and the
token-length histogram (report.json, report.md, token_lengths.png)."""
from __future__ import annotations

import json
from array import array
from collections import Counter, defaultdict

import numpy as np

# matplotlib is imported where a figure is drawn (plot_lengths): seconds of start-up otherwise.


class Stats:
    def __init__(self):
        self.by_source: dict[str, Counter] = defaultdict(Counter)
        self.reject_reasons: Counter = Counter()
        self.lengths: dict[str, array] = defaultdict(lambda: array("I"))
        self.timings: dict[str, float] = {}
        self.eval_index_size = 0

    def add(self, source: str, metric: str, n: int = 1) -> None:
        self.by_source[source][metric] += n

    def merge(self, source: str, counts: Counter) -> None:
        self.by_source[source].update(counts)

    def reject(self, source: str, reason: str, split: str | None = None) -> None:
        self.reject_reasons[reason] += 1
        self.add(source, f"rejected:{reason}" + (f":{split}" if split else ""))

    def total(self, prefix: str) -> int:
        return sum(v for c in self.by_source.values() for k, v in c.items() if k.startswith(prefix))


def histogram(lengths: array, bins: int = 40) -> dict:
    if not lengths:
        return {"edges": [], "counts": []}
    arr = np.frombuffer(lengths, dtype=np.uint32)
    counts, edges = np.histogram(arr, bins=bins)
    return {"edges": [round(e) for e in edges], "counts": counts.tolist(), "min": int(arr.min()),
            "max": int(arr.max()), "mean": round(float(arr.mean()), 1), "p50": int(np.percentile(arr, 50)),
            "p95": int(np.percentile(arr, 95))}


def plot_lengths(stats: Stats, path: str, limits: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in stats.lengths if stats.lengths[n]]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.5 * max(1, len(names)), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        arr = np.frombuffer(stats.lengths[name], dtype=np.uint32)
        ax.hist(arr, bins=40, color="#4472c4")
        if name in limits:
            ax.axvline(limits[name], color="#c00000", linestyle="--", label=f"limit {limits[name]}")
            ax.legend(fontsize=8)
        ax.set_title(f"{name} (n={len(arr)})", fontsize=10)
        ax.set_xlabel("tokens")
    axes[0][0].set_ylabel("documents")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_report(stats: Stats, outputs: dict, elapsed: float, decontam_rows: int) -> dict:
    return {
        "elapsed_s": round(elapsed, 2),
        "timings_s": {k: round(v, 2) for k, v in stats.timings.items()},
        "totals": {
            "rows_read": stats.total("rows_read"),
            "rejected": sum(stats.reject_reasons.values()),
            "exact_duplicates": stats.total("exact_duplicate"),
            "near_duplicates": stats.total("near_duplicate"),
            "decontaminated": decontam_rows,
            "eval_problems_indexed": stats.eval_index_size,
        },
        "rejects_by_reason": dict(sorted(stats.reject_reasons.items())),
        "sources": {s: dict(sorted(c.items())) for s, c in sorted(stats.by_source.items())},
        "outputs": outputs,
        "token_lengths": {name: histogram(arr) for name, arr in stats.lengths.items()},
    }


def write_markdown(report: dict, path: str) -> None:
    t = report["totals"]
    lines = ["# Curation report", "", f"Wall time: {report['elapsed_s']} s", "",
             "| rows read | rejected | exact dups | near dups | decontaminated |", "|---|---|---|---|---|",
             f"| {t['rows_read']} | {t['rejected']} | {t['exact_duplicates']} | {t['near_duplicates']} | "
             f"{t['decontaminated']} |", "", "## Outputs", "", "| output | records | rows | tokens |",
             "|---|---|---|---|"]
    for name, o in report["outputs"].items():
        lines.append(f"| {name} | {o.get('records', '')} | {o.get('rows', '')} | {o.get('tokens', '')} |")
    lines += ["", "## Rejects by reason", "", "| reason | count |", "|---|---|"]
    lines += [f"| {r} | {c} |" for r, c in report["rejects_by_reason"].items()] or ["| (none) | 0 |"]
    lines += ["", "## Per source", ""]
    for src, c in report["sources"].items():
        lines.append(f"### {src}")
        lines += ["", "| metric | count |", "|---|---|"] + [f"| {k} | {v} |" for k, v in c.items()] + [""]
    lines += ["## Token lengths", "", "![token lengths](token_lengths.png)", "",
              "| output | n | min | p50 | mean | p95 | max |", "|---|---|---|---|---|---|---|"]
    for name, h in report["token_lengths"].items():
        if h.get("counts"):
            lines.append(f"| {name} | {sum(h['counts'])} | {h['min']} | {h['p50']} | {h['mean']} | {h['p95']} | {h['max']} |")
    lines += ["", "## Timings (s)", ""] + [f"- {k}: {v}" for k, v in report["timings_s"].items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
