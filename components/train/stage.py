"""Stage entry point for distill / sft1 / sft2: `run(config, inputs, stage)`.

inputs: model_dir (the model to start from: the converted hybrid for distill, the previous stage's model after)
and data_dir (the curate stage's output). Runs in-process when `num_workers` is 0, else as a Ray Train
TorchTrainer with that many workers (gloo on CPU, NCCL on GPU) on the cluster `ensure_ray` joins or starts.
Started again after a failure, it resumes from the latest checkpoint whose fingerprint (stage settings, code,
library versions, input model, data manifest) matches; checkpoints of other settings are ignored."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from components.errors import M1Error
from components.train import teacher_topk
from components.train.config import TrainConfig
from components.train.data import PackedRows, rows_for_step
from components.train.harness import (  # noqa: F401 (fingerprint: public API)
    LoopContext,
    RunContext,
    RunOutputs,
    fingerprint,
)
from components.train.loop import train_loop

STAGES = ("align", "distill", "sft1", "sft2")
TrainOutputs = RunOutputs


def run(config, inputs: dict, stage: str, section: str | None = None) -> RunOutputs:
    """stage: the run's name (its folder <run_dir>/<stage>, its checkpoints and fingerprint); section: the config
    section it trains with (default: the stage's own; the transformer arm's transformer_sft1 trains with sft1)."""
    section = section or stage
    if section not in STAGES:
        raise M1Error(f"unknown training stage {section!r}; choose one of {', '.join(STAGES)}")
    train: TrainConfig = getattr(config, section)
    data_root = Path(inputs["data_dir"])
    run_ctx = RunContext.build(config, stage, train, inputs, train.data,
                               heldout_dir=str((data_root / train.heldout).resolve()) if train.heldout else None,
                               teacher_source=config.teacher.source)
    topk = _teacher_topk(config, train, stage, run_ctx.context, run_ctx.out_dir, run_ctx.use_gpu)
    if not run_ctx.has_checkpoint():
        (run_ctx.out_dir / "history.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh loss curve
    metrics = run_ctx.launch(train_loop, train.num_workers, train.keep_checkpoints, "train_metrics.json")
    return run_ctx.outputs({**metrics, **topk})


def _teacher_topk(config, train: TrainConfig, stage: str, context: LoopContext, out_dir: Path,
                  use_gpu: bool) -> dict:
    """With teacher_topk > 0: precompute (or reuse) the teacher's top-k for every row this run will visit, in
    this process before any worker starts, and point the loop at the store."""
    if not train.teacher_topk:
        return {}
    data_dir = Path(context.data_dir)
    data = PackedRows(data_dir)
    rows = np.concatenate([rows_for_step(s, train.global_batch_size, len(data), config.seed)
                           for s in range(train.max_steps)])
    store = Path(train.teacher_topk_dir) if train.teacher_topk_dir else \
        out_dir / "teacher_topk" / teacher_topk.store_key(config.teacher.source, data_dir, train.teacher_topk)
    device = torch.device("cuda" if use_gpu else "cpu")
    info = teacher_topk.precompute(config.teacher.source, data, data_dir, rows, train.teacher_topk, store, device,
                                   torch.bfloat16 if use_gpu else torch.float32)
    print(f"[{stage}] teacher top-{train.teacher_topk}: {info['rows']} rows in {store} "
          f"({info['computed']} computed now)", flush=True)
    context.teacher_topk_dir = str(store.resolve())
    return {"teacher_topk/rows": info["rows"], "teacher_topk/computed": info["computed"]}
