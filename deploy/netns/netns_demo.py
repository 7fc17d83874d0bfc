#!/usr/bin/env python3
"""Multi-host proof on one machine: each pdserve component on its own "host" (a Linux network
namespace with its own address), the hosts joined by veth pairs to a bridge that lives in a
namespace of its own, so nothing touches the root namespace's network.

    sudo .venv/bin/python deploy/netns/netns_demo.py [--topology auto|disaggregated|colocated]

Hosts (private 10.77.0.0/24, used only inside these namespaces): .1 router (and the clients),
.2 prefill, .3 decode, .4 KV store (master + node); colocated: .1 router, .2 worker. It runs
greedy generations and a short `pdserve bench` across the hosts, checks the tokens equal a
single-host offline run, and that bytes crossed the links: when disaggregated, one long prompt's KV
must appear in the decode host's veth byte counters (not moved by shared memory between namespaces). Everything it creates (processes, namespaces, veths, bridge) is removed on exit,
failure, Ctrl-C or SIGTERM. Exit 0: proven; 1: failed; 77: cannot run here (not root, no `ip`).
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # netns_lab, beside this file
from netns_lab import SUBNET, Lab, Skip, child_env, die_with_parent, remove_leftovers  # noqa: E402

EXIT_SKIP = 77
ROUTER_PORT, ROUTER_HTTP_PORT, WORKER_PORT, TRANSFER_PORT, METRICS_PORT = 50051, 8000, 50052, 50053, 9400
STORE_MASTER_PORT, STORE_NODE_PORT = 50060, 50070
PROMPTS = [
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog because",
    "Disaggregated serving splits prefill and decode so that " * 3,
]
MAX_TOKENS = 24
KV_PROBE_TOKENS = 1500  # one prompt whose KV (about 6 MiB for the tiny model) dwarfs the control traffic meanwhile


def _pdserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "pdserve", *args]


def reference_tokens(model_dir: str) -> list[list[int]]:
    """The same prompts on one host, in process, offline engine, greedy."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.engine.tokenizer import Tokenizer

    config = EngineConfig(model=model_dir, kv_cache_memory_mb=64)
    engine, tok = LLMEngine(config), Tokenizer(model_dir)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    return [engine.generate([tok.encode(p)], params)[0].token_ids for p in PROMPTS]  # one at a time, as served


def _disaggregated_available() -> bool:
    return importlib.util.find_spec("pdserve.transfer.ucx") is not None


def _store_available() -> bool:
    from pdserve.cli import SUBCOMMANDS

    return all(name in SUBCOMMANDS and importlib.util.find_spec(SUBCOMMANDS[name][0]) is not None
               for name in ("kvstore-master", "kvstore-node"))


def _takes_kvstore_master() -> bool:
    from dataclasses import fields

    from pdserve.router.config import RouterConfig
    from pdserve.worker_config import WorkerConfig

    return all("kvstore_master" in {f.name for f in fields(c)} for c in (RouterConfig, WorkerConfig))


def start_cluster(lab: Lab, topology: str, model_dir: str, with_store: bool) -> int:
    """Start every component on its host; returns the number of workers the router must see."""
    hosts = ["router", "prefill", "decode"] if topology == "disaggregated" else ["router", "worker"]
    if with_store:
        hosts.append("store")
    lab.build(hosts)
    router = lab.hosts["router"]
    router_args = ["--health-interval-s", "0.2"]
    if topology == "disaggregated":
        router_args += ["--local-prefill-threshold", "0"]  # every prompt's KV crosses a link
    if with_store:
        store = lab.hosts["store"]
        lab.spawn("kvstore-master", "store", _pdserve("kvstore-master", "--host", store.address,
                                                      "--port", str(STORE_MASTER_PORT)))
        lab.spawn("kvstore-node", "store", _pdserve("kvstore-node", "--host", store.address,
                                                    "--port", str(STORE_NODE_PORT), "--master",
                                                    f"{store.address}:{STORE_MASTER_PORT}", "--capacity-mb", "64"))
    store_args = []
    if with_store and _takes_kvstore_master():  # the router and the workers use the store across the links
        store_args = ["--kvstore-master", f"{lab.hosts['store'].address}:{STORE_MASTER_PORT}"]
    lab.spawn("router", "router", _pdserve("router", "--host", router.address, "--port", str(ROUTER_PORT),
                                           "--http-port", str(ROUTER_HTTP_PORT), "--model", model_dir, *router_args,
                                           *store_args))
    roles = {"prefill": "prefill", "decode": "decode"} if topology == "disaggregated" else {"worker": "worker"}
    for host_name, role in roles.items():
        h = lab.hosts[host_name]
        lab.spawn(host_name, host_name, _pdserve(
            role, "--host", h.address, "--advertise-host", h.address, "--port", str(WORKER_PORT),
            "--transfer-port", str(TRANSFER_PORT), "--metrics-port", str(METRICS_PORT),
            "--router", f"{router.address}:{ROUTER_PORT}", "--model", model_dir,
            "--kv-cache-memory-mb", "64", "--max-num-batched-tokens", "64", *store_args))
    return len(roles)


def run_in_router_host(lab: Lab, argv: list[str], timeout_s: float, name: str) -> subprocess.CompletedProcess:
    """Run a client command on the router's host, failing fast when a server process dies."""
    out_path, err_path = lab.log_dir / f"{name}.out", lab.log_dir / f"{name}.log"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        client = subprocess.Popen(["ip", "netns", "exec", lab.hosts["router"].ns, *argv], stdout=out, stderr=err,
                                  stdin=subprocess.DEVNULL, preexec_fn=die_with_parent, env=child_env())
        deadline = time.monotonic() + timeout_s
        try:
            while client.poll() is None:
                dead = [p for p in lab.procs if not p.alive()]
                if dead:
                    raise RuntimeError(f"{dead[0].name} exited with {dead[0].popen.returncode}:\n{dead[0].log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not finish in {timeout_s:.0f} s")
                time.sleep(0.2)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(5)
    return subprocess.CompletedProcess(argv, client.returncode, out_path.read_text(), err_path.read_text())


# --- the client half: runs inside the router's namespace -------------------------------------------------

async def _decode_kv_received(client) -> int:
    return sum(w.stats.kv_bytes_received for w in await client.workers() if w.role == 2)  # DECODE


async def _client_main(router: str, num_workers: int, timeout_s: float, generate: bool, kv_probe: bool) -> dict:
    import asyncio

    from pdserve.client import Client
    from pdserve.rpc import is_serving

    deadline = time.monotonic() + timeout_s
    async with Client(router) as client:
        while True:
            healthy = []
            if await is_serving(router):
                try:
                    healthy = [w for w in await client.workers() if w.healthy]
                except Exception:  # noqa: BLE001 - not up yet
                    healthy = []
            if len(healthy) >= num_workers:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"router {router} sees {len(healthy)}/{num_workers} healthy workers")
            await asyncio.sleep(0.2)
        completions = []
        if generate:
            for prompt in PROMPTS:
                c = await client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0.0, timeout_s=120)
                completions.append({"token_ids": list(c.token_ids), "text": c.text, "finish_reason": c.finish_reason,
                                    "prefill_worker": c.prefill_worker, "decode_worker": c.decode_worker})
        kv_probe_bytes = 0
        if kv_probe:  # KV bytes the decode worker took in for one long fresh prompt
            before = await _decode_kv_received(client)
            await client.complete(list(range(10, 10 + KV_PROBE_TOKENS)), max_tokens=1, temperature=0.0, timeout_s=120)
            last, settle_deadline = before, time.monotonic() + 20
            while time.monotonic() < settle_deadline:  # the router polls worker stats: wait until the count holds
                await asyncio.sleep(0.5)
                now = await _decode_kv_received(client)
                if now > before and now == last:
                    break
                last = now
            kv_probe_bytes = last - before
        workers = [{"worker_id": w.worker_id, "role": w.role, "address": w.address,
                    "transfer_address": w.transfer_address, "kv_bytes_sent": w.stats.kv_bytes_sent,
                    "kv_bytes_received": w.stats.kv_bytes_received,
                    "num_generation_tokens": w.stats.num_generation_tokens} for w in await client.workers()]
    return {"completions": completions, "workers": workers, "kv_probe_bytes": kv_probe_bytes}


def client_command(args: argparse.Namespace) -> int:
    import asyncio

    print(json.dumps(asyncio.run(_client_main(args.router, args.num_workers, args.timeout_s, args.generate,
                                              args.kv_probe))))
    return 0


# --- the demo ------------------------------------------------------------------------------------------

def find_problems(summary: dict, topology: str) -> list[str]:
    """What the run failed to prove (empty: proven)."""
    problems = []
    if not summary["tokens_match"]:
        problems.append("tokens differ from the single-host run")
    bench = summary["bench"]
    if bench.get("num_failed") or not bench.get("num_completed"):
        problems.append(f"bench: {bench}")
    for w in summary["workers"]:
        if not w["address"].startswith(SUBNET + "."):
            problems.append(f"{w['worker_id']} advertises {w['address']}, not its host address")
    for name, counts in summary["link_bytes"].items():
        if name != "store" and min(counts.values()) == 0:
            problems.append(f"nothing crossed the {name} link: {counts}")
    if topology == "disaggregated":
        sent = sum(w["kv_bytes_sent"] for w in summary["workers"] if w["role"] == 1)  # PREFILL
        carried = summary["link_bytes"]["prefill"]["from_host"]
        if sent <= 0:
            problems.append("no KV bytes sent by the prefill worker")
        elif carried < sent:
            problems.append(f"the prefill link carried {carried} bytes, less than the {sent} KV bytes sent: "
                            "the KV did not cross it")
        print(f"KV moved across hosts: {sent / 2**20:.2f} MiB sent by prefill, "
              f"{summary['kv_bytes_received'] / 2**20:.2f} MiB received")
        # One long prompt's KV must show up in the decode host's veth counters: were it moved through shared memory
        # (the hosts mistaken for one), the link would carry only the few KiB of control traffic meanwhile.
        probe = summary.get("kv_probe", {})
        if probe.get("kv_bytes", 0) < 2**20:
            problems.append(f"the KV probe moved too little to tell the path apart: {probe}")
        elif probe["decode_link_bytes_in"] < probe["kv_bytes"]:
            problems.append(f"the decode host's link carried {probe['decode_link_bytes_in']} bytes while "
                            f"{probe['kv_bytes']} KV bytes landed there: the KV payload did not cross the veth")
    return problems


def demo(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise Skip("needs root (ip netns add)")
    if shutil.which("ip") is None:
        raise Skip("needs iproute2 (`ip`)")
    topology = args.topology
    if topology == "auto":
        topology = "disaggregated" if _disaggregated_available() else "colocated"
    if topology == "disaggregated" and not _disaggregated_available():
        raise SystemExit("the disaggregated topology needs the KV transfer layer (pdserve.transfer.ucx)")
    with_store = topology == "disaggregated" and args.store and _store_available()
    removed = remove_leftovers()
    if removed:
        print(f"removed namespaces left by earlier runs: {', '.join(removed)}")

    from pdserve.engine.builtin_model import ensure_builtin_model

    model_dir = args.model or str(ensure_builtin_model("tiny"))
    store_wired = with_store and _takes_kvstore_master()
    print(f"topology {topology}{' + KV store' if with_store else ''}"
          f"{' (router and workers use it)' if store_wired else ''}; model {model_dir}")
    t0 = time.monotonic()
    expected = reference_tokens(model_dir)
    print(f"single-host offline reference: {len(expected)} prompts in {time.monotonic() - t0:.1f} s")

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pds-netns-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    lab = Lab(log_dir)
    atexit.register(lab.close)
    summary: dict = {"topology": topology, "store": with_store, "store_wired": store_wired, "log_dir": str(log_dir), "namespace_prefix": lab.tag}
    try:
        num_workers = start_cluster(lab, topology, model_dir, with_store)
        summary["hosts"] = {name: h.address for name, h in lab.hosts.items()}
        for proc in lab.procs:
            print(f"  {proc.name:<15} {proc.host.ns:<22} {proc.host.address}  pid {proc.popen.pid}")
        router = f"{lab.hosts['router'].address}:{ROUTER_PORT}"
        client_argv = [sys.executable, str(Path(__file__).resolve()), "client", "--router", router,
                       "--num-workers", str(num_workers), "--timeout-s", str(args.timeout_s)]
        t0 = time.monotonic()
        result = run_in_router_host(lab, [*client_argv, "--generate"], args.timeout_s + 150, "client-generate")
        if result.returncode != 0:
            raise RuntimeError(f"client failed:\n{result.stderr[-3000:]}")
        got = json.loads(result.stdout)
        print(f"cluster up and {len(PROMPTS)} generations done in {time.monotonic() - t0:.1f} s")
        tokens = [c["token_ids"] for c in got["completions"]]
        summary["tokens_match"] = tokens == expected
        summary["completions"] = got["completions"]
        for i, (g, e) in enumerate(zip(tokens, expected)):
            print(f"  prompt {i}: {len(g)} tokens via {got['completions'][i]['prefill_worker'] or '-'} -> "
                  f"{got['completions'][i]['decode_worker']}: {'same as single host' if g == e else 'DIFFERENT'}")

        bench_json = log_dir / "bench.json"
        bench = run_in_router_host(lab, _pdserve(
            "bench", "--backend", "pdserve-grpc", "--base-url", f"grpc://{router}", "--tokenizer", model_dir,
            "--num-prompts", str(args.bench_prompts), "--random-input-len", "48", "--random-output-len", "16",
            "--request-rate", "inf", "--max-concurrency", "4", "--max-duration-s", "120", "--no-progress",
            "--result-json", str(bench_json)), 240, "bench")
        if bench.returncode != 0:
            raise RuntimeError(f"bench failed:\n{bench.stderr[-3000:]}")
        bench_summary = json.loads(bench_json.read_text()).get("summary", {})
        summary["bench"] = {k: bench_summary.get(k) for k in ("num_sent", "num_completed", "num_failed",
                                                              "output_throughput") if k in bench_summary}
        print(bench.stdout.strip())

        stats = run_in_router_host(lab, client_argv, 60, "client-stats")
        workers = json.loads(stats.stdout)["workers"]
        summary["workers"] = workers
        summary["link_bytes"] = lab.link_bytes()
        summary["kv_bytes_sent"] = sum(w["kv_bytes_sent"] for w in workers)
        summary["kv_bytes_received"] = sum(w["kv_bytes_received"] for w in workers)
        if topology == "disaggregated":
            before = lab.link_bytes()["decode"]["to_host"]
            probe = run_in_router_host(lab, [*client_argv, "--kv-probe"], 150, "client-kv-probe")
            if probe.returncode != 0:
                raise RuntimeError(f"KV probe failed:\n{probe.stderr[-3000:]}")
            summary["kv_probe"] = {"kv_bytes": json.loads(probe.stdout)["kv_probe_bytes"],
                                   "decode_link_bytes_in": lab.link_bytes()["decode"]["to_host"] - before}
            print(f"KV probe ({KV_PROBE_TOKENS} tokens): {summary['kv_probe']['kv_bytes'] / 2**20:.2f} MiB landed on "
                  f"decode; its link took in {summary['kv_probe']['decode_link_bytes_in'] / 2**20:.2f} MiB meanwhile")
        problems = find_problems(summary, topology)
        for name, counts in summary["link_bytes"].items():
            print(f"  link {name:<8} {counts['from_host'] / 1024:9.1f} KiB out, {counts['to_host'] / 1024:9.1f} KiB in")
        summary["ok"] = not problems
        summary["problems"] = problems
    except (SystemExit, KeyboardInterrupt):
        print("interrupted: stopping the processes and removing the namespaces ...", file=sys.stderr)
        raise
    except Exception as exc:  # noqa: BLE001 - report with the log tails, then clean up
        summary["ok"] = False
        summary.setdefault("problems", []).append(f"{type(exc).__name__}: {exc}")
        for proc in lab.procs:
            print(f"--- {proc.name} ({proc.log_path}) ---\n{proc.log_tail()}", file=sys.stderr)
    finally:
        lab.close()
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    print(("PROVEN: " if summary["ok"] else "FAILED: ") + (
        f"{topology} pdserve across {len(summary.get('hosts', {}))} network namespaces"
        if summary["ok"] else "; ".join(summary["problems"])))
    print(f"logs: {log_dir}; namespaces, links and processes removed")
    return 0 if summary["ok"] else 1


def _on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through demo()'s finally and atexit: everything is removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    client = sub.add_parser("client", help="(internal) the client half, run inside the router's namespace")
    client.add_argument("--router", required=True)
    client.add_argument("--num-workers", type=int, required=True)
    client.add_argument("--timeout-s", type=float, default=180.0)
    client.add_argument("--generate", action="store_true")
    client.add_argument("--kv-probe", action="store_true", help="one long prompt; report the KV bytes decode took in")
    parser.add_argument("--topology", choices=["auto", "disaggregated", "colocated"], default="auto",
                        help="auto: disaggregated when the KV transfer layer exists (default)")
    parser.add_argument("--no-store", dest="store", action="store_false",
                        help="do not start the KV store host even when the store exists")
    parser.add_argument("--model", default="", help="model directory (default: the built-in tiny model)")
    parser.add_argument("--bench-prompts", type=int, default=12, help="requests in the short bench (default: 12)")
    parser.add_argument("--timeout-s", type=float, default=240.0, help="wait for the cluster this long (default: 240)")
    parser.add_argument("--log-dir", default="", help="process logs (default: a new temp dir, kept)")
    parser.add_argument("--summary-json", default="", help="write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    if args.mode == "client":
        return client_command(args)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    try:
        return demo(args)
    except Skip as exc:
        print(f"SKIP: {exc}")
        return EXIT_SKIP


if __name__ == "__main__":
    sys.exit(main())
