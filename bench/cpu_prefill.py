"""CPU prefill of the converted hybrid against its teacher, as the evaluate stage runs them: the embedded SmolLM2-135M
teacher in our engine with every layer attention, and the hybrid converted from it (params.yaml's attention layers),
each prefilling the same left-padded batch of prompts into a fresh inference cache (what generate does first).

    python bench/cpu_prefill.py --out docs/results/speed/cpu_prefill.json

--scan parallel times the hybrid with the parallel (chunked odd/even) scan the CPU used for inference before
scan.selective_scan_steps, for the comparison. Median of --repeats timed runs after one warm-up."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.config import load_config
from components.model import convert, scan
from components.model.generate import left_pad
from components.model.teacher import load_any_teacher


def prefill_seconds(model, prompts: list[list[int]], repeats: int) -> float:
    ids, mask = left_pad(prompts, 0, "cpu")
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            cache = model.new_cache(len(prompts), ids.shape[1] + 1)
            t0 = time.perf_counter()
            model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mean-len", type=int, default=90)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    lens = (a.mean_len + torch.randint(-a.mean_len // 3, a.mean_len // 3 + 1, (a.batch,), generator=g)).tolist()
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lens]
    teacher = load_any_teacher(a.teacher)
    layers = load_config().convert.attn_layers
    attention = convert(teacher, list(range(teacher.config.num_hidden_layers))).eval()
    hybrid = convert(teacher, layers).eval()
    del teacher
    rows = {"teacher (all attention)": prefill_seconds(attention, prompts, a.repeats),
            "hybrid, step-by-step scan": prefill_seconds(hybrid, prompts, a.repeats)}
    steps = scan.selective_scan_steps
    scan.selective_scan_steps = lambda *x: scan.selective_scan(*x, chunk=16)  # the CPU's inference path before
    try:
        rows["hybrid, parallel scan (before)"] = prefill_seconds(hybrid, prompts, a.repeats)
    finally:
        scan.selective_scan_steps = steps
    teacher_s = rows["teacher (all attention)"]
    out = {"command": " ".join(["python bench/cpu_prefill.py"] + [shlex.quote(x) for x in (argv or sys.argv[1:])]),
           "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": a.batch,
           "prompt_tokens": sum(lens), "max_len": max(lens), "attn_layers": layers,
           "seconds": {k: round(v, 3) for k, v in rows.items()},
           "ratio_to_teacher": {k: round(v / teacher_s, 2) for k, v in rows.items()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["seconds"]), json.dumps(out["ratio_to_teacher"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
