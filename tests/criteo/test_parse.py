"""Raw line parsing (pipelines.criteo.parse) and byte-range reading: no Spark, so fast.

Every tier of parse_block (fast, careful, exact) must give what the per-line reference
parse_line gives, line by line; byte ranges must cover every line exactly once."""
from __future__ import annotations

import gzip
import random
import re
import zlib
from pathlib import Path

import pytest

from pipelines.criteo import parse
from pipelines.criteo.raw_lines import iter_line_blocks
from pipelines.criteo.parse import parse_block, parse_line

GOOD = "0\t1\t2\t3\t4\t5\t6\t7\t8\t9\t10\t11\t12\t13\t" + "\t".join(["68fd1e64"] * 26)
BAD = {  # line -> reason
    GOOD + "\textra": "too many fields (expected 40, got 41)",
    GOOD.replace("\t5\t", "\tfive\t", 1): "non-integer in I5",
    GOOD.replace("\t5\t", "\t 5\t", 1): "non-integer in I5",
    GOOD.replace("\t5\t", "\t-\t", 1): "non-integer in I5",
    GOOD.replace("\t5\t", "\t5-\t", 1): "non-integer in I5",
    GOOD.replace("\t5\t", "\t99999999999999999999\t", 1): "integer out of range in I5",
    GOOD.replace("\t5\t", "\t9223372036854775808\t", 1): "integer out of range in I5",
    GOOD.replace("\t5\t", "\t" + "1" * 4301 + "\t", 1): "integer out of range in I5",  # past int()'s limit
    GOOD.replace("68fd1e64", "zzzz", 1): "C1 not 8 hex chars",
    GOOD.replace("68fd1e64", "68fd1e6", 1): "C1 not 8 hex chars",
    GOOD.replace("68fd1e64", "68fd1e6g", 1): "C1 not 8 hex chars",
    GOOD.replace("68fd1e64", "68fd-e64", 1): "C1 not 8 hex chars",
    GOOD.replace("68fd1e64", "68fd+e64", 1): "C1 not 8 hex chars",
    GOOD.replace("68fd1e64", "68fd1e64a", 1): "C1 not 8 hex chars",
    "7" + GOOD[1:]: "label not 0/1",
    "00" + GOOD[1:]: "label not 0/1",
    "-1" + GOOD[1:]: "label not 0/1",
    "\t" + GOOD[2:]: "label not 0/1",
    GOOD.replace("\t68fd1e64", "\t68fd1e64\r", 1): "C1 not 8 hex chars",  # a CR not at the line end
    GOOD.replace("\t68fd1e64", "\t\r68fd1e64", 1): "C1 not 8 hex chars",
    "": "empty line",
    "\r": "empty line",  # CR LF
    GOOD + "\r\r": "C26 not 8 hex chars",  # CR CR LF: one CR is the line end's, the other a bad byte
}
ODD_BUT_VALID = [
    "\t".join(GOOD.split("\t")[:38]),  # stripped trailing TABs
    "\t".join(GOOD.split("\t")[:15]),
    GOOD.replace("\t5\t", "\t+5\t", 1),
    GOOD.replace("68fd1e64", "68FD1E64", 1),
    GOOD.replace("\t1\t2\t", "\t1\t-2\t", 1),
    GOOD.replace("\t5\t", "\t-0\t", 1),
    GOOD.replace("\t5\t", "\t9223372036854775807\t", 1),
    GOOD.replace("\t5\t", "\t-9223372036854775808\t", 1),
    GOOD.replace("\t5\t", "\t-" + "0" * 4300 + "5\t", 1),  # leading zeros past int()'s 4,300 digits
    GOOD.replace("\t5\t", "\t\t", 1).replace("68fd1e64", "", 3),
    GOOD + "\r",  # CR LF line ends (a file saved on Windows)
    "1\r",
    "\t".join(GOOD.split("\t")[:38]) + "\r",
]


def _block(lines: list[str | bytes]) -> bytes:
    return b"".join((ln.encode() if isinstance(ln, str) else ln) + b"\n" for ln in lines)


def _reference(lines: list[str | bytes], labeled: bool = True):
    rows, rejects = [], []
    for ln in lines:
        raw = ln.encode() if isinstance(ln, str) else ln
        row, reason, n = parse_line(raw, labeled)
        # a rejected line is shown without its line end, LF or CR LF
        (rows.append(row) if row is not None else rejects.append((raw.removesuffix(b"\r"), reason, n)))
    return rows, rejects


def _key(row: dict) -> str:
    return repr(sorted(row.items()))


def _assert_like_reference(lines, labeled=True):
    rows, rejects = parse_block(_block(lines), labeled)
    want_rows, want_rejects = _reference(lines, labeled)
    assert sorted(map(_key, rows.to_pylist())) == sorted(map(_key, want_rows))
    assert sorted(rejects) == sorted(want_rejects)
    assert rows.num_rows + len(rejects) == len(lines)
    assert rows.schema == parse.ROW_SCHEMA
    return rows, rejects


def test_reasons():
    for line, reason in BAD.items():
        assert parse_line(line.encode(), True)[1] == reason, line[:40]
    assert parse_line(GOOD.encode().replace(b"68fd", b"\xff\xfe", 1), True)[1] == "undecodable bytes (not UTF-8)"
    assert parse_line(GOOD.replace("\t5\t", "\t-" + "0" * 4300 + "5\t", 1).encode(), True)[0]["I5"] == -5


@pytest.mark.parametrize("line", [*BAD, *ODD_BUT_VALID])
def test_each_odd_line_among_good_ones(line):
    """A single odd line sends its block down the careful path; every line still gets exactly
    the reference result (no wrong row, no lost good row)."""
    _assert_like_reference([GOOD, line, GOOD.replace("\t1\t2\t", "\t1\t-2\t")] * 3)


def test_everything_at_once_and_undecodable():
    lines = [GOOD] * 10 + list(BAD) + ODD_BUT_VALID + [GOOD.encode().replace(b"68fd", b"\xff\xfe", 1)]
    rows, rejects = _assert_like_reference(lines)
    assert len(rejects) == len(BAD) + 1
    padded = [r for r in rows.to_pylist() if r["C25"] is None and r["C24"] == "68fd1e64"]
    assert len(padded) == 2 and padded[0]["C26"] is None  # the stripped line, with LF and with CR LF


@pytest.mark.parametrize("field, filler", [(18, "a"), (5, "1"), (18, "0")])
def test_a_line_of_megabytes_is_judged_alone(field, filler):
    """A 5 MiB line of characters the careful tier's tokenizer takes (hex letters, digits) is
    longer than Arrow's reader blocks, which fail on it: it is judged by the per-line parser
    (quarantined, or kept if valid: zero-padded integers are) and the other lines stand."""
    f = GOOD.split("\t")
    f[field] = filler * (5 << 20) + ("5" if filler == "0" else "")
    rows, rejects = _assert_like_reference([GOOD, "\t".join(f), GOOD.replace("\t1\t2\t", "\t1\t-2\t")])
    assert rows.num_rows + len(rejects) == 3 and rows.num_rows >= 2


def test_fast_path_takes_canonical_blocks_and_is_exact():
    lines = [GOOD, GOOD.replace("\t5\t", "\t-5\t"), GOOD.replace("\t5\t", "\t\t").replace("68fd1e64", "", 3)] * 50
    block = _block(lines)
    assert parse._fast(block, True, block.count(b"\n")) is not None
    _assert_like_reference(lines)
    # every valid line but one with an integer of 19 or more digits (leading zeros count) is
    # plain: the fast tier takes it, exactly
    for odd in ODD_BUT_VALID:
        block = _block([GOOD, odd])
        fast = parse._fast(block, True, 2)
        assert (fast is None) == bool(re.search(r"[0-9]{19}", odd)), odd[:30]
        if fast is not None:
            assert fast.to_pylist() == _reference([GOOD, odd])[0], odd[:30]
    for bad in BAD:
        block = _block([GOOD, bad])
        assert parse._fast(block, True, block.count(b"\n")) is None, bad[:30]
    for empty in ("", "\r"):  # an empty line (LF or CR LF) is not a row of missing values
        unlabeled = _block(["\t".join(GOOD.split("\t")[1:]), empty])
        assert parse._fast(unlabeled, False, 2) is None


def test_fast_path_keeps_nulls_out_of_the_data():
    """Null categoricals are zeroed 8-byte slots: valid Arrow, and nothing left over from
    earlier memory shows through a buffer-level reader."""
    block = _block([GOOD.replace("68fd1e64", "", 2), GOOD] * 3)
    t = parse._fast(block, True, 6)
    t.validate(full=True)
    c1 = t.column("C1").chunk(0)
    assert c1.null_count == 3 and c1.buffers()[2].to_pybytes()[:8] == b"\0" * 8
    assert t.column("I1").to_pylist() == [1] * 6 and t.column("label").null_count == 0


def test_fast_path_rejects_a_line_count_it_was_not_told():
    block = _block([GOOD] * 3)
    assert parse._fast(block, True, 2) is None and parse._fast(block, True, 4) is None


def test_unlabelled_lines_may_start_with_a_tab():
    test_line = GOOD.split("\t", 1)[1]
    lines = [test_line, "\t" + test_line.split("\t", 1)[1], GOOD]  # the last has 40 fields: too many
    rows, rejects = _assert_like_reference(lines, labeled=False)
    assert rows.column("label").null_count == 2 and rows.column("I1").to_pylist() == [1, None]
    assert [r[1] for r in rejects] == ["too many fields (expected 39, got 40)"]


@pytest.mark.parametrize("line", ["\t", "\t" * 38, "\t" * 38 + "\r", "\t\t\t"])
def test_an_unlabelled_line_of_only_tabs_is_no_row(line):
    """A line of an unlabelled file with no value at all is rejected in every tier, as an
    empty line is; in a labelled file its empty label rejects it. Until the twenty-seventh
    session it went into bronze as a row of nulls (the ingest probe)."""
    test_line = GOOD.split("\t", 1)[1]
    assert parse_line(line.encode(), False)[1] == parse.NO_VALUES
    assert parse_line(line.encode(), True)[1] == "label not 0/1"
    block = _block([test_line, line])
    assert parse._fast(block, False, 2) is None
    for lines in ([test_line, line, test_line], [line], [test_line, "x", line]):
        rows, rejects = _assert_like_reference(lines, labeled=False)
        assert [r[1] for r in rejects if r[1] != "C1 not 8 hex chars" and r[1] != "non-integer in I1"] == [
            parse.NO_VALUES]
    # one value anywhere is a row (a test row with only C26, say)
    _assert_like_reference([test_line, "\t" * 38 + "68fd1e64", "5" + "\t" * 38], labeled=False)


def test_real_samples_like_reference(criteo_shared):
    for p in sorted(criteo_shared.glob("*.txt")):
        labeled = "test" not in p.name
        lines = p.read_bytes().rstrip(b"\n").split(b"\n")
        rows, rejects = _assert_like_reference(lines, labeled)
        assert not rejects, p.name


def test_randomised_against_reference():
    rng = random.Random(0)
    pieces = ["", "0", "1", "-3", "+4", "12345678901234567890", "68fd1e64", "ABCDEF01", "zz", " 1", "5\r"]
    lines = []
    for _ in range(400):
        f = GOOD.split("\t")
        for _ in range(rng.randrange(3)):
            f[rng.randrange(40)] = rng.choice(pieces)
        f = f[: rng.choice([40, 40, 40, 38, 41, 20])]
        lines.append("\t".join(f))
    _assert_like_reference(lines)


def test_fast_path_fuzz_takes_plain_lines_and_never_differs_from_reference():
    """Random plain lines (any mix of empty, signed, zero-padded and 18-digit integers, either
    case of hex, stripped trailing fields, LF or CR LF ends): the fast tier takes every block and agrees with
    parse_line row for row. Random byte edits of them: whatever the fast tier still takes is
    exactly what parse_line gives, and the rest is left to the careful tier."""
    rng = random.Random(7)
    ints = ["", "0", "7", "-3", "+4", "007", "-0", "999999999999999999", "-123456789012345678"]
    cats = ["", "68fd1e64", "ABCDEF01", "0a0B0c0D", "00000000"]

    def plain(labeled: bool) -> str:
        f = ([rng.choice("01")] if labeled else []) + [rng.choice(ints) for _ in range(13)] + [
            rng.choice(cats) for _ in range(26)]
        return "\t".join(f[: rng.choice([len(f)] * 4 + [1, 2, 14, 20, 38])])

    for labeled in (True, False):
        lines = [plain(labeled) for _ in range(300)]
        # an empty line, or an unlabelled one of only TABs, is never plain
        lines = [(ln if ln.strip("\t") else "0" + ln) + rng.choice(["", "", "\r"]) for ln in lines]
        block = _block(lines)
        fast = parse._fast(block, labeled, len(lines))
        assert fast is not None
        assert fast.to_pylist() == _reference(lines, labeled)[0]
        for _ in range(300):
            raw = bytearray(plain(labeled).encode() or b"1")
            raw[rng.randrange(len(raw))] = rng.choice(b"\t-+0aAgG \x00\xff9.\r")
            got = parse._fast(bytes(raw) + b"\n", labeled, 1)
            want, rejects = _reference([bytes(raw)], labeled)
            if got is not None:
                assert not rejects and got.to_pylist() == want, raw


# ------------------------------------------------------------------------ byte ranges
def _ranges(path: Path, size: int, chunk: int, block: int) -> list[bytes]:
    out = []
    for s in range(0, max(size, 1), chunk):
        for b in iter_line_blocks(str(path), False, s, min(s + chunk, size), block):
            out += b.split(b"\n")[:-1]
    return out


@pytest.mark.parametrize("block", [7, 1 << 10])
def test_a_file_shorter_than_its_range_is_a_read_failure(tmp_path, block):
    """A range planned from a file's listed size that meets the file's end early means the file
    shrank since it was listed (truncated, or an in-place copy over it in progress). It read as
    the file's end: ingest ledgered the file as ingested with the lines before the cut, and
    skipped it for good once the copy completed (the hard-failure probe)."""
    from pipelines.criteo.raw_lines import ReadFailure

    lines = [f"{i % 2}\t{i}".encode() for i in range(100)]
    body = b"\n".join(lines) + b"\n"
    path = tmp_path / "day_0"
    path.write_bytes(body)
    listed = len(body)
    assert b"".join(iter_line_blocks(str(path), False, 0, listed, block)) == body  # as listed: all of it
    assert b"".join(iter_line_blocks(str(path), False, 0, None, block)) == body
    path.write_bytes(body[:400])  # truncated since it was listed, mid-line
    for start, end, at in ((0, listed, "at byte 400"), (200, listed, "at byte 400"), (380, 500, "at byte 400"),
                           (450, listed, "at or before byte 449")):
        with pytest.raises(ReadFailure) as e:
            list(iter_line_blocks(str(path), False, start, end, block))
        assert str(e.value) == (f"{path}: ended {at}, where it was listed with {end} bytes or more: it changed while it "
                                "was read (a copy or download still in progress?)")
    # a range that ends before the cut reads as before
    assert b"".join(iter_line_blocks(str(path), False, 0, 300, block)) == b"\n".join(
        ln for ln in body[:400].split(b"\n") if body.find(ln + b"\n") < 300 and ln) + b"\n"


@pytest.mark.parametrize("final_newline", [True, False])
@pytest.mark.parametrize("tail", [64 << 10, 1, 5])  # bytes read past a range's end (grown when short)
def test_byte_ranges_cover_every_line_once(tmp_path, monkeypatch, final_newline, tail):
    from pipelines.criteo import raw_lines

    monkeypatch.setattr(raw_lines, "_TAIL", tail)
    rng = random.Random(1)
    lines = [("x" * rng.randrange(0, 90)) for _ in range(500)]  # includes empty lines
    body = "\n".join(lines) + ("\n" if final_newline else "")
    p = tmp_path / "day_0"
    p.write_text(body)
    for chunk in (1, 7, 64, 1000, 1 << 20):
        for block in (1 << 12, 10):
            assert _ranges(p, len(body), chunk, block) == [ln.encode() for ln in lines], (chunk, block)


@pytest.mark.parametrize("unit,depth", [(7, 1), (100, 2), (4096, 4)])
def test_byte_ranges_through_read_ahead(tmp_path, monkeypatch, unit, depth):
    """The line reader over ReadAheadFile (how tasks read object-store files), with blocks
    smaller than lines, than the reader's blocks, and larger: the same lines as a local read,
    for plain ranges and gzip."""
    import pyarrow.fs as pafs

    from pipelines import raw_inputs

    def open_read(name, sequential=False, stop=None):
        f = pafs.LocalFileSystem().open_input_file(name)
        return raw_inputs.ReadAheadFile(f, stop=stop, unit=unit, depth=depth) if sequential else f

    rng = random.Random(unit)
    lines = [("y" * rng.randrange(0, 90)) for _ in range(400)]
    body = "\n".join(lines) + "\n"
    p = tmp_path / "day_0"
    p.write_text(body)
    gz = tmp_path / "day_1.gz"
    gz.write_bytes(gzip.compress(body.encode()))
    monkeypatch.setattr(raw_inputs, "open_read", open_read)
    for chunk in (7, 1000, 1 << 20):
        for block in (1 << 12, 10):
            assert _ranges(p, len(body), chunk, block) == [ln.encode() for ln in lines], (chunk, block)
    assert b"".join(iter_line_blocks(str(gz), True, block_bytes=1 << 10)) == body.encode()


def test_read_ahead_file_matches_the_file(tmp_path):
    """Random seeks and reads (inside and outside the read-ahead window, past the end)."""
    import pyarrow.fs as pafs

    from pipelines.raw_inputs import ReadAheadFile

    data = bytes(random.Random(3).randrange(256) for _ in range(50_000))
    p = tmp_path / "blob"
    p.write_bytes(data)
    rng = random.Random(4)
    for _ in range(20):
        stop = rng.choice([None, 0, 1, rng.randrange(len(data)), len(data) + 5])
        f = ReadAheadFile(pafs.LocalFileSystem().open_input_file(str(p)), stop=stop,
                          unit=rng.choice([1, 333, 4096, 1 << 20]), depth=rng.choice([1, 3]))
        with f:
            pos = rng.randrange(len(data))
            f.seek(pos)
            for _ in range(30):
                if rng.random() < 0.2:
                    pos = max(0, pos - rng.randrange(500))  # a short seek back, as the line reader makes
                    f.seek(pos)
                n = rng.randrange(0, 3000)
                if rng.random() < 0.5:
                    got = f.read(n)
                else:
                    buf = bytearray(n)
                    got = bytes(buf[: f.readinto(buf)])
                assert got == data[pos:pos + n]
                pos = min(len(data), pos + n)
                assert f.tell() == pos
            f.seek(0)
            assert f.read() == data


def test_gzip_blocks_and_multi_member(tmp_path):
    body = "".join(f"{i}\t{i * 7}\n" for i in range(20000))
    p = tmp_path / "day_0.gz"
    p.write_bytes(gzip.compress(body[:50000].encode()) + gzip.compress(body[50000:].encode()))
    got = b"".join(iter_line_blocks(str(p), True, block_bytes=1 << 12))
    assert got == body.encode()
    assert all(re.fullmatch(rb"(\d+\t\d+\n)+", b) for b in iter_line_blocks(str(p), True, block_bytes=1 << 12))
    # no final newline, across members and block sizes: the last line gets one, nothing else changes
    q = tmp_path / "day_1.gz"
    q.write_bytes(gzip.compress(body[:70001].encode()) + gzip.compress(body[70001:-1].encode()))
    for block in (1 << 10, 1 << 16, 1 << 30):
        got = list(iter_line_blocks(str(q), True, block_bytes=block))
        assert b"".join(got) == body.encode() and all(b.endswith(b"\n") for b in got), block


@pytest.mark.parametrize("gz", [False, True])
def test_a_byte_order_mark_alone_is_no_line(tmp_path, gz):
    """The mark is dropped before a last line without a newline gets one: a file of just a BOM
    has no line, like an empty file (it was one empty line, quarantined); a BOM before data, or
    before an empty line of its own, keeps every line."""
    bom = b"\xef\xbb\xbf"
    for content, want in [(bom, b""), (b"", b""), (bom + b"\n", b"\n"), (bom + b"1\t2", b"1\t2\n"),
                          (bom + b"1\t2\n3", b"1\t2\n3\n")]:
        p = tmp_path / ("day_0.gz" if gz else "day_0")
        p.write_bytes(gzip.compress(content) if gz else content)
        for block in (1, 4, 1 << 20):
            assert b"".join(iter_line_blocks(str(p), gz, block_bytes=block)) == want, (content, block)


def _fhcrc_member(data: bytes, mtime: int = 0) -> bytes:
    """A gzip member whose header carries a header CRC (FLG.FHCRC, RFC 1952 2.3.1)."""
    import struct

    header = b"\x1f\x8b\x08\x02" + struct.pack("<I", mtime) + b"\x00\xff"
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = c.compress(data) + c.flush()
    return (header + struct.pack("<H", zlib.crc32(header) & 0xFFFF) + body
            + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF))


def test_gzip_read_memory_is_bounded_whatever_the_compression_ratio(tmp_path):
    """Each inflate call returns at most block_bytes: a file of one repeated line (1000x
    compression) came back as ONE block of all its lines (a 2 MB day of them took 2.1 GB of
    worker memory; fifteenth session's probe)."""
    line = b"1\t" + b"\t".join([b"3"] * 13) + b"\t" + b"\t".join([b"0a1b2c3d"] * 26) + b"\n"
    body = line * 200_000  # 53 MB of lines, 0.1 MB of gzip
    p = tmp_path / "day_0.gz"
    p.write_bytes(gzip.compress(body, 9))
    assert p.stat().st_size < 1 << 20
    n, biggest = 0, 0
    for block in iter_line_blocks(str(p), True, block_bytes=1 << 20):
        n += len(block)
        biggest = max(biggest, len(block))
    assert n == len(body) and biggest <= 2 << 20


def test_gzip_with_header_crcs_split_across_reads(tmp_path, monkeypatch):
    """ISA-L 1.9 refuses a valid member header with a header CRC (FHCRC) that arrives in two
    reads; zlib reads the file again and decides: the same lines and the same sha256 as one
    pass of zlib. Until the fifteenth session such a file failed as "Incorrect checksum"."""
    import hashlib

    from pipelines.criteo import raw_lines

    body = b"".join(b"%d\t%d\n" % (i, i * 7) for i in range(3000))
    blob = b"".join(_fhcrc_member(body[i:i + 997], i) for i in range(0, len(body), 997))
    p = tmp_path / "day_0.gz"
    p.write_bytes(blob)
    assert gzip.decompress(blob) == body
    for read in (7, 64, 1000, 1 << 20):
        monkeypatch.setattr(raw_lines, "_BLOCK", read)
        for block in (1 << 10, 1 << 16):
            h = hashlib.sha256()
            assert b"".join(iter_line_blocks(str(p), True, block_bytes=block, hasher=h)) == body, (read, block)
            assert h.hexdigest() == hashlib.sha256(blob).hexdigest(), (read, block)
    # a damaged file is still damaged, now with zlib's words: a wrong length is no "checksum"
    bad_len = blob[:-1] + bytes([blob[-1] ^ 1])
    p.write_bytes(bad_len)
    with pytest.raises(raw_lines.ReadFailure, match="incorrect length check"):
        b"".join(iter_line_blocks(str(p), True))


def test_an_empty_file_named_gz_is_a_truncated_gzip(tmp_path):
    """0 or 1 bytes (a copy in progress) fail as that file's own read error; until the
    fifteenth session a 0-byte .gz stopped the whole run before Spark ("named .gz but not
    gzip content") and a valid gzip of nothing is still 0 lines."""
    from pipelines.criteo import raw_lines

    p = tmp_path / "day_3.gz"
    for blob in (b"", b"\x1f"):
        p.write_bytes(blob)
        with pytest.raises(raw_lines.ReadFailure, match="empty file named .gz|truncated gzip"):
            list(iter_line_blocks(str(p), True))
    p.write_bytes(gzip.compress(b""))
    assert list(iter_line_blocks(str(p), True)) == []
