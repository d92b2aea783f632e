"""GRPO recipes side by side from one SFT-2 model (issue 22, items 1 and 2): replicates of the profile's recipe and
variants against sharpening, each run through the GRPO stage (`m1 stage grpo`) in its own run_dir, many at a time
over the node's GPUs, then per variant the held-out pass@1 before and after with the paired gain, pass@n and the
share of mixed prompts (some samples right, some wrong), and across a variant's seeds the mean gain with its SE.

    python bench/grpo_variants.py --root runs/gpu2-arms --profile gpu2-arms --seeds 0 1 2 \\
        --variant clip_higher grpo.clip_high=0.28 --variant group16 grpo.group_size=16 \\
        --variant drgrpo grpo.advantage=drgrpo grpo.loss_agg=seq_mean_token_sum_norm \\
        --variant-seeds 0 --parallel 8 --gpus 2 --out docs/results/grpo_variants_gpu.json

`base` is the profile's recipe (with the common --set overrides), run with every seed of --seeds; each --variant
NAME KEY=VALUE... is base with those overrides, run with the seeds of --variant-seeds (default: the same). Every
run's settings are validated before any run starts. Run N of variant V lives in <root>/grpo-variants/V-sN, with
<root>/sft2 and <root>/data linked in, so all runs start from the same model and the same curated prompts and are
scored on the same held-out prompts (chosen by a stable hash, not by the seed). Runs are spread round-robin over
--gpus GPUs (CUDA_VISIBLE_DEVICES): a 135M policy's decoding is bound by kernel launches, so several runs share a
GPU at little cost. The record is rewritten as each run ends, so a bench cut short keeps the runs that finished;
--report-only rebuilds it from the run_dirs.

A variant is kept (issue 22's rule) when its mean gain is positive and its pass@n after GRPO is not below before.
Simplifications: the variants other than base usually run one seed, so their gain's SE is the evaluation's over
prompts, not the seed-to-seed spread that base's seeds measure; compare them against base's across-seed SE.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from flow_runs import (
    device_name,
    named_overrides,
    run_many,
    validate_settings,
    versions,
)
from grpo_seeds_report import _metrics, seed_row, summary

from components.figures import save_figure


def run_dir(root: Path, variant: str, seed: int) -> Path:
    return root / "grpo-variants" / f"{variant}-s{seed}"


def grpo_cmd(python: str, profile: str, run: Path, seed: int, sets: list[str]) -> list[str]:
    cmd = [python, "-m", "components.cli", "stage", "grpo", "--profile", profile, "--set", "tracking.enabled=false",
           "--set", f"run_dir={run}", "--set", f"seed={seed}"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def link_inputs(root: Path, run: Path) -> None:
    """The run_dir sees the shared SFT-2 model and curated data as its own (relative links, so the tree can move)."""
    run.mkdir(parents=True, exist_ok=True)
    for name in ("sft2", "data"):
        link = run / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(root / name, run))


def variant_summary(name: str, sets: list[str], runs: list[tuple[int, Path]]) -> dict:
    """One variant's finished seeds (grpo_seeds_report's per-seed rows and their summary), and the ones missing."""
    rows, missing = [], []
    for seed, run in runs:
        try:
            rows.append(seed_row(f"s{seed}", _metrics(run)))
        except ValueError:
            missing.append(seed)
    out = {"name": name, "sets": sets, "seeds": rows, "missing_seeds": missing}
    if rows:
        s = summary(rows)
        out["summary"] = s
        out["mean_mixed_before"] = _mean([r["mixed_before"] for r in rows])
        out["mean_mixed_after"] = _mean([r["mixed_after"] for r in rows])
        out["kept"] = bool(s["mean_gain"] > 0 and s.get("mean_pass_at_n_after", 0) >= s.get("mean_pass_at_n_before", 1))
    return out


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 6) if xs else None


def report(record: dict, root: Path, plan: list[tuple[str, list[str], list[int]]]) -> dict:
    record["variants"] = [variant_summary(name, sets, [(s, run_dir(root, name, s)) for s in seeds])
                          for name, sets, seeds in plan]
    shapes = {(r["prompts"], r["samples"]) for v in record["variants"] for r in v["seeds"]}
    if len(shapes) > 1:
        raise ValueError(f"runs scored on different held-out sets (prompts, samples): {sorted(shapes)}")
    done = [v for v in record["variants"] if v.get("summary")]
    record["best"] = max(done, key=lambda v: v["summary"]["mean_gain"])["name"] if done else None
    record["kept"] = [v["name"] for v in done if v["kept"]]
    return record


def plot(record: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = [v for v in record["variants"] if v.get("summary")]
    if not vs:
        return
    x = list(range(len(vs)))
    fig, (ax, ax_n) = plt.subplots(1, 2, figsize=(11, 4.0))
    gains = [100 * v["summary"]["mean_gain"] for v in vs]
    errs = [100 * (v["summary"]["mean_gain_se"] if v["summary"]["mean_gain_se"] is not None
                   else (v["seeds"][0]["gain_se"] or 0)) for v in vs]
    ax.bar(x, gains, yerr=errs, capsize=4, color=["tab:green" if v["kept"] else "tab:gray" for v in vs], alpha=0.85)
    for i, v in enumerate(vs):
        ax.text(i, gains[i], f"{gains[i]:+.1f}\n({len(v['seeds'])} seed{'s' if len(v['seeds']) > 1 else ''})",
                ha="center", va="bottom", fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(3, color="k", ls=":", lw=0.8, label="target +3")
    ax.set_ylabel("held-out pass@1 gain (points; SE across seeds, or the evaluation's for one seed)")
    ax.set_title("green: kept (gain > 0, pass@n not lower)", fontsize=9)
    ax.legend(fontsize=7)
    w = 0.2
    for j, (key, label, color) in enumerate((("mean_pass_at_n_before", "pass@n before", "tab:blue"),
                                             ("mean_pass_at_n_after", "pass@n after", "tab:orange"))):
        ax_n.bar([i + (j - 1.5) * w for i in x], [v["summary"].get(key) or 0 for v in vs], w, label=label,
                 color=color, alpha=0.85)
    for j, (key, label, color) in enumerate((("mean_mixed_before", "mixed before", "tab:purple"),
                                             ("mean_mixed_after", "mixed after", "tab:pink"))):
        ax_n.bar([i + (j + 0.5) * w for i in x], [v.get(key) or 0 for v in vs], w, label=label, color=color,
                 alpha=0.85)
    ax_n.set_ylabel("share of held-out prompts")
    ax_n.legend(fontsize=7, ncol=2)
    for a in (ax, ax_n):
        a.set_xticks(x, [v["name"] for v in vs], fontsize=8)
        a.grid(alpha=0.3, axis="y")
    fig.suptitle(f"GRPO from one SFT-2 model: {record['profile']} on {record['device']}", fontsize=10)
    save_figure(fig, png)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="the run_dir holding sft2/model and data/")
    ap.add_argument("--profile", default="gpu2-arms")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="base's seeds")
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                    help="base with these overrides (repeatable), e.g. --variant clip_higher grpo.clip_high=0.28")
    ap.add_argument("--variant-seeds", nargs="+", type=int, default=None, help="the variants' seeds (default --seeds)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="overrides for every run")
    ap.add_argument("--parallel", type=int, default=2, help="runs at once")
    ap.add_argument("--gpus", type=int, default=0, help="spread the runs round-robin over this many GPUs")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--report-only", action="store_true", help="rebuild the record from the run_dirs, run nothing")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)

    try:
        variants = named_overrides("--variant", args.variant, {"base"})
    except ValueError as e:
        ap.error(str(e))
    plan: list[tuple[str, list[str], list[int]]] = [("base", [], args.seeds)]
    plan += [(name, sets, args.variant_seeds or args.seeds) for name, sets in variants.items()]
    try:  # every run's settings checked before any work starts
        validate_settings(args.profile, [[*args.sets, *sets] for _, sets, _ in plan])
    except ValueError as e:
        ap.error(f"--variant/--set: {e}")
    root = args.root if args.root.is_absolute() else ROOT / args.root
    if not args.report_only and not args.dry_run and not (root / "sft2" / "model").is_dir():
        ap.error(f"{root / 'sft2' / 'model'} does not exist: run the stages up to sft2 first")

    record = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
              "profile": args.profile, "device": "-" if args.dry_run else device_name(), "versions": versions(),
              "root": str(root), "common_sets": args.sets}

    def save(*_):
        try:
            report(record, root, plan)
        except ValueError as e:
            record["error"] = str(e)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        plot(record, args.out.with_suffix(".png"))

    if not args.report_only:
        jobs = []
        # each run's torch thread pools get their share of the cores: left at one pool per core each, runs side by
        # side oversubscribe the CPU that launches their kernels and scores their answers
        threads = {} if "OMP_NUM_THREADS" in os.environ else \
            {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, args.parallel)))}
        for name, sets, seeds in plan:
            for seed in seeds:
                run = run_dir(root, name, seed)
                env = {"CUDA_VISIBLE_DEVICES": str(len(jobs) % args.gpus)} if args.gpus > 0 else {}
                env.update(threads)
                jobs.append((grpo_cmd(sys.executable, args.profile, run, seed, [*args.sets, *sets]),
                             run / "grpo.log", env))
        if args.dry_run:
            for cmd, _, env in jobs:
                print(" ".join([*(f"{k}={v}" for k, v in env.items()), *cmd[1:]]))
            return 0
        for cmd, log, _ in jobs:
            link_inputs(root, log.parent)
        rcs = run_many(jobs, args.parallel, on_done=save)
        failed = [{"run": str(log.parent), "exit": rc} for (_, log, _), rc in zip(jobs, rcs) if rc != 0]
        if failed:
            record["failed"] = failed
    save()
    if record.get("error"):
        print(f"grpo_variants: error: {record['error']}", file=sys.stderr)
        return 2
    for v in record["variants"]:
        s = v.get("summary")
        if not s:
            print(f"{v['name']:14s} no finished run")
            continue
        se = f" +- {100 * s['mean_gain_se']:.2f}" if s["mean_gain_se"] is not None else ""
        print(f"{v['name']:14s} {len(v['seeds'])} seed(s): pass@1 {s['mean_before']:.3f} -> {s['mean_after']:.3f} "
              f"(gain {100 * s['mean_gain']:+.2f}{se} points), pass@n {s.get('mean_pass_at_n_before')} -> "
              f"{s.get('mean_pass_at_n_after')}, mixed {v['mean_mixed_before']} -> {v['mean_mixed_after']}"
              f"{'  kept' if v['kept'] else ''}")
    return 1 if record.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
