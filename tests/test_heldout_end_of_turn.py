"""The held-out metrics of the training loop split the student's and the teacher's CE at end-of-turn targets from
the rest, against hand-computed values: reverse KL barely sees a student that gives the end of turn no mass where
the teacher gives it much, and this split is where that shows."""
import math
from types import SimpleNamespace

import torch

from components.train.loop import heldout_metrics

V, EOT = 4, 2  # vocabulary of 4, token 2 ends a turn


class _Rows:
    def __init__(self, batch):
        self.b = batch

    def __len__(self):
        return 1

    def batch(self, idx, device):
        return self.b


class _Fixed(torch.nn.Module):
    """Returns the same logits for any input; carries the EOS ids as a HybridForCausalLM's config does."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.config = SimpleNamespace(eos_ids=[EOT])

    def forward(self, input_ids, position_ids=None, doc_ids=None):
        return self.logits


def _logits(probs_per_position):
    return torch.log(torch.tensor([probs_per_position], dtype=torch.float32))


def test_ce_apart_at_end_of_turn_targets():
    # one document: tokens 0 1 3 2, every target counted; targets are 1, 3, 2 (the last one ends the turn)
    batch = {"input_ids": torch.tensor([[0, 1, 3, 2]]), "loss_mask": torch.tensor([[0, 1, 1, 1]]),
             "doc_ids": torch.zeros(1, 4, dtype=torch.long), "position_ids": torch.arange(4)[None]}
    student = _Fixed(_logits([[0.1, 0.5, 0.1, 0.3], [0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.01, 0.49],
                              [0.25, 0.25, 0.25, 0.25]]))
    teacher = _Fixed(_logits([[0.1, 0.6, 0.1, 0.2], [0.1, 0.1, 0.1, 0.7], [0.05, 0.05, 0.8, 0.1],
                              [0.25, 0.25, 0.25, 0.25]]))
    m = heldout_metrics(student, teacher, _Rows(batch), 1, 1, "cpu", torch.autocast("cpu", enabled=False))
    ce_student = [-math.log(0.5), -math.log(0.7), -math.log(0.01)]
    ce_teacher = [-math.log(0.6), -math.log(0.7), -math.log(0.8)]
    assert math.isclose(m["heldout/ce"], sum(ce_student) / 3, rel_tol=1e-5)
    assert math.isclose(m["heldout/ce_end_of_turn"], -math.log(0.01), rel_tol=1e-5)
    assert math.isclose(m["heldout/teacher_ce_end_of_turn"], -math.log(0.8), rel_tol=1e-5)
    assert math.isclose(m["heldout/ppl_content"], math.exp(sum(ce_student[:2]) / 2), rel_tol=1e-5)
    assert math.isclose(m["heldout/teacher_ppl_content"], math.exp(sum(ce_teacher[:2]) / 2), rel_tol=1e-5)
    assert math.isclose(m["heldout/teacher_ppl"], math.exp(sum(ce_teacher) / 3), rel_tol=1e-5)


def test_no_end_of_turn_targets_leaves_the_split_out():
    batch = {"input_ids": torch.tensor([[0, 1, 3]]), "loss_mask": torch.tensor([[0, 1, 1]]),
             "doc_ids": torch.zeros(1, 3, dtype=torch.long), "position_ids": torch.arange(3)[None]}
    uniform = _Fixed(torch.zeros(1, 3, V))
    m = heldout_metrics(uniform, None, _Rows(batch), 1, 1, "cpu", torch.autocast("cpu", enabled=False))
    assert math.isclose(m["heldout/ce"], math.log(V), rel_tol=1e-6)
    assert "heldout/ce_end_of_turn" not in m and "heldout/kl" not in m
