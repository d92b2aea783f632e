"""What each stage's Prefect task run carries, so that a task run opened in the Prefect UI tells its own story:

- `m1-<stage>`: markdown, its header saying whether the stage ran or was cached, the metrics, output hashes, cache
  key and the MLflow run;
- `m1-<stage>-metrics`: the metrics as a table artifact (sortable in the UI);
- `m1-<stage>-mlflow`: a link to its MLflow run;
- `m1-<stage>-plots`: markdown with the stage's figures embedded as PNG `data:` URIs (the Prefect UI renders
  markdown images with `<img src=...>`, which displays data URIs, and needs no file server: a `file://` image URL
  does not display in a browser page served over http). Figures: every `*_png` field of the stage's outputs
  (curate's token lengths, evaluate's time budget and speed), for training stages the loss curves drawn from
  <run_dir>/<stage>/history.jsonl (saved beside it as loss_curves.png) and the PNGs the stage wrote there (GRPO's
  curves and held-out outcomes). Each is downscaled to at most MAX_WIDTH pixels and a 256-colour palette, so an
  artifact stays in the tens of kilobytes.

The flow creates them after the task returns, with the task run's id, so a cached task run (whose body does not
run) gets them too; a cached task run is also renamed `<stage> (cached)`, which the flow graph and the task run
list show. Progress while a stage runs: components/pipeline/prefect_progress.py.

The flow graph's arrows are the task runs' `task_inputs`: `call_task` records exactly the upstream stages' task runs
(`wait_for`) and nothing from the parameters (see there why)."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path
from uuid import UUID

from prefect.futures import PrefectTaskRunFuture
from prefect.states import State
from prefect.utilities.annotations import quote

from components.pipeline.keys import StageResult
from components.pipeline.runner import fmt_value
from components.pipeline.stages import Stage

MAX_WIDTH = 800
CACHED_SUFFIX = " (cached)"


class FinishedTask(PrefectTaskRunFuture):
    """A task run that has already finished, as a future: in `wait_for` it records the edge upstream -> this task
    and waits for nothing. Not the State itself: Prefect looks through a State's data for the results of other
    tasks, which it recognises by object id, so a dict or str of a freed earlier result matched by a recycled id
    would add arrows from stages that are not upstream."""

    def __init__(self, state: State):
        super().__init__(state.state_details.task_run_id)
        self._final_state = state

    def wait(self, timeout: float | None = None) -> None:
        return None

    def result(self, timeout: float | None = None, raise_on_failure: bool = True):
        return self._final_state.result(raise_on_failure=raise_on_failure)

    def add_done_callback(self, fn) -> None:
        fn(self)


def call_task(task, args: tuple, upstream: list[State]) -> State:
    """Run `task(*args)` in this thread, after `upstream` (finished), and return its final state. The arguments are
    quoted: Prefect then records no task inputs from them (it would walk the config and inputs, matching objects by
    id against earlier results, the same false arrows as above) and passes them to the task unchanged."""
    return task(*(quote(a) for a in args), wait_for=[FinishedTask(s) for s in upstream], return_state=True)


def artifact_key(stage: str, suffix: str = "") -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return f"m1-{stage.replace('_', '-')}" + (f"-{suffix}" if suffix else "")


def png_data_uri(path: Path, max_width: int = MAX_WIDTH) -> str:
    """The PNG at `path`, downscaled to max_width and a 256-colour palette, as a data: URI."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > max_width:
            im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
        buf = io.BytesIO()
        im.quantize(colors=256).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def loss_curves(history: Path, png: Path, title: str) -> Path:
    """A training stage's curves from its history.jsonl (one object per step: loss, kl, ce, lr, grad_norm,
    tokens_per_s): one panel each for the loss terms, learning rate, gradient norm and throughput. Drawn again only
    when the history is newer than the PNG."""
    if png.is_file() and png.stat().st_mtime_ns >= history.stat().st_mtime_ns:
        return png
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from components.figures import save_figure

    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    by_step = {int(r["step"]): r for r in rows}  # a resumed run's repeated steps keep the last
    steps = sorted(by_step)
    panels = [("loss", ("loss", "kl", "ce")), ("learning rate", ("lr",)), ("gradient norm", ("grad_norm",)),
              ("tokens / s", ("tokens_per_s",))]
    panels = [(name, [k for k in keys if any(k in by_step[s] for s in steps)]) for name, keys in panels]
    panels = [(name, keys) for name, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.6), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for k in keys:
            xs = [s for s in steps if k in by_step[s]]
            ax.plot(xs, [by_step[s][k] for s in xs], marker="." if len(xs) < 30 else None, label=k)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    return save_figure(fig, png, title)


def stage_figures(stage: Stage, result: StageResult) -> list[tuple[str, Path]]:
    """(caption, PNG) of the figures a stage wrote: its outputs' *_png fields; for a training stage the loss curves
    from its history.jsonl and the PNGs in its folder."""
    out = result.outputs
    found: list[tuple[str, Path]] = []
    if dataclasses.is_dataclass(out):
        for f in dataclasses.fields(out):
            value = getattr(out, f.name)
            if f.name.endswith("_png") and value and Path(value).is_file():
                found.append((f.name.removesuffix("_png").replace("_", " "), Path(value)))
    if stage.model_output and hasattr(out, "checkpoint_root"):  # a training stage: <run_dir>/<stage>/model
        folder = Path(stage.model_dir(out)).parent
        history = folder / "history.jsonl"
        if history.is_file() and history.stat().st_size:
            loss_curves(history, folder / "loss_curves.png", f"{stage.name}: training curves")
        found += [(png.stem.replace("_", " "), png) for png in sorted(folder.glob("*.png"))]
    seen: set[Path] = set()
    return [(c, p) for c, p in found if not (p.resolve() in seen or seen.add(p.resolve()))]


def plots_markdown(stage: Stage, figures: list[tuple[str, Path]], logger=None,
                   max_width: int = MAX_WIDTH) -> tuple[str, list[str]]:
    """The figures as markdown images with data: URIs, and their captions; a figure that cannot be read is left
    out (with a warning) rather than failing a finished stage."""
    lines, captions = [f"### {stage.name}: plots", ""], []
    for caption, png in figures:
        try:
            uri = png_data_uri(png, max_width)
        except Exception as e:  # noqa: BLE001
            if logger:
                logger.warning(f"{stage.name}: figure {png} left out of the Prefect artifacts: {e}")
            continue
        lines += [f"**{caption}** (`{png.name}`)", "", f"![{caption}]({uri})", ""]
        captions.append(caption)
    return "\n".join(lines), captions


def publish_stage(stage: Stage, result: StageResult, cached: bool, link: str | None, markdown: str,
                  task_run_id: UUID | None, logger=None) -> dict[str, UUID]:
    """Create the stage's artifacts on its task run (see the module docstring); returns {kind: artifact id}."""
    from prefect.artifacts import LinkArtifact, MarkdownArtifact, TableArtifact

    def create(artifact) -> UUID:
        return artifact.create(_sync=True).id

    ids = {"markdown": create(MarkdownArtifact(
        key=artifact_key(stage.name), markdown=markdown, task_run_id=task_run_id,
        description=f"{stage.name}: {'cached' if cached else 'ran'}, metrics and outputs"))}
    if result.metrics:
        ids["table"] = create(TableArtifact(
            key=artifact_key(stage.name, "metrics"), task_run_id=task_run_id,
            table=[{"metric": k, "value": fmt_value(v)} for k, v in sorted(result.metrics.items())],
            description=f"{stage.name}: metrics"))
    if link:
        ids["link"] = create(LinkArtifact(key=artifact_key(stage.name, "mlflow"), link=link, task_run_id=task_run_id,
                                          link_text=f"MLflow run of {stage.name}"))
    try:
        figures = stage_figures(stage, result)
    except Exception as e:  # noqa: BLE001 - e.g. an unreadable history.jsonl
        figures = []
        if logger:
            logger.warning(f"{stage.name}: no plots in the Prefect artifacts: {e}")
    markdown, captions = plots_markdown(stage, figures, logger)
    if captions:
        ids["plots"] = create(MarkdownArtifact(key=artifact_key(stage.name, "plots"), markdown=markdown,
                                               task_run_id=task_run_id,
                                               description=f"{stage.name}: {', '.join(captions)}"))
    if cached and task_run_id is not None:
        mark_cached(task_run_id, stage.name)
    return ids


def mark_cached(task_run_id: UUID, name: str) -> None:
    """Rename a cached task run `<stage> (cached)`: the flow graph and the task run list then tell it apart."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.set_task_run_name(task_run_id, name + CACHED_SUFFIX)
