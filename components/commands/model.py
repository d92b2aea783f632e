"""`m1 convert`: turn a Llama teacher into a hybrid model directory (config.json + safetensors + tokenizer)."""
from __future__ import annotations

import argparse
import time


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--attn-layers wants comma-separated integers, got {text!r}") from None


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a Llama teacher into a hybrid Mamba/attention model")
    p.add_argument("--teacher", default=None,
                   help="hub id, local HF directory, .gguf file, 'smollm2' (embedded) or random:<shape>; "
                        "default: teacher.source of the profile")
    p.add_argument("--attn-layers", type=_layers, default=None, help="layers that keep attention, e.g. 4,9,14")
    p.add_argument("--mixer", choices=["mamba1", "mamba2"], default=None)
    p.add_argument("--out", default=None, help="output directory (default <run_dir>/convert/model)")
    p.add_argument("--profile", default="default")
    p.add_argument("--params", default=None)
    p.set_defaults(func=_convert)


def _convert(args) -> int:
    from components.config import load_config
    from components.model.convert import run

    over: dict = {}
    if args.teacher:
        over["teacher"] = {"source": args.teacher}
    conv = {}
    if args.attn_layers is not None:
        conv["attn_layers"] = args.attn_layers
    if args.mixer:
        conv["mixer"] = args.mixer
    if conv:
        over["convert"] = conv
    cfg = load_config(args.profile, args.params, over)
    t0 = time.time()
    out = run(cfg, {"out_dir": args.out} if args.out else None)
    print(f"converted {cfg.teacher.source} -> {out.model_dir}  ({out.num_parameters / 1e6:.1f}M parameters, "
          f"{out.mixer}, attention at {out.attn_layers}, {time.time() - t0:.0f}s)")
    return 0
