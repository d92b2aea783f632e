"""The run harness shared by the training stages (distill, sft1, sft2) and GRPO: everything a stage that trains a
model from a checkpointed loop needs besides its loop.

- `RunContext.build`: checks the input model, lays out <run_dir>/<stage>, decides GPU use, computes the resume
  fingerprint and gathers what the loop reads: a `LoopContext` (the stage's typed config section, paths,
  fingerprint, seed...), which Ray pickles to every worker.
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
from components.config_base import Section
from components.errors import M1Error
from components.ray_utils import ensure_ray
from components.train import checkpoint

# ray (ray.train) is imported in RunContext.launch, only for a run on Ray workers: a heavy optional dependency.

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
                libraries: tuple[str, ...] = ("torch", "transformers"),
                loop_module: str = "components.train.loop") -> str:
    """What a checkpoint must match to be resumed: the settings, the code of the stage's loop (its package and every
    repo module it imports), the versions of `libraries`, every file of the input model and the data manifest.
    Computed once by the driver and handed to the workers; it holds no absolute path, so the same code and inputs
    give the same value."""
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


# What the workers must see of this driver's environment: S3 endpoint and region (not credentials: the runtime env
# shows in Ray's dashboard; nodes take those from their own environment or instance role) and the M1_* settings
# (kernels, cache dir). A Ray instance started earlier, or a remote cluster, would otherwise run the loop with another
# environment. Values that must also be *absent* when unset travel in the loop config instead.
WORKER_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_S3_ENDPOINT_URL")


def worker_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in WORKER_ENV or k.startswith("M1_")}


@dataclass
class LoopContext:
    """What a training loop reads: the stage's typed config section and where the run lives. Picklable: Ray Train
    ships it to every worker (RunContext.launch)."""

    stage: str
    config: Section  # the stage's typed section: TrainConfig (distill, sft1, sft2...) or GRPOConfig (grpo...)
    model_dir: str  # the input model
    data_dir: str  # the curated folder the loop trains on
    out_dir: str  # <run_dir>/<stage>
    checkpoint_root: str
    checkpoint_mirror: str | None  # the root's S3 mirror (checkpoint.checkpoint_mirror), None for none
    fingerprint: str  # what a checkpoint must match to be resumed (fingerprint())
    seed: int
    use_gpu: bool
    fail_after_step: int = -1  # fault injection for resume tests ($M1_FAIL_AFTER_STEP)
    mlflow_run_id: str | None = None
    mlflow_uri: str | None = None
    use_ray: bool = False  # set by RunContext.launch
    # the training stages only (not GRPO)
    teacher_source: str | None = None
    heldout_dir: str | None = None  # curated held-out rows, None for none
    teacher_topk_dir: str | None = None  # precomputed teacher top-k (the teacher is not run for the training loss)


def _ray_worker(config: dict) -> dict:
    """Ray Train's train_loop_per_worker: TorchTrainer hands it a dict (train_loop_config); the loop gets its
    LoopContext."""
    return config["loop"](config["context"])


@dataclass
class RunContext:
    """Where a stage's run lives and the LoopContext handed to its loop."""

    out_dir: Path
    checkpoint_root: str
    use_gpu: bool
    context: LoopContext

    @classmethod
    def build(cls, config, stage: str, section: Section, inputs: dict, data: str,
              libraries: tuple[str, ...] = ("torch", "transformers"), loop_module: str = "components.train.loop",
              **extra) -> RunContext:
        """section: the stage's typed config (TrainConfig / GRPOConfig); data: the curated folder (relative to
        inputs["data_dir"]) the loop trains on; loop_module: the loop's module, whose code versions the fingerprint;
        extra: more LoopContext fields (teacher_source, heldout_dir)."""
        model_dir, data_root = Path(inputs["model_dir"]), Path(inputs["data_dir"])
        if not (model_dir / "config.json").is_file():
            raise M1Error(f"{stage}: input model directory {model_dir} has no config.json")
        out_dir = Path(config.run_dir) / stage
        out_dir.mkdir(parents=True, exist_ok=True)
        root = section.checkpoint_storage or str((out_dir / "checkpoints").resolve())
        use_gpu = wants_gpu(section.use_gpu)
        settings = section.model_dump(mode="json")  # the fingerprint's view of the settings
        context = LoopContext(
            stage=stage, config=section, model_dir=str(model_dir.resolve()),
            data_dir=str((data_root / data).resolve()), out_dir=str(out_dir.resolve()), checkpoint_root=root,
            checkpoint_mirror=checkpoint.checkpoint_mirror(root, config.pipeline.mirror_location()),
            fingerprint=fingerprint(stage, settings, model_dir, data_root, config.seed, config.teacher.source,
                                    libraries, loop_module),
            seed=config.seed, use_gpu=use_gpu,
            # read here, not in the loop: a Ray worker of an earlier run would still carry an old value
            fail_after_step=int(os.environ.get("M1_FAIL_AFTER_STEP", "-1")),
            mlflow_run_id=os.environ.get("MLFLOW_RUN_ID"), mlflow_uri=os.environ.get("MLFLOW_TRACKING_URI"),
            **extra)
        return cls(out_dir, root, use_gpu, context)

    def has_checkpoint(self) -> bool:
        context = self.context
        return checkpoint.latest_checkpoint(self.checkpoint_root, context.fingerprint,
                                            context.checkpoint_mirror) is not None

    def launch(self, loop: Callable[[LoopContext], dict], workers: int, keep_checkpoints: int,
               summary_file: str) -> dict:
        """Run `loop(context)` in this process (workers == 0) or on `workers` Ray Train workers; -> the loop's
        summary metrics (on Ray, read back from <out_dir>/<summary_file>, which rank 0 writes)."""
        self.context.use_ray = workers > 0
        if workers == 0:
            return loop(self.context)
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        ensure_ray()  # RAY_ADDRESS (set from pipeline.ray_address by the pipeline) or a local instance
        fs, path = checkpoint.filesystem(self.checkpoint_root)
        storage, name = path.rsplit("/", 1)
        # Ray Train v2 takes no resume_from_checkpoint: the workers find their checkpoint (Context.resume_dir). Here
        # the driver only brings a newer one back from the S3 mirror into the root first.
        checkpoint.latest_checkpoint(self.checkpoint_root, self.context.fingerprint, self.context.checkpoint_mirror)
        TorchTrainer(
            _ray_worker, train_loop_config={"loop": loop, "context": self.context},
            torch_config=TorchConfig(backend="nccl" if self.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=self.use_gpu,
                                                   resources_per_worker=None if self.use_gpu else {"CPU": 1}),
            run_config=ray.train.RunConfig(name=name, storage_path=storage, storage_filesystem=fs,
                                           checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
                                           worker_runtime_env={"env_vars": worker_env()}),
        ).fit()
        summary = self.out_dir / summary_file
        return json.loads(summary.read_text()) if summary.is_file() else {}

    def outputs(self, metrics: dict) -> RunOutputs:
        return RunOutputs(str(self.out_dir / "model"), self.checkpoint_root,
                          {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
