"""Token-level losses over assistant tokens only.

Targets: position t predicts token t+1, and counts iff loss_mask[t+1] = 1 (an assistant token) and tokens t and
t+1 belong to the same packed document. Prompt tokens, template tokens and padding never carry loss. Every loss
is returned as a SUM over counted positions; the trainer divides by the number of counted tokens in the whole
global batch, so the result is a token mean that does not depend on how rows are split over workers and
micro-batches."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def target_mask(loss_mask: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(b, L) -> (b, L-1) bool: which next-token predictions count."""
    m = loss_mask[:, 1:].bool()
    if doc_ids is not None:
        m = m & (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] >= 0)
    return m


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


IGNORE_INDEX = -100  # F.cross_entropy's default: targets that carry no loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of CE(h @ w.T, targets) over tokens, chunk by chunk: each chunk's logits exist only while that chunk is
    processed, and the gradients are computed right away (softmax minus one-hot), so the backward pass only scales
    them; nothing of size tokens x vocab is kept. Same FLOPs as the plain path, without its logits in memory
    (a 3B Llama's 128k vocabulary over 4096 tokens is 2 GB of fp32 logits, more with their gradient)."""

    @staticmethod
    def forward(ctx, h, w, targets, chunk: int, dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if need_w else None
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        wc = w.to(dtype)
        rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk].to(dtype), targets[s:s + chunk]
            valid = tc != IGNORE_INDEX
            tgt = tc.clamp_min(0)
            logits = (hc @ wc.T).float()
            lse = torch.logsumexp(logits, -1)
            picked = logits.gather(1, tgt[:, None])[:, 0]
            total += ((lse - picked) * valid).sum()
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[rows[:len(tc)], tgt] -= 1.0
                g = (g * valid[:, None]).to(dtype)
                if need_h:
                    grad_h[s:s + chunk] = (g @ wc).to(h.dtype)
                if need_w:
                    grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 4096,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum CE(hidden @ weight.T, targets) over the targets that are not IGNORE_INDEX, in chunks of `chunk` tokens
    (see _LinearCrossEntropy). hidden (..., d), weight (vocab, d) (the LM head), targets hidden.shape[:-1]. The
    matmuls run in `dtype` (default: hidden's; bf16 under autocast is the caller's choice), the softmax in fp32."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 token, got {chunk}")
    h = hidden.reshape(-1, hidden.shape[-1])
    return _LinearCrossEntropy.apply(h, weight, targets.reshape(-1), chunk, dtype or hidden.dtype)
