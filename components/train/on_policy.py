"""On-policy distillation (GKD / "on-policy distillation"): the student samples a completion for each prompt, and
the loss is the per-token reverse KL to the teacher over the whole vocabulary at every position of the student's own
completion, sum_v p_s(v | prefix) (log p_s(v | prefix) - log p_t(v | prefix)). The student learns where it actually
goes, rather than on the teacher's or the data's continuations, at the cost of a generation per step.

Prompts: each packed row's first document up to its first assistant token (the curated chat template's prompt).
Completions: components.model.generate with the model's fastest engine (CUDA graphs on GPU), sampled at
temperature 1, no gradient. The batch for the loss is prompt + completion, right-padded; the positions that predict
a completion token count (the same token-sum normalisation as the distillation's).

Simplification: rows whose first document has no assistant token, or a prompt longer than `max_prompt`, are
skipped for that step (counted in `on_policy/skipped`)."""
from __future__ import annotations

import torch

from components.model.generate import generate


def prompts_of(input_ids: torch.Tensor, loss_mask: torch.Tensor, doc_ids: torch.Tensor,
               max_prompt: int) -> list[list[int] | None]:
    """Per packed row: the tokens of its first document before the first assistant (loss) token, or None."""
    out: list[list[int] | None] = []
    for ids, lm, doc in zip(input_ids.tolist(), loss_mask.tolist(), doc_ids.tolist()):
        first = next((i for i, (m, d) in enumerate(zip(lm, doc)) if m and d == doc[0]), None)
        out.append(ids[:first] if first and first <= max_prompt else None)
    return out


def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device) -> dict:
    """prompt + completion per row, right-padded: input_ids, position_ids, doc_ids (-1 on padding) and loss_mask
    (1 on completion tokens), as the packed training batches have them."""
    rows = [p + c for p, c in zip(prompts, completions)]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), L, dtype=torch.long)
    doc = torch.full((len(rows), L), -1, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        loss_mask[i, len(p):n] = 1
        doc[i, :n] = 0
    pos = torch.arange(L).expand(len(rows), L).clone()
    return {"input_ids": ids.to(device), "position_ids": pos.to(device), "doc_ids": doc.to(device),
            "loss_mask": loss_mask.to(device)}


def sample_completions(model, prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[list[int]]:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = generate(model, prompts, max_new_tokens, temperature=1.0, seed=seed)
    model.train(was_training)
    return out.tokens
