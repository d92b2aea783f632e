"""bench/distill_recovery.py (issue 21): the overrides that make each distillation variant, the equal-step budget,
the numbers read back from a flow run's summary, the best variant, and the commands it starts."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import distill_recovery as dr


def test_variant_overrides_and_equal_steps():
    assert dr.variant_sets("base", 120, 40, None, True) == ["align.enabled=false"]
    assert dr.variant_sets("align", 120, 40, None, True) == [
        "align.enabled=true", "align.max_steps=40", "distill.max_steps=80"]
    assert dr.variant_sets("align", 120, 40, None, False) == ["align.enabled=true", "align.max_steps=40"]
    assert dr.variant_sets("kl_layers", 120, 40, [3, 8, 29], True) == [
        "convert.attn_layers=[3,8,29]", "align.enabled=false"]
    assert dr.variant_sets("kl_layers+align", 120, 40, [3, 8], True) == [
        "convert.attn_layers=[3,8]", "align.enabled=true", "align.max_steps=40", "distill.max_steps=80"]


@pytest.mark.parametrize("args, message", [
    (("kl_layers", 120, 40, None, True), "needs the KL-guided layers"),
    (("align", 40, 40, None, True), "leaves no distill steps"),
    (("bogus", 120, 40, None, True), "unknown variant"),
])
def test_variant_errors_name_the_problem(args, message):
    with pytest.raises(ValueError, match=message):
        dr.variant_sets(*args)


def _summary(distill: dict, align: dict | None = None) -> dict:
    stages = [{"stage": "curate", "seconds": 1.0, "all_metrics": {}}]
    if align is not None:
        stages.append({"stage": "align", "seconds": 30.04, "all_metrics": align})
    stages.append({"stage": "distill", "seconds": 100.26, "all_metrics": distill})
    return {"stages": stages}


def test_distill_result_reads_the_held_out_numbers():
    s = _summary({"heldout/ppl": 4.4, "heldout/teacher_ppl": 4.0, "heldout/kl": 0.1234567,
                  "heldout/kl_before": 8.0, "steps": 80.0},
                 {"align_mse/layer_2": 0.25, "align_mse/layer_1": 0.5, "loss": 0.3, "steps": 40.0})
    r = dr.distill_result(s)
    assert r == {"student_ppl": 4.4, "teacher_ppl": 4.0, "ppl_ratio": 1.1, "heldout_kl": 0.1235,
                 "heldout_kl_before": 8.0, "distill_steps": 80, "distill_seconds": 100.3,
                 "align_steps": 40, "align_seconds": 30.0, "align_mse": {"layer_1": 0.5, "layer_2": 0.25}}
    assert "align_steps" not in dr.distill_result(_summary({"heldout/ppl": 5.0, "heldout/teacher_ppl": 4.0}))
    split = dr.distill_result(_summary({"heldout/ppl": 7.28, "heldout/teacher_ppl": 3.99, "heldout/ppl_content": 5.5,
                                        "heldout/teacher_ppl_content": 4.4, "heldout/ce_end_of_turn": 19.0,
                                        "heldout/teacher_ce_end_of_turn": 0.2}))
    assert (split["ppl_ratio_content"], split["ce_end_of_turn"], split["teacher_ce_end_of_turn"]) == (1.25, 19.0, 0.2)
    with pytest.raises(ValueError, match="no held-out perplexity"):
        dr.distill_result(_summary({"loss": 1.0}))
    with pytest.raises(ValueError, match="no distill stage"):
        dr.distill_result({"stages": []})


def test_best_variant_is_the_lowest_kl_to_the_teacher_that_ran():
    vs = [{"name": "base", "student_ppl": 7.3, "heldout_kl": 0.37}, {"name": "align"},
          {"name": "kl_ce", "student_ppl": 2.9, "heldout_kl": 0.28},
          {"name": "kl_layers+align", "student_ppl": 5.3, "heldout_kl": 0.26}]
    assert dr.best_variant(vs)["name"] == "kl_layers+align"
    assert dr.lowest_ppl(vs)["name"] == "kl_ce"  # below the teacher by fitting the data, not by recovering it
    assert dr.best_variant([{"name": "align"}]) is None


def test_replot_draws_the_figure_beside_a_results_file(tmp_path):
    v = {"teacher_ppl": 4.0, "ppl_ratio": 1.5, "student_ppl_content": 5.5}
    rec = {"profile": "p", "device": "d", "distill_steps": 3, "best": "b",
           "variants": [{"name": "a", "student_ppl": 6.0, "heldout_kl": 0.4, **v},
                        {"name": "b", "student_ppl": 5.0, "heldout_kl": 0.3, **v}, {"name": "failed"}]}
    (tmp_path / "r.json").write_text(json.dumps(rec))
    assert dr.main(["--replot", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "r.json").read_text())["reranked"] == {  # an old file: not ranked by KL yet
        "best_then": "b", "downstream_chosen_by": "lowest student_ppl"}
    rec = {**rec, "best": "a", "ranked_by": "lowest heldout_kl"}
    (tmp_path / "r.json").write_text(json.dumps(rec))
    assert dr.main(["--replot", str(tmp_path / "r.json")]) == 0
    after = json.loads((tmp_path / "r.json").read_text())
    assert after["best"] == "b" and after["best_heldout_kl"] == 0.3 and "reranked" not in after


def test_dry_run_commands(capsys, tmp_path):
    assert dr.main(["--profile", "tiny", "--kl-layers", "0,2", "--align-steps", "1", "--dry-run",
                    "--out", str(tmp_path / "r.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert all("--stages distill" in c for c in lines)
    base, align, kl, both = lines
    assert "run_dir=" in base and base.split("run_dir=")[1].split()[0].endswith("runs/tiny-recovery/base")
    assert "--set align.enabled=true --set align.max_steps=1 --set distill.max_steps=2" in align
    assert "--set convert.attn_layers=[0,2] --set align.enabled=false" in kl
    assert both.split("run_dir=")[1].split()[0].endswith("kl_layers_align")
    assert not (tmp_path / "r.json").exists()


def test_kl_variants_without_layers_are_refused_before_any_run(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        dr.main(["--profile", "tiny", "--variants", "kl_layers", "--out", str(tmp_path / "r.json")])
    assert e.value.code == 2
    assert "need --kl-layers, --kl-json or --kl-guided" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dr.main(["--profile", "tiny", "--align-steps", "3", "--out", str(tmp_path / "r.json")])
    assert "--align-steps 3 leaves no distill steps of 3" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_kl_json_gives_the_layers(tmp_path, capsys):
    (tmp_path / "kl.json").write_text(json.dumps({"attn_layers": [1, 3]}))
    assert dr.main(["--profile", "tiny", "--kl-json", str(tmp_path / "kl.json"), "--variants", "kl_layers",
                    "--dry-run"]) == 0
    assert "--set convert.attn_layers=[1,3]" in capsys.readouterr().out


def test_dry_run_with_kl_guided_ranks_on_base_data_between_the_waves(capsys, tmp_path):
    assert dr.main(["--profile", "tiny", "--kl-guided", "--align-steps", "1", "--dry-run",
                    "--out", str(tmp_path / "r.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    # one at a time: base alone, then the ranking on its rows beside align, then the kl_layers pair
    assert "--set align.enabled=false" in lines[0] and "align.enabled=true" in lines[2]
    rank = lines[1]
    assert rank.startswith("bench/attn_layer_choice.py --method kl_guided --teacher random:tiny")
    assert rank.split("--train-rows ")[1].split()[0].endswith("runs/tiny-recovery/base/data/sft1")
    assert "--k 2 " in rank  # as many layers as the profile keeps attention in (tiny: [1, 3])
    assert all("convert.attn_layers=[KL_LAYERS]" in c for c in lines[3:])


def test_kl_guided_waves_fill_the_parallel_slots(capsys, tmp_path):
    """With 2 at a time: base beside align, then the ranking beside the custom variant, then the kl_layers pair."""
    assert dr.main(["--profile", "tiny", "--kl-guided", "--align-steps", "1", "--dry-run", "--parallel", "2",
                    "--custom", "kl_ce", "distill.ce_weight=0.1", "--out", str(tmp_path / "r.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    runs = [line.split("run_dir=")[1].split()[0].rsplit("/", 1)[1] if "run_dir=" in line else "rank" for line in lines]
    assert runs == ["base", "align", "rank", "kl_ce", "kl_layers", "kl_layers_align"]


def test_run_many_runs_side_by_side_and_keeps_each_exit_code(tmp_path):
    """The first job waits for a file only the second writes: it can only finish if both run at once."""
    flag = tmp_path / "flag"
    wait = (f"import pathlib, time\nfor _ in range(60):\n    if pathlib.Path({str(flag)!r}).exists(): break\n"
            f"    time.sleep(0.05)\nelse: raise SystemExit(9)\nprint('saw it')")
    jobs = [([sys.executable, "-c", wait], tmp_path / "a.log"),
            ([sys.executable, "-c", f"import pathlib; pathlib.Path({str(flag)!r}).touch(); raise SystemExit(3)"],
             tmp_path / "b.log")]
    assert dr.run_many(jobs, parallel=2) == [0, 3]
    assert (tmp_path / "a.log").read_text().strip() == "saw it"
    flag.unlink()
    assert dr.run_many(jobs, parallel=1) == [9, 3]  # one at a time, the first gives up before the second starts


def test_parallel_needs_one_ray_head(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit):
        dr.main(["--profile", "tiny", "--parallel", "2", "--out", str(tmp_path / "r.json")])
    assert "--parallel > 1 needs one Ray head" in capsys.readouterr().err


def test_custom_variants_run_beside_the_named_ones_and_are_validated_first(capsys, tmp_path):
    assert dr.main(["--profile", "tiny", "--variants", "base", "--custom", "kl_ce", "distill.ce_weight=0.1",
                    "--dry-run"]) == 0
    _, custom = capsys.readouterr().out.strip().splitlines()
    assert custom.split("run_dir=")[1].split()[0].endswith("runs/tiny-recovery/kl_ce")
    assert custom.endswith("--set align.enabled=false --set distill.ce_weight=0.1")
    for bad, message in ((["kl_ce", "distill.ce_wieght=0.1"], "--custom: invalid config: distill.ce_wieght"),
                         (["align", "distill.ce_weight=0.1"], "--custom 'align': a new variant needs a new name"),
                         (["kl_ce"], "--custom kl_ce: no KEY=VALUE overrides")):
        with pytest.raises(SystemExit):
            dr.main(["--profile", "tiny", "--variants", "base", "--custom", *bad, "--out", str(tmp_path / "r.json")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
