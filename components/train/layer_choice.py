"""Which layers should keep attention: greedy forward selection by how much of the teacher each layer's attention
carries.

A converted Mamba layer starts out contributing almost nothing the teacher's attention did: on SmolLM2-135M the
converted model's held-out KL to the teacher (11.7 nats with attention kept in layers 4, 9, ..., 29) is within
0.3 nats of the same model with those mixers' outputs zeroed. So the teacher with attention removed from a layer
(its MLP kept) is a cheap stand-in for "that layer converted", and needs no Mamba scan.

Greedy: start from no attention, and at each round keep the layer whose attention, added to those already kept,
lowers the token-mean KL(ablated || teacher) on the given rows the most. Simplification: the score is taken at
initialisation, not after distillation; it finds the layers a short distillation cannot restore (on SmolLM2-135M,
layers 0 and 1: removing either alone costs 2.6 and 5.1 nats).

KL-guided (kl_guided_ranking), as Zebra-Llama / the KL-guided layer selection works do: from a student with no
attention, return attention to one layer at a time, distil each candidate briefly, and rank the layers by how much
their return lowers the held-out KL. It scores layers after (short) distillation rather than at initialisation, at
the cost of one short distillation per layer.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from components.train.losses import kl_per_token


class _DropAttention:
    """Forward hooks that replace the attention output of chosen layers by zeros (the residual passes through)."""

    def __init__(self, model):
        self.layers = model.model.layers
        self.dropped: set[int] = set()
        self.handles = [layer.self_attn.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, args, out):
            return torch.zeros_like(out) if i in self.dropped else out
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def kl_without_attention(model, batches: list[dict], teacher_logits: list[torch.Tensor], keep: Iterable[int]) -> float:
    """Token-mean reverse KL(model with attention only in `keep` || model) over the batches' loss positions."""
    drop = _DropAttention(model)
    drop.dropped = set(range(len(drop.layers))) - set(keep)
    try:
        total = n = 0.0
        for b, t in zip(batches, teacher_logits):
            s = model(b["input_ids"], position_ids=b.get("position_ids"), doc_ids=b.get("doc_ids"))
            m = b["mask"]
            total += float(kl_per_token(s[m], t[m], "reverse").sum())
            n += float(m.sum())
        return total / max(n, 1.0)
    finally:
        drop.remove()


@torch.no_grad()
def full_logits(model, batches: list[dict]) -> list[torch.Tensor]:
    """The unablated model's fp32 logits per batch: the reference every ablation is scored against."""
    return [model(b["input_ids"], position_ids=b.get("position_ids"), doc_ids=b.get("doc_ids")).float()
            for b in batches]


@torch.no_grad()
def greedy_attention_layers(model, batches: list[dict], k: int,
                            progress: Callable[[int, int, float], None] | None = None,
                            teacher_logits: list[torch.Tensor] | None = None) -> list[tuple[int, float]]:
    """model: an all-attention HybridForCausalLM (the converted teacher). batches: dicts with input_ids, a bool
    `mask` of scored positions, optional position_ids/doc_ids; teacher_logits: full_logits(model, batches) when
    the caller has them. Returns [(layer, KL after adding it)] in the order chosen, k long."""
    n_layers = len(model.model.layers)
    if not 0 < k <= n_layers:
        raise ValueError(f"k={k} must be in 1..{n_layers}")
    if any(layer.kind != "attention" for layer in model.model.layers):
        raise ValueError("greedy_attention_layers needs the all-attention model (convert with every layer attention)")
    if teacher_logits is None:
        teacher_logits = full_logits(model, batches)
    kept: list[int] = []
    chosen: list[tuple[int, float]] = []
    for _ in range(k):
        scores = {}
        for cand in (i for i in range(n_layers) if i not in kept):
            scores[cand] = kl_without_attention(model, batches, teacher_logits, kept + [cand])
            if progress:
                progress(len(kept), cand, scores[cand])
        best = min(scores, key=scores.get)
        kept.append(best)
        chosen.append((best, scores[best]))
    return chosen


def _kl_mean(model, batches: list[dict], teacher_logits: list[torch.Tensor]) -> torch.Tensor:
    total = n = 0
    for b, t in zip(batches, teacher_logits):
        s = model(b["input_ids"], position_ids=b.get("position_ids"), doc_ids=b.get("doc_ids"))
        m = b["mask"]
        total = total + kl_per_token(s[m], t[m], "reverse").sum()
        n += int(m.sum())
    return total / max(n, 1)


def short_distillation_kl(student, train_batches: list[dict], train_logits: list[torch.Tensor],
                          eval_batches: list[dict], eval_logits: list[torch.Tensor], steps: int, lr: float) -> float:
    """The student's token-mean reverse KL to the teacher on eval_batches after `steps` Adam steps on the KL over
    train_batches (one batch per step, in turn), training only the Mamba mixers."""
    params = [p for n, p in student.named_parameters() if ".mamba." in n]
    if steps and params:
        opt = torch.optim.Adam(params, lr=lr)
        student.train()
        for step in range(steps):
            i = step % len(train_batches)
            loss = _kl_mean(student, train_batches[i:i + 1], train_logits[i:i + 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
    student.eval()
    with torch.no_grad():
        return float(_kl_mean(student, eval_batches, eval_logits))


def kl_guided_ranking(make_student: Callable[[list[int]], torch.nn.Module], n_layers: int,
                      train_batches: list[dict], train_logits: list[torch.Tensor], eval_batches: list[dict],
                      eval_logits: list[torch.Tensor], steps: int, lr: float,
                      progress: Callable[[int, float], None] | None = None) -> dict:
    """KL-guided choice: from the student with no attention at all, give attention back to one layer at a time,
    distil each such student briefly (short_distillation_kl) and rank the layers by how much their attention's
    return lowers the held-out KL against the attention-free student distilled the same way.
    make_student(attn_layers) -> a freshly converted student. Returns {"baseline_kl", "kl": {layer: kl},
    "drop": {layer: baseline - kl}, "ranking": layers best first}."""
    baseline = short_distillation_kl(make_student([]), train_batches, train_logits, eval_batches, eval_logits,
                                     steps, lr)
    kl = {}
    for i in range(n_layers):
        kl[i] = short_distillation_kl(make_student([i]), train_batches, train_logits, eval_batches, eval_logits,
                                      steps, lr)
        if progress:
            progress(i, kl[i])
    drop = {i: baseline - v for i, v in kl.items()}
    return {"baseline_kl": baseline, "kl": kl, "drop": drop, "ranking": sorted(drop, key=drop.get, reverse=True)}
