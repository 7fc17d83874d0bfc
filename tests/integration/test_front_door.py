"""The router's front door: API key (gRPC metadata and HTTP header), per-request limits (prompt
length, max_tokens, request size), concurrent streams per client, TLS on gRPC, and listeners
bound to loopback by default.

The router runs in process (RouterApp) with the colocated cluster's worker as a static worker,
so each test can give it its own limits without starting processes.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aiohttp
import grpc
import pytest

from integration_helpers import wait_until
from pdserve.client import Client
from pdserve.router.config import RouterConfig
from pdserve.router.server import RouterApp

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make_self_signed_cert(out_dir: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A throwaway self-signed certificate (it is its own CA) and key for `host`, made with openssl."""
    cert, key = out_dir / "cert.pem", out_dir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", f"subjectAltName=IP:{host},DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


async def _router(colocated_cluster, **overrides) -> RouterApp:
    worker = next(p for p in colocated_cluster.procs if p.name.startswith("colocated-"))
    app = RouterApp(RouterConfig(model=colocated_cluster.spec.model, port=0, http_port=0, health_interval_s=0.2,
                                 colocated_workers=worker.address, **overrides))
    await app.start()

    async def worker_healthy():
        return bool(app.registry.healthy(3))
    try:
        await wait_until(worker_healthy, timeout_s=20, what="static worker healthy")
    except BaseException:
        await app.stop()
        raise
    return app


@pytest.mark.parametrize("component", ["router", "prefill", "decode", "worker", "kvstore-master", "kvstore-node",
                                       "up"])
def test_every_listener_binds_loopback_by_default(component, monkeypatch):
    from pdserve.cli import build_parser

    monkeypatch.delenv("PDSERVE_HOST", raising=False)
    args, _ = build_parser(only=component).parse_known_args([component])
    assert args.host == "127.0.0.1"


def test_library_defaults_bind_loopback():
    import inspect

    from pdserve.cluster import ClusterSpec
    from pdserve.transfer.ucx import UCXTransport
    from pdserve.worker_config import WorkerConfig

    assert RouterConfig().host == WorkerConfig().host == ClusterSpec().host == "127.0.0.1"
    assert inspect.signature(UCXTransport).parameters["host"].default == "127.0.0.1"


async def test_api_key_on_grpc_and_http(colocated_cluster):
    app = await _router(colocated_cluster, api_key=KEY)
    try:
        for client in (Client(app.address), Client(app.address, api_key="wrong")):
            async with client:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.complete([5, 6, 7], max_tokens=2, timeout_s=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and info.value.details()
                for call in (client.model_info, client.workers, lambda: client.abort("x")):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call()
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with Client(app.address, api_key=KEY) as client:
            r = await client.complete([5, 6, 7], max_tokens=2, temperature=0.0, ignore_eos=True, timeout_s=30)
            assert r.finish_reason == "length" and len(r.token_ids) == 2
            assert (await client.model_info()).name
        url = f"http://{app.http_address}"
        body = {"prompt": [5, 6, 7], "max_tokens": 2}
        async with aiohttp.ClientSession() as session:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
                    assert resp.status == 401
                    assert (await resp.json())["error"]["message"]
                    assert resp.headers["WWW-Authenticate"] == "Bearer"
            async with session.get(f"{url}/v1/models") as resp:
                assert resp.status == 401
            async with session.post(f"{url}/v1/completions", json=body, headers=AUTH) as resp:
                assert resp.status == 200
            for open_path in ("/health", "/metrics"):  # probes and scrapers need no key
                async with session.get(f"{url}{open_path}") as resp:
                    assert resp.status == 200
    finally:
        await app.stop()


async def test_prompt_and_max_tokens_limits(colocated_cluster):
    app = await _router(colocated_cluster, max_prompt_tokens=50, max_tokens_limit=20)
    try:
        async with Client(app.address) as client:
            for prompt, max_tokens, needle in (([5] * 51, 2, "at most 50"), ([5] * 10, 21, "at most 20")):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.complete(prompt, max_tokens=max_tokens, timeout_s=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.details()
            r = await client.complete([5] * 50, max_tokens=20, temperature=0.0, ignore_eos=True, timeout_s=30)
            assert len(r.token_ids) == 20
        url = f"http://{app.http_address}"
        async with aiohttp.ClientSession() as session:
            for body, param in (({"prompt": [5] * 51, "max_tokens": 2}, "prompt"),
                                ({"prompt": [5] * 10, "max_tokens": 21}, "max_tokens")):
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    assert resp.status == 400 and (await resp.json())["error"]["param"] == param
            # chat without max_tokens defaults to the limit, not to the rest of the context
            async with session.post(f"{url}/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}) as resp:
                assert resp.status == 200
                assert (await resp.json())["usage"]["completion_tokens"] == 20
    finally:
        await app.stop()


async def test_request_size_limits(colocated_cluster):
    app = await _router(colocated_cluster, max_request_bytes=4096)
    try:
        async with Client(app.address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.complete("x" * 10_000, max_tokens=2, timeout_s=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        url = f"http://{app.http_address}"
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/completions", json={"prompt": "x" * 10_000, "max_tokens": 2}) as resp:
                assert resp.status == 413 and (await resp.json())["error"]["message"]
            async with session.post(f"{url}/v1/completions", json={"prompt": "x" * 100, "max_tokens": 2}) as resp:
                assert resp.status == 200
    finally:
        await app.stop()


async def test_concurrent_streams_per_client(colocated_cluster):
    app = await _router(colocated_cluster, max_streams_per_client=2, api_key=KEY)
    try:
        async with Client(app.address, api_key=KEY) as client:
            streams = [client.generate([5, 6, 7], max_tokens=2000, temperature=0.0, ignore_eos=True, timeout_s=60)
                       for _ in range(2)]
            for s in streams:
                await anext(s)  # both in flight
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.complete([5, 6, 7], max_tokens=2, timeout_s=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per-client" in info.value.details()
            async with aiohttp.ClientSession() as session:  # the same key over HTTP is the same client
                async with session.post(f"http://{app.http_address}/v1/completions", headers=AUTH,
                                        json={"prompt": [5, 6, 7], "max_tokens": 2}) as resp:
                    assert resp.status == 429 and resp.headers["Retry-After"]
            for s in streams:
                await s.aclose()

            async def freed():
                return not app.http.limits.streams and not app.dispatcher.active
            await wait_until(freed, timeout_s=10, what="streams released")
            r = await client.complete([5, 6, 7], max_tokens=2, timeout_s=30)
            assert len(r.token_ids) == 2
    finally:
        await app.stop()


async def test_tls_on_grpc(colocated_cluster, tmp_path):
    cert, key = make_self_signed_cert(tmp_path)
    app = await _router(colocated_cluster, tls_cert_file=str(cert), tls_key_file=str(key))
    try:
        async with Client(app.address, tls_ca_file=str(cert)) as client:
            r = await client.complete([5, 6, 7], max_tokens=2, timeout_s=30)
            assert len(r.token_ids) == 2
        async with Client(app.address) as plain:  # a plaintext client cannot talk to a TLS listener
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await plain.model_info(timeout_s=3)
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        await app.stop()


async def test_router_dials_tls_workers_with_their_ca(tiny_model_dir, tmp_path):
    """A worker serving gRPC over TLS is reached by a router given --worker-tls-ca-file, and never
    by one without it (the worker stays unhealthy there, and requests get UNAVAILABLE, not a hang)."""
    import sys

    from pdserve.cluster import free_port, spawn_process

    cert, key = make_self_signed_cert(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    worker = spawn_process([sys.executable, "-m", "pdserve", "worker", "--host", "127.0.0.1",
                            "--port", address.rsplit(":", 1)[1], "--model", str(tiny_model_dir),
                            "--tls-cert-file", str(cert), "--tls-key-file", str(key)], tmp_path / "worker.log")
    with_ca = RouterApp(RouterConfig(model=str(tiny_model_dir), port=0, http_port=-1, health_interval_s=0.2,
                                     colocated_workers=address, worker_tls_ca_file=str(cert)))
    without_ca = RouterApp(RouterConfig(model=str(tiny_model_dir), port=0, http_port=-1, health_interval_s=0.2,
                                        colocated_workers=address, hop_timeout_s=2.0))
    await with_ca.start()
    await without_ca.start()
    try:
        async def healthy():
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            return bool(with_ca.registry.healthy(3))
        await wait_until(healthy, timeout_s=60, what="TLS worker healthy through the CA")
        async with Client(with_ca.address) as client:
            r = await client.complete([5, 6, 7], max_tokens=3, timeout_s=30)
            assert len(r.token_ids) == 3
        assert not without_ca.registry.healthy(3)
        async with Client(without_ca.address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.complete([5, 6, 7], max_tokens=3, timeout_s=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await with_ca.stop()
        await without_ca.stop()
        worker.terminate()
        worker.wait(10)


async def test_tls_config_needs_both_files():
    with pytest.raises(ValueError):
        RouterConfig(tls_cert_file="cert.pem")
    await asyncio.sleep(0)
