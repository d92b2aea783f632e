"""Token-level losses over assistant tokens only.

Targets: position t predicts token t+1, and counts iff loss_mask[t+1] = 1 (an assistant token) and tokens t and
t+1 belong to the same packed document. Prompt tokens, template tokens and padding never carry loss. Every loss
is returned as a SUM over counted positions; the trainer divides by the number of counted tokens in the whole
global batch, so the result is a token mean that does not depend on how rows are split over workers and
micro-batches."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from components.model.linear_ce import IGNORE_INDEX


def target_mask(loss_mask: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(b, L) -> (b, L-1) bool: which next-token predictions count."""
    m = loss_mask[:, 1:].bool()
    if doc_ids is not None:
        m = m & (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] >= 0)
    return m


def ce_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(b, L): the next token at each position whose prediction counts (target_mask), IGNORE_INDEX elsewhere (the
    last position too): what HybridForCausalLM.forward(targets=...) sums the cross-entropy over."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = torch.where(target_mask(loss_mask, doc_ids), input_ids[:, 1:], IGNORE_INDEX)
    return targets


def kl_per_token(student_logits, teacher_logits, kind: str = "reverse", temperature: float = 1.0,
                 js_beta: float = 0.5) -> torch.Tensor:
    """(..., V) logits -> (...) divergence per position, in fp32."""
    ls = F.log_softmax(student_logits.float() / temperature, -1)
    lt = F.log_softmax(teacher_logits.float() / temperature, -1)
    if kind == "reverse":
        return (ls.exp() * (ls - lt)).sum(-1)
    if kind == "forward":
        return (lt.exp() * (lt - ls)).sum(-1)
    if kind == "js":
        b = js_beta
        lm = torch.logsumexp(torch.stack([lt + torch.log(torch.tensor(b)), ls + torch.log(torch.tensor(1 - b))]), 0)
        return b * (lt.exp() * (lt - lm)).sum(-1) + (1 - b) * (ls.exp() * (ls - lm)).sum(-1)
    raise ValueError(f"unknown KL kind {kind!r}")


def ce_per_token(logits, targets) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="none").view(targets.shape)


def distill_loss_sums(student_logits, teacher_logits, input_ids, loss_mask, doc_ids, kl_weight: float,
                      ce_weight: float, kind: str = "reverse", temperature: float = 1.0, js_beta: float = 0.5):
    """Returns (loss_sum, kl_sum, ce_sum, n_tokens) over the counted positions of this micro-batch."""
    m = target_mask(loss_mask, doc_ids)
    s = student_logits[:, :-1][m]
    n = m.sum()
    zero = s.new_zeros((), dtype=torch.float32)
    kl = kl_per_token(s, teacher_logits[:, :-1][m], kind, temperature, js_beta).sum() if teacher_logits is not None else zero
    ce = ce_per_token(s, input_ids[:, 1:][m]).sum()  # cheap next to the logits; logged even when unweighted
    return kl_weight * kl + ce_weight * ce, kl.detach(), ce.detach(), n
