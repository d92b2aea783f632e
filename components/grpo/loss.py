"""The GRPO policy loss on completion tokens. All tensors (N, T) over completion positions; `mask` marks real
(counted) tokens. Returns the loss (token mean over the mini-batch's counted tokens) and its diagnostics."""
from __future__ import annotations

import torch


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                entropy: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None, *, clip_low: float = 0.2,
                clip_high: float = 0.2, entropy_coef: float = 0.0, kl_coef: float = 0.0, n_tokens: float | None = None,
                dual_clip: float | None = None):
    """adv: (N,) one advantage per completion, broadcast over its tokens.
    pg = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), r = exp(logp - old_logp);
    dual_clip c (dual-clip PPO, Ye et al. 2020): where A < 0, pg = min(pg, -c A), so a token whose ratio has
    grown far past 1 adds at most c |A| (and no gradient) instead of r |A|;
    loss = mean(pg) - entropy_coef * mean(entropy) + kl_coef * mean(k3), k3 = exp(ref - logp) - (ref - logp) - 1.
    n_tokens: the denominator of the token mean (defaults to this batch's counted tokens; pass the whole
    mini-batch's count when it is split into micro-batches)."""
    m = mask.float()
    n = float(m.sum()) if n_tokens is None else n_tokens
    n = max(n, 1.0)
    A = adv[:, None].expand_as(logp)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    s1 = ratio * A
    s2 = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * A
    pg = -torch.min(s1, s2)
    if dual_clip is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -dual_clip * A), pg)
    loss = (pg * m).sum() / n
    with torch.no_grad():
        stats = {"pg_loss": float((pg * m).sum()) / n,
                 "clip_fraction": float(((s2 < s1).float() * m).sum()) / n,
                 "approx_kl_old": float((((ratio - 1) - log_ratio) * m).sum()) / n}
    if entropy is not None:
        ent = (entropy * m).sum() / n
        loss = loss - entropy_coef * ent
        stats["entropy"] = float(ent.detach())
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp - logp
        k3 = ((torch.exp(d) - d - 1) * m).sum() / n
        loss = loss + kl_coef * k3
        stats["kl_ref"] = float(k3.detach())
    return loss, stats
