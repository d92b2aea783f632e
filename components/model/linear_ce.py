"""The LM head and its cross-entropy in one pass over chunks of tokens (linear_ce_sum): nothing of size
tokens x vocab is kept between the forward and the backward pass. Used by HybridForCausalLM.forward(targets=...)
for the fine-tuning stages and by the training benchmark."""
from __future__ import annotations

import torch

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
