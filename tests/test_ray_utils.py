"""ensure_ray: without RAY_ADDRESS it starts a fresh local instance on 127.0.0.1 (address="local"), so a cluster
file left in /tmp/ray by a stopped `ray start` head can never make the stage wait on a GCS that is gone."""
from __future__ import annotations

import ray

from components import ray_utils


def test_local_instance_is_fresh_and_on_loopback(monkeypatch):
    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or "ctx")
    assert ray_utils.ensure_ray(num_cpus=2) == "ctx"
    assert calls[0]["address"] == "local" and calls[0]["_node_ip_address"] == "127.0.0.1"
    assert calls[0]["num_cpus"] == 2 and calls[0]["include_dashboard"] is False


def test_ray_address_joins_that_cluster(monkeypatch):
    calls = []
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    ray_utils.ensure_ray()
    assert calls == [{"address": "10.0.0.5:6379", "namespace": "m1", "log_to_driver": True}]
