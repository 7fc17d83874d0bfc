"""Python client for the router's gRPC API.

    async with Client("127.0.0.1:50051") as client:
        async for chunk in client.generate("Hello", max_tokens=32, temperature=0):
            print(chunk.text, end="")
        result = await client.complete("Hello", max_tokens=32)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from pdserve import rpc
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    usage: pb.Usage
    logprobs: list[float] = field(default_factory=list)
    prefill_worker: str = ""
    decode_worker: str = ""
    timing: pb.RequestTiming | None = None  # with return_timing=True: where the request's time went


def build_request(prompt: str | list[int], *, max_tokens: int = 16, temperature: float | None = None,
                  top_k: int = 0, top_p: float | None = None, seed: int | None = None,
                  stop: list[str] | None = None, stop_token_ids: list[int] | None = None, ignore_eos: bool = False,
                  logprobs: bool = False, min_tokens: int = 0, request_id: str = "", model: str = "",
                  skip_detokenize: bool = False, return_timing: bool = False) -> pb.GenerateRequest:
    sampling = pb.SamplingOptions(max_tokens=max_tokens, top_k=top_k, stop=stop or [],
                                  stop_token_ids=stop_token_ids or [], ignore_eos=ignore_eos, logprobs=logprobs,
                                  min_tokens=min_tokens)
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    req = pb.GenerateRequest(request_id=request_id, model=model, sampling=sampling, skip_detokenize=skip_detokenize,
                             return_timing=return_timing)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


class Client:
    """`address`: one router's host:port, or a comma-separated list of router replicas to fail over
    between. `api_key`: sent as `authorization: Bearer KEY` on every call; `tls_ca_file`: connect over TLS,
    trusting this PEM CA certificate."""

    def __init__(self, address: str, api_key: str = "", tls_ca_file: str = "", retries: int | None = None,
                 retry_backoff_s: float = 0.2) -> None:
        self.address = address  # host:port, or a comma-separated list of router replicas
        # Generate calls sent again after UNAVAILABLE before any token; default: 3 with a list, else 0.
        self.retries = (3 if "," in address else 0) if retries is None else retries
        self.retry_backoff_s = retry_backoff_s
        self._channel = rpc.channel(address, tls_ca_file)
        self._stub = pb_grpc.RouterStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: str | list[int], *, timeout_s: float | None = None, **kwargs
                       ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream a generation; raises grpc.aio.AioRpcError with the server's status on failure.
        A call that fails UNAVAILABLE before its first message (a router that died or is restarting;
        with several router addresses the channel moves to the next) is sent again, up to `retries`
        times; once tokens have streamed, a failure is the caller's."""
        request = build_request(prompt, **kwargs)
        for attempt in range(self.retries + 1):
            call = self._stub.Generate(request, timeout=timeout_s, metadata=self._metadata)
            received = False
            try:
                async for msg in call:
                    received = True
                    yield msg
                return
            except grpc.aio.AioRpcError as exc:
                if received or exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise
            finally:
                call.cancel()
            await asyncio.sleep(self.retry_backoff_s * 2 ** attempt)

    async def complete(self, prompt: str | list[int], *, timeout_s: float | None = None, **kwargs) -> Completion:
        """Run a generation to the end and return it whole."""
        out = Completion(request_id="", token_ids=[], text="", finish_reason="", usage=pb.Usage())
        async for msg in self.generate(prompt, timeout_s=timeout_s, **kwargs):
            out.request_id = msg.request_id
            out.token_ids.extend(msg.token_ids)
            out.text += msg.text
            out.logprobs.extend(msg.logprobs)
            out.prefill_worker = out.prefill_worker or msg.prefill_worker
            out.decode_worker = out.decode_worker or msg.decode_worker
            if msg.finish_reason:
                out.finish_reason = msg.finish_reason
                out.usage = msg.usage
                if msg.HasField("timing"):
                    out.timing = msg.timing
        return out

    async def abort(self, request_id: str) -> bool:
        return (await self._stub.Abort(pb.AbortRequest(request_id=request_id), timeout=5.0,
                                       metadata=self._metadata)).found

    async def model_info(self, timeout_s: float = 5.0) -> pb.ModelInfo:
        return await self._stub.GetModelInfo(pb.ModelInfoRequest(), timeout=timeout_s, metadata=self._metadata)

    async def workers(self, timeout_s: float = 5.0, refresh: bool = False) -> list[pb.WorkerInfo]:
        """The router's workers; `refresh` makes it poll them first, so their stats are current."""
        return list((await self._stub.ListWorkers(pb.ListWorkersRequest(refresh=refresh), timeout=timeout_s,
                                                  metadata=self._metadata)).workers)


__all__ = ["Client", "Completion", "build_request", "grpc"]
