"""Settings of one training stage (`distill:`, `sft1:`, `sft2:` in params.yaml). Defaults are the reference
recipe's where they fit a CPU (lr 1e-5 cosine, 200 warmup, weight decay 0.1, clip 1.0); params.yaml sizes
them for the embedded default's 20-minute budget."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from components.config_base import Section


class TrainConfig(Section):
    # distill: the KL / CE losses below, end to end, on the data's tokens. align: every converted layer learns to reproduce the teacher's
    # attention output at that layer from the teacher's own hidden state (components/train/align.py); the KL / CE
    # settings are then unused.
    # on_policy: the student samples on_policy_tokens per prompt (each row's first prompt, at most
    # on_policy_max_prompt tokens) and learns the KL to the teacher on its own completions (train/on_policy.py).
    objective: Literal["distill", "align", "on_policy"] = "distill"
    on_policy_tokens: int = Field(64, gt=0)
    on_policy_max_prompt: int = Field(512, gt=0)
    # Which packed split of the curate stage to train on, and which to measure held-out KL / perplexity on.
    data: str = "sft1"
    heldout: str | None = "sft1_heldout"
    # loss = kl_weight * KL(student, teacher) + ce_weight * CE(student, data); token mean over assistant tokens.
    kl_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0)
    # reverse: sum p_s (log p_s - log p_t) (M1's choice); forward: sum p_t (log p_t - log p_s);
    # js: beta-skewed Jensen-Shannon, beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta p_t + (1 - beta) p_s.
    kl_kind: Literal["reverse", "forward", "js"] = "reverse"
    js_beta: float = Field(0.5, gt=0, lt=1)
    temperature: float = Field(1.0, gt=0)
    # 0: the frozen teacher runs beside the student at every step (exact KL). k > 0: the teacher's top-k
    # log-probs of every row the run visits are precomputed once into a reusable store (teacher_topk_dir, default
    # <run_dir>/<stage>/teacher_topk/<key>) and KL is taken against them with a uniform tail (train/teacher_topk.py).
    teacher_topk: int = Field(0, ge=0)
    teacher_topk_dir: str | None = None
    # AdamW; weight decay applies to matrices only (norm weights, biases, A_log, D, dt biases are not decayed).
    lr: float = Field(1e-5, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_steps: int = Field(200, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    max_steps: int = Field(100, gt=0)
    global_batch_size: int = Field(8, gt=0)  # packed rows per optimizer step, over all workers
    micro_batch_size: int = Field(1, gt=0)  # rows per forward/backward on one worker
    # 0: no checkpoints (a measurement run: a failure starts the stage over). A full checkpoint holds the fp32
    # weights and AdamW's two moments, 12 bytes a parameter (39 GB at 3.2B).
    checkpoint_every: int = Field(50, ge=0)
    keep_checkpoints: int = Field(2, gt=0)
    # Where checkpoints go: a local directory or s3://bucket/prefix (default: <run_dir>/<stage>/checkpoints).
    checkpoint_storage: str | None = None
    eval_every: int = Field(0, ge=0)  # 0: only before the first and after the last step
    eval_rows: int = Field(8, gt=0)  # held-out rows per evaluation
    freeze: list[Literal["mlp", "embeddings", "attention", "norms"]] = Field(default_factory=list)
    gradient_checkpointing: bool = False
    bf16: bool = True  # autocast to bf16 on CUDA (ignored on CPU)
    # Ray Train workers; 0 = in-process, no Ray. use_gpu "auto" = one GPU per worker when CUDA is present.
    num_workers: int = Field(0, ge=0)
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    peak_tflops: float | None = None  # for MFU; None = known value for the detected GPU, none on CPU
    log_every: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.kl_weight == 0 and self.ce_weight == 0:
            raise ValueError("kl_weight and ce_weight are both 0: nothing to train on")
        if self.teacher_topk and self.kl_weight == 0:
            raise ValueError(f"teacher_topk {self.teacher_topk} is set but kl_weight is 0: no KL to take")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of "
                             f"micro_batch_size {self.micro_batch_size}")
        if self.objective == "on_policy" and (self.ce_weight or not self.kl_weight or self.teacher_topk):
            raise ValueError("objective on_policy learns the KL on the student's own completions: set kl_weight > 0, "
                             "ce_weight 0 and teacher_topk 0 (no precomputed store covers them)")
        if self.objective == "align" and self.strategy != "ddp":
            raise ValueError("objective align averages gradients itself: strategy must be ddp")
        workers = max(1, self.num_workers)
        if self.global_batch_size % (workers * self.micro_batch_size):
            raise ValueError(f"global_batch_size {self.global_batch_size} must split evenly over "
                             f"{workers} workers x micro_batch_size {self.micro_batch_size}")
        return self


def distill_defaults() -> TrainConfig:
    return TrainConfig()


class AlignConfig(TrainConfig):
    # Off by default: distill then starts from convert's model. On (the gpu profile): distill starts from align's.
    enabled: bool = False
    objective: Literal["align"] = "align"


def align_defaults() -> AlignConfig:
    return AlignConfig(lr=1e-3, warmup_steps=10, max_steps=100, checkpoint_every=50)


def sft1_defaults() -> TrainConfig:
    return TrainConfig(kl_weight=0.0, ce_weight=1.0)


def sft2_defaults() -> TrainConfig:
    return TrainConfig(data="sft2", heldout=None, kl_weight=0.0, ce_weight=1.0, lr=6e-6)
