"""Sampler/learner mismatch: the rollout engine's log-probabilities of the sampled tokens against the learner's
for the same tokens and weights (different kernels, dtypes or batch shapes make them differ), its distribution,
and the two corrections the loop offers (grpo.mismatch_correction):
- tis: truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
  off-policy RL training"): the policy-gradient term of each token is multiplied by
  min(exp(log p_learner_old - log p_sampler), cap), correcting for sampling from the sampler's distribution
  while the surrogate assumes the learner's; the cap bounds the variance a few extreme tokens would add.
- mask: a sequence with any token whose gap exceeds the threshold is left out of the loss (its numbers are too
  far off to trust either way).

Inputs per sequence: `sampler` lists of floats (one per completion token), `learner` tensors at least as long
(rows of a right-padded batch), `keep` flags (sequences the loss counts)."""
from __future__ import annotations

import numpy as np
import torch


def token_gaps(sampler: list[list[float]], learner: list[torch.Tensor], keep: list[bool]) -> list[torch.Tensor]:
    """|log p_sampler - log p_learner| per token of each kept sequence (CPU float32); empty for the others."""
    return [(torch.tensor(s, dtype=torch.float32) - lp[:len(s)].float().cpu()).abs() if k and s
            else torch.zeros(0) for s, lp, k in zip(sampler, learner, keep)]


def gap_stats(gaps: list[torch.Tensor], threshold: float) -> dict[str, float]:
    """Distribution of the per-token gaps over all kept tokens (mean, p50, p90, p99, max; quantiles by linear
    interpolation) and the fractions of kept sequences whose largest / mean gap exceeds `threshold` (the first is
    what mismatch_correction: mask would drop)."""
    seqs = [g for g in gaps if len(g)]
    if not seqs:
        return {"rollout_logprob_gap": 0.0, "rollout_logprob_gap_p50": 0.0, "rollout_logprob_gap_p90": 0.0,
                "rollout_logprob_gap_p99": 0.0, "rollout_logprob_gap_max": 0.0, "rollout_gap_seqs_max_over": 0.0,
                "rollout_gap_seqs_mean_over": 0.0}
    d = torch.cat(seqs)
    p50, p90, p99 = np.quantile(d.numpy().astype(np.float64), [0.5, 0.9, 0.99])
    return {"rollout_logprob_gap": float(d.mean()), "rollout_logprob_gap_p50": float(p50),
            "rollout_logprob_gap_p90": float(p90), "rollout_logprob_gap_p99": float(p99),
            "rollout_logprob_gap_max": float(d.max()),
            "rollout_gap_seqs_max_over": sum(float(g.max()) > threshold for g in seqs) / len(seqs),
            "rollout_gap_seqs_mean_over": sum(float(g.mean()) > threshold for g in seqs) / len(seqs)}


def rollout_logprob_gap(rollout: list[list[float]], learner: list[torch.Tensor],
                        keep: list[bool]) -> tuple[float, float]:
    """(mean, max) of the kept tokens' gaps: 0 up to float noise when sampler and learner agree."""
    s = gap_stats(token_gaps(rollout, learner, keep), float("inf"))
    return s["rollout_logprob_gap"], s["rollout_logprob_gap_max"]


def over_threshold(gaps: list[torch.Tensor], threshold: float) -> list[bool]:
    """Per sequence: does any token's gap exceed `threshold` (strictly)? False for empty (not kept) sequences."""
    return [bool(len(g)) and float(g.max()) > threshold for g in gaps]


def tis_weights(learner_old: list[torch.Tensor], sampler: list[list[float]], cap: float) -> list[torch.Tensor]:
    """Per token of each sequence: min(exp(log p_learner_old - log p_sampler), cap), CPU float32, no gradient."""
    return [torch.clamp(torch.exp(lp[:len(s)].detach().float().cpu() - torch.tensor(s, dtype=torch.float32)),
                        max=cap) for lp, s in zip(learner_old, sampler)]


def tis_stats(weights: list[torch.Tensor], keep: list[bool], cap: float) -> dict[str, float]:
    """Mean truncated-IS weight over the kept tokens and the share of them at the cap."""
    w = [x for x, k in zip(weights, keep) if k and len(x)]
    if not w:
        return {"tis_weight_mean": 1.0, "tis_capped_fraction": 0.0}
    d = torch.cat(w)
    return {"tis_weight_mean": float(d.mean()), "tis_capped_fraction": float((d >= cap).float().mean())}
