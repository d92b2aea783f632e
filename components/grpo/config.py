"""Settings of the GRPO stage (`grpo:` in params.yaml). Defaults are the M1 reference's where they are
per-step choices (temperature 0.9, clip 0.2, lr 1e-6 constant, entropy 0.01, no KL, G = 8); the batch sizes and
lengths are the embedded default's, sized for the CPU budget."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from components.config_base import Section


class GRPOConfig(Section):
    data: str = "rl"  # curated split with prompt + answer columns
    heldout_prompts: int = Field(32, ge=0)  # RL prompts set aside (by stable hash) to measure accuracy before/after
    eval_samples: int = Field(4, gt=0)  # samples per held-out prompt (pass@1 = mean, with standard error)
    eval_temperature: float = Field(0.7, ge=0)
    prompts_per_step: int = Field(128, gt=0)
    group_size: int = Field(8, ge=2)  # G completions per prompt
    temperature: float = Field(0.9, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(1024, gt=0)
    # Reward: name in components.grpo.rewards.REWARDS; format_weight adds that much for a well-formed answer
    # (closing </think> then a \boxed{}), on top of correctness (0/1).
    reward: str = "boxed_after_think"
    format_weight: float = Field(0.0, ge=0)
    verify_timeout_s: float = Field(5.0, gt=0)
    # Advantages. "grpo": (r - mean) / (std + eps) within the prompt's group; "drgrpo": r - mean (Dr. GRPO,
    # no std scaling, which would up-weight near-uniform groups).
    advantage: Literal["grpo", "drgrpo"] = "grpo"
    adv_eps: float = Field(1e-6, gt=0)
    # Dynamic sampling (DAPO): drop groups whose rewards are all equal (zero advantage, no signal) and draw more
    # prompts, up to max_refill_rounds extra generation rounds, to refill the batch. A refill round draws enough
    # prompts for the missing groups at the share of informative groups seen so far in the step (a student that
    # is always right or always wrong on 87% of prompts needs ~8x), at most refill_max_factor x prompts_per_step.
    dynamic_sampling: bool = False
    max_refill_rounds: int = Field(2, ge=0)
    refill_max_factor: int = Field(8, ge=1)
    # Completions cut off at max_new_tokens get no loss (their reward says nothing about the answer).
    mask_truncated: bool = False
    # A step whose groups all have equal rewards has no policy gradient: only the entropy bonus (and KL) would act,
    # which just raises entropy (seen on a student that was never rewarded). True skips such steps' updates
    # (counted as skipped_update in the step metrics); False applies them, as the reference does.
    skip_no_signal: bool = False
    # Loss: clipped surrogate with ratio clipped to [1 - clip_low, 1 + clip_high] ("clip-higher" when high > low),
    # minus entropy_coef * token entropy, plus kl_coef * KL(policy || frozen reference) (k3 estimator; 0 = off,
    # and then no reference model is loaded). Token mean over all completion tokens of the mini-batch.
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0)
    # Dual clip (off = None, as the reference): for negative advantages the loss of a token is capped at
    # dual_clip * |A| (> 1), so a few tokens whose probability rose many-fold cannot dominate a step.
    dual_clip: float | None = Field(None, gt=1)
    entropy_coef: float = Field(0.01, ge=0)
    kl_coef: float = Field(0.0, ge=0)
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ppo_epochs: int = Field(1, gt=0)  # passes over each step's rollouts
    minibatch_prompts: int = Field(64, gt=0)  # prompts (x G completions) per optimizer step
    micro_batch: int = Field(8, gt=0)  # sequences per forward/backward
    max_steps: int = Field(10, gt=0)
    checkpoint_every: int = Field(5, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    checkpoint_storage: str | None = None
    samples_every: int = Field(1, gt=0)  # log a table of prompts, completions and rewards every N steps
    # Rollout actors: 0 = generate in-process; N = N Ray actors with rollout_resources each.
    rollout_workers: int = Field(0, ge=0)
    rollout_resources: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    # Learner: 0 = in-process; N = a Ray Train worker group of N (DDP), rank 0 drives the rollouts.
    learner_workers: int = Field(0, ge=0)
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    # bf16 autocast for the learner's forward passes on GPU. Off by default: the rollouts sample in fp32, and a
    # bf16 learner's log-probabilities of the same tokens differ from them by ~0.1 nats on average and up to
    # ~3 nats per token (converted SmolLM2 hybrid, measured on CPU autocast), noise that the importance ratios
    # read as policy change (metric rollout_logprob_gap).
    bf16: bool = False

    @model_validator(mode="after")
    def _check(self):
        from components.grpo.rewards import REWARDS

        if self.reward not in REWARDS:  # else every completion would score 0 as a reward "error"
            raise ValueError(f"unknown reward {self.reward!r} (known: {', '.join(sorted(REWARDS))})")
        if self.prompts_per_step % self.minibatch_prompts:
            raise ValueError(f"prompts_per_step {self.prompts_per_step} is not a multiple of minibatch_prompts "
                             f"{self.minibatch_prompts}")
        return self
