"""The synthetic generator and the raw-file scanner: no Spark needed, so these are fast."""
from __future__ import annotations

import gzip
import hashlib
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from jobs.config import load_config
from pipelines.criteo.generate import generate_files
from pipelines.criteo.raw_files import describe_file
from pipelines.criteo.raw_lines import scan_file
from pipelines.raw_inputs import resolve as resolve_inputs


def _cfg(raw: Path, **gen):
    return load_config(data={"criteo": {"raw_dir": str(raw), "generate": gen}})


def _fields(path: Path) -> list[list[str]]:
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    text = data.decode()
    return [ln.split("\t") for ln in text.split("\n") if ln]


def test_deterministic_whatever_the_workers(tmp_path):
    base = {"days": 2, "rows_per_day": 2500, "chunk_rows": 1000, "seed": 3}
    a = generate_files(_cfg(tmp_path / "a", workers=1, **base))
    b = generate_files(_cfg(tmp_path / "b", workers=2, **base))
    c = generate_files(_cfg(tmp_path / "c", workers=1, **{**base, "seed": 4}))
    for fa, fb in zip(a, b):
        assert Path(fa.path).read_bytes() == Path(fb.path).read_bytes()
    assert Path(a[0].path).read_bytes() != Path(c[0].path).read_bytes()
    assert [f.rows for f in a] == [2500, 2500]


def test_generate_command_starts_no_thread(tmp_path, monkeypatch, capsys):
    """`bigopt generate`'s progress display runs no thread of its own, so (in a process without
    other threads) the workers start by fork. Until the thirteenth session rich's refresh thread made the generator take spawn, which
    re-imports everything: 2.5 s instead of 1.5 for the demo's 210k rows."""
    import multiprocessing as mp
    import threading

    from jobs.cli import main

    # the threads when the pool starts, against those before: a test session's Spark has its own
    before, seen, get_context = threading.active_count(), [], mp.get_context
    monkeypatch.setattr(mp, "get_context",
                        lambda method=None: seen.append(threading.active_count()) or get_context(method))
    assert main(["generate", "criteo", f"criteo.raw_dir={tmp_path}", "criteo.generate.days=2",
                 "criteo.generate.rows_per_day=3000", "criteo.generate.chunk_rows=1000",
                 "criteo.generate.workers=2"]) == 0
    assert seen == [before] and "generated 6,000 rows" in capsys.readouterr().out


def test_regenerating_replaces_an_earlier_generates_files(tmp_path):
    """Generating again with other settings removes the files the earlier run wrote and this
    one did not (else ingest took both: day_2 beside a new day_0.gz, 10,000 rows for 4,000);
    files no generate wrote are kept."""
    raw = tmp_path / "raw"
    generate_files(_cfg(raw, days=3, rows_per_day=1000, chunk_rows=1000))
    (raw / "mine.txt").write_text("kept\n")
    generate_files(_cfg(raw, days=2, rows_per_day=1000, chunk_rows=1000, gzip=True))
    assert sorted(p.name for p in raw.iterdir()) == ["_generated.json", "day_0.gz", "day_1.gz", "mine.txt"]


def test_generate_never_replaces_files_no_generate_wrote(tmp_path, capsys):
    """A real day_0 or train.txt in the folder, of a name generate would write and no manifest
    lists, is refused before anything is written (exit 2, the files named), and replaced only
    with --overwrite. Until the twenty-seventh session generate replaced it without a word
    (the generator probe): the docs said files no generate wrote are kept."""
    from jobs.cli import main
    from pipelines.criteo.generate import ForeignFilesError

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "day_1").write_text("MY REAL DATA\n")
    with pytest.raises(ForeignFilesError, match=r"already holds day_1, which no earlier generate wrote"):
        generate_files(_cfg(raw, days=3, rows_per_day=1000, chunk_rows=1000))
    assert sorted(p.name for p in raw.iterdir()) == ["day_1"] and (raw / "day_1").read_text() == "MY REAL DATA\n"
    conf = [f"criteo.raw_dir={raw}", "criteo.generate.days=3", "criteo.generate.rows_per_day=1000"]
    assert main(["generate", "criteo", *conf]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigopt generate: ") and "--overwrite" in err and "Nothing was written" in err
    assert (raw / "day_1").read_text() == "MY REAL DATA\n"
    # a manifest listing other files does not vouch for this one (a day added by hand)
    generate_files(_cfg(tmp_path / "raw2", days=2, rows_per_day=1000, chunk_rows=1000))
    (tmp_path / "raw2" / "day_2").write_text("MY REAL DATA\n")
    with pytest.raises(ForeignFilesError, match="day_2"):
        generate_files(_cfg(tmp_path / "raw2", days=3, rows_per_day=1000, chunk_rows=1000))
    # its own files, listed in its manifest, are generated over as before
    generate_files(_cfg(tmp_path / "raw2", days=2, rows_per_day=500, chunk_rows=1000))
    assert main(["generate", "criteo", *conf, "--overwrite"]) == 0
    assert (raw / "day_1").read_text().count("\n") == 1000


def test_raw_format_and_statistics(tmp_path):
    files = generate_files(_cfg(tmp_path, days=1, rows_per_day=40_000, seed=11))
    rows = _fields(Path(files[0].path))
    assert len(rows) == 40_000 and all(len(r) == 40 for r in rows)
    labels = np.array([int(r[0]) for r in rows])
    assert 0.20 < labels.mean() < 0.30  # ~25 % positives
    hexes = {c for r in rows for c in r[14:] if c}
    assert all(re.fullmatch(r"[0-9a-f]{8}", c) for c in hexes)
    ints = [[int(x) if x else None for x in r[1:14]] for r in rows]
    col = lambda j: [v[j] for v in ints]  # noqa: E731
    miss = [sum(v is None for v in col(j)) / len(rows) for j in range(13)]
    assert 0.70 < miss[11] < 0.84 and 0.38 < miss[0] < 0.52 and miss[1] == 0  # I12, I1, I2
    i2 = [v for v in col(1) if v is not None]
    assert min(i2) < 0 and sum(v < 0 for v in i2) / len(i2) < 0.05  # occasional negatives
    assert all(v >= 0 for j in range(13) if j != 1 for v in col(j) if v is not None)
    assert max(v for v in col(4) if v is not None) > 100_000  # long tails (I5)
    # categorical cardinalities span small .. large, with heavy-tailed frequencies
    distinct = [len({r[14 + j] for r in rows if r[14 + j]}) for j in range(26)]
    assert distinct[8] <= 3 and distinct[19] <= 4  # C9, C20
    assert max(distinct) > 10_000
    c3 = [r[16] for r in rows if r[16]]
    _, counts = np.unique(c3, return_counts=True)
    top = np.sort(counts)[::-1]
    assert top[0] > 50 * np.median(counts)  # Zipf-like head
    # C19/C20/C25/C26 are missing together, C22 mostly missing
    block = [(r[32] == "", r[33] == "", r[38] == "", r[39] == "") for r in rows]
    assert all(len(set(b)) == 1 for b in block)
    assert 0.7 < sum(r[35] == "" for r in rows) / len(rows) < 0.9


def test_label_is_learnable(tmp_path):
    """A per-value positive rate learned on one half predicts the other half (AUC > 0.6)."""
    from sklearn.metrics import roc_auc_score

    rows = _fields(Path(generate_files(_cfg(tmp_path, days=1, rows_per_day=30_000, seed=5))[0].path))
    y = np.array([int(r[0]) for r in rows])
    half = len(rows) // 2
    score = np.zeros(len(rows) - half)
    for j in (14, 19, 22, 27, 30, 36):  # C1, C6, C9, C14, C17, C23: columns with hidden effects
        rate: dict[str, list[int]] = {}
        for r, lab in zip(rows[:half], y[:half]):
            rate.setdefault(r[j], []).append(lab)
        prior = y[:half].mean()
        table = {k: (sum(v) + prior * 10) / (len(v) + 10) for k, v in rate.items()}
        p = np.array([table.get(r[j], prior) for r in rows[half:]])
        score += np.log(p / (1 - p))
    assert roc_auc_score(y[half:], score) > 0.6


def test_kaggle_layout_gzip_test_file_and_no_final_newline(tmp_path):
    cfg = _cfg(tmp_path, layout="kaggle", days=2, rows_per_day=1500, test_rows=800, gzip=True,
               final_newline=False, chunk_rows=1000, seed=1)
    files = generate_files(cfg)
    names = [Path(f.path).name for f in files]
    assert names == ["train.txt.gz", "test.txt.gz"]
    train, test = (gzip.decompress(Path(f.path).read_bytes()) for f in files)
    assert not train.endswith(b"\n") and not test.endswith(b"\n")
    assert train.count(b"\n") + 1 == 3000
    test_rows = [ln.split(b"\t") for ln in test.split(b"\n")]
    assert len(test_rows) == 800 and all(len(r) == 39 for r in test_rows)
    assert any(ln.startswith(b"\t") for ln in test.split(b"\n"))  # I1 missing -> leading TAB
    # a multi-member gzip (one member per chunk) is a valid gzip file
    assert Path(files[0].path).read_bytes().count(b"\x1f\x8b\x08") >= 3
    assert describe_file(files[0].path, cfg).labeled is True
    assert describe_file(files[1].path, cfg).labeled is False


@pytest.mark.parametrize("final_newline", [True, False])
def test_scan_counts_lines_like_spark(tmp_path, final_newline):
    body = "a\tb\n\nc\td" + ("\n" if final_newline else "")
    plain = tmp_path / "day_0"
    plain.write_text(body)
    s = scan_file(str(plain), False)
    assert s["error"] is None and s["lines"] == 3
    assert s["sha256"] == hashlib.sha256(body.encode()).hexdigest()
    gz = tmp_path / "day_1.gz"
    gz.write_bytes(gzip.compress(body[:4].encode()) + gzip.compress(body[4:].encode()))  # 2 members
    s = scan_file(str(gz), True)
    assert s["error"] is None and s["lines"] == 3
    empty = tmp_path / "day_2"
    empty.write_bytes(b"")
    assert scan_file(str(empty), False)["lines"] == 0


def test_scan_detects_truncated_corrupt_and_trailing_garbage(tmp_path):
    data = gzip.compress(("1\t2\n" * 50_000).encode())
    cases = {
        "truncated.gz": data[: len(data) // 2],
        "corrupt.gz": data[:40] + bytes(b ^ 0xFF for b in data[40:80]) + data[80:],
        "garbage.gz": data + b"not gzip",
        "header_only.gz": data[:10],
        "zeros_then_garbage.gz": data + bytes(100) + b"not gzip",
    }
    for name, blob in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        s = scan_file(str(p), True)
        assert s["error"], name
    good = tmp_path / "ok.gz"
    good.write_bytes(data)
    assert scan_file(str(good), True) == {**scan_file(str(good), True), "error": None, "lines": 50_000}
    assert zlib.decompress(data, 47).count(b"\n") == 50_000
    # zero padding after a member (tape blocks; gzip, zcat and Python's gzip read it), also
    # across reads and between members, is no garbage (until the thirteenth session it was)
    second = gzip.compress(b"3\t4\n" * 10)
    for name, blob, lines in (("padded.gz", data + bytes(512), 50_000),
                              ("padded_long.gz", data + bytes(5 << 20), 50_000),
                              ("padded_between.gz", data + bytes(3 << 20) + second + bytes(7), 50_010)):
        (tmp_path / name).write_bytes(blob)
        assert gzip.decompress(blob).count(b"\n") == lines, name
        s = scan_file(str(tmp_path / name), True)
        assert s["error"] is None and s["lines"] == lines, name


def test_resolve_inputs_dirs_globs_files(tmp_path):
    for name in ("day_0", "day_1.gz", "train.txt", "PROVENANCE.md", "_generated.json", ".hidden"):
        (tmp_path / name).write_text("x")
    got = [Path(p).name for p in resolve_inputs([str(tmp_path)], ["day_*", "*.txt"])]
    assert got == ["day_0", "day_1.gz", "train.txt"]
    got = [Path(p).name for p in resolve_inputs([str(tmp_path / "day_*"), str(tmp_path / "train.txt")], [])]
    assert got == ["day_0", "day_1.gz", "train.txt"]
    with pytest.raises(FileNotFoundError):
        resolve_inputs([str(tmp_path / "nope")], [])
    # a glob skips `_` markers as a folder does (`raw/*` took generate's _generated.json)
    got = [Path(p).name for p in resolve_inputs([str(tmp_path / "*")], [])]
    assert got == ["PROVENANCE.md", "day_0", "day_1.gz", "train.txt"]
    assert [Path(p).name for p in resolve_inputs([str(tmp_path / "_gen*")], [])] == ["_generated.json"]


def test_resolve_inputs_takes_existing_paths_literally_and_names_non_utf8_names(tmp_path):
    """Fifteenth session's paths probe: a folder named raw[1] (which generate writes into) was
    taken for a glob and 'matched no file'; one non-UTF-8 name in a folder failed the whole
    listing with a UnicodeDecodeError naming nothing."""
    import os

    for folder in ("raw[1]", "q?m", "st*r"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "day_0").write_text("x")
        assert [Path(p).name for p in resolve_inputs([str(tmp_path / folder)], ["day_*"])] == ["day_0"], folder
        assert resolve_inputs([str(tmp_path / folder / "day_0")], []) == [str(tmp_path / folder / "day_0")]
    # a glob below such a folder: the folder is itself, not the class [1] (which read raw1/)
    (tmp_path / "raw1").mkdir()
    (tmp_path / "raw1" / "day_7").write_text("x")
    assert [str(Path(p).relative_to(tmp_path)) for p in resolve_inputs([str(tmp_path / "raw[1]" / "day_*")], [])] \
        == ["raw[1]/day_0"]
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "day_0").write_text("x")
    with open(os.path.join(os.fsencode(latin), b"notes\xe9.doc"), "w") as f:  # matches no glob: ignored
        f.write("x")
    assert [Path(p).name for p in resolve_inputs([str(latin)], ["day_*"])] == ["day_0"]
    with open(os.path.join(os.fsencode(latin), b"day_\xe9"), "w") as f:  # taken: named in the error
        f.write("x")
    from pipelines.raw_inputs import InputNameError

    with pytest.raises(InputNameError, match=r"input file name b'.*/latin/day_\\xe9' is not UTF-8"):
        resolve_inputs([str(latin)], ["day_*"])
    with pytest.raises(ValueError, match="is not UTF-8"):
        resolve_inputs([str(latin / "day_*")], [])


def test_bigopt_run_generates_again_when_the_generate_settings_changed(tmp_path):
    """``bigopt run`` generates into an empty raw_dir, and again when the files there are an
    earlier generate's with other settings (until the twelfth session a changed
    criteo.generate.* was silently ignored once files existed); never over files no generate
    wrote, and not for a changed ``workers`` (it does not change the bytes)."""
    from jobs.run import needs_generation

    raw = tmp_path / "raw"
    cfg = _cfg(raw, days=2, rows_per_day=1000, chunk_rows=1000)
    assert needs_generation(cfg)
    generate_files(cfg)
    assert not needs_generation(cfg) and not needs_generation(_cfg(raw, days=2, rows_per_day=1000,
                                                                   chunk_rows=1000, workers=2))
    assert needs_generation(_cfg(raw, days=3, rows_per_day=1000, chunk_rows=1000))
    (raw / "_generated.json").unlink()  # files of unknown origin: left alone
    assert not needs_generation(_cfg(raw, days=3, rows_per_day=1000, chunk_rows=1000))
    # no input file there, only others (a .DS_Store, a manifest whose days were deleted):
    # nothing to ingest, so generate (until the fifteenth session: "has no file matching")
    for p in raw.iterdir():
        p.unlink()
    (raw / ".DS_Store").write_text("x")
    (raw / "_generated.json").write_text("{}")
    assert needs_generation(cfg)
    assert needs_generation(_cfg(tmp_path / "raw[2]", days=2, rows_per_day=1000))  # not there yet
