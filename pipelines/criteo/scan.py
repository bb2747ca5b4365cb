"""Compiled scanner for plain Criteo lines: :func:`pipelines.criteo.parse.parse_block`'s fast tier.

    table = scan_block(block, labeled=True, lines=block.count(b"\\n"))   # None: not plain

One pass over the bytes (a Numba kernel, compiled once per machine and cached next to this
file) that tokenizes, validates and converts at once: each integer is accumulated as it is
read, each categorical's 8 bytes are packed into one uint64 word, and every rule is checked on
the way. The Arrow table is then built without copying: a categorical column's string data
IS its row of words (every value 8 bytes, so its offsets are ``0, 8, 16, ...``, shared by the
26 columns); a null value is an 8-byte slot of zeros marked invalid, which Arrow allows.

It takes a block only if every line is *plain*, else returns None (and the caller's careful
tier handles the block):

- not empty; in a labelled file the first field is exactly ``0`` or ``1``;
- integers ``[+-]?[0-9]{1,18}`` (so always within int64), or empty;
- categoricals exactly 8 characters of ``[0-9a-fA-F]`` (kept as written), or empty;
- at most the expected fields (40 labelled, 39 unlabelled); fewer are missing trailing fields;
- in an unlabelled file, at least one value (a line of only TABs is not plain);
- lines end in LF or CR LF (a CR anywhere else is not plain).

These are the rules of :func:`pipelines.criteo.parse.parse_line`, restricted: a line the
scanner takes parses to the same row there, and a line it does not take (an integer written
with 19 or more digits, leading zeros included, is the only valid kind) is left to the careful
tier.

Why compiled: Arrow's CSV tokenizer plus the whole-column checks the rules then need cost
0.37 CPU-s per 128 MiB of Criteo lines; this pass costs 0.11 s for the same rows, bit for bit
(docs/criteo.md, "Measured").
"""
from __future__ import annotations

import sys

import numba
import numpy as np
import pyarrow as pa

from pipelines.criteo.kernel_cache import cached_njit
from pipelines.criteo.schema import NUM_DENSE, NUM_SPARSE

_HEX = np.zeros(256, dtype=np.bool_)
_HEX[list(b"0123456789abcdefABCDEF")] = True
_LITTLE_ENDIAN = sys.byteorder == "little"
_MAX_DIGITS = 18  # 10^18 - 1 < 2^63: no overflow check per digit


@numba.njit(inline="always")
def _step(c):  # pragma: no cover (compiled)
    """After a field: TAB -> 1 (step to the next field), newline -> 0 (the line ended), else -1
    (the caller then checks for a CR LF line end: off the hot path, which a combined check
    here slowed 2.6x)."""
    return 1 if c == 9 else (0 if c == 10 else -1)


@numba.njit(inline="always")
def _crlf(buf, pos):  # pragma: no cover (compiled)
    """Is the byte at ``pos`` the CR of a CR LF? (A block ends with LF: ``pos + 1`` exists.)"""
    return buf[pos] == 13 and buf[pos + 1] == 10


@cached_njit(nogil=True, boundscheck=False)
def _scan(buf, labeled, label, ints, ivalid, words, cvalid):  # pragma: no cover (compiled)
    """Fill the column arrays from ``buf`` (complete lines, the last ending in a newline).
    Returns the rows scanned, or ``-(1 + i)`` where line ``i`` is not plain."""
    n = buf.shape[0]
    cap = label.shape[0]
    pos = 0
    row = 0
    while pos < n:
        if row >= cap or buf[pos] == 10 or _crlf(buf, pos):
            return -(row + 1)  # more lines than the caller counted, or an empty line (LF or CR LF)
        step = 1  # after each field: 1 (TAB) a field follows, 0 (LF or CR LF) the line ended
        if labeled:
            c = buf[pos]
            if c != 48 and c != 49:
                return -(row + 1)
            label[row] = c - 48
            pos += 1
            step = _step(buf[pos])
            if step < 0:
                if not _crlf(buf, pos):
                    return -(row + 1)
                pos += 1  # onto the LF, where the line ends
                step = 0
            pos += step
        for j in range(NUM_DENSE):
            if step == 0:
                ivalid[j, row] = False
                ints[j, row] = 0
                continue
            c = buf[pos]
            sign = 0
            if c == 45 or c == 43:  # '-' or '+'
                sign = c
                pos += 1
                c = buf[pos]
            v = 0
            digits = 0
            while c >= 48 and c <= 57:
                v = v * 10 + (c - 48)
                digits += 1
                pos += 1
                c = buf[pos]
            if digits > _MAX_DIGITS or (digits == 0 and sign != 0):
                return -(row + 1)
            ints[j, row] = -v if sign == 45 else v
            ivalid[j, row] = digits != 0
            step = _step(c)
            if step < 0:
                if not _crlf(buf, pos):
                    return -(row + 1)
                pos += 1  # onto the LF, where the line ends
                step = 0
            pos += step
        for j in range(NUM_SPARSE):
            if step == 0:
                cvalid[j, row] = False
                words[j, row] = 0
                continue
            c = buf[pos]
            if c == 9 or c == 10 or c == 13:  # empty (a CR must start a CR LF: checked below)
                cvalid[j, row] = False
                words[j, row] = 0
            else:
                if pos + 8 >= n:
                    return -(row + 1)
                w = np.uint64(0)
                for k in range(8):
                    b = buf[pos + k]
                    if not _HEX[b]:
                        return -(row + 1)
                    w |= np.uint64(b) << np.uint64(8 * k)  # little-endian: the word's bytes are the text
                words[j, row] = w
                cvalid[j, row] = True
                pos += 8
                c = buf[pos]
            step = _step(c)
            if step < 0:
                if not _crlf(buf, pos):
                    return -(row + 1)
                pos += 1  # onto the LF, where the line ends
                step = 0
            pos += step
        if step != 0:
            return -(row + 1)  # a TAB after the last field: too many fields
        pos += 1
        row += 1
    return row


def _validity(valid: np.ndarray) -> pa.Buffer:
    return pa.py_buffer(np.packbits(valid, bitorder="little"))


def scan_block(block: bytes, labeled: bool, lines: int, schema: pa.Schema) -> pa.Table | None:
    """``block``'s rows as a table of ``schema`` (label int32, 13 int64, 26 string), or None
    when a line is not plain. ``lines``: the block's newline count."""
    if not _LITTLE_ENDIAN or 8 * lines >= 1 << 31:
        # the words would not read back as the text, or int32 offsets would overflow (blocks
        # are 16 MiB): the careful tier parses it
        return None
    a = np.frombuffer(block, dtype=np.uint8)
    label = np.empty(lines, dtype=np.int32)
    ints = np.empty((NUM_DENSE, lines), dtype=np.int64)
    ivalid = np.empty((NUM_DENSE, lines), dtype=np.bool_)
    words = np.empty((NUM_SPARSE, lines), dtype=np.uint64)
    cvalid = np.empty((NUM_SPARSE, lines), dtype=np.bool_)
    if _scan(a, labeled, label, ints, ivalid, words, cvalid) != lines:
        return None
    if not labeled and not (ivalid.any(axis=0) | cvalid.any(axis=0)).all():
        return None  # a line of only TABs: no value, rejected by the careful tier
    cols = [pa.array(label) if labeled else pa.nulls(lines, pa.int32())]
    cols += [
        pa.Array.from_buffers(pa.int64(), lines, [_validity(ivalid[j]), pa.py_buffer(ints[j])])
        for j in range(NUM_DENSE)
    ]
    offsets = pa.py_buffer(np.arange(0, 8 * lines + 1, 8, dtype=np.int32))
    cols += [
        pa.Array.from_buffers(pa.string(), lines, [_validity(cvalid[j]), offsets, pa.py_buffer(words[j])])
        for j in range(NUM_SPARSE)
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def warm_up() -> None:
    """Compile (or load from the cache) the kernel now: the Spark worker daemon calls this
    before it forks, so that no task pays for it."""
    line = b"1\t" + b"\t" * (NUM_DENSE - 1) + b"0\t" + b"\t".join([b"68fd1e64"] * NUM_SPARSE) + b"\n"
    a = np.frombuffer(line, dtype=np.uint8)
    _scan(a, True, np.empty(1, np.int32), np.empty((NUM_DENSE, 1), np.int64), np.empty((NUM_DENSE, 1), np.bool_),
          np.empty((NUM_SPARSE, 1), np.uint64), np.empty((NUM_SPARSE, 1), np.bool_))
