"""Each KVTransport backend between OS processes on loopback: the test process is one side, a `python -c` child the
other (UCX over shared memory, Mooncake's Transfer Engine over TCP)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys

import numpy as np
import pytest
import pytest_asyncio

from pdserve.errors import KVTransferError, PeerUnavailable
from pdserve.transfer.base import TransferRejected
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.factory import create_transport

# ucxx's context (and its notifier thread) is bound to the first event loop that uses it: one loop for the session.
pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(90)]

STARTUP_TIMEOUT_S = 30.0
MiB = 1 << 20

# The child: `receive` expects regions under a token and reports, `send` pushes regions, `expose` serves pulls.
# It talks on stdout, one line per event; `send` waits for one line on stdin before its first push. The test can kill
# it at any point.
CHILD = r"""
import asyncio, sys
import numpy as np
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.factory import create_transport

def pattern(nbytes, seed):
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)

async def main(backend, role, token_hex, spec, timeout_s, peer=None):
    token = bytes.fromhex(token_hex)
    regions = [tuple(int(x) for x in r.split(":")) for r in spec.split(",")]
    buf_bytes = max(o + n for o, n in regions)
    agent = create_transport(TransferConfig(kv_transport=backend), "127.0.0.1", 0, num_lanes=4, timeout_s=timeout_s)
    await agent.start()
    try:
        if role == "receive":
            dst = np.zeros(buf_bytes, dtype=np.uint8)
            agent.register_buffer("dst", dst)
            exp = agent.expect(token, "dst", regions, timeout_s)
            print("ADDRESS", agent.address, flush=True)
            try:
                await exp.wait()
            except Exception as exc:
                print("ERROR", type(exc).__name__, exc, flush=True)
                return
            src = pattern(exp.nbytes, 1)
            got = np.concatenate([dst[o:o + n] for o, n in regions])
            mask = np.ones(buf_bytes, dtype=bool)
            for o, n in regions:
                mask[o:o + n] = False
            print("RECEIVED", exp.nbytes, bool(np.array_equal(got, src)), bool(not dst[mask].any()), flush=True)
            await asyncio.sleep(timeout_s)  # stay up so a replay can be tried
        elif role == "expose":
            src = pattern(buf_bytes, 2)
            agent.register_buffer("src", src)
            agent.expose(token, "src", regions, timeout_s)
            print("ADDRESS", agent.address, flush=True)
            await asyncio.sleep(timeout_s)
        elif role == "send":  # pushes the regions one at a time (a layer each), slowly enough to be killed
            total = sum(n for _, n in regions)
            src = pattern(total, 1)
            agent.register_buffer("src", src)
            print("STARTED", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # GO: the receiver expects now
            offset = 0
            for o, n in regions:
                await agent.push(peer, token, "src", [(offset, n)], [(o, n)])
                offset += n
                print("PUSHED", offset, flush=True)
    finally:
        await agent.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), *sys.argv[6:]))
"""


class Child:
    """A `python -c CHILD` process; killed by pid in `stop()`."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(cls, *args: str) -> Child:
        env = dict(os.environ, UCX_WARN_UNUSED_ENV_VARS="n")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, *args, env=env,
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        return cls(proc)

    async def go(self) -> None:
        """Lets a `send` child start pushing."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"GO\n")
        await self.proc.stdin.drain()

    async def expect_line(self, prefix: str, timeout_s: float = STARTUP_TIMEOUT_S) -> list[str]:
        """Words of the next stdout line starting with `prefix`; fails with the output so far otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        assert self.proc.stdout is not None
        while True:
            try:
                raw = await asyncio.wait_for(self.proc.stdout.readline(), max(0.01, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise AssertionError(f"no {prefix!r} line in {timeout_s} s; output so far:\n" + "\n".join(self.lines))
            if not raw:
                raise AssertionError(f"child exited before {prefix!r}; output:\n" + "\n".join(self.lines))
            line = raw.decode().rstrip()
            self.lines.append(line)
            if line.startswith(prefix):
                return line.split()

    def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # already dead, not yet reaped
                pass

    async def stop(self) -> None:
        self.kill()
        await asyncio.wait_for(self.proc.wait(), 10)


def spec(regions: list[tuple[int, int]]) -> str:
    return ",".join(f"{o}:{n}" for o, n in regions)


def pattern(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


@pytest_asyncio.fixture(loop_scope="session", params=["ucx", "mooncake"])
async def agent(request):
    if request.param == "ucx":
        from pdserve.transfer.ucx import UCXTransport

        agent = UCXTransport(timeout_s=3.0, lane_min_bytes=8 * MiB, max_piece_bytes=8 * MiB)
    else:
        from pdserve.transfer.mooncake import MooncakeTransport, import_engine

        try:
            import_engine()
        except RuntimeError as exc:
            pytest.skip(str(exc))
        agent = MooncakeTransport(timeout_s=3.0, max_piece_bytes=8 * MiB)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.close()


async def test_multi_region_push_to_other_process(agent) -> None:
    token = secrets.token_bytes(16)
    dst_regions = [(i * 3 * MiB + 4096 * i, MiB + 17 * i) for i in range(12)]  # ~12 MiB in 12 uneven blocks
    total = sum(n for _, n in dst_regions)
    child = await Child.start(agent.name, "receive", token.hex(), spec(dst_regions), "10")
    try:
        address = (await child.expect_line("ADDRESS"))[1]
        src = pattern(total, 1)
        agent.register_buffer("src", src)
        wrong = secrets.token_bytes(16)
        with pytest.raises(TransferRejected):
            await agent.push(address, wrong, "src", [(0, total)], dst_regions)
        half = 6  # first half in one push, then one push per block (per-layer style)
        first = sum(n for _, n in dst_regions[:half])
        await agent.push(address, token, "src", [(0, first)], dst_regions[:half])
        offset = first
        for region in dst_regions[half:]:
            await agent.push(address, token, "src", [(offset, region[1])], [region])
            offset += region[1]
        assert await child.expect_line("RECEIVED") == ["RECEIVED", str(total), "True", "True"]
        with pytest.raises(TransferRejected):  # replay after completion
            await agent.push(address, token, "src", [(0, 4096)], [(dst_regions[0][0], 4096)])
    finally:
        agent.unregister_buffer("src")
        await child.stop()


async def test_pull_from_other_process(agent) -> None:
    token = secrets.token_bytes(16)
    child = await Child.start(agent.name, "expose", token.hex(), spec([(0, 32 * MiB)]), "20")
    try:
        address = (await child.expect_line("ADDRESS"))[1]
        dst = np.zeros(16 * MiB, dtype=np.uint8)
        agent.register_buffer("pulled", dst)
        got = await agent.pull(address, token, "pulled", [(0, 16 * MiB)], [(8 * MiB, 16 * MiB)])
        assert got == 16 * MiB and np.array_equal(dst, pattern(32 * MiB, 2)[8 * MiB:24 * MiB])
    finally:
        agent.unregister_buffer("pulled")
        await child.stop()


async def test_sender_killed_mid_transfer_fails_receiver_within_timeout(agent) -> None:
    token = secrets.token_bytes(16)
    layers = [(i * 8 * MiB, 8 * MiB) for i in range(64)]  # 512 MiB expected, the child dies early
    dst = np.zeros(64 * 8 * MiB, dtype=np.uint8)
    agent.register_buffer("big", dst)
    child = await Child.start(agent.name, "send", token.hex(), spec(layers), "3", agent.address)
    try:
        # The expectation's clock starts once the child is up (its start-up under load took longer than a deadline
        # that included it: the first push then found the token expired, and the test failed for the wrong reason).
        await child.expect_line("STARTED")
        exp = agent.expect(token, "big", layers, timeout_s=6.0)
        await child.go()
        await child.expect_line("PUSHED")
        child.kill()
        with pytest.raises(KVTransferError):
            await asyncio.wait_for(exp.wait(), 20)
        assert not exp.done  # it failed (KVTransferError), it did not complete and it did not hang
    finally:
        await agent.cancel(token)
        agent.unregister_buffer("big")
        await child.stop()


async def test_receiver_killed_mid_transfer_fails_sender_within_timeout(agent) -> None:
    token = secrets.token_bytes(16)
    layers = [(i * 8 * MiB, 8 * MiB) for i in range(32)]
    child = await Child.start(agent.name, "receive", token.hex(), spec(layers), "30")
    src = pattern(8 * MiB, 1)
    agent.register_buffer("layer", src)
    try:
        address = (await child.expect_line("ADDRESS"))[1]
        await agent.push(address, token, "layer", [(0, 8 * MiB)], [layers[0]], timeout_s=3.0)
        child.kill()
        with pytest.raises((KVTransferError, PeerUnavailable)):  # a lost connection, a timeout or no reconnect
            for layer in layers[1:]:
                await agent.push(address, token, "layer", [(0, 8 * MiB)], [layer], timeout_s=3.0)
    finally:
        agent.unregister_buffer("layer")
        await child.stop()
