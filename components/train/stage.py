"""Stage entry point for distill / sft1 / sft2: `run(config, inputs, stage)`.

inputs: model_dir (the model to start from: the converted hybrid for distill, the previous stage's model after)
and data_dir (the curate stage's output). Runs in-process when `num_workers` is 0, else as a Ray Train
TorchTrainer with that many workers (gloo on CPU, NCCL on GPU) on the cluster `ensure_ray` joins or starts.
Started again after a failure, it resumes from the latest checkpoint whose fingerprint (stage settings, code,
library versions, input model, data manifest) matches; checkpoints of other settings are ignored."""
from __future__ import annotations

from pathlib import Path

from components.errors import M1Error
from components.train.harness import RunContext, RunOutputs, fingerprint  # noqa: F401 (fingerprint: public API)

STAGES = ("distill", "sft1", "sft2")
TrainOutputs = RunOutputs


def run(config, inputs: dict, stage: str) -> RunOutputs:
    from components.train.loop import train_loop

    if stage not in STAGES:
        raise M1Error(f"unknown training stage {stage!r}; choose one of {', '.join(STAGES)}")
    tc = getattr(config, stage)
    data_root = Path(inputs["data_dir"])
    run_ctx = RunContext.build(config, stage, tc, inputs, "train", tc.data,
                               heldout_dir=str((data_root / tc.heldout).resolve()) if tc.heldout else None,
                               teacher_source=config.teacher.source)
    topk = _teacher_topk(config, tc, stage, run_ctx.lc, run_ctx.out_dir, run_ctx.use_gpu)
    if not run_ctx.has_checkpoint():
        (run_ctx.out_dir / "history.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh loss curve
    metrics = run_ctx.launch(train_loop, tc.num_workers, tc.keep_checkpoints, "train_metrics.json")
    return run_ctx.outputs({**metrics, **topk})


def _teacher_topk(config, tc, stage: str, lc: dict, out_dir: Path, use_gpu: bool) -> dict:
    """With teacher_topk > 0: precompute (or reuse) the teacher's top-k for every row this run will visit, in
    this process before any worker starts, and point the loop at the store."""
    if not tc.teacher_topk:
        return {}
    import numpy as np
    import torch

    from components.train import teacher_topk as tk
    from components.train.data import PackedRows, rows_for_step

    data_dir = Path(lc["data_dir"])
    data = PackedRows(data_dir)
    rows = np.concatenate([rows_for_step(s, tc.global_batch_size, len(data), config.seed) for s in range(tc.max_steps)])
    store = Path(tc.teacher_topk_dir) if tc.teacher_topk_dir else \
        out_dir / "teacher_topk" / tk.store_key(config.teacher.source, data_dir, tc.teacher_topk)
    device = torch.device("cuda" if use_gpu else "cpu")
    info = tk.precompute(config.teacher.source, data, data_dir, rows, tc.teacher_topk, store, device,
                         torch.bfloat16 if use_gpu else torch.float32)
    print(f"[{stage}] teacher top-{tc.teacher_topk}: {info['rows']} rows in {store} ({info['computed']} computed now)",
          flush=True)
    lc["teacher_topk_dir"] = str(store.resolve())
    return {"teacher_topk/rows": info["rows"], "teacher_topk/computed": info["computed"]}
