"""The GRPO policy loss on completion tokens. All tensors (N, T) over completion positions; `mask` marks real
(counted) tokens. Returns the loss (aggregated over the mini-batch by `loss_agg`) and its diagnostics."""
from __future__ import annotations

import torch

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
RATIO_LEVELS = ("token", "sequence")


def token_weights(mask: torch.Tensor, loss_agg: str = "token_mean", n_tokens: float | None = None,
                  n_seqs: float | None = None, max_len: int | None = None) -> torch.Tensor:
    """(N, T) weight of each token's term in the mini-batch loss (the loss is sum(weight * term)).
    token_mean (DAPO): 1 / n_tokens for every counted token, so a long completion weighs in proportion to its
    length; seq_mean_token_mean (original GRPO): 1 / (len_i * n_seqs), each sequence's token mean, then the mean
    over sequences, so a token of a short completion weighs more; seq_mean_token_sum_norm (Dr. GRPO):
    1 / (max_len * n_seqs), a constant, so neither length biases the per-token weight.
    n_tokens / n_seqs: the whole mini-batch's counted tokens / sequences (default: this batch's), so that
    micro-batches and DDP ranks add up to the mini-batch loss; max_len: default T."""
    m = mask.float()
    if loss_agg == "token_mean":
        return m / max(float(m.sum()) if n_tokens is None else n_tokens, 1.0)
    lens = m.sum(1, keepdim=True)
    ns = max(float((lens > 0).sum()) if n_seqs is None else n_seqs, 1.0)
    if loss_agg == "seq_mean_token_mean":
        return m / (lens.clamp(min=1.0) * ns)
    if loss_agg == "seq_mean_token_sum_norm":
        return m / (float(max_len or m.shape[1]) * ns)
    raise ValueError(f"unknown loss_agg {loss_agg!r} (known: {', '.join(LOSS_AGGS)})")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                entropy: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None, *, clip_low: float = 0.2,
                clip_high: float = 0.2, entropy_coef: float = 0.0, kl_coef: float = 0.0, n_tokens: float | None = None,
                dual_clip: float | None = None, loss_agg: str = "token_mean", n_seqs: float | None = None,
                max_len: int | None = None, ratio_level: str = "token", is_weight: torch.Tensor | None = None):
    """adv: (N,) one advantage per completion, broadcast over its tokens.
    pg = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), r = exp(logp - old_logp) per token, or with
    ratio_level "sequence" (GSPO, Zheng et al. 2025) r_i = exp(mean over sequence i's counted tokens of
    (logp - old_logp)), one ratio and one clip decision per sequence (a token-level ratio is noisy and its clip
    drops single tokens of a sequence whose reward is one number), broadcast over its tokens;
    dual_clip c (dual-clip PPO, Ye et al. 2020): where A < 0, pg = min(pg, -c A), so a token whose ratio has
    grown far past 1 adds at most c |A| (and no gradient) instead of r |A|;
    is_weight (N, T): per-token truncated importance weights (mismatch.tis_weights), multiplying pg, no gradient;
    loss = agg(pg) - entropy_coef * agg(entropy) + kl_coef * agg(k3), k3 = exp(ref - logp) - (ref - logp) - 1,
    agg the weighted sum of token_weights(loss_agg, ...).
    Diagnostics clip_fraction, approx_kl_old, entropy and kl_ref are token means (n_tokens) whatever the
    aggregation, so that curves compare across variants; pg_loss is the aggregated term."""
    m = mask.float()
    n = max(float(m.sum()) if n_tokens is None else n_tokens, 1.0)
    w = token_weights(mask, loss_agg, n, n_seqs, max_len)
    A = adv[:, None].expand_as(logp)
    log_ratio = logp - old_logp
    if ratio_level == "sequence":
        seq_log_ratio = (log_ratio * m).sum(1) / m.sum(1).clamp(min=1.0)
        ratio = torch.exp(seq_log_ratio)[:, None].expand_as(logp)
    elif ratio_level == "token":
        ratio = torch.exp(log_ratio)
    else:
        raise ValueError(f"unknown ratio_level {ratio_level!r} (known: {', '.join(RATIO_LEVELS)})")
    s1 = ratio * A
    s2 = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * A
    pg = -torch.min(s1, s2)
    if dual_clip is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -dual_clip * A), pg)
    if is_weight is not None:
        pg = pg * is_weight.detach()
    loss = (pg * w).sum()
    with torch.no_grad():
        stats = {"pg_loss": float((pg * w).sum()),
                 "clip_fraction": float(((s2 < s1).float() * m).sum()) / n,
                 "approx_kl_old": float((((torch.exp(log_ratio) - 1) - log_ratio) * m).sum()) / n}
    if entropy is not None:
        loss = loss - entropy_coef * (entropy * w).sum()
        stats["entropy"] = float((entropy.detach() * m).sum()) / n
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp - logp
        k3 = torch.exp(d) - d - 1
        loss = loss + kl_coef * (k3 * w).sum()
        stats["kl_ref"] = float((k3.detach() * m).sum()) / n
    return loss, stats
