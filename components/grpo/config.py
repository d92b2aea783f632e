"""Settings of the GRPO stage (`grpo:` in params.yaml). Defaults are the M1 reference's where they are
per-step choices (temperature 0.9, clip 0.2, lr 1e-6 constant, entropy 0.01, no KL, G = 8); the batch sizes and
lengths are the embedded default's, sized for the CPU budget."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from components.config_base import Section
from components.grpo.rewards import REWARDS


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
    # "passk": the analytic pass@k advantage on 0/1 correctness (Chen et al. 2025; advantages.passk_advantages),
    # with k = passk_k: it trains for "one of k tries is right" rather than for the favourite answer, against
    # sharpening; a group solved in most draws carries no signal (and dynamic sampling drops it).
    advantage: Literal["grpo", "drgrpo", "passk"] = "grpo"
    passk_k: int = Field(4, ge=1)
    adv_eps: float = Field(1e-6, gt=0)
    # Dynamic sampling (DAPO): drop groups whose rewards are all equal (zero advantage, no signal) and draw more
    # prompts, up to max_refill_rounds extra generation rounds, to refill the batch. A refill round draws enough
    # prompts for the missing groups at the share of informative groups seen so far in the step (a student that
    # is always right or always wrong on 87% of prompts needs ~8x), at most refill_max_factor x prompts_per_step.
    dynamic_sampling: bool = False
    max_refill_rounds: int = Field(2, ge=0)
    refill_max_factor: int = Field(8, ge=1)
    # Prompts the policy has solved (every one of a group's completions correct) are not drawn again for the rest of
    # the run (Skywork-OR1's and POLARIS's filtering of solved prompts). Their groups carry no signal, and the ones
    # the policy already gets right are what GRPO sharpens on; with dynamic sampling, each still costs group_size
    # completions an epoch. The solved set is checkpointed with the prompt cursor. Off by default.
    skip_solved: bool = False
    # Completions cut off at max_new_tokens get no loss (their reward says nothing about the answer).
    mask_truncated: bool = False
    # Overlong reward shaping (DAPO's soft overlong punishment): a completion of L tokens gets
    # -overlong_penalty * (L - (max_new_tokens - overlong_window)) / overlong_window added to its reward when it
    # runs into the last overlong_window tokens of the budget (linear from 0 to -overlong_penalty at
    # max_new_tokens), before advantages and dynamic sampling's tie test, so that a group whose answers tie but
    # whose lengths differ still teaches "finish earlier". 0 = off.
    overlong_window: int = Field(0, ge=0)
    overlong_penalty: float = Field(1.0, ge=0)
    # Unlikeliness reward (He, Fried & Welleck 2025): within each group, the completion of likelihood rank k (0 =
    # least likely by mean token log-probability under the sampler) has its reward scaled by
    # 1 - unlikeliness_penalty * k / G, before overlong shaping and advantages: correct but rare answers earn more
    # than the policy's favourite one, which counters sharpening (pass@n falling while pass@1 rises). A group whose
    # answers are all correct then carries signal too. The paper uses 0.25; 0 = off.
    unlikeliness_penalty: float = Field(0.0, ge=0, le=1)
    # A step whose groups all have equal rewards has no policy gradient: only the entropy bonus (and KL) would act,
    # which just raises entropy (seen on a student that was never rewarded). True skips such steps' updates
    # (counted as skipped_update in the step metrics); False applies them, as the reference does.
    skip_no_signal: bool = False
    # Loss: clipped surrogate with ratio clipped to [1 - clip_low, 1 + clip_high] ("clip-higher" when high > low),
    # minus entropy_coef * token entropy, plus kl_coef * KL(policy || frozen reference) (k3 estimator; 0 = off,
    # and then no reference model is loaded), each averaged over the mini-batch by loss_agg.
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0)
    # How the per-token terms are averaged over the mini-batch (loss.token_weights). "token_mean": over all
    # counted tokens (DAPO; a long completion weighs in proportion to its length, the reference's choice);
    # "seq_mean_token_mean": each sequence's token mean, then the mean over sequences (original GRPO; tokens of
    # short completions weigh more, which favours short right answers and long wrong ones);
    # "seq_mean_token_sum_norm": each sequence's token sum / max_new_tokens, mean over sequences (Dr. GRPO; no
    # length bias either way).
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    # Importance ratio: "token" (PPO/GRPO) or "sequence" (GSPO, Zheng et al. 2025: exp of the sequence's mean
    # per-token log-ratio, clipped per sequence, matching a reward given per sequence). GSPO pairs it with
    # seq_mean_token_mean and a much narrower clip (clip_low 3e-4, clip_high 4e-4): the sequence ratio moves
    # far less than single tokens' ratios.
    ratio_level: Literal["token", "sequence"] = "token"
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
    # Recompute each layer's activations in the learner's backward pass (as TrainConfig.gradient_checkpointing):
    # the same gradients for less memory, which the parallel scan's (b, L, d, n) tensors fill on a CPU.
    gradient_checkpointing: bool = False
    max_steps: int = Field(10, gt=0)
    checkpoint_every: int = Field(5, ge=0)  # 0: none (as in TrainConfig)
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
    # Sampler/learner mismatch (components/grpo/mismatch.py): the rollout's log-probabilities of its own tokens
    # differ from the learner's (kernels, dtypes), so the rollouts are slightly off-policy. "none" only measures it
    # (rollout_logprob_gap mean/p50/p90/p99/max, rollout_gap_seqs_max_over: the share of sequences with a token
    # gap above mask_threshold); "tis": truncated importance sampling (TIS, Yao et al. 2025), each token's
    # policy-gradient term times min(exp(log p_learner_old - log p_sampler), tis_cap); "mask": sequences with any
    # token gap above mask_threshold (nats) are left out of the loss.
    mismatch_correction: Literal["none", "tis", "mask"] = "none"
    tis_cap: float = Field(2.0, ge=1)  # >= 1: a cap below 1 would shrink every token's weight, not just outliers'
    mask_threshold: float = Field(1.0, gt=0)  # nats; also the threshold of the rollout_gap_seqs_*_over metrics
    # One-step off-policy rollouts: the sampler generates step t+1's batch (with the weights of step t) while the
    # learner trains on step t's, so generation and learning overlap. The staleness is one update, measured per step
    # as policy_lag; the learner recomputes the old log-probabilities itself, so the sampler/learner gap above
    # (corrected by mismatch_correction: "tis" is the natural pairing) also covers the one-step lag. The batch in
    # flight is saved with each checkpoint, so a resumed run equals a straight one.
    one_step_off_policy: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.reward not in REWARDS:  # else every completion would score 0 as a reward "error"
            raise ValueError(f"unknown reward {self.reward!r} (known: {', '.join(sorted(REWARDS))})")
        if self.prompts_per_step % self.minibatch_prompts:
            raise ValueError(f"prompts_per_step {self.prompts_per_step} is not a multiple of minibatch_prompts "
                             f"{self.minibatch_prompts}")
        if self.advantage == "passk":
            if self.passk_k > self.group_size:
                raise ValueError(f"passk_k {self.passk_k} exceeds group_size {self.group_size}")
            ignored = [f for f in ("format_weight", "overlong_window", "unlikeliness_penalty") if getattr(self, f)]
            if ignored:
                raise ValueError(f"advantage passk works on 0/1 correctness; {', '.join(ignored)} would be ignored "
                                 "(set it to 0)")
        if self.overlong_window >= self.max_new_tokens:
            raise ValueError(f"overlong_window {self.overlong_window} must be below max_new_tokens "
                             f"{self.max_new_tokens} (the penalty ramps over the last overlong_window tokens)")
        return self
