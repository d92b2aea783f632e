"""Metric keys and the result tables of the evaluate stage.

Metric keys are flat and MLflow-safe (MLflow allows letters, digits, _ - . / : and spaces, so "pass@k" is written
pass_at_k): `<model>/<benchmark>/pass_at_1`, `.../pass_at_1_se`, `.../pass_at_<k>`, `.../maj_at_<k>`,
`.../problems`, `.../no_answer_rate`, `.../truncated_rate`, `.../mean_tokens`; `<model>/all/...` pools every problem
of every benchmark; `<model>/source/<source>/...` groups by the problem's source; `data/<benchmark>/excluded` and
`.../rows` count the rows read and excluded per benchmark. Wall-clock numbers live under `<model>/timing/...` and
`speed/...`, the only keys that change between two runs with the same seed.
"""
from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path

from components.evaluate.metrics import ProblemScore, aggregate

_BAD = re.compile(r"[^A-Za-z0-9_./: -]")


def key(*parts) -> str:
    return "/".join(_BAD.sub("_", str(p)) for p in parts)


def grouped(scores: Sequence[ProblemScore], by: str) -> dict[str, list[ProblemScore]]:
    out: dict[str, list[ProblemScore]] = {}
    for p in scores:
        out.setdefault(getattr(p, by), []).append(p)
    return out


def model_metrics(model: str, scores: Sequence[ProblemScore], ks: Sequence[int]) -> dict[str, float]:
    out = {}
    groups = {"all": list(scores), **grouped(scores, "benchmark")}
    for bench, ps in groups.items():
        for k, v in aggregate(ps, ks).items():
            out[key(model, bench, k)] = v
    for src, ps in grouped(scores, "source").items():
        for k, v in aggregate(ps, ks).items():
            out[key(model, "source", src, k)] = v
    return out


def _cols(ks: Sequence[int]) -> list[tuple[str, str]]:
    cols = [("problems", "problems"), ("samples", "samples"), ("pass_at_1", "pass@1"), ("pass_at_1_se", "pass@1 SE")]
    cols += [(f"pass_at_{k}", f"pass@{k}") for k in ks if k != 1]
    cols += [(f"maj_at_{k}", f"maj@{k}") for k in ks]
    cols += [("no_answer_rate", "no answer"), ("truncated_rate", "truncated"), ("mean_tokens", "mean tokens")]
    return cols


def table_rows(scores: dict[str, Sequence[ProblemScore]], ks: Sequence[int], by: str,
               excluded: dict[str, int] | None = None) -> list[dict]:
    rows = []
    for model, ps in scores.items():
        groups = grouped(ps, by)
        if by == "benchmark":
            groups["all"] = list(ps)
        for name, g in groups.items():
            agg = aggregate(g, ks)
            row = {"model": model, by: name, **{c: agg.get(c) for c, _ in _cols(ks)}}
            if excluded is not None:
                row["excluded"] = sum(excluded.values()) if name == "all" else excluded.get(name, 0)
            rows.append(row)
    return rows


def _fmt(v, col: str) -> str:
    if v is None:
        return ""
    if col in ("problems", "samples", "excluded"):
        return str(int(v))
    if col == "mean_tokens":
        return f"{v:.1f}"
    return f"{v:.4f}"


def write_tables(rows: list[dict], ks: Sequence[int], by: str, csv_path: Path, md_path: Path, title: str) -> None:
    cols = [("model", "model"), (by, by)] + ([("excluded", "excluded")] if rows and "excluded" in rows[0] else [])
    cols += _cols(ks)
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c for c, _ in cols])
        for r in rows:
            w.writerow([r.get(c) if isinstance(r.get(c), str) else _fmt(r.get(c), c) for c, _ in cols])
    lines = [f"# {title}", "", "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(r[c] if isinstance(r.get(c), str) else _fmt(r.get(c), c) for c, _ in cols) + " |")
    lines += ["", ("pass@1 = mean over problems of (correct samples / n), SE = stdev of the per-problem means / "
                   "sqrt(problems); pass@k unbiased (1 - C(n-c,k)/C(n,k)); maj@k = majority vote over the first k "
                   "samples, answers grouped by math-verify equivalence, ties to the group seen first, no answer "
                   "abstains (components/evaluate/metrics.py).")]
    md_path.write_text("\n".join(lines) + "\n")


def write_jsonl(records, path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
    return path
