"""Path/URI handling shared by the lake writer and the Spark-free reader.

Tables are addressed by a local path or any URI pyarrow understands (``s3://``, ``hdfs://``,
``gs://``, ``file://``). Local paths are made absolute so that Spark tasks (other processes,
possibly other working directories) and delta-rs agree on where the table is.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import lru_cache
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from pipelines.errors import UnwritableError


def normalize_uri(path: str | os.PathLike) -> str:
    """A local path made absolute (its characters literal: ``a%20b`` is a folder of that name),
    a ``file://`` URI turned into its local path (percent-decoded, RFC 8089: what
    ``Path.as_uri()`` writes, ``file:///data/sp%20ace``, is ``/data/sp ace``), any other URI as
    it is, its key literal (see :func:`path_in_filesystem`)."""
    s = os.fspath(path)
    if "://" in s:
        if s[:7].lower() == "file://":
            return _file_uri_path(s)
        return s.rstrip("/")
    return os.path.abspath(os.path.expanduser(s)).rstrip("/") or "/"


def _file_uri_path(uri: str) -> str:
    """``file:///a/b%20c`` (or ``file://localhost/...``) -> ``/a/b c``. ``#`` and ``?`` stay
    characters of the path: taken for a fragment or a query they would name another file."""
    host, sep, path = uri[len("file://"):].partition("/")
    if host and host.lower() != "localhost":
        raise ValueError(f"{uri!r}: a file:// URI names a file of this machine (file:///path); "
                         f"{host!r} is read as a host")
    return os.path.abspath(unquote(sep + path)).rstrip("/") or "/"


_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def check_table_path(uri: str) -> str:
    """``uri`` (normalized), or ValueError where delta-rs cannot keep a table: a local path with
    a ``%XX`` sequence (``a%20b``), which delta-rs decodes (to ``a b``), so its log and its files
    would be looked for in another folder. A ``file://`` URI is decoded first (to its local
    path, :func:`normalize_uri`), so ``file:///data/a%20b`` is the folder ``a b`` and is fine,
    and the escape for a real ``%20``, ``file:///data/a%2520b``, is the refused path ``a%20b``
    (delta-rs has no spelling of it)."""
    uri = normalize_uri(uri)
    if m := _PERCENT_ESCAPE.search(uri if is_local(uri) else _split(uri)[2]):
        where = "a local path" if is_local(uri) else "an object's key"
        raise ValueError(f"a Delta table cannot live under {uri!r}: delta-rs reads the {m.group()!r} in {where} "
                         "as an escaped character; choose a path without '%' followed by two hex digits")
    return uri


def delta_uri(uri: str) -> str:
    """What delta-rs is given for table ``uri``: :func:`normalize_uri`'s, with a remote key's
    ``#`` and ``?`` escaped (``%23``, ``%3F``, which delta-rs decodes) and pyarrow's options
    (:func:`_split_options`) left out (delta-rs takes its own from storage options and the
    environment). delta-rs parses a remote URI as a URL, so a ``#`` or ``?`` in the key ended
    it: a table under ``s3://b/runs#2/`` had its log written under ``s3://b/runs``, its files
    (pyarrow's, literal) under ``runs#2``. A local path delta-rs converts itself."""
    uri = normalize_uri(uri)
    if is_local(uri):
        return uri
    scheme, rest = _split_options(uri)[0].split("://", 1)
    return f"{scheme}://{rest.replace('#', '%23').replace('?', '%3F')}"


def is_local(uri: str) -> bool:
    return "://" not in uri


# schemes whose pyarrow path is "<bucket>/<key>" rather than the URI's path
_BUCKET_SCHEMES = {"s3", "s3a", "s3n", "gs", "gcs"}
_AZURE_SCHEMES = {"abfs", "abfss", "az", "adl", "azure"}
_HADOOP_S3 = {"s3a", "s3n"}  # Hadoop's names for S3, which pyarrow does not know


def _split(uri: str) -> tuple[str, str, str]:
    """(scheme in lower case, authority, the rest from its ``/``) of a URI, the rest as written."""
    scheme, rest = uri.split("://", 1)
    authority, slash, path = rest.partition("/")
    return scheme.lower(), authority, slash + path


# The names pyarrow's FileSystem.from_uri takes from an object store URI's query (pyarrow 25's
# S3Options / GcsOptions / AzureOptions::FromUri; an unknown one is an error there). Other
# schemes (hdfs://, where any name is a Hadoop setting) take any name=value.
_S3_OPTIONS = frozenset({"region", "scheme", "endpoint_override", "allow_bucket_creation", "allow_bucket_deletion",
                         "tls_ca_file_path", "tls_verify_certificates", "allow_delayed_open"})
_URI_OPTIONS = {
    **dict.fromkeys(("s3", "s3a", "s3n"), _S3_OPTIONS),
    **dict.fromkeys(("gs", "gcs"), frozenset({"scheme", "endpoint_override", "retry_limit_seconds", "project_id"})),
    **dict.fromkeys(("abfs", "abfss", "az", "adl", "azure"), frozenset({
        "blob_storage_authority", "dfs_storage_authority", "enable_tls", "credential_kind", "tenant_id",
        "client_id", "client_secret", "background_writes"})),
}
_OPTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=[^&/]*")


def _split_options(uri: str) -> tuple[str, str]:
    """(``uri`` without its query, the query: options for ``FileSystem.from_uri``, or ''). An
    object's key may hold ``?`` (and a glob does: ``s3://b/criteo/*/day_?.gz``), so only a last
    ``?`` followed by ``name=value`` pairs, each an option pyarrow knows for the store
    (``s3://b/k?region=eu-west-1``), begins a query; any other ``?`` is a character of the key."""
    base, sep, query = uri.rpartition("?")
    if not sep or not all(_OPTION.fullmatch(o) for o in query.split("&")):
        return uri, ""
    known = _URI_OPTIONS.get(uri.split("://", 1)[0].lower())
    if known is not None and any(o.partition("=")[0] not in known for o in query.split("&")):
        return uri, ""
    return base, query


def path_in_filesystem(uri: str) -> str:
    """A file's URI -> the path its pyarrow filesystem takes (``s3://b/k`` -> ``b/k``,
    ``hdfs://nn:8020/a/b`` -> ``/a/b``; a local path stays as it is). The path is the URI's text
    after the authority as written: an object's key may hold ``#`` (until the twentieth session
    it was cut there as a URL's fragment, so ``s3://b/day_12#v2`` was read from ``b/day_12``)
    and ``?``; only pyarrow's options (:func:`_split_options`) are no part of it."""
    if "://" not in uri:
        return uri
    if uri[:7].lower() == "file://":
        return _file_uri_path(uri)
    scheme, authority, path = _split(_split_options(uri)[0])
    if scheme in _BUCKET_SCHEMES:
        return authority.rpartition("@")[2] + path  # s3://key:secret@bucket/k -> bucket/k
    if scheme in _AZURE_SCHEMES:
        return authority.partition("@")[0] + path  # abfs://container@account.../k -> container/k
    return path  # hdfs://namenode:8020/a/b -> /a/b


def filesystem_for(uri: str, storage_options: Mapping[str, str] | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a table or file URI.

    Local paths use the local filesystem. ``s3://`` (and Hadoop's ``s3a://``, ``s3n://``) with
    delta-rs style ``storage_options`` (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``) gets an
    ``S3FileSystem`` with the credentials delta-rs uses for the log; anything else goes to
    ``pyarrow.fs.FileSystem.from_uri`` (hdfs://, gs://, s3:// with the environment's
    credentials, ...).

    One filesystem per process serves every URI of a bucket (or host) with the same options:
    ``from_uri`` on ``s3://`` asks S3 for the bucket's region (a HeadBucket request) and builds
    a new client each time, and the pipeline opens one URI per raw or bronze file. A URI ending
    in options for ``from_uri`` (``s3://b/k?region=...``, :func:`_split_options`) gets the
    filesystem of its bucket and options, which they configure (``storage_options`` unused)."""
    uri = normalize_uri(uri)
    if is_local(uri):
        return _LOCAL, uri
    opts = tuple(sorted((k, str(v)) for k, v in (storage_options or {}).items() if v not in (None, "")))
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme in _HADOOP_S3:
        scheme, uri = "s3", f"s3://{rest}"
    base, query = _split_options(uri)
    return _filesystem_of(scheme, _split(base)[1], opts, query), path_in_filesystem(base).rstrip("/")


_LOCAL = pafs.LocalFileSystem()


@lru_cache(maxsize=64)
def _filesystem_of(scheme: str, authority: str, options: tuple[tuple[str, str], ...],
                   query: str = "") -> pafs.FileSystem:
    if query:  # from_uri's own options; the path is ours, as written
        return pafs.FileSystem.from_uri(f"{scheme}://{authority}/?{query}")[0]
    if scheme == "s3" and options:
        return _s3_filesystem(dict(options))
    return pafs.FileSystem.from_uri(f"{scheme}://{authority}/")[0]


def _opt(options: Mapping[str, str], *names: str) -> str | None:
    lower = {k.lower(): v for k, v in options.items()}
    for n in names:
        if n in lower and lower[n] not in (None, ""):
            return str(lower[n])
    return None


def _s3_filesystem(opts: Mapping[str, str]) -> pafs.S3FileSystem:
    """An ``S3FileSystem`` from delta-rs style storage options (names case-insensitive)."""
    kw: dict = {}
    if (ak := _opt(opts, "aws_access_key_id", "access_key_id")) is not None:
        kw["access_key"] = ak
        kw["secret_key"] = _opt(opts, "aws_secret_access_key", "secret_access_key")
    if (tok := _opt(opts, "aws_session_token", "session_token", "aws_token", "token")) is not None:
        kw["session_token"] = tok
    if (region := _opt(opts, "aws_region", "region", "aws_default_region")) is not None:
        kw["region"] = region
    endpoint = _opt(opts, "aws_endpoint_url", "aws_endpoint", "endpoint_url", "endpoint")
    if endpoint is not None:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kw["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kw["scheme"] = parsed.scheme
    if (_opt(opts, "aws_allow_http", "allow_http") or "").lower() == "true" and "scheme" not in kw:
        kw["scheme"] = "http"
    return pafs.S3FileSystem(**kw)


def join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel.lstrip('/')}"


def file_uri(table_uri: str, rel: str) -> str:
    """Absolute location of a table-relative data file path (as stored in the Delta log)."""
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


def check_writable(uri: str) -> None:
    """Raise :class:`UnwritableError` (a ``PermissionError``) naming ``uri`` when a file cannot be created there (a lake
    root that is a file, a read-only folder or bucket). Called by jobs before they start Spark:
    found by the tasks instead, it surfaced as hundreds of lines of Java and Python traces."""
    import uuid

    fs, root = filesystem_for(uri)
    probe = join(root, f"_bigopt_write_check_{uuid.uuid4().hex}")
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe):
            pass
        fs.delete_file(probe)
    except OSError as e:
        raise UnwritableError(f"cannot write to {uri}: {e}") from e
