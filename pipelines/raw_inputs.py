"""Raw input files, wherever they live: local (or shared-filesystem) paths and object-store URIs.

    names = resolve(["s3://bucket/criteo/day_*.gz", "/data/criteo"], file_globs=["day_*"])
    size, mtime_ns = stat(names[0])
    with open_read(names[0]) as f:      # read / readinto / seek, in the driver or in a task
        head = f.read(1 << 20)

A name is an absolute local path (``file://`` is stripped) or a URI pyarrow understands:
``s3://``, ``gs://``, ``hdfs://``, ``abfs://`` ... Remote files are read through
``pyarrow.fs`` with the credentials of the environment, as the lake's tables are (on S3:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_REGION``, ``AWS_ENDPOINT_URL`` for an
S3-compatible store, or the instance's role); on a cluster the executors need them too, e.g.
``spark.executorEnv.AWS_REGION``. Local files keep Python's own file objects, so the local
path does exactly what it did before object stores were supported.

Globs follow :mod:`glob`'s rules on every filesystem: ``*``, ``?`` and ``[...]`` within one
path component (no ``**``), hidden names (``.x``) only matched by a pattern that starts with a
dot. A directory means its files (not recursive).
"""
from __future__ import annotations

import fnmatch
import glob
import os
import posixpath
from collections.abc import Sequence
from typing import BinaryIO

import pyarrow.fs as pafs

from pipelines.lake.fs import filesystem_for

_WILDCARDS = "*?["


def is_remote(name: str) -> bool:
    return "://" in name


def normalize(spec: str) -> str:
    """A local spec as an absolute path (``~`` expanded, ``file://`` stripped); a URI as given,
    without a trailing slash."""
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    elif is_remote(spec):
        return spec.rstrip("/")
    return os.path.abspath(os.path.expanduser(spec))


def basename(name: str) -> str:
    return posixpath.basename(name.rstrip("/"))


def _has_wildcard(s: str) -> bool:
    return any(ch in s for ch in _WILDCARDS)


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return filesystem_for(uri)
    except ValueError as e:  # pyarrow's ArrowInvalid: an unknown scheme, a malformed URI
        raise ValueError(f"input {uri!r}: not a filesystem URI pyarrow can open ({e})") from None


def _info(name: str) -> pafs.FileInfo:
    fs, path = _fs(name)
    return fs.get_file_info(path)


def _listing(uri: str, recursive: bool) -> tuple[str, list[pafs.FileInfo], str]:
    """(uri, FileInfos under it, the uri's path in its filesystem)."""
    fs, root = _fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
    return uri, infos, root


def _relative(root: str, path: str) -> str:
    return path[len(root):].lstrip("/") if root else path


def _glob_remote(spec: str) -> list[str]:
    scheme, rest = spec.split("://", 1)
    parts = rest.split("/")
    first = next(i for i, p in enumerate(parts) if _has_wildcard(p))
    if first == 0:
        raise ValueError(f"input glob {spec!r}: the bucket / host part cannot contain wildcards")
    pattern = parts[first:]
    base, infos, root = _listing(f"{scheme}://{'/'.join(parts[:first])}", recursive=len(pattern) > 1)
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = _relative(root, info.path).split("/")
        if len(rel) == len(pattern) and all(
            fnmatch.fnmatchcase(name, pat) and (pat.startswith(".") or not name.startswith("."))
            for name, pat in zip(rel, pattern)
        ):
            out.append(f"{base}/{'/'.join(rel)}")
    return sorted(out)


def _directory_files(name: str, file_globs: Sequence[str]) -> list[str]:
    """Files directly in directory ``name`` whose basenames match ``file_globs`` (hidden and
    ``_``-prefixed names skipped: Spark's and Delta's own markers)."""
    def wanted(n: str) -> bool:
        return not n.startswith((".", "_")) and any(fnmatch.fnmatch(n, g) for g in file_globs)

    if not is_remote(name):
        return [os.path.join(name, n) for n in sorted(os.listdir(name))
                if wanted(n) and os.path.isfile(os.path.join(name, n))]
    base, infos, root = _listing(name, recursive=False)
    return sorted(f"{base}/{_relative(root, i.path)}" for i in infos
                  if i.type == pafs.FileType.File and wanted(basename(i.path)))


def resolve(specs: Sequence[str], file_globs: Sequence[str]) -> list[str]:
    """Files named by ``specs``: files, globs, or directories (whose entries matching
    ``file_globs`` are taken, non-recursively), local or remote. In the order of ``specs``,
    each spec's files sorted, without duplicates."""
    out: list[str] = []
    for spec in specs:
        name = normalize(spec)
        if _has_wildcard(name):
            if is_remote(name):
                matches = _glob_remote(name)
            else:
                matches = [m for m in sorted(glob.glob(name)) if os.path.isfile(m)]
            if not matches:
                raise FileNotFoundError(f"input glob {spec!r} matches no file")
            out += matches
            continue
        kind = _info(name).type if is_remote(name) else (
            pafs.FileType.Directory if os.path.isdir(name) else
            pafs.FileType.File if os.path.isfile(name) else pafs.FileType.NotFound)
        if kind == pafs.FileType.Directory:
            out += _directory_files(name, file_globs)
        elif kind == pafs.FileType.File:
            out.append(name)
        else:
            raise FileNotFoundError(f"input {spec!r} does not exist")
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def stat(name: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns; 0 where the filesystem keeps none)."""
    if not is_remote(name):
        st = os.stat(name)
        return st.st_size, st.st_mtime_ns
    info = _info(name)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"input {name!r} is not a file")
    return int(info.size), int(info.mtime_ns or 0)


def open_read(name: str) -> BinaryIO:
    """A readable, seekable binary file (``read``, ``readinto``, ``seek``; a context manager).
    Remote files are read in ranged requests, one per ``read``/``readinto``."""
    if not is_remote(name):
        return open(name, "rb")
    fs, path = _fs(name)
    return fs.open_input_file(path)  # type: ignore[return-value]
