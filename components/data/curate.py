"""The curate stage: sources -> checks -> dedup -> decontamination -> templating -> packing.

Three streaming passes, so that no source is ever held in memory:
  1. read every source row by row; map, check and verify rows in `num_proc` worker processes (a
     bounded number of batches in flight); exact- and near-dedup per split; write records to
     per-split staging JSONL (evaluation records to one staging file per evaluation set);
  2. index every evaluation problem by n-grams, then stream each training split through
     decontamination (report in decontamination.jsonl) and carve the SFT-1 held-out slice;
  3. stream each split through a seeded shuffle buffer, the chat template and the tokenizer, into the
     packer (sft1, sft1_heldout, sft2) or the prompt writer (rl); evaluation sets get prompts.

Everything is written under a temporary directory next to <run_dir>/data and moved into place at the
end, so a failed run leaves the previous output untouched and no partial output behind.

One file of ~500 lines on purpose: the three passes share the staging files, the reject log and the stats, and
read top to bottom they are the stage's description; the pieces each pass calls live in their own modules
(sources/, checks, dedup, decontam, templating, packing, report).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from components import mathcheck
from components.data import dedup as dd
from components.data.checks import route_row, row_error_reject
from components.data.config import DataConfig
from components.data.decontam import EvalIndex
from components.data.packing import (
    PACKED_SCHEMA,
    Packer,
    ShardWriter,
    real_tokens,
    sha256_file,
)
from components.data.record import Record, Reject, RowError, preview, stable_fraction
from components.data.report import (
    Stats,
    build_report,
    plot_lengths,
    write_json,
    write_markdown,
)
from components.data.sources import make_adapter
from components.data.templating import Formatter
from components.data.tokenizer_cache import cached_tokenizer
from components.errors import M1Error
from components.model.teacher import resolve_source, tokenizer_source

TRAIN_SPLITS = ("sft1", "sft2", "rl")
PACKED_OUTPUTS = ("sft1", "sft1_heldout", "sft2")
RL_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("problem", pa.string()),
                       ("prompt", pa.string()), ("answer", pa.string())])


@dataclass
class CurateOutputs:
    data_dir: Path
    sft1_dir: Path
    sft1_heldout_dir: Path
    sft2_dir: Path
    rl_dir: Path
    eval_dir: Path
    eval_sets: dict[str, Path]
    rejects: Path
    decontamination: Path
    manifest: Path
    report_json: Path
    metrics_json: Path  # copy of report.json outside data/, for `dvc metrics`
    report_md: Path
    token_lengths_png: Path
    records: dict[str, int] = field(default_factory=dict)  # documents/prompts/items kept per output
    rows: dict[str, int] = field(default_factory=dict)  # packed rows (sft*) or prompt rows (rl)
    tokens: dict[str, int] = field(default_factory=dict)  # real (non-padding) tokens per packed output
    rejected: int = 0
    duplicates: int = 0
    decontaminated: int = 0
    seconds: float = 0.0


# ----------------------------------------------------------------------------- pass 1 (workers)

_W: dict = {}


def _init_worker(cfg: DataConfig, seed: int) -> None:
    _W["cfg"] = cfg
    _W["seed"] = seed
    _W["adapters"] = [make_adapter(s, seed) for s in cfg.sources]


def _work(job: tuple[int, list[tuple[int, object]]]):
    src_idx, items = job
    cfg: DataConfig = _W["cfg"]
    spec = cfg.sources[src_idx]
    adapter = _W["adapters"][src_idx]
    out, rejects, counts = [], [], Counter()
    for index, raw in items:
        try:
            row = adapter.to_row(raw, index)
            recs, rej = route_row(row, spec.name, list(spec.splits), cfg.checks, spec.holdout_fraction,
                                  spec.eval_set_name(), _W["seed"], counts)
        except RowError as e:
            rejects.append(row_error_reject(spec.name, index, preview(raw), e).to_json())
            continue
        except Exception as e:  # anything an odd row triggers is that row's problem, not the stage's
            msg = str(e).splitlines()[0] if str(e) else ""
            rejects.append(Reject(spec.name, f"{spec.name}/#{index}", "bad_row", f"{type(e).__name__}: {msg}",
                                  row=preview(raw)).to_json())
            continue
        rejects += [r.to_json() for r in rej]
        signatures: dict = {}  # the splits of one row usually share their dedup text
        for r in recs:
            text = dd.dedup_text(r.problem, r.solution, cfg.dedup.key)
            sig = signatures.get(text)
            if sig is None:
                sig = signatures[text] = [dd.exact_key(text), None]
            if cfg.dedup.near and r.split != "eval" and sig[1] is None:
                sig[1] = dd.minhash_values(text, cfg.dedup)
            out.append((r.to_json(), r.split, r.metadata.get("eval_set"), sig[0], sig[1] if r.split != "eval" else None))
    return out, rejects, counts


def _batches(it: Iterator, size: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Staging:
    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, object] = {}
        root.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, line: str) -> None:
        f = self.files.get(name)
        if f is None:
            f = self.files[name] = open(self.root / f"{name}.jsonl", "w", encoding="utf-8")
        f.write(line + "\n")

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

    def read(self, name: str) -> Iterator[Record]:
        path = self.root / f"{name}.jsonl"
        if not path.exists():
            return
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield Record.from_json(line)


def _progress(iterable, **kw):
    return tqdm(iterable, disable=None, leave=False, dynamic_ncols=True, **kw)


def _jobs(adapter, src_idx: int, name: str, batch_size: int, stats: Stats) -> Iterator:
    for batch in _batches(enumerate(adapter.raw_rows()), batch_size):
        stats.add(name, "rows_read", len(batch))
        yield (src_idx, batch)


def _results(pool, jobs: Iterator, num_proc: int) -> Iterator:
    """Worker results in submission order, with at most 2 x num_proc batches in flight: the source is read
    only as fast as it is checked, never queued whole."""
    if pool is None:
        for job in jobs:
            yield _work(job), len(job[1])
        return
    inflight: deque = deque()
    for job in jobs:
        inflight.append((pool.apply_async(_work, (job,)), len(job[1])))
        if len(inflight) >= 2 * num_proc:
            res, n = inflight.popleft()
            yield res.get(), n
    while inflight:
        res, n = inflight.popleft()
        yield res.get(), n


def _pass1(config, cfg: DataConfig, staging: _Staging, rejects, stats: Stats) -> None:
    deduper = dd.Deduper(cfg.dedup)
    eval_seen: dict[str, set] = {}
    pool = None
    # A daemonic process (a multiprocessing pool worker) may not start children: check in-process there.
    if cfg.num_proc > 1 and not mp.current_process().daemon:
        mathcheck.preload()  # imported once here and inherited by the forked workers
        pool = mp.get_context("fork").Pool(cfg.num_proc, initializer=_init_worker, initargs=(cfg, config.seed))
    else:
        _init_worker(cfg, config.seed)
    try:
        for src_idx, spec in enumerate(cfg.sources):
            t0 = time.time()
            adapter = make_adapter(spec, config.seed)
            bar = _progress(None, total=adapter.expected_rows(), desc=f"check {spec.name}", unit="row")
            for (out, rej, counts), n in _results(pool, _jobs(adapter, src_idx, spec.name, cfg.batch_size, stats),
                                                    cfg.num_proc):
                bar.update(n)
                stats.merge(spec.name, counts)
                for line in rej:
                    rejects.write(line + "\n")
                    r = json.loads(line)
                    stats.reject(spec.name, r["reason"], r.get("split"))
                for rec_json, split, eval_set, key, hv in out:
                    if split == "eval":
                        seen = eval_seen.setdefault(eval_set, set())
                        if key in seen:
                            stats.add(spec.name, "exact_duplicate:eval")
                            continue
                        seen.add(key)
                        staging.write(f"eval__{eval_set}", rec_json)
                        stats.add(spec.name, f"routed:eval:{eval_set}")
                        continue
                    reason = deduper.check(split, json.loads(rec_json)["id"], key, hv)
                    if reason:
                        stats.add(spec.name, f"{reason}:{split}")
                        continue
                    staging.write(split, rec_json)
                    stats.add(spec.name, f"routed:{split}")
            bar.close()
            if not stats.by_source[spec.name]["rows_read"]:
                # An empty file would otherwise be curated "successfully" (and cached) and only fail a later
                # stage with "no shards": refuse it here, naming what was read.
                raise M1Error(f"source {spec.name}: {_no_rows(adapter)}")
            stats.timings[f"check:{spec.name}"] = time.time() - t0
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        staging.close()


def _no_rows(adapter) -> str:
    files = adapter.files() if hasattr(adapter, "files") else getattr(adapter.spec, "data_files", None)
    return f"no rows in {', '.join(files)}" if files else f"the {adapter.spec.kind} source yielded no rows"


# ----------------------------------------------------------------------------- pass 2


def _eval_sets(cfg: DataConfig) -> list[str]:
    names = [s.name for s in cfg.sources if "eval" in s.splits]
    names += [s.eval_set_name() for s in cfg.sources if s.holdout_fraction > 0]
    return names


def _pass2(config, cfg: DataConfig, staging: _Staging, decontam_path: Path, stats: Stats) -> int:
    t0 = time.time()
    index = EvalIndex(cfg.decontam.ngram, cfg.decontam.min_overlap, cfg.decontam.boilerplate_df)
    for name in _eval_sets(cfg):
        for r in staging.read(f"eval__{name}"):
            index.add(name, r.id, r.problem)
    index.finalize()
    removed = 0
    sft_problems: set[bytes] = set()  # TRAIN_SPLITS puts the SFT splits before rl
    with open(decontam_path, "w", encoding="utf-8") as log:
        for split in TRAIN_SPLITS:
            for r in _progress(staging.read(split), desc=f"decontaminate {split}", unit="rec"):
                if cfg.decontam.rl_unseen_in_sft:
                    key = dd.exact_key(r.problem)
                    if split != "rl":
                        sft_problems.add(key)
                    elif key in sft_problems:
                        removed += 1
                        stats.add(r.source, "seen_in_sft:rl")
                        log.write(json.dumps({"split": split, "id": r.id, "source": r.source,
                                              "problem": r.problem[:300], "matched": "sft"}, ensure_ascii=False) + "\n")
                        continue
                text = r.problem
                if "solution" in cfg.decontam.fields and r.solution:
                    text = f"{text}\n{r.solution}"
                hits = index.matches(text)
                if hits:
                    removed += 1
                    stats.add(r.source, f"decontaminated:{split}")
                    log.write(json.dumps({
                        "split": split, "id": r.id, "source": r.source, "problem": r.problem[:300],
                        "matched": [{"eval_set": m.item.eval_set, "eval_id": m.item.id, "overlap": m.overlap,
                                     "eval_problem": m.item.problem[:300]} for m in hits[:5]],
                    }, ensure_ascii=False) + "\n")
                    continue
                out = split
                if split == "sft1" and stable_fraction("heldout:" + r.id, config.seed) < cfg.sft1_heldout_fraction:
                    out = "sft1_heldout"
                staging.write(f"clean__{out}", r.to_json())
    staging.close()
    stats.timings["decontaminate"] = time.time() - t0
    stats.eval_index_size = len(index)
    return removed


# ----------------------------------------------------------------------------- pass 3


def _shuffled(it: Iterator, size: int, rng: random.Random) -> Iterator:
    buf: list = []
    for x in it:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = x
    rng.shuffle(buf)
    yield from buf


def _pack_output(name, seq_len, cfg, fmt, staging, out_dir, rejects, stats, seed, pad_id) -> dict:
    t0 = time.time()
    writer = ShardWriter(str(out_dir), PACKED_SCHEMA, cfg.packing.rows_per_shard, count_tokens=real_tokens)
    packer = Packer(seq_len, pad_id, cfg.packing.window, writer.write)
    per_source: dict[str, Counter] = {}
    docs = loss_tokens = end_of_turn = 0
    rng = random.Random(f"{seed}/{name}")
    lengths = stats.lengths[name]
    stream = _shuffled(staging.read(f"clean__{name}"), cfg.shuffle_buffer, rng)
    for batch in _batches(_progress(stream, desc=f"pack {name}", unit="doc"), 256):
        for rec, enc in zip(batch, fmt.encode(batch)):
            if enc is None:
                rejects.write(Reject(rec.source, rec.id, "template_dropped_content",
                                     "the chat template rewrote the assistant text", split=name, stage="template",
                                     row=rec.problem[:200]).to_json() + "\n")
                stats.reject(rec.source, "template_dropped_content", name)
                continue
            ids, mask = enc.input_ids, enc.loss_mask
            reason = None
            if enc.prompt_tokens > cfg.max_prompt_tokens:
                reason = ("prompt_too_long", f"{enc.prompt_tokens} > {cfg.max_prompt_tokens} tokens")
            elif len(ids) > seq_len:
                if cfg.packing.overlong == "truncate" and sum(mask[:seq_len]) > 0:
                    ids, mask = ids[:seq_len], mask[:seq_len]
                    stats.add(rec.source, f"truncated:{name}")
                else:
                    reason = ("too_long", f"{len(ids)} > {seq_len} tokens")
            if reason:
                rejects.write(Reject(rec.source, rec.id, reason[0], reason[1], split=name, stage="length",
                                     row=rec.problem[:200]).to_json() + "\n")
                stats.reject(rec.source, reason[0], name)
                continue
            packer.add(ids, mask)
            lengths.append(len(ids))
            docs += 1
            loss_tokens += sum(mask)
            end_of_turn += enc.end_of_turn and len(ids) == len(enc.input_ids)  # a truncated one lost it
            c = per_source.setdefault(rec.source, Counter())
            c["documents"] += 1
            c["tokens"] += len(ids)
            stats.add(rec.source, f"kept:{name}")
    packer.flush()
    files = writer.close()
    if docs and not end_of_turn:
        # The loss on the token that closes the assistant turn is all that teaches a model to stop: without it the
        # fine-tuned model writes on to max_new_tokens.
        raise M1Error(f"{name}: no document's end-of-turn token carries loss: none of the {docs} documents has a "
                      f"special token right after the assistant's content (tokenizer {type(fmt.tok).__name__}, "
                      f"eos {fmt.tok.eos_token!r})")
    stats.timings[f"pack:{name}"] = time.time() - t0
    return {
        "kind": "packed", "dir": name, "seq_len": seq_len, "records": docs, "rows": sum(f["rows"] for f in files),
        "tokens": sum(f["tokens"] for f in files), "loss_tokens": loss_tokens, "end_of_turn_documents": end_of_turn,
        "pad_token_id": pad_id,
        "files": files, "per_source": {s: dict(c) for s, c in sorted(per_source.items())},
    }


def _rl_output(cfg, fmt, staging, out_dir, rejects, stats, seed) -> dict:
    t0 = time.time()
    writer = ShardWriter(str(out_dir), RL_SCHEMA, max(cfg.packing.rows_per_shard, 1024))
    per_source: dict[str, Counter] = {}
    rng = random.Random(f"{seed}/rl")
    lengths = stats.lengths["rl_prompt"]
    stream = _shuffled(staging.read("clean__rl"), cfg.shuffle_buffer, rng)
    for batch in _batches(_progress(stream, desc="prompts rl", unit="rec"), 256):
        prompts = [fmt.prompt(r.problem) for r in batch]
        for rec, prompt, n in zip(batch, prompts, fmt.count_tokens(prompts)):
            if n > cfg.max_prompt_tokens:
                rejects.write(Reject(rec.source, rec.id, "prompt_too_long", f"{n} > {cfg.max_prompt_tokens} tokens",
                                     split="rl", stage="length", row=rec.problem[:200]).to_json() + "\n")
                stats.reject(rec.source, "prompt_too_long", "rl")
                continue
            writer.write({"id": rec.id, "source": rec.source, "problem": rec.problem, "prompt": prompt,
                          "answer": rec.answer})
            lengths.append(n)
            c = per_source.setdefault(rec.source, Counter())
            c["rows"] += 1
            c["prompt_tokens"] += n
            stats.add(rec.source, "kept:rl")
    files = writer.close()
    stats.timings["prompts:rl"] = time.time() - t0
    rows = sum(f["rows"] for f in files)
    return {"kind": "prompts", "dir": "rl", "records": rows, "rows": rows, "files": files,
            "per_source": {s: dict(c) for s, c in sorted(per_source.items())}}


def _eval_output(name, fmt, staging, out_path, stats) -> dict:
    n = 0
    per_source: Counter = Counter()
    with open(out_path, "w", encoding="utf-8") as f:
        for r in staging.read(f"eval__{name}"):
            f.write(json.dumps({"id": r.id, "source": r.source, "problem": r.problem, "answer": r.answer,
                                "prompt": fmt.prompt(r.problem)}, ensure_ascii=False) + "\n")
            n += 1
            per_source[r.source] += 1
            stats.add(r.source, f"kept:eval:{name}")
    return {"kind": "eval", "file": f"eval/{name}.jsonl", "records": n, "rows": n, "sha256": sha256_file(str(out_path)),
            "per_source": dict(per_source)}


# ----------------------------------------------------------------------------- driver


def _tokenizer(config, inputs):
    if inputs and inputs.get("tokenizer") is not None:
        return inputs["tokenizer"]
    return cached_tokenizer(tokenizer_source(config.teacher.source))


def run(config, inputs: dict | None = None) -> CurateOutputs:
    """Curate the data described by config.data into <run_dir>/data. `inputs` may hold an already loaded
    tokenizer under "tokenizer" (saves the load when the caller has one)."""
    started = time.time()
    cfg: DataConfig = config.data
    resolve_source(tokenizer_source(config.teacher.source))  # a bad teacher path fails now, not after pass 1
    for spec in cfg.sources:
        adapter = make_adapter(spec, config.seed)  # unknown datasets/templates fail now, with their source named
        if hasattr(adapter, "files"):
            adapter.files()  # so does a missing local file
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final_dir = run_dir / "data"
    tmp = Path(tempfile.mkdtemp(prefix=".data.tmp-", dir=run_dir))
    try:
        stats = Stats()
        staging = _Staging(tmp / "_staging")
        with open(tmp / "rejects.jsonl", "w", encoding="utf-8") as rejects:
            _pass1(config, cfg, staging, rejects, stats)
            decontaminated = _pass2(config, cfg, staging, tmp / "decontamination.jsonl", stats)
            t0 = time.time()
            tok = _tokenizer(config, inputs)
            stats.timings["tokenizer"] = time.time() - t0
            fmt = Formatter(tok, cfg.instruction, cfg.system_prompt)
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            outputs = {}
            seq = {"sft1": cfg.packing.sft1_seq_len, "sft1_heldout": cfg.packing.sft1_seq_len,
                   "sft2": cfg.packing.sft2_seq_len}
            for name in PACKED_OUTPUTS:
                outputs[name] = _pack_output(name, seq[name], cfg, fmt, staging, tmp / name, rejects, stats,
                                             config.seed, pad_id)
            outputs["rl"] = _rl_output(cfg, fmt, staging, tmp / "rl", rejects, stats, config.seed)
            (tmp / "eval").mkdir()
            for name in _eval_sets(cfg):
                outputs[f"eval/{name}"] = _eval_output(name, fmt, staging, tmp / "eval" / f"{name}.jsonl", stats)
        shutil.rmtree(tmp / "_staging")

        n_rejects = sum(stats.reject_reasons.values())
        elapsed = time.time() - started
        summary = {k: {kk: v for kk, v in o.items() if kk in ("records", "rows", "tokens", "loss_tokens")}
                   for k, o in outputs.items()}
        report = build_report(stats, summary, elapsed, decontaminated)
        write_json(report, tmp / "report.json")
        write_markdown(report, tmp / "report.md")
        plot_lengths(stats, str(tmp / "token_lengths.png"),
                     {"sft1": seq["sft1"], "sft1_heldout": seq["sft1"], "sft2": seq["sft2"],
                      "rl_prompt": cfg.max_prompt_tokens})
        manifest = {
            "format": "m1-curate/1",
            "seed": config.seed,
            "config_sha256": _sha(cfg.model_dump_json()),
            "config": cfg.model_dump(mode="json"),
            "tokenizer": {"source": config.teacher.source, "class": type(tok).__name__, "vocab_size": len(tok),
                          "pad_token_id": pad_id, "eos_token_id": tok.eos_token_id},
            "instruction": cfg.instruction,
            "outputs": outputs,
            "rejects": {"file": "rejects.jsonl", "rows": n_rejects, "sha256": sha256_file(str(tmp / "rejects.jsonl"))},
            "decontamination": {"file": "decontamination.jsonl", "rows": decontaminated,
                                "sha256": sha256_file(str(tmp / "decontamination.jsonl"))},
        }
        write_json(manifest, tmp / "manifest.json")

        old = None
        if final_dir.exists():
            old = run_dir / f".data.old-{os.getpid()}"
            os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        # DVC cannot track a metrics file inside a tracked output directory: keep a copy beside it.
        (run_dir / "metrics").mkdir(exist_ok=True)
        shutil.copyfile(final_dir / "report.json", run_dir / "metrics" / "curate.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    d = final_dir
    return CurateOutputs(
        data_dir=d, sft1_dir=d / "sft1", sft1_heldout_dir=d / "sft1_heldout", sft2_dir=d / "sft2", rl_dir=d / "rl",
        eval_dir=d / "eval", eval_sets={n: d / "eval" / f"{n}.jsonl" for n in _eval_sets(cfg)},
        rejects=d / "rejects.jsonl", decontamination=d / "decontamination.jsonl", manifest=d / "manifest.json",
        report_json=d / "report.json", metrics_json=run_dir / "metrics" / "curate.json", report_md=d / "report.md", token_lengths_png=d / "token_lengths.png",
        records={k: o["records"] for k, o in outputs.items()},
        rows={k: o["rows"] for k, o in outputs.items() if not k.startswith("eval/")},
        tokens={k: o["tokens"] for k, o in outputs.items() if "tokens" in o},
        rejected=n_rejects,
        duplicates=stats.total("exact_duplicate") + stats.total("near_duplicate"),
        decontaminated=decontaminated,
        seconds=round(time.time() - started, 2),
    )


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


__all__ = ["CurateOutputs", "run"]
