"""`m1 pipeline` (the whole pipeline through Prefect, in-process: no server needed), `m1 pipeline --dry-run`,
`m1 stage NAME` (one stage without Prefect: what dvc.yaml runs) and `m1 promote` (registry gate)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def parse_assignment(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set wants KEY=VALUE (dotted key, YAML value), got {text!r}")
    return key.strip(), yaml.safe_load(value)


def overrides_from(pairs: list[tuple[str, object]] | None) -> dict:
    out: dict = {}
    for key, value in pairs or []:
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _metric(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--metric wants NAME=NUMBER, got {text!r}") from None


def register(sub) -> None:
    from components.cli import add_config_args

    p = sub.add_parser("pipeline", help="run the whole pipeline (Prefect flow m1-pipeline, cached and resumable)")
    add_config_args(p)
    p.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                   help="run these stages (and, from cache when unchanged, what they depend on)")
    p.add_argument("--set", dest="overrides", type=parse_assignment, action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set run_dir=runs/x (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and print the stages, their cache keys and the resources they ask for")
    p.add_argument("--dvc-yaml", action="store_true", help="print the dvc.yaml stages generated from the registry")
    p.add_argument("--summary-json", default=None, metavar="PATH",
                   help="also write the run's summary (flow run id, per-stage status, seconds, metrics) as JSON")
    p.set_defaults(func=_pipeline)

    s = sub.add_parser("stage", help="run one registered stage directly, without Prefect (what dvc.yaml runs)")
    s.add_argument("name", help="stage name (see m1 pipeline --dry-run)")
    add_config_args(s)
    s.add_argument("--set", dest="overrides", type=parse_assignment, action="append", metavar="KEY=VALUE")
    s.set_defaults(func=_stage)

    r = sub.add_parser("promote", help="register a model as candidate and/or gate the candidate to champion")
    add_config_args(r)
    r.add_argument("--set", dest="overrides", type=parse_assignment, action="append", metavar="KEY=VALUE")
    r.add_argument("--model-dir", default=None, help="register this hybrid model directory as a new candidate first")
    r.add_argument("--metric", type=_metric, action="append", default=[], metavar="NAME=VALUE",
                   help="evaluation metric of --model-dir (repeatable)")
    r.add_argument("--metrics-json", default=None, help="JSON file of {metric: value} for --model-dir")
    r.add_argument("--version", default=None, help="gate this registered version (default: the candidate alias)")
    r.set_defaults(func=_promote)


def _load(args):
    from components.config import load_config

    return load_config(args.profile, args.params, overrides_from(getattr(args, "overrides", None)))


def _pipeline(args) -> int:
    from components.pipeline.runner import quiet_env

    quiet_env()
    if args.dry_run:
        # A dry run never downloads: hub teachers it cannot read locally are sized from their known shapes.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = _load(args)  # a bad profile / key fails here, before Prefect starts
    if args.dvc_yaml:
        from components.pipeline.dvc_stages import dvc_yaml_text

        print(dvc_yaml_text(config), end="")
        return 0
    from components.pipeline.runner import preflight, selected_stages

    stages = selected_stages(config, args.stages)
    preflight(config, stages)
    if args.dry_run:
        from components.pipeline.dryrun import dry_run

        print(dry_run(config, stages))
        return 0
    from components.pipeline.mlflow_runs import newest_checkpoint_step
    from components.pipeline.prefect_local import (
        start_ephemeral_server,
        stop_ephemeral_server,
    )
    from flows.m1_pipeline import m1_pipeline

    t0 = time.time()
    try:
        try:
            # started here, in its own session: the terminal's Ctrl-C must not kill the server the interrupted
            # run reports its end to (prefect_local)
            start_ephemeral_server()
            summary = m1_pipeline(profile=args.profile, params=args.params, stages=args.stages,
                                  overrides=overrides_from(args.overrides) or None)
        finally:
            stop_ephemeral_server()
    except KeyboardInterrupt as e:
        # one line, printed last (after the server's own log lines); the flow ended the runs as Crashed/KILLED
        stage = getattr(e, "m1_stage", None)
        line = f"m1: interrupted at {stage}" if stage else "m1: interrupted"
        step = newest_checkpoint_step(config, stage) if stage else None
        if step is not None:
            line += f" (checkpoint step {step} kept)"
        print(line, file=sys.stderr, flush=True)
        return 130
    print()
    print(f"m1 pipeline, profile {summary['profile']}, run_dir {summary['run_dir']}: "
          f"{time.time() - t0:.1f} s (flow {summary['seconds']:.1f} s)")
    print(summary["table"])
    if summary["mlflow"]["link"]:
        print(f"\nMLflow parent run: {summary['mlflow']['parent_run_id']}  ({summary['mlflow']['link']})")
    print("\n" + "\n".join(summary["ui"]))
    if args.summary_json:
        out = Path(args.summary_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**summary, "wall_seconds": round(time.time() - t0, 2),
                                   "overrides": overrides_from(args.overrides)}, indent=1, default=str))
    return 0


def _stage(args) -> int:
    from components.pipeline.keys import extract_metrics, hash_outputs
    from components.pipeline.runner import preflight, quiet_env
    from components.pipeline.stages import get_stage
    from components.pipeline.storage import s3_environment
    from components.tracking import Tracker, standalone_run

    quiet_env()
    config = _load(args)
    stage = get_stage(args.name, config)
    preflight(config, [stage])
    t0 = time.time()
    with s3_environment(config), standalone_run(config.tracking, stage.name,
                                                tags={"m1.stage": stage.name, "m1.profile": config.profile}):
        inputs = stage.standalone_inputs(config) if stage.standalone_inputs else None
        outputs = stage.function()(config, inputs, **stage.kwargs)
        metrics = extract_metrics(outputs)
        Tracker().log_metrics(metrics)
    hashes = hash_outputs(stage, outputs)
    if stage.dvc_outs and not stage.dvc_metrics:  # the metrics file dvc.yaml names for this stage
        path = Path(config.run_dir) / "metrics" / f"{stage.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    print(f"{stage.name}: {time.time() - t0:.1f} s")
    for name, h in hashes.items():
        print(f"  {name}: {getattr(outputs, name)}  (md5 {h})")
    return 0


def _promote(args) -> int:
    from components.errors import M1Error
    from components.pipeline import promotion
    from components.pipeline.runner import quiet_env

    quiet_env()
    config = _load(args)
    metrics = dict(args.metric)
    if args.metrics_json:
        try:
            metrics.update({k: float(v) for k, v in json.loads(Path(args.metrics_json).read_text()).items()})
        except (OSError, ValueError, AttributeError) as e:
            raise M1Error(f"cannot read metrics from {args.metrics_json}: {e}") from None
    if args.model_dir:
        if args.version:
            raise M1Error("give either --model-dir (register a new candidate) or --version, not both")
        out = promotion.run(config, {"model_dir": args.model_dir, "metrics": metrics})
        champ = config.pipeline.promotion.champion_alias
        stays = f"{champ} stays v{out.champion_version}" if out.champion_version else f"no {champ} yet"
        verdict = f"promoted to {champ}" if out.promoted else stays
        print(f"registered {out.model_uri} as {config.pipeline.promotion.candidate_alias}; {verdict}: {out.decision}")
        return 0
    if metrics:
        raise M1Error("--metric/--metrics-json describe a new model: pass --model-dir too")
    d = promotion.promote(config, args.version)
    name, champ = promotion.model_name(config), config.pipeline.promotion.champion_alias
    print(f"{name} v{d.version}: {'promoted to ' + champ if d.promoted else 'not promoted'}: {d.reason}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from components.cli import main

    sys.exit(main(["pipeline", *sys.argv[1:]]))
