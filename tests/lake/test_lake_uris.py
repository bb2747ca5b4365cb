"""Table and file names the way users write them: ``file://`` URIs (percent-escaped), object-store
keys with ``#`` and ``?``, globs on an object store. Spark-free."""
from __future__ import annotations

import uuid

import pyarrow as pa
import pytest

from pipelines import raw_inputs
from pipelines.lake import DeltaSnapshot
from pipelines.lake.fs import check_table_path, normalize_uri, path_in_filesystem
from pipelines.lake.tasks import write_arrow


def test_a_file_uri_is_its_percent_decoded_local_path(tmp_path):
    """``Path.as_uri()`` writes a space as ``%20`` (RFC 8089), and pyarrow and delta-rs decode it.
    Until the twentieth session bigopt kept the ``%20``: a raw folder given so "did not exist", a
    lake root was refused as a path delta-rs would decode, the loader found "no Delta table"."""
    d = tmp_path / "sp ace"
    raw = d / "raw"
    raw.mkdir(parents=True)
    (raw / "day_0").write_text("x\n")
    assert d.as_uri().endswith("/sp%20ace")
    assert normalize_uri(d.as_uri()) == str(d)
    assert normalize_uri(d.as_uri().replace("file://", "file://localhost")) == str(d)
    assert path_in_filesystem(f"{d.as_uri()}/a%23b") == f"{d}/a#b"
    assert normalize_uri(str(tmp_path / "a%20b")) == str(tmp_path / "a%20b")  # a plain path is literal
    with pytest.raises(ValueError, match="read as a host"):
        normalize_uri("file://otherhost/data")
    assert raw_inputs.resolve([raw.as_uri()], ["day_*"]) == [str(raw / "day_0")]
    assert raw_inputs.resolve([(raw / "day_0").as_uri()], []) == [str(raw / "day_0")]
    # a table written under the URI lives in the decoded folder, and reads back by either name
    uri = (d / "lake" / "t").as_uri()
    assert check_table_path(uri) == str(d / "lake" / "t")
    write_arrow(uri, pa.table({"x": [1, 2]}))
    assert DeltaSnapshot(uri).num_rows == DeltaSnapshot(str(d / "lake" / "t")).num_rows == 2
    assert not (tmp_path / "sp%20ace").exists()
    # a real '%20' in a plain path is still refused (delta-rs decodes it), and so is its file:// escape
    for refused in (str(tmp_path / "a%20b" / "t"), (tmp_path / "a%20b" / "t").as_uri()):
        with pytest.raises(ValueError, match=r"cannot live under '.*/a%20b/t': delta-rs reads the '%20'"):
            check_table_path(refused)


def test_a_broken_link_or_a_fifo_among_the_inputs_fails_the_run_naming_it(tmp_path, capsys, spark_forbidden):
    """A day whose symbolic link points at storage not mounted was left out in silence (the
    folder listing and the glob kept regular files only) and the run exited 0 without it; a
    FIFO named with --input "did not exist". Each fails the run before anything is read, named
    on one line, as an unreadable file does; what the globs do not take is no concern."""
    import os
    import re

    from jobs.cli import main

    raw = tmp_path / "raw"
    raw.mkdir()
    line = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26)
    (raw / "day_0").write_text(line + "\n")
    os.symlink(tmp_path / "unmounted" / "day_9", raw / "day_9")
    os.symlink(tmp_path / "unmounted" / "x", raw / "_marker")  # never an input: no error
    os.symlink(tmp_path / "unmounted" / "y", raw / "notes.md")
    os.symlink(raw / "day_0", raw / "day_1")  # a link to a file is that file
    gone = f"input '{raw / 'day_9'}' is a symbolic link to '{tmp_path / 'unmounted' / 'day_9'}', which does not exist"
    for spec in (str(raw), str(raw / "day_*"), str(raw / "day_9")):
        with pytest.raises(raw_inputs.InputNotAFileError, match="^" + re.escape(gone)):
            raw_inputs.resolve([spec], ["day_*"])
    (raw / "day_9").unlink()
    assert raw_inputs.resolve([str(raw)], ["day_*"]) == [str(raw / "day_0"), str(raw / "day_1")]
    os.mkfifo(raw / "day_7")
    fifo = f"input '{raw / 'day_7'}' is not a regular file (a FIFO)"
    for spec in (str(raw), str(raw / "day_*"), str(raw / "day_7")):
        with pytest.raises(raw_inputs.InputNotAFileError) as e:
            raw_inputs.resolve([spec], ["day_*"])
        assert str(e.value) == fifo
    os.symlink(tmp_path / "unmounted" / "day_9", raw / "day_9")
    with pytest.raises(raw_inputs.InputNotAFileError, match=r"^2 inputs cannot be read as files: .*day_7' is not a "
                                                            r"regular file \(a FIFO\); .*day_9' is a symbolic link"):
        raw_inputs.resolve([str(raw)], ["day_*"])
    # `bigopt ingest`: exit 1, one line, before Spark and before anything is written
    for flags in ([], ["--input", str(raw / "day_9")]):
        with spark_forbidden("an ingest whose inputs cannot all be read"):
            assert main(["ingest", f"lake.root={tmp_path / 'lake'}", f"criteo.raw_dir={raw}", *flags]) == 1
        err = capsys.readouterr().err
        assert err.startswith("bigopt ingest: ") and err.count("\n") == 1 and "day_9" in err, err
    assert not (tmp_path / "lake").exists()


def _bucket(s3) -> str:
    return s3.bucket(f"bigopt-uris-{uuid.uuid4().hex[:8]}")


def _keys(s3, bucket: str) -> list[str]:
    import pyarrow.fs as pafs

    name = bucket.removeprefix("s3://")
    infos = s3.filesystem().get_file_info(pafs.FileSelector(name, recursive=True))
    return sorted(i.path[len(name) + 1:] for i in infos if i.type == pafs.FileType.File)


def test_an_object_key_with_a_hash_is_that_object(s3, tmp_path):
    """An object key may hold '#'. Until the twentieth session the key was cut there as a URL's
    fragment: `s3://b/r/day_12#v2` was read from `r/day_12` (ingest called it a duplicate of
    day_12, or with --force put day_12's rows under its name), a '#' key alone was "not found",
    and a table under such a prefix had its log in one place and its files in another."""
    from jobs.config import load_config
    from pipelines.criteo.ingest import _plan
    from pipelines.criteo.raw_files import describe_files

    bucket = _bucket(s3)
    (tmp_path / "a").write_text("1\t2\n" * 10)
    (tmp_path / "b").write_text("0\t5\n" * 12)
    day12, v2, solo = s3.upload(tmp_path / "a", f"{bucket}/r/day_12"), f"{bucket}/r/day_12#v2", f"{bucket}/s/day_3#x"
    s3.upload(tmp_path / "b", v2)
    s3.upload(tmp_path / "b", solo)
    assert raw_inputs.resolve([f"{bucket}/r"], ["day_*"]) == [day12, v2]
    assert raw_inputs.resolve([f"{bucket}/s/day_3#x", f"{bucket}/r/*#v2"], []) == [solo, v2]
    assert raw_inputs.stat(v2)[0] == 48 and raw_inputs.stat(solo)[0] == 48
    with raw_inputs.open_read(v2) as f:
        assert f.read() == (tmp_path / "b").read_bytes()
    cfg = load_config(data={"lake": {"root": str(tmp_path / "lake")}, "criteo": {"raw_dir": str(tmp_path)}})
    todo, skipped, _ = _plan(describe_files([day12, v2], cfg), {}, False)
    assert [f.source for f in todo] == ["day_12", "day_12#v2"] and skipped == []
    assert path_in_filesystem(f"{bucket}/r/day_12#v2") == f"{bucket.removeprefix('s3://')}/r/day_12#v2"
    # a table under a prefix with '#': log and files under it, read back by the snapshot and the loader
    uri = f"{bucket}/lake#2/t"
    write_arrow(uri, pa.table({"x": [1, 2, 3]}))
    write_arrow(uri, pa.table({"x": [4]}))
    assert sorted(DeltaSnapshot(uri).to_table().column("x").to_pylist()) == [1, 2, 3, 4]
    assert {k.split("/")[0] for k in _keys(s3, bucket) if "_delta_log" in k or k.endswith(".parquet")} == {"lake#2"}
    torch = pytest.importorskip("torch")
    from training.data import DeltaTorchLoader

    got = torch.cat([b["x"] for b in DeltaTorchLoader(uri, ["x"], 2, shuffle=False, drop_last=False)])
    assert sorted(got.tolist()) == [1, 2, 3, 4]
    # a '%XX' in the key: delta-rs would decode it (its log elsewhere than pyarrow's files): refused
    with pytest.raises(ValueError, match=r"delta-rs reads the '%20' in an object's key"):
        check_table_path(f"{bucket}/a%20b/t")


def test_a_question_mark_in_an_object_uri_is_the_key_s_unless_it_starts_pyarrow_options(s3, tmp_path):
    """'?' is a glob's wildcard and a character an object's key may hold. Until the twentieth
    session any '?' started a query for pyarrow's FileSystem.from_uri: the documented glob
    `s3://bucket/criteo/*/day_?.gz` failed ("Unexpected query parameter in S3 URI: '.gz'"), and a
    key with '?' was unreadable. Only a last '?' followed by options pyarrow knows for the store
    (`?region=...`, the form docs/lake.md gives) is still a query."""
    from pipelines.lake.fs import delta_uri, filesystem_for

    bucket = _bucket(s3)
    name = bucket.removeprefix("s3://")
    (tmp_path / "f").write_text("1\t2\n")
    for key in ("criteo/x/day_1.gz", "criteo/y/day_2.gz", "criteo/y/day_10.gz", "criteo/x/day_1", "q/what?x",
                "q/page?id=3", "q/page"):
        s3.upload(tmp_path / "f", f"{bucket}/{key}")
    names = lambda uris: [u.removeprefix(bucket + "/") for u in uris]  # noqa: E731
    assert names(raw_inputs.resolve([f"{bucket}/criteo/*/day_?.gz"], [])) == ["criteo/x/day_1.gz", "criteo/y/day_2.gz"]
    assert names(raw_inputs.resolve([f"{bucket}/criteo/x/day_?"], [])) == ["criteo/x/day_1"]
    assert names(raw_inputs.resolve([f"{bucket}/q/what?x", f"{bucket}/q/page?id=3"], [])) == ["q/what?x", "q/page?id=3"]
    assert names(raw_inputs.resolve([f"{bucket}/q/"], ["*"])) == ["q/page", "q/page?id=3", "q/what?x"]
    with raw_inputs.open_read(f"{bucket}/q/what?x") as f:
        assert f.read() == b"1\t2\n"
    # pyarrow's own options: the object `q/page`, on a filesystem they configure
    fs, path = filesystem_for(f"{bucket}/q/page?region=us-east-1")
    assert path == f"{name}/q/page" and fs is not filesystem_for(f"{bucket}/q/page")[0]
    assert raw_inputs.stat(f"{bucket}/q/page?region=us-east-1")[0] == 4
    assert path_in_filesystem(f"{bucket}/q/page?id=3") == f"{name}/q/page?id=3"
    # a table under a key with '?': delta-rs gets it escaped, pyarrow's options not at all
    uri = f"{bucket}/lake?1/t"
    write_arrow(uri, pa.table({"x": [1, 2]}))
    assert DeltaSnapshot(uri).num_rows == 2
    assert {k.split("/")[0] for k in _keys(s3, bucket) if "_delta_log" in k} == {"lake?1"}
    assert delta_uri(f"{bucket}/lake?1/t?region=us-east-1") == f"{bucket}/lake%3F1/t"
