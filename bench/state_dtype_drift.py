"""How far a bf16 SSM state moves the hybrid's logits, against how far bf16 weights move them (issue 20, item 1:
"bf16 state where accuracy allows (measure the logit drift)").

    python bench/state_dtype_drift.py --out docs/results/speed/state_dtype_drift.json

The trajectory: the teacher (SmolLM2-135M-Instruct, embedded GGUF) answers --problems CHAMP problems greedily for
--tokens tokens, so the hybrid reads realistic text. The hybrid (the teacher converted with params.yaml's attention
layers, or --model DIR, e.g. a distilled one) then reads prompt + trajectory teacher-forced, step by step through
its decode path, in three set-ups run in lockstep on the same tokens:
  reference      fp32 weights, fp32 SSM state
  bf16_state     fp32 weights, SSM state stored in bf16 between steps (cache.py: updated in fp32, rounded once)
  bf16_weights   bf16 weights, fp32 state: the rounding every GPU run already has, the yardstick
Per step and row: KL(reference || set-up) over the vocabulary, max |logit difference|, top-1 agreement. A bf16 state
is harmless when its drift sits well below the bf16 weights' drift at every position. Free-running greedy
generations are compared too (the first position where the tokens part), though greedy ties make that noisy.

Simplifications: the default hybrid is converted, not distilled (its Mamba layers carry the conversion's dt and A,
the state magnitudes a distilled model starts from); one trajectory per problem; CPU, so bf16 matmuls are CPU
kernels (their rounding matches a GPU's in kind, not bit for bit).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.config import load_config
from components.figures import save_figure
from components.model import HybridForCausalLM, convert, generate
from components.model.generate import left_pad
from components.model.teacher import load_any_teacher, load_any_tokenizer

SETUPS = ("bf16_state", "bf16_weights")


def champ_prompts(tok, n: int) -> list[list[int]]:
    import champ_dataset

    problems = list(champ_dataset.load("v0").problems.values())[:n]
    return [tok.apply_chat_template([{"role": "user", "content": p.text + "\nPut the final answer in \\boxed{}."}],
                                    add_generation_prompt=True, tokenize=True, return_dict=False) for p in problems]


@torch.no_grad()
def lockstep(models: dict, prompts: list[list[int]], traj: torch.Tensor, pad: int) -> dict[str, dict[str, list]]:
    """Teacher-forced decode of prompt + traj in every set-up; per step, each set-up against the reference."""
    ids, mask = left_pad(prompts, pad, "cpu")
    T = traj.shape[1]
    caches, logits = {}, {}
    for name, (model, state_dtype) in models.items():
        caches[name] = model.new_cache(len(prompts), ids.shape[1] + T, state_dtype)
        logits[name] = model(ids, attention_mask=mask, cache=caches[name], logits_to_keep=1)[:, -1].float()
    per = {s: {"kl": [], "max_abs": [], "top1": []} for s in SETUPS}
    for t in range(T):
        ref = F.log_softmax(logits["reference"].double(), -1)  # fp64: a KL of 1e-7 must not drown in rounding
        for s in SETUPS:
            other = F.log_softmax(logits[s].double(), -1)
            per[s]["kl"].append((ref.exp() * (ref - other)).sum(-1).mean().item())
            per[s]["max_abs"].append((logits[s] - logits["reference"]).abs().max().item())
            per[s]["top1"].append((logits[s].argmax(-1) == logits["reference"].argmax(-1)).float().mean().item())
        if (t + 1) % 128 == 0:
            print(f"teacher-forced step {t + 1}/{T}: KL bf16 state {per['bf16_state']['kl'][-1]:.2e}, "
                  f"bf16 weights {per['bf16_weights']['kl'][-1]:.2e}", flush=True)
        if t + 1 < T:
            for name, (model, _) in models.items():
                logits[name] = model(traj[:, t:t + 1], cache=caches[name])[:, -1].float()
    return per


def first_divergence(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    out = []
    for x, y in zip(a, b):
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        out.append(k if k is not None or len(x) == len(y) else min(len(x), len(y)))
    return out


def windows(values: list[float], width: int) -> list[dict]:
    return [{"from": i, "to": min(i + width, len(values)), "mean": sum(values[i:i + width]) / len(values[i:i + width]),
             "max": max(values[i:i + width])} for i in range(0, len(values), width)]


def plot(per: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s, colour in zip(SETUPS, ("tab:blue", "tab:orange")):
        for ax, key in zip(axes, ("kl", "max_abs")):
            ax.plot(range(len(per[s][key])), [max(v, 1e-12) for v in per[s][key]], label=s.replace("_", " "),
                    color=colour, lw=1)
    axes[0].set(yscale="log", xlabel="decode step", ylabel="KL(reference || set-up), mean over rows")
    axes[1].set(yscale="log", xlabel="decode step", ylabel="max |logit difference|")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--model", help="a hybrid model dir (default: the teacher converted with params.yaml's layers)")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--window", type=int, default=64, help="positions per row of the windowed summary")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    started = time.time()
    tok = load_any_tokenizer(a.teacher)
    teacher = load_any_teacher(a.teacher)
    layers = load_config().convert.attn_layers
    hybrid = (HybridForCausalLM.from_pretrained(a.model) if a.model else convert(teacher, layers)).float().eval()
    attention = convert(teacher, list(range(teacher.config.num_hidden_layers))).eval()
    del teacher
    prompts = champ_prompts(tok, a.problems)
    pad = tok.pad_token_id
    # the trajectory: the teacher's own greedy answer, run to --tokens (no stop) so every row has the same length
    teacher_out = generate(attention, prompts, a.tokens, greedy=True, eos_token_ids=[], pad_token_id=pad)
    traj = torch.tensor(teacher_out.tokens)
    del attention
    low = HybridForCausalLM(hybrid.config)
    low.load_state_dict(hybrid.state_dict())
    low = low.to(torch.bfloat16).eval()
    models = {"reference": (hybrid, torch.float32), "bf16_state": (hybrid, torch.bfloat16),
              "bf16_weights": (low, torch.float32)}
    per = lockstep(models, prompts, traj, pad)
    free = {name: generate(m, prompts, a.tokens, greedy=True, eos_token_ids=[], pad_token_id=pad,
                           state_dtype=sd).tokens for name, (m, sd) in models.items()}
    summary = {s: {"kl_mean": sum(per[s]["kl"]) / len(per[s]["kl"]), "kl_max": max(per[s]["kl"]),
                   "max_abs_logit_diff": max(per[s]["max_abs"]),
                   "top1_agreement": sum(per[s]["top1"]) / len(per[s]["top1"]),
                   "greedy_first_divergence": first_divergence(free["reference"], free[s]),
                   "windows_kl": windows(per[s]["kl"], a.window)} for s in SETUPS}
    summary["kl_ratio_state_to_weights"] = summary["bf16_state"]["kl_mean"] / max(summary["bf16_weights"]["kl_mean"], 1e-30)
    out_path = Path(a.out)
    out = {"command": " ".join(["python bench/state_dtype_drift.py"] + [shlex.quote(x) for x in (argv or sys.argv[1:])]),
           "date": time.strftime("%Y-%m-%d"), "device": f"cpu ({os.cpu_count()} cores, {platform.machine()})",
           "torch": torch.__version__, "model": a.model or f"{a.teacher} converted, attention at {layers}",
           "problems": a.problems, "tokens": a.tokens, "seconds": round(time.time() - started, 1),
           "summary": summary, "per_step": per}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    plot(per, out_path.with_suffix(".png"), f"Logit drift over {a.tokens} teacher-forced steps, {a.problems} CHAMP problems")
    print(json.dumps({s: {k: v for k, v in summary[s].items() if k != "windows_kl"} for s in SETUPS}),
          f"\nKL ratio bf16 state / bf16 weights: {summary['kl_ratio_state_to_weights']:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
