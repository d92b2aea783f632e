"""GRPO replicates side by side (issue 22): per seed the held-out accuracy before and after GRPO with the paired
gain, and across seeds the mean gain with its standard error, from each seed's `grpo_metrics.json`.

    python bench/grpo_seeds_report.py runs/gpu2-arms/seed0 runs/gpu2-arms/seed1 runs/gpu2-arms/seed2 \
        --command "bench/lent_gpu/gpu_grpo_seeds.sh 0 1 2" --out docs/results/grpo_seeds_gpu.json

Each argument is a seed's run_dir (its `grpo/grpo_metrics.json`, written by the GRPO stage) or that file itself.
The per-seed SE is the stage's: evaluation noise over the held-out prompts. The across-seed SE is the standard
deviation of the seeds' gains over sqrt(seeds), which also covers seed-to-seed variation. Every seed must be scored
on the same held-out prompts with the same samples per prompt, or the report refuses them. Target (issue 22): mean
gain of at least 3 points, with pass@n after no lower than before.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.figures import save_figure

TARGET_GAIN = 0.03


def _metrics(path: Path) -> dict:
    f = path / "grpo" / "grpo_metrics.json" if path.is_dir() else path
    if not f.is_file():
        raise ValueError(f"{path}: no grpo/grpo_metrics.json (did its GRPO stage finish?)")
    m = json.loads(f.read_text())
    missing = [k for k in ("heldout/accuracy", "heldout/accuracy_before", "heldout/gain") if k not in m]
    if missing:
        raise ValueError(f"{f}: no {', '.join(missing)} (held-out evaluation before and after GRPO is off?)")
    return m


def seed_row(name: str, m: dict) -> dict:
    def g(k):
        return None if m.get(k) is None else round(m[k], 6)

    return {"seed": name, "steps": m.get("steps"), "prompts": m.get("heldout/prompts"),
            "samples": m.get("heldout/samples"), "before": g("heldout/accuracy_before"),
            "after": g("heldout/accuracy"), "gain": g("heldout/gain"), "gain_se": g("heldout/gain_se"),
            "pass_at_n_before": g("heldout/pass_at_n_before"), "pass_at_n_after": g("heldout/pass_at_n"),
            "mixed_before": g("heldout/mixed_fraction_before"), "mixed_after": g("heldout/mixed_fraction")}


def summary(rows: list[dict]) -> dict:
    gains = [r["gain"] for r in rows]
    n = len(gains)
    se = statistics.stdev(gains) / math.sqrt(n) if n > 1 else None
    mean = statistics.fmean(gains)
    pn_before = [r["pass_at_n_before"] for r in rows if r["pass_at_n_before"] is not None]
    pn_after = [r["pass_at_n_after"] for r in rows if r["pass_at_n_after"] is not None]
    out = {"seeds": n, "mean_gain": round(mean, 6), "mean_gain_se": None if se is None else round(se, 6),
           "mean_before": round(statistics.fmean(r["before"] for r in rows), 6),
           "mean_after": round(statistics.fmean(r["after"] for r in rows), 6),
           "seeds_gaining": sum(g > 0 for g in gains)}
    if pn_before and pn_after:
        out["mean_pass_at_n_before"] = round(statistics.fmean(pn_before), 6)
        out["mean_pass_at_n_after"] = round(statistics.fmean(pn_after), 6)
    out["target_reached"] = bool(mean >= TARGET_GAIN and
                                 out.get("mean_pass_at_n_after", 0) >= out.get("mean_pass_at_n_before", 1))
    return out


def report(paths: list[Path], command: str | None = None) -> dict:
    rows = [seed_row(p.name if p.is_dir() else p.parent.parent.name, _metrics(p)) for p in paths]
    shapes = {(r["prompts"], r["samples"]) for r in rows}
    if len(shapes) > 1:
        raise ValueError(f"the seeds were scored on different held-out sets (prompts, samples): {sorted(shapes)}")
    return {"command": command, "per_seed": rows, "across_seeds": summary(rows), "target_gain": TARGET_GAIN}


def plot(rec: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rec["per_seed"]
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    x = range(len(rows))
    ax.bar(x, [100 * r["gain"] for r in rows], yerr=[100 * (r["gain_se"] or 0) for r in rows], capsize=4,
           color="tab:green", alpha=0.8, label="paired gain per seed (+- evaluation SE)")
    s = rec["across_seeds"]
    ax.axhline(100 * s["mean_gain"], color="k", label=f"mean {100 * s['mean_gain']:+.1f}"
               + (f" +- {100 * s['mean_gain_se']:.1f} (across seeds)" if s["mean_gain_se"] is not None else ""))
    ax.axhline(100 * TARGET_GAIN, color="k", ls=":", label=f"target +{100 * TARGET_GAIN:.0f}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(list(x), [r["seed"] for r in rows])
    ax.set_ylabel("held-out pass@1 gain (points)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, png)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seeds", nargs="+", type=Path, help="each seed's run_dir (or its grpo_metrics.json)")
    ap.add_argument("--command", default=None, help="the command that ran the seeds, recorded beside the numbers")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        rec = report(args.seeds, args.command)
    except ValueError as e:
        print(f"grpo_seeds_report: error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=1) + "\n")
    plot(rec, args.out.with_suffix(".png"))
    for r in rec["per_seed"]:
        print(f"{r['seed']}: {r['before']:.4f} -> {r['after']:.4f}, gain {100 * r['gain']:+.2f} "
              f"+- {100 * (r['gain_se'] or 0):.2f} points")
    s = rec["across_seeds"]
    print(f"mean gain {100 * s['mean_gain']:+.2f}" + (f" +- {100 * s['mean_gain_se']:.2f}" if s["mean_gain_se"] is not None else "")
          + f" points over {s['seeds']} seeds; target {'reached' if s['target_reached'] else 'not reached'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
