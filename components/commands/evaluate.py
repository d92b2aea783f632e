"""`m1 eval` (score models on math benchmarks, time-budget analysis, small speed run) and `m1 bench` (the
generation-speed grid). Both open an MLflow run unless the pipeline handed one down (MLFLOW_RUN_ID)."""
from __future__ import annotations

import time
from pathlib import Path


def register(sub) -> None:
    from components.cli import add_config_args
    from components.evaluate import speed_cli

    p = sub.add_parser("eval", help="score models on math benchmarks (pass@1, pass@k, maj@k), time budget, speed")
    add_config_args(p)
    p.add_argument("--model", action="append", default=None, metavar="[NAME=]DIR",
                   help="a saved hybrid directory (or any teacher source) to score; repeatable. "
                        "Default: the pipeline's latest hybrid under run_dir")
    p.add_argument("--teacher", default=None, help="teacher source to score too (default: teacher.source)")
    p.add_argument("--no-teacher", action="store_true", help="do not score the teacher")
    p.add_argument("--data-dir", default=None, help="curate output holding eval/*.jsonl (default <run_dir>/data)")
    p.add_argument("--out", default=None, help="output directory (default <run_dir>/eval)")
    p.add_argument("--max-problems", type=int, default=None, help="override evaluate.max_problems")
    p.add_argument("--n-samples", type=int, default=None, help="override evaluate.n_samples (ks above it dropped)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override evaluate.max_new_tokens")
    p.add_argument("--no-speed", action="store_true", help="skip the speed run")
    p.add_argument("--no-time-budget", action="store_true", help="skip the time-budget analysis")
    p.set_defaults(func=_eval)

    b = sub.add_parser("bench", help="generation-speed benchmark: hybrid vs same-shape attention vs HF static cache")
    add_config_args(b)
    speed_cli.add_arguments(b)
    b.set_defaults(func=_bench)


def _eval(args) -> int:
    from components.config import load_config
    from components.evaluate.run import default_models, run
    from components.tracking import standalone_run

    over: dict = {}
    ev: dict = {}
    if args.max_problems is not None:
        ev["max_problems"] = args.max_problems
    if args.max_new_tokens is not None:
        ev["max_new_tokens"] = args.max_new_tokens
    if args.n_samples is not None:
        ev["n_samples"] = args.n_samples
    if args.no_speed:
        ev["speed"] = {"enabled": False}
    if args.no_time_budget:
        ev["time_budget"] = {"enabled": False}
    if args.no_teacher:
        ev["include_teacher"] = False
    if ev:
        over["evaluate"] = ev
    if args.n_samples is not None:
        # keep only the ks the new sample count allows, so an override never trips the ks <= n check
        base = load_config(args.profile, args.params)
        ev["ks"] = [k for k in base.evaluate.ks if k <= args.n_samples] or [1]
    cfg = load_config(args.profile, args.params, over)
    models = default_models(cfg, args.model, args.teacher)
    inputs = {"models": models, "data_dir": args.data_dir or str(Path(cfg.run_dir) / "data")}
    if args.out:
        inputs["out_dir"] = args.out
    t0 = time.time()
    with standalone_run(cfg.tracking, "evaluate", tags={"stage": "evaluate", "profile": cfg.profile}):
        out = run(cfg, inputs)
    print(out.results_md.read_text().split("\n\npass@1 =")[0])
    if any(out.excluded.values()):
        print("excluded rows (no parseable reference answer or a bad row): "
              + ", ".join(f"{b} {n}" for b, n in out.excluded.items() if n) + f"  (see {out.excluded_jsonl})")
    for name, m in out.models.items():
        tp = m.get("throughput", {}).get("tokens_per_s")
        print(f"{name}: {m['kind']} {m['source']}  load {m['load_s']:.1f}s  generate {m['generate_s']:.1f}s"
              + (f"  throughput {tp:.1f} tok/s" if tp else ""))
    print(f"outputs in {out.eval_dir} ({time.time() - t0:.0f} s)")
    return 0


def _bench(args) -> int:
    from components.config import load_config
    from components.evaluate import speed_cli, speed_report
    from components.tracking import Tracker, standalone_run

    cfg = load_config(args.profile, args.params)
    command = "m1 bench " + " ".join(_argv_after("bench"))
    with standalone_run(cfg.tracking, "bench", tags={"stage": "bench", "shape": args.shape}):
        rows, meta = speed_cli.run_from_args(args, command)
        out = Path(args.out or Path(cfg.run_dir) / "bench" / f"speed-{args.shape}-{meta['device'].replace(':', '')}")
        paths = speed_report.write_outputs(rows, out, meta)
        tracker = Tracker()
        tracker.log_params({"bench": {k: v for k, v in vars(args).items() if k != "func"}})
        tracker.log_metrics({f"speed/{r['engine']}/b{r['batch']}_d{r['decode_len']}/tokens_per_s": r["tokens_per_s"]
                             for r in rows if r.get("status") == "ok"})
        for p in paths.values():
            if p is not None:
                tracker.log_artifact(p, "bench")
    print(speed_report.format_table(rows))
    for line in speed_report.speedup_lines(rows):
        print(line)
    print(f"wrote {', '.join(str(p) for p in paths.values() if p)}")
    return 0


def _argv_after(word: str) -> list[str]:
    import sys

    argv = sys.argv[1:]
    return argv[argv.index(word) + 1:] if word in argv else argv
