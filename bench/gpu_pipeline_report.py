"""The record of one pipeline run on a GPU node, for docs/results: machine and versions, the Prefect flow run,
and per stage its status, seconds, key metrics and throughput (training tokens/s from each stage's
history.jsonl; GRPO rollout tokens/s, weight-sync seconds and their share of the step from its metrics.jsonl).

    python bench/gpu_pipeline_report.py --profile gpu2 --out docs/results/gpu_pipeline_2x.json
        [--summary runs/gpu2/pipeline_summary.json] [--cached-summary runs/gpu2/pipeline_summary_cached.json]

Reads what `m1 pipeline --summary-json` and the stages wrote under the profile's run_dir; runs no stage."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.config import load_config

TRAIN = ("distill", "sft1", "sft2")


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _median(rows: list[dict], key: str, skip_first: int = 1) -> float | None:
    vals = [r[key] for r in rows[skip_first:] if isinstance(r.get(key), (int, float))] or \
        [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return round(statistics.median(vals), 4) if vals else None


def throughput(run_dir: Path, stage: str) -> dict:
    """Medians over steps (the first step, which compiles and warms up, left out when there are others)."""
    if stage.removeprefix("transformer_") in TRAIN:  # the transformer arm's stages train like the hybrid's
        hist = _jsonl(run_dir / stage / "history.jsonl")
        return {"steps_logged": len(hist), "tokens_per_s": _median(hist, "tokens_per_s"),
                "step_seconds": _median(hist, "step_seconds"), "mfu": _median(hist, "mfu")}
    if stage in ("grpo", "transformer_grpo"):
        steps = [r for r in _jsonl(run_dir / stage / "metrics.jsonl") if "step_seconds" in r]
        return {"steps_logged": len(steps), "rollout_tokens_per_s": _median(steps, "rollout_tokens_per_s"),
                "learner_tokens_per_s": _median(steps, "learner_tokens_per_s"),
                "sync_seconds": _median(steps, "sync_seconds"), "step_seconds": _median(steps, "step_seconds"),
                "rollout_seconds": _median(steps, "rollout_seconds"), "sync_share": _median(steps, "sync_share")}
    return {}


def machine() -> dict:
    import importlib.metadata as md

    out: dict = {}
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda
        out["gpus"] = torch.cuda.device_count()
        out["device"] = torch.cuda.get_device_name(0) if out["gpus"] else "cpu"
    except ImportError:
        pass
    for dist in ("ray", "prefect", "mlflow", "transformers", "mamba-ssm", "causal-conv1d"):
        try:
            out[dist.replace("-", "_")] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist.replace("-", "_")] = None
    return out


def stage_rows(summary: dict, run_dir: Path) -> list[dict]:
    rows = []
    for r in summary.get("stages", []):
        rows.append({"stage": r["stage"], "status": "cached" if r.get("cached") else "completed",
                     "seconds": round(r["seconds"], 2), "key_metrics": r.get("metrics"),
                     "metrics": {k: v for k, v in sorted(r.get("all_metrics", {}).items())},
                     "throughput": throughput(run_dir, r["stage"]), "mlflow_run_id": r.get("mlflow_run_id")})
    return rows


def report(profile: str, summary_path: Path, cached_path: Path | None) -> dict:
    summary = json.loads(summary_path.read_text())
    config = load_config(profile, overrides=summary.get("overrides") or None)
    run_dir = Path(config.run_dir)
    # `node-pipeline.sh branches` leaves one summary per branch flow run beside the whole flow's
    branches = {p.stem.removeprefix("branch-"): json.loads(p.read_text())
                for p in sorted(run_dir.glob("branch-*.json"))}
    mode = "branches" if branches else "start"
    rec = {"profile": profile, **machine(), "command": f"infra/offline/node-pipeline.sh {mode} {profile}",
           "prefect_flow_run": summary.get("flow_run_id"), "flow_seconds": summary.get("seconds"),
           "mlflow": summary.get("mlflow"), "stages": stage_rows(summary, run_dir), "table": summary.get("table"),
           "layout": {"distill/sft1/sft2": f"Ray Train TorchTrainer, {config.distill.num_workers} GPU workers "
                                           f"({config.distill.strategy}, NCCL)",
                      "grpo": f"learner: {config.grpo.learner_workers} Ray Train GPU worker; rollout: "
                              f"{config.grpo.rollout_workers} Ray actor(s) with {dict(config.grpo.rollout_resources)} "
                              f"(CUDA-graph decode); weights through Ray's object store each step"}}
    if branches:  # the stages each branch ran (the whole flow then found them cached)
        rec["branches"] = {t: {"prefect_flow_run": b.get("flow_run_id"), "flow_seconds": b.get("seconds"),
                               "mlflow": b.get("mlflow"), "stages": stage_rows(b, run_dir), "table": b.get("table")}
                           for t, b in branches.items()}
    if cached_path and cached_path.is_file():
        cached = json.loads(cached_path.read_text())
        rec["second_run"] = {"prefect_flow_run": cached.get("flow_run_id"), "flow_seconds": cached.get("seconds"),
                             "stages": [{"stage": r["stage"], "cached": bool(r.get("cached")),
                                         "seconds": round(r["seconds"], 2)} for r in cached.get("stages", [])]}
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--summary", default=None, help="default: <run_dir>/pipeline_summary.json")
    ap.add_argument("--cached-summary", default=None, help="summary of a second run (from cache), if any")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    run_dir = Path(load_config(args.profile).run_dir)
    summary = Path(args.summary) if args.summary else run_dir / "pipeline_summary.json"
    rec = report(args.profile, summary, Path(args.cached_summary) if args.cached_summary else None)
    Path(args.out).write_text(json.dumps(rec, indent=1, default=str) + "\n")
    print(rec["table"] or "")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
