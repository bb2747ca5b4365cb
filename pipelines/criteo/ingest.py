"""Raw Criteo files -> bronze Delta table, with a quarantine table and an ingest ledger.

    report = ingest(spark, cfg)                 # new files only
    report = ingest(spark, cfg, force=True)     # re-ingest: replaces those files' rows

Inputs are local paths or object-store URIs (:mod:`pipelines.raw_inputs`: files, globs,
directories; tasks read their byte ranges straight from the store). Per group of
``ingest.files_per_commit`` files, ONE Spark job:

1. **Plan** (driver): each plain file is split into byte ranges of ``ingest.chunk_bytes`` (a
   line belongs to the range holding its first byte); a gzip file is one range. One task per
   range, plus, with ``ingest.verify``, one task per split file computing its sha256 (a file
   read by a single task is hashed on the way).
2. **Parse** (tasks): the range is read in blocks of complete lines (gzip inflated member by
   member; a truncated or corrupt gzip fails that file alone, naming it) and parsed by
   :func:`pipelines.criteo.parse.parse_block`: a compiled one-pass scanner (vectorised and
   per-line tiers for odd blocks), so the rows never pass through JVM rows or Python
   objects. Short rows (stripped trailing TABs) are padded; unlabelled files (39 fields, may
   start with a TAB) get a null label; a bad line gets the reason of its first problem.
3. **Write** (tasks): good rows to bronze Parquet files, bad lines (raw line, reason) to
   quarantine files; then the driver commits each table as ONE Delta transaction replacing
   the group's ``source`` partitions (``replace_where``), so a re-run never duplicates a
   file's rows. Nothing of a file found corrupt, or more than ``ingest.max_rejected_share``
   of whose lines are bad (not Criteo's raw format), is committed (its tasks' files are
   deleted, its earlier rows stay); if a task fails otherwise, nothing of the job is committed.
4. **Account**: per file, rows_ok + rows_rejected from the commits' file statistics must equal
   the lines the tasks read (and the tasks' own counts), else :class:`IngestError` and no
   ledger entry.
5. **Ledger**: one row per file (path, size, mtime, quick hash of the first/last MiB, sha256,
   counts, batch id, table versions), appended last. The ledger is the commit point: a file is
   ingested when its ledger row exists; ``featurize`` refuses bronze rows the ledger does not
   confirm (left by a run that died between steps 3 and 5); the next ingest compares bronze
   with the ledger per source and replaces them.

The pieces it is made of, each in its own module: what an input file is
(:mod:`pipelines.criteo.raw_files`: described and checked before any Spark job), reading its
lines (:mod:`pipelines.criteo.raw_lines`), parsing them (:mod:`pipelines.criteo.parse`), and
the three tables it writes, with what their logs say per source
(:mod:`pipelines.criteo.bronze`). This module plans the run against the ledger (skip, replace,
duplicate, drop), runs the tasks and commits.

Why not Spark SQL (``spark.read.text`` + ``from_csv``): it was the first implementation, and
on 1 M rows it spent ~14 s where these tasks spend about 2 (docs/criteo.md, "Why Arrow in
the tasks and not Spark SQL"):
each line became a JVM row, then a Python-bound Arrow batch for the Delta writer.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipelines import raw_inputs
from pipelines.criteo.bronze import (
    BRONZE_SCHEMA,
    BRONZE_STATS_COLUMNS,
    LEDGER_SCHEMA,
    PARTITION_BY,
    QUARANTINE_SCHEMA,
    QUARANTINE_STATS_COLUMNS,
    bronze_sources,
    current_entries,
    in_flight,
    read_ledger,
    rows_by_source,
    unconfirmed_sources,
)
from pipelines.criteo.parse import EMPTY_LINE
from pipelines.criteo.raw_files import GZIP_MIN_BYTES, RawFile, describe_files, unreadable_as_named
from pipelines.criteo.raw_lines import GONE, ReadFailure, file_sha256, gone_reason, iter_line_blocks
from pipelines.criteo.schema import tables
from pipelines.errors import MissingInputError

log = logging.getLogger(__name__)

_QUARANTINE_ROWS = pa.schema([f for f in QUARANTINE_SCHEMA if f.name not in PARTITION_BY])
# task cost estimates relative to parsing one plain byte (ordering only): gzip inflates ~4x;
# sha256 of a byte costs ~1/10 of parsing it
_GZIP_EXPANSION = 4
_HASH_COST = 0.1


class IngestError(RuntimeError):
    """The ingest could not account for every line; nothing was recorded in the ledger."""


class CorruptInputError(IngestError):
    """One or more input files cannot be ingested (a truncated or corrupt gzip, a name that
    contradicts the content, a format such as zstd or UTF-16 that ingest does not read, more
    than ``criteo.ingest.max_rejected_share`` of its lines bad); nothing was committed for
    them. Found before any Spark job (names, formats): nothing was committed at all. Found
    while reading (a damaged gzip, the bad lines): the run's other files were ingested, and
    ``report`` is the run's :class:`IngestReport` (the bad files with status ``failed``)."""

    def __init__(self, problems: list[tuple[str, str]], report: IngestReport | None = None):
        self.problems, self.report = problems, report
        lines = "\n  ".join(f"{p}: {why}" for p, why in problems)
        done = report.ingested if report is not None else 0
        what = (f"nothing was committed for them; the run's {done} other file(s) were ingested"
                if done else "nothing was committed")
        super().__init__(f"{len(problems)} input file(s) cannot be ingested, {what}:\n  {lines}")


@dataclass
class FileResult:
    path: str
    source: str
    day: int
    labeled: bool
    size: int
    status: str  # ingested | replaced | skipped | duplicate | failed (unreadable: nothing committed for it)
    lines: int = 0
    rows_ok: int = 0
    rows_rejected: int = 0
    sha256: str | None = None
    note: str = ""
    reasons: dict[str, int] = field(default_factory=dict)  # quarantined lines per reason


@dataclass
class IngestReport:
    batch_id: str
    files: list[FileResult] = field(default_factory=list)
    bronze: str = ""
    quarantine: str = ""
    ledger: str = ""
    bronze_version: int | None = None  # the version this run committed; None: nothing committed
    quarantine_version: int | None = None  # the same: a run of clean files commits none
    ledger_version: int | None = None
    seconds: float = 0.0
    # bronze sources no ledger entry confirms, of files not among this run's inputs: why, and
    # the remedy (featurize refuses bronze until they are ingested again or dropped)
    unconfirmed: dict[str, str] = field(default_factory=dict)
    # of those, the ones an ingest committed moments ago (criteo.ingest.in_flight_s) and may
    # still be recording in the ledger: source -> (its batch, seconds ago, bronze version); never dropped
    in_flight: dict[str, tuple[str, float, int]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # such sources whose rows this run deleted
    # of them, files the ledger has: bronze no longer held the rows their entries confirm (the
    # unconfirmed ones replaced them), so they were dropped from the ledger too
    forgotten: list[str] = field(default_factory=list)
    # ledger sources not among this run's inputs whose files are gone (renamed, re-delivered
    # under another name, deleted): source -> its current ledger entry. Bronze still holds
    # their rows: where another file now has them, they are there twice
    gone: dict[str, dict] = field(default_factory=dict)
    # --drop-source names whose drop the ledger records already (source -> that batch): a
    # repeated drop (a retried task) has nothing to do
    already_dropped: dict[str, str] = field(default_factory=dict)
    # generated (synthetic) sources in bronze beside real ones: folder -> its sources, where
    # bronze (with this run) holds files of folders with a generate manifest and of folders
    # without (a lake of an earlier `make demo` under conf/criteo.yaml's tables)
    synthetic: dict[str, list[str]] = field(default_factory=dict)

    def _done(self) -> list[FileResult]:
        return [f for f in self.files if f.status in ("ingested", "replaced")]

    @property
    def rows_in(self) -> int:
        return sum(f.lines for f in self._done())

    @property
    def rows_ok(self) -> int:
        return sum(f.rows_ok for f in self._done())

    @property
    def rows_rejected(self) -> int:
        return sum(f.rows_rejected for f in self._done())

    @property
    def reasons(self) -> dict[str, int]:
        """Lines this run quarantined, per reason, most first."""
        total: Counter[str] = Counter()
        for f in self._done():
            total.update(f.reasons)
        return dict(total.most_common())

    @property
    def ingested(self) -> int:
        return len(self._done())

    @property
    def skipped(self) -> int:
        return sum(f.status in ("skipped", "duplicate") for f in self.files)

    @property
    def failed(self) -> int:
        return sum(f.status == "failed" for f in self.files)

    def summary(self) -> str:
        """One line for logs and ``bigopt run``."""
        return (
            f"{self.ingested} file(s) ingested, {self.skipped} skipped; rows_in {self.rows_in:,} = "
            f"ok {self.rows_ok:,} + rejected {self.rows_rejected:,}; bronze "
            + ("unchanged" if self.bronze_version is None else f"v{self.bronze_version}")
            + (f"; dropped the rows of {', '.join(self.dropped)}" if self.dropped else "")
            + (f"; bronze still holds the rows of {len(self.gone)} file(s) that are gone ({', '.join(sorted(self.gone))}:"
               " `bigopt ingest --drop-source NAME` drops them)" if self.gone else "")
        )


# ---------------------------------------------------------------- plan (against the ledger)
def _unconfirmed_elsewhere(unconfirmed: dict[str, str], files: list[RawFile],
                           current: dict[str, dict]) -> dict[str, str]:
    """The unconfirmed sources (:func:`unconfirmed_sources`) of files not among ``files``, each
    with why and the remedy: ingest its file again, or drop rows no ledger entry names."""
    inputs = {f.source for f in files}
    out = {}
    for src, why in unconfirmed.items():
        if src in inputs:
            continue
        led = current.get(src)
        fix = (f"ingest {led['path']} again (--input), or drop the file: its rows and its ledger entry "
               "(--drop-unconfirmed)" if led else "ingest its file again (--input), or drop them (--drop-unconfirmed)")
        out[src] = f"{why}: {fix}"
    return out


def _drop_sources(paths: dict, sources: list[str], forget: list[dict], chash: str, batch_id: str,
                  compression: str, why: str = "dropped_unconfirmed") -> dict[str, int]:
    """Delete ``sources``' rows from bronze and the quarantine (one commit each where it holds
    any; no Spark), then append a ledger row recording the drop of each file of ``forget``
    (current ledger entries of some of ``sources``), after which :func:`current_entries` has
    none for it; the versions committed. Appended, not deleted: featurize of a bronze version
    from before the drop still finds the entries that confirm its rows."""
    from pipelines.lake import table_exists, table_version
    from pipelines.lake.tasks import write_arrow

    info = {"job": "ingest", "config_hash": chash, "ingest_batch": batch_id,
            why: ",".join(sources)[:2000]}
    versions, at = {}, {}  # the versions committed; each table's version once they are gone
    for name, schema in (("bronze", BRONZE_SCHEMA), ("quarantine", QUARANTINE_SCHEMA)):
        if not table_exists(paths[name]):
            continue
        if rows_by_source(paths[name], None, sources):  # at its latest version
            versions[name] = write_arrow(paths[name], schema.empty_table(), mode="overwrite", partition_by=PARTITION_BY,
                                         replace_where={"source": sources}, commit_info=info, compression=compression)
        at[name] = versions[name] if name in versions else table_version(paths[name])
    if forget:
        now = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
        rows = [{**r, "size": None, "mtime_ns": None, "quick_hash": None, "sha256": None, "lines": 0, "rows_ok": 0,
                 "rows_rejected": 0, "ingest_batch": batch_id, "bronze_version": at.get("bronze"),
                 "quarantine_version": at.get("quarantine"), "forced": False, "ingested_at": now,
                 "config_hash": chash} for r in forget]
        versions["ledger"] = write_arrow(paths["ledger"], pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA),
                                         mode="append", commit_info=info, compression=compression)
    return versions


def _same_bytes(f: RawFile, twin: dict, hashes: dict[str, str]) -> str | None:
    """Whether ``f`` holds the same bytes as ``twin`` (a ledger row, or a file of this run),
    which has its size and quick hash (first and last MiB): None if it does not, else how that
    was established. Only then is each file read whole, on the driver (sha256 at ~1 GB/s;
    ``hashes``: path -> sha256 computed so far): rare, as two files rarely agree on both
    unless they are copies."""
    if f.path not in hashes:
        try:
            hashes[f.path] = file_sha256(f.path)
        except GONE:  # removed since it was listed: its task reports it, alone
            return None
    theirs = twin.get("sha256") or hashes.get(twin["path"])
    if not theirs:
        try:
            theirs = hashes[twin["path"]] = file_sha256(twin["path"])
        except OSError:  # the other file is gone and the ledger has no full hash (verify was off)
            return "same size, first and last MiB (the whole could not be compared)"
    return "same content" if hashes[f.path] == theirs else None


def _uncompressed_name(source: str) -> str:
    return source[:-3] if source.endswith(".gz") else source


def _synthetic_beside_real(held: Mapping[str, str], files: list[RawFile]) -> dict[str, list[str]]:
    """Folder -> sources, of the sources (ledger ``held``: source -> path, and this run's
    ``files``) in local folders with a generate manifest, when others come from folders
    without one: synthetic rows about to share bronze and gold with real ones. Empty when
    all are of one kind."""
    import os

    from pipelines.criteo.generate import MANIFEST

    by_dir: dict[str, list[str]] = {}
    for src, path in [*held.items(), *((f.source, f.path) for f in files)]:
        if "://" in path and not path.startswith("file://"):
            continue  # object stores: no manifest is looked for
        by_dir.setdefault(os.path.dirname(path.removeprefix("file://")), []).append(src)
    made = {d: sorted(set(srcs)) for d, srcs in by_dir.items() if os.path.exists(os.path.join(d, MANIFEST))}
    return made if made and len(made) < len(by_dir) else {}


def _check_drops(drop: Sequence[str], files: list[RawFile], held: set[str], dropped: Mapping[str, str]) -> None:
    """``bigopt ingest --drop-source``: each name must be a source bronze or the ledger has,
    or one whose drop the ledger records (``dropped``: nothing to do), and not one of this
    run's inputs (whose rows it would ingest again)."""
    inputs = {f.source: f.path for f in files}
    problems = [f"{s} is among the inputs ({inputs[s]}): move the file away first, or re-ingest it with --force"
                for s in drop if s in inputs]
    if unknown := [s for s in drop if s not in inputs and s not in held and s not in dropped]:
        problems.append(f"bronze and the ledger hold no source named {', '.join(unknown)} (sources are file names, "
                        f"e.g. {', '.join(sorted(held)[:4]) or 'none yet'})")
    if problems:
        raise IngestError("--drop-source: " + "; ".join(problems) + "; nothing dropped or ingested")


def _plan(files: list[RawFile], current: dict[str, dict], force: bool,
          unconfirmed: dict[str, str] | None = None,
          max_share: float = 1.0) -> tuple[list[RawFile], list[FileResult], dict[str, str]]:
    """(files to ingest, results of the files skipped, a note per file to ingest that replaces
    rows of an earlier batch: why). A file the ledger has as ingested is ingested again when its
    source is in ``unconfirmed`` (:func:`unconfirmed_sources`). A skipped file the ledger has
    with more than ``max_share`` of its lines quarantined (ingested before the share was
    checked) is skipped with a warning and the remedy."""
    todo: list[RawFile] = []
    results: list[FileResult] = []
    notes: dict[str, str] = {}
    unconfirmed = unconfirmed or {}
    hashes: dict[str, str] = {}
    by_content: dict[tuple, list[dict]] = {}  # (size, quick hash) -> files with them, ingested or of this run
    for r in current.values():
        by_content.setdefault((r["size"], r["quick_hash"]), []).append(r)
    # a file and its gzip'd copy (day_0, day_0.gz side by side after `gzip -k`) differ in
    # bytes, so only their names can tell: the same name apart from .gz is taken for a copy
    by_name = {_uncompressed_name(src): r for src, r in current.items()}
    for f in files:
        prev = current.get(f.source)
        same = prev is not None and (prev["path"], prev["size"], prev["mtime_ns"], prev["quick_hash"]) == (
            f.path, f.size, f.mtime_ns, f.quick_hash)
        # a gzip too short to hold a member (0 or 1 bytes: a copy in progress) fails alone when
        # read, so it is a copy of nothing: until the twentieth session an empty .gz was the
        # "duplicate" of any empty file ingested before (same size and hash), and reported so
        truncated = f.gzip and f.size < GZIP_MIN_BYTES
        twin, same_as = None, None
        for other in by_content.get((f.size, f.quick_hash), []) if prev is None and not force and not truncated else []:
            if (same_as := _same_bytes(f, other, hashes)) is not None:
                twin = other
                break
        namesake = by_name.get(_uncompressed_name(f.source))
        replaces_unconfirmed = f"bronze rows unconfirmed ({unconfirmed[f.source]}): replaced" if (
            f.source in unconfirmed) else None
        if same and not force and replaces_unconfirmed:
            log.warning("%s: bronze and the ledger disagree (%s): replacing its rows", f.path, unconfirmed[f.source])
            notes[f.source] = replaces_unconfirmed
            todo.append(f)
        elif same and not force:
            note = f"already ingested in batch {prev['ingest_batch']}"
            lines, rejected = prev["lines"] or 0, prev["rows_rejected"] or 0
            # every line quarantined: ingested before max_rejected_share was checked (the ledger
            # has no reasons, so a file with a few good lines among many empty ones is not named)
            if not prev["rows_ok"] and rejected > max_share * lines:
                note += (f", with every one of its {lines:,} lines quarantined (over "
                         f"criteo.ingest.max_rejected_share={max_share:g}): `bigopt quarantine --source {f.source}` "
                         "says why; fix the file and ingest it again with --force")
                log.warning("%s: %s", f.path, note)
            results.append(FileResult(f.path, f.source, f.day, f.labeled, f.size, "skipped",
                                      prev["lines"], prev["rows_ok"], prev["rows_rejected"], prev["sha256"], note))
        elif same_as is not None:
            results.append(FileResult(f.path, f.source, f.day, f.labeled, f.size, "duplicate",
                                      note=f"{same_as} as {twin['path']} ({twin.get('when', 'already ingested')}); "
                                           "--force to ingest"))
        elif prev is None and namesake is not None and not force and not truncated:
            results.append(FileResult(f.path, f.source, f.day, f.labeled, f.size, "duplicate",
                                      note=f"same name apart from .gz as {namesake['path']} "
                                           f"({namesake.get('when', 'already ingested')}): taken for a compressed "
                                           "copy; --force to ingest it as a file of its own"))
        else:
            if prev is None and replaces_unconfirmed:  # rows of a run that died before its ledger entry
                notes[f.source] = replaces_unconfirmed
            elif prev is not None and not same:
                log.warning("%s: changed since it was ingested (or another file named %s was): replacing its rows",
                            f.path, f.source)
                what = "size" if prev["size"] != f.size else "path" if prev["path"] != f.path else "content or mtime"
                notes[f.source] = f"{what} changed since batch {prev['ingest_batch']}"
            elif prev is not None:
                notes[f.source] = f"--force: rows of batch {prev['ingest_batch']} replaced"
            todo.append(f)
            if not truncated:  # nothing of it lands: no file is its copy
                here = {"path": f.path, "when": "ingested in this run"}
                by_content.setdefault((f.size, f.quick_hash), []).append(here)
                by_name.setdefault(_uncompressed_name(f.source), here)
    return todo, results, notes


# ------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Chunk:
    """One Spark task's share of a raw file: the lines starting in [start, end)."""

    path: str
    source: str
    day: int
    labeled: bool
    gzip: bool
    start: int = 0
    end: int | None = None
    hash_file: bool = False  # the range is the whole file: compute its sha256 on the way


def plan_chunks(files: Sequence[RawFile], chunk_bytes: int, verify: bool) -> list[tuple[str, object]]:
    """Task items: ("chunk", Chunk) per byte range (gzip files: one per file), plus ("hash",
    path) for plain files split into several ranges when ``verify`` asks for their sha256."""
    items: list[tuple[float, int, tuple[str, object]]] = []  # (estimated cost, order, item)
    for f in files:
        if f.gzip or f.size <= chunk_bytes:
            cost = f.size * (_GZIP_EXPANSION if f.gzip else 1)
            # a plain file's one range ends at its listed size: a file that shrank since is found
            items.append((cost, len(items), ("chunk", Chunk(f.path, f.source, f.day, f.labeled, f.gzip, 0,
                                                            None if f.gzip else f.size, hash_file=verify))))
            continue
        for s in range(0, f.size, chunk_bytes):
            e = min(s + chunk_bytes, f.size)
            items.append((e - s, len(items), ("chunk", Chunk(f.path, f.source, f.day, f.labeled, False, s, e))))
        if verify:
            items.append((f.size * _HASH_COST, len(items), ("hash", f.path)))
    # longest first: Spark starts tasks in partition order, so short ones fill the tail
    return [it for _, _, it in sorted(items, key=lambda x: (-x[0], x[1]))]


def constant_strings(value: str, n: int) -> pa.Array:
    """``n`` copies of ``value`` as an Arrow string array, built from buffers (no Python list)."""
    data = value.encode()
    offsets = np.arange(0, (n + 1) * len(data), len(data) or 1, dtype=np.int32)[: n + 1] if data else \
        np.zeros(n + 1, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data * n))


def _rejects_batch(rejects: list, preview: int, batch_id: str) -> pa.Table:
    """The quarantine rows of ``rejects``, without the partition columns (the task passes the
    chunk's (day, source) to the writer, as for bronze rows)."""
    lines, raw_bytes = [], []
    for raw, _, _ in rejects:  # the exact bytes too where the text is not the whole line
        try:
            text = raw.decode("utf-8")
            raw_bytes.append(raw if len(text) > preview else None)
        except UnicodeDecodeError:
            text = raw.decode("utf-8", "replace")
            raw_bytes.append(raw)
        lines.append(text[:preview])
    return pa.table({
        "line": pa.array(lines, pa.string()), "line_bytes": pa.array(raw_bytes, pa.binary()),
        "reason": pa.array([r for _, r, _ in rejects], pa.string()),
        "num_fields": pa.array([k for _, _, k in rejects], pa.int32()),
        "ingest_batch": constant_strings(batch_id, len(rejects)),
    }, schema=_QUARANTINE_ROWS)


def run_item(item: tuple[str, object], bronze_tw, quarantine_tw, batch_id: str, preview: int,
             block_bytes: int) -> dict:
    """One Spark task: parse a chunk into bronze/quarantine Parquet files (or hash a file).

    A corrupt input is a result (``kind: corrupt``), not a task failure: Spark would retry a
    failed task (``spark.task.maxFailures``: 4 reads of a bad file on a cluster) and print
    each attempt's traceback, and the job would stop at the first bad file where the driver
    can name every one."""
    kind, what = item
    if kind == "hash":
        try:
            return {"kind": "hash", "path": what, "sha256": file_sha256(what)}
        except GONE as e:
            return {"kind": "corrupt", "path": what, "reason": gone_reason(e)}
    from pipelines.criteo.parse import parse_block

    c: Chunk = what  # type: ignore[assignment]
    hasher = hashlib.sha256() if c.hash_file else None
    bw, qw = bronze_tw.open(), quarantine_tw.open()
    lines = ok = rejected = 0
    reasons: Counter[str] = Counter()
    first_reject: bytes | None = None  # the chunk's first bad line: an example, if its file is mostly bad
    try:
        for block in iter_line_blocks(c.path, c.gzip, c.start, c.end, block_bytes, hasher):
            n = block.count(b"\n")
            rows, rejects = parse_block(block, c.labeled, n)
            if rows.num_rows + len(rejects) != n:  # parse_block's contract; never expected
                raise IngestError(f"{c.path}: {n} lines parsed into {rows.num_rows} rows + {len(rejects)} rejects")
            lines, ok, rejected = lines + n, ok + rows.num_rows, rejected + len(rejects)
            # one partition per chunk (day, source): the writer needs no per-row grouping
            rows = rows.append_column("ingest_batch", constant_strings(batch_id, rows.num_rows))
            for b in rows.to_batches():
                bw.write(b, (c.day, c.source))
            if rejects:
                reasons.update(reason for _, reason, _ in rejects)
                if first_reject is None:  # an example of what is wrong: an empty line shows nothing
                    first_reject = next((bytes(raw[:preview]) for raw, why, _ in rejects if why != EMPTY_LINE), None)
                for b in _rejects_batch(rejects, preview, batch_id).to_batches():
                    qw.write(b, (c.day, c.source))
        return {"kind": "chunk", "path": c.path, "start": c.start, "lines": lines, "ok": ok,
                "rejected": rejected, "reasons": dict(reasons), "first_reject": first_reject,
                "bronze": bw.close(), "quarantine": qw.close(),
                "sha256": hasher.hexdigest() if hasher is not None else None}
    except ReadFailure as e:
        bw.discard()
        qw.discard()
        return {"kind": "corrupt", "path": e.path, "reason": e.why}
    except BaseException:
        bw.discard()
        qw.discard()
        raise


# ------------------------------------------------------------------------------ writing
def _new_batch_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("b%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def _commit_group(spark, group: list[RawFile], paths: dict, batch_id: str, info: dict, ing,
                  compression: str) -> tuple[dict, list[tuple[str, str]], int | None, int | None, int | None,
                                             dict[str, int]]:
    """One Spark job for ``group``: tasks parse their chunks into bronze and quarantine files;
    the driver then commits bronze and quarantine, each as ONE transaction replacing the
    ``source`` partitions of the group's readable files. A file found unreadable (a damaged
    gzip) gets nothing committed: its chunks' files are deleted and its partitions are left
    as they were. Returns (per-file results of the group's files, those of the files not
    committed too (a mostly-bad file's counts), the files not committed as ``(path, why)``, bronze version, quarantine version (None where nothing was committed),
    the quarantine version holding the readable files' rejects (the one read where nothing was
    committed: it has none of theirs), the quarantine's rows per readable source there, from
    the log)."""
    from pipelines.lake.tasks import UncommittedWrites, abort_write, begin_write, commit_writes, discard_adds
    from pipelines.stopping import cancel_jobs_if_stopping

    sources = [f.source for f in group]

    def plan(path: str, schema: pa.Schema, stats_columns: list[str] | None = None):
        # replacing the sources' partitions, also where the table is new: two runs racing to
        # create it then conflict, as on an existing table, instead of both adding their rows
        return begin_write(path, schema, mode="overwrite", replace_where={"source": sources},
                           partition_by=PARTITION_BY, row_group_rows=ing.row_group_rows, stats_columns=stats_columns,
                           compression=compression)

    # a failed task, an error, or Ctrl-C / SIGTERM anywhere up to the commits: nothing of the batch stays
    with UncommittedWrites(on_error=functools.partial(cancel_jobs_if_stopping, spark.sparkContext)) as writes:
        btw = writes.add(plan(paths["bronze"], BRONZE_SCHEMA, BRONZE_STATS_COLUMNS))
        qtw = writes.add(plan(paths["quarantine"], QUARANTINE_SCHEMA, QUARANTINE_STATS_COLUMNS))
        items = plan_chunks(group, ing.chunk_bytes, ing.verify)
        preview, block_bytes = ing.max_line_preview, ing.block_bytes
        results = (
            spark.sparkContext.parallelize(items, len(items))
            .map(lambda it: run_item(it, btw, qtw, batch_id, preview, block_bytes))
            .collect()
        )
        per_file = _per_file(group, results)
        bad = sorted({(r["path"], r["reason"]) for r in results if r["kind"] == "corrupt"}
                     | set(mostly_rejected(per_file, ing.max_rejected_share)))
        unreadable = {p for p, _ in bad}
        good = [f for f in group if f.path not in unreadable]
        if not good:
            abort_write(btw)
            abort_write(qtw)
            return per_file, bad, None, None, None, {}
        dropped = [r for r in results if r["path"] in unreadable and r["kind"] == "chunk"]
        for tw, table in ((btw, "bronze"), (qtw, "quarantine")):  # a bad file's other chunks: nothing of it
            discard_adds(tw, [a for r in dropped for a in r[table]])
        results = [r for r in results if r["path"] not in unreadable]
        chunks = [r for r in results if r["kind"] == "chunk"]
        sources = [f.source for f in good]
        # leave a bad file's partitions (rows of an earlier batch) as they are
        btw.replace_where = qtw.replace_where = {"source": sources}
        b_adds, q_adds = ([a for r in chunks for a in r[table]] for table in ("bronze", "quarantine"))
        if q_adds or qtw.read_version is None or rows_by_source(qtw.uri, qtw.read_version, sources):
            bv, qv = commit_writes([(btw, b_adds, info), (qtw, q_adds, info)])
            rejected = rows_by_source(qtw.uri, qv, sources)
        else:  # no rejects, none to replace: a commit would only add an empty version to the quarantine
            abort_write(qtw)
            (bv,) = commit_writes([(btw, b_adds, info)])
            qv, rejected = None, {}
    return per_file, bad, bv, qv, qtw.read_version if qv is None else qv, rejected


def _per_file(group: list[RawFile], results: list[dict]) -> dict[str, dict]:
    """The tasks' results summed per file: lines, ok, rejected, sha256, reasons, and the
    first rejected line of its earliest chunk that has one (``first_reject``)."""
    per_file: dict[str, dict] = {f.path: {"lines": 0, "ok": 0, "rejected": 0, "sha256": None, "reasons": Counter(),
                                          "first_reject": None} for f in group}
    for r in sorted(results, key=lambda r: r.get("start", 0)):
        d = per_file.get(r["path"])
        if d is None:
            continue
        if r.get("sha256"):
            d["sha256"] = r["sha256"]
        if r["kind"] == "chunk":
            d["lines"] += r["lines"]
            d["ok"] += r["ok"]
            d["rejected"] += r["rejected"]
            d["reasons"].update(r["reasons"])
            if d["first_reject"] is None:
                d["first_reject"] = r["first_reject"]
    return per_file


def _parsed_counts(d: dict | None) -> dict:
    """A failed file's FileResult counts from its tasks' results (none where it was not read)."""
    if not d or not d["lines"]:
        return {}
    return {"lines": d["lines"], "rows_ok": d["ok"], "rows_rejected": d["rejected"],
            "reasons": dict(d["reasons"].most_common())}


def mostly_rejected(per_file: Mapping[str, dict], max_share: float) -> list[tuple[str, str]]:
    """``(path, why)`` of each file more than ``max_share`` of whose lines (empty ones aside) were rejected: not
    Criteo's raw format, or not the format its name says (a TAB ending every line, CR line
    ends, UTF-16 without a byte order mark), which quarantining every line and recording the
    file as ingested lost without an error (a re-run then skipped it). Nothing of such a file
    is committed."""
    from pipelines.criteo.raw_files import too_many_rejected, why_mostly_rejected

    return [(p, why_mostly_rejected(d["lines"], d["rejected"], d["reasons"], d["first_reject"], max_share))
            for p, d in per_file.items() if too_many_rejected(d["lines"], d["rejected"], d["reasons"], max_share)]


def _commit_failed(e: OSError, n_files: int, stays: list[tuple[str, int | None]], paths: dict,
                   ingested_before: int) -> IngestError:
    """The error for a commit (or a driver-side write) of a group of ``n_files`` files that
    failed for a reason outside the data (``e``, a :class:`~pipelines.lake.commit.TableWriteError`:
    a log that cannot be written, a full disk):
    which table and why, what stays committed (``stays``: Delta has no transaction across
    tables), and what a re-run does. Rows in bronze without their ledger entries are
    unconfirmed: featurize refuses them and the next ingest of their files replaces them
    (:func:`_plan`), so running the same command again is the remedy, whatever failed."""
    names = {paths[t]: t for t in ("bronze", "quarantine", "ledger")}
    if stays:
        what = " and ".join(names.get(t, t) + ("" if v is None else f" v{v}") for t, v in stays)
        held = (f"{what} {'stays' if len(stays) == 1 else 'stay'} committed with the rows of the {n_files} file(s) being ingested, which no ledger "
                "entry confirms (featurize refuses them)")
        again = "it ingests those files again, replacing their rows"
    else:
        held, again = f"nothing of the {n_files} file(s) being ingested was committed", "it ingests them"
    before = f" (the run's {ingested_before} file(s) before them were ingested)" if ingested_before else ""
    return IngestError(f"{e}; {held}{before}: run the same command again once that is fixed: {again}")


def ingest(
    spark,
    cfg,
    force: bool = False,
    inputs: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    drop_unconfirmed: bool = False,
    drop_sources: Sequence[str] = (),
    drop_unknown_ok: bool = True,
) -> IngestReport:
    """Ingest the configured inputs (``cfg.criteo.inputs``, default ``cfg.criteo.raw_dir``).
    ``spark``: a SparkSession, or a callable that starts one, called only when a file needs
    ingesting (:func:`pipelines.spark.session_of`).

    Bronze rows no ledger entry confirms (a run that died between its bronze commit and its
    ledger entry) are replaced when their file is among the inputs; of other files they are
    listed in ``report.unconfirmed``, or, with ``drop_unconfirmed``, deleted from bronze and
    the quarantine (``report.dropped``); a file whose ledger entry's rows they replaced is
    dropped from the ledger too (``report.forgotten``).

    ``drop_sources``: sources (file names) whose rows and ledger entries go, when they are not
    among the inputs: the files a generate with other settings removed (``bigopt run``), whose
    rows featurize would otherwise still take from bronze; ``bigopt ingest --drop-source``:
    a file replaced by one of another name). ``drop_unknown_ok=False``: a source among the
    inputs, or one neither bronze nor the ledger has, is an :class:`IngestError` before
    anything runs.

    ``report.gone``: the ledger's sources not among the inputs whose files no longer exist."""
    from jobs.config import config_hash
    from pipelines.lake import DeltaSnapshot, table_exists
    from pipelines.lake.commit import TableWriteError
    from pipelines.lake.fs import check_writable
    from pipelines.lake.tasks import write_arrow
    from pipelines.spark import session_of

    t0 = time.time()
    say = progress or (lambda msg: log.info(msg))
    ing = cfg.criteo.ingest
    paths = tables(cfg)
    chash = config_hash(cfg)
    batch_id = _new_batch_id()
    report = IngestReport(batch_id, bronze=paths["bronze"], quarantine=paths["quarantine"], ledger=paths["ledger"])

    try:
        names = raw_inputs.resolve(list(inputs) if inputs else cfg.criteo.input_specs(), ing.file_globs,
                                   ing.exclude_globs)
    except MissingInputError as e:  # the config's inputs: say where they come from
        if inputs:
            raise
        where = ("criteo.inputs; conf/criteo.yaml takes it from CRITEO_DIR" if cfg.criteo.inputs else
                 "criteo.raw_dir; conf/demo.yaml's is $BIGOPT_DATA/criteo/raw, where `bigopt generate criteo` writes")
        raise MissingInputError(f"{e} ({where}; --input names others)") from None
    say(f"describing {len(names)} input file(s)")
    files = describe_files(names, cfg)
    # counted, not compared pairwise: that was n² on the driver, 42 s for 20,000 files
    dupes = sorted(name for name, n in Counter(f.source for f in files).items() if n > 1)
    if dupes:
        raise IngestError(f"several inputs share the file name(s) {dupes}; the name is the bronze `source` key")
    if misnamed := [(f.path, why) for f in files if (why := unreadable_as_named(f))]:
        raise CorruptInputError(misnamed)
    ledger_rows = read_ledger(paths["ledger"])
    current = current_entries(ledger_rows)
    # bronze's sources from its log, read once: what the ledger does not confirm, and what a drop may name
    bronze = table_exists(paths["bronze"])
    per_source = bronze_sources(DeltaSnapshot(paths["bronze"])) if bronze else {}
    unconfirmed = unconfirmed_sources(per_source, current) if bronze else {}
    held = per_source if drop_sources else {}
    was_dropped = {r["source"]: r["ingest_batch"] for r in sorted(ledger_rows, key=lambda r: r["ingested_at"])
                   if r["size"] is None and r["source"] not in current}
    if drop_sources and not drop_unknown_ok:
        _check_drops(drop_sources, files, set(held) | set(current), was_dropped)
    report.already_dropped = {s: was_dropped[s] for s in drop_sources
                              if s in was_dropped and s not in held and s not in {f.source for f in files}}
    # a source being dropped is no file's earlier copy: a day renamed, its old name dropped in
    # the same run, is ingested under the new one without --force
    todo, report.files, notes = _plan(files, {s: r for s, r in current.items() if s not in drop_sources}, force,
                                      unconfirmed, max_share=ing.max_rejected_share)
    named = {f.source for f in files} | set(drop_sources)
    others = {s: r for s, r in current.items() if s not in named}
    missing = raw_inputs.gone([r["path"] for r in others.values()])  # a listing per folder, not a request per file
    report.gone = {s: r for s, r in others.items() if r["path"] in missing}
    report.synthetic = _synthetic_beside_real({s: r["path"] for s, r in current.items() if s not in drop_sources},
                                              files)
    report.unconfirmed = _unconfirmed_elsewhere(unconfirmed, files, current)
    # rows committed moments ago by an ingest that has not written its ledger entries yet look
    # like an interrupted one's: left alone (until the twenty-fifth session a --drop-unconfirmed
    # in that gap deleted a running ingest's rows, and the ingest reported success)
    report.in_flight = in_flight(paths["bronze"], per_source, report.unconfirmed, ing.in_flight_s)
    report.unconfirmed = {s: why for s, why in report.unconfirmed.items() if s not in report.in_flight}
    if drop_unconfirmed and (drop := sorted(report.unconfirmed)):
        say(f"dropping the unconfirmed bronze rows of {len(drop)} source(s)")
        # a file the ledger has: bronze no longer holds the rows its entry confirms (the
        # interrupted ingest replaced the file's whole partition), so nothing of it is left
        # and its entry must go too. Taking those rows back from an older bronze version is no
        # remedy: a vacuum may have deleted them, and of a changed file they are stale
        forget = [current[s] for s in drop if s in current]
        versions = _drop_sources(paths, drop, forget, chash, batch_id, cfg.lake.compression)
        report.bronze_version, report.quarantine_version, report.ledger_version = (
            versions.get(t) for t in ("bronze", "quarantine", "ledger"))
        report.dropped, report.forgotten, report.unconfirmed = drop, [r["source"] for r in forget], {}
    if gone := sorted((set(drop_sources) & (set(held) | set(current))) - {f.source for f in files}):
        say(f"dropping the bronze and quarantine rows and the ledger entries of {len(gone)} source(s): "
            f"{', '.join(gone)}")
        forget = [current[s] for s in gone if s in current]
        versions = _drop_sources(paths, gone, forget, chash, batch_id, cfg.lake.compression, why="dropped_stale")
        for t in ("bronze", "quarantine", "ledger"):
            if t in versions:
                setattr(report, f"{t}_version", versions[t])
        report.dropped = sorted({*report.dropped, *gone})
    if not todo:
        report.seconds = time.time() - t0
        return report

    for name in ("bronze", "quarantine", "ledger"):  # before Spark: a task would fail obscurely
        check_writable(paths[name])
    spark = session_of(spark)
    problems: list[tuple[str, str]] = []
    for g0 in range(0, len(todo), ing.files_per_commit):
        group = todo[g0:g0 + ing.files_per_commit]
        sources = [f.source for f in group]
        info = {"job": "ingest", "config_hash": chash, "ingest_batch": batch_id, "files": ",".join(sources)[:2000]}
        size = sum(f.size for f in group)
        say(f"parsing {len(group)} file(s) ({size / 1e6:,.0f} MB) -> bronze + quarantine")
        try:
            per_file, bad, bv, qv, q_at, rej = _commit_group(spark, group, paths, batch_id, info, ing,
                                                             cfg.lake.compression)
        except TableWriteError as e:
            raise _commit_failed(e, len(group), e.stays, paths, report.ingested) from e
        problems += bad
        failed = {p for p, _ in bad}
        # a file whose lines were parsed (mostly bad) shows its counts; nothing of it was committed
        report.files += [FileResult(f.path, f.source, f.day, f.labeled, f.size, "failed",
                                    **_parsed_counts(per_file.get(f.path)), note=why)
                         for f in group for p, why in bad if p == f.path]
        group = [f for f in group if f.path not in failed]
        if not group:
            continue
        sources = [f.source for f in group]
        ok = rows_by_source(paths["bronze"], bv, sources)
        now = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
        ledger_rows, group_results = [], []
        for f in group:
            n_ok, n_rej = ok.get(f.source, 0), rej.get(f.source, 0)
            lines, sha = per_file[f.path]["lines"], per_file[f.path]["sha256"]
            if n_ok + n_rej != lines or (n_ok, n_rej) != (per_file[f.path]["ok"], per_file[f.path]["rejected"]):
                raise IngestError(
                    f"{f.path}: {lines} lines in the file but {n_ok} rows in bronze + {n_rej} quarantined; "
                    "no ledger entry written (bronze rows of this file are unconfirmed; re-run ingest)"
                )
            status = "replaced" if f.source in current else "ingested"
            group_results.append(FileResult(f.path, f.source, f.day, f.labeled, f.size, status, lines, n_ok, n_rej, sha,
                                            notes.get(f.source, ""),
                                            reasons=dict(per_file[f.path]["reasons"].most_common())))
            ledger_rows.append(dict(
                source=f.source, path=f.path, day=f.day, labeled=f.labeled, gzip=f.gzip, size=f.size,
                mtime_ns=f.mtime_ns, quick_hash=f.quick_hash, sha256=sha, lines=lines,
                rows_ok=n_ok, rows_rejected=n_rej, ingest_batch=batch_id, bronze_version=bv,
                quarantine_version=q_at, forced=bool(force), ingested_at=now, config_hash=chash,
            ))
        say(f"recording {len(group)} file(s) in the ledger")
        try:
            lv = write_arrow(paths["ledger"], pa.Table.from_pylist(ledger_rows, schema=LEDGER_SCHEMA), mode="append",
                             commit_info={"job": "ingest", "config_hash": chash, "ingest_batch": batch_id},
                             compression=cfg.lake.compression)
        except TableWriteError as e:
            if e.landed:  # the entries are in the ledger's log: the files are ingested, as the error says
                raise
            stays = [(paths["bronze"], bv), *([(paths["quarantine"], qv)] if qv is not None else [])]
            raise _commit_failed(e, len(group), stays, paths, report.ingested) from e
        # a --drop-unconfirmed or --drop-source of another process that took these rows between
        # the bronze commit and the ledger entry (one that ignored criteo.ingest.in_flight_s)
        now_rows = rows_by_source(paths["bronze"], None, sources)
        if lost := [f.source for f in group if ok.get(f.source, 0) and not now_rows.get(f.source, 0)]:
            raise IngestError(
                f"bronze no longer holds the rows of {', '.join(lost)}: another process dropped them after this "
                f"ingest committed them (bronze v{bv}) and before it recorded them in the ledger (v{lv}); the ledger "
                "now names rows bronze lacks, so featurize refuses bronze: run the same ingest again, which "
                "replaces them")
        report.files += group_results
        report.bronze_version, report.ledger_version = bv, lv
        if qv is not None:  # an earlier group's (or the drop's) commit stays the one reported
            report.quarantine_version = qv
    report.seconds = time.time() - t0
    order = {f.path: i for i, f in enumerate(files)}
    report.files.sort(key=lambda r: order[r.path])  # as the inputs were named
    if problems:
        raise CorruptInputError(problems, report)
    return report
