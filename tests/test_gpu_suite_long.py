"""bench/gpu_suite.py long (issue 20, item 3): the hybrid/all-attention ratio per decode length, at the fixed batch
and at each model's largest, from hand-made rows; the suite's plot script writes the table and the plot."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import gpu_suite
import plot_gpu_results


def _rows():
    return [
        {"model": "hybrid", "batch": 64, "decode": 1024, "tokens_per_s": 300.0},
        {"model": "hybrid", "batch": 900, "largest": True, "decode": 1024, "tokens_per_s": 2000.0},
        {"model": "attention", "batch": 64, "decode": 1024, "tokens_per_s": 200.0},
        {"model": "attention", "batch": 240, "largest": True, "decode": 1024, "tokens_per_s": 800.0},
        {"model": "hybrid", "batch": 64, "decode": 16384, "tokens_per_s": 280.0},
        {"model": "attention", "batch": 64, "decode": 16384, "oom": True},
        {"model": "attention", "batch": 30, "largest": True, "decode": 16384, "tokens_per_s": 100.0},
        {"model": "hybrid", "batch": 700, "largest": True, "decode": 16384, "tokens_per_s": 1500.0},
    ]


def test_ratios_per_length_at_the_fixed_and_the_largest_batch():
    r = gpu_suite.length_ratios(_rows(), 64)
    assert [(x["decode"], x["at"], x["ratio"]) for x in r] == [
        (1024, "batch 64", 1.5), (1024, "largest", 2.5), (16384, "largest", 15.0)]  # OOM pair left out
    assert r[1]["hybrid_batch"] == 900 and r[1]["attention_batch"] == 240


def test_plot_and_table_are_written(tmp_path):
    res = {"meta": {"device": "test"}, "shape": "llama-3.2-3b", "rows": _rows(),
           "ratios": gpu_suite.length_ratios(_rows(), 64)}
    (tmp_path / "long_llama-3.2-3b.json").write_text(json.dumps(res))
    plot_gpu_results.main(tmp_path)
    assert (tmp_path / "long_llama-3.2-3b.png").stat().st_size > 10_000
    assert (tmp_path / "long_llama-3.2-3b.csv").read_text().splitlines()[0].startswith("at,attention_batch")
    with pytest.raises(KeyError):
        gpu_suite.length_ratios([{"model": "hybrid", "batch": 64, "tokens_per_s": 1.0}], 64)  # a row needs its length
