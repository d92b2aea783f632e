"""bench/grpo_seeds_report.py (issue 22): per-seed paired gains read from each GRPO run and the across-seed mean
with its standard error, against hand-computed values; seeds scored on different held-out sets are refused."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import grpo_seeds_report as gsr


def _seed(root: Path, name: str, before: float, after: float, pn_before: float, pn_after: float,
          prompts: float = 128.0) -> Path:
    d = root / name
    (d / "grpo").mkdir(parents=True)
    (d / "grpo" / "grpo_metrics.json").write_text(json.dumps({
        "steps": 60, "heldout/prompts": prompts, "heldout/samples": 8.0,
        "heldout/accuracy_before": before, "heldout/accuracy": after, "heldout/gain": after - before,
        "heldout/gain_se": 0.009, "heldout/pass_at_n_before": pn_before, "heldout/pass_at_n": pn_after,
        "heldout/mixed_fraction_before": 0.2, "heldout/mixed_fraction": 0.1}))
    return d


def test_mean_gain_and_its_se_across_seeds(tmp_path):
    seeds = [_seed(tmp_path, "seed0", 0.10, 0.14, 0.30, 0.31), _seed(tmp_path, "seed1", 0.10, 0.12, 0.30, 0.29),
             _seed(tmp_path, "seed2", 0.11, 0.14, 0.30, 0.30)]
    rec = gsr.report(seeds, "bench/lent_gpu/gpu_grpo_seeds.sh 0 1 2")
    assert [r["seed"] for r in rec["per_seed"]] == ["seed0", "seed1", "seed2"]
    assert [r["gain"] for r in rec["per_seed"]] == [0.04, 0.02, 0.03]
    s = rec["across_seeds"]
    # gains 4, 2, 3 points: mean 3, sample stdev 1, SE 1 / sqrt(3)
    assert s["seeds"] == 3 and s["mean_gain"] == 0.03
    assert s["mean_gain_se"] == pytest.approx(0.01 / math.sqrt(3), abs=1e-6)
    assert s["mean_before"] == pytest.approx(0.31 / 3, abs=1e-6) and s["mean_after"] == pytest.approx(0.4 / 3, abs=1e-6)
    assert s["seeds_gaining"] == 3
    assert s["mean_pass_at_n_before"] == 0.3 and s["mean_pass_at_n_after"] == 0.3
    assert s["target_reached"] is True


def test_target_needs_pass_at_n_kept(tmp_path):
    seeds = [_seed(tmp_path, "a", 0.10, 0.15, 0.30, 0.25), _seed(tmp_path, "b", 0.10, 0.15, 0.30, 0.28)]
    s = gsr.report(seeds)["across_seeds"]
    assert s["mean_gain"] == 0.05 and s["mean_gain_se"] == 0.0
    assert s["target_reached"] is False  # sharpened: pass@n 0.30 -> 0.265


def test_different_heldout_sets_and_missing_runs_are_refused(tmp_path, capsys):
    a = _seed(tmp_path, "a", 0.1, 0.2, 0.3, 0.3)
    b = _seed(tmp_path, "b", 0.1, 0.2, 0.3, 0.3, prompts=512.0)
    with pytest.raises(ValueError, match="different held-out sets"):
        gsr.report([a, b])
    assert gsr.main([str(a), str(tmp_path / "nope"), "--out", str(tmp_path / "r.json")]) == 2
    assert "nope: no grpo/grpo_metrics.json" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_main_writes_the_record_and_its_plot(tmp_path):
    seeds = [_seed(tmp_path, f"seed{i}", 0.1, 0.1 + 0.01 * i, 0.3, 0.3) for i in range(3)]
    out = tmp_path / "res" / "grpo_seeds.json"
    assert gsr.main([*map(str, seeds), "--command", "x", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["command"] == "x" and rec["across_seeds"]["mean_gain"] == 0.01
    assert out.with_suffix(".png").stat().st_size > 0
