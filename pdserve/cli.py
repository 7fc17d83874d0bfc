"""The `pdserve` console script: one argparse parser, one subcommand per component.

Each subcommand lives in its component's module, which exposes `add_arguments(parser)` and
`run(args) -> int`. Modules keep heavy imports (torch, ucxx) inside `run`, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-model": ("pdserve.engine.builtin_model", "write the built-in deterministic model (tiny or small) to a directory"),
    "generate": ("pdserve.generate_cmd", "generate text: offline in process (--model) or from a running server (--url)"),
    "up": ("pdserve.up", "start a whole cluster on this machine (router, prefill, decode) and print where to connect"),
    "router": ("pdserve.router.server", "run the router (public gRPC API, worker registry, request dispatch)"),
    "prefill": ("pdserve.prefill.server", "run a prefill worker"),
    "decode": ("pdserve.decode.server", "run a decode worker"),
    "worker": ("pdserve.decode.colocated", "run a colocated worker (prefill and decode in one process)"),
    "bench": ("pdserve.loadtest.cli", "load-test pdserve or any OpenAI-compatible server (TTFT, TPOT, goodput)"),
}


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="Prefill/decode disaggregated LLM serving. Run `pdserve COMMAND --help` for a command's flags.",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("PDSERVE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="logging level (env PDSERVE_LOG_LEVEL; default: info)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
