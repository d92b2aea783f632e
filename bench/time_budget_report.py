"""The hybrid-vs-transformer result of one pipeline run with both arms, for docs/results: the time-budget table in
the columns the docs use, the figure, the arms comparison (components/evaluate/arms.py) and each arm's measured
generation throughput at the batch size it was timed at.

    python bench/time_budget_report.py --profile gpu2-arms --out docs/results/time_budget_gpu

writes <out>.csv (arm, strategy, budget_s, accuracy, se, samples, max_new_tokens, capped, tokens_per_s),
<out>.png and <out>.json. Reads what the evaluate stage wrote under the profile's run_dir/eval; runs nothing."""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.config import load_config
from components.errors import M1Error

COLUMNS = ["arm", "strategy", "budget_s", "accuracy", "se", "samples", "max_new_tokens", "capped", "tokens_per_s"]


def report(eval_dir: Path, out: Path, benchmark: str = "all") -> dict:
    tb, arms_json = eval_dir / "time_budget.csv", eval_dir / "arms.json"
    if not arms_json.is_file():
        raise M1Error(f"{arms_json} missing: the run's evaluate stage did not score both arms (config.arms)")
    rows = [r for r in csv.DictReader(tb.open()) if r["benchmark"] == benchmark]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            length = r["max_len"] if r["strategy"] == "max_length" else ""
            w.writerow({"arm": r["model"], "strategy": r["strategy"], "budget_s": r["budget_s"],
                        "accuracy": r["accuracy"], "se": r["se"], "samples": r["samples"], "max_new_tokens": length,
                        "capped": r["capped"], "tokens_per_s": r["tokens_per_s"]})
    shutil.copyfile(eval_dir / "time_budget.png", out.with_suffix(".png"))
    models = json.loads((eval_dir / "models.json").read_text())
    record = {"throughput": {m: i.get("throughput") for m, i in models.items()},
              "arms": json.loads(arms_json.read_text())}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="gpu")
    ap.add_argument("--out", type=Path, required=True, help="path without suffix: <out>.csv/.png/.json")
    ap.add_argument("--benchmark", default="all")
    ap.add_argument("--run-dir", type=Path, help="default: the profile's run_dir")
    a = ap.parse_args()
    try:
        rec = report((a.run_dir or Path(load_config(a.profile).run_dir)) / "eval", a.out, a.benchmark)
    except M1Error as e:
        print(f"time_budget_report: error: {e}", file=sys.stderr)
        return 2
    for strategy, c in rec["arms"].items():
        print(f"{strategy}: {c['verdict']}; mean gap {c['mean_gap_points']} points; crossings at {c['crossings_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
