"""router/decode_stream.py over real gRPC against a scripted DecodeWorker (the real worker side runs in the
integration tests): outputs of several requests that share DecodeBatch messages reach their own requests in
order; a request's error status, cancel() and deadline behave as a Decode call's; a broken stream fails every
request on it at once, and the next request opens a new stream."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.router.decode_stream import DecodeStreams


class ScriptedWorker(pb_grpc.DecodeWorkerServicer):
    """Answers each start by its request id: "ok*" three tokens (every request's outputs of one round in one
    batch), "bad" an error status, anything else nothing. `break_streams` aborts every open stream."""

    def __init__(self) -> None:
        self.cancels: list[str] = []
        self.starts: list[str] = []
        self.timeouts: dict[str, float] = {}
        self.streams_opened = 0
        self.broken = asyncio.Event()

    async def DecodeStream(self, request_iterator, context):
        self.streams_opened += 1
        broken = self.broken

        async def read() -> None:
            async for req in request_iterator:
                if req.WhichOneof("op") == "start":
                    rid = req.start.request_id
                    self.starts.append(rid)
                    self.timeouts[rid] = req.timeout_s
                    if rid.startswith("ok"):
                        running.append(rid)
                    elif rid == "bad":
                        await context.write(pb.DecodeBatch(outputs=[pb.DecodeOutput(
                            request_id=rid, error_code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                            error_message="no blocks")]))
                else:
                    self.cancels.append(req.cancel)

        running: list[str] = []
        reader = asyncio.create_task(read())
        try:
            while not broken.is_set():
                await asyncio.sleep(0.05)
                if len(running) >= 2:  # two requests' outputs share each batch
                    for step in range(3):
                        await context.write(pb.DecodeBatch(outputs=[
                            pb.DecodeOutput(request_id=rid, response=pb.DecodeResponse(
                                token_ids=[10 * i + step], finish_reason="length" if step == 2 else ""))
                            for i, rid in enumerate(running)]))
                    running.clear()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker went away")
        finally:
            reader.cancel()


@pytest.fixture
async def worker():
    servicer = ScriptedWorker()
    server = grpc.aio.server()
    pb_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    w = SimpleNamespace(address=f"127.0.0.1:{port}", worker_id="w0", decode_stub=pb_grpc.DecodeWorkerStub(channel))
    streams = DecodeStreams()
    yield servicer, w, streams
    await streams.close()
    await channel.close()
    await server.stop(0)


async def read_all(call) -> list[pb.DecodeResponse]:
    out = []
    while True:
        msg = await call.read()
        out.append(msg)
        if msg.finish_reason:
            return out


async def test_requests_sharing_batches_each_get_their_own_outputs(worker):
    servicer, w, streams = worker
    a = streams.start(w, pb.DecodeRequest(request_id="ok-a"), timeout_s=10)
    b = streams.start(w, pb.DecodeRequest(request_id="ok-b"), timeout_s=10)
    got_a, got_b = await asyncio.wait_for(asyncio.gather(read_all(a), read_all(b)), 10)
    assert [list(m.token_ids) for m in got_a] == [[0], [1], [2]]
    assert [list(m.token_ids) for m in got_b] == [[10], [11], [12]]
    assert got_a[-1].finish_reason == "length" and servicer.streams_opened == 1
    assert 9 < servicer.timeouts["ok-a"] <= 10  # the deadline travels with the request


async def test_a_requests_error_status_is_its_alone(worker):
    servicer, w, streams = worker
    bad = streams.start(w, pb.DecodeRequest(request_id="bad"), timeout_s=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(bad.read(), 10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "no blocks" in err.value.details()
    a = streams.start(w, pb.DecodeRequest(request_id="ok-a"), timeout_s=10)
    b = streams.start(w, pb.DecodeRequest(request_id="ok-b"), timeout_s=10)
    assert len(await asyncio.wait_for(read_all(a), 10)) == 3 and len(await read_all(b)) == 3
    assert servicer.streams_opened == 1


async def test_cancel_and_deadline_end_the_request_here_and_on_the_worker(worker):
    servicer, w, streams = worker
    cancelled = streams.start(w, pb.DecodeRequest(request_id="hang-1"), timeout_s=10)
    pending = asyncio.create_task(cancelled.read())
    await asyncio.sleep(0.1)
    assert cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    expired = streams.start(w, pb.DecodeRequest(request_id="hang-2"), timeout_s=0.2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(expired.read(), 5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(50):
        if len(servicer.cancels) == 2:
            break
        await asyncio.sleep(0.05)
    assert servicer.cancels == ["hang-1", "hang-2"]
    again = streams.start(w, pb.DecodeRequest(request_id="hang-1"), timeout_s=10)  # the id is free again
    assert again.cancel() and not again.cancel()


async def test_a_broken_stream_fails_every_request_on_it_and_the_next_opens_a_new_one(worker):
    servicer, w, streams = worker
    calls = [streams.start(w, pb.DecodeRequest(request_id=f"hang-{i}"), timeout_s=30) for i in range(3)]
    await asyncio.sleep(0.1)
    servicer.broken.set()
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    servicer.broken = asyncio.Event()
    a = streams.start(w, pb.DecodeRequest(request_id="ok-a"), timeout_s=10)
    b = streams.start(w, pb.DecodeRequest(request_id="ok-b"), timeout_s=10)
    assert len(await asyncio.wait_for(read_all(a), 10)) == 3 and len(await read_all(b)) == 3
    assert servicer.streams_opened == 2
