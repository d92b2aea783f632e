"""Training throughput of a finished pipeline run, per stage: tokens/s and MFU, written with the command that made them.

Reads <run_dir>/<stage>/history.jsonl (the trainer's per-step log) for distill, sft1 and sft2. MFU on a CPU has no
vendor peak to divide by, so the peak is measured here: the best of several large fp32 GEMMs on all cores
(`--peak-tflops` overrides, e.g. 989 for an H100 in bf16). FLOPs per token are the trainer's own (6N plus the
attention scores); the teacher's forward during distillation (2N_teacher more per token) is not counted, so the
distill row understates the work done. The first step of each stage (allocations, warm caches) is left out.

    python bench/train_throughput.py --run-dir runs/default --out docs/results/train/train_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gemm_peak_tflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e12)
    return best


def stage_row(run_dir: Path, stage: str, peak: float) -> dict | None:
    from components.model import HybridForCausalLM
    from components.train.loop import flops_per_token

    hist = run_dir / stage / "history.jsonl"
    if not hist.is_file():
        return None
    steps = [json.loads(line) for line in hist.read_text().splitlines() if line.strip()]
    timed = steps[1:] or steps
    model = HybridForCausalLM.from_pretrained(run_dir / stage / "model")
    summary_file = run_dir / stage / "train_metrics.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    seq_len = _seq_len(run_dir, stage)
    fpt = flops_per_token(model, seq_len)
    tps = statistics.median(s["tokens_per_s"] for s in timed)
    return {"stage": stage, "steps_timed": len(timed), "seq_len": seq_len, "tokens_per_s": round(tps, 1),
            "step_seconds": round(statistics.median(s["step_seconds"] for s in timed), 2),
            "model_tflops": round(tps * fpt / 1e12, 4), "mfu": round(tps * fpt / (peak * 1e12), 4),
            "params": sum(p.numel() for p in model.parameters()), "final_loss": summary.get("loss")}


def _seq_len(run_dir: Path, stage: str) -> int:
    import pyarrow.parquet as pq

    split = {"distill": "sft1", "sft1": "sft1", "sft2": "sft2"}[stage]
    shard = min((run_dir / "data" / split).glob("*.parquet"))
    return len(pq.read_table(shard, columns=["input_ids"]).column("input_ids")[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/default")
    ap.add_argument("--out", default="docs/results/train/train_cpu.json")
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    peak = args.peak_tflops or gemm_peak_tflops()
    rows = [r for s in ("distill", "sft1", "sft2") if (r := stage_row(Path(args.run_dir), s, peak))]
    if not rows:
        print(f"no training history under {args.run_dir}: run the pipeline first", file=sys.stderr)
        return 2
    out = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "threads": torch.get_num_threads(), "peak_tflops": round(peak, 4),
           "peak_source": "given" if args.peak_tflops else "measured fp32 GEMM 2048^3", "stages": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"peak {peak:.3f} TFLOP/s ({out['peak_source']})")
    for r in rows:
        print(f"{r['stage']:8s} {r['tokens_per_s']:10.1f} tok/s  {r['model_tflops']:.4f} TFLOP/s  MFU {100 * r['mfu']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
