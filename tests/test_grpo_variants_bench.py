"""bench/grpo_variants.py: the runs it plans, what it refuses before any run, and the report it builds from each
run's grpo_metrics.json (hand-made here, with numbers whose summaries are worked out by hand)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import grpo_variants as gv


def _metrics(run: Path, before: float, after: float, gain_se: float, pn_before: float, pn_after: float,
             mixed_before: float, mixed_after: float, prompts: int = 128, samples: int = 8) -> None:
    (run / "grpo").mkdir(parents=True)
    (run / "grpo" / "grpo_metrics.json").write_text(json.dumps({
        "steps": 60, "heldout/prompts": prompts, "heldout/samples": samples, "heldout/accuracy_before": before,
        "heldout/accuracy": after, "heldout/gain": after - before, "heldout/gain_se": gain_se,
        "heldout/pass_at_n_before": pn_before, "heldout/pass_at_n": pn_after,
        "heldout/mixed_fraction_before": mixed_before, "heldout/mixed_fraction": mixed_after}))


def test_dry_run_plans_every_seed_of_every_variant_round_robin_over_the_gpus(capsys, tmp_path):
    assert gv.main(["--root", str(tmp_path), "--profile", "tiny", "--seeds", "0", "1", "--variant", "clip_higher",
                    "grpo.clip_high=0.28", "--variant-seeds", "7", "--gpus", "2", "--set", "grpo.max_steps=2",
                    "--dry-run", "--out", str(tmp_path / "r.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1",
                                                   "CUDA_VISIBLE_DEVICES=0"]
    assert [line.split("run_dir=")[1].split()[0] for line in lines] == [
        str(tmp_path / "grpo-variants" / d) for d in ("base-s0", "base-s1", "clip_higher-s7")]
    assert all("-m components.cli stage grpo --profile tiny --set tracking.enabled=false" in c for c in lines)
    assert lines[2].endswith("--set seed=7 --set grpo.max_steps=2 --set grpo.clip_high=0.28")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--variant", "wide", "grpo.clip_hihg=0.3"], "--variant/--set: invalid config: grpo.clip_hihg"),
    (["--variant", "base", "grpo.clip_high=0.3"], "--variant 'base': a new variant needs a new name"),
    (["--variant", "wide"], "--variant wide: no KEY=VALUE overrides"),
    (["--set", "grpo.group_size=1"], "--variant/--set: invalid config: grpo.group_size"),
])
def test_bad_settings_are_refused_before_any_run(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        gv.main(["--root", str(tmp_path), "--profile", "tiny", *args, "--out", str(tmp_path / "r.json")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "grpo-variants").exists()


def test_no_sft2_model_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit):
        gv.main(["--root", str(tmp_path), "--profile", "tiny", "--out", str(tmp_path / "r.json")])
    assert "sft2/model does not exist: run the stages up to sft2 first" in capsys.readouterr().err


def test_report_summarises_each_variant_and_keeps_only_gains_that_do_not_narrow(tmp_path):
    root = tmp_path
    # base, three seeds: gains +0.04, +0.02, +0.03 -> mean 0.03, SE = stdev 0.01 / sqrt 3
    for seed, (b, a) in enumerate([(0.10, 0.14), (0.11, 0.13), (0.09, 0.12)]):
        _metrics(gv.run_dir(root, "base", seed), b, a, 0.01, 0.30, 0.26, 0.20, 0.10)
    _metrics(gv.run_dir(root, "wide", 0), 0.10, 0.12, 0.008, 0.30, 0.31, 0.20, 0.22)   # +2, pass@n up: kept
    _metrics(gv.run_dir(root, "sharp", 0), 0.10, 0.15, 0.009, 0.30, 0.25, 0.20, 0.05)  # +5, pass@n down: not
    plan = [("base", [], [0, 1, 2]), ("wide", ["grpo.group_size=16"], [0]), ("sharp", ["grpo.lr=1e-4"], [0, 1])]
    rec = gv.report({}, root, plan)
    base, wide, sharp = rec["variants"]
    assert base["summary"]["mean_gain"] == pytest.approx(0.03, abs=1e-6)
    assert base["summary"]["mean_gain_se"] == pytest.approx(0.01 / 3 ** 0.5, abs=1e-6)
    assert base["summary"]["mean_pass_at_n_before"] == pytest.approx(0.30)
    assert base["mean_mixed_after"] == pytest.approx(0.10)
    assert not base["kept"]  # pass@n 0.30 -> 0.26: sharpened
    assert wide["kept"] and wide["summary"]["mean_gain_se"] is None and wide["seeds"][0]["gain_se"] == 0.008
    assert sharp["missing_seeds"] == [1] and not sharp["kept"]
    assert rec["best"] == "sharp" and rec["kept"] == ["wide"]


def test_report_refuses_runs_scored_on_different_held_out_sets(tmp_path):
    _metrics(gv.run_dir(tmp_path, "base", 0), 0.1, 0.1, 0.01, 0.3, 0.3, 0.2, 0.2, prompts=128)
    _metrics(gv.run_dir(tmp_path, "wide", 0), 0.1, 0.1, 0.01, 0.3, 0.3, 0.2, 0.2, prompts=64)
    with pytest.raises(ValueError, match="different held-out sets"):
        gv.report({}, tmp_path, [("base", [], [0]), ("wide", ["x=1"], [0])])


def test_report_only_writes_the_record_and_figure(tmp_path, capsys):
    _metrics(gv.run_dir(tmp_path, "base", 0), 0.10, 0.13, 0.01, 0.30, 0.30, 0.20, 0.18)
    out = tmp_path / "res" / "v.json"
    assert gv.main(["--root", str(tmp_path), "--profile", "tiny", "--seeds", "0", "--report-only",
                    "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["variants"][0]["summary"]["mean_gain"] == pytest.approx(0.03, abs=1e-6)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "pass@1 0.100 -> 0.130 (gain +3.00 points)" in capsys.readouterr().out


def test_link_inputs_points_a_run_at_the_shared_model_and_data(tmp_path):
    (tmp_path / "sft2" / "model").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    run = gv.run_dir(tmp_path, "base", 0)
    gv.link_inputs(tmp_path, run)
    gv.link_inputs(tmp_path, run)  # again: replaces its links
    assert (run / "sft2" / "model").resolve() == (tmp_path / "sft2" / "model").resolve()
    assert not Path((run / "data").readlink()).is_absolute()
