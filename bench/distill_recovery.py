"""How much of the teacher each distillation recipe recovers (issue 21): the same profile's distillation run
through the Prefect flow once per variant, each in its own run_dir, with the held-out perplexity and reverse KL
to the teacher read back from the distill stage.

Variants (--variants, any of):
  base            the profile's recipe without the align stage
  align           the align stage first (layer-wise MSE), then distill; with --equal-steps (default) the align
                  steps come out of distill's, so both variants take the same number of optimiser steps
  kl_layers       attention kept at the KL-guided layers (--kl-layers, --kl-json, or ranked here first with
                  bench/attn_layer_choice.py --method kl_guided on base's curated data), align off
  kl_layers+align both
  --custom NAME KEY=VALUE...   the base recipe with these overrides (e.g. kl_ce: distill.ce_weight=0.1)

Variants run in waves, at most --parallel flow runs at a time: base and as many others as fit beside it; the
ranking (on base's curated rows) beside the rest of the variants that need no KL-guided layers; the kl_layers pair. Then, with --downstream, the base variant and the best one (lowest held-out perplexity) go on through sft1 and sft2
and `m1 eval` scores both SFT-2 models on the profile's held-out sets (pass@1 with its SE).

Simplifications: one run per variant (no seeds), so a difference smaller than the run-to-run spread reads as a
difference; the teacher's perplexity is the one each run measures on its own held-out rows (the same rows: every
run curates the same sources with the same seed). Results are written after every run, so a run that fails or runs
out of time keeps the ones before it.

    python bench/distill_recovery.py --profile gpu2 --kl-guided --downstream --out docs/results/distill_recovery_gpu.json
    # on a node with 2 GPUs, two flow runs at a time on one Ray head, one GPU each:
    infra/offline/node-pipeline.sh bench gpu2-arms python3 bench/distill_recovery.py --profile gpu2-arms \
        --kl-guided --downstream --parallel 2 --out $OUT/distill_recovery_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from flow_runs import (
    device_name,
    named_overrides,
    pipeline_cmd,
    run_many,
    validate_settings,
    versions,
)

from components.figures import save_figure

VARIANTS = ("base", "align", "kl_layers", "kl_layers+align")
TARGET_RATIO = 1.10  # issue 21: the best variant's held-out perplexity within 10% of the teacher's


def variant_sets(name: str, distill_steps: int, align_steps: int, kl_layers: list[int] | None,
                 equal_steps: bool) -> list[str]:
    """The `--set` overrides that make variant `name` out of the profile."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    sets = []
    if "kl_layers" in name:
        if not kl_layers:
            raise ValueError(f"variant {name} needs the KL-guided layers (--kl-layers, --kl-json or --kl-guided)")
        sets.append(f"convert.attn_layers=[{','.join(str(i) for i in kl_layers)}]")
    if name.endswith("align"):
        if equal_steps and align_steps >= distill_steps:
            raise ValueError(f"--align-steps {align_steps} leaves no distill steps of {distill_steps}")
        sets += ["align.enabled=true", f"align.max_steps={align_steps}"]
        if equal_steps:
            sets.append(f"distill.max_steps={distill_steps - align_steps}")
    else:
        sets.append("align.enabled=false")
    return sets


def distill_result(summary: dict) -> dict:
    """The distill stage's held-out numbers (and align's, when it ran) from an `m1 pipeline --summary-json`."""
    rows = {r["stage"]: r for r in summary.get("stages", [])}
    if "distill" not in rows:
        raise ValueError("the run's summary has no distill stage")
    m = rows["distill"]["all_metrics"]
    student, teacher = m.get("heldout/ppl"), m.get("heldout/teacher_ppl")
    if student is None or teacher is None:
        raise ValueError("the distill stage recorded no held-out perplexity (is distill.heldout set?)")
    out = {"student_ppl": round(student, 4), "teacher_ppl": round(teacher, 4),
           "ppl_ratio": round(student / teacher, 4), "heldout_kl": _round(m.get("heldout/kl")),
           "heldout_kl_before": _round(m.get("heldout/kl_before")), "distill_steps": int(m.get("steps", 0)),
           "distill_seconds": round(rows["distill"]["seconds"], 1)}
    if m.get("heldout/ppl_content") is not None and m.get("heldout/teacher_ppl_content") is not None:
        # without the end-of-turn targets, which reverse KL barely teaches (docs/train.md)
        out.update({"student_ppl_content": round(m["heldout/ppl_content"], 4),
                    "teacher_ppl_content": round(m["heldout/teacher_ppl_content"], 4),
                    "ppl_ratio_content": round(m["heldout/ppl_content"] / m["heldout/teacher_ppl_content"], 4),
                    "ce_end_of_turn": _round(m.get("heldout/ce_end_of_turn")),
                    "teacher_ce_end_of_turn": _round(m.get("heldout/teacher_ce_end_of_turn"))})
    if "align" in rows:
        a = rows["align"]["all_metrics"]
        out["align_steps"] = int(a.get("steps", 0))
        out["align_seconds"] = round(rows["align"]["seconds"], 1)
        out["align_mse"] = {k.split("/")[-1]: round(v, 6) for k, v in sorted(a.items())
                            if k.startswith("align_mse/")}
    return out


def best_variant(variants: list[dict]) -> dict | None:
    """The variant that recovers most of the teacher: the lowest held-out reverse KL to it. Not the lowest
    perplexity: a recipe with a data CE term (kl_ce) fits the curated data's own distribution and can score below
    the teacher's perplexity while still further from the teacher than another (2 H200s, 2026-11-30: kl_ce ppl
    2.87 against the teacher's 3.99, KL 0.284 against kl_layers+align's 0.263)."""
    done = [v for v in variants if v.get("student_ppl") is not None and v.get("heldout_kl") is not None]
    return min(done, key=lambda v: v["heldout_kl"]) if done else None


def summarise(record: dict) -> bool:
    """Derives the record's best variant (by KL to the teacher) and lowest-perplexity one from its variants; True
    when that changed the record (a file written when the bench ranked by perplexity gets `reranked`, naming the
    rule its downstream runs were chosen by)."""
    before = json.dumps(record, sort_keys=True)
    if record.get("variants") and "ranked_by" not in record:
        record["reranked"] = {"best_then": record.get("best"), "downstream_chosen_by": "lowest student_ppl"}
    best, low = best_variant(record["variants"]), lowest_ppl(record["variants"])
    record["ranked_by"] = "lowest heldout_kl"
    record["best"] = best["name"] if best else None
    record["best_heldout_kl"] = best["heldout_kl"] if best else None
    record["best_ppl_ratio"] = best["ppl_ratio"] if best else None
    record["target_reached"] = bool(best and best["ppl_ratio"] <= TARGET_RATIO)
    record["lowest_ppl"] = low["name"] if low else None
    record["lowest_ppl_ratio"] = low["ppl_ratio"] if low else None
    return json.dumps(record, sort_keys=True) != before


def lowest_ppl(variants: list[dict]) -> dict | None:
    done = [v for v in variants if v.get("student_ppl") is not None]
    return min(done, key=lambda v: v["student_ppl"]) if done else None


def _round(v):
    return None if v is None else round(v, 4)


def _failed(record: dict, name: str, rc: int, log: Path) -> None:
    tail = log.read_text().splitlines()[-5:]
    print(f"[distill_recovery] {name} failed (exit {rc}); last lines:\n  " + "\n  ".join(tail), file=sys.stderr)
    record.setdefault("failed", []).append({"run": name, "exit": rc, "log": str(log)})


def plot(record: dict, png: Path) -> None:
    """Held-out perplexity (all targets and without end-of-turn) and reverse KL to the teacher, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [v for v in record["variants"] if v.get("student_ppl") is not None]
    if not rows:
        return
    names, x = [v["name"] for v in rows], range(len(rows))
    fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(11, 4.0))
    content = [v.get("student_ppl_content") for v in rows]
    w = 0.4 if any(c is not None for c in content) else 0.8
    ax.bar([i - w / 2 if w < 0.8 else i for i in x], [v["student_ppl"] for v in rows], w, color="tab:red",
           alpha=0.8, label="distilled hybrid, all targets")
    if w < 0.8:
        ax.bar([i + w / 2 for i in x], [c or 0 for c in content], w, color="tab:orange", alpha=0.8,
               label="without end-of-turn targets")
    teacher = rows[0]["teacher_ppl"]
    ax.axhline(teacher, color="tab:blue", label=f"teacher ({teacher:.2f})")
    ax.axhline(teacher * TARGET_RATIO, color="tab:blue", ls=":", label=f"teacher x {TARGET_RATIO}")
    for i, v in enumerate(rows):
        ax.text(i - w / 2 if w < 0.8 else i, v["student_ppl"], f"{v['student_ppl']:.2f}", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("held-out perplexity after distillation")
    ax.set_ylim(0, max(v["student_ppl"] for v in rows) * 1.35)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    kls = [v.get("heldout_kl") or 0 for v in rows]
    best = (best_variant(rows) or {}).get("name")
    ax_kl.bar(list(x), kls, color=["tab:green" if n == best else "tab:gray" for n in names], alpha=0.85)
    for i, k in enumerate(kls):
        ax_kl.text(i, k, f"{k:.3f}", ha="center", va="bottom", fontsize=7)
    ax_kl.set_xticks(list(x), names, fontsize=8)
    ax_kl.set_ylabel("held-out reverse KL to the teacher (nats/token)")
    ax_kl.set_title("lower = more of the teacher recovered (green: best)", fontsize=9)
    for a in (ax, ax_kl):
        a.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{record['profile']} on {record['device']}, {record['distill_steps']} steps each", fontsize=10)
    save_figure(fig, png)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="gpu2")
    ap.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                    help="default: base and align, and the kl_layers pair when KL-guided layers are given")
    ap.add_argument("--custom", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                    help="one more variant: the base recipe with these overrides, e.g. "
                         "--custom kl_ce distill.ce_weight=0.1 (repeatable)")
    ap.add_argument("--align-steps", type=int, default=None, help="default: the profile's align.max_steps")
    ap.add_argument("--no-equal-steps", dest="equal_steps", action="store_false",
                    help="align steps on top of distill's instead of out of them")
    ap.add_argument("--kl-layers", default=None, help="comma-separated attention layers of the kl_layers variants")
    ap.add_argument("--kl-json", default=None, help="a bench/attn_layer_choice.py output: its attn_layers")
    ap.add_argument("--kl-guided", action="store_true",
                    help="rank the layers here first (attn_layer_choice.py --method kl_guided on base's data)")
    ap.add_argument("--kl-distill-steps", type=int, default=50, help="--kl-guided: steps per candidate layer")
    ap.add_argument("--downstream", action="store_true",
                    help="base and the best variant through sft1 and sft2, then `m1 eval` on the held-out sets")
    ap.add_argument("--parallel", type=int, default=1,
                    help="flow runs at once (one GPU each with a 1-worker profile such as gpu2-arms; they must share "
                         "one Ray head: RAY_ADDRESS, e.g. infra/offline/node-pipeline.sh bench)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="more m1 pipeline --set overrides")
    ap.add_argument("--out", default="docs/results/distill_recovery.json")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--replot", metavar="RESULTS_JSON",
                    help="only re-derive the best variant of a results file (from its variants) and redraw its figure")
    args = ap.parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        record = json.loads(path.read_text())
        if summarise(record):
            path.write_text(json.dumps(record, indent=1) + "\n")
        plot(record, path.with_suffix(".png"))
        return 0

    from components.commands.pipeline import overrides_from, parse_assignment
    from components.config import load_config

    config = load_config(args.profile, overrides=overrides_from([parse_assignment(s) for s in args.sets]) or None)
    root = Path(f"{config.run_dir}-recovery")
    root = root if root.is_absolute() else ROOT / root  # the flow runs start in the repository root
    distill_steps = config.distill.max_steps
    align_steps = args.align_steps if args.align_steps is not None else config.align.max_steps
    kl_layers = [int(x) for x in args.kl_layers.split(",")] if args.kl_layers else None
    if args.kl_json:
        kl_layers = json.loads(Path(args.kl_json).read_text())["attn_layers"]
    variants = args.variants or (list(VARIANTS) if (kl_layers or args.kl_guided) else ["base", "align"])
    if any("kl_layers" in v for v in variants) and not (kl_layers or args.kl_guided):
        ap.error("the kl_layers variants need --kl-layers, --kl-json or --kl-guided")
    if args.kl_guided and "base" not in variants:
        ap.error("--kl-guided ranks layers on the base variant's curated data: keep base in --variants")
    if args.parallel > 1 and not os.environ.get("RAY_ADDRESS") and not args.dry_run:
        ap.error("--parallel > 1 needs one Ray head for all the flow runs (set RAY_ADDRESS, or start it through "
                 "infra/offline/node-pipeline.sh bench): each flow would otherwise start a Ray instance that sees "
                 "every GPU as its own")
    try:
        customs = {name: ["align.enabled=false", *sets]
                   for name, sets in named_overrides("--custom", args.custom, set(VARIANTS)).items()}
        for v in variants:  # every variant's overrides checked before any work starts
            variant_sets(v, distill_steps, align_steps, kl_layers or [0], args.equal_steps)
    except ValueError as e:
        ap.error(str(e))
    try:  # and each custom variant's config validated
        validate_settings(args.profile, [[*args.sets, *sets] for sets in customs.values()])
    except ValueError as e:  # a wrong key or value in --custom: the config's one line
        ap.error(f"--custom: {e}")
    order = ["base"] + [v for v in variants if v != "base"] if "base" in variants else list(variants)
    order += list(customs)

    record = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
              "profile": args.profile, "device": device_name() if not args.dry_run else "-",
              "versions": versions(), "run_root": str(root), "distill_steps": distill_steps,
              "align_steps": align_steps, "equal_steps": args.equal_steps,
              "profile_attn_layers": list(config.convert.attn_layers), "kl_layers": kl_layers,
              "target_ratio": TARGET_RATIO, "ranked_by": "lowest heldout_kl", "variants": []}
    out = Path(args.out)

    def save():
        summarise(record)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        plot(record, out.with_suffix(".png"))

    # Waves of flow runs, at most --parallel at a time. With --kl-guided the ranking needs base's curated rows, so
    # the first wave is base and as many others as fit beside it; the ranking then runs beside the rest of the
    # variants that need no KL-guided layers, and the kl_layers variants come last.
    plain = [v for v in order if "kl_layers" not in v or v in customs]
    kl_wave = [v for v in order if "kl_layers" in v and v not in customs]
    rank_needed = bool(kl_wave) and kl_layers is None
    split = max(1, args.parallel) if rank_needed else len(plain)
    waves = [(plain[:split], False), (plain[split:], rank_needed), (kl_wave, False)]
    k = len(config.convert.attn_layers)
    for wave, rank_here in waves:
        if not wave and not rank_here:
            continue
        if wave and "kl_layers" in wave[0] and wave[0] not in customs and kl_layers is None:
            break  # the ranking failed (recorded)
        rank_cmd = _rank_cmd(args, config, root / "base", k) if rank_here else None
        jobs = []
        for name in wave:
            run_dir = root / name.replace("+", "_")
            sets = [*args.sets, f"run_dir={run_dir}",
                    *(customs[name] if name in customs else
                      variant_sets(name, distill_steps, align_steps, kl_layers or ["KL_LAYERS"], args.equal_steps))]
            jobs.append((name, run_dir, sets, pipeline_cmd(sys.executable, args.profile, ["distill"], sets,
                                                           run_dir / "recovery_summary.json")))
        if args.dry_run:
            for cmd in ([rank_cmd] if rank_cmd else []) + [c for *_, c in jobs]:
                print(" ".join(cmd[1:] if cmd is rank_cmd else cmd))
            if rank_here:
                kl_layers = ["KL_LAYERS"]
            continue
        t0 = time.time()
        extra = [(rank_cmd, root / "base" / "kl_guided.log")] if rank_cmd else []
        rcs = run_many(extra + [(cmd, run_dir / "recovery.log") for _, run_dir, _, cmd in jobs], args.parallel)
        if rank_cmd:
            kl_layers = _ranked_layers(record, root / "base", rank_cmd, rcs.pop(0))
            if kl_layers is not None:
                record["kl_layers"] = kl_layers
        for (name, run_dir, sets, _), rc in zip(jobs, rcs):
            entry = {"name": name, "sets": sets, "run_dir": str(run_dir), "wave_seconds": round(time.time() - t0, 1)}
            if rc != 0:
                _failed(record, name, rc, run_dir / "recovery.log")
            else:
                entry.update(distill_result(json.loads((run_dir / "recovery_summary.json").read_text())))
                print(f"[distill_recovery] {name}: held-out ppl {entry['student_ppl']} (teacher "
                      f"{entry['teacher_ppl']}, x{entry['ppl_ratio']}), KL {entry['heldout_kl']}", flush=True)
            record["variants"].append(entry)
        save()
    if args.dry_run:
        return 0

    if args.downstream:
        best = best_variant(record["variants"])
        chosen = [v for v in record["variants"] if v.get("student_ppl") is not None
                  and (v["name"] == "base" or v is best)]
        record["downstream"] = downstream(args, chosen)

    save()
    for v in record["variants"]:
        if v.get("student_ppl") is not None:
            print(f"{v['name']:16s} ppl {v['student_ppl']:.3f} (teacher {v['teacher_ppl']:.3f}, x{v['ppl_ratio']:.3f}) "
                  f"KL {v['heldout_kl']}")
    print(f"best: {record['best']} x{record['best_ppl_ratio']} (target x{TARGET_RATIO}: "
          f"{'reached' if record['target_reached'] else 'not reached'})")
    return 1 if record.get("failed") else 0


def _rank_cmd(args, config, base_dir: Path, k: int) -> list[str]:
    data = base_dir / "data"
    return [sys.executable, str(Path("bench") / "attn_layer_choice.py"), "--method", "kl_guided",
            "--teacher", config.teacher.source, "--train-rows", str(data / config.distill.data),
            "--rows", str(data / config.distill.heldout), "--k", str(k),
            "--distill-steps", str(args.kl_distill_steps), "--out", str(base_dir / "kl_guided.json")]


def _ranked_layers(record: dict, base_dir: Path, cmd: list[str], rc: int) -> list[int] | None:
    """The KL-guided layers the ranking run wrote (attn_layer_choice.py --method kl_guided), or None if it failed."""
    if rc != 0:
        _failed(record, "kl_guided", rc, base_dir / "kl_guided.log")
        return None
    ranked = json.loads((base_dir / "kl_guided.json").read_text())
    record["kl_guided"] = {"json": str(base_dir / "kl_guided.json"), "seconds": ranked.get("seconds"),
                           "command": " ".join(cmd[1:])}
    return ranked["attn_layers"]


def downstream(args, variants: list[dict]) -> list[dict]:
    """Each variant's distilled model through sft1 and sft2 (same run_dir: distill comes from the cache), then
    `m1 eval` of its SFT-2 model on the profile's held-out sets; the variants side by side (--parallel)."""
    out = [{"name": v["name"]} for v in variants]
    dirs = [Path(v["run_dir"]) for v in variants]
    rcs = run_many([(pipeline_cmd(sys.executable, args.profile, ["sft2"], v["sets"], d / "sft_summary.json"),
                     d / "sft.log") for v, d in zip(variants, dirs)], args.parallel)
    evals = []
    for entry, d, rc in zip(out, dirs, rcs):
        if rc != 0:
            entry["failed"] = f"sft exit {rc}: {d / 'sft.log'}"
            continue
        stages = {r["stage"]: r["all_metrics"] for r in json.loads((d / "sft_summary.json").read_text())["stages"]}
        entry["sft1_heldout_ppl"] = _round(stages.get("sft1", {}).get("heldout/ppl"))
        evals.append((entry, d, [sys.executable, "-m", "components.cli", "eval", "--profile", args.profile,
                                 "--model", f"hybrid={d / 'sft2' / 'model'}", "--data-dir", str(d / "data"),
                                 "--out", str(d / "recovery_eval"), "--no-teacher", "--no-speed", "--no-time-budget"]))
    rcs = run_many([(cmd, d / "eval.log") for _, d, cmd in evals], args.parallel)
    for (entry, d, _), rc in zip(evals, rcs):
        if rc != 0:
            entry["failed"] = f"eval exit {rc}: {d / 'eval.log'}"
            continue
        m = json.loads((d / "recovery_eval" / "metrics.json").read_text())
        entry.update({"pass_at_1": _round(m.get("hybrid/all/pass_at_1")),
                      "pass_at_1_se": _round(m.get("hybrid/all/pass_at_1_se")), "problems": m.get("hybrid/all/problems")})
    return out


if __name__ == "__main__":
    sys.exit(main())
