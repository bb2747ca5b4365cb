"""The compiled kernels load where Numba finds nowhere to cache them (a read-only install and
an unwritable home: `njit(cache=True)` then failed at import, and with it every parse task)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1].parent

_CODE = """
import sys, tempfile
tempfile.tempdir = sys.argv[1]
import numba
from pipelines.criteo import scan, spark_xxhash
scan.warm_up()
spark_xxhash.warm_up()
print("CACHE", numba.config.CACHE_DIR)
"""


def test_kernels_load_and_cache_where_numba_has_no_place(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO),
           # neither the module's __pycache__ nor the user's cache dir: as on a read-only install
           # run by a user without a writable home
           "NUMBA_CACHE_LOCATOR_CLASSES": "UserProvidedCacheLocator,ZipCacheLocator"}
    env.pop("NUMBA_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", _CODE, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    cache = tmp_path / f"bigopt-numba-{os.getuid()}"
    assert f"CACHE {cache}" in out.stdout
    assert "caching it in" in out.stderr  # said once per kernel, as a warning
    assert list(cache.rglob("*.nbi")), "the kernels were not cached there"
    # the second process loads them from there
    again = subprocess.run([sys.executable, "-c", _CODE, str(tmp_path)], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and f"CACHE {cache}" in again.stdout, again.stderr[-3000:]
