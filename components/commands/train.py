"""`m1 train align|distill|sft1|sft2`: one training stage on its own (what dvc.yaml's stages run through `m1 stage`)."""
from __future__ import annotations

from pathlib import Path

# The model each stage starts from, relative to run_dir, when --model is not given (distill: align's model when the
# config enables align).
DEFAULT_INPUT = {"align": "convert/model", "distill": "convert/model", "sft1": "distill/model", "sft2": "sft1/model"}


def register(sub) -> None:
    tsub = sub.add_parser("train", help="training stages").add_subparsers(dest="train_stage", required=True)
    for stage in DEFAULT_INPUT:
        p = tsub.add_parser(stage, help=f"run the {stage} stage")
        p.add_argument("--profile", default="default")
        p.add_argument("--params", default=None)
        p.add_argument("--model", default=None, help=f"input model dir (default <run_dir>/{DEFAULT_INPUT[stage]})")
        p.add_argument("--data", default=None, help="curated data dir (default <run_dir>/data)")
        p.set_defaults(func=_train, stage=stage)


def _train(args) -> int:
    from components.config import load_config
    from components.tracking import standalone_run
    from components.train.stage import run

    cfg = load_config(args.profile, args.params)
    run_dir = Path(cfg.run_dir)
    start = "align/model" if args.stage == "distill" and cfg.align.enabled else DEFAULT_INPUT[args.stage]
    inputs = {"model_dir": args.model or run_dir / start, "data_dir": args.data or run_dir / "data"}
    with standalone_run(cfg.tracking, f"{args.stage}", {"stage": args.stage, "profile": cfg.profile}):
        out = run(cfg, inputs, args.stage)
    keys = ["loss", "kl", "ce", "heldout/kl_before", "heldout/kl", "heldout/ppl_before", "heldout/ppl", "heldout/teacher_ppl"]
    print(f"{args.stage}: model -> {out.model_dir}")
    for k in keys:
        if k in out.metrics:
            print(f"  {k:22s} {out.metrics[k]:.4f}")
    return 0
