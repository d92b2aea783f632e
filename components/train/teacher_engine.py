"""The teacher as the distillation and top-k code run it: loaded from any source, converted into our own engine with
every layer attention (its logits equal the transformers model's), frozen."""
from __future__ import annotations

from components.model import convert
from components.model.teacher import load_any_teacher


def load_teacher_engine(source: str, device, dtype):
    """The teacher in our own engine (all layers attention: logits equal the transformers model's), so packed
    documents are masked exactly as for the student."""
    t = load_any_teacher(source)
    engine = convert(t, list(range(t.config.num_hidden_layers)))
    del t
    engine.to(device=device, dtype=dtype).eval()
    for p in engine.parameters():
        p.requires_grad_(False)
    return engine
