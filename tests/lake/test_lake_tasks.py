"""Task-side Arrow writes (pipelines.lake.tasks): Spark-free, the task code runs in-process."""
from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.lake import DeltaSnapshot, table_exists, table_version
from pipelines.lake.files import WriteAbortedError
from pipelines.lake.tasks import UncommittedWrites, abort_write, begin_write, commit_write, commit_writes, write_arrow

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
    # each commit records the rows its files add (delta-rs gives no operation metrics for it)
    from pipelines.lake import history
    from pipelines.lake.commit import ROWS_ADDED_KEY

    assert [(h["version"], h[ROWS_ADDED_KEY], h.get("job")) for h in history(str(path), 5)] == [
        (1, 2, None), (0, 3, "test")]


def test_commit_writes_in_order_and_abort_the_rest_when_one_fails(tmp_path):
    """Several finished writes commit in order; when a commit fails (here: an overwrite that
    conflicts with a commit made meanwhile) the writes before it stay committed and those
    after it lose their files, uncommitted."""
    from pipelines.lake.commit import CommitConflictError

    a, b, c = (str(tmp_path / n) for n in "abc")
    write_arrow(b, pa.table({"x": [0], "day": pa.array([0], pa.int32())}), partition_by=["day"])
    writes = [begin_write(a, SCHEMA, partition_by=["day"]),
              begin_write(b, SCHEMA, mode="overwrite", partition_by=["day"]),
              begin_write(c, SCHEMA, partition_by=["day"])]
    pending = [(tw, _task(tw, [i], 0), {"job": "test"}) for i, tw in enumerate(writes)]
    assert commit_writes(pending[:1]) == [0]
    write_arrow(b, pa.table({"x": [9], "day": pa.array([0], pa.int32())}), mode="overwrite",  # meanwhile
                partition_by=["day"])
    b_files = _parquet_files(tmp_path / "b")
    with pytest.raises(CommitConflictError):
        commit_writes(pending[1:])
    assert table_version(a) == 0 and table_version(b) == 1 and not table_exists(c)
    assert DeltaSnapshot(b).to_table().column("x").to_pylist() == [9]
    assert _parquet_files(tmp_path / "c") == [] and len(_parquet_files(tmp_path / "b")) == len(b_files) - 1


def test_uncommitted_writes_abort_only_what_the_log_does_not_name(tmp_path):
    """An error or a stop anywhere in the block: on_error runs first, then each added write
    whose commit is not in the log loses its files; a committed one keeps them, and so does a
    write another table's commit cannot be confused with."""
    a, b = tmp_path / "a", tmp_path / "b"
    seen = []
    with pytest.raises(KeyboardInterrupt), UncommittedWrites(on_error=seen.append) as writes:
        ta = writes.add(begin_write(str(a), SCHEMA, partition_by=["day"]))
        tb = writes.add(begin_write(str(b), SCHEMA, partition_by=["day"]))
        adds_a, adds_b = _task(ta, [1], 0), _task(tb, [2], 0)
        commit_write(ta, adds_a)
        raise KeyboardInterrupt  # stopped between the two commits
    assert [type(e) for e in seen] == [KeyboardInterrupt]
    assert DeltaSnapshot(str(a)).to_table().column("x").to_pylist() == [1] and len(_parquet_files(a)) == 1
    assert not table_exists(str(b)) and _parquet_files(b) == [] and adds_b
    # on an existing table: the write planned at v0 is told apart from v0's own commit
    with pytest.raises(ValueError), UncommittedWrites() as writes:
        tc = writes.add(begin_write(str(a), SCHEMA, partition_by=["day"]))
        _task(tc, [3], 1)
        raise ValueError("failed after its tasks")
    assert table_version(str(a)) == 0 and len(_parquet_files(a)) == 1
    with UncommittedWrites() as writes:  # no error: nothing is touched
        td = writes.add(begin_write(str(a), SCHEMA, partition_by=["day"]))
        commit_write(td, _task(td, [4], 1))
    assert sorted(DeltaSnapshot(str(a)).to_table().column("x").to_pylist()) == [1, 4]


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


def test_abort_tolerates_a_task_deleting_its_own_file_meanwhile(tmp_path, monkeypatch):
    """The driver lists the write's files, then deletes them; a task that finished in between
    may have seen the abort mark and deleted its own file already (seen on S3 in CI)."""
    import pyarrow.fs as pafs

    from pipelines.lake import maintenance

    path = tmp_path / "t"
    tw = begin_write(str(path), SCHEMA, partition_by=["day"])
    _task(tw, [1], 0), _task(tw, [2], 1)
    real = pafs.LocalFileSystem()

    class RacingFS:
        def get_file_info(self, selector):
            infos = real.get_file_info(selector)
            real.delete_file(next(i.path for i in infos if i.path.endswith(".parquet")))  # the task's own delete
            return infos

        def delete_file(self, p):
            real.delete_file(p)

    monkeypatch.setattr(maintenance, "filesystem_for", lambda uri: (RacingFS(), str(path)))
    assert abort_write(tw) == 1
    assert _parquet_files(path) == []


def test_write_arrow_checks_the_schema(tmp_path):
    from pipelines.lake import SchemaMismatchError

    path = str(tmp_path / "t")
    assert write_arrow(path, pa.table({"a": [1, 2]})) == 0
    with pytest.raises(SchemaMismatchError):
        write_arrow(path, pa.table({"a": ["x"]}))
    # a name spelt in another case: refused (its Parquet column was read back as nulls)
    with pytest.raises(SchemaMismatchError, match="the table spells it 'a'"):
        write_arrow(path, pa.table({"A": [9]}))
    assert write_arrow(path, pa.table({"a": [3]}), commit_info={"k": "v"}) == 1
    assert sorted(DeltaSnapshot(path).to_table().column("a").to_pylist()) == [1, 2, 3]


def test_row_groups_have_row_group_rows_whatever_the_batches(tmp_path):
    """Row groups hold ``row_group_rows`` rows (the last of a file fewer), however the rows
    arrive. Until the twelfth session the setting was a minimum: everything buffered when it
    was passed became one row group (a whole 256 Ki-row featurize batch), so the loader, which
    shards ranks by row group, could not be given smaller units."""
    schema = pa.schema([("a", pa.int64()), ("p", pa.int32())])
    tw = begin_write(str(tmp_path / "t"), schema, partition_by=["p"], row_group_rows=1024)
    batches = [pa.record_batch({"a": range(i * 700, (i + 1) * 700), "p": [i % 2 for _ in range(700)]}, schema=schema)
               for i in range(6)] + [pa.record_batch({"a": range(4200, 7200), "p": [0] * 3000}, schema=schema)]
    commit_write(tw, tw.write_all(batches))
    groups = {fe.partition_values["p"]: [fe.parquet().metadata.row_group(i).num_rows
                                         for i in range(fe.parquet().metadata.num_row_groups)]
              for fe in DeltaSnapshot(str(tmp_path / "t")).files()}
    assert groups == {0: [1024] * 4 + [1004], 1: [1024, 1024, 52]}
    assert sorted(DeltaSnapshot(str(tmp_path / "t")).to_table(["a"]).column("a").to_pylist()) == list(range(7200))


def test_file_statistics_come_from_every_row_group(tmp_path):
    """minValues / maxValues / nullCount of a file written in several row groups, per type:
    bounds across row groups, all-null row groups skipped, no bound where Delta could not use
    one (an infinite float, booleans), a string over 32 characters bounded by a 32-character
    prefix (min) and that prefix incremented (max), null counts for nested
    columns too; and the same numbers with dictionary encoding off."""
    import datetime as dt
    import decimal
    import json

    schema = pa.schema([
        ("i", pa.int64()), ("i8", pa.int8()), ("f", pa.float32()), ("inf", pa.float64()),
        ("s", pa.string()), ("long", pa.string()), ("b", pa.bool_()), ("d", pa.date32()),
        ("ts", pa.timestamp("us", tz="UTC")), ("dec", pa.decimal128(6, 2)), ("l", pa.list_(pa.int32())),
        ("nul", pa.int64()),
    ])
    groups = [
        {"i": [5, None, 7], "i8": [-3, 1, None], "f": [1.5, None, -0.5], "inf": [1.0, 2.0, 3.0],
         "s": ["b", "c", None], "long": ["a", "b", "c"], "b": [True, None, False],
         "d": [dt.date(2024, 1, 2), None, dt.date(2024, 1, 1)],
         "ts": [dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc), None, None],
         "dec": [decimal.Decimal("1.25"), None, decimal.Decimal("-2.50")], "l": [[1], None, [2, None]],
         "nul": [None, None, None]},
        {"i": [None, None, None], "i8": [100, None, None], "f": [None, None, None], "inf": [float("inf"), 0.0, 1.0],
         "s": ["a", None, "z"], "long": ["x" * 40, "y", "z"], "b": [None, None, None],
         "d": [None, None, dt.date(2023, 12, 31)],
         "ts": [None, dt.datetime(2024, 1, 1, 13, 30, 0, 250000, tzinfo=dt.timezone.utc), None],
         "dec": [None, decimal.Decimal("9.99"), None], "l": [None, None, []], "nul": [None, None, None]},
    ]
    for use_dictionary in (True, False):
        path = tmp_path / f"t{use_dictionary}"
        tw = begin_write(str(path), schema, row_group_rows=3, parquet_options={"use_dictionary": use_dictionary})
        adds = tw.write_all([pa.record_batch(g, schema=schema) for g in groups])
        assert len(adds) == 1 and adds[0]["num_records"] == 6
        assert commit_write(tw, adds) == 0
        assert DeltaSnapshot(str(path)).files()[0].parquet().metadata.num_row_groups == 2
        stats = json.loads(adds[0]["stats"])
        assert stats["numRecords"] == 6
        assert stats["minValues"] == {
            "i": 5, "i8": -3, "f": -0.5, "s": "a", "long": "a", "d": "2023-12-31", "ts": "2024-01-01T12:00:00.000Z",
            "dec": -2.5,
        }
        assert stats["maxValues"] == {
            "i": 7, "i8": 100, "f": 1.5, "s": "z", "long": "z", "d": "2024-01-02", "ts": "2024-01-01T13:30:00.250Z",
            "dec": 9.99,
        }
        assert stats["nullCount"] == {
            "i": 4, "i8": 3, "f": 4, "inf": 0, "s": 2, "long": 0, "b": 4, "d": 3, "ts": 4, "dec": 3, "l": 3, "nul": 6,
        }


def test_a_process_that_reads_a_snapshot_and_exits_exits_cleanly(tmp_path):
    """``DeltaSnapshot.to_table()`` right before the process ends (a CLI run with nothing to do
    reads the ledger and exits) must exit 0. Through delta-rs's default filesystem (Python
    callbacks from Arrow's threads) such a process aborted in Arrow's thread-pool teardown
    (exit 134) about 17 times in 20."""
    import subprocess
    import sys

    path = str(tmp_path / "t")
    write_arrow(path, pa.table({"day": pa.array([1, 1, 2], pa.int32()), "x": ["a", "b", "c"]}), partition_by=["day"])
    code = (f"from pipelines.lake import DeltaSnapshot\n"
            f"t = DeltaSnapshot({path!r}).to_table()\n"
            f"assert sorted(zip(t['day'].to_pylist(), t['x'].to_pylist())) == [(1, 'a'), (1, 'b'), (2, 'c')]\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(6)]  # at once: each is mostly its imports
    errs = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [e[-300:] for p, e in zip(procs, errs) if p.returncode]


def test_a_write_without_partition_by_keeps_the_tables_partitioning(tmp_path):
    """Appending to (or overwriting) a partitioned table without naming ``partition_by`` keeps
    its partitioning, as Delta's writers do. Until the twelfth session such rows were written
    unpartitioned and read back with the partition column null. Writes whose files could not
    keep their rows apart are refused up front: only partition columns, or a float one."""
    path = str(tmp_path / "t")
    day = pa.int32()
    write_arrow(path, pa.table({"x": [1, 2], "day": pa.array([0, 1], day)}), partition_by=["day"])
    write_arrow(path, pa.table({"x": [3], "day": pa.array([5], day)}))
    assert sorted(DeltaSnapshot(path).to_table().to_pylist(), key=lambda r: r["x"]) == [
        {"x": 1, "day": 0}, {"x": 2, "day": 1}, {"x": 3, "day": 5}]
    write_arrow(path, pa.table({"x": [4], "day": pa.array([1], day)}), mode="overwrite", replace_where={"day": 1})
    assert sorted(DeltaSnapshot(path).to_table().to_pylist(), key=lambda r: r["x"]) == [
        {"x": 1, "day": 0}, {"x": 3, "day": 5}, {"x": 4, "day": 1}]
    with pytest.raises(ValueError, match="at least one other"):
        write_arrow(str(tmp_path / "p"), pa.table({"day": [1, 1, 2]}), partition_by=["day"])
    with pytest.raises(ValueError, match="floating-point"):
        write_arrow(str(tmp_path / "f"), pa.table({"x": [1, 2], "k": [0.0, -0.0]}), partition_by=["k"])


def test_a_table_with_column_mapping_is_refused_not_read_as_nulls(tmp_path):
    from deltalake import write_deltalake

    path = str(tmp_path / "t")
    write_deltalake(path, pa.table({"x": [1, 2]}), configuration={"delta.columnMapping.mode": "name"})
    with pytest.raises(ValueError, match="column mapping"):
        DeltaSnapshot(path)
    with pytest.raises(ValueError, match="column mapping"):
        write_arrow(path, pa.table({"x": [3]}))


def test_replace_where_of_a_null_partition_is_refused_up_front(tmp_path):
    path = str(tmp_path / "t")
    write_arrow(path, pa.table({"x": [1, 2], "k": ["a", None]}), partition_by=["k"])
    with pytest.raises(ValueError, match="null partition value"):
        begin_write(path, pa.schema([("x", pa.int64()), ("k", pa.string())]), mode="overwrite",
                    partition_by=["k"], replace_where={"k": ["a", None]})
    assert table_version(path) == 0


def test_an_overwrite_conflicts_with_rows_appended_to_what_it_replaces(tmp_path):
    """delta-rs lets a concurrent append through an overwrite (rebasing the overwrite on it),
    so until the twelfth session rows appended after an overwrite's read version survived it.
    Now such an overwrite fails with CommitConflictError and commits nothing; an append to
    other partitions does not stop a replace_where overwrite."""
    from pipelines.lake import CommitConflictError

    path = str(tmp_path / "t")
    schema = pa.schema([("x", pa.int64()), ("day", pa.int32())])

    def rows(x, day):
        return pa.table({"x": [x], "day": pa.array([day], pa.int32())})

    write_arrow(path, pa.concat_tables([rows(1, 0), rows(2, 1)]), partition_by=["day"])
    for replace_where in ({"day": 0}, None):
        tw = begin_write(path, schema, mode="overwrite", partition_by=["day"], replace_where=replace_where)
        adds = tw.write_all(rows(10, 0).to_batches())
        write_arrow(path, rows(3, 0))  # lands first
        before = table_version(path)
        with pytest.raises(CommitConflictError):
            commit_write(tw, adds)
        assert table_version(path) == before
    tw = begin_write(path, schema, mode="overwrite", partition_by=["day"], replace_where={"day": 0})
    adds = tw.write_all(rows(10, 0).to_batches())
    write_arrow(path, rows(4, 1))  # another partition: no conflict
    commit_write(tw, adds)
    assert sorted(DeltaSnapshot(path).to_table().to_pylist(), key=lambda r: r["x"]) == [
        {"x": 2, "day": 1}, {"x": 4, "day": 1}, {"x": 10, "day": 0}]


def test_files_of_a_commit_that_landed_are_kept_when_reading_its_version_fails(tmp_path, monkeypatch):
    """A failure after the commit is in the log (reading back its version) must not delete
    the commit's files: until the twelfth session the cleanup did, leaving a log entry whose
    files were gone."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    import pipelines.lake.commit as commit_mod

    path = str(tmp_path / "t")
    tw = begin_write(path, pa.schema([("x", pa.int64())]))
    adds = tw.write_all(pa.table({"x": [1, 2]}).to_batches())

    class Unreadable(DeltaTable):
        def __init__(self, *args, **kwargs):
            raise DeltaError("the log could not be read just now")

    monkeypatch.setattr(commit_mod, "DeltaTable", Unreadable)
    with pytest.raises(commit_mod.TableWriteError, match="is in its log, but reading the table back failed") as e:
        commit_write(tw, adds)
    assert isinstance(e.value.__cause__, DeltaError) and e.value.landed
    monkeypatch.undo()
    assert DeltaSnapshot(path).to_table().column("x").to_pylist() == [1, 2]


def test_a_replace_where_write_that_loses_the_race_to_create_the_table_conflicts(tmp_path):
    """A replace_where write planned before its table existed creates it; when another write
    creates it first, the loser fails with CommitConflictError and commits nothing (it cannot
    know whether the winner wrote to what it replaces). Until the thirteenth session replace_where
    needed an existing table, so ingest planned a new table's write as an append: two ingests of
    the same file into a fresh lake both committed their rows."""
    from pipelines.lake import CommitConflictError

    path = str(tmp_path / "t")
    first, second = (begin_write(path, SCHEMA, mode="overwrite", partition_by=["day"], replace_where={"day": 0})
                     for _ in range(2))
    a, b = _task(first, [1, 2], 0), _task(second, [1, 2], 0)
    assert commit_write(first, a) == 0
    with pytest.raises(CommitConflictError):
        commit_write(second, b)
    assert table_version(path) == 0 and sorted(DeltaSnapshot(path).to_table().column("x").to_pylist()) == [1, 2]
    assert len(_parquet_files(tmp_path / "t")) == 1  # the loser's file is gone
    with pytest.raises(ValueError, match=r"replace_where column\(s\) \['x'\] are not partition columns"):
        begin_write(str(tmp_path / "u"), SCHEMA, mode="overwrite", partition_by=["day"], replace_where={"x": 1})


def test_a_create_whose_commit_landed_keeps_its_files_when_reading_it_back_fails(tmp_path, monkeypatch):
    """delta-rs can write version 0 and then fail loading it: that is this write's commit, not a
    creation race lost to another writer. Until the fifteenth session it was taken for one: the
    message said a concurrent writer had created the table, and the cleanup deleted the files
    the log now names, leaving a table no read could open."""
    from deltalake.exceptions import DeltaError

    from pipelines.lake import commit as lake_commit

    real = lake_commit.create_table_with_add_actions

    def landed_then_failed(*a, **k):
        real(*a, **k)
        raise DeltaError("Kernel error: simulated failure reading the new table back")

    monkeypatch.setattr(lake_commit, "create_table_with_add_actions", landed_then_failed)
    path = str(tmp_path / "t")
    tw = begin_write(path, SCHEMA, partition_by=["day"])
    with pytest.raises(lake_commit.TableWriteError, match="is in its log.*simulated failure"):
        commit_write(tw, _task(tw, [1, 2], 0))
    monkeypatch.undo()
    assert sorted(DeltaSnapshot(path).to_table().column("x").to_pylist()) == [1, 2]
    # the same for an append: its files were deleted under the commit that named them
    real_tx = lake_commit.DeltaTable.create_write_transaction

    def tx_landed_then_failed(self, *a, **k):
        real_tx(self, *a, **k)
        raise DeltaError("Kernel error: simulated failure after the append's commit")

    monkeypatch.setattr(lake_commit.DeltaTable, "create_write_transaction", tx_landed_then_failed)
    tw = begin_write(path, SCHEMA, partition_by=["day"])
    with pytest.raises(lake_commit.TableWriteError, match="is in its log.*after the append's commit"):
        commit_write(tw, _task(tw, [3], 1))
    monkeypatch.undo()
    assert sorted(DeltaSnapshot(path).to_table().column("x").to_pylist()) == [1, 2, 3]
    # and a write that did not land still removes its files
    tw = begin_write(path, SCHEMA, partition_by=["day"])
    adds = _task(tw, [4], 2)
    monkeypatch.setattr(lake_commit.DeltaTable, "create_write_transaction",
                        lambda self, *a, **k: (_ for _ in ()).throw(DeltaError("simulated: nothing written")))
    with pytest.raises(lake_commit.TableWriteError, match=r"^commit to Delta table .* failed: simulated: nothing"):
        commit_write(tw, adds)
    assert not [p for p in (tmp_path / "t").rglob("*.parquet") if "day=2" in str(p)]


def test_a_table_path_delta_rs_would_decode_is_refused_before_writing(tmp_path):
    """delta-rs decodes '%20' in a local path (to ' '): its log went to one folder and the
    files' checks to another, and every later run failed (fifteenth session)."""
    path = tmp_path / "pc%20t" / "t"
    with pytest.raises(ValueError, match="delta-rs reads the '%20' in a local path as an escaped character"):
        begin_write(str(path), SCHEMA, partition_by=["day"])
    assert not (tmp_path / "pc%20t").exists() and not (tmp_path / "pc t").exists()
    write_arrow(str(tmp_path / "100%" / "t"), pa.table({"x": [1], "day": pa.array([0], pa.int32())}))  # a lone % is fine
    assert DeltaSnapshot(str(tmp_path / "100%" / "t")).num_rows == 1


def test_long_strings_and_early_timestamps_get_bounds_every_delta_reader_can_use(tmp_path):
    """delta-rs's own pyarrow dataset skips a file for any filter on a column the log gives no
    bound (delta-io/delta-rs#3032): a string over 32 characters had none, so quarantine reasons
    and ledger paths went missing for readers other than bigopt's. They now get truncated bounds;
    a timestamp before year 1000 was written with an unpadded year, which delta-rs misread."""
    import datetime as dt
    import json

    import pyarrow.compute as pc
    from deltalake import DeltaTable

    from pipelines.lake.files import _truncated_bound

    long = "/data/criteo/raw/day_0_some_long_name.gz"
    odd = "\U0010ffff" * 40
    path = str(tmp_path / "t")
    ts = [dt.datetime(999, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)]
    write_arrow(path, pa.table({"p": [long, "short"], "o": [odd, "a"], "n": [1, 2],
                                "t": pa.array(ts, pa.timestamp("us", tz="UTC"))}))
    add = next(json.loads(ln)["add"] for ln in open(next((tmp_path / "t" / "_delta_log").glob("*.json")))
               if '"add"' in ln)
    stats = json.loads(add["stats"])
    assert stats["minValues"]["p"] == long[:32] and stats["maxValues"]["p"] == "short"
    assert _truncated_bound(long, "max") == long[:31] + "h"  # ..._lon|g -> ..._lon|h
    assert stats["minValues"]["t"] == "0999-01-01T00:00:00.000Z"
    assert "o" not in stats["maxValues"]  # 40 x U+10FFFF: nothing above it fits in 32 characters
    dt_ds = DeltaTable(path).to_pyarrow_dataset()
    assert dt_ds.to_table(filter=pc.field("p") == long).column("n").to_pylist() == [1]
    assert dt_ds.to_table(filter=pc.field("p") > long[:32]).column("n").to_pylist() == [1, 2]
    assert dt_ds.to_table(filter=pc.field("t") == pa.scalar(ts[0], pa.timestamp("us", tz="UTC"))).num_rows == 1
    assert _truncated_bound("a" * 31 + "\ud7ff" + "x", "max") == "a" * 31 + "\ue000"
    assert _truncated_bound("a" * 31 + "\U0010ffff" + "x", "max") == "a" * 30 + "b"


def _delta_rs_error(log_dir) -> OSError:
    """What delta-rs raises for a ``_delta_log`` it may not write: a plain OSError whose message
    is its error chain, one coloured "↳" line per cause."""
    return OSError(f"Generic LocalFileSystem error\n          \x1b[31m↳\x1b[0m Unable to open file "
                   f"{log_dir}/00000000000000000001.json#1\n           \x1b[31m↳\x1b[0m Permission denied (os error 13)\n")


def test_a_commit_delta_rs_cannot_write_names_the_table_on_one_line(tmp_path, monkeypatch):
    """A table whose log cannot be written (a read-only ``_delta_log``; a full disk, a file-size
    limit alike) failed its commit with delta-rs's three-line message naming one log file, not
    the table, nor which tables of a job's commits had already committed (until this
    was fixed). It is a TableWriteError: the table, the cause on one line, and
    (from commit_writes) the tables committed before it; the failed write's files are gone."""
    from pipelines.lake import commit as lake_commit
    from pipelines.lake.commit import TableWriteError

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for path in (a, b):
        write_arrow(path, pa.table({"x": [0], "day": pa.array([0], pa.int32())}), partition_by=["day"])
    real_tx = lake_commit.DeltaTable.create_write_transaction

    def log_not_writable(self, *args, **kwargs):
        if self.table_uri.rstrip("/").endswith("/b"):
            raise _delta_rs_error(f"{b}/_delta_log")
        return real_tx(self, *args, **kwargs)

    monkeypatch.setattr(lake_commit.DeltaTable, "create_write_transaction", log_not_writable)
    ta, tb = (begin_write(p, SCHEMA, partition_by=["day"]) for p in (a, b))
    with pytest.raises(TableWriteError) as e:
        commit_writes([(ta, _task(ta, [1], 1), None), (tb, _task(tb, [2], 1), None)])
    assert str(e.value) == (f"commit to Delta table {b} failed: Generic LocalFileSystem error: Unable to open file "
                            f"{b}/_delta_log/00000000000000000001.json#1: Permission denied (os error 13)")
    assert e.value.table == b and e.value.committed == [(a, 1)] and not e.value.landed
    assert isinstance(e.value, OSError) and isinstance(e.value.__cause__, OSError)
    assert table_version(a) == 1 and table_version(b) == 0
    assert not list((tmp_path / "b").rglob("day=1/*.parquet"))  # the failed write's file is deleted


def test_a_data_file_the_disk_cannot_take_names_its_table(tmp_path, monkeypatch):
    """A full disk while the driver writes a small table's file (the ingest ledger) was pyarrow's
    "[Errno 28] Error writing bytes to file" naming no table; and the clean-up that followed,
    failing on the same full disk (its abort mark), raised its own error in its place."""
    from pipelines.lake import files as lake_files
    from pipelines.lake.commit import TableWriteError

    def disk_full(self, key):
        raise OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    def no_mark(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lake_files.PartitionedFileWriter, "_close_file", disk_full)
    monkeypatch.setattr(lake_files, "mark_aborted", no_mark)
    path = str(tmp_path / "ledger")
    with pytest.raises(TableWriteError, match=rf"^writing a data file of Delta table {path} failed: \[Errno 28\] "
                                              "Error writing bytes to file. Detail: .*No space left on device$"):
        write_arrow(path, pa.table({"x": [1]}))
    assert not table_exists(path) and not list((tmp_path / "ledger").rglob("*.parquet"))


def test_a_task_writer_names_its_table_when_the_disk_is_full(tmp_path, monkeypatch):
    """Ingest's and featurize's tasks write through PartitionedFileWriter directly (not
    write_all): a full disk there was `a Spark job failed ... (OSError: [Errno 28] Error writing
    bytes to file ...)`, naming no folder or table (hard-failure probe). The writer's own error
    names the table now, from a write that flushes and from close."""
    import pyarrow.parquet as pq

    from pipelines.lake.commit import TableWriteError
    from pipelines.lake.files import PartitionedFileWriter

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", disk_full)
    path = str(tmp_path / "bronze")
    schema = pa.schema([("x", pa.int64()), ("day", pa.int32())])
    want = rf"^writing a data file of Delta table {path} failed: \[Errno 28\] Error writing bytes to file"
    for row_group_rows, flushes in ((1, "write"), (100, "close")):
        w = PartitionedFileWriter(path, schema, ["day"], "w1", row_group_rows=row_group_rows, task=0)
        with pytest.raises(TableWriteError, match=want) as e:
            w.write(pa.record_batch({"x": [1, 2]}, schema=pa.schema([("x", pa.int64())])), (0,))
            assert flushes == "close"  # buffered: nothing written yet
            w.close()
        assert isinstance(e.value, OSError) and e.value.table == path
        w.discard()
    assert not list(tmp_path.rglob("*.parquet"))


def test_abort_marks_older_than_a_day_are_removed(tmp_path):
    """An abort mark (``_bigopt_aborted/<write id>``) matters only while a task of that write may
    still run; they piled up (one for every ingest whose quarantine was unchanged) and vacuum,
    which skips ``_`` folders, never removed them (hard-failure probe)."""
    import os
    import time

    from pipelines.lake.files import ABORT_MARK_KEEP_S, ABORTED_DIR, mark_aborted, write_aborted

    table = str(tmp_path / "t")
    mark_aborted(table, "w-old")
    mark_aborted(table, "w-recent")
    now = time.time()
    os.utime(tmp_path / "t" / ABORTED_DIR / "w-old", (now - ABORT_MARK_KEEP_S - 60,) * 2)
    os.utime(tmp_path / "t" / ABORTED_DIR / "w-recent", (now - ABORT_MARK_KEEP_S + 3600,) * 2)
    mark_aborted(table, "w-new")
    assert sorted(p.name for p in (tmp_path / "t" / ABORTED_DIR).iterdir()) == ["w-new", "w-recent"]
    assert write_aborted(table, "w-new") and write_aborted(table, "w-recent") and not write_aborted(table, "w-old")
