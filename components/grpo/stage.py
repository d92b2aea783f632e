"""Stage entry point for GRPO: `run(config, inputs, stage)` with inputs model_dir (the SFT-2 model) and data_dir.
In-process learner when `learner_workers` is 0, else a Ray Train TorchTrainer of that many workers whose rank 0
drives the rollout actors. Resumes from the latest matching checkpoint like the training stages."""
from __future__ import annotations

from components.grpo.config import GRPOConfig
from components.grpo.loop import grpo_loop
from components.ray_utils import ensure_ray
from components.train.harness import RunContext, RunOutputs

GRPOOutputs = RunOutputs


def run(config, inputs: dict, stage: str = "grpo") -> RunOutputs:
    """stage: the run's name (its folder, checkpoints and fingerprint): grpo, or the transformer arm's
    transformer_grpo, both with config.grpo."""
    grpo: GRPOConfig = config.grpo
    run_ctx = RunContext.build(config, stage, grpo, inputs, grpo.data,
                               libraries=("torch", "transformers", "math-verify"), loop_module=grpo_loop.__module__)
    if grpo.rollout_workers and not grpo.learner_workers:
        ensure_ray()  # rollout actors beside an in-process learner
    metrics = run_ctx.launch(grpo_loop, grpo.learner_workers, grpo.keep_checkpoints, "grpo_metrics.json")
    return run_ctx.outputs(metrics)
