"""Process fixtures: real pdserve clusters on loopback, always stopped (by pid) in `finally`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pdserve.cluster import ClusterSpec

sys.path.insert(0, str(Path(__file__).parent))  # integration_helpers
from integration_helpers import start_cluster  # noqa: E402


@pytest.fixture(scope="session")
def disagg_cluster(tiny_model_dir):
    """Router + 2 prefill + 2 decode; every prompt goes through remote prefill; small chunks so that
    prompts span several chunks and KV is pushed layer by layer across them."""
    spec = ClusterSpec(model=str(tiny_model_dir), num_prefill=2, num_decode=2,
                       router_args=["--local-prefill-threshold", "0", "--health-interval-s", "0.2"],
                       worker_args=["--max-num-batched-tokens", "64", "--kv-cache-memory-mb", "64"])
    cluster = start_cluster(spec)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def colocated_cluster(tiny_model_dir):
    spec = ClusterSpec(model=str(tiny_model_dir), num_prefill=0, num_decode=0, num_colocated=1,
                       router_args=["--health-interval-s", "0.2"], worker_args=["--kv-cache-memory-mb", "64"])
    cluster = start_cluster(spec)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session", params=["ngram", "draft"])
def spec_disagg_cluster(request, tiny_model_dir):
    """Router + 1 prefill + 1 decode worker speculating with the n-gram or the draft proposer (the
    built-in tiny-draft); every prompt goes through remote prefill, in 64-token chunks."""
    from pdserve.engine.builtin_model import builtin_draft_for

    builtin_draft_for(tiny_model_dir)  # made here once, beside the model, not at the worker's start
    spec = ClusterSpec(model=str(tiny_model_dir), num_prefill=1, num_decode=1,
                       router_args=["--local-prefill-threshold", "0", "--health-interval-s", "0.2"],
                       decode_args=["--speculative", request.param],
                       worker_args=["--max-num-batched-tokens", "64", "--kv-cache-memory-mb", "64"])
    cluster = start_cluster(spec)
    cluster.proposer = request.param
    try:
        yield cluster
    finally:
        cluster.stop()
