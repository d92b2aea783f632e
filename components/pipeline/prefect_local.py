"""Prefect's temporary (ephemeral) API server, used when PREFECT_API_URL is unset: stop it cleanly once a
process is done with flows. Queued run logs and events are sent first; stopping the server under them leaves
their background workers retrying a dead address (or logging into closed streams) at interpreter exit."""
from __future__ import annotations

import os


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
