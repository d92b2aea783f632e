"""Stage entry point for distill / sft1 / sft2: `run(config, inputs, stage)`.

inputs: model_dir (the model to start from: the converted hybrid for distill, the previous stage's model after)
and data_dir (the curate stage's output). Runs in-process when `num_workers` is 0, else as a Ray Train
TorchTrainer with that many workers (gloo on CPU, NCCL on GPU) on the cluster `ensure_ray` joins or starts.
Started again after a failure, it resumes from the latest checkpoint whose fingerprint (stage settings, code,
library versions, input model, data manifest) matches; checkpoints of other settings are ignored."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from components.errors import M1Error
from components.pipeline import hashing
from components.pipeline.stages import ROOT, get_stage

STAGES = ("distill", "sft1", "sft2")


@dataclass
class TrainOutputs:
    model_dir: str
    checkpoint_root: str
    metrics: dict[str, float] = field(default_factory=dict)


def _file_hash(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "-"


def _library_version(name: str) -> str:
    # the public version only: the build tag (+cpu, +cu124) is the driver's, not that of the workers that train
    try:
        return version(name).split("+")[0]
    except PackageNotFoundError:
        return "-"


def fingerprint(stage: str, train_cfg: dict, model_dir: Path, data_dir: Path, seed: int, teacher: str,
                libraries: tuple[str, ...] = ("torch", "transformers")) -> str:
    """What a checkpoint must match to be resumed: the settings, the stage's code (the paths that key its cache),
    the versions of `libraries`, every file of the input model and the data manifest. Computed once by the driver
    and handed to the workers; it holds no absolute path, so the same code and inputs give the same value."""
    h = hashlib.sha256(json.dumps({"stage": stage, "train": train_cfg, "seed": seed, "teacher": teacher,
                                   "code": hashing.code_version(get_stage(stage).code_paths(), ROOT),
                                   "libraries": {n: _library_version(n) for n in libraries}},
                                  sort_keys=True, default=str).encode())
    h.update(hashing.dvc_md5(model_dir).encode())  # every shard and file; remembered by stat, not re-read
    h.update(_file_hash(data_dir / "manifest.json").encode())
    return h.hexdigest()[:16]


def run(config, inputs: dict, stage: str) -> TrainOutputs:
    import os

    import torch

    from components.train import checkpoint as ck

    if stage not in STAGES:
        raise M1Error(f"unknown training stage {stage!r}; choose one of {', '.join(STAGES)}")
    tc = getattr(config, stage)
    model_dir = Path(inputs["model_dir"])
    data_root = Path(inputs["data_dir"])
    if not (model_dir / "config.json").is_file():
        raise M1Error(f"{stage}: input model directory {model_dir} has no config.json")
    out_dir = Path(config.run_dir) / stage
    out_dir.mkdir(parents=True, exist_ok=True)
    root = tc.checkpoint_storage or str((out_dir / "checkpoints").resolve())
    use_gpu = tc.use_gpu == "yes" or (tc.use_gpu == "auto" and torch.cuda.is_available())
    train = tc.model_dump(mode="json")
    lc = {
        "stage": stage, "train": train, "model_dir": str(model_dir.resolve()),
        "data_dir": str((data_root / tc.data).resolve()),
        "heldout_dir": str((data_root / tc.heldout).resolve()) if tc.heldout else None,
        "teacher_source": config.teacher.source, "out_dir": str(out_dir.resolve()), "checkpoint_root": root,
        "fingerprint": fingerprint(stage, train, model_dir, data_root, config.seed, config.teacher.source),
        "seed": config.seed, "use_ray": tc.num_workers > 0, "use_gpu": use_gpu,
        "mlflow_run_id": os.environ.get("MLFLOW_RUN_ID"), "mlflow_uri": os.environ.get("MLFLOW_TRACKING_URI"),
    }
    topk = _teacher_topk(config, tc, stage, lc, out_dir, use_gpu)
    if ck.latest_checkpoint(root, lc["fingerprint"]) is None:
        (out_dir / "history.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh loss curve
    if tc.num_workers == 0:
        from components.train.loop import train_loop

        metrics = train_loop(lc)
    else:
        metrics = _run_ray(lc, tc, root, use_gpu, config)
    metrics.update(topk)
    return TrainOutputs(str(out_dir / "model"), root, {k: float(v) for k, v in metrics.items()
                                                       if isinstance(v, (int, float))})


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


def _run_ray(lc: dict, tc, root: str, use_gpu: bool, config) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from components.ray_utils import ensure_ray
    from components.train import checkpoint as ck
    from components.train.loop import train_loop

    ensure_ray()  # RAY_ADDRESS (set from pipeline.ray_address by the pipeline) or a local cluster
    fs, path = ck.filesystem(root)
    storage, name = path.rsplit("/", 1)
    latest = ck.latest_checkpoint(root, lc["fingerprint"])
    resume = ray.train.Checkpoint(path=latest, filesystem=fs) if latest else None
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=lc,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage, storage_filesystem=fs,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints)),
        resume_from_checkpoint=resume,
    )
    trainer.fit()
    summary = Path(lc["out_dir"]) / "train_metrics.json"
    return json.loads(summary.read_text()) if summary.is_file() else {}
