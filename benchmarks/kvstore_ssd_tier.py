"""Read and write bandwidth of a store node's SSD tier (kvstore/node_ssd.py) on this machine.

Moves 64 KiB frames (one block of the built-in tiny model) between a page-aligned DRAM buffer and
the tier's file the way a node does: runs of adjacent frames, one pwritev/preadv per run, through
the I/O thread, O_DIRECT where the filesystem allows. For each run length it writes every frame of
the file once, then reads them all back and checks the checksums; GB/s = bytes / wall seconds.

    .venv/bin/python benchmarks/kvstore_ssd_tier.py --dir /tmp/ssd-bench [--mb 1024] [--runs 1 8 32 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from pathlib import Path

import numpy as np

FRAME = 64 * 1024


async def measure(directory: str, total_mb: int, run_frames: int) -> dict:
    from pdserve.kvstore.node_pool import allocate_buffer
    from pdserve.kvstore.node_ssd import SSDTier

    ssd = SSDTier(directory, total_mb * 2**20, f"bench-{run_frames}")
    if not ssd.open():
        raise SystemExit(f"cannot use {directory}: {ssd.off_reason}")
    dram_frames = 1024  # a 64 MiB DRAM buffer, cycled through
    buf = allocate_buffer(dram_frames * FRAME, "host")
    buf[:] = np.random.default_rng(0).integers(0, 256, buf.size, dtype=np.uint8)
    ssd.fix_frame_size(FRAME, buf.ctypes.data)
    views = [memoryview(buf)[i * FRAME:(i + 1) * FRAME] for i in range(dram_frames)]
    runs = [(first, [views[(first + i) % dram_frames] for i in range(run_frames)])
            for first in range(0, ssd.num_frames - run_frames + 1, run_frames)]
    nbytes = sum(len(vs) for _, vs in runs) * FRAME
    started = time.perf_counter()
    written = [await ssd.write([run]) for run in runs]
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    back = [await ssd.read([run]) for run in runs]
    read_s = time.perf_counter() - started
    assert back == written, "read back differs from what was written"
    direct = ssd.direct
    ssd.close()
    return {"run_frames": run_frames, "run_kib": run_frames * FRAME // 1024, "bytes": nbytes, "o_direct": direct,
            "write_gb_s": nbytes / write_s / 1e9, "read_gb_s": nbytes / read_s / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="directory for the tier's file (removed afterwards)")
    parser.add_argument("--mb", type=int, default=1024, help="file size in MiB (each run length writes it whole)")
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 8, 32, 128], help="frames per pwritev/preadv")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [asyncio.run(measure(args.dir, args.mb, n)) for n in args.runs]
    shutil.rmtree(Path(args.dir), ignore_errors=True)
    if args.json:
        print(json.dumps(rows))
        return
    print("| frames per call | KiB per call | O_DIRECT | write GB/s | read GB/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run_frames']} | {r['run_kib']} | {r['o_direct']} | {r['write_gb_s']:.2f} | {r['read_gb_s']:.2f} |")


if __name__ == "__main__":
    main()
