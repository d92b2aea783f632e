"""The speed benchmark's command line (bench/speed.py, `m1 bench`): arguments, device and dtype resolution, and
the run from parsed arguments."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from components.evaluate.speed import (
    ENGINES,
    SHAPE_ATTN,
    environment,
    hybrid_config,
    run_speed,
)
from components.evaluate.speed_report import format_table, speedup_lines, write_outputs


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _engines(text: str) -> list[str]:
    names = [x for x in text.replace(" ", "").split(",") if x]
    bad = [x for x in names if x not in ENGINES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown engines {bad}; known: {', '.join(ENGINES)}")
    return names


def add_arguments(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    d = {"device": "auto", "shape": "tiny", "batch": [1, 4], "prompt_len": 256, "decode_len": [64, 512],
         "engines": list(ENGINES), "dtype": "auto", **(defaults or {})}
    p.add_argument("--device", default=d["device"], help="cpu, cuda, cuda:N or auto")
    p.add_argument("--shape", default=d["shape"], help=f"random Llama shape: {', '.join(SHAPE_ATTN)}")
    p.add_argument("--attn-layers", type=_ints, default=None, help="hybrid's attention layers (default: the recipe's)")
    p.add_argument("--mixer", choices=["mamba1", "mamba2"], default="mamba1")
    p.add_argument("--batch", type=_ints, default=d["batch"], help="batch sizes, e.g. 1,16,64,128,256")
    p.add_argument("--prompt-len", type=int, default=d["prompt_len"])
    p.add_argument("--decode-len", type=_ints, default=d["decode_len"], help="decode lengths, e.g. 512,4096")
    p.add_argument("--engines", type=_engines, default=d["engines"], help=f"subset of {','.join(ENGINES)}")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=d["dtype"],
                   help="auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--hf-compile", action="store_true",
                   help="let transformers compile its static-cache forward (off: disable_compile=True)")
    p.add_argument("--decode-engine", choices=["auto", "eager", "static", "graph"], default="auto",
                   help="our generate()'s decode engine (auto = CUDA graphs on CUDA, eager on CPU)")
    p.add_argument("--time-limit-s", type=float, default=None, help="start no new configuration after this")
    p.add_argument("--out", default=None, help="output directory for speed.csv / speed.json / speed.png")


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device {device} requested but CUDA is not available")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)


def run_from_args(args, command: str | None = None) -> tuple[list[dict], dict]:
    dev, dt = resolve(args.device, args.dtype)
    cfg = hybrid_config(args.shape, args.attn_layers, args.mixer)
    meta = {"shape": args.shape, "attn_layers": cfg.attn_layers, "mixer": cfg.mixer,
            "layers": cfg.num_hidden_layers, **environment(dev, dt, command),
            "python": platform.python_version(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    rows = run_speed(cfg, args.shape, args.engines, args.batch, args.prompt_len, args.decode_len, dev, dt,
                     seed=args.seed, warmup=not args.no_warmup, hf_compile=args.hf_compile,
                     time_limit_s=args.time_limit_s, command=meta["command"], decode_engine=args.decode_engine)
    return rows, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/speed.py", description="Generation-speed benchmark: the hybrid against a transformer of the same shape.")
    add_arguments(p)
    args = p.parse_args(argv)
    command = "python3 bench/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, meta = run_from_args(args, command)
    out = Path(args.out or os.path.join("bench", "results", f"speed-{args.shape}-{meta['device'].replace(':', '')}"))
    paths = write_outputs(rows, out, meta)
    print(format_table(rows))
    for line in speedup_lines(rows):
        print(line)
    print(f"wrote {', '.join(str(p) for p in paths.values() if p)}")
    return 0
