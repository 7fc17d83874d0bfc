"""The engine's C++ CPU kernels: built once per machine and torch install, cached, loaded by name.

One extension module (`csrc/module.cpp`) holds the paged attention kernel (`csrc/paged_attention.cpp`,
used by `attention.py`) and the fused elementwise ops (`csrc/fused_ops.cpp`, used by `ops.py`). It is
built with torch's cpp_extension tooling at `make install` (`python -m pdserve.engine.kernels`) or on
first start. A machine where it cannot build or load (no compiler, an old CPU) runs the plain-torch
reference paths instead, with one log line saying why.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CSRC_DIR = Path(__file__).parent / "csrc"
SOURCES = ("module.cpp", "paged_attention.cpp", "fused_ops.cpp")
MODULE_NAME = "pdserve_cpu_kernels"
# Tuples, copied into a fresh list per call: torch's load() appends its own -L/-l flags to the
# extra_ldflags list it is given, so a shared list would grow on every call, change the build's hash,
# and make the next load in that process rebuild the whole module under a new name
# (pdserve_cpu_kernels_v1): minutes per worker start on 2 cores.
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def kernel_build_dir() -> Path:
    """Where the compiled module lives: per torch install, CPU feature set (it is built with
    -march=native) and sources, under $PDSERVE_KERNEL_CACHE or ~/.cache/pdserve/kernels."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    # torch's include paths (so its install prefix) and the sources' paths are in the build commands:
    # two environments, or two checkouts run with one environment, sharing one build dir would rebuild
    # it on every alternate load (minutes on 2 cores)
    h = hashlib.sha256(f"{torch.__version__}|{Path(torch.__file__).parent}|{_CSRC_DIR.resolve()}|{flags}|".encode())
    for name in (*SOURCES, "kernels.h"):
        h.update((_CSRC_DIR / name).read_bytes())
    key = h.hexdigest()[:16]
    root = os.environ.get("PDSERVE_KERNEL_CACHE") or Path.home() / ".cache" / "pdserve" / "kernels"
    return Path(root) / key


def load_kernel(verbose: bool = False):
    """Build (once, cached) and load the C++ kernel module. Raises on any failure."""
    from torch.utils import cpp_extension

    import fcntl

    build_dir = kernel_build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's own build lock is a plain file that a killed build leaves behind, after which every
    # later load waits on it forever. Serialise on an flock instead (the kernel releases it when its
    # holder dies); holding it, any torch lock file left is stale.
    with open(build_dir / ".pdserve.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        # the resolved paths, as kernel_build_dir() hashes them: a tree of symlinks to this checkout (the A/B
        # trees of benchmarks/serving_path.py) then writes the same build commands and reuses the build;
        # with the unresolved paths each alternate load rewrote build.ninja and rebuilt everything
        return cpp_extension.load(
            name=MODULE_NAME, sources=[str(_CSRC_DIR.resolve() / n) for n in SOURCES],
            build_directory=str(build_dir),
            extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
            verbose=verbose)


def ensure_kernel_built() -> bool:
    """Build the kernels now if they are not cached yet (so that workers starting together do not each
    wait on one build). False, with one log line, when they cannot be built: workers then fall back."""
    if not (kernel_build_dir() / f"{MODULE_NAME}.so").exists():
        logger.warning("building the CPU kernels (first start only, about a minute) ...")
    try:
        load_kernel()
    except Exception as exc:  # noqa: BLE001
        logger.warning("CPU kernels unavailable (%s); workers use the reference torch paths",
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return False
    return True


if __name__ == "__main__":  # `python -m pdserve.engine.kernels`: build the kernels (make install does)
    raise SystemExit(0 if ensure_kernel_built() else 1)
