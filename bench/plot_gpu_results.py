"""Turn the GPU suite's JSON (docs/results/speed/*.json, committed with a device suffix: *_h100.json,
*_h200.json) into CSV tables and PNG plots beside them, each with the suffix of its JSON:

    python3 bench/plot_gpu_results.py docs/results/speed

speed_<shape>_<device>.{csv,png}: tokens/s vs batch for prompt 256 + decode 4096 (m1 hybrid and all-attention);
anchors_<device>.{csv,png}: prompt 256 + decode 512, the m1 engine against HF static cache and mamba_ssm's engine;
long_<shape>.{csv,png}: the hybrid/all-attention ratio per decode length (gpu_suite.py long)."""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r})
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot_decode(res: dict, png: Path, title: str) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for model in ("hybrid", "attention"):
        rows = sorted([r for r in res["rows"] if r.get("model") == model and "oom" not in r], key=lambda r: r["batch"])
        if not rows:
            continue
        b = [r["batch"] for r in rows]
        ax[0].plot(b, [r["tokens_per_s"] for r in rows], "o-", label=f"m1 {model}")
        ax[1].plot(b, [r["ms_per_step"] for r in rows], "o-", label=f"m1 {model}: measured")
        ax[1].plot(b, [r["floor_ms_per_step"] for r in rows], "x--", label=f"m1 {model}: floor")
    for a, yl in zip(ax, ("tokens/s", "ms per decode step")):
        a.set_xscale("log", base=2)
        a.set_xlabel("batch size")
        a.set_ylabel(yl)
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _log2_axes(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_long(res: dict, png: Path) -> None:
    """gpu_suite.py long: tokens/s against decode length per model (fixed and largest batch), and the ratio."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for model in ("hybrid", "attention"):
        for largest, ls in ((False, "-"), (True, ":")):
            pts = sorted((r["decode"], r["tokens_per_s"]) for r in res["rows"]
                         if r.get("model") == model and "oom" not in r and bool(r.get("largest")) == largest)
            if pts:
                ax.plot(*zip(*pts), "o" + ls, label=f"{model}, {'largest batch' if largest else 'fixed batch'}")
    for kind in dict.fromkeys(r["at"] for r in res["ratios"]):
        bx.plot(*zip(*sorted((r["decode"], r["ratio"]) for r in res["ratios"] if r["at"] == kind)), "o-", label=kind)
    _log2_axes(ax, "decoded tokens (prompt 256)", "tokens/s")
    _log2_axes(bx, "decoded tokens (prompt 256)", "hybrid / all-attention tokens/s")
    fig.suptitle(f"long generations, {res['shape']} shape on {res['meta']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_anchors(res: dict, png: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    series = {}
    for r in res["rows"]:
        if "error" in r:
            continue
        series.setdefault(f"{r['engine']} {r['model']}", []).append((r["batch"], r["tokens_per_s"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    _log2_axes(ax, "batch size", "tokens/s (prompt 256, decode 512)")
    ax.set_yscale("log")
    ax.set_title(f"3B shape on {res['meta']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _device_suffix(stem: str) -> str:
    """"_h200" from "decode_smollm2-135m_h200" (the suffix each committed file carries); "" for the suite's own names."""
    tail = stem.rsplit("_", 1)[-1]
    return f"_{tail}" if re.fullmatch(r"h\d+", tail) else ""


def _finished(d: Path, pattern: str) -> list[Path]:
    """The suite's complete records; a run stopped by its time limit leaves <name>.partial.json instead."""
    return sorted(f for f in d.glob(pattern) if not f.name.endswith(".partial.json"))


def main(d: Path) -> None:
    for f in _finished(d, "decode_*.json"):
        dev = _device_suffix(f.stem)
        if f.stem.removesuffix(dev).endswith("_largest"):
            continue
        res = json.loads(f.read_text())
        if "decode" not in res or "meta" not in res:  # decode_profile's and the op census's records
            continue
        extra = d / f"{f.stem.removesuffix(dev)}_largest{dev}.json"
        if extra.is_file():
            res["rows"] += [r for r in json.loads(extra.read_text())["rows"] if "oom" not in r]
        shape = res["shape"]
        stem = "speed_" + f.stem.removeprefix("decode_")  # the JSON's tag and device: decode_<shape>[_tag][_dev]
        write_csv(d / f"{stem}.csv", [{"shape": shape, **r} for r in res["rows"]])
        plot_decode(res, d / f"{stem}.png", f"{shape}: prompt {res['prompt']}, decode {res['decode']}, "
                                                   f"{res['meta']['device']}")
    for f in _finished(d, "long_*.json"):
        res = json.loads(f.read_text())
        stem = f.name.removesuffix(".json")
        write_csv(d / f"{stem}.csv", res["ratios"])
        plot_long(res, d / f"{stem}.png")
    for a in _finished(d, "anchors*.json"):
        res = json.loads(a.read_text())
        write_csv(a.with_suffix(".csv"), [r for r in res["rows"] if "error" not in r])
        plot_anchors(res, a.with_suffix(".png"))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/speed"))
