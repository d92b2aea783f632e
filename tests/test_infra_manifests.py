"""infra/ and prefect.yaml parse and hold what their users rely on: KubeRay RayCluster/RayJob with head and GPU
worker groups, a `ray up` cluster config valid against Ray's own autoscaler schema, the local-stack script, and a
`local` deployment of the m1-pipeline flow on the process pool whose parameters the flow accepts; every stage of the
m1-3b profile fits the clusters these manifests describe, driver included."""
import inspect
import json
import subprocess
from pathlib import Path

import yaml

from components.config import ROOT

INFRA = ROOT / "infra"
TELEMETRY = ["MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "DVC_NO_ANALYTICS", "PREFECT_SERVER_ANALYTICS_ENABLED",
             "RAY_USAGE_STATS_ENABLED", "HF_HUB_DISABLE_TELEMETRY"]


def load(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text())


def check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_c = head["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head_c["ports"]} >= {6379, 8265, 10001}
    env = {e["name"]: e.get("value") for e in head_c["env"]}
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and set(TELEMETRY) <= set(env)
    workers = spec["workerGroupSpecs"]
    assert workers and all(w["minReplicas"] <= w["replicas"] <= w["maxReplicas"] for w in workers)
    gpu = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpu) >= 1
    assert "env" in workers[0]["template"]["spec"]["containers"][0]


def test_kuberay_raycluster():
    m = load("infra/kuberay/raycluster.yaml")
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayCluster" and m["metadata"]["name"]
    check_cluster_spec(m["spec"])


def test_kuberay_rayjob():
    m = load("infra/kuberay/rayjob.yaml")
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayJob"
    spec = m["spec"]
    assert spec["entrypoint"].startswith("m1 pipeline --profile m1-3b")
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])
    check_cluster_spec(spec["rayClusterSpec"])


def test_ray_up_config_matches_rays_schema():
    import jsonschema
    import ray.autoscaler

    cfg = load("infra/ray/cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert all("--disable-usage-stats" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
               if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])


def test_prefect_yaml_deploys_the_flow_on_the_process_pool():
    from flows.m1_pipeline import m1_pipeline

    p = load("prefect.yaml")
    deps = {d["name"]: d for d in p["deployments"]}
    local = deps["local"]
    path, func = local["entrypoint"].split(":")
    assert (ROOT / path).is_file() and func == "m1_pipeline"
    assert local["work_pool"]["name"] == "m1-process"
    assert m1_pipeline.name == "m1-pipeline"
    accepted = set(inspect.signature(m1_pipeline.fn).parameters)
    assert "profile" in local["parameters"] and set(local["parameters"]) <= accepted
    step = p["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert "directory" in step


def test_local_stack_script():
    script = INFRA / "local-stack.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for var in TELEMETRY:
        assert var in text
    assert "0.0.0.0" not in text and "HOST=127.0.0.1" in text
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "start [--s3] | stop | status" in usage.stderr


def test_infra_readme_warns_about_ray_ports():
    text = (INFRA / "README.md").read_text()
    assert "bind all interfaces" in text and "local-stack.sh start" in text


# ----------------------------------------------------------------------------- m1-3b fits the shipped clusters

def _gb(quantity: str) -> float:
    units = {"Gi": 2**30, "G": 1e9, "Ti": 2**40, "T": 1e12}
    for unit, size in units.items():
        if quantity.endswith(unit):
            return float(quantity[: -len(unit)]) * size / 1e9
    return float(quantity) / 1e9


def _kuberay_node(group: dict, name: str) -> dict:
    """What Ray offers on one pod of a group (rayStartParams, else the pod's limits) and the GPUs it holds."""
    params = group["rayStartParams"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return {"name": name, "cpus": float(params.get("num-cpus", limits.get("cpu", 0))),
            "gpus": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
            "device_gpus": int(limits.get("nvidia.com/gpu", 0)), "memory_gb": _gb(limits["memory"]),
            "count": group.get("maxReplicas", 1)}


def _kuberay_cluster(spec: dict) -> list[dict]:
    return [_kuberay_node(spec["headGroupSpec"], "head"), *(_kuberay_node(w, w["groupName"])
                                                          for w in spec["workerGroupSpecs"])]


def _ray_up_cluster(cfg: dict) -> list[dict]:
    nodes = []
    for name, t in cfg["available_node_types"].items():
        r = t["resources"]
        nodes.append({"name": name, "cpus": float(r.get("CPU", 0)), "gpus": float(r.get("GPU", 0)),
                      "device_gpus": int(r.get("GPU", 0)), "memory_gb": None,
                      "count": 1 if name == cfg["head_node_type"] else t.get("max_workers", 0)})
    return nodes


def _submitted_entrypoint_cpus(rel: str) -> float:
    """The --entrypoint-num-cpus of the `ray job submit` that a manifest's header tells its user to run."""
    import re

    m = re.search(r"ray job submit .*--entrypoint-num-cpus (\d+) -- m1 pipeline --profile m1-3b",
                  (ROOT / rel).read_text())
    assert m, f"{rel} does not show how to submit m1-3b"
    return float(m.group(1))


def fit_problems(config, nodes: list[dict], entry_cpus: float, entry_gpus: float = 0.0) -> list[str]:
    """Why some stage of `config` cannot run on the cluster `nodes` with the driver's entrypoint reserving
    entry_cpus/entry_gpus; [] when every stage fits. The driver runs on a node that holds its reservation;
    a stage's Ray workers and actors share that node with it (they read run_dir from its disk)."""
    from components.pipeline.resources import stage_resources
    from components.pipeline.stages import registered_stages

    where = [n for n in nodes if n["count"] >= 1 and n["cpus"] >= entry_cpus and n["gpus"] >= entry_gpus
             and (entry_cpus or entry_gpus or n["name"] == "head")]  # Ray puts an entrypoint reserving nothing on the head
    if not where:
        return [f"no node holds the driver's {entry_cpus:g} CPU, {entry_gpus:g} GPU"]
    problems = []
    for node in where:
        for s in registered_stages(config):  # the stages this config runs (its arms, its optional stages)
            r = stage_resources(config, s)
            d, ray = r["driver"], {k: sum(g["count"] * g[k] for g in r["ray"]) for k in ("cpus", "gpus")}
            if r["nodes"] != 1:
                problems.append(f"{s.name}: asks for {r['nodes']} nodes")
            if d["cpus"] > max(entry_cpus, 1):
                problems.append(f"{s.name}: driver needs {d['cpus']:g} CPU, its entrypoint reserves {entry_cpus:g}")
            if ray["cpus"] > node["cpus"] - entry_cpus or ray["gpus"] > node["gpus"] - entry_gpus:
                problems.append(f"{s.name}: Ray {ray['cpus']:g} CPU, {ray['gpus']:g} GPU beside the driver on "
                                f"{node['name']} ({node['cpus'] - entry_cpus:g} CPU, {node['gpus'] - entry_gpus:g} GPU left)")
            if d["gpus"] and d["gpus"] > node["device_gpus"] - ray["gpus"]:
                problems.append(f"{s.name}: driver needs {d['gpus']:g} GPU on {node['name']}, which has "
                                f"{node['device_gpus']} ({ray['gpus']:g} held by the stage's Ray work)")
            if node["memory_gb"] is not None and (d.get("memory_gb") or 0) > node["memory_gb"]:
                problems.append(f"{s.name}: driver needs {d['memory_gb']:g} GB on {node['name']}")
    return problems


def test_m1_3b_fits_the_shipped_clusters():
    from components.config import load_config

    cfg = load_config("m1-3b")
    job = load("infra/kuberay/rayjob.yaml")["spec"]
    job_nodes = _kuberay_cluster(job["rayClusterSpec"])
    assert [(n["name"], n["cpus"], n["gpus"], n["count"]) for n in job_nodes] == [("head", 0, 0, 1), ("h100", 64, 8, 1)]
    assert job["entrypointNumCpus"] == 32 and "entrypointNumGpus" not in job
    assert fit_problems(cfg, job_nodes, job["entrypointNumCpus"]) == []
    cluster = _kuberay_cluster(load("infra/kuberay/raycluster.yaml")["spec"])
    assert fit_problems(cfg, cluster, _submitted_entrypoint_cpus("infra/kuberay/raycluster.yaml")) == []
    ray_up = _ray_up_cluster(load("infra/ray/cluster.yaml"))
    assert fit_problems(cfg, ray_up, _submitted_entrypoint_cpus("infra/ray/cluster.yaml")) == []


def test_m1_3b_fit_check_names_what_the_old_shapes_lacked():
    from components.config import load_config

    job = load("infra/kuberay/rayjob.yaml")["spec"]
    nodes = _kuberay_cluster(job["rayClusterSpec"])
    # GRPO's former 8 learners + 8 rollout actors: 16 GPUs for a node of 8
    wide = load_config("m1-3b", overrides={"grpo": {"learner_workers": 8, "rollout_workers": 8}})
    assert fit_problems(wide, nodes, 32) == [
        "grpo: Ray 64 CPU, 16 GPU beside the driver on h100 (32 CPU, 8 GPU left)"]
    # the former entrypoint, reserving nothing: the driver on the CPU head, where curate's processes and
    # evaluate's GPU are not
    assert fit_problems(load_config("m1-3b"), nodes, 0) == [
        "curate: driver needs 32 CPU, its entrypoint reserves 0",
        "convert: driver needs 8 CPU, its entrypoint reserves 0",
        "distill: Ray 0 CPU, 8 GPU beside the driver on head (0 CPU, 0 GPU left)",
        "sft1: Ray 0 CPU, 8 GPU beside the driver on head (0 CPU, 0 GPU left)",
        "sft2: Ray 0 CPU, 8 GPU beside the driver on head (0 CPU, 0 GPU left)",
        "grpo: Ray 32 CPU, 8 GPU beside the driver on head (0 CPU, 0 GPU left)",
        "evaluate: driver needs 1 GPU on head, which has 0 (0 held by the stage's Ray work)"]
    # a GPU reserved for the driver would leave 7 for the 8-worker training stages
    assert fit_problems(load_config("m1-3b"), nodes, 32, 1) == [
        f"{s}: Ray 0 CPU, 8 GPU beside the driver on h100 (32 CPU, 7 GPU left)" for s in ("distill", "sft1", "sft2")
    ] + ["grpo: Ray 32 CPU, 8 GPU beside the driver on h100 (32 CPU, 7 GPU left)"]
