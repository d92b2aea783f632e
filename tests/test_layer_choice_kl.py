"""KL-guided layer choice (components/train/layer_choice.kl_guided_ranking): without distillation steps a layer's
score is the KL of the student with attention only there, computed by hand; short distillation lowers each
candidate's KL; the ranking orders layers by the drop against the attention-free student."""
import pytest
import torch

from components.model import convert
from components.train.layer_choice import full_logits, kl_guided_ranking
from components.train.losses import kl_per_token


def _batches(n=2, L=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 49152, (1, L), generator=g)
        mask = torch.ones(1, L, dtype=torch.bool)
        mask[:, :4] = False
        out.append({"input_ids": ids, "mask": mask})
    return out


def test_kl_guided_ranking_by_hand_and_after_short_distillation(tiny_teacher):
    engine = convert(tiny_teacher, list(range(4))).eval()
    train, held = _batches(seed=1), _batches(seed=2)
    train_t, held_t = full_logits(engine, train), full_logits(engine, held)

    def student(layers):
        return convert(tiny_teacher, layers, seed=0)

    at_init = kl_guided_ranking(student, 4, train, train_t, held, held_t, steps=0, lr=1e-3)
    with torch.no_grad():
        s = student([2])
        num = sum(float(kl_per_token(s(b["input_ids"])[b["mask"]], t[b["mask"]], "reverse").sum())
                  for b, t in zip(held, held_t))
    assert at_init["kl"][2] == pytest.approx(num / sum(int(b["mask"].sum()) for b in held), rel=1e-5)
    assert at_init["drop"][2] == pytest.approx(at_init["baseline_kl"] - at_init["kl"][2])
    assert at_init["ranking"] == sorted(range(4), key=lambda i: -at_init["drop"][i])

    # scored on the rows it distils on, a few steps lower every candidate's KL (random rows: nothing to generalise)
    before = kl_guided_ranking(student, 4, train, train_t, train, train_t, steps=0, lr=1e-3)
    after = kl_guided_ranking(student, 4, train, train_t, train, train_t, steps=6, lr=1e-3)
    assert all(after["kl"][i] < before["kl"][i] for i in range(4)), (before["kl"], after["kl"])
    assert after["baseline_kl"] < before["baseline_kl"]
