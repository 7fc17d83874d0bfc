"""UCX/ucxx environment defaults for the transfer layer, applied before ucxx is first imported.

UCX reads its configuration from the environment once, when ucxx creates its process-wide
context (ucxx keeps that context in a module global; there is one UCX worker per process and
every UCXTransport in the process shares it). A value the user already exported always wins.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from types import ModuleType

# name -> default; each with the reason it is here.
UCX_ENV_DEFAULTS: dict[str, str] = {
    # No "unused variable" warnings at startup (ucxx itself sets several UCX_* variables).
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    # Expected failures (a peer that died or closed, a cancelled receive) surface as our typed
    # errors; UCX would also print them as ERROR lines. Fatal problems are still printed.
    "UCX_LOG_LEVEL": "fatal",
    # Messages above 8 KiB go rendezvous, i.e. zero-copy (ucxx sets the same value).
    "UCX_RNDV_THRESH": "8192",
    # TCP (peers on other hosts; control endpoints everywhere): UCX moves a large tagged message as a rendezvous of
    # copy-in/copy-out fragments of one send segment each, 8 KiB by default (512 sends and receives per 4 MiB);
    # 64 KiB segments and 256 KiB receive buffers cut that to 64 (docs/transfer_bandwidth.md, "UCX TCP segments").
    "UCX_TCP_TX_SEG_SIZE": "64k",
    "UCX_TCP_RX_SEG_SIZE": "256k",
    # Complete ucxx requests through Python futures set by a notifier thread instead of
    # busy-polling the event loop with sleep(0) (which steals a core from the copy on small hosts).
    "UCXPY_ENABLE_PYTHON_FUTURE": "1",
}


def apply_ucx_env_defaults() -> None:
    """Sets every default that the environment does not already set (idempotent)."""
    for name, value in UCX_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def import_ucxx() -> ModuleType:
    """The ucxx module, imported after the defaults above are in place.

    On first import it also arranges for ucxx's notifier thread (a non-daemon thread that completes
    request futures) to be stopped when the interpreter exits; otherwise the exit waits for it forever.
    The hook runs before Python joins non-daemon threads, which plain `atexit` does not.
    """
    apply_ucx_env_defaults()
    first_import = "ucxx" not in sys.modules
    import ucxx

    if first_import:
        threading._register_atexit(ucxx.stop_notifier_thread)  # type: ignore[attr-defined]
    return ucxx


def available_transports() -> list[str]:
    """UCX transports this process's context may use, e.g. ['cma', 'posix', 'self', 'sysv', 'tcp']."""
    ucxx = import_ucxx()
    return sorted(ucxx.get_active_transports())


def transports_in_use(worker_info: str | None = None) -> list[str]:
    """Transport/device pairs the worker's endpoints selected ("tcp/lo", "cma/memory", ...), from ucp worker info."""
    ucxx = import_ucxx()
    info = ucxx.get_ucp_worker_info() if worker_info is None else worker_info
    return sorted(set(re.findall(r"\b(tcp/\w+|cma/memory|sysv/memory|posix/memory|self/memory|"
                                 r"rc\w*/\S+|dc\w*/\S+|ud\w*/\S+|cuda_\w+/\S+|gdr_copy/\S+)", info)))
