"""Stage entry point for GRPO: `run(config, inputs)` with inputs model_dir (the SFT-2 model) and data_dir.
In-process learner when `learner_workers` is 0, else a Ray Train TorchTrainer of that many workers whose rank 0
drives the rollout actors. Resumes from the latest matching checkpoint like the training stages."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from components.errors import M1Error
from components.train.stage import fingerprint


@dataclass
class GRPOOutputs:
    model_dir: str
    checkpoint_root: str
    metrics: dict[str, float] = field(default_factory=dict)


def run(config, inputs: dict) -> GRPOOutputs:
    import torch

    gc = config.grpo
    model_dir, data_root = Path(inputs["model_dir"]), Path(inputs["data_dir"])
    if not (model_dir / "config.json").is_file():
        raise M1Error(f"grpo: input model directory {model_dir} has no config.json")
    out_dir = Path(config.run_dir) / "grpo"
    out_dir.mkdir(parents=True, exist_ok=True)
    root = gc.checkpoint_storage or str((out_dir / "checkpoints").resolve())
    use_gpu = gc.use_gpu == "yes" or (gc.use_gpu == "auto" and torch.cuda.is_available())
    g = gc.model_dump(mode="json")
    lc = {"stage": "grpo", "grpo": g, "model_dir": str(model_dir.resolve()),
          "data_dir": str((data_root / gc.data).resolve()), "out_dir": str(out_dir.resolve()), "checkpoint_root": root,
          "fingerprint": fingerprint("grpo", g, model_dir, data_root, config.seed, config.teacher.source,
                                     libraries=("torch", "transformers", "math-verify")),
          "seed": config.seed, "use_ray": gc.learner_workers > 0, "use_gpu": use_gpu,
          "mlflow_run_id": os.environ.get("MLFLOW_RUN_ID"), "mlflow_uri": os.environ.get("MLFLOW_TRACKING_URI")}
    if (gc.rollout_workers or gc.learner_workers):
        from components.ray_utils import ensure_ray

        ensure_ray()  # RAY_ADDRESS (set from pipeline.ray_address by the pipeline) or a local cluster
    if gc.learner_workers == 0:
        from components.grpo.loop import grpo_loop

        metrics = grpo_loop(lc)
    else:
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        from components.grpo.loop import grpo_loop
        from components.train import checkpoint as ck

        fs, path = ck.filesystem(root)
        storage, name = path.rsplit("/", 1)
        latest = ck.latest_checkpoint(root, lc["fingerprint"])
        resume = ray.train.Checkpoint(path=latest, filesystem=fs) if latest else None
        TorchTrainer(grpo_loop, train_loop_config=lc, torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                     scaling_config=ray.train.ScalingConfig(num_workers=gc.learner_workers, use_gpu=use_gpu),
                     run_config=ray.train.RunConfig(name=name, storage_path=storage, storage_filesystem=fs),
                     resume_from_checkpoint=resume).fit()
        p = out_dir / "grpo_metrics.json"
        metrics = json.loads(p.read_text()) if p.is_file() else {}
    return GRPOOutputs(str(out_dir / "model"), root,
                       {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
