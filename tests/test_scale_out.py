"""bench/scale_out.py (issue 23): steady-state speed read back from a training run's history and a GRPO run's
metrics, scaling efficiency against the smallest worker count, and the flow runs it starts; the m1-3b-scale
profile it runs by default is valid offline."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import scale_out


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_training_stats_leave_out_the_first_step(tmp_path):
    hist = _write(tmp_path / "history.jsonl", [
        {"step": 1, "tokens_per_s": 10.0, "step_seconds": 9.0, "mfu": 0.01, "peak_memory_gb": 30.0},
        {"step": 2, "tokens_per_s": 100.0, "step_seconds": 2.0, "mfu": 0.30, "peak_memory_gb": 41.5},
        {"step": 3, "tokens_per_s": 120.0, "step_seconds": 1.0, "mfu": 0.36, "peak_memory_gb": 41.0},
        {"step": 4, "tokens_per_s": 110.0, "step_seconds": 3.0, "mfu": 0.33, "peak_memory_gb": 41.2}])
    assert scale_out.training_stats(hist) == {"steps": 4, "steps_timed": 3, "tokens_per_s": 110.0,
                                              "step_seconds": 2.0, "mfu": 0.33, "peak_memory_gb": 41.5}
    cpu = _write(tmp_path / "cpu.jsonl", [{"step": 1, "tokens_per_s": 5.0, "step_seconds": 1.0}])
    assert scale_out.training_stats(cpu)["mfu"] is None and scale_out.training_stats(cpu)["tokens_per_s"] == 5.0


def test_grpo_stats_skip_heldout_rows_and_the_first_step(tmp_path):
    rows = [{"step": 0, "heldout/accuracy": 0.1}]
    rows += [{"step": s, "rollout_tokens_per_s": r, "learner_tokens_per_s": 50.0, "rollout_seconds": 4.0,
              "sync_seconds": q, "learn_seconds": 2.0, "step_seconds": 6.0 + q} for s, r, q in
             ((1, 1.0, 9.0), (2, 300.0, 1.0), (3, 500.0, 3.0))]
    rows.append({"step": 3, "heldout/accuracy": 0.2})  # the closing evaluation
    got = scale_out.grpo_stats(_write(tmp_path / "metrics.jsonl", rows))
    assert got == {"steps": 3, "steps_timed": 2, "rollout_tokens_per_s": 400.0, "learner_tokens_per_s": 50.0,
                   "rollout_seconds": 4.0, "sync_seconds": 2.0, "learn_seconds": 2.0, "step_seconds": 8.0}


def test_scaling_efficiency_is_against_the_stage_smallest_count():
    rows = [{"stage": "distill", "workers": 2, "tokens_per_s": 180.0},
            {"stage": "distill", "workers": 1, "tokens_per_s": 100.0},
            {"stage": "distill", "workers": 4, "tokens_per_s": 300.0},
            {"stage": "sft1", "workers": 2, "tokens_per_s": 50.0},
            {"stage": "sft1", "workers": 4, "tokens_per_s": 90.0}]
    assert [r["scaling_efficiency"] for r in scale_out.with_efficiency(rows)] == [0.9, 1.0, 0.75, 1.0, 0.9]


def test_dry_run_names_one_flow_run_per_count_and_split(capsys):
    assert scale_out.main(["--profile", "m1-3b-scale", "--workers", "1", "2", "--grpo", "1:1", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" -m ", 1)[1] for line in lines] == [
        "components.cli pipeline --profile m1-3b-scale --stages distill sft1 --summary-json "
        "runs/m1-3b-scale/scale_out/w1.json --set distill.num_workers=1 --set sft1.num_workers=1",
        "components.cli pipeline --profile m1-3b-scale --stages distill sft1 --summary-json "
        "runs/m1-3b-scale/scale_out/w2.json --set distill.num_workers=2 --set sft1.num_workers=2",
        "components.cli pipeline --profile m1-3b-scale --stages grpo --summary-json "
        "runs/m1-3b-scale/scale_out/grpo1-1.json --set grpo.learner_workers=1 --set grpo.rollout_workers=1"]
    # a run_dir set for the flow runs is where their summaries and histories are read
    assert scale_out.main(["--profile", "tiny", "--workers", "1", "--set", "run_dir=/x/run", "--dry-run"]) == 0
    assert "--summary-json /x/run/scale_out/w1.json" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        scale_out.main(["--grpo", "2", "--dry-run"])


def test_the_scale_profile_is_m1_3b_offline():
    from components.config import load_config

    scale, full = load_config("m1-3b-scale"), load_config("m1-3b")
    assert scale.teacher.source == "random:llama-3.2-3b"
    assert {s.kind for s in scale.data.sources} <= {"mathgenerator", "synthetic"}
    assert scale.pipeline.result_storage is None and scale.distill.checkpoint_storage is None
    # no 39 GB checkpoints on a lent node's disk
    assert [getattr(scale, s).checkpoint_every for s in ("distill", "sft1", "sft2", "grpo")] == [0, 0, 0, 0]
    for section in ("distill", "sft1"):
        a, b = getattr(scale, section), getattr(full, section)
        assert (a.strategy, a.micro_batch_size, a.gradient_checkpointing, a.use_gpu) == \
               (b.strategy, b.micro_batch_size, b.gradient_checkpointing, b.use_gpu) == ("fsdp2", 1, True, "yes")
    assert scale.convert.attn_layers == full.convert.attn_layers
