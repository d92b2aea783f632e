"""Per-completion advantages from group rewards. rewards: (n_prompts, G)."""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, kind: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """grpo: (r - mean_g) / (std_g + eps), std unbiased=False as in the GRPO paper's normalisation over the group;
    drgrpo: r - mean_g."""
    centred = rewards - rewards.mean(1, keepdim=True)
    if kind == "drgrpo":
        return centred
    if kind == "grpo":
        return centred / (rewards.std(1, unbiased=False, keepdim=True) + eps)
    raise ValueError(f"unknown advantage kind {kind!r}")


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(n_prompts,) bool: groups whose rewards are not all equal (the rest have zero advantage everywhere)."""
    return (rewards.max(1).values - rewards.min(1).values) > 0


def unlikeliness_scale(mean_logprobs: torch.Tensor, penalty: float) -> torch.Tensor:
    """(n_prompts, G) factors for the rewards (He, Fried & Welleck 2025, "Rewarding the unlikely"): within a group,
    completions ranked by their mean token log-probability, least likely first (rank 0); a completion of rank k
    gets its reward times 1 - penalty * k / G. Among correct answers the rarer ones then earn more, against GRPO's
    bias towards reinforcing what the policy already samples most (distribution sharpening). Ties keep their
    order in the group."""
    G = mean_logprobs.shape[1]
    ranks = torch.argsort(torch.argsort(mean_logprobs, dim=1, stable=True), dim=1, stable=True)
    return 1.0 - penalty * ranks.float() / G
