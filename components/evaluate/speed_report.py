"""What a speed run writes: the CSV (one row per configuration), the JSON (rows, run metadata and the hybrid's
speed-ups), the figure (tokens/s and ms per decode step against batch size) and the console table."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from components.evaluate.speed import CSV_FIELDS, ENGINES
from components.figures import save_figure

# matplotlib is imported where the figure is drawn: seconds of start-up otherwise.


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in CSV_FIELDS})
    return path


def speedups(rows: list[dict]) -> list[dict]:
    """hybrid tokens/s divided by each other engine's, per (batch, decode_len) where both ran."""
    ok = {(r["engine"], r["batch"], r["decode_len"]): r["tokens_per_s"] for r in rows if r.get("status") == "ok"}
    out = []
    for (engine, b, d), tps in sorted(ok.items()):
        if engine != "hybrid":
            continue
        for other in ENGINES[1:]:
            if (other, b, d) in ok:
                out.append({"batch": b, "decode_len": d, "vs": other, "speedup": tps / ok[(other, b, d)]})
    return out


def speedup_lines(rows: list[dict]) -> list[str]:
    return [f"hybrid vs {s['vs']:<9} b={s['batch']:<4} D={s['decode_len']:<5} x{s['speedup']:.2f}" for s in speedups(rows)]


def plot_speed(rows: list[dict], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode_lens = sorted({r["decode_len"] for r in rows})
    fig, axes = plt.subplots(2, len(decode_lens), figsize=(max(8.0, 5.2 * len(decode_lens)), 7.5), squeeze=False)
    styles = {"hybrid": ("tab:red", "o"), "attention": ("tab:blue", "s"), "hf_static": ("tab:gray", "^")}
    for col, d in enumerate(decode_lens):
        for engine in ENGINES:
            pts = sorted((r["batch"], r) for r in rows if r["engine"] == engine and r["decode_len"] == d)
            ok = [(b, r) for b, r in pts if r.get("status") == "ok"]
            oom = [b for b, r in pts if r.get("status") in ("oom", "skipped_oom")]
            if not pts:
                continue
            c, m = styles[engine]
            label = engine + (f" (OOM at b>={min(oom)})" if oom else "")
            if ok:
                axes[0][col].plot([b for b, _ in ok], [r["tokens_per_s"] for _, r in ok], marker=m, color=c, label=label)
                axes[1][col].plot([b for b, _ in ok], [r["decode_ms_per_token"] for _, r in ok], marker=m, color=c,
                                  label=engine)
            elif oom:
                axes[0][col].plot([], [], marker=m, color=c, label=label)
        for row, ylabel in ((0, "generated tokens / s"), (1, "ms per decode step")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"decode {d} tokens")
        axes[0][col].legend(fontsize=8)
    return save_figure(fig, path, title)


def write_outputs(rows: list[dict], out_dir: str | Path, meta: dict, prefix: str = "speed") -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_csv(rows, out / f"{prefix}.csv")}
    js = out / f"{prefix}.json"
    js.write_text(json.dumps({**meta, "rows": rows, "speedups": speedups(rows)}, indent=2, default=str) + "\n")
    paths["json"] = js
    first = rows[0] if rows else {}
    title = (f"{meta.get('shape', '')}  prompt {first.get('prompt_len', '')}  {first.get('device_name', '')}  "
             f"{first.get('dtype', '')}  ssm={first.get('kernel_ssm', '')}")
    paths["png"] = plot_speed(rows, out / f"{prefix}.png", title) if rows else None
    return paths


def format_table(rows: list[dict]) -> str:
    lines = [f"{'engine':<10} {'batch':>5} {'decode':>6} {'status':<12} {'tok/s':>10} {'ms/step':>9} {'peak GiB':>8}"]
    for r in rows:
        ok = r.get("status") == "ok"
        pm = r.get("peak_mem_gib")
        tps = f"{r['tokens_per_s']:.1f}" if ok else "-"
        ms = f"{r['decode_ms_per_token']:.2f}" if ok else "-"
        mem = f"{pm:.2f}" if pm else "-"
        lines.append(f"{r['engine']:<10} {r['batch']:>5} {r['decode_len']:>6} {r['status']:<12} {tps:>10} {ms:>9} {mem:>8}")
    return "\n".join(lines)
