"""Stage entry point for GRPO: `run(config, inputs)` with inputs model_dir (the SFT-2 model) and data_dir.
In-process learner when `learner_workers` is 0, else a Ray Train TorchTrainer of that many workers whose rank 0
drives the rollout actors. Resumes from the latest matching checkpoint like the training stages."""
from __future__ import annotations

from components.train.harness import RunContext, RunOutputs

GRPOOutputs = RunOutputs


def run(config, inputs: dict) -> RunOutputs:
    from components.grpo.loop import grpo_loop

    gc = config.grpo
    run_ctx = RunContext.build(config, "grpo", gc, inputs, "grpo", gc.data,
                               libraries=("torch", "transformers", "math-verify"))
    if gc.rollout_workers and not gc.learner_workers:
        from components.ray_utils import ensure_ray

        ensure_ray()  # rollout actors beside an in-process learner
    metrics = run_ctx.launch(grpo_loop, gc.learner_workers, gc.keep_checkpoints, "grpo_metrics.json")
    return run_ctx.outputs(metrics)
