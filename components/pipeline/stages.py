"""The ordered registry of pipeline stages. Flows, the CLI, the dry run, dvc.yaml generation, tests and the
summary all read it.

A stage is a plain function `run(config, inputs) -> <Outputs dataclass>` living in components/; the registry
says how to call it, which config sections and upstream outputs key its cache, and what its outputs are.
Only stages whose code exists are listed: a stage that has not landed is absent, never a placeholder.

Adding a stage is one `Stage(...)` entry in _DECLARED, in pipeline order (before `register`, which stays last):

    Stage("distill", "components.train.stage:run", kwargs={"stage": "distill"},
          config_keys=("distill", "teacher", "seed"), upstream=("curate", "convert"),
          inputs=lambda up, cfg: {"model_dir": up["convert"].model_dir, "data_dir": up["curate"].data_dir},
          standalone_inputs=lambda cfg: {"model_dir": f"{cfg.run_dir}/convert/model", "data_dir": f"{cfg.run_dir}/data"},
          outputs=("model_dir",), model_output="model_dir", uses_ray=True,
          dvc_outs=("distill/model",), dvc_plots=("distill/history.jsonl",), summary_metrics=("kl", "heldout/kl")),

- target: "module:function"; called as function(config, inputs, **kwargs).
- config_keys: dotted paths into M1Config whose values key the cache (with run_dir, the code version, the
  versions of the libraries that shape results and the content hashes of the upstream outputs).
- key_extra(config): anything else that decides the result and must key the cache (register: the registry it
  writes to and the model name).
- upstream: names of earlier stages whose outputs this one reads; `inputs(finished, config)` turns
  {name: outputs dataclass} (every stage finished so far) into the `inputs` dict (default: {name: outputs} of
  the declared upstream). standalone_inputs(config): the inputs when the stage runs alone (`m1 stage`, what
  dvc.yaml calls), from the upstream stages' default output locations (default: None).
- outputs: fields of the outputs dataclass holding files/directories whose content is hashed (default:
  every str/Path field that exists on disk). model_output: the field holding a model directory, for stages
  that produce a model (the last such model is what `register` registers).
- code version: the sources of the target's package and of every repo module the target imports, found by
  parsing the import statements transitively (code_paths()); `code` adds paths the stage reads without
  importing them (templates, data files elsewhere).
- validate(config): cheap checks run before any stage starts (bad input fails the run up front).
- resources(config): what the stage asks for (merged under `pipeline.resources.<name>`), for the dry run.
- datasets(outputs): {name: path} of datasets the stage produces; logged to MLflow with their DVC hashes
  (as inputs of the pipeline's parent run and of every stage downstream of this one).
- summary_metrics: the metrics the final summary table shows for the stage (or `summary(outputs)`, a line).
- dvc_outs: the stage's output paths relative to run_dir, for the generated dvc.yaml
  (`m1 pipeline --dvc-yaml`); dvc_metrics: a metrics file the stage writes itself, if any; dvc_plots:
  files (outside dvc_outs) that `dvc plots` draws.
A stage whose upstream is not (transitively) registered is left out, so `register` joins the pipeline by
itself once `evaluate` is registered.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.errors import M1Error
from components.hashing import imported_files

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Stage:
    name: str
    target: str
    config_keys: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    inputs: Callable[[dict[str, Any], Any], dict] | None = None
    standalone_inputs: Callable[[Any], dict] | None = None
    kwargs: dict = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    model_output: str | None = None
    code: tuple[str, ...] = ()
    key_extra: Callable[[Any], dict] | None = None
    validate: Callable[[Any], None] | None = None
    resources: Callable[[Any], dict] | None = None
    datasets: Callable[[Any], dict[str, Path]] | None = None
    uses_ray: bool = False
    summary_metrics: tuple[str, ...] = ()  # metrics shown in the final summary table (default: the first few)
    summary: Callable[[Any], str] | None = None  # or a one-line summary of the outputs instead of metrics
    # DVC: output paths relative to run_dir (what `m1 stage <name>` writes), and a metrics file the stage
    # writes itself (None: `m1 stage` writes <run_dir>/metrics/<name>.json from the outputs' metrics).
    dvc_outs: tuple[str, ...] = ()
    dvc_metrics: str | None = None
    dvc_plots: tuple[str, ...] = ()  # e.g. ("distill/history.jsonl",): loss curves for `dvc plots show`
    description: str = ""
    # The arm (config.arms) a stage belongs to: its stages run only when the config has the arm. None: every run.
    arm: str | None = None
    # An optional stage: runs only when enabled(config) (align: config.align.enabled).
    enabled: Callable[[Any], bool] | None = None
    # Upstream stages that depend on the config (evaluate reads the transformer arm's model when it runs, distill
    # align's model when align runs); stages not in the run are dropped from it.
    more_upstream: tuple[str, ...] = ()
    # The config section whose settings the stage runs with (transformer_sft1 trains with config.sft1); None: the
    # section named like the stage, if any.
    section: str | None = None

    def settings(self, config):
        """The typed config section this stage runs with (None for a stage without one)."""
        return getattr(config, self.section or self.name, None)

    def function(self) -> Callable:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def code_paths(self, root: Path = ROOT) -> list[str]:
        """The paths whose sources version this stage: the target's own package whole (resource files beside
        its modules count too), every other repo module the target imports (one file each, so that editing
        an unrelated module of a shared package does not invalidate a stage) and `code`."""
        module = self.target.partition(":")[0]
        paths = set(self.code)
        package = module.rpartition(".")[0]
        own = root.joinpath(*package.split(".")) if "." in package else None  # never all of components/
        if own is not None:
            paths.add(own.relative_to(root).as_posix())
        for f in imported_files(module, root):
            if own is None or own not in f.parents:
                paths.add(f.relative_to(root).as_posix())
        return sorted(paths)

    def build_inputs(self, finished: dict[str, Any], config) -> dict:
        if self.inputs is not None:
            return self.inputs(finished, config)
        return {name: finished[name] for name in self.upstream}

    def output_paths(self, outputs) -> dict[str, Path]:
        """{field: path} of the outputs whose content identifies this stage's result."""
        if self.outputs:
            names = list(self.outputs)
        else:
            names = [f.name for f in dataclasses.fields(outputs) if isinstance(getattr(outputs, f.name), (str, Path))]
        found = {}
        for name in names:
            value = getattr(outputs, name)
            if value is None:
                continue
            p = Path(value)
            if self.outputs and not p.exists():
                raise M1Error(f"stage {self.name}: output {name} = {p} does not exist after the stage finished")
            if p.exists():
                found[name] = p
        return found

    def model_dir(self, outputs) -> Path | None:
        return Path(getattr(outputs, self.model_output)) if self.model_output else None


# ----------------------------------------------------------------------------- stage-specific helpers

def _curate_datasets(out) -> dict[str, Path]:
    ds = {"sft1": out.sft1_dir, "sft1_heldout": out.sft1_heldout_dir, "sft2": out.sft2_dir, "rl": out.rl_dir}
    ds.update({f"eval/{name}": path for name, path in out.eval_sets.items()})
    return {k: Path(v) for k, v in ds.items() if Path(v).exists()}


def _curate_resources(config) -> dict:
    return {"cpus": config.data.num_proc}


def _convert_validate(config) -> None:
    # The layer indices are checked against the teacher's shape before anything runs; hub teachers this
    # machine cannot reach are checked against their known shape (the cluster recipe is validated offline).
    from components.pipeline.resources import teacher_llama_config

    n = teacher_llama_config(config.teacher.source).num_hidden_layers
    bad = [i for i in config.convert.attn_layers if not 0 <= i < n]
    if bad:
        raise M1Error(f"convert.attn_layers: indices {bad} out of range: the teacher has {n} layers (0..{n - 1})")


def _convert_resources(config) -> dict:
    from components.pipeline.resources import teacher_memory_gb

    gb = teacher_memory_gb(config)
    return {"cpus": 1, **({"memory_gb": gb} if gb else {})}


def _data_dir(up: dict[str, Any]) -> str:
    return str(up["curate"].data_dir)


def _train_resources(tc) -> dict:
    workers = max(1, tc.num_workers)
    return {"workers": workers, "cpus_per_worker": 1, **({"gpus_per_worker": 1} if tc.use_gpu == "yes" else {})}


def _grpo_resources(config) -> dict:
    g = config.grpo
    return {"learner_workers": max(1, g.learner_workers), "rollout_actors": g.rollout_workers,
            "rollout_resources": dict(g.rollout_resources)}


def _eval_models(config, hybrid_dir, transformer=None) -> dict:
    """The post-trained arms (hybrid; transformer when config.arms has it) and, from default_models, the teacher."""
    from components.evaluate.run import default_models

    specs = [f"hybrid={hybrid_dir}"]
    if "transformer" in config.arms and transformer is not None:
        specs.append(f"transformer={getattr(transformer, 'model_dir', transformer)}")
    return default_models(config, hybrid=specs)


def _register_inputs(finished: dict[str, Any], config=None) -> dict:
    """The final hybrid (the one evaluate evaluated, else the last model-producing stage's of the hybrid arm) and its
    metrics: another arm's model is never registered."""
    ev = finished["evaluate"]
    model_dir = getattr(ev, "model_dir", None)
    if model_dir is None:
        for stage in reversed([s for s in _DECLARED if s.name in finished and s.model_output and s.arm is None]):
            model_dir = stage.model_dir(finished[stage.name])
            break
    return {"model_dir": model_dir, "metrics": dict(getattr(ev, "metrics", None) or {})}


def _register_key(config) -> dict:
    """The registry the stage writes to and the model name: either changed is another registration, not a
    cached one."""
    import re

    from components.tracking import tracking_uri

    # credentials never enter a key: user:password@ and the query string (tokens) are left out
    uri = re.sub(r"^([A-Za-z][\w+.-]*://)[^/?#]*@", r"\1", tracking_uri(config.tracking))
    return {"registry": re.split(r"[?#]", uri, maxsplit=1)[0],
            "model_name": config.pipeline.promotion.registered_name(config.profile)}


def _register_summary(out) -> str:
    stays = f"champion stays v{out.champion_version}" if out.champion_version else "no champion"
    champ = "-> champion" if out.promoted else stays
    return f"v{out.version} candidate, {champ}: {out.decision}"


# ----------------------------------------------------------------------------- the registry

def _train_stage(name: str, prev: str, summary: tuple[str, ...], description: str, section: str | None = None,
                 arm: str | None = None, after: str | None = None, enabled=None) -> Stage:
    """align / distill / sft1 / sft2 (and the transformer arm's sft1 / sft2): the same trainer on the previous
    stage's model and the curated data, with the settings of config.<section> (default: the stage's own name).
    after: an optional stage that, when it runs, comes between `prev` and this one (distill after align)."""
    section = section or name

    def start(cfg) -> str:  # the stage whose model this one starts from
        return after if after is not None and getattr(cfg, after).enabled else prev

    return Stage(
        name, "components.train.stage:run", kwargs={"stage": name, **({"section": section} if section != name else {})},
        config_keys=(section, "teacher", "seed"), upstream=("curate", prev),
        more_upstream=(after,) if after else (),
        inputs=lambda up, cfg: {"model_dir": up[start(cfg)].model_dir, "data_dir": _data_dir(up)},
        standalone_inputs=lambda cfg: {"model_dir": f"{cfg.run_dir}/{start(cfg)}/model",
                                       "data_dir": f"{cfg.run_dir}/data"},
        outputs=("model_dir",), model_output="model_dir", uses_ray=True,
        dvc_outs=(f"{name}/model",), dvc_plots=(f"{name}/history.jsonl",), summary_metrics=summary,
        resources=lambda cfg: _train_resources(getattr(cfg, section)), description=description, arm=arm,
        enabled=enabled, section=section)


def _grpo_stage(name: str, prev: str, arm: str | None = None) -> Stage:
    return Stage(
        name, "components.grpo.stage:run", kwargs={"stage": name}, config_keys=("grpo", "teacher", "seed"),
        upstream=("curate", prev),
        inputs=lambda up, cfg: {"model_dir": up[prev].model_dir, "data_dir": _data_dir(up)},
        standalone_inputs=lambda cfg: {"model_dir": f"{cfg.run_dir}/{prev}/model", "data_dir": f"{cfg.run_dir}/data"},
        outputs=("model_dir",), model_output="model_dir", uses_ray=True, dvc_outs=(f"{name}/model",),
        dvc_plots=(f"{name}/metrics.jsonl",),  # reward, accuracy, entropy, lengths, mismatch per step
        summary_metrics=("heldout/accuracy_before", "heldout/accuracy", "heldout/accuracy_se"),
        resources=_grpo_resources, description="GRPO: math-verified rewards, entropy bonus, no KL", arm=arm,
        section="grpo")


_DECLARED: list[Stage] = [
    Stage("curate", "components.data.curate:run", config_keys=("data", "teacher.source", "seed"),
          outputs=("data_dir",), dvc_outs=("data",), dvc_metrics="metrics/curate.json", datasets=_curate_datasets,
          resources=_curate_resources, summary_metrics=("records.sft1", "records.sft2", "records.rl", "rejected"),
          description="sources -> checks -> dedup -> decontamination -> templating -> packing"),
    Stage("convert", "components.model.convert:run", config_keys=("convert", "teacher", "seed"),
          outputs=("model_dir",), model_output="model_dir", validate=_convert_validate, dvc_outs=("convert/model",),
          resources=_convert_resources, summary_metrics=("num_parameters",),
          description="Llama teacher -> hybrid Mamba/attention (weight init)"),
    _train_stage("align", "convert", ("loss", "heldout/kl_before", "heldout/kl"),
                 "layer-wise alignment: each Mamba mixer learns its attention's output (teacher-forced MSE)",
                 enabled=lambda cfg: cfg.align.enabled),
    _train_stage("distill", "convert", ("heldout/kl_before", "heldout/kl", "heldout/ppl", "heldout/teacher_ppl"),
                 "reverse-KL distillation from the teacher on assistant tokens", after="align"),
    _train_stage("sft1", "distill", ("ce", "heldout/ppl"), "SFT stage 1: math solutions (CE)"),
    _train_stage("sft2", "sft1", ("ce",), "SFT stage 2: long reasoning traces in <think> (CE)"),
    _grpo_stage("grpo", "sft2"),
    # The transformer arm: the teacher, every layer attention, through the hybrid's post-training settings.
    Stage("transformer_init", "components.model.convert:run_transformer", config_keys=("teacher", "seed"),
          outputs=("model_dir",), model_output="model_dir", dvc_outs=("transformer_init/model",),
          resources=_convert_resources, summary_metrics=("num_parameters",), arm="transformer",
          description="transformer arm: the teacher in the hybrid's model class, every layer attention"),
    _train_stage("transformer_sft1", "transformer_init", ("ce", "heldout/ppl"), "transformer arm: SFT stage 1",
                 section="sft1", arm="transformer"),
    _train_stage("transformer_sft2", "transformer_sft1", ("ce",), "transformer arm: SFT stage 2", section="sft2",
                 arm="transformer"),
    _grpo_stage("transformer_grpo", "transformer_sft2", arm="transformer"),
    Stage("evaluate", "components.evaluate.run:run",
          config_keys=("evaluate", "data.instruction", "data.system_prompt", "teacher", "seed"),
          upstream=("curate", "grpo"), more_upstream=("transformer_grpo",),
          inputs=lambda up, cfg: {"models": _eval_models(cfg, up["grpo"].model_dir, up.get("transformer_grpo")),
                                  "data_dir": _data_dir(up)},
          standalone_inputs=lambda cfg: {"models": _eval_models(cfg, f"{cfg.run_dir}/grpo/model",
                                                                 f"{cfg.run_dir}/transformer_grpo/model"),
                                         "data_dir": f"{cfg.run_dir}/data"},
          outputs=("eval_dir",), dvc_outs=("eval",),
          dvc_metrics="metrics/evaluate.json",
          dvc_plots=("plots/eval/time_budget.png", "plots/eval/speed.png", "plots/eval/time_budget.csv",
                     "plots/eval/speed.csv"),
          summary_metrics=("hybrid/all/pass_at_1", "transformer/all/pass_at_1", "teacher/all/pass_at_1"),
          description="pass@1 / pass@k / maj@k, accuracy under a time budget, generation speed"),
    # Registers the final model as <model name>@candidate and gates `champion`; joins the pipeline once an
    # `evaluate` stage is registered above it. Another tracking server is another registry: keyed on it.
    Stage("register", "components.pipeline.promotion:run", config_keys=("pipeline.promotion",),
          upstream=("evaluate",), inputs=_register_inputs, outputs=(), summary=_register_summary,
          key_extra=_register_key,
          description="MLflow registry: candidate alias, promotion gate to champion"),
]


def registered_stages(config=None) -> list[Stage]:
    """The stages of the pipeline, in order; those whose upstream is not registered are left out. With a config:
    only the stages of its arms and the optional stages it enables, each with the upstream of `more_upstream` that
    the run has."""
    active: list[Stage] = []
    names: set[str] = set()
    for s in _DECLARED:
        if config is not None:
            if (s.arm is not None and s.arm not in config.arms) or (s.enabled is not None and not s.enabled(config)):
                continue
        extra = tuple(u for u in s.more_upstream if u in names)
        if extra and config is not None:
            s = dataclasses.replace(s, upstream=s.upstream + extra)
        if all(u in names for u in s.upstream):
            active.append(s)
            names.add(s.name)
    return active


def stage_names(config=None) -> list[str]:
    return [s.name for s in registered_stages(config)]


def get_stage(name: str, config=None) -> Stage:
    for s in registered_stages(config):
        if s.name == name:
            return s
    known = stage_names(config)
    if config is not None and name in stage_names():
        stage = next(s for s in _DECLARED if s.name == name)
        if stage.arm is not None:
            raise M1Error(f"stage {name!r} belongs to an arm this run does not have (arms: {', '.join(config.arms)})")
        raise M1Error(f"stage {name!r} is off in this run's config ({name}.enabled: false)")
    raise M1Error(f"unknown stage {name!r}; registered stages: {', '.join(known)}")


def plan(targets: list[str] | None, config=None) -> list[Stage]:
    """The stages to run for `targets` (None = all): the targets and everything upstream of them, in order (with a
    config: among its arms' stages)."""
    stages = registered_stages(config)
    if not targets:
        return stages
    by_name = {s.name: s for s in stages}
    need: set[str] = set()

    def visit(name: str) -> None:
        if name in need:
            return
        if name not in by_name:
            get_stage(name, config)  # raises with the one-line reason
        need.add(name)
        for u in by_name[name].upstream:
            visit(u)

    for t in targets:
        visit(t)
    return [s for s in stages if s.name in need]
