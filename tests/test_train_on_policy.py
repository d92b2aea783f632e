"""On-policy distillation (components/train/on_policy.py): prompts cut where the assistant starts, the loss on a
padded batch of the student's completions equals the reverse KL summed position by position with each prefix run
alone, and the trainer runs it as a stage."""
import json

import pytest
import torch
import torch.nn.functional as F

from components.model import convert
from components.train.losses import distill_loss_sums, target_mask
from components.train.on_policy import completion_batch, prompts_of, sample_completions


def test_prompts_are_the_first_documents_tokens_before_the_assistant():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    doc = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    assert prompts_of(ids, mask, doc, max_prompt=8) == [[5, 6], None, None]  # no assistant / no prompt
    assert prompts_of(ids, mask, doc, max_prompt=1) == [None, None, None]  # prompt too long


def test_loss_on_padded_completions_equals_the_kl_of_each_prefix_alone(tiny_teacher):
    teacher = convert(tiny_teacher, list(range(4))).eval()
    student = convert(tiny_teacher, [1, 3]).eval()
    prompts = [[11, 12, 13], [21, 22, 23, 24, 25]]
    done = sample_completions(student, prompts, 6, seed=3)
    assert all(1 <= len(c) <= 6 for c in done)
    b = completion_batch(prompts, done, pad_id=0, device="cpu")
    with torch.no_grad():
        s = student(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
        t = teacher(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
    loss, kl, ce, n = distill_loss_sums(s, t, b["input_ids"], b["loss_mask"], b["doc_ids"], 1.0, 0.0)
    assert int(n) == sum(len(c) for c in done) == int(target_mask(b["loss_mask"], b["doc_ids"]).sum())
    by_hand = 0.0
    for p, c in zip(prompts, done):
        for k in range(len(c)):  # the prediction of completion token k from the prefix before it
            prefix = torch.tensor([p + c[:k]])
            with torch.no_grad():
                ls = F.log_softmax(student(prefix)[0, -1].float(), -1)
                lt = F.log_softmax(teacher(prefix)[0, -1].float(), -1)
            by_hand += float((ls.exp() * (ls - lt)).sum())
    assert float(loss) == pytest.approx(by_hand, rel=1e-4, abs=1e-5) and float(kl) == pytest.approx(by_hand, rel=1e-4)


def test_on_policy_stage_trains_on_the_students_own_tokens(train_setup, tmp_path):
    from components.config import load_config
    from components.train.stage import run

    root, data = train_setup
    cfg = load_config(overrides={"run_dir": str(tmp_path / "run"), "teacher": {"source": "random:tiny"},
                                 "tracking": {"enabled": False},
                                 "distill": {"objective": "on_policy", "on_policy_tokens": 5, "max_steps": 3,
                                             "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1,
                                             "lr": 1e-3, "checkpoint_every": 3, "eval_rows": 4}})
    out = run(cfg, {"model_dir": root / "conv", "data_dir": data}, "distill")
    history = [json.loads(line) for line in (tmp_path / "run" / "distill" / "history.jsonl").read_text().splitlines()]
    for h in history:  # 4 rows a step, each a prompt and at most 5 sampled tokens
        assert 0 < h["on_policy/tokens"] <= 4 * 5 and h["on_policy/skipped"] == 0
        assert h["loss"] == pytest.approx(h["kl"]) and h["kl"] > 0
    assert out.metrics["heldout/kl"] >= 0
    with pytest.raises(Exception, match="objective on_policy"):
        load_config(overrides={"distill": {"objective": "on_policy", "ce_weight": 1.0}})
