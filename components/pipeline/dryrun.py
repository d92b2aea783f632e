"""`m1 pipeline --dry-run`: the validated plan without running anything: each stage, the config it is keyed
on, its cache key and whether a cached result exists for it, and the resources it asks for: the driver's share and
the Ray workers and actors it starts (the m1-3b profile is sized this way on a machine that could never run it)."""
from __future__ import annotations

from components.pipeline.keys import StageResult, cache_key
from components.pipeline.resources import format_resources, stage_resources


def cached_result(config, key: str) -> StageResult | None:
    """The persisted result under `key` in the configured result storage, if any (read without a Prefect API)."""
    if (config.pipeline.storage_location() or "").startswith("s3://"):
        return None  # a dry run stays offline: remote caches are looked up when the pipeline runs
    try:
        from prefect.filesystems import LocalFileSystem
        from prefect.results import ResultStore

        from components.pipeline.storage import result_storage

        store = ResultStore(result_storage=LocalFileSystem(basepath=str(result_storage(config))))
        if not store.exists(key):
            return None
        value = store.read(key).result
        return value if isinstance(value, StageResult) else None
    except Exception:  # noqa: BLE001 - unreadable or foreign record: the dry run just cannot tell
        return None


def dry_run(config, stages) -> str:
    from components.tracking import tracking_uri

    p = config.pipeline
    lines = [f"profile {config.profile}: config valid; run_dir {config.run_dir}; teacher {config.teacher.source}",
             (f"results/cache: {p.storage_location() or config.run_dir + '/.prefect-results'}; "
              f"checkpoints mirrored to: {p.mirror_location() or '-'}; "
              f"MLflow: {tracking_uri(config.tracking) if config.tracking.enabled else 'disabled'}; "
              f"Ray: {p.ray_address or 'RAY_ADDRESS or a local cluster'}"),
             "", "stages:"]
    hashes: dict[str, str] = {}
    largest = {"nodes": 1, "cpus": 0.0, "gpus": 0.0, "memory_gb": 0.0}
    driver = {"cpus": 0.0, "gpus": 0.0, "memory_gb": 0.0}
    ray = {"cpus": 0.0, "gpus": 0.0}
    for s in stages:
        res = stage_resources(config, s)
        if all(u in hashes for u in s.upstream):
            key = cache_key(config, s, {u: hashes[u] for u in s.upstream})
            hit = cached_result(config, key)
            if hit is not None and hit.outputs_intact(s):
                hashes[s.name] = hit.output_hash
                state = f"cached ({hit.seconds:.0f} s)"
            else:
                state = "will run"
            key_text = key
        else:
            key_text, state = "(known once its upstream has run)", "will run"
        lines.append(f"  {s.name:<10} {state:<14} key {key_text}")
        lines.append(f"  {'':<10} keyed on {', '.join(s.config_keys)}"
                     + (f" + outputs of {', '.join(s.upstream)}" if s.upstream else "")
                     + f"; code {', '.join(s.code_paths())}")
        lines.append(f"  {'':<10} asks for {format_resources(res)}" + ("; uses Ray" if s.uses_ray else ""))
        for k, v in largest.items():
            largest[k] = max(v, float(res.get(k) or 0))
        for k, v in driver.items():
            driver[k] = max(v, float(res["driver"].get(k) or 0))
        for k, v in ray.items():
            ray[k] = max(v, sum(g["count"] * g[k] for g in res["ray"]))
    # A cluster runs the driver where its largest share fits (a Ray job's entrypoint reserves it for the whole
    # run), with each Ray stage's workers beside it: the two peaks below add up on that node.
    lines += ["", (f"largest request (stages run one after another): {largest['nodes']:g} node(s), "
                   f"{largest['cpus']:g} CPU, {largest['gpus']:g} GPU, {largest['memory_gb']:g} GB per node"),
              (f"driver at most {driver['cpus']:g} CPU, {driver['gpus']:g} GPU, {driver['memory_gb']:g} GB; "
               f"Ray workers and actors of one stage at most {ray['cpus']:g} CPU, {ray['gpus']:g} GPU")]
    return "\n".join(lines)
