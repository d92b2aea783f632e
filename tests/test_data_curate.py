"""The curate stage end to end on fixtures: outputs, manifest, rejects, decontamination of a planted
evaluation problem, loss masks in the packed shards, determinism, atomic failure, and the CLI."""
import glob
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from components.config import ROOT, load_config
from components.data import curate
from components.errors import M1Error

FIX = Path(__file__).parent / "fixtures" / "data"
PLANTED = "A regular hexagon has side length 5. What is its perimeter, in units?"  # MATH-500 fixture item


def small_data(run_dir):
    return {
        "run_dir": str(run_dir),
        "data": {
            "num_proc": 1,
            "sources": [
                {"kind": "synthetic", "name": "syn1", "splits": ["sft1"], "n": 60, "seed": 1,
                 "holdout_fraction": 0.1, "holdout_set": "syn_heldout"},
                {"kind": "synthetic", "name": "syn2", "splits": ["sft2"], "n": 25, "seed": 2},
                {"kind": "mathgenerator", "name": "mg", "splits": ["sft1", "rl"], "n": 20},
                {"kind": "champ", "name": "champ", "splits": ["sft1", "sft2", "rl"], "max_rows": 40},
                {"kind": "local", "name": "mixed", "path": str(FIX / "local" / "mixed.jsonl"), "splits": ["sft1", "rl"],
                 "fields": {"problem": "question", "solution": "worked", "answer": "final", "id": "qid"}},
                {"kind": "local", "name": "csv", "path": str(FIX / "local" / "prompts.csv"), "splits": ["rl"],
                 "fields": {"problem": "question", "solution": None, "answer": "ref"}},
                {"kind": "hub", "name": "omi", "dataset": "openmathinstruct2", "splits": ["sft1"],
                 "data_files": [str(FIX / "hub" / "openmathinstruct2.jsonl")]},
                {"kind": "hub", "name": "openr1", "dataset": "openr1_math", "splits": ["sft2"],
                 "data_files": [str(FIX / "hub" / "openr1_math.jsonl")]},
                {"kind": "hub", "name": "math500", "dataset": "math500", "splits": ["eval"],
                 "data_files": [str(FIX / "hub" / "math500.jsonl")]},
                {"kind": "hub", "name": "aime24", "dataset": "aime24", "splits": ["eval"],
                 "data_files": [str(FIX / "hub" / "aime24.jsonl")]},
            ],
            "packing": {"sft1_seq_len": 512, "sft2_seq_len": 1024, "rows_per_shard": 16},
        },
    }


@pytest.fixture(scope="module")
def tok():
    from components.data.tokenizer_cache import cached_tokenizer

    return cached_tokenizer("smollm2")


@pytest.fixture(scope="module")
def curated(tmp_path_factory, tok):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(overrides=small_data(run_dir))
    return cfg, curate.run(cfg, inputs={"tokenizer": tok})


def read_jsonl(p):
    return [json.loads(line) for line in open(p)]


def test_all_outputs_written_with_manifest(curated):
    cfg, out = curated
    d = out.data_dir
    assert d == Path(cfg.run_dir) / "data"
    for p in [out.rejects, out.decontamination, out.manifest, out.report_json, out.report_md, out.token_lengths_png,
              out.metrics_json]:
        assert p.is_file(), p
    assert sorted(out.eval_sets) == ["aime24", "math500", "syn_heldout"]
    man = json.loads(out.manifest.read_text())
    for name in ["sft1", "sft1_heldout", "sft2", "rl"]:
        o = man["outputs"][name]
        files = sorted(glob.glob(str(d / name / "*.parquet")))
        assert [os.path.basename(f) for f in files] == [f["file"] for f in o["files"]]
        assert sum(pq.read_metadata(f).num_rows for f in files) == o["rows"] == out.rows[name]
        from components.data.packing import sha256_file

        assert all(sha256_file(str(d / name / f["file"])) == f["sha256"] for f in o["files"])
    assert man["outputs"]["sft1"]["rows"] > 0 and man["outputs"]["sft2"]["rows"] > 0
    assert set(man["outputs"]["sft1"]["per_source"]) >= {"syn1", "mg", "champ", "mixed", "omi"}
    assert set(man["outputs"]["sft2"]["per_source"]) >= {"syn2", "openr1"}
    report = json.loads(out.report_json.read_text())
    assert report["totals"]["rejected"] == len(read_jsonl(out.rejects)) == out.rejected
    assert out.token_lengths_png.read_bytes()[:4] == b"\x89PNG"


def test_rejects_name_every_bad_row(curated):
    _, out = curated
    rej = read_jsonl(out.rejects)
    by_id = {}
    for r in rej:
        by_id.setdefault(r["id"], []).append(r["reason"])
    # mixed.jsonl: missing field, wrong type, invalid UTF-8, broken JSON, blank problem (by line position)
    mixed = sorted(r["reason"] for r in rej if r["source"] == "mixed")
    for reason in ["missing_field", "wrong_type", "invalid_utf8", "malformed_json", "empty_field",
                   "answer_mismatch", "non_math_answer"]:
        assert reason in mixed, reason
    assert by_id["mixed/loc-6"] == ["answer_mismatch"]  # 56 - 6 = 50, reference says 49
    assert by_id["mixed/loc-7"] == ["non_math_answer"]
    assert "answer_mismatch" in by_id["omi/3"]  # 8 divisors, reference 9
    assert by_id["omi/#4"] == ["missing_field"]
    assert by_id["openr1/#2"] == ["no_correct_trace"]
    assert by_id["csv/3"] == ["missing_field"]  # no answer column value
    report = json.loads(out.report_json.read_text())
    assert sum(report["rejects_by_reason"].values()) == len(rej)
    assert report["sources"]["mixed"]["rows_read"] == 12


def test_planted_evaluation_problem_removed(curated, tok):
    _, out = curated
    log = read_jsonl(out.decontamination)
    planted = [e for e in log if e["id"] == "mixed/loc-3"]
    assert {e["split"] for e in planted} == {"sft1", "rl"}
    m = planted[0]["matched"][0]
    assert m["eval_set"] == "math500" and m["eval_id"] == "math500/test/prealgebra/9001.json" and m["overlap"] == 1.0
    rl = pq.read_table(out.rl_dir).to_pylist()
    assert all(r["problem"] != PLANTED for r in rl)
    for name in ["sft1", "sft1_heldout", "sft2"]:
        for row in pq.read_table(out.data_dir / name).to_pylist():
            assert "regular hexagon has side length 5" not in tok.decode(row["input_ids"])
    ev = read_jsonl(out.eval_sets["math500"])
    assert [e["problem"] for e in ev][0] == PLANTED and len(ev) == 3


def test_duplicates_counted(curated):
    _, out = curated
    report = json.loads(out.report_json.read_text())
    assert report["sources"]["mixed"]["exact_duplicate:sft1"] == 1  # loc-4 repeats loc-2's problem
    assert out.duplicates == report["totals"]["exact_duplicates"] + report["totals"]["near_duplicates"] >= 1


def test_packed_rows_masks_and_boundaries(curated, tok):
    _, out = curated
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    docs = 0
    for name, seq_len in [("sft1", 512), ("sft2", 1024)]:
        for row in pq.read_table(out.data_dir / name).to_pylist():
            ids, pos, dids, mask = row["input_ids"], row["position_ids"], row["doc_ids"], row["loss_mask"]
            assert len(ids) == len(pos) == len(dids) == len(mask) == seq_len
            for d in range(max(dids) + 1):
                idx = [i for i, x in enumerate(dids) if x == d]
                doc, dmask = [ids[i] for i in idx], [mask[i] for i in idx]
                assert [pos[i] for i in idx] == list(range(len(idx)))
                first = dmask.index(1)
                last_start = max(i for i, t in enumerate(doc) if t == im_start)
                assert first > last_start and all(m == 0 for m in dmask[:first])  # no label on prompt tokens
                assert tok.decode(doc[last_start:first]) == "<|im_start|>assistant\n"
                assert doc[len(dmask) - 1 - dmask[::-1].index(1)] == im_end
                if name == "sft2":
                    assert tok.decode(doc[first:first + 3]).startswith("<think>")
                docs += 1
            assert all(mask[i] == 0 and ids[i] == tok.pad_token_id for i, x in enumerate(dids) if x == -1)
    assert docs == out.records["sft1"] + out.records["sft2"]


def test_rl_and_eval_layout(curated):
    _, out = curated
    t = pq.read_table(out.rl_dir)
    assert t.column_names == ["id", "source", "problem", "prompt", "answer"]
    rows = t.to_pylist()
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") and r["answer"] for r in rows)
    assert {"csv", "mg", "champ", "mixed"} <= {r["source"] for r in rows}
    for path in out.eval_sets.values():
        items = read_jsonl(path)
        assert items and all(set(e) == {"id", "source", "problem", "answer", "prompt"} for e in items)
    held = read_jsonl(out.eval_sets["syn_heldout"])
    assert held and all(e["source"] == "syn1" for e in held)


def test_heldout_problems_never_trained_on(curated, tok):
    _, out = curated
    held = [e["problem"] for e in read_jsonl(out.eval_sets["syn_heldout"])]
    trained = " ".join(tok.decode(r["input_ids"]) for name in ["sft1", "sft1_heldout", "sft2"]
                       for r in pq.read_table(out.data_dir / name).to_pylist())
    assert "Please reason step by step" in trained
    assert not [p for p in held if p in trained]


def test_deterministic_and_atomic(curated, tmp_path, tok):
    cfg, out = curated
    first = json.loads(out.manifest.read_text())
    again = curate.run(cfg, inputs={"tokenizer": tok})
    second = json.loads(again.manifest.read_text())
    for name in ["sft1", "sft1_heldout", "sft2", "rl"]:
        assert [f["sha256"] for f in first["outputs"][name]["files"]] == [f["sha256"] for f in second["outputs"][name]["files"]]
    assert first["rejects"]["sha256"] == second["rejects"]["sha256"]
    # A source that cannot be read fails with its name, leaves the previous output and no temp dirs.
    over = small_data(cfg.run_dir)
    over["data"]["sources"].append({"kind": "local", "name": "gone", "path": str(tmp_path / "nope.jsonl"), "splits": ["rl"]})
    with pytest.raises(M1Error, match="source gone"):
        curate.run(load_config(overrides=over), inputs={"tokenizer": tok})
    assert json.loads(out.manifest.read_text()) == second
    assert not [p for p in os.listdir(cfg.run_dir) if p.startswith(".data.")]


def test_cli_curate(tmp_path, capsys, tok):
    from components.cli import main

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(small_data(tmp_path / "run"))
    params["data"]["sources"] = params["data"]["sources"][2:3]  # mathgenerator only: quick
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    assert main(["data", "curate", "--params", str(tmp_path / "p.yaml")]) == 0
    text = capsys.readouterr().out
    assert "sft1" in text and "rl" in text and str(tmp_path / "run" / "data") in text
    bad = dict(params, data=dict(params["data"], nonsense=1))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["data", "curate", "--params", str(tmp_path / "bad.yaml")]) == 2
    assert "data.nonsense: unknown key" in capsys.readouterr().err


@pytest.mark.slow
def test_embedded_default_end_to_end(tmp_path, tok):
    cfg = load_config(overrides={"run_dir": str(tmp_path / "run")})
    out = curate.run(cfg, inputs={"tokenizer": tok})
    assert out.records["sft1"] > 1500 and out.records["sft2"] > 800 and out.records["rl"] > 1000
    assert set(out.eval_sets) == {"champ_heldout", "synthetic_heldout"}
    assert out.records["eval/champ_heldout"] > 20 and out.records["eval/synthetic_heldout"] > 50
    assert out.records["sft1_heldout"] > 50


def test_runs_off_the_main_thread(tmp_path, tok):
    # Orchestrators (Prefect task runners, threaded Ray actors) call stages from worker threads.
    from concurrent.futures import ThreadPoolExecutor

    over = {"run_dir": str(tmp_path / "run"), "data": {"num_proc": 2, "sources": [
        {"kind": "mathgenerator", "name": "mg", "splits": ["sft1", "rl"], "n": 30},
        {"kind": "champ", "name": "champ", "splits": ["rl"], "max_rows": 15}]}}
    for num_proc in (2, 1):
        over["data"]["num_proc"] = num_proc
        cfg = load_config(overrides=over)
        with ThreadPoolExecutor(1) as ex:
            out = ex.submit(curate.run, cfg, {"tokenizer": tok}).result(timeout=120)
        assert out.records["rl"] > 20 and out.records["sft1"] > 10


def test_rl_prompts_seen_in_sft_are_dropped_when_asked(tmp_path, tok):
    # mg feeds the same problems to sft1 and rl, so each of its RL prompts is shown with its answer in SFT;
    # other_rl (another draw) keeps those of its problems that mg does not contain.
    sources = [{"kind": "mathgenerator", "name": "mg", "splits": ["sft1", "rl"], "n": 40},
               {"kind": "mathgenerator", "name": "other_rl", "splits": ["rl"], "n": 40, "seed": 9}]
    outs = {}
    for flag in (False, True):
        over = {"run_dir": str(tmp_path / f"run_{flag}"),
                "data": {"num_proc": 1, "sources": sources, "decontam": {"rl_unseen_in_sft": flag}}}
        outs[flag] = curate.run(load_config(overrides=over), {"tokenizer": tok})
    keep = pq.read_table(outs[False].rl_dir).to_pylist()
    kept = pq.read_table(outs[True].rl_dir).to_pylist()
    sft_problems = {r["problem"] for r in keep if r["source"] == "mg"}
    assert {r["source"] for r in keep} == {"mg", "other_rl"}
    want = [r["id"] for r in keep if r["source"] == "other_rl" and r["problem"] not in sft_problems]
    assert sorted(r["id"] for r in kept) == sorted(want) and 0 < len(want) < 40
    log = [json.loads(line) for line in open(outs[True].decontamination)]
    assert sum(e["matched"] == "sft" for e in log) == len(keep) - len(kept)


@pytest.mark.parametrize("name", ["empty.jsonl", "blank_lines.jsonl", "no_rows.parquet"])
def test_source_without_rows_is_refused_before_anything_is_written(tmp_path, tok, name):
    # An empty local file used to be curated "successfully" (0 records, cached) and fail distill later with
    # "run the curate stage first": it is refused by name, with the file, and no data/ is written.
    import pyarrow as pa

    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"problem": pa.array([], pa.string()), "solution": pa.array([], pa.string())}), path)
    else:
        path.write_text("" if name == "empty.jsonl" else "\n  \n")
    over = {"run_dir": str(tmp_path / "run"), "data": {"num_proc": 1, "sources": [
        {"kind": "mathgenerator", "name": "mg", "splits": ["sft1", "rl"], "n": 10},
        {"kind": "local", "name": "mine", "path": str(path), "splits": ["sft1"]}]}}
    with pytest.raises(M1Error) as e:
        curate.run(load_config(overrides=over), {"tokenizer": tok})
    assert str(e.value) == f"source mine: no rows in {path}"
    assert os.listdir(tmp_path / "run") == []
