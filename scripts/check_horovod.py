"""Verify the Horovod build: a 2-process gloo allreduce on this machine.

    .venv/bin/python scripts/check_horovod.py   # prints "horovod ok: ..." or fails
"""
from __future__ import annotations

import sys


def _worker():
    import horovod.torch as hvd
    import torch

    hvd.init()
    t = torch.full((4,), float(hvd.rank() + 1))
    summed = hvd.allreduce(t, op=hvd.Sum, name="check")
    return hvd.rank(), hvd.size(), summed.tolist()


def main() -> int:
    from horovod.runner import run

    results = run(_worker, np=2, use_gloo=True, hosts="localhost:2")
    ok = sorted(r[0] for r in results) == [0, 1] and all(r[2] == [3.0] * 4 for r in results)
    print(f"horovod {'ok' if ok else 'FAILED'}: {results}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
