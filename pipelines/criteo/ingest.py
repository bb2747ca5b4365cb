"""Raw Criteo files -> bronze Delta table, with a quarantine table and an ingest ledger.

    report = ingest(spark, cfg)                 # new files only
    report = ingest(spark, cfg, force=True)     # re-ingest: replaces those files' rows

Per group of ``ingest.files_per_commit`` files:

1. **Verify** (Spark tasks, one per file, before anything is written): a streaming pass over
   the bytes computes the sha256 and the line count, and for gzip files inflates every member
   (a truncated or corrupt file raises :class:`CorruptInputError` naming it: nothing of the
   whole run is committed, since all files are verified before the first write).
2. **Parse** with Spark SQL column expressions (``split`` + ``try_element_at`` + casts; no
   Python UDFs): short rows (stripped trailing TABs) are padded, unlabelled files (39 fields,
   may start with a TAB) get a null label. Each line gets a ``reason`` or none.
3. **Write** good rows to bronze and bad rows (raw line, source, reason) to quarantine, each
   as ONE Delta commit that replaces the group's ``source`` partitions (``replace_where``), so
   a re-run can never duplicate a file's rows.
4. **Account**: rows_ok + rows_rejected per file (from the commits' file statistics) must
   equal the line count of step 1, else :class:`IngestError` and no ledger entry.
5. **Ledger**: one row per file (path, size, mtime, quick hash of the first/last MiB, sha256,
   counts, batch id, table versions), appended last. The ledger is the commit point: a file is
   ingested when its ledger row exists; ``featurize`` refuses bronze rows the ledger does not
   confirm (left by a run that died between steps 3 and 5; the next ingest replaces them).
"""
from __future__ import annotations

import datetime as _dt
import fnmatch
import glob
import hashlib
import logging
import os
import re
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipelines.criteo.schema import DENSE, LABELED_FIELDS, NUM_DENSE, SPARSE, UNLABELED_FIELDS, tables

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
BRONZE_COLUMNS = ["label", *DENSE, *SPARSE, "ingest_batch", "day", "source"]
QUARANTINE_COLUMNS = ["line", "line_bytes", "reason", "num_fields", "ingest_batch", "day", "source"]
_BLOCK = 4 << 20
_QUICK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


class IngestError(RuntimeError):
    """The ingest could not account for every line; nothing was recorded in the ledger."""


class CorruptInputError(IngestError):
    """One or more input files are unreadable (truncated/corrupt gzip); nothing was committed."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = "\n  ".join(f"{p}: {why}" for p, why in problems)
        super().__init__(f"{len(problems)} corrupt input file(s), nothing was committed:\n  {lines}")


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


@dataclass
class FileResult:
    path: str
    source: str
    day: int
    labeled: bool
    size: int
    status: str  # ingested | replaced | skipped | duplicate
    lines: int = 0
    rows_ok: int = 0
    rows_rejected: int = 0
    sha256: str | None = None
    note: str = ""


@dataclass
class IngestReport:
    batch_id: str
    files: list[FileResult] = field(default_factory=list)
    bronze: str = ""
    quarantine: str = ""
    ledger: str = ""
    bronze_version: int | None = None
    quarantine_version: int | None = None
    ledger_version: int | None = None
    seconds: float = 0.0

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
    def ingested(self) -> int:
        return len(self._done())

    @property
    def skipped(self) -> int:
        return len(self.files) - self.ingested

    def summary(self) -> str:
        """One line for logs and ``bigopt run``."""
        return (
            f"{self.ingested} file(s) ingested, {self.skipped} skipped; rows_in {self.rows_in:,} = "
            f"ok {self.rows_ok:,} + rejected {self.rows_rejected:,}; bronze v{self.bronze_version}"
        )


# ------------------------------------------------------------------------------ inputs
def _local_path(spec: str) -> str:
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    elif "://" in spec:
        raise ValueError(f"input {spec!r}: only local (or shared-filesystem) paths are supported")
    return os.path.abspath(os.path.expanduser(spec))


def resolve_inputs(specs: Sequence[str], file_globs: Sequence[str]) -> list[str]:
    """Files named by ``specs``: files, globs, or directories (whose entries matching
    ``file_globs`` are taken, non-recursively). Sorted, without duplicates."""
    out: list[str] = []
    for spec in specs:
        p = _local_path(spec)
        if any(ch in p for ch in "*?["):
            matches = [m for m in sorted(glob.glob(p)) if os.path.isfile(m)]
            if not matches:
                raise FileNotFoundError(f"input glob {spec!r} matches no file")
            out += matches
        elif os.path.isdir(p):
            names = sorted(
                n for n in os.listdir(p)
                if not n.startswith((".", "_")) and os.path.isfile(os.path.join(p, n))
                and any(fnmatch.fnmatch(n, g) for g in file_globs)
            )
            out += [os.path.join(p, n) for n in names]
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"input {spec!r} does not exist")
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def _quick_hash(path: str, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_QUICK))
        if size > 2 * _QUICK:
            f.seek(size - _QUICK)
            h.update(f.read(_QUICK))
        elif size > _QUICK:
            h.update(f.read())
    return h.hexdigest()[:32]


def _peek_lines(path: str, gz: bool, nbytes: int = 64 << 10) -> list[bytes]:
    with open(path, "rb") as f:
        raw = f.read(nbytes)
    if gz:
        try:
            raw = zlib.decompressobj(47).decompress(raw, nbytes * 4)
        except zlib.error:
            return []
    lines = raw.split(b"\n")
    return lines[:-1] if len(lines) > 1 else lines


def detect_labeled(path: str, gz: bool, unlabeled_globs: Sequence[str]) -> bool:
    """Labelled (40 fields) or a test file (39 fields, no label)? Decided from the first lines:
    any 40-field line means labelled, else any 39-field line means unlabelled; files whose
    first lines are all shorter (stripped trailing TABs) are decided by name."""
    counts = [ln.count(b"\t") + 1 for ln in _peek_lines(path, gz) if ln]
    if any(c == LABELED_FIELDS for c in counts):
        return True
    if any(c == UNLABELED_FIELDS for c in counts):
        return False
    name = os.path.basename(path)
    return not any(fnmatch.fnmatch(name, g) for g in unlabeled_globs)


def describe_file(path: str, cfg) -> RawFile:
    ing = cfg.criteo.ingest
    st = os.stat(path)
    with open(path, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    name = os.path.basename(path)
    m = re.search(ing.day_regex, name)
    day = int(m.group(1)) if m else -1
    return RawFile(path, name, day, detect_labeled(path, gz, ing.unlabeled_globs), gz, st.st_size,
                   st.st_mtime_ns, _quick_hash(path, st.st_size))


class CleanCheck:
    """Streaming, vectorised (numpy) proof that every line of a file is in canonical form:
    exactly ``fields`` fields, label ``0``/``1``, integers ``-?[0-9]{1,18}`` or empty,
    categoricals 8 lowercase hex chars or empty. Such a file can skip the exact parsing path
    and the quarantine pass (it has nothing to quarantine). Anything else, including valid but
    unusual lines (stripped trailing TABs, uppercase hex), only means "not proven clean": the
    file then goes through Spark's full validation. Feed complete lines; ``finish()`` at EOF."""

    def __init__(self, fields: int):
        import numpy as np

        self.fields = fields
        self.off = 1 if fields == LABELED_FIELDS else 0
        self.clean = True
        self._tail = b""
        allowed = np.zeros(256, dtype=bool)
        allowed[[*b"0123456789abcdef-", 9, 10]] = True
        self._allowed = allowed

    def feed(self, data: bytes) -> None:
        if not self.clean or not data:
            return
        cut = data.rfind(b"\n")
        if cut < 0:
            self._tail += data
            return
        chunk, self._tail = self._tail + data[: cut + 1], data[cut + 1:]
        self.clean = self._check(chunk)

    def finish(self) -> bool:
        if self.clean and self._tail:
            self.clean = self._check(self._tail + b"\n")  # last line without a final newline
            self._tail = b""
        return self.clean

    def _check(self, chunk: bytes) -> bool:
        import numpy as np

        F, off = self.fields, self.off
        a = np.frombuffer(chunk, dtype=np.uint8)
        if not self._allowed[a].all():
            return False
        seps = np.flatnonzero((a == 9) | (a == 10))
        if len(seps) % F:
            return False
        lines = len(seps) // F
        seps2 = seps.reshape(lines, F)
        is_nl = a[seps2] == 10
        if not (is_nl[:, -1].all() and not is_nl[:, :-1].any()):
            return False  # a line with more or fewer fields
        starts = np.empty_like(seps)
        starts[0] = 0
        starts[1:] = seps[:-1] + 1
        lengths = (seps - starts).reshape(lines, F)
        starts2 = starts.reshape(lines, F)
        if off and not ((lengths[:, 0] == 1) & ((a[starts2[:, 0]] == 48) | (a[starts2[:, 0]] == 49))).all():
            return False  # label
        if (lengths[:, off:off + NUM_DENSE] > 18).any():
            return False  # could overflow int64
        cat = lengths[:, off + NUM_DENSE:]
        if not ((cat == 0) | (cat == 8)).all():
            return False
        # letters (a-f) may only appear in categoricals: none between a line's start and the
        # separator that ends its last integer field
        letters = np.cumsum(a >= 97, dtype=np.int64)
        region_end = seps2[:, off + NUM_DENSE - 1]
        before = np.where(starts2[:, 0] > 0, letters[starts2[:, 0] - 1], 0)
        if (letters[region_end] - before).any():
            return False
        # '-' only as the sign of an integer with at least one digit
        dashes = np.flatnonzero(a == 45)
        if len(dashes):
            int_starts = starts2[:, off:off + NUM_DENSE].ravel()
            int_lengths = lengths[:, off:off + NUM_DENSE].ravel()
            pos = np.searchsorted(int_starts, dashes)
            ok = (pos < len(int_starts)) & (int_starts[np.minimum(pos, len(int_starts) - 1)] == dashes)
            if not ok.all() or (int_lengths[pos] < 2).any():
                return False
        return True


def scan_file(path: str, gz: bool, fields: int | None = None) -> dict:
    """Full streaming pass (runs in a Spark task): sha256 of the stored bytes, number of lines
    (as Spark's text reader counts them), for gzip the integrity of every member, and, given
    the expected field count, whether every line is provably clean (:class:`CleanCheck`)."""
    h = hashlib.sha256()
    newlines = 0
    last = b""
    error = None
    check = CleanCheck(fields) if fields else None
    try:
        with open(path, "rb") as f:
            d = zlib.decompressobj(47) if gz else None
            member_bytes = 0
            while True:
                block = f.read(_BLOCK)
                if not block:
                    break
                h.update(block)
                if d is None:
                    newlines += block.count(b"\n")
                    last = block[-1:]
                    if check:
                        check.feed(block)
                    continue
                data = block
                while data:
                    out = d.decompress(data)
                    member_bytes += len(data) - len(d.unused_data)
                    if out:
                        newlines += out.count(b"\n")
                        last = out[-1:]
                        if check:
                            check.feed(out)
                    if d.eof:
                        data = d.unused_data
                        d = zlib.decompressobj(47)
                        member_bytes = 0
                        if data and not data.startswith(_GZIP_MAGIC[: len(data)]):
                            raise zlib.error("trailing garbage after the last gzip member")
                    else:
                        data = b""
            if d is not None and member_bytes:
                raise EOFError("truncated gzip: the file ends inside a compressed member")
    except (zlib.error, EOFError, OSError) as e:
        error = f"{type(e).__name__}: {e}" if not isinstance(e, EOFError) else str(e)
    lines = newlines + (1 if last and last != b"\n" else 0)
    clean = bool(check.finish()) if check and not error and lines else False
    return {"path": path, "sha256": h.hexdigest(), "lines": lines, "error": error, "clean": clean}


def _verify(spark, files: list[RawFile]) -> dict[str, dict]:
    if not files:
        return {}
    items = [(f.path, f.gzip, LABELED_FIELDS if f.labeled else UNLABELED_FIELDS) for f in files]
    rdd = spark.sparkContext.parallelize(items, len(items))
    results = rdd.map(lambda it: scan_file(*it)).collect()
    return {r["path"]: r for r in results}


# ------------------------------------------------------------------------------ parsing
_CSV_OPTIONS = {
    "sep": "\t", "quote": "", "escape": "\u0000", "nullValue": "", "mode": "PERMISSIVE",
    "columnNameOfCorruptRecord": "_corrupt", "ignoreLeadingWhiteSpace": "false",
    "ignoreTrailingWhiteSpace": "false",
}


def _csv_schema(labeled: bool) -> str:
    cols = (["label int"] if labeled else []) + [f"{c} bigint" for c in DENSE] + [f"{c} string" for c in SPARSE]
    return ", ".join([*cols, "_corrupt string"])


def _barrier(name: str):
    """A nondeterministic, nearly free column. Spark's optimizer pushes a filter down through
    deterministic projections by inlining their expressions, so ``filter(reason IS NULL)``
    would re-evaluate the whole parse inside the filter and again in the projection (and
    ``filter(NOT _fast)`` would run ``from_csv`` once per referenced field). A filter is never
    pushed through a projection that holds a nondeterministic column; filters that also
    reference the column (so it is not pruned) stop right above the expression they test."""
    from pyspark.sql import functions as F

    return F.monotonically_increasing_id().alias(name)


def _fast_stage(df, labeled: bool):
    """value, source -> value, source, _r (from_csv struct), _fast (the line is good as parsed)."""
    from pyspark.sql import functions as F

    value, r = F.col("value"), F.col("_r")
    df = df.select("value", "source", F.from_csv(value, _csv_schema(labeled), _CSV_OPTIONS).alias("_r"))
    fast = r["_corrupt"].isNull() & (F.length(value) > 0)
    if labeled:
        fast = fast & r["label"].isin(0, 1)
    for c in SPARSE:
        fast = fast & (r[c].isNull() | ((F.length(r[c]) == 8) & F.unhex(r[c]).isNotNull()))
    # null-safe: a null label (empty first field) must not make the whole predicate null
    return df.select("value", "source", "_r", F.coalesce(fast, F.lit(False)).alias("_fast"), _barrier("_b1"))


def _exact_stage(df, labeled: bool, batch_id: str, day_by_source: dict[str, int], preview: int):
    """The typed columns (from ``_r`` on fast lines, else re-parsed exactly) + ``reason`` +
    the quarantine columns."""
    from pyspark.sql import functions as F

    expected = LABELED_FIELDS if labeled else UNLABELED_FIELDS
    off = 1 if labeled else 0
    value, r, fastc = F.col("value"), F.col("_r"), F.col("_fast")
    df = df.select("value", "source", "_r", "_fast", F.when(~fastc, F.split(value, "\t", -1)).alias("_parts"))
    parts = F.col("_parts")
    fields = [F.nullif(F.try_element_at(parts, F.lit(off + k + 1)), F.lit("")).alias(f"_f{k}")
              for k in range(UNLABELED_FIELDS)]
    df = df.select("value", "source", "_r", "_fast", F.size(parts).alias("_n"),
                   F.try_element_at(parts, F.lit(1)).alias("_lab"), *fields)
    n = F.col("_n")
    # exact values and an error code per field (0 ok, 1 malformed, 2 integer out of range);
    # on fast lines every _f is null, so these cost a null check each.
    vals, codes = [], []
    for k, c in enumerate(DENSE):
        f = F.col(f"_f{k}")
        val = f.try_cast("bigint")
        vals.append(val.alias(f"_v{k}"))
        # Spark's cast trims spaces: hence the regex (evaluated only for non-null exact fields)
        codes.append(F.when(f.isNull(), 0).when(~f.rlike(r"^[+-]?[0-9]+$"), 1).when(val.isNull(), 2).otherwise(0)
                     .alias(f"_e{k}"))
    for j in range(len(SPARSE)):
        k = len(DENSE) + j
        f = F.col(f"_f{k}")
        codes.append(F.when(f.isNull() | ((F.length(f) == 8) & F.unhex(f).isNotNull()), 0).otherwise(1)
                     .alias(f"_e{k}"))
    df = df.select("value", "source", "_r", "_fast", "_n", "_lab",
                   *[F.col(f"_f{k}") for k in range(len(DENSE), UNLABELED_FIELDS)], *vals, *codes)

    ecols = [F.col(f"_e{k}") for k in range(UNLABELED_FIELDS)]
    first_bad = F.array_position(F.array(*[e > 0 for e in ecols]), True).cast("int")
    bad_name = F.get(F.array(*[F.lit(c) for c in DENSE + SPARSE]), first_bad - 1)
    label_raw = F.col("_lab")
    reason = (
        F.when(fastc, F.lit(None).cast("string"))
        .when(~F.is_valid_utf8(value), F.lit("undecodable bytes (not UTF-8)"))
        .when(F.length(value) == 0, F.lit("empty line"))
        .when(n > expected, F.concat(F.lit(f"too many fields (expected {expected}, got "), n.cast("string"), F.lit(")")))
    )
    if labeled:
        reason = reason.when(~label_raw.isin("0", "1"), F.lit("label not 0/1"))
    reason = (
        reason.when(first_bad == 0, F.lit(None).cast("string"))
        .when(F.get(F.array(*ecols), first_bad - 1) == 2, F.concat(F.lit("integer out of range in "), bad_name))
        .when(F.substring(bad_name, 1, 1) == "I", F.concat(F.lit("non-integer in "), bad_name))
        .otherwise(F.concat(bad_name, F.lit(" not 8 hex chars")))
    )
    if labeled:
        label = F.when(fastc, r["label"]).when(label_raw == "1", 1).when(label_raw == "0", 0).cast("int")
    else:
        label = F.lit(None).cast("int")
    typed = [F.when(fastc, r[c]).otherwise(F.col(f"_v{k}")).alias(c) for k, c in enumerate(DENSE)]
    typed += [F.when(fastc, r[c]).otherwise(F.col(f"_f{len(DENSE) + j}")).alias(c) for j, c in enumerate(SPARSE)]
    df = df.select("value", "source", "_n", label.alias("label"), *typed, reason.alias("reason"),
                   _barrier("_b2"))
    day_map = F.create_map(*[x for s, d in day_by_source.items() for x in (F.lit(s), F.lit(d))])
    df = df.select(
        "label", *DENSE, *SPARSE,
        F.lit(batch_id).alias("ingest_batch"),
        F.element_at(day_map, F.col("source")).cast("int").alias("day"),
        F.col("source"), "reason", "value", F.col("_n").alias("num_fields"), "_b2",
    )
    # quarantine columns (only computed for bad lines)
    bad = F.col("reason").isNotNull()
    valid = F.is_valid_utf8(value)
    line = F.when(valid, value).otherwise(F.make_valid_utf8(value))
    return df.select(
        *BRONZE_COLUMNS, "reason",
        F.when(bad, F.substring(line, 1, preview)).alias("line"),
        F.when(bad & ~valid, value.cast("binary")).alias("line_bytes"),
        F.when(bad, F.col("num_fields")).cast("int").alias("num_fields"), "_b2",
    )


def parse_lines(df, labeled: bool, batch_id: str, day_by_source: dict[str, int], preview: int):
    """``df`` has ``value`` (a raw line) and ``source`` (the file's basename). Returns
    ``(good, rejected)``: the bronze rows and the quarantine rows.

    Two paths per line:

    - fast: Spark's CSV tokenizer (``from_csv``, typed schema) parses the line in one go; the
      line is good when it has exactly the expected field count, every integer parsed, the
      label is 0/1 and every categorical is 8 hex chars. Nearly every real line takes it.
    - exact: anything else (short rows from stripped trailing TABs, bad fields, too many
      fields, empty or undecodable lines) is re-parsed from the raw text with ``split`` +
      ``try_element_at``: short rows are padded with missing values, and a bad line gets the
      reason of its first problem. Spark evaluates these expressions only for those lines.

    The quarantine query drops fast lines right after the cheap check, so its scan costs
    little more than tokenizing.
    """
    fast = _fast_stage(df, labeled)
    good = _exact_stage(fast, labeled, batch_id, day_by_source, preview)
    good = good.filter("reason IS NULL AND _b2 >= 0")
    bad = _exact_stage(fast.filter("NOT _fast AND _b1 >= 0"), labeled, batch_id, day_by_source, preview)
    bad = bad.filter("reason IS NOT NULL AND _b2 >= 0")
    return good.select(*BRONZE_COLUMNS), bad.select(*QUARANTINE_COLUMNS)


def parse_clean_lines(df, labeled: bool, batch_id: str, day_by_source: dict[str, int]):
    """Bronze rows of lines proven clean by :class:`CleanCheck`: the CSV tokenizer alone (no
    per-field checks, no exact path, nothing to quarantine)."""
    from pyspark.sql import functions as F

    r = F.col("_r")
    day_map = F.create_map(*[x for s, d in day_by_source.items() for x in (F.lit(s), F.lit(d))])
    df = df.select(F.from_csv(F.col("value"), _csv_schema(labeled), _CSV_OPTIONS).alias("_r"), "source")
    label = r["label"] if labeled else F.lit(None).cast("int")
    return df.select(
        label.alias("label"), *[r[c].alias(c) for c in DENSE + SPARSE], F.lit(batch_id).alias("ingest_batch"),
        F.element_at(day_map, F.col("source")).cast("int").alias("day"), "source",
    )


def read_raw(spark, files: list[RawFile], batch_id: str, preview: int, clean: set[str] | frozenset = frozenset()):
    """``(bronze rows, quarantine rows)`` for ``files``. Files are read in up to four groups
    (labelled or not x proven clean or not), each parsed with constant field offsets, and the
    groups are unioned. Files in ``clean`` (paths) take the lean path and add nothing to the
    quarantine query, which is None when every file is clean."""
    from pyspark.sql import functions as F

    day_by_source = {f.source: f.day for f in files}
    goods, bads = [], []
    for labeled in (True, False):
        for proven in (True, False):
            group = [f for f in files if f.labeled == labeled and (f.path in clean) == proven]
            if not group:
                continue
            raw = (
                spark.read.option("lineSep", "\n").text([f"file://{f.path}" for f in group])
                .select("value", F.col("_metadata.file_name").alias("source"))
            )
            if proven:
                goods.append(parse_clean_lines(raw, labeled, batch_id, day_by_source))
            else:
                good, bad = parse_lines(raw, labeled, batch_id, day_by_source, preview)
                goods.append(good)
                bads.append(bad)
    good = goods[0]
    for g in goods[1:]:
        good = good.unionByName(g)
    bad = bads[0] if bads else None
    for b in bads[1:]:
        bad = bad.unionByName(b)
    return good, bad


# ------------------------------------------------------------------------------ ledger
def read_ledger(path: str) -> list[dict]:
    from pipelines.lake import DeltaSnapshot, table_exists

    if not table_exists(path):
        return []
    return DeltaSnapshot(path).to_table().to_pylist()


def current_entries(ledger_rows: list[dict]) -> dict[str, dict]:
    """The latest ledger row per source."""
    cur: dict[str, dict] = {}
    for r in sorted(ledger_rows, key=lambda r: (r["ingested_at"], r["ingest_batch"])):
        cur[r["source"]] = r
    return cur


def _plan(files: list[RawFile], current: dict[str, dict], force: bool) -> tuple[list[RawFile], list[FileResult]]:
    todo: list[RawFile] = []
    results: list[FileResult] = []
    by_content = {(r["size"], r["quick_hash"]): r for r in current.values()}
    for f in files:
        prev = current.get(f.source)
        same = prev is not None and (prev["path"], prev["size"], prev["mtime_ns"], prev["quick_hash"]) == (
            f.path, f.size, f.mtime_ns, f.quick_hash)
        twin = by_content.get((f.size, f.quick_hash))
        if same and not force:
            results.append(FileResult(f.path, f.source, f.day, f.labeled, f.size, "skipped",
                                      prev["lines"], prev["rows_ok"], prev["rows_rejected"], prev["sha256"],
                                      f"already ingested in batch {prev['ingest_batch']}"))
        elif prev is None and twin is not None and not force:
            results.append(FileResult(f.path, f.source, f.day, f.labeled, f.size, "duplicate",
                                      note=f"same content as {twin['path']} (already ingested); --force to ingest"))
        else:
            if prev is not None and not same:
                log.warning("%s: changed since it was ingested (or another file named %s was): replacing its rows",
                            f.path, f.source)
            todo.append(f)
    return todo, results


# ------------------------------------------------------------------------------ writing
def _write_replacing(df, path: str, sources: list[str], commit_info: dict) -> int:
    from pipelines.lake import table_exists, write_table

    if table_exists(path):
        return write_table(df, path, mode="overwrite", partition_by=PARTITION_BY,
                           replace_where={"source": sources}, commit_info=commit_info)
    return write_table(df, path, mode="append", partition_by=PARTITION_BY, commit_info=commit_info)


def rows_by_source(path: str, version: int, sources: Sequence[str] | None = None) -> dict[str, int]:
    """Row counts per ``source`` partition from the Delta log's file statistics (no data read)."""
    from pipelines.lake import DeltaSnapshot

    out: dict[str, int] = {}
    for fe in DeltaSnapshot(path, version=version).files():
        s = fe.partition_values.get("source")
        if sources is None or s in sources:
            out[s] = out.get(s, 0) + int(fe.num_records or 0)
    return out


def _new_batch_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("b%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def ingest(
    spark,
    cfg,
    force: bool = False,
    inputs: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> IngestReport:
    """Ingest the configured inputs (``cfg.criteo.inputs``, default ``cfg.criteo.raw_dir``)."""
    from pyspark.sql import Row

    from jobs.config import config_hash
    from pipelines.lake import write_table

    t0 = time.time()
    say = progress or (lambda msg: log.info(msg))
    ing = cfg.criteo.ingest
    paths = tables(cfg)
    chash = config_hash(cfg)
    batch_id = _new_batch_id()
    report = IngestReport(batch_id, bronze=paths["bronze"], quarantine=paths["quarantine"], ledger=paths["ledger"])

    names = resolve_inputs(list(inputs) if inputs else cfg.criteo.input_specs(), ing.file_globs)
    say(f"describing {len(names)} input file(s)")
    files = [describe_file(p, cfg) for p in names]
    dupes = sorted({f.source for f in files if sum(g.source == f.source for g in files) > 1})
    if dupes:
        raise IngestError(f"several inputs share the file name(s) {dupes}; the name is the bronze `source` key")
    misnamed = [(f.path, "gzip content but the name does not end in .gz (Spark would not inflate it)")
                for f in files if f.gzip and not f.path.endswith(".gz")]
    misnamed += [(f.path, "named .gz but not gzip content") for f in files if not f.gzip and f.path.endswith(".gz")]
    if misnamed:
        raise CorruptInputError(misnamed)
    current = current_entries(read_ledger(paths["ledger"]))
    todo, report.files = _plan(files, current, force)
    if not todo:
        report.seconds = time.time() - t0
        return report

    scans: dict[str, dict] = {}
    if ing.verify:
        say(f"verifying {len(todo)} file(s) (integrity, line count, sha256)")
        scans = _verify(spark, todo)
        bad = [(p, s["error"]) for p, s in scans.items() if s["error"]]
        if bad:
            raise CorruptInputError(sorted(bad))

    for g0 in range(0, len(todo), ing.files_per_commit):
        group = todo[g0:g0 + ing.files_per_commit]
        sources = [f.source for f in group]
        info = {"job": "ingest", "config_hash": chash, "ingest_batch": batch_id, "files": ",".join(sources)[:2000]}
        say(f"parsing {len(group)} file(s) -> bronze")
        clean = {p for p, sc in scans.items() if sc.get("clean")}
        good, bad = read_raw(spark, group, batch_id, ing.max_line_preview, clean)
        bv = _write_replacing(good, paths["bronze"], sources, info)
        if bad is None:  # every file proven clean: an empty commit still replaces old rejects
            say("all files proven clean: nothing to quarantine")
            bad = spark.createDataFrame([], QUARANTINE_DDL)
        else:
            say(f"writing the quarantine of {len(group) - len(clean & {f.path for f in group})} file(s)")
        qv = _write_replacing(bad, paths["quarantine"], sources, info)
        ok = rows_by_source(paths["bronze"], bv, sources)
        rej = rows_by_source(paths["quarantine"], qv, sources)
        now = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
        ledger_rows, group_results = [], []
        for f in group:
            n_ok, n_rej = ok.get(f.source, 0), rej.get(f.source, 0)
            scan = scans.get(f.path)
            lines = scan["lines"] if scan else n_ok + n_rej
            if n_ok + n_rej != lines:
                raise IngestError(
                    f"{f.path}: {lines} lines in the file but {n_ok} rows in bronze + {n_rej} quarantined; "
                    "no ledger entry written (bronze rows of this file are unconfirmed; re-run ingest)"
                )
            status = "replaced" if f.source in current else "ingested"
            group_results.append(FileResult(f.path, f.source, f.day, f.labeled, f.size, status, lines, n_ok, n_rej,
                                            scan["sha256"] if scan else None))
            ledger_rows.append(Row(
                source=f.source, path=f.path, day=f.day, labeled=f.labeled, gzip=f.gzip, size=f.size,
                mtime_ns=f.mtime_ns, quick_hash=f.quick_hash, sha256=scan["sha256"] if scan else None, lines=lines,
                rows_ok=n_ok, rows_rejected=n_rej, ingest_batch=batch_id, bronze_version=bv,
                quarantine_version=qv, forced=bool(force), ingested_at=now, config_hash=chash,
            ))
        say(f"recording {len(group)} file(s) in the ledger")
        lv = write_table(spark.createDataFrame(ledger_rows, LEDGER_DDL), paths["ledger"], mode="append",
                         commit_info={"job": "ingest", "config_hash": chash, "ingest_batch": batch_id})
        report.files += group_results
        report.bronze_version, report.quarantine_version, report.ledger_version = bv, qv, lv
    report.seconds = time.time() - t0
    return report
