"""Settings of the curate stage (`data:` in params.yaml). The defaults are the embedded default: only
offline sources (CHAMP, mathgenerator, the seeded synthetic generator), sized so that `m1 data curate`
runs in about a minute on a 2-core CPU. Hub datasets and local files are added as further `sources`
entries (see components/data/sources/hub_catalogue.py for the known hub datasets)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from components.config_base import Section

# datasketch is imported in the one check that needs it (_check_lsh): every command reads this config at start-up.

Split = Literal["sft1", "sft2", "rl", "eval"]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class _Source(Section):
    # Unique name: prefixes record ids, names the eval set of an eval-only source, keys the report.
    name: str = Field(pattern=_NAME)
    # Outputs this source feeds. sft1 needs a worked solution, sft2 a reasoning trace, rl/eval an answer;
    # a row lacking what a split needs is simply not routed there (counted in the report).
    splits: list[Split] = Field(min_length=1)
    # Read at most this many raw rows (None = all); the cap for large hub sets.
    max_rows: int | None = Field(None, gt=0)
    # Fraction of rows (chosen by a seeded hash of the row id) held out as an evaluation set instead of
    # being trained on; they go to eval/<holdout_set>.jsonl.
    holdout_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    holdout_set: str | None = Field(None, pattern=_NAME)

    @model_validator(mode="after")
    def _check_holdout(self):
        if self.holdout_fraction > 0 and "eval" in self.splits:
            raise ValueError(f"source {self.name}: holdout_fraction makes no sense for a source already in 'eval'")
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"source {self.name}: duplicate splits {self.splits}")
        return self

    def eval_set_name(self) -> str:
        return self.holdout_set or f"{self.name}_heldout"


class HubSource(_Source):
    kind: Literal["hub"] = "hub"
    # A catalogue key (openmathinstruct2, openr1_math, openthoughts_math, r1_distill_sft, deepscaler,
    # math500, aime24, aime25, amc23, olympiadbench) or the hub id of a registered dataset.
    dataset: str
    config: str | None = None  # hub subset; default: the catalogue's
    split: str | None = None  # hub split; default: the catalogue's
    revision: str | None = None
    # Local files with the same column layout (offline mirrors, tests); read with datasets' json/parquet/csv
    # builder instead of the hub.
    data_files: list[str] | None = None
    # sft2 sources with several traces per problem: how many correct traces to keep per problem (more
    # than one only survives deduplication with dedup.key = problem_solution).
    max_traces_per_problem: int = Field(1, gt=0)
    # Column mapping for a hub dataset that is not in the catalogue (ignored for catalogued ones).
    fields: FieldMap | None = None


class FieldMap(Section):
    # Column names in the file for each normalised field (None = absent).
    problem: str = "problem"
    solution: str | None = "solution"
    trace: str | None = None
    final: str | None = None
    answer: str | None = "answer"
    id: str | None = None


class LocalSource(_Source):
    kind: Literal["local"] = "local"
    path: str  # a file or a glob, relative to the working directory
    format: Literal["jsonl", "parquet", "csv"] | None = None  # default: from the file suffix
    fields: FieldMap = FieldMap()


class ChampSource(_Source):
    kind: Literal["champ"] = "champ"
    version: str = "v0"
    # Model-written solutions used as reasoning traces, by CHAMP prompt setting. Only solutions that CHAMP's
    # human annotators marked free of mistakes are used; these two settings carry such annotations.
    trace_prompts: list[str] = Field(default_factory=lambda: ["No C w/o H", "Direct C w/ H"])
    max_traces_per_problem: int = Field(1, gt=0)


class MathgenSource(_Source):
    kind: Literal["mathgenerator"] = "mathgenerator"
    n: int = Field(600, gt=0)
    # mathgenerator generator ids; the default keeps those with exact, checkable answers.
    generator_ids: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 3, 5, 6, 8, 9, 10, 11, 12, 16, 21, 22, 23, 26, 28, 30, 31, 49, 53,
                                 58, 71, 72, 77, 82, 97, 111]
    )
    seed: int = 0
    # mathgenerator has answers, no worked steps. True gives each row a direct trace for sft2 (restate the
    # question, state the answer, then </think> and the boxed answer): no reasoning, only the thinking format on
    # problems short enough to answer at once, so that a small student can close </think> on them.
    direct_traces: bool = False


class SyntheticSource(_Source):
    kind: Literal["synthetic"] = "synthetic"
    n: int = Field(1000, gt=0)
    seed: int = 0
    templates: list[str] | None = None  # None = all templates of components/data/sources/synthetic.py


HubSource.model_rebuild()

SourceSpec = Annotated[
    HubSource | LocalSource | ChampSource | MathgenSource | SyntheticSource, Field(discriminator="kind")
]


def _default_sources() -> list:
    return [
        ChampSource(name="champ", splits=["sft1", "sft2", "rl"], holdout_fraction=0.25, holdout_set="champ_heldout"),
        MathgenSource(name="mathgen", splits=["sft1", "rl"], n=600),
        SyntheticSource(name="synth_sft1", splits=["sft1"], n=2500, seed=1, holdout_fraction=0.04,
                        holdout_set="synthetic_heldout"),
        SyntheticSource(name="synth_sft2", splits=["sft2"], n=1200, seed=2),
        SyntheticSource(name="synth_rl", splits=["rl"], n=800, seed=3),
    ]


class ChecksConfig(Section):
    # Seconds allowed to one math-verify parse or comparison; a timeout rejects the row.
    verify_timeout_s: float = Field(5.0, gt=0)
    # Reject answers that are prose ("No", "98 values", "at least one") rather than mathematics.
    require_math_answer: bool = True
    # Reject a solution/trace whose own final answer does not match the reference answer.
    verify_solutions: bool = True
    min_problem_chars: int = Field(10, ge=1)
    min_solution_chars: int = Field(10, ge=1)
    max_answer_chars: int = Field(200, gt=0)


class DedupConfig(Section):
    # What identifies a duplicate within a split: the problem text, or problem and solution together.
    key: Literal["problem", "problem_solution"] = "problem"
    exact: bool = True
    near: bool = True
    # MinHash LSH (datasketch) on word shingles: estimated Jaccard similarity at or above which a later
    # record is dropped as a near duplicate of an earlier one.
    threshold: float = Field(0.8, gt=0.0, le=1.0)
    num_perm: int = Field(128, ge=16)
    shingle_words: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _check_lsh(self):
        if self.near:
            from datasketch import MinHashLSH

            try:  # datasketch needs at least two bands for this threshold and num_perm
                MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
            except ValueError as e:
                raise ValueError(f"dedup.threshold {self.threshold} with num_perm {self.num_perm}: {e}") from None
        return self


class DecontamConfig(Section):
    # Word n-gram length compared between training text and evaluation problems.
    ngram: int = Field(8, ge=1)
    # A training record is removed when it contains at least this fraction of an evaluation problem's
    # n-grams (1.0 = the whole problem verbatim; set very low to remove on any single shared n-gram).
    min_overlap: float = Field(0.5, gt=0.0, le=1.0)
    # An n-gram shared by more than this many evaluation problems is template/boilerplate phrasing and
    # does not count as evidence of contamination.
    boilerplate_df: int = Field(3, ge=1)
    # Training fields scanned for evaluation problems.
    fields: list[Literal["problem", "solution"]] = Field(default_factory=lambda: ["problem", "solution"])
    # Drop RL prompts whose problem (normalised text) an SFT record also has, so that GRPO's held-out accuracy is
    # measured on problems the student was never shown with their answer (generators with small problem spaces
    # repeat problems across draws). Logged in decontamination.jsonl with matched "sft".
    rl_unseen_in_sft: bool = False


class PackingConfig(Section):
    sft1_seq_len: int = Field(512, ge=16)
    sft2_seq_len: int = Field(1024, ge=16)
    # A templated document longer than the sequence length is rejected (to rejects.jsonl) or truncated.
    overlong: Literal["reject", "truncate"] = "reject"
    # Open sequences the first-fit packer keeps at once; more packs tighter, costs a little memory.
    window: int = Field(64, ge=1)
    rows_per_shard: int = Field(512, ge=1)


class DataConfig(Section):
    sources: list[SourceSpec] = Field(default_factory=_default_sources)
    # Appended to every problem (user turn = problem + "\n" + instruction).
    instruction: str = DEFAULT_INSTRUCTION
    # Optional system turn; None keeps the chat template's own default.
    system_prompt: str | None = None
    # Fraction of the SFT-1 mix (seeded hash of the id) packed separately as sft1_heldout/ for held-out
    # loss / KL measurements.
    sft1_heldout_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    # Templated prompts (system + user + generation prompt) longer than this are rejected.
    max_prompt_tokens: int = Field(512, ge=8)
    checks: ChecksConfig = ChecksConfig()
    dedup: DedupConfig = DedupConfig()
    decontam: DecontamConfig = DecontamConfig()
    packing: PackingConfig = PackingConfig()
    # Records mixed through a seeded shuffle buffer of this size before packing (bounded memory).
    shuffle_buffer: int = Field(10000, ge=1)
    # Worker processes for parsing/verification (1 = in-process).
    num_proc: int = Field(2, ge=1)
    # Rows per unit of work handed to a worker process.
    batch_size: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _check_sources(self):
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate source names {dup}")
        sets = [s.name for s in self.sources if "eval" in s.splits]
        sets += [s.eval_set_name() for s in self.sources if s.holdout_fraction > 0]
        dup = sorted({n for n in sets if sets.count(n) > 1})
        if dup:
            raise ValueError(f"two sources write the same evaluation set {dup}")
        return self
