"""Loss functions against hand-computed values; only assistant tokens inside one document carry loss."""
import math

import torch

from components.train.losses import distill_loss_sums, kl_per_token, target_mask


def test_reverse_forward_and_js_kl_by_hand():
    s = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]])
    t = torch.tensor([[math.log(0.25), math.log(0.25), math.log(0.5)]])
    rev = 0.5 * math.log(0.5 / 0.25) + 0.25 * 0 + 0.25 * math.log(0.25 / 0.5)
    fwd = 0.25 * math.log(0.25 / 0.5) + 0 + 0.5 * math.log(0.5 / 0.25)
    assert abs(kl_per_token(s, t, "reverse").item() - rev) < 1e-6
    assert abs(kl_per_token(s, t, "forward").item() - fwd) < 1e-6
    m = [0.375, 0.25, 0.375]
    ps, pt = [0.5, 0.25, 0.25], [0.25, 0.25, 0.5]
    js = 0.5 * sum(a * math.log(a / c) for a, c in zip(pt, m)) + 0.5 * sum(a * math.log(a / c) for a, c in zip(ps, m))
    assert abs(kl_per_token(s, t, "js", js_beta=0.5).item() - js) < 1e-6
    assert abs(kl_per_token(s, s, "reverse").item()) < 1e-7


def test_temperature_scales_logits_before_softmax():
    s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    p = torch.softmax(s / 2, -1)
    q = torch.softmax(t / 2, -1)
    want = (p * (p.log() - q.log())).sum().item()
    assert abs(kl_per_token(s, t, "reverse", temperature=2.0).item() - want) < 1e-6


def test_target_mask_skips_prompt_padding_and_document_boundaries():
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 0]])
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    # predictions of tokens 1..7: token 2,3 (doc 0 answer), 5,6 (doc 1 answer); token 4 starts doc 1, token 7 is pad
    assert target_mask(loss_mask, doc_ids).int().tolist() == [[0, 1, 1, 0, 1, 1, 0]]


def test_ce_token_mean_by_hand():
    V = 4
    logits = torch.zeros(1, 4, V)
    logits[0, 1, 2] = math.log(3.0)  # position 1 predicts token 2 with p = 3/6
    ids = torch.tensor([[0, 1, 2, 3]])
    loss_mask = torch.tensor([[0, 0, 1, 1]])
    loss, kl, ce, n = distill_loss_sums(logits, None, ids, loss_mask, None, 0.0, 1.0)
    assert n.item() == 2
    want = -math.log(0.5) - math.log(0.25)  # position 1 -> token 2 (p=1/2), position 2 -> token 3 (uniform)
    assert abs(ce.item() - want) < 1e-6 and abs(loss.item() - want) < 1e-6 and kl.item() == 0


def test_prompt_tokens_get_no_gradient():
    logits = torch.randn(1, 5, 7, requires_grad=True)
    teacher = torch.randn(1, 5, 7)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    loss, *_ = distill_loss_sums(logits, teacher, ids, torch.tensor([[0, 0, 0, 1, 1]]), None, 1.0, 1.0)
    loss.backward()
    g = logits.grad.abs().sum(-1)[0]
    assert g[:2].sum() == 0 and g[2] > 0 and g[3] > 0 and g[4] == 0  # positions 2,3 predict the answer tokens
