"""`pdserve worker`: a colocated worker that prefills and decodes its own requests.

It is the decode worker with role COLOCATED (all engine code shared); the router sends it
whole requests.
"""

from __future__ import annotations

import argparse

from pdserve.decode import server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server.add_arguments(parser)
    parser.set_defaults(colocated=True)


def run(args: argparse.Namespace) -> int:
    return server.run(args)
