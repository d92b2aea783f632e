"""Prefect's temporary (ephemeral) API server, used when PREFECT_API_URL is unset.

start_ephemeral_server() starts it in its own process session. Prefect's own start leaves it in the caller's
process group, so the terminal's Ctrl-C (SIGINT to the whole foreground group) killed the server too: the
interrupted flow then retried reporting its Crashed state to a dead address for minutes and needed a second
Ctrl-C. In its own session the server outlives the interrupt long enough for the run to record how it ended; a
watchdog thread in the server process stops it once its parent is gone (even after kill -9, which no handler of
the parent sees), so it is never orphaned.

stop_ephemeral_server() stops it cleanly once a process is done with flows. Queued run logs and events are sent
first; stopping the server under them leaves their background workers retrying a dead address (or logging into
closed streams) at interpreter exit."""
from __future__ import annotations

import os
import subprocess
import types

# Runs in the server process before uvicorn: argv = [-c, PARENT_PID, -m, MODULE, ARGS...]. The server is in its
# own session, so only this check notices that the pipeline process died; SIGTERM lets uvicorn shut down cleanly.
_WATCHDOG = """
import os, runpy, signal, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    os._exit(1)
threading.Thread(target=watch, daemon=True).start()
assert sys.argv[2] == "-m", sys.argv
sys.argv = [sys.argv[3], *sys.argv[4:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()


def start_ephemeral_server() -> None:
    """Start the temporary server now, in its own session (see the module docstring); Prefect's clients then use
    this running instance. A no-op with PREFECT_API_URL set or once it runs."""
    if _api_url():
        return
    import prefect.server.api.server as server_module
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server = SubprocessASGIServer()
    if server.running:
        return

    def popen(args, **kwargs):  # Prefect's command and environment, started under the watchdog in a new session
        python, rest = args[0], list(args[1:])
        return subprocess.Popen([python, "-c", _WATCHDOG, str(os.getpid()), *rest], start_new_session=True, **kwargs)

    def run_uvicorn_command():
        real = server_module.subprocess
        server_module.subprocess = types.SimpleNamespace(Popen=popen)
        try:
            return type(server)._run_uvicorn_command(server)
        finally:
            server_module.subprocess = real

    server._run_uvicorn_command = run_uvicorn_command  # this instance only (also used when start() retries a port)
    # Prefect's default (20 s) is about what a fresh database's migrations take on a busy 2-core machine
    server.start(timeout=max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), 60))


def stop_ephemeral_server(timeout: float = 10) -> None:
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler, APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogHandler().flush()
    APILogWorker.drain_all(timeout=timeout)
    EventsWorker.drain_all(timeout=timeout)
    SubprocessASGIServer().stop()


def claim_flow_run(flow_run_id, profile: str, owner: str, alive) -> list[str]:
    """Label this flow run with its owner (host:pid:start) and profile, and mark this profile's earlier flow runs
    that are still Running but whose owner is gone (`alive(owner)` False: kill -9, a lost machine) as Crashed,
    with their running task runs; returns their ids. Only flow runs labelled by this function are touched: Prefect
    cannot tell that a run's process died when that process was the only one reporting on it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.context import get_run_context
    from prefect.states import Crashed

    running = [StateType.RUNNING]
    crashed = []
    with get_client(sync_client=True) as client:
        client.update_flow_run_labels(flow_run_id, {"m1.owner": owner, "m1.profile": profile})
        flows = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[get_run_context().flow.name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=running))))
        for run in flows:
            their = (run.labels or {}).get("m1.owner")
            if run.id == flow_run_id or not their or (run.labels or {}).get("m1.profile") != profile or alive(their):
                continue
            message = f"its process {their} was gone when {owner} started"
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=running))))
            for t in tasks:
                client.set_task_run_state(t.id, Crashed(message=message), force=True)
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            crashed.append(str(run.id))
    return crashed
