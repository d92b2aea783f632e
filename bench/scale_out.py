"""How the training stages scale with GPUs on one node (issue 23): the same stages run through the Prefect flow
(`m1 pipeline`) once per worker count, and each run's own per-step history is read back.

For each N in --workers: `m1 pipeline --profile P --stages <stages> --set <stage>.num_workers=N` (Ray Train
workers, FSDP2 in the m1-3b profiles), then from <run_dir>/<stage>/history.jsonl the median over steps after the
first (allocation, compilation and warm-up) of tokens/s, step seconds and MFU (the loop's: 6N + attention FLOPs
per token against the GPU's bf16 peak), and the largest peak memory per GPU (mean over workers). Scaling
efficiency of N workers = tokens/s(N) / (tokens/s(N0) x N / N0), N0 the smallest count run. For each L:R in
--grpo: `--stages grpo` with L learner workers and R rollout actors, the medians of rollout and learner tokens/s
and of the step's rollout, weight-sync and learning seconds.

Simplifications: the runs share one run_dir, so curate and convert run once (Prefect cache) and each N trains
from the same converted model; the global batch is the profile's (strong scaling: each worker takes 1/N of it);
ten steps a stage in m1-3b-scale, so the medians are steady-state speed, not the cost of a whole run. The results are
written after every run, so a run that fails or runs out of time keeps the ones before it.

    python bench/scale_out.py --profile m1-3b-scale --workers 1 2 --grpo 1:1 --out docs/results/scale_out_2x.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from flow_runs import device_name, pipeline_cmd, versions

from components.figures import save_figure

GRPO_FIELDS = ("rollout_tokens_per_s", "learner_tokens_per_s", "rollout_seconds", "sync_seconds", "learn_seconds",
               "step_seconds")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 4) if values else None


def training_stats(history: Path) -> dict:
    """Steady-state speed of one training run from its per-step history (the first step left out)."""
    steps = _jsonl(history)
    if not steps:
        raise ValueError(f"{history}: no steps")
    timed = steps[1:] or steps
    memory = [s["peak_memory_gb"] for s in steps if s.get("peak_memory_gb") is not None]
    return {"steps": len(steps), "steps_timed": len(timed), "tokens_per_s": _median(timed, "tokens_per_s"),
            "step_seconds": _median(timed, "step_seconds"), "mfu": _median(timed, "mfu"),
            "peak_memory_gb": round(max(memory), 2) if memory else None}


def grpo_stats(metrics: Path) -> dict:
    """Steady-state GRPO step from its metrics log (held-out evaluations and the first step left out)."""
    steps = [r for r in _jsonl(metrics) if r.get("step", 0) >= 1 and "step_seconds" in r]
    if not steps:
        raise ValueError(f"{metrics}: no GRPO steps")
    timed = steps[1:] or steps
    return {"steps": len(steps), "steps_timed": len(timed), **{k: _median(timed, k) for k in GRPO_FIELDS}}


def with_efficiency(rows: list[dict]) -> list[dict]:
    """Each stage's rows with scaling efficiency against the stage's smallest worker count."""
    out = []
    for row in rows:
        base = min((r for r in rows if r["stage"] == row["stage"] and r.get("tokens_per_s")),
                   key=lambda r: r["workers"], default=None)
        eff = None
        if base is not None and row.get("tokens_per_s"):
            eff = round(row["tokens_per_s"] / (base["tokens_per_s"] * row["workers"] / base["workers"]), 4)
        out.append({**row, "scaling_efficiency": eff})
    return out


def plot(record: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for stage in dict.fromkeys(r["stage"] for r in record["training"]):
        rows = sorted((r for r in record["training"] if r["stage"] == stage and r.get("tokens_per_s")),
                      key=lambda r: r["workers"])
        if not rows:
            continue
        n = [r["workers"] for r in rows]
        line, = ax.plot(n, [r["tokens_per_s"] for r in rows], "o-", label=stage)
        ax.plot(n, [rows[0]["tokens_per_s"] * k / n[0] for k in n], ":", color=line.get_color(),
                label=f"{stage}, linear")
    ax.set_xticks(sorted({r["workers"] for r in record["training"]}))
    ax.set_xlabel("Ray Train workers (one GPU each on a GPU node)")
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"{record['profile']} on {record['device']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, png)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="m1-3b-scale")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--stages", nargs="+", default=["distill", "sft1"])
    ap.add_argument("--grpo", nargs="*", default=[], metavar="L:R",
                    help="learner workers:rollout actors, one GRPO run each")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="more m1 pipeline --set overrides")
    ap.add_argument("--out", default="docs/results/scale_out.json")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)

    from components.commands.pipeline import overrides_from, parse_assignment
    from components.config import load_config

    # the run_dir the flow runs will use: the profile's, with the same --set overrides parsed as m1 parses them
    config = load_config(args.profile, overrides=overrides_from([parse_assignment(s) for s in args.sets]) or None)
    run_dir = Path(config.run_dir)
    logs = run_dir / "scale_out"
    grpo_runs = []
    for spec in args.grpo:
        learners, _, rollouts = spec.partition(":")
        if not (learners.isdigit() and rollouts.isdigit() and int(learners) > 0):
            ap.error(f"--grpo {spec!r}: expected LEARNERS:ROLLOUTS, e.g. 1:1")
        grpo_runs.append((int(learners), int(rollouts)))
    runs = [(f"w{n}", args.stages, [f"{s}.num_workers={n}" for s in args.stages], n) for n in args.workers]
    runs += [(f"grpo{lr}-{ro}", ["grpo"], [f"grpo.learner_workers={lr}", f"grpo.rollout_workers={ro}"], (lr, ro))
             for lr, ro in grpo_runs]
    record = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
              "profile": args.profile, "device": device_name() if not args.dry_run else "-",
              "versions": versions(), "run_dir": str(run_dir), "training": [], "grpo": []}
    out = Path(args.out)
    for name, stages, sets, what in runs:
        cmd = pipeline_cmd(sys.executable, args.profile, stages, sets + args.sets, logs / f"{name}.json")
        if args.dry_run:
            print(" ".join(cmd))
            continue
        logs.mkdir(parents=True, exist_ok=True)
        print(f"[scale_out] {name}: {' '.join(cmd[2:])} (log {logs / name}.log)", flush=True)
        t0 = time.time()
        with open(logs / f"{name}.log", "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        seconds = round(time.time() - t0, 1)
        # what is left on the run_dir's disk after each run (the stages' models, and checkpoints unless the profile
        # turns them off: a 3B checkpoint is 39 GB)
        disk = {"disk_free_gb": round(shutil.disk_usage(run_dir).free / 2**30, 1)}
        if rc != 0:
            tail = (logs / f"{name}.log").read_text().splitlines()[-5:]
            print(f"[scale_out] {name} failed (exit {rc}); last lines:\n  " + "\n  ".join(tail), file=sys.stderr)
            record.setdefault("failed", []).append({"run": name, "exit": rc, "seconds": seconds, **disk})
        elif name.startswith("w"):
            for stage in stages:
                record["training"].append({"stage": stage, "workers": what, "flow_seconds": seconds, **disk,
                                           **training_stats(run_dir / stage / "history.jsonl")})
            record["training"] = with_efficiency(record["training"])
        else:
            record["grpo"].append({"learner_workers": what[0], "rollout_workers": what[1], "flow_seconds": seconds,
                                   **disk, **grpo_stats(run_dir / "grpo" / "metrics.jsonl")})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        if record["training"]:
            plot(record, out.with_suffix(".png"))
    if args.dry_run:
        return 0
    for r in record["training"]:
        print(f"{r['stage']:8s} {r['workers']} worker(s): {r['tokens_per_s']} tok/s, MFU {r['mfu']}, "
              f"peak {r['peak_memory_gb']} GB, efficiency {r['scaling_efficiency']}")
    for r in record["grpo"]:
        print(f"grpo {r['learner_workers']}:{r['rollout_workers']}: rollout {r['rollout_tokens_per_s']} tok/s, "
              f"sync {r['sync_seconds']} s, learn {r['learn_seconds']} s, step {r['step_seconds']} s")
    return 1 if record.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
