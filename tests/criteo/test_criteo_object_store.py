"""Criteo on an object store: raw files read from s3:// and the lake on s3://, against a local
S3 server (moto on 127.0.0.1, the `s3` fixture); every result is compared with the same run on
local files."""
from __future__ import annotations

import gzip
import hashlib
import json
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from jobs.config import load_config
from pipelines import raw_inputs
from pipelines.lake import DeltaSnapshot

pytestmark = pytest.mark.spark


def _cfg(lake_root: str, raw_dir: str, **criteo):
    data = {"lake": {"root": lake_root}, "spark": {"master": "local[2]"}, "criteo": {"raw_dir": raw_dir, **criteo}}
    return load_config(data=data)


def _bucket(s3) -> str:
    return s3.bucket(f"bigopt-{uuid.uuid4().hex[:10]}")


def _sorted_rows(uri: str, drop: tuple[str, ...] = ()) -> list[str]:
    """A table's rows as sorted JSON (comparable across runs), without the columns ``drop``."""
    tbl = DeltaSnapshot(uri).to_table().drop(list(drop))
    return sorted(json.dumps(r, sort_keys=True) for r in tbl.to_pylist())


def test_resolve_stat_and_read_on_s3(s3, tmp_path):
    bucket = _bucket(s3)
    body = b"".join(b"%d\tline\n" % i for i in range(100_000))
    local = tmp_path / "f"
    local.write_bytes(body)
    for key in ("raw/day_0", "raw/day_1.gz", "raw/train.txt", "raw/PROVENANCE.md", "raw/_generated.json",
                "raw/.hidden", "raw/sub/day_9", "other/x/day_3", "other/y/day_4"):
        s3.upload(local, f"{bucket}/{key}")
    names = lambda uris: [u.removeprefix(bucket + "/") for u in uris]  # noqa: E731
    # a directory: its matching files, not recursive, no hidden/underscore names
    assert names(raw_inputs.resolve([f"{bucket}/raw/"], ["day_*", "*.txt"])) == [
        "raw/day_0", "raw/day_1.gz", "raw/train.txt"]
    # globs: in the last component, in a middle one (one level each), hidden names only on request
    assert names(raw_inputs.resolve([f"{bucket}/raw/day_*", f"{bucket}/raw/train.txt"], [])) == [
        "raw/day_0", "raw/day_1.gz", "raw/train.txt"]
    assert names(raw_inputs.resolve([f"{bucket}/other/*/day_?"], [])) == ["other/x/day_3", "other/y/day_4"]
    assert names(raw_inputs.resolve([f"{bucket}/raw/*"], [])) == [  # `_` markers only when asked for
        "raw/PROVENANCE.md", "raw/day_0", "raw/day_1.gz", "raw/train.txt"]
    assert names(raw_inputs.resolve([f"{bucket}/raw/.h*"], [])) == ["raw/.hidden"]
    assert names(raw_inputs.resolve([f"{bucket}/raw/_*"], [])) == ["raw/_generated.json"]
    # a key that exists is itself, whatever its characters (no glob)
    s3.upload(local, f"{bucket}/odd/day_[1]")
    assert names(raw_inputs.resolve([f"{bucket}/odd/day_[1]"], [])) == ["odd/day_[1]"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        raw_inputs.resolve([f"{bucket}/raw/nope"], [])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        raw_inputs.resolve([f"{bucket}/raw/nope_*"], [])
    # a directory without a matching file, as a glob matching none (until the thirteenth session
    # an ingest of it succeeded with nothing, so a wrong folder went unnoticed)
    with pytest.raises(FileNotFoundError, match=r"input directory .*/raw/' has no file matching \['\*\.csv'\]"):
        raw_inputs.resolve([f"{bucket}/raw/"], ["*.csv"])
    with pytest.raises(FileNotFoundError, match="has no file matching"):
        raw_inputs.resolve([str(tmp_path)], ["day_*"])
    with pytest.raises(ValueError, match="bucket"):
        raw_inputs.resolve(["s3://bigopt-*/raw/day_0"], [])
    with pytest.raises(ValueError, match="not a filesystem URI"):
        raw_inputs.resolve(["nosuchscheme://x/y"], [])
    # stat and ranged reads give the local file's bytes
    uri = f"{bucket}/raw/day_0"
    size, mtime_ns = raw_inputs.stat(uri)
    assert size == len(body) and mtime_ns > 0
    with raw_inputs.open_read(uri) as f:
        f.seek(500_000)
        buf = bytearray(1000)
        assert f.readinto(buf) == 1000 and bytes(buf) == body[500_000:501_000]
        f.seek(0)
        assert hashlib.file_digest(f, "sha256").hexdigest() == hashlib.sha256(body).hexdigest()


def test_gone_lists_a_folder_once_for_many_names(s3, tmp_path, monkeypatch):
    """Which of the ledger's files are gone: a folder holding many of them is listed once (one
    request per 1,000 keys), a few names are looked up one by one, and a name the store cannot
    be asked about is not gone. Until the twenty-fifth session each name cost a request per
    ingest run."""
    bucket = _bucket(s3)
    f = tmp_path / "f"
    f.write_bytes(b"1\t2\n")
    for i in range(40):
        s3.upload(f, f"{bucket}/many/day_{i}")
    for i in range(3):
        s3.upload(f, f"{bucket}/few/day_{i}")
    many = [f"{bucket}/many/day_{i}" for i in range(45)]  # 5 of them gone
    few = [f"{bucket}/few/day_{i}" for i in range(5)]  # 2 of them gone
    local = [str(f), str(tmp_path / "nope")]
    calls: list[object] = []
    real_fs = raw_inputs._fs

    class Counting:
        def __init__(self, fs):
            self.fs = fs

        def get_file_info(self, what):
            calls.append(what)
            return self.fs.get_file_info(what)

    monkeypatch.setattr(raw_inputs, "_fs", lambda uri: (lambda fs, p: (Counting(fs), p))(*real_fs(uri)))
    assert raw_inputs.gone(many + few + local) == {*many[40:], *few[3:], str(tmp_path / "nope")}
    assert sum(isinstance(c, pafs.FileSelector) for c in calls) == 1  # the folder of 45 names, once
    assert len(calls) == 1 + len(few)
    # a URI no filesystem can open: not taken for gone (nor is a store that does not answer)
    assert raw_inputs.gone(["nosuchscheme://x/y"]) == set()
    assert raw_inputs.gone([f"nosuchscheme://x/y{i}" for i in range(40)]) == set()  # listed: a ValueError (probe)


def test_ingest_featurize_and_load_on_s3_equal_local(spark, s3, tmp_path):
    """Raw day files (one gzip'd) on S3, split into several ranged-read tasks, ingested into a
    lake on S3: bronze equals the local run's row for row, the ledger holds the URIs and the
    files' sha256, a re-run skips them; featurize builds the same gold, which the training
    loader reads from S3."""
    from pipelines.criteo.featurize import featurize, read_features
    from pipelines.criteo.generate import generate
    from pipelines.criteo.bronze import read_ledger
    from pipelines.criteo.ingest import ingest
    from pipelines.criteo.schema import tables
    import torch

    from training.data.loader import DeltaTorchLoader
    from training.dataspec import resolve_data

    raw = tmp_path / "raw"
    settings = dict(generate={"days": 2, "rows_per_day": 3000, "seed": 11}, ingest={"chunk_bytes": 1 << 18},
                    featurize={"row_group_rows": 1024})
    paths = [Path(p) for p in generate(_cfg(str(tmp_path / "lake"), str(raw), **settings))]
    gz = raw / "day_1.gz"
    gz.write_bytes(gzip.compress(paths[1].read_bytes()))
    paths[1].unlink()
    files = [paths[0], gz]
    assert paths[0].stat().st_size > 2 * (1 << 18)  # the plain file is split into ranges

    bucket = _bucket(s3)
    for p in files:
        s3.upload(p, f"{bucket}/raw/{p.name}")
    local = _cfg(str(tmp_path / "lake"), str(raw), **settings)
    remote = _cfg(f"{bucket}/lake", f"{bucket}/raw/", **settings)

    rep_local, rep = ingest(spark, local), ingest(spark, remote)
    assert rep.rows_in == rep.rows_ok == rep_local.rows_in == 6000 and rep.ingested == 2
    t_local, t = tables(local), tables(remote)
    assert t["bronze"].startswith("s3://")
    assert _sorted_rows(t["bronze"], ("ingest_batch",)) == _sorted_rows(t_local["bronze"], ("ingest_batch",))
    ledger = {r["source"]: r for r in read_ledger(t["ledger"])}
    assert {s: (r["path"], r["sha256"], r["size"], r["gzip"]) for s, r in ledger.items()} == {
        p.name: (f"{bucket}/raw/{p.name}", hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size,
                 p.suffix == ".gz") for p in files}
    again = ingest(spark, remote)
    assert again.ingested == 0 and again.skipped == 2 and again.bronze_version is None

    feat_local, feat = featurize(spark, local), featurize(spark, remote)
    again = featurize(spark, remote)  # features.json and the table versions read back from S3
    assert again.up_to_date and again.versions == feat.versions
    assert feat.rows == feat_local.rows and feat.cardinalities == feat_local.cardinalities
    for name in ("train", "valid", "test", "vocabulary"):
        assert _sorted_rows(t[name]) == _sorted_rows(t_local[name]), name
    # features.json sits next to the gold tables on S3 (nothing written locally) ...
    assert feat.features_json == f"{bucket}/lake/criteo/gold/features.json"
    doc, doc_local = read_features(feat.features_json), read_features(feat_local.features_json)
    assert doc["columns"] == doc_local["columns"] and doc["tables"]["train"]["path"] == t["train"]
    assert not Path("s3:").exists()
    # ... where training finds it: embedding sizes from the vocabulary, not from a scan of the ids
    spec = resolve_data(load_config(None, [f"lake.root={bucket}/lake"]))
    assert spec.train == t["train"] and spec.vocabulary == feat.features_json
    assert spec.cardinalities == feat.cardinalities and (spec.valid, spec.test) == (t["valid"], t["test"])
    assert resolve_data(load_config(None, [f"lake.root={bucket}/lake", f"train.test_table={bucket}/none"])).test is None
    # the loader, with the environment's credentials and with explicit delta-rs storage options
    options = s3.storage_options
    reads = [list(DeltaTorchLoader(t["train"], columns=["label", "dense", "sparse"], batch_size=512,
                                   shuffle=False, drop_last=False, storage_options=opts))
             for opts in (None, options)]
    for batches in reads:
        assert sum(len(b["label"]) for b in batches) == feat.rows["train"]
        assert batches[0]["sparse"].shape[1] == 26 and batches[0]["dense"].shape[1] == 13
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*reads) for k in ("label", "dense", "sparse"))
    # a snapshot scan with the storage options reads through pyarrow's S3 filesystem built from them
    snap = DeltaSnapshot(t["train"], storage_options=options)
    assert snap.to_table(["label"]).num_rows == feat.rows["train"]


def test_corrupt_gzip_on_s3_fails_clearly_and_commits_nothing_for_it(spark, s3, tmp_path):
    from pipelines.criteo.bronze import read_ledger, rows_by_source
    from pipelines.criteo.ingest import CorruptInputError, ingest
    from pipelines.criteo.schema import tables
    from pipelines.lake import table_version

    line = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26)
    whole = gzip.compress(("\n".join([line] * 2000) + "\n").encode())
    (tmp_path / "day_0.gz").write_bytes(whole)
    (tmp_path / "day_1.gz").write_bytes(whole[: len(whole) // 2])  # truncated
    bucket = _bucket(s3)
    for name in ("day_0.gz", "day_1.gz"):
        s3.upload(tmp_path / name, f"{bucket}/raw/{name}")
    cfg = _cfg(f"{bucket}/lake", f"{bucket}/raw")
    with pytest.raises(CorruptInputError, match=f"{bucket}/raw/day_1.gz"):
        ingest(spark, cfg)
    t = tables(cfg)
    assert rows_by_source(t["bronze"], table_version(t["bronze"])) == {"day_0.gz": 2000}
    assert [r["source"] for r in read_ledger(t["ledger"])] == ["day_0.gz"]
    # no data file of the bad one; only the abort markers that tell straggling tasks to drop
    # their output (a task of the job may still be closing its file: it then deletes it)
    deadline = time.monotonic() + 30
    while True:
        written = s3.filesystem().get_file_info(
            pafs.FileSelector(f"{bucket.removeprefix('s3://')}/lake", recursive=True, allow_not_found=True))
        left = [i.path for i in written if i.type == pafs.FileType.File and "source=day_1.gz" in i.path]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert left == []


def test_generate_refuses_an_object_store(tmp_path):
    from pipelines.criteo.generate import generate

    with pytest.raises(ValueError, match="local or shared-filesystem"):
        generate(_cfg(str(tmp_path / "lake"), "s3://bucket/raw"))


def test_one_filesystem_serves_a_bucket(s3):
    """Every file of a bucket is opened through one pyarrow filesystem: ``from_uri`` asks S3 for
    the bucket's region (a HeadBucket request) and builds a new client on every call, and the
    pipeline opens a URI per raw and per bronze file. Paths inside it are ``bucket/key``."""
    from pipelines.lake.fs import filesystem_for

    a, b = _bucket(s3), _bucket(s3)
    fs, path = filesystem_for(f"{a}/raw/day_0")
    assert path == a.removeprefix("s3://") + "/raw/day_0"
    assert filesystem_for(f"{a}/lake/criteo/bronze/events/source=day_0/part-0.parquet")[0] is fs
    assert filesystem_for(a.replace("s3://", "s3a://") + "/raw/day_1")[0] is fs
    assert filesystem_for(f"{b}/raw/day_0")[0] is not fs  # another bucket: its own region lookup
    options = s3.storage_options
    explicit, epath = filesystem_for(f"{a}/raw/day_0", options)
    assert explicit is not fs and epath == path and filesystem_for(f"{a}/x", options)[0] is explicit
    # the same objects through either
    with fs.open_output_stream(f"{path}.json") as out:
        out.write(b"[]")
    with explicit.open_input_stream(f"{epath}.json") as f:
        assert f.read() == b"[]"


def test_hadoop_s3_schemes_read_like_s3(s3):
    """``s3a://`` / ``s3n://`` (Hadoop's names, which Spark users write) reach the same objects
    through pyarrow's S3 filesystem, with the environment's credentials or explicit ones."""
    from pipelines.lake.fs import filesystem_for, read_small_file

    bucket = s3.bucket("hadoop-schemes")
    with s3.filesystem().open_output_stream("hadoop-schemes/k/w.json") as out:
        out.write(b"{}")
    options = s3.storage_options
    for scheme in ("s3a", "s3n"):
        uri = bucket.replace("s3://", f"{scheme}://") + "/k/w.json"
        for opts in (None, options):
            fs, path = filesystem_for(uri, opts)
            assert fs.type_name == "s3" and path == "hadoop-schemes/k/w.json"
        assert read_small_file(uri) == b"{}"


def test_an_object_store_that_does_not_answer_is_one_clear_error(tmp_path, capsys, monkeypatch):
    """Raw inputs or a lake on a store that refuses connections: `bigopt ingest` names the
    request that failed in one message and exits 1. Until the thirteenth session the OSError
    came out as a traceback (and delta-rs's colour escapes as text)."""
    import socket

    from jobs.cli import main

    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
                 "AWS_ACCESS_KEY_ID": "bigopt-test", "AWS_SECRET_ACCESS_KEY": "bigopt-test"}.items():
        monkeypatch.setenv(k, v)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "day_0").write_text("1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26) + "\n")
    capsys.readouterr()
    for conf in ([f"lake.root={tmp_path / 'lake'}", "--input", "s3://bucket/criteo/day_0"],
                 ["lake.root=s3://bucket/lake", f"criteo.raw_dir={raw}"]):
        assert main(["ingest", *conf]) == 1
        out = capsys.readouterr()
        text = out.out + out.err
        assert "bigopt ingest: " in text and "Traceback" not in text and "\x1b[" not in text
        assert "127.0.0.1" in text or "Connection refused" in text or "connect" in text.lower()
