"""Where results, artifacts and checkpoints go: local folders by default, S3 (AWS, MinIO, a moto server)
when configured. One code path for every S3 endpoint: boto3 for the stage-output mirror, pyarrow for training
checkpoints (components/train/checkpoint.py, as Ray Train), s3fs (fsspec) for Prefect results, MLflow's own boto3
client for artifacts, dvc-s3 for the DVC remote; all read the endpoint from
`pipeline.s3.endpoint_url` or AWS_ENDPOINT_URL / MLFLOW_S3_ENDPOINT_URL and credentials from the usual AWS
environment/profile chain."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from components.errors import M1Error


@contextmanager
def s3_environment(config):
    """The configured endpoint and region exported for every library (pyarrow, boto3, s3fs, MLflow, DVC) while a
    pipeline run lasts; the process environment is as before afterwards, so a later run in the same process (a
    notebook, a test session, a worker serving several flow runs) never inherits this one's S3 settings."""
    s3 = config.pipeline.s3
    endpoint = s3.resolved_endpoint()
    wanted = {}
    if endpoint:
        wanted |= {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}
    if s3.region:
        wanted["AWS_DEFAULT_REGION"] = s3.region
    added = {k: v for k, v in wanted.items() if k not in os.environ}  # the user's own settings win
    os.environ.update(added)
    try:
        yield
    finally:
        for k, v in added.items():
            if os.environ.get(k) == v:
                del os.environ[k]


def check_reachable(config, uses: dict[str, str]) -> None:
    """Refuse to start when the S3 endpoint that `uses` ({setting: s3:// URI}) need does not accept connections:
    later, Prefect would only log a failed result write and finish "Completed", and boto3 would bury the cause
    under a page of retries. AWS itself (no endpoint set) is not contacted: a dry run stays offline."""
    import socket
    from urllib.parse import urlsplit

    endpoint = config.pipeline.s3.resolved_endpoint()
    if not uses or not endpoint:
        return
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise M1Error(f"S3 endpoint {endpoint!r} is not an http(s)://host[:port] URL")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        raise M1Error(f"S3 endpoint {endpoint} unreachable ({e.strerror or e}); needed by "
                      + ", ".join(f"{k} {v}" for k, v in uses.items())) from e


def split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise M1Error(f"not an s3:// URI: {uri}")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise M1Error(f"no bucket in {uri}")
    return bucket, prefix.strip("/")


def s3_client(config=None):
    import boto3

    endpoint = config.pipeline.s3.resolved_endpoint() if config is not None else (
        os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL"))
    region = (config.pipeline.s3.region if config is not None else None) or os.environ.get("AWS_DEFAULT_REGION")
    return boto3.client("s3", endpoint_url=endpoint, region_name=region or "us-east-1")


def upload_dir(local: str | Path, uri: str, client=None) -> int:
    """Copy every file under `local` to s3://bucket/prefix/<relpath>; returns the number of files."""
    bucket, prefix = split_s3(uri)
    client = client or s3_client()
    local = Path(local)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for f in files:
        rel = f.name if local.is_file() else f.relative_to(local).as_posix()
        client.upload_file(str(f), bucket, f"{prefix}/{rel}" if prefix else rel)
    return len(files)


def download_dir(uri: str, local: str | Path, client=None) -> int:
    """Copy every object under s3://bucket/prefix/ into `local` (written beside and renamed, so a reader never
    sees a half-downloaded file); returns the number of files."""
    bucket, prefix = split_s3(uri)
    client = client or s3_client()
    local = Path(local)
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) + 1:] if prefix else obj["Key"]
            dest = local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            client.download_file(bucket, obj["Key"], str(tmp))
            os.replace(tmp, dest)
            n += 1
    return n


def mirror_outputs(config, stage: str, paths: dict[str, Path]) -> list[str]:
    """Upload a finished stage's outputs to <pipeline.checkpoint_uri>/<run_dir name>/<stage>/<field>/."""
    base = config.pipeline.mirror_location()
    if not base:
        return []
    # imported only when there is a mirror: a node that keeps its outputs local may have no boto3
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
    )

    client = s3_client(config)
    run = Path(config.run_dir).resolve().name
    uris = []
    for name, p in paths.items():
        uri = f"{base.rstrip('/')}/{run}/{stage}/{name}"
        try:
            upload_dir(p, uri, client)
        except (EndpointConnectionError, ConnectTimeoutError) as e:
            endpoint = config.pipeline.s3.resolved_endpoint() or "of AWS"
            raise M1Error(f"S3 endpoint {endpoint} unreachable ({e}) while mirroring {stage} outputs to {uri}") from e
        except (BotoCoreError, ClientError, S3UploadFailedError) as e:
            raise M1Error(f"mirroring {stage} outputs to {uri} failed: {e}") from e
        uris.append(uri)
    return uris


def checkpoint_uri(config, stage: str) -> str | None:
    """Where a training stage mirrors its checkpoints (<checkpoint_uri>/<run_dir name>/<stage>/checkpoints)."""
    from components.train.checkpoint import mirror_of

    base = config.pipeline.mirror_location()
    return mirror_of(base, Path(config.run_dir).resolve() / stage / "checkpoints") if base else None


def result_storage(config):
    """Prefect result storage for the stage cache: a local folder (a Path), or for s3:// a RemoteFileSystem
    block saved under a name derived from its location (Prefect only accepts saved blocks; it holds the
    endpoint, never credentials, which come from the AWS environment)."""
    where = config.pipeline.storage_location()
    if where and where.startswith("s3://"):
        import hashlib

        from prefect.filesystems import RemoteFileSystem

        endpoint = config.pipeline.s3.resolved_endpoint()
        client_kwargs = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if config.pipeline.s3.region:
            client_kwargs["region_name"] = config.pipeline.s3.region
        block = RemoteFileSystem(basepath=where.rstrip("/"),
                                 settings={"client_kwargs": client_kwargs} if client_kwargs else {})
        name = "m1-results-" + hashlib.sha256(f"{where}|{endpoint}".encode()).hexdigest()[:12]
        block.save(name, overwrite=True)
        return block
    if where and where.startswith("file://"):
        where = where[len("file://"):]
    path = (Path(where) if where else Path(config.run_dir) / ".prefect-results").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
