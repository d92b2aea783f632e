"""Pick the layers that keep attention for a teacher by greedy ablation or KL-guided ranking
(components/train/layer_choice.py).

    python bench/attn_layer_choice.py --teacher smollm2 --rows runs/gpu/data/sft1_heldout --k 6 \
        --compare 4,9,14,19,24,29 --out docs/results/layer_choice/attn_layer_choice.json
    python bench/attn_layer_choice.py --method kl_guided --distill-steps 50 --train-rows runs/gpu/data/sft1 \
        --rows runs/gpu/data/sft1_heldout --k 6 --out docs/results/layer_choice/kl_guided.json   # on a GPU

Scores on the first --n-rows packed rows (first --tokens tokens of each). Prints each round, writes the chosen
layers with their KL, the KL of every --compare set, and a plot beside the JSON."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.figures import save_figure
from components.train.data import PackedRows
from components.train.layer_choice import (
    full_logits,
    greedy_attention_layers,
    kl_guided_ranking,
    kl_without_attention,
)
from components.train.losses import target_mask
from components.train.teacher_engine import load_teacher_engine


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--rows", required=True, help="a packed split written by the curate stage")
    ap.add_argument("--n-rows", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--compare", action="append", default=[], help="comma-separated layer set to score too")
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", choices=["greedy", "kl_guided"], default="greedy")
    ap.add_argument("--train-rows", help="kl_guided: the packed split each candidate is distilled on")
    ap.add_argument("--distill-steps", type=int, default=50, help="kl_guided: Adam steps per candidate")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.method == "kl_guided":
        return _kl_guided(args, argv)

    started = time.time()
    model = load_teacher_engine(args.teacher, "cpu", torch.float32)
    rows = PackedRows(args.rows)
    batches = []
    for i in range(min(args.n_rows, len(rows))):
        b = {k: v[:, :args.tokens] for k, v in rows.batch([i]).items()}
        mask = torch.zeros_like(b["input_ids"], dtype=torch.bool)
        mask[:, :-1] = target_mask(b["loss_mask"], b["doc_ids"])
        batches.append({"input_ids": b["input_ids"], "position_ids": b["position_ids"], "doc_ids": b["doc_ids"],
                        "mask": mask})

    def progress(round_, cand, kl):
        print(f"round {round_ + 1}: + layer {cand:2d} -> KL {kl:.4f}", flush=True)

    teacher_logits = full_logits(model, batches)
    chosen = greedy_attention_layers(model, batches, args.k, progress, teacher_logits)
    compare = {}
    for spec in args.compare:
        layers = [int(x) for x in spec.split(",")]
        compare[spec] = kl_without_attention(model, batches, teacher_logits, layers)
    out = {
        "command": " ".join(["python bench/attn_layer_choice.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])]),
        "teacher": args.teacher, "rows": args.rows, "n_rows": len(batches), "tokens": args.tokens,
        "chosen": [{"layer": layer, "kl": kl} for layer, kl in chosen],
        "attn_layers": sorted(layer for layer, _ in chosen),
        "compare": compare, "seconds": round(time.time() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    _plot(out, Path(args.out).with_suffix(".png"))
    print(json.dumps({"attn_layers": out["attn_layers"], "compare": compare}))
    return 0


def _batches(rows_dir: str, n_rows: int, tokens: int, device) -> list[dict]:
    rows = PackedRows(rows_dir)
    out = []
    for i in range(min(n_rows, len(rows))):
        b = {k: v[:, :tokens].to(device) for k, v in rows.batch([i]).items()}
        mask = torch.zeros_like(b["input_ids"], dtype=torch.bool)
        mask[:, :-1] = target_mask(b["loss_mask"], b["doc_ids"])
        out.append({"input_ids": b["input_ids"], "position_ids": b["position_ids"], "doc_ids": b["doc_ids"],
                    "mask": mask})
    return out


def _kl_guided(args, argv) -> int:
    from components.model import convert
    from components.model.teacher import load_any_teacher

    started = time.time()
    dev = torch.device(args.device)
    teacher = load_any_teacher(args.teacher)
    engine = load_teacher_engine(args.teacher, dev, torch.float32)
    n_layers = len(engine.model.layers)
    held = _batches(args.rows, args.n_rows, args.tokens, dev)
    train = _batches(args.train_rows or args.rows, args.n_rows, args.tokens, dev)
    held_t, train_t = full_logits(engine, held), full_logits(engine, train)

    def student(layers):
        return convert(teacher, layers).to(dev)

    def progress(layer, kl):
        print(f"attention back in layer {layer:2d} alone -> KL {kl:.4f} after {args.distill_steps} steps", flush=True)

    r = kl_guided_ranking(student, n_layers, train, train_t, held, held_t, args.distill_steps, args.lr, progress)
    out = {"command": " ".join(["python bench/attn_layer_choice.py"] +
                               [shlex.quote(a) for a in (argv or sys.argv[1:])]),
           "method": "kl_guided", "teacher": args.teacher, "rows": args.rows, "train_rows": args.train_rows,
           "distill_steps": args.distill_steps, "lr": args.lr, **r,
           "attn_layers": sorted(r["ranking"][:args.k]), "seconds": round(time.time() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"attn_layers": out["attn_layers"], "baseline_kl": r["baseline_kl"]}))
    return 0


def _plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ks = list(range(1, len(out["chosen"]) + 1))
    ax.plot(ks, [c["kl"] for c in out["chosen"]], "o-", label="greedy")
    for i, c in enumerate(out["chosen"]):
        ax.annotate(str(c["layer"]), (ks[i], c["kl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for spec, kl in out["compare"].items():
        ax.axhline(kl, ls="--", lw=1, color="gray")
        ax.annotate(f"[{spec}]", (ks[-1], kl), textcoords="offset points", xytext=(-120, 3), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("layers keeping attention")
    ax.set_ylabel("KL(ablated || teacher), nats/token")
    ax.legend()
    save_figure(fig, path, f"{out['teacher']}: attention kept by greedy ablation")


if __name__ == "__main__":
    raise SystemExit(main())
