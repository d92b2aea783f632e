"""Benchmark loading: curated sets, hub benchmarks through the data registry (fixture mirrors), local files with a
field mapping; rows without a parseable reference are excluded and counted, never scored."""
from pathlib import Path

import pytest

from components.config import load_config
from components.errors import M1Error
from components.evaluate.benchmarks import load_benchmarks

FIX = Path(__file__).parent / "fixtures" / "eval"


def _cfg(benchmarks, **kw):
    return load_config(overrides={"evaluate": {"benchmarks": benchmarks, "max_problems": None, **kw}}).evaluate


def test_curated_set_excludes_unparseable_reference():
    (b,) = load_benchmarks(_cfg([{"kind": "curated", "name": "mini"}]), FIX / "data", seed=0)
    assert b.rows_read == 5
    assert [p.id for p in b.problems] == ["mini/1", "mini/2", "mini/3", "mini/5"]
    assert [(e.id, e.reason) for e in b.excluded] == [("mini/4", "unparseable_reference")]
    assert b.problems[1].answer == "\\frac{1}{2}" and b.problems[2].source == "algebra"


def test_curated_star_reads_every_set_and_missing_set_is_one_line():
    names = [b.name for b in load_benchmarks(_cfg([{"kind": "curated", "name": "*"}]), FIX / "data", seed=0)]
    assert names == ["mini", "mini2"]
    with pytest.raises(M1Error) as e:
        load_benchmarks(_cfg([{"kind": "curated", "name": "nope"}]), FIX / "data", seed=0)
    assert "nope" in str(e.value) and "mini" in str(e.value) and "\n" not in str(e.value)
    # an optional set that was not curated (a profile without that source) is skipped
    got = load_benchmarks(_cfg([{"kind": "curated", "name": "nope", "required": False},
                                {"kind": "curated", "name": "mini2", "required": False}]), FIX / "data", seed=0)
    assert [b.name for b in got] == ["mini2"]
    with pytest.raises(M1Error) as e:
        load_benchmarks(_cfg([{"kind": "curated", "name": "nope", "required": False}]), FIX / "data", seed=0)
    assert "no benchmark to evaluate" in str(e.value) and "mini, mini2" in str(e.value)


@pytest.mark.parametrize("name,dataset,file,ids,answers,excluded", [
    ("math500", "math500", "math500.jsonl", ["test/prealgebra/1.json", "test/algebra/2.json"], ["30", "\\frac{1}{2}"],
     ["empty_field"]),
    ("aime24", "aime24", "aime24.jsonl", ["60", "61"], ["24", "024"], []),
    ("aime25", "aime25", "aime25.jsonl", ["0", "1"], ["55", "81"], []),
    # the registry keeps AMC 2023 rows only (url filter): the 2022 row is not read, not excluded
    ("amc23", "amc23", "amc.jsonl", ["0", "2"], ["3", "0.75"], []),
    ("olympiadbench", "olympiadbench", "olympiadbench.jsonl", ["2901", "2902"], ["40", "-2, 2"], ["missing_field"]),
])
def test_hub_benchmarks_through_the_data_registry(name, dataset, file, ids, answers, excluded):
    spec = {"kind": "hub", "name": name, "dataset": dataset, "data_files": [str(FIX / "hub" / file)]}
    (b,) = load_benchmarks(_cfg([spec]), None, seed=0)
    assert [p.id for p in b.problems] == ids
    assert [p.answer for p in b.problems] == answers
    assert [e.reason for e in b.excluded] == excluded
    assert all(p.source == name and p.prompt is None for p in b.problems)


def test_local_files_with_field_mapping():
    fields = {"problem": "question", "answer": "final", "id": "qid"}
    (j, c) = load_benchmarks(_cfg([
        {"kind": "local", "name": "cj", "path": str(FIX / "local" / "custom.jsonl"), "fields": fields},
        {"kind": "local", "name": "cc", "path": str(FIX / "local" / "custom.csv"), "fields": fields}]), None, seed=0)
    assert [(p.id, p.problem, p.answer) for p in j.problems] == [("c1", "What is 10 - 4?", "6"),
                                                                ("c2", "What is 3 squared?", "9")]
    assert [(e.id, e.reason) for e in j.excluded] == [("c3", "missing_reference")]
    assert [p.answer for p in c.problems] == ["2", "5/2"] and not c.excluded


def test_max_problems_is_a_seeded_stable_choice():
    spec = [{"kind": "curated", "name": "mini"}]
    a = load_benchmarks(_cfg(spec, max_problems=2), FIX / "data", seed=0)[0]
    b = load_benchmarks(_cfg(spec, max_problems=2), FIX / "data", seed=0)[0]
    assert len(a.problems) == 2 and [p.id for p in a.problems] == [p.id for p in b.problems]
    seeds = {tuple(p.id for p in load_benchmarks(_cfg(spec, max_problems=2), FIX / "data", seed=s)[0].problems)
             for s in range(8)}
    assert len(seeds) > 1  # the seed picks the subset
    per_bench = load_benchmarks(_cfg([{"kind": "curated", "name": "mini", "max_problems": 1}], max_problems=3),
                                FIX / "data", seed=0)[0]
    assert len(per_bench.problems) == 1


def test_a_set_with_no_scorable_row_is_one_line(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "bad.jsonl").write_text('{"id": "1", "problem": "What?", "answer": "???"}\n'
                                                 '{"id": "2", "problem": "Who?"}\n')
    with pytest.raises(M1Error) as e:
        load_benchmarks(_cfg([{"kind": "curated", "name": "bad"}]), tmp_path, seed=0)
    assert "unparseable_reference x1" in str(e.value) and "missing_field x1" in str(e.value)
