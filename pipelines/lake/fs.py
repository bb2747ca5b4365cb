"""Path/URI handling shared by the lake writer and the Spark-free reader.

Tables are addressed by a local path or any URI pyarrow understands (``s3://``, ``hdfs://``,
``gs://``, ``file://``). Local paths are made absolute so that Spark tasks (other processes,
possibly other working directories) and delta-rs agree on where the table is.
"""
from __future__ import annotations

import os
from functools import lru_cache

import pyarrow.fs as pafs


def normalize_uri(path: str | os.PathLike) -> str:
    s = os.fspath(path)
    if "://" in s:
        if s.startswith("file://"):
            return os.path.abspath(s[len("file://"):]).rstrip("/") or "/"
        return s.rstrip("/")
    return os.path.abspath(os.path.expanduser(s)).rstrip("/") or "/"


def is_local(uri: str) -> bool:
    return "://" not in uri


@lru_cache(maxsize=64)
def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, root path inside it) for a table URI."""
    uri = normalize_uri(uri)
    if is_local(uri):
        return pafs.LocalFileSystem(), uri
    fs, root = pafs.FileSystem.from_uri(uri)
    return fs, root.rstrip("/")


def join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel.lstrip('/')}"


def file_uri(table_uri: str, rel: str) -> str:
    """Absolute location of a table-relative data file path (as stored in the Delta log)."""
    from urllib.parse import unquote

    if "://" in rel or rel.startswith("/"):
        return rel
    return join(normalize_uri(table_uri), unquote(rel))


def exists(uri: str) -> bool:
    """Whether a file (or directory) exists at a local path or URI."""
    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_small_file(uri: str, data: bytes) -> None:
    """Write a small side file (a JSON summary next to the tables) in one piece: a local file
    through a temporary name and a rename, a remote one in a single upload, which an object
    store makes visible only once complete. Never compressed (pyarrow would gzip a ``.gz`` name)."""
    uri = normalize_uri(uri)
    if is_local(uri):
        os.makedirs(os.path.dirname(uri), exist_ok=True)
        tmp = f"{uri}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, uri)
        return
    fs, path = filesystem_for(uri)
    with fs.open_output_stream(path, compression=None) as f:
        f.write(data)


def read_small_file(uri: str) -> bytes:
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()
