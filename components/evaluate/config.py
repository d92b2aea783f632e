"""Settings of the evaluate stage (`evaluate:` in params.yaml). The defaults are the embedded default, sized for a
2-core CPU: a few held-out problems per curated set, 4 short samples each, a small time-budget sweep and a tiny
CPU speed run, so that scoring the teacher and the hybrid takes a couple of minutes. Profiles raise the sizes
(the reference settings: temperature 0.7, top-p 0.95, many samples, 32k new tokens, AIME/MATH-500)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from components.config_base import Section

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class CuratedBenchmark(Section):
    """An evaluation set written by the curate stage: <data_dir>/eval/<name>.jsonl (id, source, problem, answer,
    prompt). name "*" stands for every set found there."""
    kind: Literal["curated"] = "curated"
    name: str = Field(pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9_.-]*)$")
    max_problems: int | None = Field(None, gt=0)  # None = evaluate.max_problems
    # False: a set the curate stage did not write (a profile without that source) is skipped, not an error.
    required: bool = True


class HubBenchmark(Section):
    """A hub benchmark read through the data stage's hub catalogue (components/data/sources/hub_catalogue.py)."""
    kind: Literal["hub"] = "hub"
    name: str = Field(pattern=_NAME)
    max_problems: int | None = Field(None, gt=0)  # None = evaluate.max_problems
    # Registry key (math500, aime24, aime25, amc23, olympiadbench) or a registered hub id; default: name.
    dataset: str | None = None
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    # Local files with the hub set's own columns (offline mirrors, tests) instead of the hub.
    data_files: list[str] | None = None


class EvalFieldMap(Section):
    # Column names in a local file; id/prompt/source may be absent (None).
    problem: str = "problem"
    answer: str = "answer"
    id: str | None = "id"
    prompt: str | None = None
    source: str | None = None


class LocalBenchmark(Section):
    kind: Literal["local"] = "local"
    name: str = Field(pattern=_NAME)
    max_problems: int | None = Field(None, gt=0)  # None = evaluate.max_problems
    path: str  # a file or a glob (JSONL, Parquet or CSV)
    format: Literal["jsonl", "parquet", "csv"] | None = None  # default: from the suffix
    fields: EvalFieldMap = EvalFieldMap()


BenchmarkSpec = Annotated[CuratedBenchmark | HubBenchmark | LocalBenchmark, Field(discriminator="kind")]


class PromptConfig(Section):
    # Use a set's own templated prompt (curated sets carry one); otherwise the problem is templated here.
    use_dataset_prompt: bool = True
    # Appended to the problem (user turn = problem + "\n" + instruction); None = data.instruction.
    instruction: str | None = None
    # System turn; None = data.system_prompt (which None leaves to the chat template).
    system_prompt: str | None = None
    # False: plain "problem\ninstruction" text, no chat template (base models).
    chat_template: bool = True


class TimeBudgetConfig(Section):
    enabled: bool = True
    # Seconds of generation per problem at which accuracy is computed; None = `points` values spaced
    # geometrically from the cost of one short sample to the cost of the whole sample pool.
    budgets_s: list[float] | None = None
    points: int = Field(16, ge=2)
    # Decode throughput from the evaluation's own generation (free: the batches just run, real prompts and padding
    # included) or from a separate fixed-length run at the eval batch size (EOS disabled).
    throughput: Literal["generation", "measured"] = "generation"
    # Tokens decoded per row by the separate run (throughput: measured).
    throughput_tokens: int = Field(32, ge=2)


class SpeedConfig(Section):
    """A small speed run inside `m1 eval` (the full grid runs through `m1 bench` / bench/speed.py)."""
    enabled: bool = True
    # "auto" = the evaluated hybrid's own shape (random weights); or a random shape: tiny, smollm2-135m,
    # llama-3.2-3b.
    shape: str = "auto"
    engines: list[Literal["hybrid", "attention", "hf_static"]] = Field(
        default_factory=lambda: ["hybrid", "attention", "hf_static"])
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 4])
    prompt_len: int = Field(32, ge=1)
    decode_lens: list[int] = Field(default_factory=lambda: [16])
    device: str = "auto"  # auto = cuda when available
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    # hf_static through torch.compile as well (what a careful transformers user runs): the outside reference for the
    # transformer; compilation happens in a full-length warm-up of each shape, outside the timings
    hf_compile: bool = False


class EvalConfig(Section):
    # CHAMP's competition problems are beyond a 135M model: two keep the set in the report; the synthetic held-out
    # problems follow the SFT data's format, where a trained hybrid can score.
    benchmarks: list[BenchmarkSpec] = Field(default_factory=lambda: [
        CuratedBenchmark(name="champ_heldout", max_problems=2, required=False),
        CuratedBenchmark(name="synthetic_heldout", required=False)])
    # At most this many problems per benchmark (a seeded choice by problem id); None = all.
    max_problems: int | None = Field(6, gt=0)
    # Samples per problem, and the k of pass@k / maj@k (each k <= n_samples).
    n_samples: int = Field(4, gt=0)
    ks: list[int] = Field(default_factory=lambda: [1, 2, 4])
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(128, gt=0)
    stop_strings: list[str] = Field(default_factory=list)
    # Sequences decoded together (a batch that runs out of GPU memory is split in halves and retried).
    batch_size: int = Field(32, gt=0)
    # Per-model overrides of batch_size by model name: the all-attention teacher's KV cache at long lengths
    # needs a smaller batch than the hybrid.
    model_batch_size: dict[str, int] = Field(default_factory=dict)
    # generate()'s decode engine: auto = CUDA graphs on CUDA, eager on CPU; or eager / static / graph.
    decode_engine: Literal["auto", "eager", "static", "graph"] = "auto"
    prompt: PromptConfig = PromptConfig()
    # Evaluate the teacher too (in the same engine, converted with every layer kept as attention).
    include_teacher: bool = True
    # Further models to score: name -> saved hybrid directory or teacher source.
    models: dict[str, str] = Field(default_factory=dict)
    # Where `m1 eval` looks for the pipeline's latest hybrid, first existing wins (relative to run_dir).
    hybrid_candidates: list[str] = Field(default_factory=lambda: [
        "grpo/model", "sft2/model", "sft1/model", "distill/model", "convert/model"])
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # None = the global seed.
    seed: int | None = None
    # Seconds allowed to one math-verify comparison (a timeout counts as not equivalent).
    verify_timeout_s: float = Field(5.0, gt=0)
    # False: a thinking completion's answer is its last \boxed{} after its last </think>, the GRPO reward's rule (a box
    # inside <think>, closed or never closed, is no answer); completions without think tags answer anywhere.
    # True: the last \boxed{} anywhere, thinking included.
    answer_in_think: bool = False
    # Completions (with text) kept per model and benchmark in completions_sample.jsonl.
    completions_sample: int = Field(8, ge=0)
    time_budget: TimeBudgetConfig = TimeBudgetConfig()
    speed: SpeedConfig = SpeedConfig()

    @model_validator(mode="after")
    def _check(self):
        bad = [k for k in self.ks if k < 1 or k > self.n_samples]
        if bad:
            raise ValueError(f"ks {bad} must lie in 1..n_samples ({self.n_samples})")
        names = [b.name for b in self.benchmarks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate benchmark names {dup}")
        if any(b < 1 for b in self.speed.batch_sizes) or any(d < 1 for d in self.speed.decode_lens):
            raise ValueError("speed batch_sizes and decode_lens must be positive")
        return self
