"""Does generation on CUDA agree with a plain forward of the same model? For a trained model directory: greedy
continuations of a few RL prompts by each engine (eager / graph) and kernel path (torch / mamba_ssm), each
compared token by token with the first, and the recorded log-probs against a teacher-forced forward.

    python3 bench/gpu_generation_check.py runs/gpu/sft2/model runs/gpu/data/rl --out $OUT/generation_check.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("rl_dir")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from components.grpo.batch import load_prompts
    from components.model import HybridForCausalLM, generate

    tok = AutoTokenizer.from_pretrained(a.model)
    model = HybridForCausalLM.from_pretrained(a.model, device=a.device).float().eval()
    rows = load_prompts(a.rl_dir)[: a.n]
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    report = {}
    base = None
    for kernels in ("torch", "auto"):
        for engine in ("eager", "graph" if a.device == "cuda" else "static"):
            os.environ["M1_KERNELS"] = kernels
            out = generate(model, prompts, a.new, greedy=True, engine=engine, tokenizer=tok)
            # teacher-forced log-probs of the generated tokens, one prompt at a time (no padding)
            tf = []
            with torch.no_grad():
                for p, t in zip(prompts, out.tokens):
                    ids = torch.tensor([p + t], device=a.device)
                    lp = torch.log_softmax(model(ids)[0, len(p) - 1:-1].float(), -1)
                    tf.append(lp.gather(-1, torch.tensor(t, device=a.device)[:, None])[:, 0].tolist())
            diff = max(abs(x - y) for r, f in zip(out.logprobs, tf) for x, y in zip(r, f))
            key = f"{kernels}/{engine}"
            base = base or out.tokens
            same = sum(int(x == y) for r, s in zip(out.tokens, base) for x, y in zip(r, s))
            report[key] = {"max_logprob_vs_forward": diff, "tokens_equal_to_first": same,
                           "tokens": sum(len(r) for r in base), "texts": out.texts}
            print(key, f"max |logprob - forward| {diff:.3g}", f"same tokens {same}", repr(out.texts[0][:160]), flush=True)
    os.environ.pop("M1_KERNELS", None)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
