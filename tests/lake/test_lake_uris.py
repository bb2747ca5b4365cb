"""Table and file names the way users write them: ``file://`` URIs (percent-escaped), object-store
keys with ``#`` and ``?``, globs on an object store. Spark-free."""
from __future__ import annotations

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
