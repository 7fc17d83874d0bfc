"""deploy/docker-compose.yml: valid for docker-compose, and every service runs a real pdserve
command with real flags, health-checked, started in dependency order, scraped by Prometheus."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pdserve import config_docs

sys.path.insert(0, str(Path(__file__).parent))  # deploy_checks
from deploy_checks import (  # noqa: E402
    DEPLOY_DIR, can_advertise, check_pdserve_command, flag_value, interpolate,
    kvstore_marks, read_env_file, registers_itself)
from pdserve.cli import SUBCOMMANDS  # noqa: E402

COMPOSE_FILE = DEPLOY_DIR / "docker-compose.yml"
GPU_COMPOSE_FILE = DEPLOY_DIR / "docker-compose.gpu.yml"
ENV_VARS = read_env_file(DEPLOY_DIR / ".env")


def _compose(path: Path = COMPOSE_FILE) -> dict:
    return interpolate(yaml.safe_load(path.read_text()), ENV_VARS)


SERVICES = _compose()["services"]
PDSERVE_SERVICES = [name for name, svc in SERVICES.items() if svc.get("image") == ENV_VARS["PDSERVE_IMAGE"]]
LONG_RUNNING = [name for name in PDSERVE_SERVICES if SERVICES[name].get("restart", "no") != "no"]


def _advertise_param(name: str):
    marks = kvstore_marks(name) if name.startswith("kvstore") else []
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("files", [[COMPOSE_FILE], [COMPOSE_FILE, GPU_COMPOSE_FILE]], ids=["cpu", "gpu"])
def test_docker_compose_config_validates(files):
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose (Debian's v1 Python tool) is not installed; .ci/run installs it with "
                    "`apt-get install -y docker-compose` when apt is available")
    argv = [tool, "--project-directory", str(DEPLOY_DIR)]
    for f in files:
        argv += ["-f", str(f)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    result = subprocess.run([*argv, "config", "--quiet"], cwd=DEPLOY_DIR, capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_expected_services():
    assert {"model-init", "etcd", "router", "lb", "prefill", "decode", "kvstore-master", "kvstore-node",
            "prometheus"} <= set(SERVICES)
    replicas = {name: int(SERVICES[name].get("deploy", {}).get("replicas", 1)) for name in SERVICES}
    assert replicas["prefill"] == 2 and replicas["decode"] == 2 and replicas["kvstore-node"] == 2
    assert replicas["router"] == 2 and replicas["kvstore-master"] == 2  # replicas; one master leads


@pytest.mark.parametrize("name", [pytest.param(n, marks=kvstore_marks(SERVICES[n]["command"][1]), id=n)
                                  for n in PDSERVE_SERVICES])
def test_service_runs_a_real_pdserve_command(name):
    svc = SERVICES[name]
    check_pdserve_command(svc["command"], set(svc.get("environment", {})), where=f"compose service {name}")


@pytest.mark.parametrize("name", [_advertise_param(n) for n in PDSERVE_SERVICES
                                  if registers_itself(SERVICES[n]["command"])])
def test_registering_service_advertises_its_container_address(name):
    # deploy/docker-entrypoint.sh exports PDSERVE_ADVERTISE_HOST (the container IP); the command must read it.
    assert can_advertise(SERVICES[name]["command"]), f"`{' '.join(SERVICES[name]['command'][:2])}` has no --advertise-host"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_service_health_check_probes_its_own_grpc_port(name):
    svc = SERVICES[name]
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD"
    check_pdserve_command(test[1:], where=f"compose service {name} healthcheck")
    assert test[1:3] == ["pdserve", "healthcheck"]
    port = flag_value(svc['command'], '--port')
    if name == "kvstore-master":  # a standby binds no port: healthy while the service's leader serves
        assert test[3] == f"kvstore-master:{port}"
    else:
        assert test[3] == f"127.0.0.1:{port}"


def test_dependencies_wait_for_health():
    for name, svc in SERVICES.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            want = "service_completed_successfully" if dep == "model-init" else "service_healthy"
            assert cond == {"condition": want}, f"{name} -> {dep}"
    for name in ("prefill", "decode"):
        assert "router" in SERVICES[name]["depends_on"]


def test_every_pdserve_process_registers_in_the_etcd_service():
    etcd = SERVICES["etcd"]
    assert flag_value(etcd["command"], "--advertise-client-urls") == "http://etcd:2379"
    assert etcd["healthcheck"]["test"][:2] == ["CMD", "etcdctl"]
    for name in LONG_RUNNING:
        svc = SERVICES[name]
        assert svc["environment"]["PDSERVE_ETCD"] == "http://etcd:2379", name
        assert svc["depends_on"]["etcd"] == {"condition": "service_healthy"}, name
    for name in ("prefill", "decode"):  # routers find workers in etcd, not by registration
        assert flag_value(SERVICES[name]["command"], "--router") is None


def test_lb_fronts_every_router_replica():
    lb = SERVICES["lb"]
    router_cmd = SERVICES["router"]["command"]
    conf = (DEPLOY_DIR / "nginx.conf").read_text()
    assert f"server router:{flag_value(router_cmd, '--port')} resolve;" in conf
    assert f"server router:{flag_value(router_cmd, '--http-port')} resolve;" in conf
    assert "grpc_pass" in conf and "./nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    assert "ports" not in SERVICES["router"]  # clients reach the replicas only through lb
    assert {p.split(":")[-1] for p in lb["ports"]} == {"50051", "8000"}


def test_model_init_writes_the_model_the_others_load():
    init_out = SERVICES["model-init"]["command"][-1]
    for name in LONG_RUNNING:
        subcommand = SERVICES[name]["command"][1]
        if subcommand not in SUBCOMMANDS or "PDSERVE_MODEL" not in config_docs.env_settable(subcommand).values():
            continue  # e.g. the KV store: it holds KV blocks, not the model
        assert SERVICES[name]["environment"]["PDSERVE_MODEL"] == init_out, name
        assert any(v.endswith(":/models") for v in SERVICES[name]["volumes"])


def test_prometheus_scrapes_every_component():
    prom = yaml.safe_load((DEPLOY_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    for name in LONG_RUNNING:
        assert name in jobs, f"prometheus.yml has no job for {name}"
        job = jobs[name]
        if "static_configs" in job:
            targets = [t for c in job["static_configs"] for t in c["targets"]]
        else:
            targets = [f"{n}:{c['port']}" for c in job["dns_sd_configs"] for n in c["names"]]
        cmd = SERVICES[name]["command"]
        port = flag_value(cmd, "--metrics-port") or flag_value(cmd, "--http-port")
        if port is not None:  # the KV store's metrics flag is not known yet
            assert targets == [f"{name}:{port}"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in SERVICES["prometheus"]["volumes"]
