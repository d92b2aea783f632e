"""Hybrid against transformer at equal generation time: the two arms' time-budget curves (timebudget.curves, same
budgets for both, each priced at its own measured throughput) read side by side.

Per strategy (self-consistency, longer maximum length) and budget: the accuracy gap hybrid - transformer in
points with its standard error (the two arms' SEs over problems combined as independent), which arm leads, and
the budgets where the lead changes hands (the curves cross). The verdict counts only budgets where neither curve is
capped (beyond a pool, a curve cannot grow: comparing there would read the pool's size, not the arms).

Simplification: the SEs treat the arms as independent although they answer the same problems (a paired SE would
be smaller); the gap is reported with the larger, conservative one."""
from __future__ import annotations

import math

ARMS = ("hybrid", "transformer")
STRATEGIES = ("self_consistency", "max_length")


def compare(rows: list[dict], benchmark: str = "all") -> dict:
    """rows: time_budget.csv rows (as curves() returns them) holding both arms. -> {strategy: {...}}."""
    out = {}
    for strategy in STRATEGIES:
        by_arm = {arm: {r["budget_s"]: r for r in rows if r["model"] == arm and r["strategy"] == strategy
                        and r["benchmark"] == benchmark} for arm in ARMS}
        budgets = sorted(set(by_arm["hybrid"]) & set(by_arm["transformer"]))
        points = []
        for b in budgets:
            h, t = by_arm["hybrid"][b], by_arm["transformer"][b]
            gap = 100 * (h["accuracy"] - t["accuracy"])
            se = 100 * math.sqrt(h.get("se", 0.0) ** 2 + t.get("se", 0.0) ** 2)
            points.append({"budget_s": b, "hybrid": h["accuracy"], "transformer": t["accuracy"], "gap_points": gap,
                           "gap_se_points": se, "capped": bool(h["capped"] or t["capped"]),
                           "lead": "hybrid" if gap > 0 else "transformer" if gap < 0 else "tie"})
        free = [p for p in points if not p["capped"]]
        crossings = [b["budget_s"] for a, b in zip(free, free[1:])
                     if {a["lead"], b["lead"]} == {"hybrid", "transformer"}]
        wins = sum(p["lead"] == "hybrid" for p in free)
        losses = sum(p["lead"] == "transformer" for p in free)
        best = max(free, key=lambda p: p["gap_points"], default=None)
        out[strategy] = {
            "budgets": len(points), "uncapped": len(free), "hybrid_ahead": wins, "transformer_ahead": losses,
            "mean_gap_points": sum(p["gap_points"] for p in free) / len(free) if free else None,
            "largest_gap_points": best["gap_points"] if best else None,
            "largest_gap_at_s": best["budget_s"] if best else None,
            "crossings_s": crossings, "points": points,
            "verdict": _verdict(wins, losses, len(free)),
        }
    return out


def _verdict(wins: int, losses: int, n: int) -> str:
    if n == 0:
        return "no budget where neither curve is capped"
    if wins and not losses:
        return "hybrid ahead or level at every uncapped budget"
    if losses and not wins:
        return "transformer ahead or level at every uncapped budget"
    if not wins and not losses:
        return "level at every uncapped budget"
    return f"mixed: hybrid ahead at {wins}, transformer at {losses} of {n} uncapped budgets"


def metrics(comparison: dict) -> dict[str, float]:
    """Flat numbers for MLflow / dvc metrics: arms/<strategy>/<name>."""
    out = {}
    for strategy, c in comparison.items():
        for name in ("hybrid_ahead", "transformer_ahead", "uncapped", "mean_gap_points", "largest_gap_points"):
            if c[name] is not None:
                out[f"arms/{strategy}/{name}"] = float(c[name])
    return out
