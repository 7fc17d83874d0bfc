"""The Grafana dashboard (pdserve/dashboards.py): its generated files are current, the JSON is one
Grafana can load (unique ids and refIds, panels on the grid, every query on the datasource variable),
and compose and k8s ship it. Its queries run against a real Prometheus in tests/integration/test_dashboards.py."""

from __future__ import annotations

import json

import yaml

from pdserve import dashboards


def test_generated_files_are_current():
    assert dashboards.main(["--check"]) == 0, "run `make dashboards`"


def test_dashboard_json_is_loadable():
    d = json.loads(dashboards.DASHBOARD_JSON.read_text())
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["description"] and p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        assert all(t["datasource"]["uid"] == "${datasource}" and t["expr"] for t in p["targets"])
    names = {v["name"] for v in d["templating"]["list"]}
    used = {name for name in dashboards.VARIABLES if any(f"${name}" in t["expr"] for p in d["panels"]
                                                         for t in p.get("targets", []))}
    assert used == set(dashboards.VARIABLES) and used | {"datasource"} == names


def test_slo_defaults_are_bucket_bounds():
    from pdserve.router.metrics import TPOT_BUCKETS_S, TTFT_BUCKETS_S

    for name, buckets in (("ttft_slo", TTFT_BUCKETS_S), ("tpot_slo", TPOT_BUCKETS_S)):
        options, default = dashboards.VARIABLES[name]
        assert default in options and all(float(o) in buckets for o in options), name


def test_compose_provisions_grafana_beside_prometheus():
    compose = yaml.safe_load((dashboards.REPO / "deploy" / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./grafana/dashboards"] == "/var/lib/grafana/dashboards"
    provisioning = dashboards.REPO / "deploy" / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((provisioning / "dashboards" / "pdserve.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"


def test_k8s_configmap_carries_the_dashboard():
    cm = yaml.safe_load(dashboards.K8S_CONFIGMAP.read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["pdserve.json"]) == json.loads(dashboards.DASHBOARD_JSON.read_text())
    kust = yaml.safe_load((dashboards.K8S_CONFIGMAP.parent / "kustomization.yaml").read_text())
    assert dashboards.K8S_CONFIGMAP.name in kust["resources"]
