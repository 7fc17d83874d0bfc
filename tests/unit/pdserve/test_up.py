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


def test_workers_sharing_the_cores_get_elastic_threads(tmp_path, monkeypatch):
    """1 prefill + 1 decode on 2 cores: one thread each, elastic (either may take the other's idle core);
    an explicit --num-threads is the user's and gets no elastic flag; a lone colocated worker has all cores."""
    import pdserve.cluster as cluster_mod

    monkeypatch.setattr(cluster_mod, "available_cpus", lambda: 2)

    class Spawned:
        def __init__(self, name, argv, address):
            self.argv = argv

    def argv(role, **flags):
        c = UpConfig(model=str(tmp_path), store_nodes=0, **flags)
        cluster = Cluster(cluster_spec(c, str(tmp_path), "info"))
        cluster._spawn = Spawned
        return cluster.start_worker(role, 0).argv

    prefill = argv("prefill")
    assert prefill[prefill.index("--num-threads") + 1] == "1" and "--elastic-threads" in prefill
    assert "--elastic-threads" not in argv("prefill", prefill_args="--num-threads 1")
    colocated = argv("worker", colocated=True)
    assert colocated[colocated.index("--num-threads") + 1] == "2" and "--elastic-threads" not in colocated
