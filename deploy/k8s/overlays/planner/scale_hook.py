"""The planner's orchestrator hook in Kubernetes: set the prefill and decode Deployments' replicas to what
the planner wants (PDSERVE_PLANNER_WANT_*; colocated workers run in the decode Deployment, since a worker's
role is set at run time) through the scale subresource, with the pod's service account."""

import json
import os
import ssl
import urllib.request

SA = "/var/run/secrets/kubernetes.io/serviceaccount"


def patch_scale(deployment: str, replicas: int) -> None:
    namespace = open(f"{SA}/namespace").read().strip()
    token = open(f"{SA}/token").read().strip()
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    url = f"https://{host}:{port}/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}/scale"
    body = json.dumps({"spec": {"replicas": replicas}}).encode()
    req = urllib.request.Request(url, data=body, method="PATCH", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"})
    with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=f"{SA}/ca.crt"), timeout=10) as r:
        print(deployment, "->", replicas, r.status)


if __name__ == "__main__":
    print("planner:", os.environ.get("PDSERVE_PLANNER_REASON", ""))
    patch_scale("pdserve-prefill", int(os.environ["PDSERVE_PLANNER_WANT_PREFILL"]))
    patch_scale("pdserve-decode", int(os.environ["PDSERVE_PLANNER_WANT_DECODE"])
                + int(os.environ["PDSERVE_PLANNER_WANT_COLOCATED"]))
