"""Per-completion advantages from group rewards. rewards: (n_prompts, G)."""
from __future__ import annotations

from math import comb

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


def passk_advantages(correct: torch.Tensor, k: int) -> torch.Tensor:
    """(n_prompts, G) analytic pass@k advantages (Chen et al. 2025, "Pass@k training for adaptively balancing
    exploration and exploitation"): the group's reward is whether any of k completions drawn from its G is correct.
    With c correct and G - c wrong: mean R = 1 - C(G-c, k) / C(G, k), sigma = sqrt(R (1 - R)); a correct completion
    gets (1 - R) / sigma, a wrong one (1 - R - C(G-c-1, k-1) / C(G-1, k-1)) / sigma. A wrong answer is punished less
    than under GRPO, and a group the policy solves in most draws (G - c < k) gets none: what it already gets right
    is not sharpened further. Groups with sigma = 0 (all right, all wrong) get 0. k = 1 is GRPO's advantage on
    0/1 rewards."""
    G = correct.shape[1]
    out = torch.zeros(correct.shape, dtype=torch.float32)
    for i, row in enumerate(correct.bool().tolist()):
        c = sum(row)
        mean = 1.0 - comb(G - c, k) / comb(G, k)
        sigma = (mean * (1.0 - mean)) ** 0.5
        if sigma == 0.0:
            continue
        wrong = (1.0 - mean - comb(G - c - 1, k - 1) / comb(G - 1, k - 1)) / sigma
        out[i] = torch.tensor([(1.0 - mean) / sigma if r else wrong for r in row])
    return out


def advantages(rewards: torch.Tensor, correct: torch.Tensor, kind: str, eps: float, k: int):
    """-> ((n_prompts, G) advantages of the configured kind, (n_prompts,) bool: groups that carry signal).
    rewards: shaped rewards (grpo, drgrpo); correct: 0/1 correctness (passk)."""
    if kind == "passk":
        adv = passk_advantages(correct, k)
        return adv, adv.abs().amax(1) > 0
    return group_advantages(rewards, kind, eps), informative_groups(rewards)
