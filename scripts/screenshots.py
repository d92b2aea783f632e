"""Screenshots of the Prefect and MLflow UIs for docs/ui.md, taken with headless Chromium.

Run by scripts/screenshots.sh (which starts the stack and a tiny flow run first); on its own:

    python scripts/screenshots.py --prefect http://127.0.0.1:4200 --mlflow http://127.0.0.1:5000 \
        [--flow-run ID] [--out docs/images]

It finds through the Prefect and MLflow clients the latest m1-pipeline flow run (or --flow-run), a task run with
artifacts, the registered model version the run made and its logged model, then drives
`chromium-headless-shell` over the DevTools protocol (a pipe, no port): it opens each page, waits until the page
shows the text it must show (the UIs are single-page apps that render after their API calls), clicks a tab where
a URL cannot select it (Prefect's task run tabs), keeps MLflow's assistant panel closed, and saves the viewport
(or its top part) as PNG. A page that never shows its text, or a PNG of a few
colours (a blank or loading page), is an error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fcntl
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 1600, 1000
MAX_BYTES = 400_000


# --- what to show -------------------------------------------------------------------------------------------------

def prefect_targets(api_url: str, flow_run_id: str | None) -> dict:
    """The flow run, a task run with artifacts (a training stage) and a plots artifact to show."""
    os.environ["PREFECT_API_URL"] = api_url
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowRunFilter
    from prefect.client.schemas.sorting import FlowRunSort

    async def find():
        async with get_client() as client:
            if flow_run_id:
                run = await client.read_flow_run(flow_run_id)
                if run.state_type is None or run.state_type.value != "COMPLETED":
                    raise SystemExit(f"screenshots: flow run {flow_run_id} is {run.state_name}, not Completed")
            else:
                runs = await client.read_flow_runs(flow_filter=FlowFilter(name={"any_": ["m1-pipeline"]}),
                                                   flow_run_filter=FlowRunFilter(state={"type": {"any_": ["COMPLETED"]}}),
                                                   sort=FlowRunSort.START_TIME_DESC, limit=1)
                if not runs:
                    raise SystemExit("screenshots: no completed m1-pipeline flow run on " + api_url)
                run = runs[0]
            artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
            return run, artifacts, tasks

    run, artifacts, tasks = asyncio.run(find())
    by_key = {a.key: a for a in artifacts if a.key}
    task_names = {t.id: t.name for t in tasks}
    with_plots = [a for a in artifacts if a.task_run_id and (a.key or "").endswith("-plots")]
    if not with_plots:
        raise SystemExit(f"screenshots: flow run {run.id} has no task run with a -plots artifact")
    # the tab: a training stage's task run (its progress, markdown, metrics, MLflow link and plots artifacts);
    # the artifact page: evaluate's plots (time budget and speed), else the same stage's plots
    tab = next((by_key[k] for k in ("m1-distill-plots", "m1-sft1-plots", "m1-grpo-plots") if k in by_key),
               with_plots[0])
    page = by_key.get("m1-evaluate-plots", tab)
    task_id = tab.task_run_id
    keys = sorted(a.key for a in artifacts if a.task_run_id == task_id and a.key)
    return {"flow_run_id": str(run.id), "flow_run_name": run.name, "task_run_id": str(task_id),
            "task_run_name": task_names.get(task_id, "?"), "task_artifact_keys": keys,
            "plots_artifact_id": str(page.id), "plots_key": page.key}


def mlflow_targets(tracking_uri: str, flow_run_id: str) -> dict:
    """The experiment of the flow run's parent run, the registered model version its register stage made or reused
    (else the newest version of any m1-hybrid* model), and the logged model that version comes from."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)

    client = MlflowClient(tracking_uri)
    # the pipeline's parent run is tagged with the flow run id; its stage runs are its children
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    if not runs:
        raise SystemExit(f"screenshots: no MLflow run tagged with flow run {flow_run_id} on {tracking_uri}")
    experiment_id = runs[0].info.experiment_id
    parent_run_name = runs[0].info.run_name
    runs += client.search_runs([experiment_id], max_results=500,
                               filter_string=f"tags.`mlflow.parentRunId` = '{runs[0].info.run_id}'")
    run_ids = {r.info.run_id for r in runs}
    version = None
    for model in client.search_registered_models(filter_string="name LIKE 'm1-hybrid%'"):
        for v in client.search_model_versions(f"name = '{model.name}'"):
            # this run's version: logged by one of its runs, or an earlier version with the same weights that
            # its register stage reused (tagged m1.reused_by_run)
            mine = v.run_id in run_ids or any(str(x) in run_ids for x in (v.tags or {}).values())
            if version is None or (mine, int(v.version)) > version[0]:
                version = ((mine, int(v.version)), v)
    if version is None:
        raise SystemExit(f"screenshots: no m1-hybrid* registered model on {tracking_uri}")
    v = version[1]
    model_id = v.source.split("models:/", 1)[1].split("/")[0] if v.source.startswith("models:/m-") else None
    model_experiment = experiment_id
    if model_id:
        model_experiment = client.get_logged_model(model_id).experiment_id
    return {"experiment_id": experiment_id, "parent_run_name": parent_run_name, "model_name": v.name, "model_version": v.version,
            "logged_model_id": model_id, "logged_model_experiment_id": model_experiment}


# --- the browser --------------------------------------------------------------------------------------------------

def find_chromium() -> str:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        for candidate in (f"/usr/bin/{name}", shutil.which(name)):
            if candidate and os.access(candidate, os.X_OK):
                return candidate
    raise SystemExit("screenshots: no Chromium found; install it: apt-get install -y chromium-headless-shell")


class Browser:
    """Chromium over --remote-debugging-pipe: JSON messages separated by NUL on fds 3 (in) and 4 (out)."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="m1-shots-")
        self.log = Path(self.profile) / "chromium.log"
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # the child's fd 3 reads our commands and its fd 4 writes the answers: the pipe ends are moved above 9
        # first so that the dup2s cannot overwrite each other (posix_spawn: no Python code runs in the child)
        r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_child_r, from_child_w))
        os.close(to_child_r)
        os.close(from_child_w)
        argv = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--disable-sync", "--mute-audio",
                "--disable-dev-shm-usage", f"--window-size={WIDTH},{HEIGHT}", f"--user-data-dir={self.profile}",
                "--remote-debugging-pipe", "about:blank"]
        try:
            self.pid = os.posix_spawn(binary, argv, os.environ, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(self.log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
                (os.POSIX_SPAWN_OPEN, 2, str(self.log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
                (os.POSIX_SPAWN_DUP2, r, 3), (os.POSIX_SPAWN_DUP2, w, 4)])
        finally:
            os.close(r)
            os.close(w)
        self._buf = b""
        self._id = 0
        self.session = None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

    def _read(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                tail = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""
                raise SystemExit(f"screenshots: Chromium closed its DevTools pipe; its log ends:\n{tail}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        while True:
            answer = self._read()
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}...: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def goto(self, url: str):
        self.call("Page.navigate", url=url)

    def wait_for(self, condition: str, what: str, timeout: float = 60, settle: float = 2.0):
        """Poll a JS condition until it is true, then let the page settle (animations, canvas drawing)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.js(condition):
                    time.sleep(settle)
                    return
            except RuntimeError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"screenshots: {what} did not render within {timeout:.0f}s "
                         f"(page text: {str(self.js('document.body && document.body.innerText'))[:300]!r})")

    def wait_text(self, *texts: str, what: str, timeout: float = 60, settle: float = 2.0):
        cond = " && ".join(f"document.body.innerText.includes({json.dumps(t)})" for t in texts)
        self.wait_for(f"!!document.body && {cond}", what, timeout, settle)

    def click_text(self, text: str, selector: str = "button, a, [role=tab], li, div, span"):
        """Click the innermost visible element whose own text is exactly `text`."""
        ok = self.js(f"""(() => {{
            const els = [...document.querySelectorAll({json.dumps(selector)})]
                .filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)} && e.offsetParent !== null);
            if (!els.length) return false;
            els[els.length - 1].click();
            return true;
        }})()""")
        if not ok:
            raise SystemExit(f"screenshots: nothing to click labelled {text!r}")

    def screenshot(self, path: Path, clip_height: int | None = None):
        params = {"format": "png"}
        if clip_height:
            params["clip"] = {"x": 0, "y": 0, "width": WIDTH, "height": clip_height, "scale": 1}
        data = base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])
        save_png(data, path)

    def close(self):
        try:
            self.call("Browser.close")
        except (OSError, RuntimeError, SystemExit) as e:
            print(f"  (Browser.close: {e})", file=sys.stderr)
        deadline = time.time() + 10
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.time() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.2)
        for fd in (self._to_child, self._from_child):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


def save_png(data: bytes, path: Path):
    """Check the image is not blank (a page still loading is a few flat colours) and keep it under MAX_BYTES."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    distinct = len(colours) if colours is not None else 1 << 20
    if distinct < 64:
        raise SystemExit(f"screenshots: {path.name} has only {distinct} colours: the page did not render")
    out = io.BytesIO()
    image.save(out, "PNG", optimize=True)
    if out.tell() > MAX_BYTES:  # 256 colours is plenty for a UI and about a third of the size
        out = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, "PNG",
                                                                                                  optimize=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    print(f"  {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {image.width}x{image.height}, "
          f"{out.tell() // 1024} KB, {distinct} colours")


# --- the pages ----------------------------------------------------------------------------------------------------

def shoot(prefect_url: str, mlflow_url: str, p: dict, m: dict, out: Path, only: set[str] | None):
    browser = Browser(find_chromium())
    want = (lambda name: only is None or name in only)
    try:
        if want("prefect_flow_run"):
            browser.goto(f"{prefect_url}/runs/flow-run/{p['flow_run_id']}")
            browser.wait_text(p["flow_run_name"], "Task Runs", "register", what="Prefect flow run page")
            browser.wait_for("!!document.querySelector('canvas')", "the flow run graph", settle=4)
            browser.screenshot(out / "prefect_flow_run.png", clip_height=560)
        if want("prefect_task_artifacts"):
            browser.goto(f"{prefect_url}/runs/task-run/{p['task_run_id']}")
            browser.wait_text(p["task_run_name"], "Artifacts", "Task Run ID", what="Prefect task run page")
            browser.click_text("Artifacts")
            browser.wait_text(*p["task_artifact_keys"], what="the task run's artifacts tab")
            browser.screenshot(out / "prefect_task_artifacts.png", clip_height=620)
        if want("prefect_artifact"):
            browser.goto(f"{prefect_url}/artifacts/artifact/{p['plots_artifact_id']}")
            browser.wait_text(p["plots_key"], "Task Run", what="Prefect artifact page")
            browser.wait_for("[...document.images].length > 0 && [...document.images].every(i => i.complete)",
                             "the artifact's images")
            browser.screenshot(out / "prefect_artifact.png")
        # MLflow opens its assistant panel (a third of the window) on the first visit from localhost: mark that
        # visit done and the panel closed in the app's local storage before opening the pages.
        browser.goto(f"{mlflow_url}/")
        browser.wait_for("document.readyState === 'complete'", "MLflow home", settle=0.5)
        browser.js("""(() => { localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
                               localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false'); })()""")
        browser.goto("about:blank")
        time.sleep(0.5)
        if want("mlflow_model"):
            browser.goto(f"{mlflow_url}/#/models/{m['model_name']}/versions/{m['model_version']}")
            browser.wait_text(f"Version {m['model_version']}", "gate.decision", what="MLflow model version page")
            close_assistant(browser)
            browser.screenshot(out / "mlflow_model.png", clip_height=860)
        if want("mlflow_logged_model") and m["logged_model_id"]:
            browser.goto(f"{mlflow_url}/#/experiments/{m['logged_model_experiment_id']}/models/{m['logged_model_id']}"
                        "?workflowType=machine_learning")
            browser.wait_text("Model versions", m["model_name"], "Metrics", what="MLflow logged model page")
            close_assistant(browser)
            browser.screenshot(out / "mlflow_logged_model.png")
        if want("mlflow_experiment"):
            browser.goto(f"{mlflow_url}/#/experiments/{m['experiment_id']}/runs?workflowType=machine_learning")
            browser.wait_text(m["parent_run_name"], what="MLflow experiment's runs")
            browser.js("""(() => { const b = document.querySelector(
                'button[data-component-id$="runnamecellrenderer.tsx_46"]'); if (b) b.click(); })()""")
            browser.wait_text("distill", "register", what="the pipeline run's stage runs")
            close_assistant(browser)
            browser.screenshot(out / "mlflow_experiment.png", clip_height=690)
        if want("mlflow_logged_models"):
            browser.goto(f"{mlflow_url}/#/experiments/{m['experiment_id']}/models?workflowType=machine_learning")
            browser.wait_text("-final", m["model_name"], what="MLflow experiment's logged models")
            close_assistant(browser)
            browser.screenshot(out / "mlflow_logged_models.png", clip_height=560)
    finally:
        browser.close()


def close_assistant(browser: Browser):
    """Close MLflow's assistant panel if it is open anyway (its close button)."""
    if browser.js("""(() => { const b = document.querySelector(
                                  'button[data-component-id="mlflow.assistant.chat_panel.close"]');
                              if (b) b.click(); return !!b; })()"""):
        time.sleep(1.5)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefect", default=os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api"),
                    help="Prefect server (UI root or its /api URL)")
    ap.add_argument("--mlflow", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"))
    ap.add_argument("--flow-run", help="flow run id (default: the newest completed m1-pipeline run)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    ap.add_argument("--only", help="comma-separated image names (without .png)")
    args = ap.parse_args(argv)
    prefect_ui = args.prefect.rstrip("/").removesuffix("/api")
    mlflow_ui = args.mlflow.rstrip("/")
    p = prefect_targets(prefect_ui + "/api", args.flow_run)
    m = mlflow_targets(mlflow_ui, p["flow_run_id"])
    print(f"flow run {p['flow_run_name']} ({p['flow_run_id']}), task run {p['task_run_name']} "
          f"({p['task_run_id']}), model {m['model_name']} v{m['model_version']} ({m['logged_model_id']})")
    shoot(prefect_ui, mlflow_ui, p, m, args.out, set(args.only.split(",")) if args.only else None)


if __name__ == "__main__":
    sys.exit(main())
