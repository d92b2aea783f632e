"""`m1 serve`: a registered version of the profile's model (default: the champion) over REST, through MLflow's
scoring server (POST /invocations, GET /ping). It runs

    mlflow models serve -m models:/<model name>@champion --env-manager local -h 127.0.0.1 -p 5001

with the two things that command otherwise takes from its shell: the profile's tracking store
(MLFLOW_TRACKING_URI when set, else tracking.uri; a relative sqlite path is made absolute) and this environment's
bin folder first on PATH, because MLflow starts the scoring server's `uvicorn` by name (without the virtual
environment on PATH the bare command exits 127)."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def register(sub) -> None:
    from components.cli import add_config_args
    from components.commands.pipeline import parse_assignment

    p = sub.add_parser("serve", help="serve a registered version (default: the champion) over REST "
                                     "(mlflow models serve, POST /invocations)")
    add_config_args(p)
    p.add_argument("--set", dest="overrides", type=parse_assignment, action="append", metavar="KEY=VALUE")
    p.add_argument("--alias", default=None, help="alias to serve (default: pipeline.promotion.champion_alias)")
    p.add_argument("--version", default=None, help="serve this version instead of an alias")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.set_defaults(func=_serve)


def serve_command(config, alias: str | None = None, version: str | None = None, host: str = "127.0.0.1",
                  port: int = 5001) -> tuple[list[str], dict[str, str]]:
    """The `mlflow models serve` command line for the profile's model and the environment to run it in."""
    from components.pipeline.promotion import model_name
    from components.tracking import tracking_uri

    name = model_name(config)
    ref = f"models:/{name}/{version}" if version else \
        f"models:/{name}@{alias or config.pipeline.promotion.champion_alias}"
    bindir = Path(sys.executable).parent
    mlflow = bindir / "mlflow"
    env = {**os.environ, "PATH": os.pathsep.join(p for p in (str(bindir), os.environ.get("PATH")) if p),
           "MLFLOW_TRACKING_URI": tracking_uri(config.tracking)}
    argv = [str(mlflow) if mlflow.exists() else "mlflow", "models", "serve", "-m", ref, "--env-manager", "local",
            "-h", host, "-p", str(port)]
    return argv, env


def _check_exists(uri: str, name: str, alias: str | None, version: str | None) -> None:
    """One line instead of MLflow's traceback when the alias or version is not there."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from components.errors import M1Error

    client = MlflowClient(uri, registry_uri=uri)
    try:
        client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except MlflowException:
        which = f"version {version}" if version else f"alias {alias!r}"
        raise M1Error(f"{name} has no {which} in the registry at {uri}: run the pipeline (its register stage) "
                      f"or m1 promote --model-dir DIR first") from None


def _serve(args) -> int:
    from components.commands.pipeline import _load

    config = _load(args)
    argv, env = serve_command(config, args.alias, args.version, args.host, args.port)
    uri = env["MLFLOW_TRACKING_URI"]
    print(f"MLFLOW_TRACKING_URI={shlex.quote(uri)} {shlex.join(argv)}", flush=True)
    if args.dry_run:
        return 0
    from components.pipeline.promotion import model_name

    _check_exists(uri, model_name(config), args.alias or config.pipeline.promotion.champion_alias, args.version)
    print(f"POST http://{args.host}:{args.port}/invocations  "
          """{"dataframe_split": {"columns": ["prompt"], "data": [["What is 7 * 6?"]]}, """
          """"params": {"max_new_tokens": 64}}""", flush=True)
    os.execve(argv[0], argv, env) if os.path.isabs(argv[0]) else os.execvpe(argv[0], argv, env)
    return 0  # not reached
