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
    "kvstore-master": ("pdserve.kvstore.master", "run the KV cache store master (which node holds which block)"),
    "kvstore-node": ("pdserve.kvstore.node", "run a KV cache store node (a memory pool served over UCX)"),
    "bench": ("pdserve.loadtest.cli", "load-test pdserve or any OpenAI-compatible server (TTFT, TPOT, goodput)"),
    "simulate": ("pdserve.planner.simulate_cmd", "simulate a cluster: the real routing policy and planner against "
                 "calibrated simulated workers, replaying bench datasets and Mooncake traces"),
    "healthcheck": ("pdserve.healthcheck", "check a pdserve server's gRPC health (exit 0 when SERVING)"),
}


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, just that subcommand's module is imported (fast start-up,
    and one component's import problem cannot break another's command)."""
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
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


def _chosen_subcommand(argv: list[str]) -> str | None:
    return next((a for a in argv if a in SUBCOMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    argv = sys.argv[1:] if argv is None else argv
    chosen = _chosen_subcommand(argv)
    parser = build_parser(only=chosen or "")
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
