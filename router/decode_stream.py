"""The router's side of DecodeStream: one long-lived stream per decode (or colocated) worker carrying every
request this router runs there, instead of one Decode call per request.

A worker sends the new outputs of all its requests in one DecodeBatch (about one per engine step); the
reader here hands each to its request. Each request gets a `StreamedCall`, which reads like the Decode
call it replaces (`read()` returns DecodeResponse messages, raises `grpc.aio.AioRpcError` with the status
Decode would have ended with, `cancel()` aborts it), so the dispatcher drives both the same way. A
request's deadline is kept here as well as on the worker; the stream breaking (the worker died) fails
every request on it at once, with the stream's status.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from pdserve.proto import pdserve_pb2 as pb

logger = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_CANCELLED = object()  # a StreamedCall's queue item: cancel() was called


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class StreamedCall:
    """One request on a DecodeStream, read like a Decode call."""

    def __init__(self, stream: DecodeStream, req_id: str, timeout_s: float) -> None:
        self._stream = stream
        self.req_id = req_id
        self._queue: asyncio.Queue = asyncio.Queue()
        self._done = False
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self._expire) if timeout_s > 0 else None

    async def read(self) -> pb.DecodeResponse:
        item = await self._queue.get()
        if isinstance(item, pb.DecodeOutput):
            if item.error_code:
                self._end()
                raise _rpc_error(_CODES.get(item.error_code, grpc.StatusCode.UNKNOWN), item.error_message)
            if item.response.finish_reason:
                self._end()
            return item.response
        self._end()
        if item is _CANCELLED:
            raise asyncio.CancelledError()
        raise item

    def cancel(self) -> bool:
        """Abort the request (on the worker too); a pending or later read raises CancelledError, as a
        cancelled gRPC call's does."""
        if self._done:
            return False
        self._end()
        self._stream.send_cancel(self.req_id)
        self._queue.put_nowait(_CANCELLED)
        return True

    def _deliver(self, item: object) -> None:
        if not self._done:
            self._queue.put_nowait(item)

    def _expire(self) -> None:
        if not self._done:
            self._end()
            self._stream.send_cancel(self.req_id)
            self._queue.put_nowait(_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def _end(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        self._stream.forget(self)


class DecodeStream:
    """One DecodeStream call to one worker and the requests on it."""

    def __init__(self, stub, peer: str) -> None:
        self.stub = stub
        self.peer = peer
        self.closed = False
        self._requests: dict[str, StreamedCall] = {}
        self._outbox: list[pb.DecodeStreamRequest] = []
        self._outbox_ready = asyncio.Event()
        self._call = stub.DecodeStream()
        self._reader = asyncio.create_task(self._read())
        self._writer = asyncio.create_task(self._write())

    def start(self, req: pb.DecodeRequest, timeout_s: float) -> StreamedCall:
        if req.request_id in self._requests:  # the worker would refuse it too; never mix two requests' outputs
            raise ValueError(f"request {req.request_id!r} already runs on this stream")
        call = StreamedCall(self, req.request_id, timeout_s)
        self._requests[req.request_id] = call
        self._send(pb.DecodeStreamRequest(start=req, timeout_s=timeout_s))
        return call

    def send_cancel(self, req_id: str) -> None:
        if not self.closed:
            self._send(pb.DecodeStreamRequest(cancel=req_id))

    def forget(self, call: StreamedCall) -> None:
        if self._requests.get(call.req_id) is call:
            del self._requests[call.req_id]

    def _send(self, msg: pb.DecodeStreamRequest) -> None:
        self._outbox.append(msg)
        self._outbox_ready.set()

    async def _write(self) -> None:
        try:
            while True:
                await self._outbox_ready.wait()
                self._outbox_ready.clear()
                msgs, self._outbox = self._outbox, []
                for msg in msgs:
                    await self._call.write(msg)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            logger.debug("DecodeStream to %s: write failed: %s", self.peer, exc)  # the reader reports it

    async def _read(self) -> None:
        error: BaseException = _rpc_error(grpc.StatusCode.CANCELLED, "the router closed the stream")
        try:
            while True:
                batch = await self._call.read()
                if batch is grpc.aio.EOF:
                    error = _rpc_error(grpc.StatusCode.UNAVAILABLE, "the worker ended its DecodeStream")
                    return
                for out in batch.outputs:
                    call = self._requests.get(out.request_id)
                    if call is not None:
                        call._deliver(out)
        except grpc.aio.AioRpcError as exc:
            error = exc
        finally:
            self.closed = True
            self._writer.cancel()
            for call in list(self._requests.values()):
                call._deliver(error)
            self._requests.clear()

    async def close(self) -> None:
        self.closed = True
        self._call.cancel()
        for task in (self._reader, self._writer):
            task.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)


class DecodeStreams:
    """The router's DecodeStream per worker address, opened on first use and again after one broke."""

    def __init__(self) -> None:
        self._streams: dict[str, DecodeStream] = {}

    def start(self, worker, req: pb.DecodeRequest, timeout_s: float) -> StreamedCall:
        stream = self._streams.get(worker.address)
        if stream is None or stream.closed or stream.stub is not worker.decode_stub:
            if stream is not None and not stream.closed:  # the worker re-registered: a new channel
                asyncio.get_running_loop().create_task(stream.close())
            stream = self._streams[worker.address] = DecodeStream(worker.decode_stub, worker.worker_id or
                                                                  worker.address)
        return stream.start(req, timeout_s)

    async def close(self) -> None:
        streams, self._streams = list(self._streams.values()), {}
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
