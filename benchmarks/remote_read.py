"""Ingest tasks reading raw files from an object store: read-ahead vs one request at a time.

    .venv/bin/python benchmarks/remote_read.py            # day_0 of the 10 M-row data (~580 MB)
    .venv/bin/python benchmarks/remote_read.py --quick    # day_0 of the 1 M-row data (~115 MB)

One core's share of an ingest, as a Spark task does it: the file is cut into
``ingest.chunk_bytes`` ranges, each range read in ``ingest.block_bytes`` blocks of whole lines
(``pipelines.criteo.raw_lines.iter_line_blocks``), parsed (``parse_block``) and written as zstd
Parquet to memory (the bronze write's CPU). Three ways to get the bytes:

  local        the file on local disk, in the page cache (the CPU-bound baseline);
  serial       an emulated object store, one ranged request per read (what a pyarrow
               ``open_input_file`` on S3 does without read-ahead);
  read-ahead   the same store through ``pipelines.raw_inputs.ReadAheadFile`` (what ingest
               tasks use for remote files).

The store is emulated, as nothing here can reach one: each request sleeps ``--latency-ms``
(first byte) plus its size over ``--mb-per-s`` (one request's bandwidth), then returns the
bytes from the local file. Sleeping releases the GIL as a network wait does, so the parse can
overlap it. The defaults (30 ms, 90 MB/s) are of the order of one S3 GET's from EC2 in the
same region; change them to your store's. Each mode is the best of ``--repeat`` runs.

Prints seconds per mode, then ``readahead_vs_local`` (read-ahead time / local time) and, last,
``readahead_speedup`` (serial time / read-ahead time).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


class EmulatedObject:
    """A local file served like an object-store object: every ``read``/``readinto``/``read_at``
    is one request that costs ``latency + bytes / bandwidth`` of waiting."""

    def __init__(self, path: Path, latency_s: float, bytes_per_s: float) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._size = path.stat().st_size
        self._latency, self._bw = latency_s, bytes_per_s
        self.requests = self.bytes = 0

    def _wait(self, n: int) -> None:
        self.requests += 1
        self.bytes += n
        time.sleep(self._latency + n / self._bw)

    def size(self) -> int:
        return self._size

    def read_at(self, n: int, offset: int) -> bytes:
        data = os.pread(self._f.fileno(), max(0, n), offset)
        self._wait(len(data))
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._wait(len(data))
        return data

    def readinto(self, buf) -> int:
        n = self._f.readinto(buf)
        self._wait(n)
        return n

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def one_core_ingest(path: Path, mode: str, latency_s: float, bytes_per_s: float) -> tuple[float, int, int, int]:
    """(seconds, rows, requests, bytes requested) for reading, parsing and writing every range
    of ``path``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import raw_inputs
    from pipelines.config import LakeConfig
    from pipelines.criteo.bronze import BRONZE_STATS_COLUMNS
    from pipelines.criteo.config import IngestConfig
    from pipelines.criteo.parse import parse_block
    from pipelines.criteo.raw_lines import iter_line_blocks

    ing, codec = IngestConfig(), LakeConfig().compression  # bigopt's defaults: what ingest runs with
    stores: list[EmulatedObject] = []

    def open_read(name, sequential=False, stop=None):
        if mode == "local":
            return open(name, "rb")
        store = EmulatedObject(Path(name), latency_s, bytes_per_s)
        stores.append(store)
        return raw_inputs.ReadAheadFile(store, stop=stop) if mode == "read-ahead" and sequential else store

    saved = raw_inputs.open_read
    raw_inputs.open_read = open_read
    size, rows = path.stat().st_size, 0
    t0 = time.perf_counter()
    try:
        for start in range(0, size, ing.chunk_bytes):
            end = min(start + ing.chunk_bytes, size)
            for block in iter_line_blocks(str(path), False, start, end, ing.block_bytes):
                table, _rejects = parse_block(block, True, block.count(b"\n"))
                stats = [c for c in BRONZE_STATS_COLUMNS if c in table.column_names]
                pq.write_table(table, pa.BufferOutputStream(), compression=codec,
                               row_group_size=ing.row_group_rows, write_statistics=stats)
                rows += table.num_rows
    finally:
        raw_inputs.open_read = saved
    return time.perf_counter() - t0, rows, sum(s.requests for s in stores), sum(s.bytes for s in stores)


def main() -> int:
    from criteo_featurize import ensure_data

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="day_0 of the 1 M-row data")
    p.add_argument("--latency-ms", type=float, default=30.0, help="first-byte latency of one request")
    p.add_argument("--mb-per-s", type=float, default=90.0, help="bandwidth of one request (MB/s)")
    p.add_argument("--repeat", type=int, default=None, help="runs per mode (default 3, 2 with --quick)")
    p.add_argument("--data", default=str(REPO / "data" / "bench"), help="where the raw files are cached")
    a = p.parse_args()
    rows, days = (1_000_000, 2) if a.quick else (10_000_000, 4)
    path = ensure_data(rows, days, Path(a.data)) / "day_0"
    repeat = a.repeat or (2 if a.quick else 3)
    latency, bw = a.latency_ms / 1e3, a.mb_per_s * 1e6
    from pipelines.raw_inputs import ReadAheadFile

    print(f"{path} ({path.stat().st_size / 1e6:,.0f} MB), one core; emulated store: {a.latency_ms:g} ms + "
          f"{a.mb_per_s:g} MB/s per request; read-ahead {ReadAheadFile.DEPTH} x "
          f"{ReadAheadFile.UNIT >> 20} MiB", flush=True)
    one_core_ingest(path, "local", latency, bw)  # warm-up: page cache, Numba kernels
    best: dict[str, float] = {}
    for mode in ("local", "serial", "read-ahead"):
        runs = [one_core_ingest(path, mode, latency, bw) for _ in range(repeat)]
        secs, n, requests, nbytes = min(runs)
        best[mode] = secs
        print(f"{mode:>10}: {secs:6.2f} s ({', '.join(f'{r[0]:.2f}' for r in runs)}), {n:,} rows, "
              f"{n / secs:,.0f} rows/s, {requests} requests, {nbytes / 1e6:,.1f} MB", flush=True)
    print(f"local_s: {best['local']:.2f}")
    print(f"serial_s: {best['serial']:.2f}")
    print(f"readahead_s: {best['read-ahead']:.2f}")
    print(f"readahead_vs_local: {best['read-ahead'] / best['local']:.2f}")
    print(f"readahead_speedup: {best['serial'] / best['read-ahead']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
