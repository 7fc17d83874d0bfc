"""deploy/k8s: every manifest (base, and the GPU overlay applied to it) validates against the
Kubernetes API schemas, every container runs a real pdserve command with real flags and variables,
probes use the gRPC health service, every pdserve process registers in the etcd Service."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # deploy_checks
from deploy_checks import (  # noqa: E402
    DEPLOY_DIR, check_pdserve_command, flag_value, kvstore_marks, registers_itself)

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]' (kubernetes-validate)")

K8S_DIR = DEPLOY_DIR / "k8s"
BASE_DIR = K8S_DIR / "base"
GPU_DIR = K8S_DIR / "overlays" / "gpu"
K8S_VERSION = "1.33.0"  # grpc probes are GA since 1.27
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def _key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _merge(base, patch):
    """A strategic merge patch, as far as these manifests need: maps merge, lists of named maps merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x
                                                                  for x in base + patch):
        by_name = {x["name"]: x for x in base}
        merged = [_merge(by_name[x["name"]], x) if x["name"] in by_name else x for x in patch]
        return merged + [x for x in base if x["name"] not in {p["name"] for p in patch}]
    return copy.deepcopy(patch)


def render(directory: Path) -> list[dict]:
    """kustomize build, for the features deploy/k8s uses: resources, patches, images."""
    kust = _kustomization(directory)
    docs: list[dict] = []
    for res in kust.get("resources", []):
        path = directory / res
        docs += render(path) if path.is_dir() else _load_docs(path)
    by_key = {_key(d): i for i, d in enumerate(docs)}
    for patch in kust.get("patches", []):
        for p in _load_docs(directory / patch["path"]):
            assert _key(p) in by_key, f"{directory}/{patch['path']} patches a missing {_key(p)}"
            docs[by_key[_key(p)]] = _merge(docs[by_key[_key(p)]], p)
    for image in kust.get("images", []):
        for d in docs:
            for c in _containers(d):
                name, _, _ = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return docs


def _containers(doc: dict, init: bool = True) -> list[dict]:
    if doc["kind"] not in WORKLOAD_KINDS:
        return []
    spec = doc["spec"]["template"]["spec"]
    return [*(spec.get("initContainers", []) if init else []), *spec["containers"]]


BASE = render(BASE_DIR)
GPU = render(GPU_DIR)
CONFIGMAPS = {d["metadata"]["name"]: d["data"] for d in BASE if d["kind"] == "ConfigMap"}
SERVICES = {d["metadata"]["name"]: d for d in BASE if d["kind"] == "Service"}
WORKLOADS = {d["metadata"]["name"]: d for d in BASE if d["kind"] in WORKLOAD_KINDS}
CONTAINERS = [(name, c) for name, d in WORKLOADS.items() for c in _containers(d) if c["image"].startswith("pdserve:")]
PDSERVE_WORKLOADS = [name for name, d in WORKLOADS.items()
                     if all(c["image"].startswith("pdserve:") for c in _containers(d, init=False))]


def _container_param(workload: str, container: dict):
    marks = kvstore_marks(container["args"][1])
    return pytest.param(workload, container, marks=marks, id=f"{workload}/{container['name']}")


def _env_names(container: dict) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        names |= set(CONFIGMAPS[source["configMapRef"]["name"]])
    return names


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_manifests_validate_against_the_api_schemas(variant):
    docs = {"base": BASE, "gpu": GPU}[variant]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_kustomization_file_exists():
    for directory in (BASE_DIR, GPU_DIR):
        kust = _kustomization(directory)
        for entry in [*kust.get("resources", []), *(p["path"] for p in kust.get("patches", []))]:
            assert (directory / entry).exists(), f"{directory}: {entry}"
    listed = set(_kustomization(BASE_DIR)["resources"])
    assert listed == {p.name for p in BASE_DIR.glob("*.yaml")} - {"kustomization.yaml"}


def test_expected_components():
    components = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                  for d in WORKLOADS.values()}
    assert components == {"etcd", "router", "prefill", "decode", "kvstore-master", "kvstore-node"}
    replicas = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["replicas"]
                for d in WORKLOADS.values()}
    assert replicas["router"] == 2 and replicas["kvstore-master"] == 2  # replicas; one master leads
    for name, d in WORKLOADS.items():
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        assert any(s["spec"]["selector"] == d["spec"]["selector"]["matchLabels"] for s in SERVICES.values()), name


@pytest.mark.parametrize("workload,container", [_container_param(n, c) for n, c in CONTAINERS])
def test_container_runs_a_real_pdserve_command(workload, container):
    assert "command" not in container, "keep the image's entrypoint (tini); put the command in args"
    check_pdserve_command(container["args"], _env_names(container), where=f"{workload}/{container['name']}")


@pytest.mark.parametrize("workload", PDSERVE_WORKLOADS)
def test_probes_use_the_grpc_health_service_on_the_serving_port(workload):
    for c in _containers(WORKLOADS[workload], init=False):
        env = {**{k: v for s in c.get("envFrom", []) for k, v in CONFIGMAPS[s["configMapRef"]["name"]].items()}}
        port = int(flag_value(c["args"], "--port") or env["PDSERVE_PORT"])
        # A standby store master binds no port: readiness (leader only) gates its Service; no liveness probe.
        probes = ("readinessProbe",) if workload == "pdserve-kvstore-master" else ("readinessProbe", "livenessProbe")
        for probe in probes:
            assert c[probe]["grpc"]["port"] == port, f"{workload} {probe}"
        assert port in {p["containerPort"] for p in c["ports"]}
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]


def test_every_registering_container_advertises_its_pod_ip():
    for name, c in CONTAINERS:
        if registers_itself(c["args"]) or "PDSERVE_ROUTER" in _env_names(c):
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["PDSERVE_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", name


def test_every_pdserve_container_registers_in_the_etcd_service():
    etcd_host, _, etcd_port = CONFIGMAPS["pdserve-common"]["PDSERVE_ETCD"].removeprefix("http://").partition(":")
    assert int(etcd_port) in {p["port"] for p in SERVICES[etcd_host]["spec"]["ports"]}
    (etcd,) = _containers(WORKLOADS["pdserve-etcd"])
    assert flag_value(etcd["command"], "--advertise-client-urls") == f"http://{etcd_host}:{etcd_port}"
    for name in PDSERVE_WORKLOADS:
        for c in _containers(WORKLOADS[name], init=False):
            assert {"configMapRef": {"name": "pdserve-common"}} in c["envFrom"], name


def test_workers_advertise_their_pod_ip_and_are_found_through_etcd():
    assert "PDSERVE_ROUTER" not in CONFIGMAPS["pdserve-worker"]  # routers watch etcd; no registration
    for name in ("pdserve-prefill", "pdserve-decode", "pdserve-kvstore-master"):
        (c,) = _containers(WORKLOADS[name], init=False)
        env = {e["name"]: e for e in c["env"]}
        assert env["PDSERVE_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    for name in ("pdserve-prefill", "pdserve-decode"):
        (c,) = _containers(WORKLOADS[name], init=False)
        assert {"configMapRef": {"name": "pdserve-worker"}} in c["envFrom"]


def test_gpu_overlay_asks_for_gpus_and_the_gpu_image():
    gpu = {_key(d): d for d in GPU}
    for name in ("pdserve-prefill", "pdserve-decode"):
        (c,) = _containers(gpu["Deployment", name], init=False)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert c["image"] == "pdserve:gpu"
        assert c["args"] == _containers(WORKLOADS[name], init=False)[0]["args"]  # the patch keeps the command
    worker_config = gpu["ConfigMap", "pdserve-worker"]["data"]
    assert worker_config["PDSERVE_DEVICE"] == "cuda"
    assert worker_config["PDSERVE_KVSTORE_MASTER"] == CONFIGMAPS["pdserve-worker"]["PDSERVE_KVSTORE_MASTER"]  # merged
    check_pdserve_command(["pdserve", "decode"], set(worker_config), where="gpu ConfigMap pdserve-worker")


PLANNER_DIR = K8S_DIR / "overlays" / "planner"


def test_planner_overlay_runs_one_planning_router_that_may_scale_the_worker_deployments():
    docs = render(PLANNER_DIR)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kust = _kustomization(PLANNER_DIR)
    for entry in [*kust["resources"], *(p["path"] for p in kust["patches"]),
                  *(f for g in kust["configMapGenerator"] for f in g["files"])]:
        assert (PLANNER_DIR / entry).exists(), entry
    router = next(d for d in docs if _key(d) == ("Deployment", "pdserve-router"))
    assert router["spec"]["replicas"] == 1 and router["spec"]["template"]["spec"]["serviceAccountName"] == "pdserve-planner"
    container = router["spec"]["template"]["spec"]["containers"][0]
    check_pdserve_command(container["args"], _env_names(container), where="planner router")
    assert flag_value(container["args"], "--planner") == "slo"
    hook = flag_value(container["args"], "--planner-scale-hook").split()[-1]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "planner-hook")
    assert hook.startswith(mount["mountPath"]) and (PLANNER_DIR / Path(hook).name).exists()
    role = next(d for d in docs if d["kind"] == "Role")
    assert set(role["rules"][0]["resourceNames"]) == {"pdserve-prefill", "pdserve-decode"}
    assert {"pdserve-prefill", "pdserve-decode"} <= {d["metadata"]["name"] for d in BASE if d["kind"] == "Deployment"}
