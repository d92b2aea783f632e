"""Layer-wise alignment (components/train/align.py): the loss is the per-layer MSE it says it is, only the Mamba
mixers learn from it, and optimising it lowers every converted layer's error."""
import pytest
import torch

from components.model import convert
from components.train.align import alignment_sums, converted_layers


def _batch(seed=0, b=2, L=24, vocab=49152):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, L), generator=g)
    pos = torch.arange(L)[None].expand(b, L)
    doc = torch.zeros(b, L, dtype=torch.long)
    doc[:, L // 2:] = 1  # two packed documents per row
    pos = torch.where(doc == 1, pos - L // 2, pos)
    mask = torch.zeros(b, L, dtype=torch.bool)
    mask[:, 4:] = True
    return ids, pos, doc, mask


def test_alignment_loss_is_the_teacher_forced_mse_of_each_converted_layer(tiny_teacher):
    teacher = convert(tiny_teacher, list(range(4))).eval()
    student = convert(tiny_teacher, [1, 3])
    assert converted_layers(student) == [0, 2]
    ids, pos, doc, mask = _batch()
    loss, per_layer = alignment_sums(student, teacher, ids, pos, doc, mask)
    # by hand: the teacher's residual stream into layer 2 is the teacher's own layers 0 and 1, whatever the student
    # computes there
    with torch.no_grad():
        h = teacher.model.embed_tokens(ids)
        seq = teacher._seq_info(ids, None, pos, doc, None, h.dtype)
        h = teacher.model.layers[0](h, seq)
        h = teacher.model.layers[1](h, seq)
        t2 = teacher.model.layers[2]
        target = t2.self_attn(t2.input_layernorm(h), seq.rope, seq.attn_mask)
        s2 = student.model.layers[2]
        got = s2.mamba(s2.input_layernorm(h), student._seq_info(ids, None, pos, doc, None, h.dtype))
        want = (((got - target) ** 2).mean(-1) * mask).sum()
    assert abs(per_layer[1] - float(want)) < 1e-4 * max(1.0, float(want))
    value = float(loss.detach())
    assert abs(value - (per_layer[0] + per_layer[1]) / 2) < 1e-4 * max(1.0, value)
    loss.backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".mamba." in n or "input_layernorm" in n for n in grads), sorted(grads)[:5]
    assert not any(n.startswith("model.layers.1.") or n.startswith("model.layers.3.") for n in grads)


def test_optimising_alignment_lowers_every_converted_layers_error(tiny_teacher):
    teacher = convert(tiny_teacher, list(range(4))).eval()
    student = convert(tiny_teacher, [1, 3])
    batch = _batch(seed=1)
    opt = torch.optim.Adam([p for n, p in student.named_parameters() if ".mamba." in n], lr=3e-3)
    _, before = alignment_sums(student, teacher, *batch)
    for _ in range(30):
        loss, _ = alignment_sums(student, teacher, *batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, after = alignment_sums(student, teacher, *batch)
    assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)
    held_out = _batch(seed=2)  # and on rows it never saw
    fresh = convert(tiny_teacher, [1, 3])
    assert alignment_sums(student, teacher, *held_out)[0] < alignment_sums(fresh, teacher, *held_out)[0]


def test_align_stage_lowers_the_layers_error_and_publishes_a_model(train_setup, tmp_path):
    """The stage through the trainer (components/train/stage.py with section align) on the tiny fixture: the
    converted layers' MSE falls from the first step to the last, and distill can start from what it publishes."""
    import json

    from components.config import load_config
    from components.model import HybridForCausalLM
    from components.train.stage import run

    root, data = train_setup
    cfg = load_config(overrides={"run_dir": str(tmp_path / "run"), "teacher": {"source": "random:tiny"},
                                 "tracking": {"enabled": False},
                                 "align": {"enabled": True, "max_steps": 8, "global_batch_size": 4,
                                           "micro_batch_size": 2, "warmup_steps": 1, "lr": 3e-3,
                                           "checkpoint_every": 4, "eval_rows": 4}})
    out = run(cfg, {"model_dir": root / "conv", "data_dir": data}, "align")
    history = [json.loads(line) for line in (tmp_path / "run" / "align" / "history.jsonl").read_text().splitlines()]
    layers = [k for k in history[0] if k.startswith("align_mse/")]
    assert layers == ["align_mse/layer_0", "align_mse/layer_2"]  # attention stays at 1 and 3
    assert all(history[-1][k] < history[0][k] for k in layers), (history[0], history[-1])
    assert history[0]["loss"] == pytest.approx(sum(history[0][k] for k in layers) / 2)
    assert out.metrics["kl"] == 0.0 and out.metrics["heldout/kl"] >= 0
    model = HybridForCausalLM.from_pretrained(out.model_dir)
    assert [layer.kind for layer in model.model.layers] == ["mamba1", "attention", "mamba1", "attention"]
