"""Progress of a long stage in Prefect while it runs: a progress artifact `m1-<stage>-progress` on the stage's task
run, moved at checkpoint cadence.

A training stage (distill, sft1, sft2, grpo and the transformer arm's) writes a checkpoint every
`checkpoint_every` of its `max_steps` steps into <run_dir>/<stage>/checkpoints (in this process or from Ray Train
workers). A thread started inside the task run looks at that folder every `interval` seconds; each checkpoint
written since the stage started moves the artifact to step / max_steps (its description says the step), and a
stage that returns sets it to 100. Checkpoints already there when the stage started (an earlier run's, perhaps of
other settings) are not progress. Checkpoints kept only on S3 (`checkpoint_storage: s3://...`) are not polled:
the artifact then goes from 0 to 100. A stage that fails leaves the artifact where it was, its description saying
so. Other stages have no progress artifact."""
from __future__ import annotations

import contextvars
import os
import threading
from contextlib import contextmanager, suppress
from pathlib import Path

from components.pipeline.prefect_artifacts import artifact_key
from components.pipeline.stages import Stage

STOP_GRACE_S = 5.0  # how long a stopping stage waits for its progress bookkeeping


def training_section(config, stage: Stage):
    """The config section a training stage trains with (its first config key: transformer_sft1 trains with sft1),
    None for stages that do not checkpoint."""
    section = getattr(config, stage.config_keys[0], None) if stage.config_keys else None
    return section if hasattr(section, "checkpoint_every") and hasattr(section, "max_steps") else None


class CheckpointProgress:
    """Steps reached, as seen from the checkpoints a stage writes into its local checkpoint folder."""

    def __init__(self, root: str, total: int):
        self.root, self.total = root, total
        self.before = self._listing()
        self.step = 0

    def _listing(self) -> dict[str, tuple[int, int]]:
        from components.train.checkpoint import STATE_JSON, list_checkpoints

        found = {}
        for step, path in list_checkpoints(self.root):
            with suppress(OSError):  # pruned meanwhile
                found[path] = (step, os.stat(os.path.join(path, STATE_JSON)).st_mtime_ns)
        return found

    def poll(self) -> bool:
        """True when a new checkpoint moved the step on."""
        new = [step for path, (step, mtime) in self._listing().items() if self.before.get(path) != (step, mtime)]
        if new and max(new) > self.step:
            self.step = max(new)
            return True
        return False

    def percent(self) -> float:
        return round(100.0 * min(self.step, self.total) / self.total, 1)


@contextmanager
def stage_progress(config, stage: Stage, interval: float = 2.0):
    """Inside a stage's task run: its progress artifact while the block runs (nothing for stages that do not
    checkpoint). Yields the artifact id (None when there is none)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    section = training_section(config, stage)
    if section is None:
        yield None
        return
    root = section.checkpoint_storage or str((Path(config.run_dir) / stage.name / "checkpoints").resolve())
    total = section.max_steps
    every = section.checkpoint_every
    what = f"{stage.name}: {total} steps, " + (f"a checkpoint every {every}" if every else "no checkpoints")
    artifact = create_progress_artifact(0.0, key=artifact_key(stage.name, "progress"), description=f"{what}; started")
    tracker = None
    if "://" not in root:
        with suppress(Exception):  # an unreadable folder: no progress between 0 and 100, but the stage runs
            tracker = CheckpointProgress(root, total)
    done = threading.Event()

    def update(percent: float, note: str) -> None:
        with suppress(Exception):  # bookkeeping must never fail the stage
            update_progress_artifact(artifact, percent, description=f"{what}; {note}")

    def watch() -> None:
        while not done.wait(interval):
            with suppress(Exception):
                if tracker.poll():
                    update(tracker.percent(), f"checkpoint step {tracker.step}/{total}")

    # the thread runs in a copy of this context: Prefect's settings (API URL, PREFECT_HOME) and the task run's
    thread = None
    if tracker is not None:
        thread = threading.Thread(target=contextvars.copy_context().run, args=(watch,), daemon=True,
                                  name=f"m1-progress-{stage.name}")
        thread.start()
    finished = False
    try:
        yield artifact
        finished = True
    finally:
        done.set()
        # interrupted or failed: the run must end promptly whatever a request in flight is doing (Prefect's client
        # retries a busy server with backoff for about a minute), so this waits a few seconds at most
        if thread is not None:
            thread.join(None if finished else STOP_GRACE_S)
        if finished:
            update(100.0, f"finished: {total}/{total} steps")
        else:
            step = tracker.step if tracker else 0
            note = f"stopped at step {step}/{total} (newest checkpoint)"
            last = threading.Thread(target=contextvars.copy_context().run, daemon=True,
                                    args=(update, tracker.percent() if tracker else 0.0, note),
                                    name=f"m1-progress-end-{stage.name}")
            last.start()
            last.join(STOP_GRACE_S)
