"""bench/gpu_suite.py train (issue 20, item 5): its configuration list parses, and the chunked LM-head loss it
times gives the plain loss and gradients on a tiny hybrid (CPU)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import gpu_suite

from components.model import HybridConfig, HybridForCausalLM
from components.model.teacher import random_llama_config


def test_default_runs_parse_and_a_bad_entry_is_named():
    runs = gpu_suite.parse_train_runs(gpu_suite.TRAIN_RUNS)
    assert {r["loss"] for r in runs} == {"plain", "chunked"} and any(r["compile_mlp"] for r in runs)
    assert {(r["grad_ckpt"], r["shape"]) for r in runs} >= {(True, "llama-3.2-3b"), (False, "llama-3.2-3b")}
    with pytest.raises(SystemExit, match="bad entry 'llama-3.2-3b:2:sometimes:plain'"):
        gpu_suite.parse_train_runs("llama-3.2-3b:2:sometimes:plain")


def test_chunked_loss_equals_the_plain_loss_and_gradients():
    torch.manual_seed(0)
    m = HybridForCausalLM(HybridConfig.from_llama(random_llama_config("tiny"), attn_layers=[1])).train()
    ids = torch.randint(0, m.config.vocab_size, (2, 24))

    def run(loss):
        m.zero_grad(set_to_none=True)
        value = gpu_suite.train_loss(m, ids, loss)
        value.backward()
        return value.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain, g_plain = run("plain")
    chunked, g_chunked = run("chunked")  # bf16 matmuls in the LM head, fp32 softmax
    assert torch.allclose(chunked, plain, rtol=1e-2)
    assert g_chunked.keys() == g_plain.keys()
    for n in g_plain:
        assert (g_chunked[n] - g_plain[n]).norm() <= 3e-2 * g_plain[n].norm() + 1e-6, n
