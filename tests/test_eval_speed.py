"""Speed benchmark on CPU with a tiny grid: rows, outputs and environment record; out-of-memory configurations are
recorded and larger batches skipped; bench/speed.py runs without pydantic, MLflow or Ray."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from components.evaluate import speed, speed_report

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_grid_rows_and_outputs(tmp_path):
    cfg = speed.hybrid_config("tiny")
    assert cfg.attn_layers == speed.SHAPE_ATTN["tiny"]
    rows = speed.run_speed(cfg, "tiny", list(speed.ENGINES), [1, 2], 8, [3], torch.device("cpu"), torch.float32,
                           warmup=False, command="test", progress=False)
    assert [(r["engine"], r["batch"], r["status"]) for r in rows] == [
        (e, b, "ok") for e in speed.ENGINES for b in (1, 2)]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["decode_ms_per_token"] > 0
        if r["engine"] != "hf_static":  # our engine's laps: prefill is part of the same run
            assert 0 < r["ttft_s"] < r["total_s"]
        assert r["device"] == "cpu" and r["kernel_ssm"] == "torch" and r["command"] == "test"
    # Mamba states do not grow with the sequence: at 4k tokens the hybrid's cache is a fraction of the KV cache
    assert speed.cache_bytes("hybrid", cfg, 1, 4096, 4) < 0.6 * speed.cache_bytes("attention", cfg, 1, 4096, 4)
    assert rows[2]["cache_gib"] == speed.cache_bytes("attention", cfg, 1, 11, 4) / 2**30
    paths = speed_report.write_outputs(rows, tmp_path, {"shape": "tiny"})
    with open(paths["csv"]) as f:
        got = list(csv.DictReader(f))
    assert len(got) == 6 and set(speed.CSV_FIELDS) == set(got[0])
    assert paths["png"].stat().st_size > 0
    assert {(s["vs"], s["batch"]) for s in speed_report.speedups(rows)} == {
        ("attention", 1), ("attention", 2), ("hf_static", 1), ("hf_static", 2)}


def test_out_of_memory_is_recorded_and_larger_batches_skipped(monkeypatch):
    real = speed.time_generation

    def limited(engine, model, batch, *a, **kw):
        if batch >= 4:  # what a GPU says when the cache does not fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(engine, model, batch, *a, **kw)

    monkeypatch.setattr(speed, "time_generation", limited)
    rows = speed.run_speed(speed.hybrid_config("tiny"), "tiny", ["hybrid"], [8, 1, 4], 4, [2],
                           torch.device("cpu"), torch.float32, warmup=False, progress=False)
    assert [(r["batch"], r["status"]) for r in rows] == [(1, "ok"), (4, "oom"), (8, "skipped_oom")]
    assert speed._is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB"))
    assert not speed._is_oom(RuntimeError("shape mismatch"))


BLOCKED = re.compile(r"^(pydantic|pydantic_core|mlflow|mlflow_skinny|mlflow_tracing|ray|prefect|prefect_\w+|dvc|dvc_\w+|"
                     r"datasets)([-.].*)?$", re.IGNORECASE)
CHECK = """
import runpy, sys
for name in ('pydantic', 'mlflow', 'ray', 'prefect', 'datasets'):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(name + ' is importable: the test would prove nothing')
sys.argv = ['bench/speed.py'] + sys.argv[1:]
runpy.run_path('bench/speed.py', run_name='__main__')
"""


def test_bench_script_runs_without_pydantic_mlflow_ray(tmp_path):
    # A view of site-packages without the packages a bare GPU image may lack; python -S ignores the real one.
    site_dir = Path(torch.__file__).resolve().parent.parent
    view = tmp_path / "site"
    view.mkdir()
    for entry in site_dir.iterdir():
        if not BLOCKED.match(entry.name):
            (view / entry.name).symlink_to(entry)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(view)}
    args = ["--device", "cpu", "--shape", "tiny", "--batch", "1", "--prompt-len", "4", "--decode-len", "2",
            "--engines", "hybrid,attention", "--no-warmup", "--out", str(out)]
    res = subprocess.run([sys.executable, "-S", "-c", CHECK, *args], check=False, cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "hybrid vs attention" in res.stdout
    with open(out / "speed.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["engine"] for r in rows] == ["hybrid", "attention"]
    assert rows[0]["command"].startswith("python3 bench/speed.py --device cpu --shape tiny")
    assert (out / "speed.png").is_file() and (out / "speed.json").is_file()


def test_compiled_hf_warms_every_shape_it_times(monkeypatch):
    """A compiled static-cache run compiles per cache length: the warm-up covers the full-length run and the one-token
    run that times the first token, so neither timed call compiles; the stage's config reaches run_speed."""
    calls = []

    def fake_run_once(engine, model, ids, decode_len, device, decode_engine="auto", hf_compile=False):
        calls.append((decode_len, hf_compile))
        return {"wall": 0.5 if decode_len > 1 else 0.1}

    monkeypatch.setattr(speed, "_run_once", fake_run_once)
    model = speed.build_model("hf_static", speed.hybrid_config("tiny"), torch.device("cpu"), torch.float32, 0)
    r = speed.time_generation("hf_static", model, 2, 8, 16, torch.device("cpu"), hf_compile=True)
    assert calls == [(16, True), (1, True), (1, True), (16, True)]  # warm-ups, then the two timed runs
    assert r["tokens_per_s"] == 2 * 16 / 0.5
    calls.clear()
    speed.time_generation("hf_static", model, 2, 8, 16, torch.device("cpu"))
    assert calls == [(4, False), (1, False), (16, False)]  # uncompiled: a short warm-up is enough

    from components.config import load_config
    assert load_config("gpu2-arms").evaluate.speed.hf_compile and not load_config().evaluate.speed.hf_compile


def test_the_stage_passes_hf_compile_to_the_speed_run(monkeypatch, tmp_path):
    from components.config import load_config
    from components.evaluate import run as eval_run

    seen = {}

    def fake_run_speed(*args, **kwargs):
        seen.update(kwargs)
        return []

    monkeypatch.setattr(eval_run.speed, "run_speed", fake_run_speed)
    monkeypatch.setattr(eval_run.speed_report, "write_outputs", lambda rows, out_dir, meta: None)
    cfg = load_config("tiny", overrides={"evaluate": {"speed": {"shape": "tiny", "hf_compile": True}}})
    assert eval_run._speed(cfg, None, tmp_path) == {}
    assert seen["hf_compile"] is True
