"""What each raw input file is, before any of it is parsed: :class:`RawFile`.

:func:`describe_file` opens a file once (on an object store: one metadata request and two or
three ranged reads) for its size, mtime, a quick hash of its first and last MiB, gzip or not,
its day (from ``criteo.ingest.day_regex``) and whether it is labelled (from
``criteo.ingest.unlabeled_globs``: the name decides, never a line), and checks its first lines
against that kind. :func:`unreadable_as_named` says why ingest cannot read a file as named (a
zstd or UTF-16 file, a ``.gz`` that is not gzip, a test file named as a training file...), so
such a file fails before any Spark job; :func:`why_mostly_rejected` says why one whose lines
were mostly rejected once parsed is not ingested.
"""
from __future__ import annotations

import fnmatch
import hashlib
import re
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipelines import raw_inputs
from pipelines.criteo.bronze import BRONZE_SCHEMA
from pipelines.criteo.parse import EMPTY_LINE
from pipelines.criteo.raw_lines import BOM, GZIP_MAGIC
from pipelines.criteo.schema import LABELED_FIELDS, UNLABELED_FIELDS

_QUICK = 1 << 20
GZIP_MIN_BYTES = 20  # the smallest gzip member: 10 bytes of header, an empty block, 8 of trailer
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
    if lines and lines[0].startswith(BOM):
        lines[0] = lines[0][len(BOM):]
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
    forty = [ln.rstrip(b"\r") for ln in lines if ln.count(b"\t") + 1 == LABELED_FIELDS]
    odd = len(forty)
    labels = sum(f in (b"0", b"1") for f in firsts)
    if odd >= 3 and 10 * sum(ln.endswith(b"\t") for ln in forty) >= 9 * odd and 10 * labels < 9 * n:
        # a test file whose every line ends with a TAB: one empty field too many, not a label
        # (where nearly every line starts with 0/1, it is a labelled file whose C26 is empty)
        return (f"{odd} of its first {n} lines have 40 fields, the last of them empty: each line ends with a TAB "
                "too many (an export artefact); strip it (sed 's/\\t$//' FILE > FIXED), or every row would be "
                "quarantined or shifted by one column")
    why = (f"its name matches criteo.ingest.unlabeled_globs {list(unlabeled_globs)}, so it is read as a test "
           f"file (39 fields, no label), but {odd} of its first {n} lines have 40 fields"
           + (f" and {labels} start with a 0/1 label" if 2 * odd <= n else "")
           + ", as in a labelled file; rename it or change criteo.ingest.unlabeled_globs")
    return why if odd >= 3 and (2 * odd > n or 10 * labels >= 9 * n) else None


def too_many_rejected(lines: int, rejected: int, reasons: Mapping[str, int], max_share: float) -> bool:
    """More than ``max_share`` of the lines with content rejected: empty lines, which hold no
    row to lose (a double-spaced file, a file of one newline), count on neither side."""
    empty = reasons.get(EMPTY_LINE, 0)
    return rejected - empty > max_share * (lines - empty)


def why_mostly_rejected(lines: int, rejected: int, reasons: Mapping[str, int], first: bytes | None,
                        max_share: float) -> str:
    """Why a file more than ``max_share`` of whose ``lines`` were rejected is not ingested: the
    counts, its main reasons, its first rejected line (escaped) and, where that line shows
    it, the usual cause and its fix."""
    counted = Counter(reasons)
    top = "; ".join(f"{n:,} {r}" for r, n in counted.most_common(3))
    main_reason = next((r for r, _ in counted.most_common() if r != EMPTY_LINE), "")
    empty = counted.get(EMPTY_LINE, 0)
    first = first or b""
    shown = first if len(first) <= 160 else first[:120] + b" ... " + first[-24:]
    one_too_many = re.fullmatch(r"too many fields \(expected (\d+), got (\d+)\)", main_reason)
    hints = (  # (what the first bad line or the main reason shows, the cause and its fix)
        (first.endswith(b"\r"), "a CR before each line's end too many (CR CR LF): tr -d '\\r' < FILE > FIXED"),
        (b"\r" in first, "its lines end in CR alone (classic Mac line ends): tr '\\r' '\\n' < FILE > FIXED"),
        (b"\x00" in first, "NUL bytes: UTF-16 text without a byte order mark? iconv -f UTF-16LE -t UTF-8 FILE > FIXED"),
        (bool(one_too_many) and int(one_too_many[2]) == int(one_too_many[1]) + 1,
         "one field too many on most lines: does each end with a TAB? sed 's/\\t$//' FILE > FIXED"),
        (bool(re.match(rb"[01]\.0*\t", first)), "labels written as 0.0/1.0: a label is 0 or 1"),
        (main_reason.startswith("undecodable"), "not UTF-8: iconv -f ITS_ENCODING -t UTF-8 FILE > FIXED"),
    )
    hint = next((f"; {h}" for shown_by, h in hints if shown_by), "")
    besides = f", besides {empty:,} empty lines" if empty else ""
    return (f"{rejected - empty:,} of its {lines - empty:,} lines are bad{besides} (more than "
            f"criteo.ingest.max_rejected_share={max_share:g}): "
            f"{top}; the first: {shown.decode('utf-8', 'backslashreplace')!r}{hint}. It is not in Criteo's raw format "
            "(TAB-separated, LF or CR LF line ends, UTF-8), or not in the kind its name says")


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
    gz = head[:2] == GZIP_MAGIC or (name.endswith(".gz") and GZIP_MAGIC.startswith(head))
    day, name_problem = _day_of(name, ing.day_regex)
    text = _inflate_head(head, _HEAD_TEXT) if gz else head  # no more than the checks read
    foreign = next((what for magic, what in _FOREIGN_MAGIC.items() if head.startswith(magic)), None)
    if gz and not foreign:  # compressed twice (a download's double Content-Encoding), or gzip of a zstd file...
        inner = {GZIP_MAGIC: "gzip-compressed twice", **{m: f"{w}, then gzip'd" for m, w in _FOREIGN_MAGIC.items()}}
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


def unreadable_as_named(f: RawFile) -> str | None:
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
