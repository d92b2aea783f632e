"""infra/ and prefect.yaml parse and hold what their users rely on: KubeRay RayCluster/RayJob with head and GPU
worker groups, a `ray up` cluster config valid against Ray's own autoscaler schema, the local-stack script, and a
`local` deployment of the m1-pipeline flow on the process pool whose parameters the flow accepts."""
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
