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
   file's rows. Nothing of a file found corrupt is committed (its tasks' files are deleted,
   its earlier rows stay); if a task fails otherwise, nothing of the job is committed.
4. **Account**: per file, rows_ok + rows_rejected from the commits' file statistics must equal
   the lines the tasks read (and the tasks' own counts), else :class:`IngestError` and no
   ledger entry.
5. **Ledger**: one row per file (path, size, mtime, quick hash of the first/last MiB, sha256,
   counts, batch id, table versions), appended last. The ledger is the commit point: a file is
   ingested when its ledger row exists; ``featurize`` refuses bronze rows the ledger does not
   confirm (left by a run that died between steps 3 and 5); the next ingest compares bronze
   with the ledger per source and replaces them.

Why not Spark SQL (``spark.read.text`` + ``from_csv``): it was the first implementation, and
on 1 M rows it spent ~14 s where these tasks spend about 2 (docs/criteo.md, "Why Arrow in
the tasks and not Spark SQL"):
each line became a JVM row, then a Python-bound Arrow batch for the Delta writer.
"""
from __future__ import annotations

import datetime as _dt
import fnmatch
import functools
import hashlib
import logging
import re
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipelines import raw_inputs
from pipelines.criteo.parse import ROW_SCHEMA
from pipelines.criteo.schema import DENSE, LABELED_FIELDS, SPARSE, UNLABELED_FIELDS, tables

log = logging.getLogger(__name__)

PARTITION_BY = ["day", "source"]
BRONZE_DDL = (
    "label int, "
    + ", ".join(f"{c} bigint" for c in DENSE)
    + ", "
    + ", ".join(f"{c} string" for c in SPARSE)
    + ", ingest_batch string, day int, source string"
)
QUARANTINE_DDL = (
    "line string, line_bytes binary, reason string, num_fields int, ingest_batch string, day int, source string"
)
LEDGER_DDL = (
    "source string, path string, day int, labeled boolean, gzip boolean, size bigint, mtime_ns bigint, "
    "quick_hash string, sha256 string, lines bigint, rows_ok bigint, rows_rejected bigint, "
    "ingest_batch string, bronze_version bigint, quarantine_version bigint, forced boolean, "
    "ingested_at timestamp, config_hash string"
)
# Parquet statistics (and so Delta min/max) only where a reader can use them: min/max of
# random 8-hex categoricals skip nothing, and computing them cost 15% of the bronze write
# (0.08 of 0.56 CPU-s per 128 MiB chunk). ingest_batch's are how featurize checks bronze
# against the ledger: it is column 41, past the 32 whose statistics Delta readers parse by
# default, so the table declares these (delta.dataSkippingStatsColumns).
BRONZE_STATS_COLUMNS = ["label", *DENSE, "ingest_batch"]
_BATCH_FIELDS = [pa.field("ingest_batch", pa.string()), pa.field("day", pa.int32()), pa.field("source", pa.string())]
BRONZE_SCHEMA = pa.schema(list(ROW_SCHEMA) + _BATCH_FIELDS)  # = BRONZE_DDL (tested)
LEDGER_SCHEMA = pa.schema(  # = LEDGER_DDL (tested)
    [pa.field(n, t) for n, t in [
        ("source", pa.string()), ("path", pa.string()), ("day", pa.int32()), ("labeled", pa.bool_()),
        ("gzip", pa.bool_()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("quick_hash", pa.string()),
        ("sha256", pa.string()), ("lines", pa.int64()), ("rows_ok", pa.int64()), ("rows_rejected", pa.int64()),
        ("ingest_batch", pa.string()), ("bronze_version", pa.int64()), ("quarantine_version", pa.int64()),
        ("forced", pa.bool_()), ("ingested_at", pa.timestamp("us", tz="UTC")), ("config_hash", pa.string()),
    ]]
)
QUARANTINE_SCHEMA = pa.schema(
    [pa.field("line", pa.string()), pa.field("line_bytes", pa.binary()), pa.field("reason", pa.string()),
     pa.field("num_fields", pa.int32()), *_BATCH_FIELDS]
)
# the raw line (up to max_line_preview characters, past Parquet's statistics size) and its
# bytes get no bound a reader could use: declared without them, a reader knows there is none
# (delta-rs's pyarrow path skipped a file for any filter on a column it had no bound for)
QUARANTINE_STATS_COLUMNS = ["reason", "num_fields", "ingest_batch"]
_QUARANTINE_ROWS = pa.schema([f for f in QUARANTINE_SCHEMA if f.name not in PARTITION_BY])
_BLOCK = 4 << 20
_QUICK = 1 << 20
_TAIL = 64 << 10  # bytes read past a range's end for its last line (more if that line is longer)
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_MIN_BYTES = 20  # the smallest gzip member: 10 bytes of header, an empty block, 8 of trailer
# formats a raw file is sometimes stored in that ingest does not read: their magic bytes, so
# such a file fails up front instead of being "ingested" as lines of undecodable bytes
_FOREIGN_MAGIC = {
    b"\x28\xb5\x2f\xfd": "zstd-compressed", b"BZh": "bzip2-compressed", b"\xfd7zXZ\x00": "xz-compressed",
    b"\x04\x22\x4d\x18": "lz4-compressed", b"PK\x03\x04": "a zip archive", b"7z\xbc\xaf\x27\x1c": "a 7z archive",
    b"PAR1": "a Parquet file",
    # text in another encoding (Windows tools' "Unicode" is UTF-16): its byte order mark. Every
    # line would be quarantined as undecodable and the file then ledgered. UTF-32 LE's mark
    # starts with UTF-16 LE's, so it comes first
    b"\xff\xfe\x00\x00": "UTF-32 text", b"\x00\x00\xfe\xff": "UTF-32 text",
    b"\xff\xfe": "UTF-16 text", b"\xfe\xff": "UTF-16 text",
}
# task cost estimates relative to parsing one plain byte (ordering only): gzip inflates ~4x;
# sha256 of a byte costs ~1/10 of parsing it
_GZIP_EXPANSION = 4
_HASH_COST = 0.1


try:  # ISA-L's inflate: 2.6x less CPU than zlib's for gzip'd day files (docs/criteo.md)
    from isal import isal_zlib as _inflate_lib
except ImportError:  # pragma: no cover (a platform without its wheels): zlib, same results
    _inflate_lib = zlib


class IngestError(RuntimeError):
    """The ingest could not account for every line; nothing was recorded in the ledger."""


class CorruptInputError(IngestError):
    """One or more input files cannot be read (a truncated or corrupt gzip, a name that
    contradicts the content, a format such as zstd or UTF-16 that ingest does not read);
    nothing was committed for them. Found before any Spark job (names, formats): nothing was
    committed at all. Found while reading (a damaged gzip): the run's other files were ingested, and
    ``report`` is the run's :class:`IngestReport` (the bad files with status ``failed``)."""

    def __init__(self, problems: list[tuple[str, str]], report: IngestReport | None = None):
        self.problems, self.report = problems, report
        lines = "\n  ".join(f"{p}: {why}" for p, why in problems)
        done = report.ingested if report is not None else 0
        what = (f"nothing was committed for them; the run's {done} other file(s) were ingested"
                if done else "nothing was committed")
        super().__init__(f"{len(problems)} input file(s) cannot be ingested, {what}:\n  {lines}")


@dataclass
class RawFile:
    path: str
    source: str
    day: int
    labeled: bool
    gzip: bool
    size: int
    mtime_ns: int
    quick_hash: str
    foreign: str | None = None  # e.g. "zstd-compressed", "UTF-16 text": a format ingest does not read
    label_conflict: str | None = None  # its first lines contradict the kind its name gives it
    name_problem: str | None = None  # its name gives no usable day or `source` partition


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


# ------------------------------------------------------------------------------ inputs
def _quick_hash(size: int, head: bytes, f) -> str:
    """sha256 of the size, the first MiB (``head``: the file's first min(size, 1 MiB) bytes)
    and the last MiB (read from ``f``), truncated to 32 hex digits."""
    h = hashlib.sha256(str(size).encode())
    h.update(head)
    if size > 2 * _QUICK:
        f.seek(size - _QUICK)
        h.update(f.read(_QUICK))
    elif size > _QUICK:
        f.seek(_QUICK)
        h.update(f.read())
    return h.hexdigest()[:32]


def _inflate_head(head: bytes, limit: int) -> bytes:
    """Up to ``limit`` bytes inflated from ``head``, the first bytes of a gzip file, across its
    members (an empty first member, as ``cat empty.gz day.gz`` makes, hides nothing); what
    cannot be inflated ends it."""
    out: list[bytes] = []
    n = 0
    while head and n < limit:
        d = zlib.decompressobj(47)
        try:
            piece = d.decompress(head, limit - n)
        except zlib.error:
            break
        out.append(piece)
        n += len(piece)
        if not d.eof:
            break
        head = d.unused_data.lstrip(b"\0")
    return b"".join(out)


_HEAD_TEXT = 64 << 10  # bytes of a file's first lines checked against its name


def _first_lines(text: bytes) -> list[bytes]:
    lines = text[:_HEAD_TEXT].split(b"\n")
    return lines[:-1] if len(lines) > 1 else lines


_ROW_START = re.compile(rb"\s*-?[0-9]*\s*(\t|$)")  # a label, an integer or an empty field first


def _labeled(name: str, unlabeled_globs: Sequence[str]) -> bool:
    """Labelled (40 fields) unless the name matches ``unlabeled_globs`` (a test file: 39 fields,
    no label). The name decides, never a line: a stray line (one TAB too many in a test file, a
    labelled row whose empty C26 was stripped) must not turn every row of its file into a row
    shifted by one column."""
    return not any(fnmatch.fnmatch(name, g) for g in unlabeled_globs)


def _label_conflict(lines: list[bytes], labeled: bool, unlabeled_globs: Sequence[str]) -> str | None:
    """Why the first lines say the name got the file's kind wrong, or None. Only a clear
    majority of them counts (and at least 3): a few bad lines are quarantined, not a verdict.
    Trailing TABs may have been stripped, so a labelled row can have 38-40 fields and a test
    row 37-39: what tells them apart is a 0/1 label first on every labelled row."""
    lines = [ln for ln in lines if ln.strip()]
    if lines and lines[0].startswith(_BOM):
        lines[0] = lines[0][len(_BOM):]
    n = len(lines)
    # not rows at all (a readme.txt beside train.txt): no kind fits, so say that. A short line
    # is a row whose empty trailing fields were stripped when it starts with a label or an
    # integer (I1); one that starts with words is text
    text = sum(ln.count(b"\t") + 1 < 14 and not _ROW_START.match(ln) for ln in lines)
    if text >= 3 and 2 * text > n:
        return (f"{text} of its first {n} lines are text, not rows: fewer than 14 fields (a Criteo row has 37-40) and "
                "no number first; it does not look like a raw Criteo file: leave it out of the inputs "
                "(criteo.ingest.file_globs / exclude_globs, or name the files)")
    firsts = [ln.split(b"\t", 1)[0].strip() for ln in lines]
    if labeled:  # at most 39 fields and a first field that is no label: rows of a test file
        odd = sum(ln.count(b"\t") + 1 <= UNLABELED_FIELDS and f not in (b"0", b"1") for ln, f in zip(lines, firsts))
        why = (f"its name matches no criteo.ingest.unlabeled_globs {list(unlabeled_globs)}, so it is read as "
               f"labelled, but {odd} of its first {n} lines have at most 39 fields and no 0/1 label first, as "
               "in a test file; add a glob matching its name to criteo.ingest.unlabeled_globs")
        return why if odd >= 3 and 2 * odd > n else None
    # 40 fields: rows with a label. In a labelled file whose trailing TABs were stripped only
    # some lines keep 40, but (nearly) every line starts with 0/1; I1, first in a test row, is
    # missing or another number in most lines
    odd = sum(ln.count(b"\t") + 1 == LABELED_FIELDS for ln in lines)
    labels = sum(f in (b"0", b"1") for f in firsts)
    why = (f"its name matches criteo.ingest.unlabeled_globs {list(unlabeled_globs)}, so it is read as a test "
           f"file (39 fields, no label), but {odd} of its first {n} lines have 40 fields"
           + (f" and {labels} start with a 0/1 label" if 2 * odd <= n else "")
           + ", as in a labelled file; rename it or change criteo.ingest.unlabeled_globs")
    return why if odd >= 3 and (2 * odd > n or 10 * labels >= 9 * n) else None


def describe_file(path: str, cfg) -> RawFile:
    """Size, mtime, gzip or not, labelled or not, quick hash: one open of the file (on an
    object store: one metadata request and two or three ranged reads)."""
    ing = cfg.criteo.ingest
    size, mtime_ns = raw_inputs.stat(path)
    with raw_inputs.open_read(path) as f:
        head = f.read(_QUICK)
        quick = _quick_hash(size, head, f)
    name = raw_inputs.basename(path)
    # a .gz of 0 or 1 bytes (a copy in progress) is a truncated gzip: it fails alone when read
    gz = head[:2] == _GZIP_MAGIC or (name.endswith(".gz") and _GZIP_MAGIC.startswith(head))
    day, name_problem = _day_of(name, ing.day_regex)
    text = _inflate_head(head, _HEAD_TEXT) if gz else head  # no more than the checks read
    foreign = next((what for magic, what in _FOREIGN_MAGIC.items() if head.startswith(magic)), None)
    if gz and not foreign:  # compressed twice (a download's double Content-Encoding), or gzip of a zstd file...
        inner = {_GZIP_MAGIC: "gzip-compressed twice", **{m: f"{w}, then gzip'd" for m, w in _FOREIGN_MAGIC.items()}}
        foreign = next((what for magic, what in inner.items() if text.startswith(magic)), None)
    labeled = _labeled(name, ing.unlabeled_globs)
    conflict = None if foreign else _label_conflict(_first_lines(text), labeled, ing.unlabeled_globs)
    return RawFile(path, name, day, labeled, gz, size, mtime_ns, quick, foreign, conflict, name_problem)


def _day_of(name: str, day_regex: str) -> tuple[int, str | None]:
    """(day number from the name, -1 without a match; why the name cannot be ingested, or None:
    it must be a bronze partition, ``day`` within its column's type and ``source`` a folder)."""
    from pipelines.lake.files import MAX_DIR_NAME, int_range, partition_dir

    folder = partition_dir(["source"], (name,))
    if len(folder.encode()) > MAX_DIR_NAME:
        return -1, (f"its name is too long for bronze's `source` partition folder ({len(folder.encode())} bytes "
                    f"once escaped, at most {MAX_DIR_NAME}): rename it")
    m = re.search(day_regex, name)
    if not m:
        return -1, None
    digits = m.group(1)
    if not re.fullmatch(r"[0-9]+", digits or ""):
        return -1, (f"criteo.ingest.day_regex {day_regex!r} takes {digits!r} from its name as the day, which is "
                    "not a number: change the setting")
    if int(digits) > (top := int_range(BRONZE_SCHEMA.field("day").type)[1]):
        return -1, f"its day number {digits} is past bronze's `day` column (at most {top:,}): rename it"
    return int(digits), None


def _unreadable_as_named(f: RawFile) -> str | None:
    """Why ingest cannot read ``f`` (its content against its name), or None."""
    if f.name_problem:
        return f.name_problem
    if f.foreign and f.foreign.startswith("UTF-"):
        enc = f.foreign.split()[0]
        return (f"{f.foreign} (by its byte order mark): ingest reads UTF-8; convert it to UTF-8 "
                f"(iconv -f {enc} -t UTF-8)")
    if f.foreign:
        return (f"{f.foreign}, not lines of text: ingest reads plain or gzip'd files (decompress it, "
                "or recompress it with gzip)")
    if f.gzip and not f.path.endswith(".gz"):
        return "gzip content but the name does not end in .gz"
    if not f.gzip and f.path.endswith(".gz"):
        return "named .gz but not gzip content"
    return f.label_conflict


def describe_files(paths: Sequence[str], cfg) -> list[RawFile]:
    """:func:`describe_file` of each path, in order; remote files in parallel (each costs a few
    round trips)."""
    if not any(raw_inputs.is_remote(p) for p in paths) or len(paths) < 2:
        return [describe_file(p, cfg) for p in paths]
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as ex:
        return list(ex.map(lambda p: describe_file(p, cfg), paths))


# ------------------------------------------------------------------------------ reading
_BOM = b"\xef\xbb\xbf"


class _Corrupt(Exception):
    """An unreadable input file, found while reading it. A task returns it as a result
    (:func:`run_item`) and the driver raises :class:`CorruptInputError`."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


def _read_plain(f, start: int, end: int | None, block_bytes: int, hasher) -> Iterator[bytearray]:
    """Blocks of the complete lines that START in [start, end) (a line belongs to the range
    holding its first byte, so adjacent ranges split a file without loss or overlap); the file's
    last line may lack its newline.

    Each block is read straight into a new ``bytearray`` and cut after its last newline; the
    partial line after the cut is read again with the next block (a seek back), so the bytes
    are copied once, by the read. A line longer than ``block_bytes`` grows its block."""
    if start > 0:
        f.seek(start - 1)
        pos = start - 1
        while True:  # skip the partial line that began before the range
            piece = f.read(1 << 16)
            if not piece:
                return
            cut = piece.find(b"\n")
            if cut >= 0:
                pos += cut + 1
                break
            pos += len(piece)
        if end is not None and pos >= end:
            return  # no line starts in this range
        f.seek(pos)
    else:
        pos = 0
    size, tail = block_bytes, _TAIL
    while end is None or pos < end:
        # near `end`, read only what the range's last line needs (it ends within `tail` bytes
        # past end, or the read is repeated with more): a full block there was up to
        # block_bytes read for nothing, on an object store a transfer
        want = size if end is None else min(size, end - pos + tail)
        block = bytearray(want)
        n = f.readinto(block)
        if n < want:
            del block[n:]
        if not n:
            return
        # the last line starting before `end` ends at the first newline at or after end - 1
        cut = block.find(b"\n", end - 1 - pos) if end is not None and pos + n >= end else block.rfind(b"\n")
        if cut < 0:
            if n == want:  # no newline where one was due: a very long line, read more of it
                f.seek(pos)
                size, tail = size * 2, tail * 2
                continue
            cut = n - 1  # the file's last line has no final newline (iter_line_blocks adds it)
        elif cut + 1 < n:
            del block[cut + 1:]
            f.seek(pos + cut + 1)
        if hasher is not None:
            hasher.update(memoryview(block)[: cut + 1])
        pos += cut + 1
        size, tail = block_bytes, _TAIL
        yield block


def _read_gzip(f, path: str, block_bytes: int, hasher) -> Iterator[bytes]:
    """Blocks of complete lines of a (multi-member) gzip file (the last line may lack its
    newline); a truncated or corrupt file raises :class:`_Corrupt` naming it (whatever was
    yielded before is then discarded).

    Memory is bounded by ``block_bytes`` whatever the compression ratio: each inflate call
    returns at most ``block_bytes`` (a 2 MB file of one repeated line inflates to 600 MB).
    ISA-L inflates; where it refuses a file, zlib reads it again from the start and decides
    (ISA-L 1.9 fails on a valid member header with a header CRC, FHCRC, split across two reads,
    and names a wrong length "incorrect checksum"): the bytes already yielded are skipped and
    the sha256 continues where it was, so the result is the same lines and hash."""
    state = {"emitted": 0, "hashed": 0}  # bytes of lines yielded, stored bytes fed to `hasher`
    libs = [_inflate_lib] if _inflate_lib is zlib else [_inflate_lib, zlib]
    for i, lib in enumerate(libs):
        try:
            yield from _inflate_lines(f, lib, block_bytes, hasher, state)
            return
        except (zlib.error, lib.error) as e:
            if i + 1 < len(libs):
                log.info("%s: %s refused it (%s); reading it again with zlib", path, lib.__name__, e)
                f.seek(0)
                continue
            raise _Corrupt(path, f"inflate error: {e}") from None
        except _BadGzip as e:
            raise _Corrupt(path, str(e)) from None


class _BadGzip(Exception):
    """A gzip file's structure is wrong whatever inflates it (truncated, trailing garbage)."""


def _inflate_lines(f, lib, block_bytes: int, hasher, state: dict) -> Iterator[bytes]:
    """:func:`_read_gzip`'s work with one inflate library, skipping the first
    ``state["emitted"]`` bytes of lines and hashing only stored bytes past ``state["hashed"]``.
    Inflated pieces are kept as they come and joined once per block: one copy of each byte,
    where appending them to a growing ``bytes`` and slicing it copied each byte about three
    times (reading 256 MiB of lines: 0.37 CPU-s against 0.46, of which ISA-L's inflate is
    0.30)."""
    d = lib.decompressobj(47)
    pos = 0  # stored bytes read
    member_bytes = 0
    between = False  # after a member's end: zero padding (tape blocks, as gzip and zcat accept) or a member
    pieces: list[bytes] = []  # inflated bytes not yielded yet, in order
    held = 0
    skip = state["emitted"]
    while True:
        raw = f.read(_BLOCK)
        if not raw:
            break
        if hasher is not None and pos + len(raw) > state["hashed"]:
            hasher.update(memoryview(raw)[max(0, state["hashed"] - pos):])
            state["hashed"] = pos + len(raw)
        pos += len(raw)
        data, more = raw, False  # more: the last call filled its output and may hold more
        while data or more:
            if between:
                data = data.lstrip(b"\0")
                if not data:
                    break
                if not data.startswith(_GZIP_MAGIC[: len(data)]):
                    raise _BadGzip("trailing garbage after the last gzip member")
                between = False
            out = d.decompress(data, block_bytes)
            member_bytes += len(data) - len(d.unconsumed_tail) - len(d.unused_data)
            more = len(out) == block_bytes and not d.eof
            if skip and out:
                dropped = min(skip, len(out))
                out, skip = out[dropped:], skip - dropped
            if out:
                pieces.append(out)
                held += len(out)
            if d.eof:
                data = d.unused_data
                d = lib.decompressobj(47)
                member_bytes, between, more = 0, True, False
            else:
                data = d.unconsumed_tail
            if held >= block_bytes:
                last = pieces[-1]
                cut = last.rfind(b"\n")
                if cut >= 0:  # else wait for a piece with a newline
                    block = b"".join([*pieces[:-1], memoryview(last)[: cut + 1]])
                    rest = last[cut + 1:]
                    pieces, held = ([rest], len(rest)) if rest else ([], 0)
                    state["emitted"] += len(block)
                    yield block
    if member_bytes or pos == 0:
        raise _BadGzip("truncated gzip: the file ends inside a compressed member" if pos else
                       "an empty file named .gz: no gzip member (a copy still in progress?)")
    if held:
        block = b"".join(pieces)
        state["emitted"] += len(block)
        yield block  # without a final newline if the file has none (iter_line_blocks adds it)


def iter_line_blocks(path: str, gz: bool, start: int = 0, end: int | None = None,
                     block_bytes: int = 32 << 20, hasher=None) -> Iterator[bytes]:
    """Blocks of complete lines (each ending in a newline, one added to a last line that has
    none) of a raw file: for plain files, the lines starting in the byte range [start, end);
    gzip files are read whole; a UTF-8 byte order mark at the file's start is dropped.
    ``hasher`` (e.g. ``hashlib.sha256()``) is fed the stored bytes read, which is the whole
    file when the range is."""
    try:
        yield from _line_blocks(path, gz, start, end, block_bytes, hasher)
    except _GONE as e:  # raised by the read alone: the caller's own errors are not sent in here
        raise _Corrupt(path, _gone(e)) from None


def _line_blocks(path: str, gz: bool, start: int, end: int | None, block_bytes: int, hasher) -> Iterator[bytes]:
    with raw_inputs.open_read(path, sequential=True, stop=end) as f:
        if gz:
            if start or end is not None:
                raise ValueError("gzip files cannot be split into byte ranges")
            blocks = _read_gzip(f, path, block_bytes, hasher)
        else:
            blocks = _read_plain(f, start, end, block_bytes, hasher)
        if start == 0:  # a UTF-8 byte order mark (a file saved by some Windows tools) is no data
            first = next(blocks, None)
            if first is None:
                return
            if first.startswith(_BOM):  # before a final newline is added: a file of just a BOM has no line
                first = first[len(_BOM):]
            if first:
                yield _terminated(first)
        for block in blocks:  # only the file's last block may lack its newline
            yield _terminated(block)


def _terminated(block):
    """``block`` ending in a newline: one is added to a file's last line that has none."""
    if block.endswith(b"\n"):
        return block
    if isinstance(block, bytearray):
        block.append(10)
        return block
    return block + b"\n"


def scan_file(path: str, gz: bool) -> dict:
    """sha256 of the stored bytes, line count (as a line reader counts them) and, for gzip,
    integrity of every member: ``{"path", "sha256", "lines", "error"}``."""
    h = hashlib.sha256()
    lines, error = 0, None
    try:
        for block in iter_line_blocks(path, gz, hasher=h):
            lines += block.count(b"\n")
    except _Corrupt as e:
        error = e.why
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    return {"path": path, "sha256": h.hexdigest(), "lines": lines, "error": error}


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
            items.append((cost, len(items), ("chunk", Chunk(f.path, f.source, f.day, f.labeled, f.gzip,
                                                            hash_file=verify))))
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


# a file removed (or made unreadable) after it was listed fails alone, as a damaged one does; other
# read errors (a store's timeout) fail the task, which Spark retries
_GONE = (FileNotFoundError, PermissionError)


def _gone(e: OSError) -> str:
    return f"could not be read since it was listed ({type(e).__name__}: {e.strerror or e})"


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
        except _GONE as e:
            return {"kind": "corrupt", "path": what, "reason": _gone(e)}
    from pipelines.criteo.parse import parse_block

    c: Chunk = what  # type: ignore[assignment]
    hasher = hashlib.sha256() if c.hash_file else None
    bw, qw = bronze_tw.open(), quarantine_tw.open()
    lines = ok = rejected = 0
    reasons: Counter[str] = Counter()
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
                for b in _rejects_batch(rejects, preview, batch_id).to_batches():
                    qw.write(b, (c.day, c.source))
        return {"kind": "chunk", "path": c.path, "start": c.start, "lines": lines, "ok": ok,
                "rejected": rejected, "reasons": dict(reasons), "bronze": bw.close(), "quarantine": qw.close(),
                "sha256": hasher.hexdigest() if hasher is not None else None}
    except _Corrupt as e:
        bw.discard()
        qw.discard()
        return {"kind": "corrupt", "path": e.path, "reason": e.why}
    except BaseException:
        bw.discard()
        qw.discard()
        raise



# ------------------------------------------------------------------------------ ledger
def read_ledger(path: str) -> list[dict]:
    from pipelines.lake import DeltaSnapshot, table_exists

    if not table_exists(path):
        return []
    return DeltaSnapshot(path).to_table().to_pylist()


def current_entries(ledger_rows: list[dict]) -> dict[str, dict]:
    """The latest ledger row per source; none for a source whose latest row records its drop
    (no ``size``: :func:`_drop_sources`)."""
    cur: dict[str, dict] = {}
    for r in sorted(ledger_rows, key=lambda r: (r["ingested_at"], r["ingest_batch"])):
        cur[r["source"]] = r
    return {s: r for s, r in cur.items() if r["size"] is not None}


def bronze_sources(snapshot) -> dict[str, dict]:
    """Per bronze ``source`` partition of ``snapshot`` (a DeltaSnapshot), from the Delta log
    alone: ``{"rows", "batches" (the ingest_batch ids its files' statistics name), "day"}``."""
    per_source: dict[str, dict] = {}
    for fe in snapshot.files():
        src = fe.partition_values.get("source")
        d = per_source.setdefault(src, {"rows": 0, "batches": set(), "day": fe.partition_values.get("day")})
        d["rows"] += int(fe.num_records or 0)
        for b in (fe.min_values.get("ingest_batch"), fe.max_values.get("ingest_batch")):
            if b is not None:
                d["batches"].add(b)
    unchecked = sorted(s for s, d in per_source.items() if d["rows"] and not d["batches"])
    if unchecked:  # a bronze table from before it declared its statistics columns
        log.warning("bronze files of %d source(s) (e.g. %s) carry no ingest_batch statistics: only their row "
                    "counts are checked against the ledger", len(unchecked), unchecked[0])
    return per_source


def unconfirmed_sources(per_source: dict[str, dict], current: dict[str, dict]) -> dict[str, str]:
    """The sources whose bronze rows (:func:`bronze_sources`) are not the ones the ledger's
    current entry (:func:`current_entries`) records, each with why: rows of an ingest that
    stopped between its bronze commit and its ledger entry, or bronze changed behind the
    ledger's back."""
    out: dict[str, str] = {}
    for src in sorted(set(per_source) | set(current)):
        b, led = per_source.get(src), current.get(src)
        if led is None:
            out[src] = f"{b['rows']} bronze rows but no ledger entry (an interrupted ingest?)"
            continue
        rows = b["rows"] if b else 0
        if rows != led["rows_ok"] or (b and b["batches"] and b["batches"] != {led["ingest_batch"]}):
            out[src] = (f"bronze has {rows} rows from batch(es) {sorted(b['batches']) if b else []}, "
                        f"the ledger says {led['rows_ok']} rows from {led['ingest_batch']}")
    return out


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


def file_sha256(path: str) -> str:
    with raw_inputs.open_read(path, sequential=True) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # type: ignore[arg-type]


def _same_bytes(f: RawFile, twin: dict, hashes: dict[str, str]) -> str | None:
    """Whether ``f`` holds the same bytes as ``twin`` (a ledger row, or a file of this run),
    which has its size and quick hash (first and last MiB): None if it does not, else how that
    was established. Only then is each file read whole, on the driver (sha256 at ~1 GB/s;
    ``hashes``: path -> sha256 computed so far): rare, as two files rarely agree on both
    unless they are copies."""
    if f.path not in hashes:
        try:
            hashes[f.path] = file_sha256(f.path)
        except _GONE:  # removed since it was listed: its task reports it, alone
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


def _file_gone(path: str) -> bool:
    """Whether a file the ledger has is gone; one the store cannot be asked about (no
    credentials, a network error) is not taken for gone."""
    try:
        return not raw_inputs.exists(path)
    except (OSError, pa.ArrowException):
        return False


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
          unconfirmed: dict[str, str] | None = None) -> tuple[list[RawFile], list[FileResult], dict[str, str]]:
    """(files to ingest, results of the files skipped, a note per file to ingest that replaces
    rows of an earlier batch: why). A file the ledger has as ingested is ingested again when its
    source is in ``unconfirmed`` (:func:`unconfirmed_sources`)."""
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
        truncated = f.gzip and f.size < _GZIP_MIN_BYTES
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
            results.append(FileResult(f.path, f.source, f.day, f.labeled, f.size, "skipped",
                                      prev["lines"], prev["rows_ok"], prev["rows_rejected"], prev["sha256"],
                                      f"already ingested in batch {prev['ingest_batch']}"))
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


# ------------------------------------------------------------------------------ writing
def rows_by_source(path: str, version: int | None, sources: Sequence[str] | None = None) -> dict[str, int]:
    """Row counts per ``source`` partition from the Delta log's file statistics (no data read),
    at ``version`` (None: the latest). From the log's add actions as one Arrow table, filtered
    there: an ingest calls this up to three times per group, and building every file's entry
    (:meth:`DeltaSnapshot.files`) of a 2,000-file bronze took ~12 s of a 2,000-file run."""
    import pyarrow.compute as pc

    from pipelines.lake import DeltaSnapshot

    actions = pa.table(DeltaSnapshot(path, version=version).table.get_add_actions(flatten=True))
    if not actions.num_rows:
        return {}
    src, n = actions.column("partition.source"), actions.column("num_records")
    if sources is not None:
        keep = pc.is_in(src, value_set=pa.array(list(sources), pa.string()))
        src, n = src.filter(keep), n.filter(keep)
    out: dict[str, int] = {}
    for s, k in zip(src.to_pylist(), n.to_pylist()):
        out[s] = out.get(s, 0) + int(k or 0)
    return out


def _new_batch_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("b%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def _commit_group(spark, group: list[RawFile], paths: dict, batch_id: str, info: dict, ing,
                  compression: str) -> tuple[dict, list[tuple[str, str]], int | None, int | None, int | None,
                                             dict[str, int]]:
    """One Spark job for ``group``: tasks parse their chunks into bronze and quarantine files;
    the driver then commits bronze and quarantine, each as ONE transaction replacing the
    ``source`` partitions of the group's readable files. A file found unreadable (a damaged
    gzip) gets nothing committed: its chunks' files are deleted and its partitions are left
    as they were. Returns (per-file results of the readable files, the unreadable ones as
    ``(path, why)``, bronze version, quarantine version (None where nothing was committed),
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
        bad = sorted({(r["path"], r["reason"]) for r in results if r["kind"] == "corrupt"})
        unreadable = {p for p, _ in bad}
        good = [f for f in group if f.path not in unreadable]
        if not good:
            abort_write(btw)
            abort_write(qtw)
            return {}, bad, None, None, None, {}
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
    per_file: dict[str, dict] = {f.path: {"lines": 0, "ok": 0, "rejected": 0, "sha256": None, "reasons": Counter()}
                                 for f in good}
    for r in results:
        d = per_file[r["path"]]
        if r.get("sha256"):
            d["sha256"] = r["sha256"]
        if r["kind"] == "chunk":
            d["lines"] += r["lines"]
            d["ok"] += r["ok"]
            d["rejected"] += r["rejected"]
            d["reasons"].update(r["reasons"])
    return per_file, bad, bv, qv, qtw.read_version if qv is None else qv, rejected


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
    except FileNotFoundError as e:  # the config's inputs: say where they come from
        if inputs:
            raise
        where = ("criteo.inputs; conf/criteo.yaml takes it from CRITEO_DIR" if cfg.criteo.inputs else
                 "criteo.raw_dir; conf/demo.yaml's is $BIGOPT_DATA/criteo/raw, where `bigopt generate criteo` writes")
        raise FileNotFoundError(f"{e} ({where}; --input names others)") from None
    say(f"describing {len(names)} input file(s)")
    files = describe_files(names, cfg)
    dupes = sorted({f.source for f in files if sum(g.source == f.source for g in files) > 1})
    if dupes:
        raise IngestError(f"several inputs share the file name(s) {dupes}; the name is the bronze `source` key")
    if misnamed := [(f.path, why) for f in files if (why := _unreadable_as_named(f))]:
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
                                      unconfirmed)
    named = {f.source for f in files} | set(drop_sources)
    report.gone = {s: r for s, r in current.items() if s not in named and _file_gone(r["path"])}
    report.synthetic = _synthetic_beside_real({s: r["path"] for s, r in current.items() if s not in drop_sources},
                                              files)
    report.unconfirmed = _unconfirmed_elsewhere(unconfirmed, files, current)
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
        report.files += [FileResult(f.path, f.source, f.day, f.labeled, f.size, "failed", note=why)
                         for f in group for p, why in bad if p == f.path]
        group = [f for f in group if f.path in per_file]
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
