"""Layer-wise alignment (MOHAWK / RADLADS / Zebra-Llama's first step): every converted layer learns to reproduce the
attention output it replaced, given the teacher's own hidden state at that layer (teacher forcing), all layers in
one pass. The end-to-end distillation then starts from mixers that already approximate their attention.

For each layer i that is a Mamba mixer in the student:
    h_i   = the teacher's residual stream entering layer i (no student layer runs before it)
    a_i   = teacher.self_attn_i(teacher.norm_i(h_i))           the target
    y_i   = student.mamba_i(student.norm_i(h_i))               the student's answer on the same input
    loss  = mean over converted layers of ||y_i - a_i||^2 / hidden_size, summed over the loss-mask tokens
so the optimiser's normalisation (a sum over target tokens divided by their count) gives the mean squared error
per hidden unit, per layer, per token. Only mixer (and their norm) parameters receive gradients.

Simplification: the MSE counts the assistant tokens the distillation counts (the packed rows' loss mask), not the
prompt tokens, so both stages normalise by the same token count."""
from __future__ import annotations

import torch

from components.model import HybridForCausalLM


def converted_layers(student: HybridForCausalLM) -> list[int]:
    return [i for i, layer in enumerate(student.model.layers) if layer.kind != "attention"]


def alignment_sums(student: HybridForCausalLM, teacher: HybridForCausalLM, input_ids, position_ids, doc_ids,
                   loss_mask) -> tuple[torch.Tensor, list[float]]:
    """(loss summed over masked tokens, per converted layer the mean squared error per hidden unit summed over
    masked tokens, as floats). teacher: the all-attention engine (components/train/teacher_engine.py)."""
    layers = converted_layers(student)
    mask = loss_mask.to(torch.float32)
    hidden = student.config.hidden_size
    with torch.no_grad():
        h = teacher.model.embed_tokens(input_ids)
        seq_t = teacher._seq_info(input_ids, None, position_ids, doc_ids, None, h.dtype)
    seq_s = student._seq_info(input_ids, None, position_ids, doc_ids, None, h.dtype)
    total = torch.zeros((), device=input_ids.device)
    per_layer = []
    for i, (t_layer, s_layer) in enumerate(zip(teacher.model.layers, student.model.layers)):
        with torch.no_grad():
            a = t_layer.self_attn(t_layer.input_layernorm(h), seq_t.rope, seq_t.attn_mask)
        if i in layers:
            y = s_layer.mamba(s_layer.input_layernorm(h.to(next(s_layer.parameters()).dtype)), seq_s)
            err = ((y.float() - a.float()) ** 2).sum(-1) / hidden  # (b, L)
            layer_sum = (err * mask).sum()
            total = total + layer_sum / len(layers)
            per_layer.append(float(layer_sum.detach()))
        with torch.no_grad():
            h = h + a
            h = h + t_layer.mlp(t_layer.post_attention_layernorm(h))
    return total, per_layer
