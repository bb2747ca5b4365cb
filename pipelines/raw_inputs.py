"""Raw input files, wherever they live: local (or shared-filesystem) paths and object-store URIs.

    names = resolve(["s3://bucket/criteo/day_*.gz", "/data/criteo"], file_globs=["day_*"])
    size, mtime_ns = stat(names[0])
    with open_read(names[0]) as f:      # read / readinto / seek, in the driver or in a task
        head = f.read(1 << 20)

A name is an absolute local path (a ``file://`` URI becomes its percent-decoded path) or a URI
pyarrow understands: ``s3://``, ``gs://``, ``hdfs://``, ``abfs://`` ... Remote files are read
through ``pyarrow.fs`` with the credentials of the environment, as the lake's tables are (on S3:
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
import stat as _stat
from collections.abc import Sequence
from typing import BinaryIO

import pyarrow.fs as pafs

from pipelines.errors import MissingInputError
from pipelines.lake.fs import filesystem_for, is_local, normalize_uri

_WILDCARDS = "*?["


class InputNameError(ValueError):
    """An input's name cannot be ingested as it is (not UTF-8)."""


class InputNotAFileError(OSError):
    """An input, named or found in a folder or by a glob, that is no regular file to read: a
    symbolic link whose target is missing (storage not mounted?), a FIFO, a socket, a device.
    Not a FileNotFoundError: ``bigopt run`` takes that for "no raw data yet" and generates."""


def is_remote(name: str) -> bool:
    return not is_local(name)


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


def _files_under(name: str, recursive: bool) -> list[str]:
    """The files under directory ``name`` (local path or URI), named like it. A local folder
    is listed by Python (a name that is not UTF-8 comes back escaped; pyarrow's listing
    failed on it, whatever the name, without naming it)."""
    if is_local(name) and not recursive:
        with os.scandir(name) as entries:  # a broken link or a FIFO too: the caller checks what it takes
            return [f"{name}/{e.name}" for e in entries if not e.is_dir()]
    fs, root = _fs(name)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
    return [f"{name}/{i.path[len(root):].lstrip('/')}" for i in infos if i.type == pafs.FileType.File]


def _glob_remote(spec: str) -> list[str]:
    """glob's rules on an object store: the listing under the last wildcard-free prefix,
    matched component by component. (Local globs are glob's own: it lists only the
    directories that match.)"""
    scheme, rest = spec.split("://", 1)
    parts = rest.split("/")
    first = next(i for i, p in enumerate(parts) if _has_wildcard(p))
    if first == 0:
        raise ValueError(f"input glob {spec!r}: the bucket / host part cannot contain wildcards")
    pattern = parts[first:]
    base = f"{scheme}://{'/'.join(parts[:first])}"
    out = []
    for uri in _files_under(base, recursive=len(pattern) > 1):
        rel = uri[len(base) + 1:].split("/")
        if len(rel) == len(pattern) and all(
            fnmatch.fnmatchcase(name, pat) and (pat.startswith(".") or not name.startswith("."))
            for name, pat in zip(rel, pattern)
        ):
            out.append(uri)
    return sorted(out)


def _directory_files(name: str, file_globs: Sequence[str], exclude_globs: Sequence[str]) -> list[str]:
    """Files directly in directory ``name`` whose basenames match ``file_globs`` and no
    ``exclude_globs`` (ignoring case); hidden and ``_``-prefixed names skipped: Spark's and
    Delta's own markers."""
    def wanted(n: str) -> bool:
        return (not n.startswith((".", "_")) and any(fnmatch.fnmatch(n, g) for g in file_globs)
                and not any(fnmatch.fnmatch(n.lower(), g.lower()) for g in exclude_globs))

    return _regular(sorted(f for f in _files_under(name, recursive=False) if wanted(basename(f))))


def _regular(names: list[str]) -> list[str]:
    """``names``, or :class:`InputNotAFileError` for the first local one that is not a regular
    file (or a link to one). Listing or globbing kept only regular files, so a day whose link
    pointed at storage not mounted was left out of the run without a word."""
    bad = [f"{n!r} {why}" for n in names if is_local(n) and (why := _not_a_file(n)) is not None]
    if len(bad) == 1:
        raise InputNotAFileError(f"input {bad[0]}")
    if bad:  # every one, on one line: a storage not mounted breaks all its days' links at once
        raise InputNotAFileError(f"{len(bad)} inputs cannot be read as files: " + "; ".join(bad))
    return names


def _not_a_file(path: str) -> str | None:
    """Why local ``path`` cannot be read as a raw file, or None: a regular file (a link to one
    too) or a directory (which its callers take apart)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)!r}, which does not exist (storage not mounted?)"
        return "does not exist"
    except OSError as e:  # a link loop, a folder on the way that cannot be searched
        return f"cannot be reached ({e.strerror or e})"
    if _stat.S_ISREG(st.st_mode) or _stat.S_ISDIR(st.st_mode):
        return None
    kind = ("a FIFO" if _stat.S_ISFIFO(st.st_mode) else "a socket" if _stat.S_ISSOCK(st.st_mode)
            else "a device" if _stat.S_ISCHR(st.st_mode) or _stat.S_ISBLK(st.st_mode) else "of another kind")
    return f"is not a regular file ({kind})"


def resolve(specs: Sequence[str], file_globs: Sequence[str], exclude_globs: Sequence[str] = ()) -> list[str]:
    """Files named by ``specs``: files, globs, or directories (whose entries matching
    ``file_globs`` and no ``exclude_globs`` are taken, non-recursively), local or remote. In the order of ``specs``,
    each spec's files sorted, without duplicates. A spec that names no file (a glob matching
    none, a directory without a matching file, a path that does not exist) is an error; so is
    a local input, named or taken from a folder or a glob, that is no regular file: a symbolic
    link whose target is missing, a FIFO (:class:`InputNotAFileError`, naming every one)."""
    out: list[str] = []
    for spec in specs:
        name = normalize_uri(spec)  # as the lake's: absolute local path, or the URI
        # a path that exists is itself, whatever its characters: a folder named raw[1] is no glob
        if _has_wildcard(name) and not exists(name):
            if is_remote(name):
                matches = _glob_remote(name)
            else:
                matches = [m for m in sorted(glob.glob(_escape_existing_folders(name))) if not os.path.isdir(m)]
            # `_`-prefixed names are markers (Spark's _SUCCESS, generate's _generated.json), as
            # in a folder, unless the pattern itself starts with `_`
            if not basename(name).startswith("_"):
                matches = [m for m in matches if not basename(m).startswith("_")]
            _regular(matches)  # a broken link or a FIFO that matches fails the run, named
            if not matches:
                raise MissingInputError(f"input glob {spec!r} matches no file")
            out += matches
            continue
        kind = _info(name).type
        if kind == pafs.FileType.Directory:
            found = _directory_files(name, file_globs, exclude_globs)
            if not found:  # as a glob that matches nothing: a wrong folder, or files not there yet
                raise MissingInputError(f"input directory {spec!r} has no file matching {list(file_globs)}")
            out += found
        elif kind == pafs.FileType.File:
            out.append(name)
        elif is_local(name) and os.path.lexists(name):  # a broken link, a FIFO: it exists, as what
            raise InputNotAFileError(f"input {spec!r} {_not_a_file(name) or 'is not a regular file'}")
        else:
            raise MissingInputError(f"input {spec!r} does not exist")
    seen: set[str] = set()
    out = [p for p in out if not (p in seen or seen.add(p))]
    for p in out:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # a byte the filesystem kept that no UTF-8 text holds
            raise InputNameError(f"input file name {os.fsencode(p)!r} is not UTF-8, so it cannot be bronze's `source`: "
                             "rename it (e.g. `convmv -f latin1 -t utf8`)") from None
    return out


def _escape_existing_folders(pattern: str) -> str:
    """``pattern`` with its longest leading folder that exists as written escaped: in
    ``/data/raw[1]/day_*`` the folder ``raw[1]`` is itself, not a character class matching
    ``raw1`` (a local glob; the pattern's last component stays a pattern)."""
    parts = pattern.split("/")
    for i in range(len(parts) - 1, 0, -1):
        head = "/".join(parts[:i])
        if _has_wildcard(head) and os.path.isdir(head):
            return "/".join([glob.escape(head), *parts[i:]])
    return pattern


def exists(name: str) -> bool:
    """Whether a local path or URI names something (a file, a folder)."""
    if is_local(name):
        return os.path.exists(name)
    return _info(name).type != pafs.FileType.NotFound


def gone(names: Sequence[str], list_from: int = 32) -> set[str]:
    """The names (local paths or URIs) that no longer exist. One the store cannot be asked
    about (no credentials, a network error) is not taken for gone.

    Remote names are looked up a few at a time, one request each, except that a folder
    holding ``list_from`` or more of them is listed once instead: an object store lists 1,000
    keys per request, so a ledger of thousands of files in a few folders costs a few requests,
    not one per file, while a handful of files in a folder of millions is not a listing of it."""
    from concurrent.futures import ThreadPoolExecutor

    out = {n for n in names if is_local(n) and not exists(n)}
    by_dir: dict[str, list[str]] = {}
    for n in dict.fromkeys(names):
        if not is_local(n):  # a URI with options (s3://b/k?region=...) is looked up alone
            by_dir.setdefault(n if "?" in n else n.rstrip("/").rsplit("/", 1)[0], []).append(n)

    def listed(folder: str, members: list[str]) -> set[str]:
        try:
            fs, root = _fs(folder)
            infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        except (OSError, ValueError, ImportError):  # ImportError: a scheme's optional package (hf://)
            return set()
        held = {posixpath.basename(i.path.rstrip("/")) for i in infos}
        return {n for n in members if basename(n) not in held}

    def looked_up(name: str) -> set[str]:
        try:
            return set() if exists(name) else {name}
        except (OSError, ValueError, ImportError):
            return set()

    many = {d for d, m in by_dir.items() if len(m) >= list_from and "?" not in d}
    work = [(listed, (d, by_dir[d])) for d in many]
    work += [(looked_up, (n,)) for d, m in by_dir.items() if d not in many for n in m]
    if len(work) == 1:
        return out | work[0][0](*work[0][1])
    if work:
        with ThreadPoolExecutor(max_workers=min(16, len(work))) as ex:
            for found in ex.map(lambda w: w[0](*w[1]), work):
                out |= found
    return out


def stat(name: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns; 0 where the filesystem keeps none)."""
    info = _info(name)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"input {name!r} is not a file")
    return int(info.size), int(info.mtime_ns or 0)


def open_read(name: str, sequential: bool = False, stop: int | None = None) -> BinaryIO:
    """A readable, seekable binary file (``read``, ``readinto``, ``seek``; a context manager).

    Remote files are read in ranged requests. With ``sequential`` (a task reading a range
    front to back) they are read ahead: :class:`ReadAheadFile` fetches the next blocks before
    they are asked for, up to ``stop`` (the end of the task's range; bytes past it are read
    only on demand). A local file is Python's own, whatever the arguments."""
    if not is_remote(name):
        return open(name, "rb")
    fs, path = _fs(name)
    f = fs.open_input_file(path)
    return ReadAheadFile(f, stop=stop) if sequential else f  # type: ignore[return-value]


class ReadAheadFile:
    """A remote file read front to back while ``depth`` blocks of ``unit`` bytes ahead of the
    position are fetched in parallel threads (``read_at``, which releases the GIL), so the
    network waits of a task overlap its parsing, and ``depth`` requests share the store's
    per-request bandwidth limit. Blocks start at the first position read (a task's range,
    not multiples of ``unit``); the one before the current block is kept for the line
    reader's short seeks back, older ones are dropped; nothing before the first position or
    at or past ``stop`` is fetched ahead (read on demand, exactly). Memory: up to
    ``depth + 2`` blocks.

    Why: one ranged request per block leaves the task idle for the whole transfer; on an
    object store each request also pays a first-byte latency. ``benchmarks/remote_read.py``
    measures the difference against an emulated store."""

    UNIT = 8 << 20
    DEPTH = 4

    def __init__(self, f, stop: int | None = None, unit: int = UNIT, depth: int = DEPTH) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._f = f
        self.size = int(f.size())
        self._stop = self.size if stop is None else max(0, min(int(stop), self.size))
        self._unit, self._depth = int(unit), max(1, int(depth))
        self._pos = 0
        self._origin: int | None = None  # where block 0 starts: the first position read
        self._blocks: dict = {}  # block index -> Future[bytes]
        self._pool = ThreadPoolExecutor(max_workers=self._depth, thread_name_prefix="bigopt-readahead")

    # -- the file protocol the readers use
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        self._pos = max(0, base + int(offset))
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self.size - self._pos))
        if self._origin is None:
            self._origin = self._pos  # blocks start where reading starts, not at multiples of unit
        done = 0
        while done < n:
            at = self._pos + done
            if at < self._origin or at >= self._stop:  # outside the read-ahead window: on demand
                want = n - done if at >= self._stop else min(n - done, self._origin - at)
                data, off = self._f.read_at(want, at), 0
            else:
                k, off = divmod(at - self._origin, self._unit)
                data = self._ahead(k).result()
            take = min(n - done, len(data) - off)
            if take <= 0:
                raise OSError(f"short read at byte {at}: the object changed while being read")
            view[done:done + take] = memoryview(data)[off:off + take]
            done += take
        self._pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self._pos)
        buf = bytearray(left if n is None or n < 0 else min(n, left))
        self.readinto(buf)
        return bytes(buf)

    def close(self) -> None:
        for fut in self._blocks.values():
            fut.cancel()
        self._pool.shutdown(wait=True)  # requests in flight finish before the file closes
        self._blocks.clear()
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- read-ahead
    def _fetch(self, k: int):
        start = self._origin + k * self._unit
        return self._pool.submit(self._f.read_at, min(self._unit, self._stop - start), start)

    def _ahead(self, k: int):
        """Block ``k``'s future; keeps the block before it (the line reader seeks back a line),
        drops older ones and starts the next ``depth``."""
        for old in [j for j in self._blocks if j < k - 1]:
            self._blocks.pop(old).cancel()
        last = min(k + self._depth, (self._stop - 1 - self._origin) // self._unit)
        for j in range(k, last + 1):
            if j not in self._blocks:
                self._blocks[j] = self._fetch(j)
        return self._blocks[k]
