"""The evaluate stage: score every model on every benchmark, then the time-budget analysis and a speed run.

    run(config, {"models": {"hybrid": "<hybrid dir>", "teacher": "<teacher source>"}, "data_dir": "<run_dir>/data"})
    run(config, {"model_dir": "<hybrid dir>", "data_dir": ...})   # + the teacher (include_teacher) + evaluate.models

Outputs go to <run_dir>/eval/ (or inputs["out_dir"]); they are written into a temporary directory beside it and
moved into place at the end, so a failed run leaves the previous outputs untouched. Models are evaluated one after
the other (one in memory at a time), in the same engine (components/evaluate/models.py).

Output layout:
  metrics.json                 flat metrics (keys in components/evaluate/report.py); also copied to
                               <run_dir>/metrics/evaluate.json for `dvc metrics` (and the plots to
                               <run_dir>/plots/eval/ for `dvc plots`) when writing to the default place
  results.csv / results.md     model x benchmark table (pass@1 +- SE, pass@k, maj@k, excluded rows, ...)
  by_source.csv / by_source.md model x source table
  samples.jsonl                per model and problem: answers, correctness, lengths, answer groups (all samples)
  completions_sample.jsonl     a few completions with their text per model and benchmark
  excluded.jsonl               benchmark rows left out (no parseable reference answer, bad row) with the reason
  models.json                  what was evaluated (source, kind, layers, parameters, load time, throughput)
  time_budget.csv / .png       accuracy vs seconds per problem, (a) self-consistency (b) longer max length
  arms.json                    hybrid vs transformer arm at equal budgets: gap in points, lead, crossings
                               (components/evaluate/arms.py), when both arms were evaluated
  speed.csv / .json / .png     generation speed: hybrid vs same-shape attention model vs transformers static cache

Simplification: the speed run inside the stage is small (params `evaluate.speed`); the full grid is `m1 bench`.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from components.errors import M1Error
from components.evaluate import arms, report, speed, speed_report, timebudget
from components.evaluate.benchmarks import load_benchmarks
from components.evaluate.models import is_hybrid_dir, load_eval_model, resolve_device
from components.evaluate.report import key
from components.evaluate.sampling import (
    prompt_texts,
    sample_completions,
    tokenize_prompts,
)
from components.evaluate.scoring import score_problem
from components.model.config import HybridConfig
from components.model.convert import check_attn_layers
from components.model.teacher import (
    load_teacher_config,
    random_llama_config,
    resolve_source,
)
from components.tracking import Tracker


@dataclass
class EvalOutputs:
    eval_dir: Path
    metrics_json: Path
    results_csv: Path
    results_md: Path
    by_source_csv: Path
    by_source_md: Path
    samples_jsonl: Path
    completions_sample: Path
    excluded_jsonl: Path
    models_json: Path
    time_budget_csv: Path | None = None
    time_budget_png: Path | None = None
    arms_json: Path | None = None  # hybrid vs transformer arm at equal budgets, when both were evaluated
    speed_csv: Path | None = None
    speed_json: Path | None = None
    speed_png: Path | None = None
    dvc_metrics_json: Path | None = None
    # copies of the plots outside eval/ (DVC cannot declare plots inside a tracked output directory)
    dvc_plots: list[Path] = field(default_factory=list)
    # the hybrid that was evaluated (the model the pipeline registers), None when only teachers were scored
    model_dir: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    models: dict[str, dict] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def default_models(config, hybrid: list[str] | None = None, teacher: str | None = None) -> dict[str, str]:
    """Models `m1 eval` scores when not told: the pipeline's latest hybrid, the teacher, and evaluate.models."""
    cfg = config.evaluate
    models: dict[str, str] = {}
    if hybrid:
        for spec in hybrid:
            name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
            models[name or _model_name(path, models)] = path
    else:
        for cand in cfg.hybrid_candidates:
            d = Path(config.run_dir) / cand
            if (d / "config.json").is_file():
                models["hybrid"] = str(d)
                break
    if teacher or cfg.include_teacher:
        models["teacher"] = teacher or config.teacher.source
    models.update(cfg.models)
    if not models:
        raise M1Error(f"no model to evaluate: no hybrid under {config.run_dir} ({', '.join(cfg.hybrid_candidates)}); "
                      f"pass --model DIR or --teacher SRC")
    return models


def models_from_inputs(config, inputs: dict) -> dict[str, str]:
    """inputs["models"] ({name: source}) as given; or inputs["model_dir"] (the pipeline's latest hybrid) scored as
    "hybrid" beside the teacher and evaluate.models; or, with neither, default_models."""
    if inputs.get("models"):
        return {str(k): str(v) for k, v in inputs["models"].items()}
    if inputs.get("model_dir"):
        return default_models(config, [f"hybrid={inputs['model_dir']}"])
    return default_models(config)


def _model_name(path: str, taken: dict) -> str:
    p = Path(path)
    base = p.parent.name if p.name == "model" and p.parent.name else p.name
    name, i = base or "model", 1
    while name in taken:
        i += 1
        name = f"{base}-{i}"
    return name


def _check_sources(models: dict[str, str]) -> None:
    """Fail in one line before any weights load: a missing path or an unusable teacher source."""
    for name, src in models.items():
        try:
            if is_hybrid_dir(src):
                HybridConfig.load(src)
            elif src.startswith("random:"):
                random_llama_config(src.split(":", 1)[1])
            else:
                resolve_source(src)
        except M1Error as e:
            raise M1Error(f"model {name} ({src}) does not load: {e}") from None


def run(config, inputs: dict | None = None) -> EvalOutputs:
    started = time.time()
    inputs = inputs or {}
    cfg = config.evaluate
    seed = cfg.seed if cfg.seed is not None else config.seed
    models = models_from_inputs(config, inputs)
    data_dir = inputs.get("data_dir") or str(Path(config.run_dir) / "data")
    out_dir = Path(inputs.get("out_dir") or Path(config.run_dir) / "eval")
    instruction = cfg.prompt.instruction if cfg.prompt.instruction is not None else config.data.instruction
    system_prompt = cfg.prompt.system_prompt if cfg.prompt.system_prompt is not None else config.data.system_prompt
    device = resolve_device(cfg.device)

    _check_sources(models)
    benches = load_benchmarks(cfg, data_dir, seed)
    excluded = {b.name: len(b.excluded) for b in benches}
    problems = [p for b in benches for p in b.problems]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        scores: dict[str, list] = {}
        info: dict[str, dict] = {}
        completions_sample, samples = [], []
        throughput: dict[str, float] = {}
        hybrid_cfg = None
        for name, src in models.items():
            em = load_eval_model(name, src, device, cfg.dtype, seed=config.seed)
            info[name] = em.describe()
            if em.kind == "hybrid" and hybrid_cfg is None:
                hybrid_cfg = em.model.config
            texts, templated = prompt_texts(problems, em.tokenizer, cfg, instruction, system_prompt)
            ids = tokenize_prompts(texts, em.tokenizer, templated)
            bs = cfg.model_batch_size.get(name, cfg.batch_size)
            comps, gstats = sample_completions(em, ids, cfg, seed, desc=name, batch_size=bs)
            info[name].update({k: round(v, 3) for k, v in gstats.items()})
            scores[name] = [score_problem(p, c, cfg.verify_timeout_s, cfg.answer_in_think)
                            for p, c in zip(problems, comps)]
            per_bench: dict[str, int] = {}
            for p, text, c, s in zip(problems, texts, comps, scores[name]):
                samples.append({"model": name, "benchmark": p.benchmark, "id": p.id, "source": p.source,
                                "reference": p.answer, "answers": s.answers, "correct": s.correct,
                                "n_tokens": s.n_tokens, "finished": s.finished, "labels": s.labels,
                                "group_correct": s.group_correct})
                if per_bench.get(p.benchmark, 0) < cfg.completions_sample:
                    per_bench[p.benchmark] = per_bench.get(p.benchmark, 0) + 1
                    completions_sample.append({"model": name, "benchmark": p.benchmark, "id": p.id,
                                               "reference": p.answer, "prompt": text, "completion": c[0].text,
                                               "answer": s.answers[0], "correct": s.correct[0],
                                               "n_tokens": c[0].n_tokens, "finish_reason": c[0].finish_reason})
            batch = min(bs, len(ids) * cfg.n_samples)
            if cfg.time_budget.enabled and cfg.time_budget.throughput == "measured":
                mean_prompt = round(sum(len(x) for x in ids) / max(1, len(ids)))
                tp = timebudget.measure_throughput(em.model, batch, mean_prompt, cfg.time_budget.throughput_tokens,
                                                   device, seed)
            else:
                tp = {"tokens_per_s": gstats["decode_tokens_per_s"], "batch": batch, "source": "generation"}
            if tp["tokens_per_s"] > 0:
                throughput[name] = tp["tokens_per_s"]
            info[name]["throughput"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in tp.items()}
            del em
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

        metrics: dict[str, float] = {}
        for name, sc in scores.items():
            metrics.update(report.model_metrics(name, sc, cfg.ks))
            metrics[report.key(name, "timing", "load_s")] = info[name]["load_s"]
            metrics[report.key(name, "timing", "generate_s")] = info[name]["generate_s"]
            metrics[report.key(name, "timing", "effective_tokens_per_s")] = info[name]["effective_tokens_per_s"]
            # where a batch's time goes, and how many row-steps went to rows that had already stopped (a batch
            # decodes until its longest sample ends): decode_row_steps against generated_tokens
            for k in ("prefill_s", "capture_s", "decode_s", "generated_tokens", "decode_row_steps"):
                metrics[report.key(name, "timing", k)] = info[name][k]
            if name in throughput:
                metrics[report.key(name, "timing", "throughput_tokens_per_s")] = throughput[name]
        for b in benches:
            metrics[report.key("data", b.name, "rows")] = float(b.rows_read)
            metrics[report.key("data", b.name, "excluded")] = float(len(b.excluded))

        out = EvalOutputs(
            eval_dir=out_dir, metrics_json=out_dir / "metrics.json", results_csv=out_dir / "results.csv",
            results_md=out_dir / "results.md", by_source_csv=out_dir / "by_source.csv",
            by_source_md=out_dir / "by_source.md", samples_jsonl=out_dir / "samples.jsonl",
            completions_sample=out_dir / "completions_sample.jsonl", excluded_jsonl=out_dir / "excluded.jsonl",
            models_json=out_dir / "models.json", models=info, excluded=excluded)
        report.write_tables(report.table_rows(scores, cfg.ks, "benchmark", excluded), cfg.ks, "benchmark",
                            tmp / "results.csv", tmp / "results.md", "Accuracy per benchmark")
        report.write_tables(report.table_rows(scores, cfg.ks, "source"), cfg.ks, "source", tmp / "by_source.csv",
                            tmp / "by_source.md", "Accuracy per source")
        report.write_jsonl(samples, tmp / "samples.jsonl")
        report.write_jsonl(completions_sample, tmp / "completions_sample.jsonl")
        report.write_jsonl(({"benchmark": e.benchmark, "id": e.id, "reason": e.reason, "detail": e.detail}
                            for b in benches for e in b.excluded), tmp / "excluded.jsonl")

        if cfg.time_budget.enabled and throughput:
            stats = {m: (throughput[m], sum(t for p in scores[m] for t in p.n_tokens) /
                         max(1, sum(p.n for p in scores[m]))) for m in scores}
            budgets = cfg.time_budget.budgets_s or timebudget.budget_grid(
                stats, cfg.n_samples, cfg.max_new_tokens, cfg.time_budget.points)
            rows = timebudget.curves(scores, throughput, budgets, cfg.max_new_tokens)
            timebudget.write_csv(rows, tmp / "time_budget.csv")
            timebudget.plot(rows, tmp / "time_budget.png", "all",
                            f"accuracy vs generation time, all benchmarks ({device.type}, n={cfg.n_samples}, "
                            f"max {cfg.max_new_tokens} tokens; dotted: beyond the sample pool)")
            out.time_budget_csv, out.time_budget_png = out_dir / "time_budget.csv", out_dir / "time_budget.png"
            if all(a in throughput for a in arms.ARMS):
                comparison = arms.compare(rows)
                (tmp / "arms.json").write_text(json.dumps(comparison, indent=1) + "\n")
                metrics.update(arms.metrics(comparison))
                out.arms_json = out_dir / "arms.json"

        if cfg.speed.enabled:
            metrics.update(_speed(config, hybrid_cfg, tmp))
            out.speed_csv, out.speed_json, out.speed_png = (out_dir / "speed.csv", out_dir / "speed.json",
                                                            out_dir / "speed.png")

        (tmp / "models.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if "out_dir" not in inputs:
        # DVC cannot declare metrics or plots inside a tracked output directory: keep copies beside it.
        mdir = Path(config.run_dir) / "metrics"
        mdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out.metrics_json, mdir / "evaluate.json")
        out.dvc_metrics_json = mdir / "evaluate.json"
        pdir = Path(config.run_dir) / "plots" / "eval"
        shutil.rmtree(pdir, ignore_errors=True)
        pdir.mkdir(parents=True)
        for p in (out.time_budget_csv, out.time_budget_png, out.speed_csv, out.speed_png):
            if p is not None and p.exists():
                shutil.copyfile(p, pdir / p.name)
                out.dvc_plots.append(pdir / p.name)
    # the model named "hybrid" (the transformer arm is of the same model class, all layers attention), else the first
    # of the hybrid class
    out.model_dir = models.get("hybrid") if info.get("hybrid", {}).get("kind") == "hybrid" else \
        next((m for m, i in zip(models.values(), info.values()) if i["kind"] == "hybrid"), None)
    out.metrics = metrics
    out.seconds = time.time() - started

    tracker = Tracker()
    tracker.log_params({"evaluate": cfg.model_dump(mode="json"), "eval_models": models, "eval_seed": seed})
    tracker.log_metrics(metrics)
    for p in (out.metrics_json, out.results_csv, out.results_md, out.by_source_csv, out.by_source_md,
              out.completions_sample, out.excluded_jsonl, out.models_json, out.time_budget_csv, out.time_budget_png,
              out.arms_json, out.speed_csv, out.speed_json, out.speed_png):
        if p is not None and p.exists():
            tracker.log_artifact(p, "eval")
    tracker.set_tags({"eval.models": ",".join(models), "eval.benchmarks": ",".join(b.name for b in benches)})
    return out


def _speed(config, hybrid_cfg, out_dir: Path) -> dict[str, float]:
    sc = config.evaluate.speed
    if sc.shape == "auto":
        if hybrid_cfg is not None:
            cfg, shape = hybrid_cfg, "evaluated-hybrid"
        else:
            src = config.teacher.source
            check_attn_layers(src, config.convert.attn_layers)
            lcfg = random_llama_config(src.split(":", 1)[1]) if src.startswith("random:") else load_teacher_config(src)
            cfg = HybridConfig.from_llama(lcfg, attn_layers=config.convert.attn_layers, mixer=config.convert.mixer)
            shape = "teacher"
    else:
        cfg, shape = speed.hybrid_config(sc.shape, None, config.convert.mixer), sc.shape
    dev = resolve_device(sc.device)
    dtype = (torch.bfloat16 if dev.type == "cuda" else torch.float32) if sc.dtype == "auto" else getattr(torch, sc.dtype)
    rows = speed.run_speed(cfg, shape, list(sc.engines), list(sc.batch_sizes), sc.prompt_len, list(sc.decode_lens),
                           dev, dtype, seed=config.seed, hf_compile=sc.hf_compile, command="m1 eval (evaluate.speed)")
    meta = {"shape": shape, "attn_layers": cfg.attn_layers, "mixer": cfg.mixer, "layers": cfg.num_hidden_layers,
            **speed.environment(dev, dtype, "m1 eval (evaluate.speed)")}
    speed_report.write_outputs(rows, out_dir, meta)

    out = {}
    for r in rows:
        if r.get("status") == "ok":
            out[key("speed", r["engine"], f"b{r['batch']}_d{r['decode_len']}", "tokens_per_s")] = r["tokens_per_s"]
    for s in speed_report.speedups(rows):
        out[key("speed", f"hybrid_vs_{s['vs']}", f"b{s['batch']}_d{s['decode_len']}")] = s["speedup"]
    return out
