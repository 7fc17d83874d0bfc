"""Generate text from a prompt: in process from a model directory (--model, the default: the
built-in tiny model), or from a running pdserve router (--url HOST:PORT). Streams to the terminal."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", default="", metavar="DIR", help="model directory (default: built-in tiny model)")
    where.add_argument("--url", default="", metavar="HOST:PORT", help="a running router's gRPC address")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")


def _offline(args: argparse.Namespace) -> int:
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer
    from pdserve.worker_runtime import resolve_model

    config = resolve_model(EngineConfig(model=args.model))
    engine = LLMEngine(config)
    tok = Tokenizer(config.model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    prompt_ids = tok.encode(args.prompt)
    engine.add_request("cli", prompt_ids, params)
    detok = IncrementalDetokenizer(tok, stop_strings=args.stop, prompt_ids=prompt_ids)
    reason = ""
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(detok.feed(out.new_token_ids))
            sys.stdout.flush()
            if detok.stopped:
                engine.abort_request("cli")
                reason = "stop"
            elif out.finished:
                reason = out.finish_reason or ""
    sys.stdout.write(detok.flush() + "\n")
    print(f"[finish: {reason}]", file=sys.stderr)
    return 0


async def _remote(args: argparse.Namespace) -> int:
    import grpc

    from pdserve.client import Client

    async with Client(args.url) as client:
        try:
            async for msg in client.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                             top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                             ignore_eos=args.ignore_eos):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.finish_reason:
                    u = msg.usage
                    print(f"\n[finish: {msg.finish_reason}; prompt {u.prompt_tokens}, completion "
                          f"{u.completion_tokens}, cached {u.cached_tokens} tokens]", file=sys.stderr)
        except grpc.aio.AioRpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def run(args: argparse.Namespace) -> int:
    if args.url:
        import asyncio

        return asyncio.run(_remote(args))
    return _offline(args)
