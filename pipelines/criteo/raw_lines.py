"""Reading a raw file's lines: blocks of complete lines from a byte range of a plain file or a
whole (multi-member) gzip file, local or on an object store.

:func:`iter_line_blocks` is what an ingest task parses; a truncated or corrupt gzip, or a file
removed since it was listed, raises :class:`ReadFailure` naming the file (the task reports it
and the driver fails that file alone). Memory is bounded by the block size whatever the
compression ratio. :func:`scan_file` and :func:`file_sha256` read a file whole for its hash.
"""
from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Iterator

from pipelines import raw_inputs

log = logging.getLogger(__name__)

_BLOCK = 4 << 20
_TAIL = 64 << 10  # bytes read past a range's end for its last line (more if that line is longer)
GZIP_MAGIC = b"\x1f\x8b"


try:  # ISA-L's inflate: 2.6x less CPU than zlib's for gzip'd day files (docs/criteo.md)
    from isal import isal_zlib as _inflate_lib
except ImportError:  # pragma: no cover (a platform without its wheels): zlib, same results
    _inflate_lib = zlib


BOM = b"\xef\xbb\xbf"


class ReadFailure(Exception):
    """An unreadable input file, found while reading it. An ingest task returns it as a result
    (:func:`pipelines.criteo.ingest.run_item`) and the driver raises
    :class:`~pipelines.criteo.ingest.CorruptInputError`."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


# a file removed (or made unreadable) after it was listed fails alone, as a damaged one does; other
# read errors (a store's timeout) fail the task, which Spark retries
GONE = (FileNotFoundError, PermissionError)


def gone_reason(e: OSError) -> str:
    return f"could not be read since it was listed ({type(e).__name__}: {e.strerror or e})"


def _ended_early(path: str, pos: int, end: int, exact: bool = True) -> ReadFailure:
    """A plain file that ended before the byte its range was planned to reach: it was truncated
    (or is being rewritten) since it was listed."""
    at = f"at byte {pos:,}" if exact else f"at or before byte {pos:,}"
    return ReadFailure(path, f"ended {at}, where it was listed with {end:,} bytes or more: it changed while it "
                             "was read (a copy or download still in progress?)")


def _read_plain(f, path: str, start: int, end: int | None, block_bytes: int, hasher) -> Iterator[bytearray]:
    """Blocks of the complete lines that START in [start, end) (a line belongs to the range
    holding its first byte, so adjacent ranges split a file without loss or overlap); the file's
    last line may lack its newline.

    Each block is read straight into a new ``bytearray`` and cut after its last newline; the
    partial line after the cut is read again with the next block (a seek back), so the bytes
    are copied once, by the read. A line longer than ``block_bytes`` grows its block.

    The file ending before ``end`` raises :class:`ReadFailure` naming it: the range was planned from the
    size the file was listed with, so it shrank since. Until the twenty-ninth session that read
    as the file's end: a file truncated while ingest read it (an in-place copy over it) was
    ledgered as ingested, and its rows past the cut were never read again."""
    if start > 0:
        f.seek(start - 1)
        pos = start - 1
        while True:  # skip the partial line that began before the range
            piece = f.read(1 << 16)
            if not piece:
                if end is not None and pos < end:  # nothing read at all: it ends at or before pos
                    raise _ended_early(path, pos, end, exact=pos > start - 1)
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
            if end is not None:  # the loop runs while pos < end
                raise _ended_early(path, pos, end)
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
    newline); a truncated or corrupt file raises :class:`ReadFailure` naming it (whatever was
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
            raise ReadFailure(path, f"inflate error: {e}") from None
        except _BadGzip as e:
            raise ReadFailure(path, str(e)) from None


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
                if not data.startswith(GZIP_MAGIC[: len(data)]):
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
    except GONE as e:  # raised by the read alone: the caller's own errors are not sent in here
        raise ReadFailure(path, gone_reason(e)) from None


def _line_blocks(path: str, gz: bool, start: int, end: int | None, block_bytes: int, hasher) -> Iterator[bytes]:
    with raw_inputs.open_read(path, sequential=True, stop=end) as f:
        if gz:
            if start or end is not None:
                raise ValueError("gzip files cannot be split into byte ranges")
            blocks = _read_gzip(f, path, block_bytes, hasher)
        else:
            blocks = _read_plain(f, path, start, end, block_bytes, hasher)
        if start == 0:  # a UTF-8 byte order mark (a file saved by some Windows tools) is no data
            first = next(blocks, None)
            if first is None:
                return
            if first.startswith(BOM):  # before a final newline is added: a file of just a BOM has no line
                first = first[len(BOM):]
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
    except ReadFailure as e:
        error = e.why
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    return {"path": path, "sha256": h.hexdigest(), "lines": lines, "error": error}


def file_sha256(path: str) -> str:
    with raw_inputs.open_read(path, sequential=True) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # type: ignore[arg-type]
