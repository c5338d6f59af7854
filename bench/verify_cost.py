"""What `tmjax.load`'s checksum check costs: xxh3-128 throughput of `tmjax.checkpoint.file_digest` on a
large synthetic file, from the page cache (warm) and, after `posix_fadvise(DONTNEED)`, from the disk
(cold), extrapolated to a 16 GB checkpoint. Writes bench/results/verify_cost.json.

    python bench/verify_cost.py [--gib 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from tmjax.checkpoint import file_digest

CHECKPOINT_GB = 16


def _write(path: Path, gib: float) -> int:
    block = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    blocks = int(gib * 1024 / 64)
    with open(path, "wb") as handle:
        for _ in range(blocks):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    return blocks * len(block)


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed_digest(path: Path) -> float:
    start = time.perf_counter()
    file_digest(path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="size of the synthetic file (default 2 GiB)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write it (default: the temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "synthetic.bin"
        size = _write(path, args.gib)
        _timed_digest(path)  # fill the page cache
        warm = min(_timed_digest(path) for _ in range(3))
        _drop_from_page_cache(path)
        cold = _timed_digest(path)
    results = {
        "file_bytes": size,
        "hash": "xxh3_128 (xxhash), 8 MiB reads",
        "warm_GB_per_s": round(size / warm / 1e9, 2),
        "cold_GB_per_s": round(size / cold / 1e9, 2),
        f"extrapolated_s_for_{CHECKPOINT_GB}GB_warm": round(CHECKPOINT_GB * 1e9 / (size / warm), 1),
        f"extrapolated_s_for_{CHECKPOINT_GB}GB_cold": round(CHECKPOINT_GB * 1e9 / (size / cold), 1),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "note": "cold = after posix_fadvise(DONTNEED) on the file; a virtual disk's host cache may still serve it",
    }
    out = Path(__file__).parent / "results" / "verify_cost.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
