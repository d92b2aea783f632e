"""The run harness shared by the training stages (distill, sft1, sft2) and GRPO: everything a stage that trains a
model from a checkpointed loop needs besides its loop.

- `RunContext.build`: checks the input model, lays out <run_dir>/<stage>, decides GPU use, computes the resume
  fingerprint and gathers what the loop reads (the loop context, a plain dict so that Ray can ship it to workers).
- `launch`: runs the loop in-process (`workers == 0`) or as a Ray Train `TorchTrainer` of `workers` workers,
  one set of resources (one GPU per worker on GPU, one CPU per worker on CPU) and checkpoint retention for
  every stage, resuming from the newest checkpoint of this run's fingerprint.
- `RunOutputs`: what such a stage returns (its published model, checkpoint root and numeric metrics).

Resume: a checkpoint is resumed only when its fingerprint matches (stage settings, seed, teacher, the stage's code,
the library versions that shape the numbers, every file of the input model, the data manifest)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from components import hashing
from components.errors import M1Error
from components.train import checkpoint as ck

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class RunOutputs:
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


def code_paths(loop_module: str) -> list[str]:
    """The loop's own package whole and every other repo module it imports: the code a resumed run must share."""
    package = loop_module.rpartition(".")[0]
    own = ROOT.joinpath(*package.split("."))
    paths = {own.relative_to(ROOT).as_posix()}
    paths |= {f.relative_to(ROOT).as_posix() for f in hashing.imported_files(loop_module, ROOT) if own not in f.parents}
    return sorted(paths)


def fingerprint(stage: str, train_cfg: dict, model_dir: Path, data_dir: Path, seed: int, teacher: str,
                libraries: tuple[str, ...] = ("torch", "transformers"), loop_module: str | None = None) -> str:
    """What a checkpoint must match to be resumed: the settings, the code of the stage's loop (its package and every
    repo module it imports), the versions of `libraries`, every file of the input model and the data manifest.
    Computed once by the driver and handed to the workers; it holds no absolute path, so the same code and inputs
    give the same value."""
    loop_module = loop_module or ("components.grpo.loop" if stage == "grpo" else "components.train.loop")
    h = hashlib.sha256(json.dumps({"stage": stage, "train": train_cfg, "seed": seed, "teacher": teacher,
                                   "code": hashing.code_version(code_paths(loop_module), ROOT),
                                   "libraries": {n: _library_version(n) for n in libraries}},
                                  sort_keys=True, default=str).encode())
    h.update(hashing.dvc_md5(model_dir).encode())  # every shard and file; remembered by stat, not re-read
    h.update(_file_hash(data_dir / "manifest.json").encode())
    return h.hexdigest()[:16]


def wants_gpu(setting: str) -> bool:
    """use_gpu "yes" | "no" | "auto" (a GPU when this process sees CUDA)."""
    return setting == "yes" or (setting == "auto" and torch.cuda.is_available())


@dataclass
class RunContext:
    """Where a stage's run lives and the loop context handed to its loop (`lc`)."""

    out_dir: Path
    checkpoint_root: str
    use_gpu: bool
    lc: dict

    @classmethod
    def build(cls, config, stage: str, section, inputs: dict, section_key: str, data: str,
              libraries: tuple[str, ...] = ("torch", "transformers"), **extra) -> RunContext:
        """section: the stage's typed config (TrainConfig / GRPOConfig); section_key: the key the loop reads it
        under; data: the curated folder (relative to inputs["data_dir"]) the loop trains on; extra: more keys."""
        model_dir, data_root = Path(inputs["model_dir"]), Path(inputs["data_dir"])
        if not (model_dir / "config.json").is_file():
            raise M1Error(f"{stage}: input model directory {model_dir} has no config.json")
        out_dir = Path(config.run_dir) / stage
        out_dir.mkdir(parents=True, exist_ok=True)
        root = section.checkpoint_storage or str((out_dir / "checkpoints").resolve())
        use_gpu = wants_gpu(section.use_gpu)
        settings = section.model_dump(mode="json")
        lc = {"stage": stage, section_key: settings, "model_dir": str(model_dir.resolve()),
              "data_dir": str((data_root / data).resolve()), "out_dir": str(out_dir.resolve()),
              "checkpoint_root": root,
              "fingerprint": fingerprint(stage, settings, model_dir, data_root, config.seed, config.teacher.source,
                                         libraries),
              "seed": config.seed, "use_gpu": use_gpu,
              "mlflow_run_id": os.environ.get("MLFLOW_RUN_ID"), "mlflow_uri": os.environ.get("MLFLOW_TRACKING_URI"),
              **extra}
        return cls(out_dir, root, use_gpu, lc)

    def has_checkpoint(self) -> bool:
        return ck.latest_checkpoint(self.checkpoint_root, self.lc["fingerprint"]) is not None

    def launch(self, loop: Callable[[dict], dict], workers: int, keep_checkpoints: int, summary_file: str) -> dict:
        """Run `loop(lc)` in this process (workers == 0) or on `workers` Ray Train workers; -> the loop's summary
        metrics (on Ray, read back from <out_dir>/<summary_file>, which rank 0 writes)."""
        self.lc["use_ray"] = workers > 0
        if workers == 0:
            return loop(self.lc)
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        from components.ray_utils import ensure_ray

        ensure_ray()  # RAY_ADDRESS (set from pipeline.ray_address by the pipeline) or a local instance
        fs, path = ck.filesystem(self.checkpoint_root)
        storage, name = path.rsplit("/", 1)
        # Ray Train v2 takes no resume_from_checkpoint: the workers find their checkpoint (Context.resume_dir). Here
        # the driver only brings a newer one back from the S3 mirror into the root first.
        ck.latest_checkpoint(self.checkpoint_root, self.lc["fingerprint"])
        TorchTrainer(
            loop, train_loop_config=self.lc,
            torch_config=TorchConfig(backend="nccl" if self.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=self.use_gpu,
                                                   resources_per_worker=None if self.use_gpu else {"CPU": 1}),
            run_config=ray.train.RunConfig(name=name, storage_path=storage, storage_filesystem=fs,
                                           checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints)),
        ).fit()
        summary = self.out_dir / summary_file
        return json.loads(summary.read_text()) if summary.is_file() else {}

    def outputs(self, metrics: dict) -> RunOutputs:
        return RunOutputs(str(self.out_dir / "model"), self.checkpoint_root,
                          {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
