"""`pdserve up`'s cluster: per-role worker flags (heterogeneous pools) reach only their role's workers."""

from __future__ import annotations

from pdserve.cluster import Cluster
from pdserve.up import UpConfig, cluster_spec


def test_per_role_flags_reach_only_their_role(tmp_path):
    c = UpConfig(model=str(tmp_path), worker_args="--max-num-seqs 32", prefill_args="--num-threads 3 --dtype bfloat16",
                 decode_args="--kv-cache-memory-mb 2048", router_args="--planner slo", store_nodes=0)
    spec = cluster_spec(c, str(tmp_path), "info")
    assert spec.prefill_args == ["--num-threads", "3", "--dtype", "bfloat16"]
    assert spec.decode_args == ["--kv-cache-memory-mb", "2048"] and spec.router_args == ["--planner", "slo"]
    cluster = Cluster(spec)
    class Spawned:  # what the cluster would start, not started
        def __init__(self, name, argv, address):
            self.argv = argv

    cluster._spawn = Spawned
    prefill = cluster.start_worker("prefill", 0).argv
    decode = cluster.start_worker("decode", 0).argv
    assert "bfloat16" in prefill and "2048" not in prefill and prefill.count("--num-threads") == 1
    assert "2048" in decode and "bfloat16" not in decode and "32" in prefill and "32" in decode
