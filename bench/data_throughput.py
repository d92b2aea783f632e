"""Throughput of each curation step on this machine, in rows per second (a benchmark, not a test).

    .venv/bin/python bench/data_throughput.py [--rows 20000] [--end-to-end-rows 100000]

Steps are timed in isolation on synthetic rows written to a local JSONL file: reading (our streaming
reader and `datasets` streaming), row checks in 1 and N worker processes, exact and MinHash dedup,
decontamination, templating+tokenisation and packing. The end-to-end runs curate local sources of
--end-to-end-rows sizes through `curate.run`, each in a fresh process, and report its peak memory:
every pass streams, so memory grows only with the dedup indexes, not with the rows themselves
(try --end-to-end-rows 20000,1000000).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(label, n, fn, results):
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    results.append((label, n, dt))
    print(f"{label:<38} {n:>9} rows {dt:>8.2f} s {n / dt:>12,.0f} rows/s", flush=True)
    return out


def write_rows(path: Path, n: int, seed: int) -> None:
    from components.data.sources.synthetic import generate

    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in generate(n, seed))


def _peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM; getrusage's maxrss can carry over from the parent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _end_to_end(src: str, run_dir: str, num_proc: int, q) -> None:
    """Curate one local source in this (fresh) process: (seconds, sft1 documents, rows, peak RSS MiB)."""
    from components.config import load_config
    from components.data import curate

    conf = load_config(overrides={"run_dir": run_dir, "data": {
        "num_proc": num_proc,
        "sources": [{"kind": "local", "name": "big", "path": src, "splits": ["sft1"],
                     "fields": {"problem": "problem", "solution": "solution", "answer": "answer", "id": "id"}}]}})
    t = time.perf_counter()
    out = curate.run(conf)
    secs = time.perf_counter() - t
    q.put((secs, out.records["sft1"], out.rows["sft1"], _peak_rss_mib()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--num-proc", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--end-to-end-rows", type=lambda v: [int(x) for x in v.split(",")], default=[20000, 100000],
                    help="comma-separated source sizes for the end-to-end runs")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    n = args.rows

    from components.data import curate
    from components.data import dedup as dd
    from components.data.config import DataConfig, DedupConfig, FieldMap, LocalSource
    from components.data.decontam import EvalIndex
    from components.data.packing import Packer
    from components.data.record import Record
    from components.data.sources import make_adapter
    from components.data.sources.synthetic import generate
    from components.data.templating import Formatter
    from components.data.tokenizer_cache import cached_tokenizer

    results: list = []
    tmp = Path(tempfile.mkdtemp(prefix="m1-bench-"))
    src = tmp / "rows.jsonl"
    print(f"machine: {os.cpu_count()} CPUs; rows per step: {n}")
    timed("generate synthetic", n, lambda: write_rows(src, n, 1), results)

    fields = FieldMap(problem="problem", solution="solution", trace="trace", final="final", answer="answer", id="id")
    spec = LocalSource(name="bench", path=str(src), splits=["sft1", "sft2", "rl"], fields=fields)
    adapter = make_adapter(spec, 0)
    raws = timed("read jsonl (streaming reader)", n, lambda: list(adapter.raw_rows()), results)

    def via_datasets():
        from datasets import load_dataset

        return sum(1 for _ in load_dataset("json", data_files=str(src), split="train", streaming=True))

    timed("read jsonl (datasets streaming)", n, via_datasets, results)

    cfg = DataConfig(sources=[spec], num_proc=1)
    curate._init_worker(cfg, 0)
    jobs = [(0, list(enumerate(raws))[i : i + cfg.batch_size]) for i in range(0, n, cfg.batch_size)]
    outs = timed("check+verify+minhash (1 process)", n, lambda: [curate._work(j) for j in jobs], results)

    def parallel():
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.num_proc, curate._init_worker, (cfg, 0)) as pool:
            return pool.map(curate._work, jobs)

    timed(f"check+verify+minhash ({args.num_proc} processes)", n, parallel, results)

    recs = [(json.loads(r[0]), r[1], r[3], r[4]) for o in outs for r in o[0]]
    dcfg = DedupConfig()
    texts = [r["problem"] for r, *_ in recs]
    timed("exact-dedup keys", len(texts), lambda: [dd.exact_key(t) for t in texts], results)
    timed("minhash signatures", len(texts), lambda: [dd.minhash_values(t, dcfg) for t in texts], results)
    d = dd.Deduper(dcfg)
    timed("dedup index (exact + LSH)", len(recs),
          lambda: Counter(d.check(split, f"{split}/{r['id']}", k, hv) for r, split, k, hv in recs), results)

    idx = EvalIndex(8, 0.5)
    for r in generate(500, 99):
        idx.add("eval", r["id"], r["problem"])
    idx.finalize()
    docs = [f"{r['problem']}\n{r['solution'] or ''}" for r, *_ in recs]
    timed("decontaminate (500 eval problems)", len(docs), lambda: sum(bool(idx.matches(t)) for t in docs), results)

    tok = cached_tokenizer("smollm2")
    fmt = Formatter(tok, DataConfig().instruction)
    sft = [Record(**r) for r, split, *_ in recs if split in ("sft1", "sft2")]
    enc = timed("template + tokenize + loss mask", len(sft),
                lambda: [e for i in range(0, len(sft), 256) for e in fmt.encode(sft[i : i + 256])], results)
    rows: list = []
    packer = Packer(2048, tok.pad_token_id, 64, rows.append)

    def pack():
        for e in enc:
            packer.add(e.input_ids, e.loss_mask)
        packer.flush()

    timed("pack (seq_len 2048)", len(enc), pack, results)

    import multiprocessing as mp

    for size in args.end_to_end_rows:
        e2e_src = tmp / f"e2e-{size}.jsonl"
        write_rows(e2e_src, size, 2)
        # A fresh interpreter per run, so its peak memory is the stage's own.
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=_end_to_end, args=(str(e2e_src), str(tmp / f"run-{size}"), args.num_proc, q))
        proc.start()
        secs, kept, nrows, peak = q.get()
        proc.join()
        results.append((f"curate.run end to end ({size} rows)", size, secs))
        print(f"{'curate.run end to end (local source)':<38} {size:>9} rows {secs:>8.2f} s {size / secs:>12,.0f} rows/s"
              f"  kept {kept} sft1 docs in {nrows} rows, peak RSS of the stage process {peak:.0f} MiB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"step": s, "rows": k, "seconds": round(t, 3), "rows_per_s": round(k / t, 1)}
                       for s, k, t in results], f, indent=2)


if __name__ == "__main__":
    main()
