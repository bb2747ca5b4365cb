"""Raw Criteo lines -> typed Arrow rows + rejected lines with a reason (vectorised).

    rows, rejects = parse_block(block, labeled=True)

``block`` holds complete lines, each ending in ``\\n`` or ``\\r\\n`` (a file saved with Windows
line ends: the CR goes with the LF, as in Spark's, pyarrow's and pandas' readers; a CR
anywhere else is a bad byte). ``rows`` is an Arrow table with
``label`` (int32; null in unlabelled files), ``I1..I13`` (int64) and ``C1..C26`` (string),
one row per good line; ``rejects`` lists ``(raw line bytes, reason, field count)`` for the
others. Every line is one or the other: ``rows.num_rows + len(rejects) == block.count(b"\\n")``.

Three tiers, so that ordinary data costs one pass and unusual lines cost more only for
themselves:

1. **fast** (the whole block): :func:`pipelines.criteo.scan.scan_block`, one compiled pass
   that tokenizes, validates and converts every line. It takes the block when every line is
   plain (label ``0``/``1``, integers of at most 18 digits, categoricals of 8 hex characters,
   at most the expected fields; short rows are padded on the way). Nearly every real block is.
2. **careful** (a block with a line that is not plain): NumPy finds each line's field count
   and odd bytes; the lines with no odd bytes and at most the expected field count go through
   the fast tier again without the others (which is enough when the odd lines were all bad)
   or else are padded with missing fields and parsed by Arrow's CSV reader with every column
   as text, then validated per value with vectorised regular expressions.
3. **exact** (the few lines that fail that, in Python): the reason of the line's first problem,
   or the parsed row when the line is valid but unusual (a 19-digit integer in range).

Rules (the same in every tier): label ``0``/``1`` (absent in unlabelled files, whose lines
may start with a TAB); integers ``[+-]?[0-9]+`` within int64; categoricals 8 hex characters
(either case, kept as written); empty field = missing; fewer fields than expected = missing
trailing fields; more = rejected; empty or non-UTF-8 lines are rejected, and so is a line of
an unlabelled file with no value at all (only TABs: it would be a row of nulls).
"""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from pipelines.criteo.schema import DENSE, LABELED_FIELDS, NUM_DENSE, SPARSE, UNLABELED_FIELDS

ROW_SCHEMA = pa.schema(
    [pa.field("label", pa.int32())]
    + [pa.field(c, pa.int64()) for c in DENSE]
    + [pa.field(c, pa.string()) for c in SPARSE]
)
_FAST_BYTES = b"0123456789abcdefABCDEF+-\t\n"  # the careful tier parses lines of only these
_INT_RE = re.compile(r"[+-]?[0-9]+")
_HEX_RE = re.compile(r"[0-9a-fA-F]{8}")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

Reject = tuple[bytes, str, int]
NO_VALUES = "no values (every field empty)"  # a line of only TABs in an unlabelled file
EMPTY_LINE = "empty line"


def _names(labeled: bool) -> list[str]:
    return (["label"] if labeled else []) + DENSE + SPARSE


# 2 MiB tokenizer blocks stay in cache: ~12% less CPU than 4 MiB (0.106 vs 0.120 s per 32 MiB
# of Criteo lines); 32 MiB blocks cost 2.5x. Arrow's reader fails on a row longer than a block
# ("straddling object straddles two block boundaries"), so longer lines (never a valid Criteo
# line's size in practice: ~200 bytes) skip it for the per-line parser.
_TEXT_BLOCK = 2 << 20
_TEXT_MAX_LINE = _TEXT_BLOCK // 4


def _read_text(buf, labeled: bool) -> pa.Table:
    """Arrow's CSV tokenizer over ``buf`` (lines padded to the expected field count), every
    column as text."""
    names = _names(labeled)
    return pcsv.read_csv(
        pa.py_buffer(buf) if isinstance(buf, (bytes, bytearray, memoryview)) else buf,
        read_options=pcsv.ReadOptions(column_names=names, use_threads=False, block_size=_TEXT_BLOCK),
        parse_options=pcsv.ParseOptions(
            delimiter="\t", quote_char=False, double_quote=False, escape_char=False, ignore_empty_lines=False,
        ),
        convert_options=pcsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, strings_can_be_null=True, null_values=[""],
            quoted_strings_can_be_null=False,
        ),
    )


def parse_block(block: bytes, labeled: bool, lines: int | None = None) -> tuple[pa.Table, list[Reject]]:
    """Parse a block of complete lines (see the module docstring). ``lines``: the block's
    newline count when the caller has it (saves a pass over the bytes)."""
    if not block:
        return ROW_SCHEMA.empty_table(), []
    if not block.endswith(b"\n"):
        raise ValueError("parse_block needs complete lines: the block must end with a newline")
    lines = block.count(b"\n") if lines is None else lines
    rows = _fast(block, labeled, lines)
    if rows is not None:
        return rows, []
    if b"\r\n" in block:  # the careful tier's byte checks know LF line ends only
        block = block.replace(b"\r\n", b"\n")
    return _careful(block, labeled)


# --------------------------------------------------------------------------------- fast
def _fast(block: bytes, labeled: bool, lines: int) -> pa.Table | None:
    from pipelines.criteo.scan import scan_block  # Numba: imported where lines are parsed, not by every user of ROW_SCHEMA

    return scan_block(block, labeled, lines, ROW_SCHEMA)


# ------------------------------------------------------------------------------ careful
def _careful(block: bytes, labeled: bool) -> tuple[pa.Table, list[Reject]]:
    expected = LABELED_FIELDS if labeled else UNLABELED_FIELDS
    a = np.frombuffer(block, dtype=np.uint8)
    nl = np.flatnonzero(a == 10)
    starts = np.concatenate(([0], nl[:-1] + 1))
    lengths = nl - starts
    # per-line reductions over [start, next start): each segment holds at least its newline
    fields = np.add.reduceat(a == 9, starts, dtype=np.int32) + 1
    odd = np.ones(256, dtype=bool)
    odd[list(_FAST_BYTES)] = False
    has_odd = np.logical_or.reduceat(odd[a], starts)
    cand = (lengths > 0) & (lengths <= _TEXT_MAX_LINE) & (fields <= expected) & ~has_odd
    ids = np.flatnonzero(cand)
    rejects: list[Reject] = []
    good_slow: list[dict] = []

    def exact(line_ids) -> None:
        for i in line_ids:
            raw = block[starts[i]:nl[i]]
            row, reason, n = _parse_line(raw, labeled)  # CR LF already made LF
            if row is None:
                rejects.append((raw, reason, n))
            else:
                good_slow.append(row)

    exact(np.flatnonzero(~cand))
    tables = []
    if len(ids):
        buf = a if len(ids) == len(lengths) else a[np.repeat(cand, lengths + 1)]
        fast = _fast(buf.tobytes(), labeled, len(ids))  # typically: the odd lines were all bad ones
        if fast is not None:
            tables.append(fast)
            ids = ids[:0]
    if len(ids):
        pad = expected - fields[ids]
        if pad.any():  # Arrow's reader needs every field
            new_nl = np.cumsum(lengths[ids] + 1) - 1
            buf = np.insert(buf, np.repeat(new_nl, pad), 9)
        buf = buf.tobytes()
        t = _read_text(buf, labeled)
        ok = np.ones(t.num_rows, dtype=bool)
        if labeled:
            lab = t.column("label")
            ok &= pc.fill_null(pc.is_in(lab, pa.array(["0", "1"])), False).to_numpy(zero_copy_only=False)
        ints = {}
        for c in DENSE:
            col = t.column(c)
            m = pc.match_substring_regex(col, r"^-?[0-9]{1,18}$")
            ok &= pc.fill_null(m, True).to_numpy(zero_copy_only=False)
            ints[c] = col
        for c in SPARSE:
            m = pc.match_substring_regex(t.column(c), r"^[0-9a-fA-F]{8}$")
            ok &= pc.fill_null(m, True).to_numpy(zero_copy_only=False)
        if not labeled:  # a line of only TABs: no value, not a row (the exact tier says why)
            has_value = np.zeros(t.num_rows, dtype=bool)
            for c in DENSE + SPARSE:
                has_value |= t.column(c).is_valid().to_numpy(zero_copy_only=False)
            ok &= has_value
        exact(ids[~ok])
        if ok.any():
            mask = pa.array(ok)
            cols = {"label": pc.cast(t.column("label").filter(mask), pa.int32()) if labeled
                    else pa.nulls(int(ok.sum()), pa.int32())}
            for c in DENSE:
                cols[c] = pc.cast(ints[c].filter(mask), pa.int64())
            for c in SPARSE:
                cols[c] = t.column(c).filter(mask)
            tables.append(pa.table(cols, schema=ROW_SCHEMA))
    if good_slow:
        tables.append(pa.Table.from_pylist(good_slow, schema=ROW_SCHEMA))
    rows = pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()
    return rows, rejects


# -------------------------------------------------------------------------------- exact
def parse_line(raw: bytes, labeled: bool) -> tuple[dict | None, str | None, int]:
    """One line (without its line end: LF, or CR LF) -> (row, None, fields) or (None, reason,
    fields). A final CR is taken as part of a CR LF line end."""
    return _parse_line(raw[:-1] if raw.endswith(b"\r") else raw, labeled)


def _parse_line(raw: bytes, labeled: bool) -> tuple[dict | None, str | None, int]:
    """:func:`parse_line` of a line without any line end: a CR in it is a bad byte."""
    expected = LABELED_FIELDS if labeled else UNLABELED_FIELDS
    n = raw.count(b"\t") + 1
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "undecodable bytes (not UTF-8)", n
    if not text:
        return None, EMPTY_LINE, n
    if n > expected:
        return None, f"too many fields (expected {expected}, got {n})", n
    parts = text.split("\t")
    parts += [""] * (expected - len(parts))
    row: dict = {}
    if labeled:
        lab = parts.pop(0)
        if lab not in ("0", "1"):
            return None, "label not 0/1", n
        row["label"] = int(lab)
    else:
        row["label"] = None
    for c, s in zip(DENSE, parts[:NUM_DENSE]):
        if s == "":
            row[c] = None
            continue
        if not _INT_RE.fullmatch(s):
            return None, f"non-integer in {c}", n
        # leading zeros dropped first and past 19 digits out of range: int() refuses a string of
        # more than 4,300 digits (a ValueError that once failed the whole ingest)
        sign, digits = (s[0], s[1:]) if s[0] in "+-" else ("", s)
        digits = digits.lstrip("0") or "0"
        if len(digits) > 19 or not _INT64_MIN <= (v := int(sign + digits)) <= _INT64_MAX:
            return None, f"integer out of range in {c}", n
        row[c] = v
    for c, s in zip(SPARSE, parts[NUM_DENSE:]):
        if s == "":
            row[c] = None
        elif _HEX_RE.fullmatch(s):
            row[c] = s
        else:
            return None, f"{c} not 8 hex chars", n
    if not labeled and not any(s != "" for s in parts):
        return None, NO_VALUES, n
    return row, None, n
