"""`m1 grpo`: the GRPO stage on its own, from the SFT-2 model (or --model)."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("grpo", help="run the GRPO stage")
    p.add_argument("--profile", default="default")
    p.add_argument("--params", default=None)
    p.add_argument("--model", default=None, help="input model dir (default <run_dir>/sft2/model)")
    p.add_argument("--data", default=None, help="curated data dir (default <run_dir>/data)")
    p.set_defaults(func=_grpo)


def _grpo(args) -> int:
    from components.config import load_config
    from components.grpo.stage import run
    from components.tracking import standalone_run

    cfg = load_config(args.profile, args.params)
    run_dir = Path(cfg.run_dir)
    inputs = {"model_dir": args.model or run_dir / "sft2" / "model", "data_dir": args.data or run_dir / "data"}
    with standalone_run(cfg.tracking, "grpo", {"stage": "grpo", "profile": cfg.profile}):
        out = run(cfg, inputs)
    print(f"grpo: model -> {out.model_dir}")
    for k in ("heldout/accuracy_before", "heldout/accuracy_se_before", "heldout/accuracy", "heldout/accuracy_se"):
        if k in out.metrics:
            print(f"  {k:28s} {out.metrics[k]:.4f}")
    return 0
