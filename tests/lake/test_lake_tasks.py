"""Task-side Arrow writes (pipelines.lake.tasks): Spark-free, the task code runs in-process."""
from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.lake import DeltaSnapshot, table_version
from pipelines.lake.files import WriteAbortedError
from pipelines.lake.tasks import abort_write, begin_write, commit_write, write_arrow

SCHEMA = pa.schema([pa.field("x", pa.int64()), pa.field("day", pa.int32())])


def _task(tw, xs, day):
    w = tw.open()
    w.write(pa.record_batch({"x": pa.array(xs, pa.int64())}), (day,))  # known partition: no day column
    return w.close()


def _parquet_files(path):
    return sorted(p.name for p in path.rglob("*.parquet"))


def test_tasks_commit_once_and_replace_where(tmp_path):
    path = tmp_path / "t"
    tw = begin_write(str(path), SCHEMA, partition_by=["day"])
    adds = _task(tw, [1, 2], 0) + _task(tw, [3], 1)
    assert commit_write(tw, adds, {"job": "test"}) == 0
    snap = DeltaSnapshot(str(path))
    assert sorted(snap.to_table().column("x").to_pylist()) == [1, 2, 3]
    assert {int(f.partition_values["day"]) for f in snap.files()} == {0, 1}
    tw = begin_write(str(path), SCHEMA, mode="overwrite", partition_by=["day"], replace_where={"day": 1})
    assert commit_write(tw, _task(tw, [30, 31], 1)) == 1
    assert sorted(DeltaSnapshot(str(path)).to_table().column("x").to_pylist()) == [1, 2, 30, 31]


def test_a_task_that_finishes_after_the_abort_removes_its_files(tmp_path):
    path = tmp_path / "t"
    write_arrow(str(path), pa.table({"x": [1], "day": pa.array([0], pa.int32())}), partition_by=["day"])
    before = _parquet_files(path)
    tw = begin_write(str(path), SCHEMA, partition_by=["day"])
    w = tw.open()
    w.write(pa.record_batch({"x": pa.array([7], pa.int64())}), (0,))
    abort_write(tw)  # the driver gave up while this task was still running
    with pytest.raises(WriteAbortedError):
        w.close()
    assert _parquet_files(path) == before and table_version(str(path)) == 0


def test_write_arrow_checks_the_schema(tmp_path):
    from pipelines.lake import SchemaMismatchError

    path = str(tmp_path / "t")
    assert write_arrow(path, pa.table({"a": [1, 2]})) == 0
    with pytest.raises(SchemaMismatchError):
        write_arrow(path, pa.table({"a": ["x"]}))
    assert write_arrow(path, pa.table({"a": [3]}), commit_info={"k": "v"}) == 1
    assert sorted(DeltaSnapshot(path).to_table().column("a").to_pylist()) == [1, 2, 3]
