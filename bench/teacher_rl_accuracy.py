"""How does the teacher itself do on the RL prompts? The embedded SmolLM2 teacher, loaded as the evaluate stage
loads it (an all-attention hybrid in the model core's engine; --teacher also takes a saved hybrid), answers the first N prompts of a curated rl/ directory greedily; a \\boxed{} answer anywhere
counts (the teacher was never taught <think>). Prints accuracy overall and per problem kind (the text before ':').

    python bench/teacher_rl_accuracy.py runs/gpu/data/rl --n 96 --new 96
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("rl_dir")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--new", type=int, default=96, help="new tokens per answer")
    ap.add_argument("--teacher", default="smollm2")
    a = ap.parse_args()
    from components.evaluate.models import load_eval_model
    from components.grpo import rewards as R
    from components.grpo.batch import load_prompts
    from components.model import generate

    t0 = time.time()
    em = load_eval_model("teacher", a.teacher)
    rows = load_prompts(a.rl_dir)[: a.n]
    prompts = [em.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    out = generate(em.model, prompts, a.new, greedy=True, tokenizer=em.tokenizer, eos_token_ids=em.eos_ids,
                   progress=True)
    res = [R.score("boxed_anywhere", t, r["answer"]) for t, r in zip(out.texts, rows)]
    by_kind = collections.defaultdict(list)
    for r, x in zip(rows, res):
        by_kind[r["problem"].split(":")[0][:40]].append(x.correct)
    correct = sum(x.correct for x in res)
    print(f"teacher {a.teacher}: {correct}/{len(res)} correct, greedy, {a.new} new tokens; "
          f"{dict(collections.Counter(x.reason for x in res))}; {time.time() - t0:.0f} s")
    for k, v in sorted(by_kind.items()):
        print(f"  {k:40s} {sum(v)}/{len(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
