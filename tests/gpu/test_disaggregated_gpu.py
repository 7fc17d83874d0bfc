"""The whole disaggregated path on one GPU: router, prefill and decode workers on `--device cuda`, a store node with
`--memory device` (cupy), every KV byte between GPU memories over UCX (which picks cuda_copy / cuda_ipc itself).

Greedy float32 tokens equal the CPU engine's; a prefix a fresh prefill worker finds in the device pool is loaded, not
recomputed; and a device-to-device push between two processes reports its GB/s (printed: `make gpu-check` shows it;
never asserted). Skips cleanly without CUDA, cupy or a CUDA-capable UCX. Not yet run on a real GPU (see README).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from integration_helpers import replace_prefill_worker  # noqa: E402
from pdserve import rpc
from pdserve.client import Client
from pdserve.cluster import Cluster, ClusterSpec
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto import kvstore_pb2 as kpb
from pdserve.proto import kvstore_pb2_grpc as kpb_grpc

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")]

NUM_NEW = 12
BLOCK = 16
MiB = 1 << 20


def _ucx_has_cuda() -> bool:
    from pdserve.transfer.ucx_env import available_transports

    return any(t.startswith("cuda") for t in available_transports())


@pytest.fixture(scope="module")
def gpu_cluster(tiny_model_dir):
    pytest.importorskip("cupy", reason="the store node's device pool needs cupy (pip install 'pdserve[gpu]')")
    if not _ucx_has_cuda():
        pytest.skip("this process's UCX has no CUDA transport (cuda_copy / cuda_ipc)")
    spec = ClusterSpec(model=str(tiny_model_dir), num_prefill=1, num_decode=1, num_store_nodes=1,
                       router_args=["--local-prefill-threshold", "0", "--health-interval-s", "0.2"],
                       worker_args=["--device", "cuda", "--kv-cache-memory-mb", "256", "--max-num-batched-tokens", "64"],
                       store_args=["--memory", "device", "--capacity-mb", "64"])
    cluster = Cluster(spec)
    cluster.start(timeout_s=300)
    try:
        yield cluster
    finally:
        cluster.stop()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(9)
    return [torch.randint(10, 2048, (n,), generator=g).tolist() for n in (9, 150, 300)]


async def _complete(address: str, prompt: list[int]):
    async with Client(address) as client:
        return await client.complete(prompt, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, timeout_s=120)


def test_gpu_disaggregated_tokens_equal_the_cpu_path(gpu_cluster, tiny_model_dir):
    got = [asyncio.run(_complete(gpu_cluster.router_address, p)) for p in _prompts()]
    cpu = LLMEngine(EngineConfig(model=str(tiny_model_dir), device="cpu")).generate(
        _prompts(), SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True))
    assert [g.token_ids for g in got] == [c.token_ids for c in cpu]
    assert all(g.prefill_worker.startswith("prefill@") and g.decode_worker.startswith("decode@") for g in got)


def test_prefix_in_the_device_pool_is_loaded_not_recomputed(gpu_cluster):
    prompt = _prompts()[2]
    first = asyncio.run(_complete(gpu_cluster.router_address, prompt))

    async def num_keys() -> int:  # publishing runs in the background after the first request
        async with rpc.channel(gpu_cluster.store_address) as ch:
            stats = await kpb_grpc.KVStoreMasterStub(ch).Stats(kpb.MasterStatsRequest(), timeout=5)
        return stats.num_keys

    deadline = time.monotonic() + 30
    while asyncio.run(num_keys()) < len(prompt) // BLOCK:
        assert time.monotonic() < deadline, "prompt blocks were not published to the device pool"
        time.sleep(0.2)
    replace_prefill_worker(gpu_cluster)  # empty local cache: the prefix must come from the device pool
    second = asyncio.run(_complete(gpu_cluster.router_address, prompt))
    assert second.token_ids == first.token_ids
    assert second.usage.cached_tokens == ((len(prompt) - 1) // BLOCK) * BLOCK


# A receiver process with a CUDA buffer; the test process pushes from its own CUDA buffer and times it.
RECEIVER = r"""
import asyncio, sys, torch
from pdserve.transfer.ucx import UCXTransport

async def main(nbytes, count, token_hex):
    t = UCXTransport(timeout_s=60)
    await t.start()
    dst = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    t.register_buffer("dst", dst)
    token = bytes.fromhex(token_hex)
    exps = [t.expect(token + bytes([i]), "dst", [(0, nbytes)], 120) for i in range(count)]
    print("ADDRESS", t.address, flush=True)
    for exp in exps:
        await exp.wait()
    torch.cuda.synchronize()
    print("SUM", int(dst[:4096].sum()), flush=True)
    await t.close()

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
"""


@pytest.mark.asyncio(loop_scope="session")
async def test_device_to_device_push_bandwidth_between_processes():
    if not _ucx_has_cuda():
        pytest.skip("this process's UCX has no CUDA transport (cuda_copy / cuda_ipc)")
    from pdserve.transfer.ucx import UCXTransport

    report = {}
    for nbytes in (4 * MiB, 64 * MiB, 256 * MiB):
        iters, token = 5, os.urandom(15)
        child = subprocess.Popen([sys.executable, "-c", RECEIVER, str(nbytes), str(iters + 1), token.hex()],
                                 stdout=subprocess.PIPE, text=True)
        try:
            line = ""
            while not line.startswith("ADDRESS"):
                line = child.stdout.readline()
                assert line, "the receiver exited before it listened"
            address = line.split()[1]
            sender = UCXTransport(timeout_s=60)
            await sender.start()
            src = torch.full((nbytes,), 3, dtype=torch.uint8, device="cuda")
            sender.register_buffer("src", src)
            torch.cuda.synchronize()
            await sender.push(address, token + bytes([0]), "src", [(0, nbytes)], [(0, nbytes)])  # warm-up
            started = time.perf_counter()
            for i in range(1, iters + 1):
                await sender.push(address, token + bytes([i]), "src", [(0, nbytes)], [(0, nbytes)])
            seconds = time.perf_counter() - started
            assert child.stdout.readline().split() == ["SUM", str(3 * 4096)]
            report[f"{nbytes // MiB} MiB"] = round(nbytes * iters / seconds / 1e9, 2)
            await sender.close()
        finally:
            child.kill()
            child.wait(10)
    print("device-to-device push GB/s (UCX, two processes, one GPU):", json.dumps(report))
