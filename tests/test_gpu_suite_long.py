"""bench/gpu_suite.py long (issue 20, item 3): the hybrid/all-attention ratio per decode length, at the fixed batch
and at each model's largest, from hand-made rows; the suite's plot script writes the table and the plot."""
import csv
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


def test_decode_tables_keep_each_files_tag_and_device(tmp_path):
    """A tagged run (--tag _compiled) beside the default one, both with a device suffix: each gets its own table, the
    largest-batch file joins its own run's, and the decode profile's record is left alone."""
    def row(model, batch, tps):
        return {"model": model, "batch": batch, "tokens_per_s": tps, "ms_per_step": 1.0, "floor_ms_per_step": 0.5}

    def write(name, rows):
        res = {"meta": {"device": "test"}, "shape": "smollm2-135m", "prompt": 256, "decode": 1024, "rows": rows}
        (tmp_path / name).write_text(json.dumps(res))

    write("decode_smollm2-135m_h200.json", [row("hybrid", 1, 10.0)])
    write("decode_smollm2-135m_largest_h200.json", [row("hybrid", 512, 99.0)])
    write("decode_smollm2-135m_compiled_h200.json", [row("hybrid", 1, 20.0)])
    (tmp_path / "decode_profile_smollm2-135m_h200.json").write_text(json.dumps({"rows": [{"model": "hybrid"}]}))
    plot_gpu_results.main(tmp_path)
    def table(name):
        with open(tmp_path / name) as f:
            return [(int(r["batch"]), float(r["tokens_per_s"])) for r in csv.DictReader(f)]

    assert table("speed_smollm2-135m_h200.csv") == [(1, 10.0), (512, 99.0)]
    assert table("speed_smollm2-135m_compiled_h200.csv") == [(1, 20.0)]
    assert not (tmp_path / "speed_smollm2-135m_largest_h200.csv").exists()
    assert not list(tmp_path.glob("speed_profile*"))


def test_each_row_is_kept_in_a_partial_file_until_the_run_completes(tmp_path, monkeypatch):
    """A run stopped by its limit keeps the rows it measured (<name>.partial.json, rewritten after every row, with
    the rows of finished lengths of a long run first); the plot script leaves such a file alone."""
    path = tmp_path / "long_smollm2-135m.partial.json"
    monkeypatch.setitem(gpu_suite.PARTIAL, "path", str(path))
    monkeypatch.setitem(gpu_suite.PARTIAL, "rows", [_rows()[0]])
    monkeypatch.setattr(gpu_suite, "meta", lambda: {"device": "test"})
    rows = [_rows()[4]]
    gpu_suite.emit(rows)
    rows.append(_rows()[5])
    gpu_suite.emit(rows)
    rec = json.loads(path.read_text())
    assert rec["complete"] is False and rec["rows"] == [_rows()[0], _rows()[4], _rows()[5]]
    plot_gpu_results.main(tmp_path)
    assert not list(tmp_path.glob("*.csv"))
