"""Table history, commit info and `bigopt lake` on tables written without Spark (write_arrow)."""
from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.lake import DeltaSnapshot, history
from pipelines.lake.tasks import write_arrow


def _history_rows(out: str) -> list[str]:
    """The body rows of the `bigopt lake --table` history table."""
    return [ln for ln in out.splitlines() if ln.startswith("│")]


@pytest.mark.parametrize("folder", ["lake dir/ünï #1", "run?2", "plain"])
def test_history_and_commit_info_whatever_the_path(tmp_path, capsys, spark_forbidden, folder):
    """delta-rs's ``history()`` returned no entries for a local table whose path has a ``#`` or
    ``?``: `bigopt lake --table` showed an empty history, ``commit_info()`` was {}, the
    roundtrip let itself overwrite another job's table, and training lost gold's build id."""
    from jobs.cli import main
    from training.dataspec import _commit_infos

    path = str(tmp_path / folder / "t")
    write_arrow(path, pa.table({"x": [1, 2]}), commit_info={"job": "ingest", "config_hash": "0123456789abcdef"})
    write_arrow(path, pa.table({"x": [3]}), commit_info={"job": "featurize"})
    assert [(h["version"], h["job"], h["bigopt.rowsAdded"]) for h in history(path)] == [
        (1, "featurize", 1), (0, "ingest", 2)]
    assert [h["version"] for h in history(path, 1)] == [1] and history(path, 0) == []
    assert all(isinstance(h["timestamp"], int) and h["operation"] for h in history(path))
    assert DeltaSnapshot(path, version=0).commit_info()["job"] == "ingest"
    assert DeltaSnapshot(path).commit_info()["version"] == 1
    assert {v: h["job"] for v, h in _commit_infos(path).items()} == {0: "ingest", 1: "featurize"}
    with spark_forbidden("bigopt lake history / a refused roundtrip"):
        assert main(["lake", "--table", path]) == 0
        rows = _history_rows(capsys.readouterr().out)
        assert len(rows) == 2 and "featurize" in rows[0] and "ingest" in rows[1] and "0123456789ab" in rows[1]
        assert main(["lake", "--action", "roundtrip", "--table", path, f"lake.root={tmp_path / 'lake'}"]) == 2
        assert "is a Delta table written by featurize, ingest" in capsys.readouterr().err


def test_history_of_a_commit_without_commit_info(tmp_path):
    """A commit whose log entry has no ``commitInfo`` (other writers need not write one) is in
    the history under its own version, with its log file's time; delta-rs left it out and gave
    its version to the commit before it."""
    import json
    import os

    path = tmp_path / "t"
    write_arrow(str(path), pa.table({"x": [1]}), commit_info={"job": "ingest"})
    write_arrow(str(path), pa.table({"x": [2]}))
    log = path / "_delta_log" / f"{1:020d}.json"
    log.write_text("".join(ln + "\n" for ln in log.read_text().splitlines() if "commitInfo" not in json.loads(ln)))
    (v1, v0) = history(str(path))
    assert v1 == {"version": 1, "timestamp": int(os.stat(log).st_mtime * 1000)}
    assert v0["version"] == 0 and v0["job"] == "ingest"


def test_vacuum_counts_only_files_that_are_there(tmp_path, capsys):
    """delta-rs lists the files of the log's tombstones whether or not they are still there: a
    vacuum reported the file an earlier one deleted as deleted again on every run, committed
    another VACUUM START/END pair each time, and its dry run kept listing it."""
    from jobs.cli import main
    from pipelines.lake import table_version, vacuum

    path = str(tmp_path / "t")
    write_arrow(path, pa.table({"x": [1]}))
    write_arrow(path, pa.table({"x": [2]}), mode="overwrite")  # version 0's file: removed, still there
    (old,) = vacuum(path, retention_hours=0, enforce_retention=False)
    assert (tmp_path / "t" / old).is_file()
    vacuum_cmd = ["lake", "--table", path, "--action", "vacuum", "--retention-hours", "0", "--no-retention-check"]
    assert main([*vacuum_cmd, "--apply"]) == 0
    assert "deleted 1 file(s)" in capsys.readouterr().out and not (tmp_path / "t" / old).exists()
    assert table_version(path) == 3  # VACUUM START, VACUUM END
    for _ in range(2):
        assert main([*vacuum_cmd, "--apply"]) == 0
        assert "deleted 0 file(s)" in capsys.readouterr().out
    assert main(vacuum_cmd) == 0
    out = capsys.readouterr().out
    assert "would delete 0 file(s)" in out and old not in out
    assert table_version(path) == 3 and DeltaSnapshot(path).to_table().column("x").to_pylist() == [2]


@pytest.mark.parametrize("stops", ["deleting", "committing its start"])
def test_a_failed_vacuum_is_one_line(tmp_path, capsys, monkeypatch, delta_rs_os_error, stops):
    """A vacuum --apply that may not delete a file (a read-only table folder) was an OSError
    traceback; delta-rs had committed its VACUUM START and stopped before its VACUUM END. Now
    one line that says so, and that it can be run again; with a log it may not write, delta-rs
    stops before that commit, and the line says nothing was deleted."""
    import json

    from deltalake import DeltaTable

    from jobs.cli import main
    from pipelines.lake import table_version, vacuum

    path = tmp_path / "t"
    write_arrow(str(path), pa.table({"x": [1]}))
    write_arrow(str(path), pa.table({"x": [2]}), mode="overwrite")  # version 0's file: to vacuum
    (old,) = vacuum(str(path), retention_hours=0, enforce_retention=False)
    real = DeltaTable.vacuum

    def failing(self, *args, dry_run=True, **kwargs):
        if dry_run:
            return real(self, *args, dry_run=dry_run, **kwargs)
        if stops == "deleting":  # delta-rs's first commit, then the file it may not delete
            start = {"commitInfo": {"timestamp": 1, "operation": "VACUUM START", "operationParameters": {}}}
            (path / "_delta_log" / f"{2:020d}.json").write_text(json.dumps(start) + "\n")
            raise delta_rs_os_error(f"Unable to delete file {path / old}", "Permission denied (os error 13)")
        raise delta_rs_os_error(f"Unable to open file {path}/_delta_log/{2:020d}.json#1", "Permission denied (os error 13)")

    monkeypatch.setattr(DeltaTable, "vacuum", failing)
    assert main(["lake", "--table", str(path), "--action", "vacuum", "--apply", "--retention-hours", "0",
                 "--no-retention-check"]) == 1
    err = capsys.readouterr().err
    if stops == "deleting":
        assert err == (f"bigopt lake: vacuum {path}: Generic LocalFileSystem error: Unable to delete file {path / old}"
                       ": Permission denied (os error 13) (the vacuum stopped part-way: delta-rs committed its VACUUM "
                       "START, may have deleted some of the files, and committed no VACUUM END; run it again once "
                       "the cause is fixed)\n")
        assert table_version(str(path)) == 2
    else:
        assert err.endswith("Permission denied (os error 13) (nothing was deleted)\n") and err.count("\n") == 1
        assert table_version(str(path)) == 1
    monkeypatch.setattr(DeltaTable, "vacuum", real)  # run again: it finishes
    assert vacuum(str(path), retention_hours=0, dry_run=False, enforce_retention=False) == [old]
    assert [h["operation"] for h in history(str(path), 2)] == ["VACUUM END", "VACUUM START"]


def test_lake_command_on_a_file_is_one_line(tmp_path, capsys, spark_forbidden):
    """`bigopt lake --table` naming a regular file (or a path under one) was an ``OSError: Not
    a directory`` traceback from delta-rs, whatever the action. It exits 2, as every input that is
    not there and every folder that cannot be written (README, "Exit status"; it was 1)."""
    from jobs.cli import main
    from pipelines.lake import table_exists

    (tmp_path / "afile").write_text("not a table\n")
    for path in (tmp_path / "afile", tmp_path / "afile" / "t"):
        assert not table_exists(str(path))
        for action in ("history", "vacuum", "optimize"):
            assert main(["lake", "--table", str(path), "--action", action]) == 2
            out = capsys.readouterr().err
            assert out.startswith(f"bigopt lake: no Delta table at {path}") and len(out.splitlines()) == 1, out
        with spark_forbidden("a roundtrip onto a file"):
            assert main(["lake", "--table", str(path), "--action", "roundtrip", f"lake.root={tmp_path}"]) == 2
        out = capsys.readouterr().err
        assert "bigopt lake: roundtrip: cannot write to" in out and "Traceback" not in out, out
    assert main(["lake", "--table", str(tmp_path / "afile")]) == 2
    assert "(it is a file)" in capsys.readouterr().err


def test_lake_command_on_a_damaged_log_is_one_line(tmp_path, capsys, spark_forbidden):
    """A table whose latest log entry is damaged: the history was a DeltaError traceback
    (vacuum and optimize already said it in a line, followed by delta-rs's Rust backtrace
    where RUST_BACKTRACE is set); the roundtrip's guard was a traceback too."""
    from jobs.cli import main

    path = tmp_path / "t"
    write_arrow(str(path), pa.table({"x": [1]}), commit_info={"job": "ingest"})
    write_arrow(str(path), pa.table({"x": [2]}))
    with open(path / "_delta_log" / f"{1:020d}.json", "a") as f:
        f.write('{"add":{broken\n')
    for action in ("history", "vacuum", "optimize"):
        assert main(["lake", "--table", str(path), "--action", action]) == 1
        err = capsys.readouterr().err  # one line, never wrapped
        assert err == f"bigopt lake: {action} {path}: its log cannot be read: Kernel error: Json error: " \
                      "Encountered unexpected 'b' whilst parsing object\n", err
    with spark_forbidden("a roundtrip onto a damaged table"):
        assert main(["lake", "--table", str(path), "--action", "roundtrip", f"lake.root={tmp_path}"]) == 2
    out = capsys.readouterr().err
    assert "is a Delta table whose log cannot be read" in out and "Traceback" not in out, out


def test_lake_command_on_an_unreadable_log_is_one_line(tmp_path, capsys, monkeypatch, spark_forbidden,
                                                       delta_rs_os_error):
    """A table whose _delta_log delta-rs may not list (chmod 000; monkeypatched, root reads it
    anyway): every action was an ``OSError`` traceback from ``table_exists``, its colour codes
    printed as text; now the line a damaged log gets, exit 1, the causes on one line."""
    from deltalake import DeltaTable

    from jobs.cli import main

    path = tmp_path / "t"
    write_arrow(str(path), pa.table({"x": [1]}), commit_info={"job": "ingest"})
    log = path / "_delta_log"

    def unreadable(*args, **kwargs):
        raise delta_rs_os_error("Unable to walk dir", f"IO error for operation on {log}", "Permission denied (os error 13)")

    monkeypatch.setattr(DeltaTable, "is_deltatable", staticmethod(unreadable))
    cause = (f"Generic LocalFileSystem error: Unable to walk dir: IO error for operation on {log}: "
             "Permission denied (os error 13)")
    for action in ("history", "vacuum", "optimize"):
        assert main(["lake", "--table", str(path), "--action", action]) == 1
        assert capsys.readouterr().err == f"bigopt lake: {action} {path}: its log cannot be read: {cause}\n"
    with spark_forbidden("a roundtrip onto a table whose log cannot be read"):
        assert main(["lake", "--table", str(path), "--action", "roundtrip", f"lake.root={tmp_path}"]) == 2
    assert capsys.readouterr().err == (f"bigopt lake: roundtrip overwrites its own check table; {path} is a folder "
                                       f"whose Delta log cannot be read ({cause}): give --table a new path, or "
                                       "leave it out\n")


@pytest.mark.parametrize("failure", ["conflict", "log not writable", "folder read-only"])
def test_a_failed_optimize_is_one_line_and_deletes_what_it_wrote(tmp_path, capsys, monkeypatch, delta_rs_os_error,
                                                                  failure):
    """delta-rs's compaction writes its files, then fails to commit (a write committed while it
    ran; a _delta_log it may not write): its files stayed in the table's folder, one more set
    per attempt, and the log it may not write was an OSError traceback. Now one line each, and
    only the table's own files and a concurrent writer's (named as delta-rs names its files, but
    not written by it) are left. Only a conflict says to run it again once no write is running
    (a read-only folder said so too)."""
    import uuid
    from pathlib import Path

    import pyarrow.parquet as pq
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.table import TableOptimizer

    from jobs.cli import main
    from pipelines.lake import table_version

    path = tmp_path / "t"
    for x in (1, 2):
        write_arrow(str(path), pa.table({"x": [x]}))
    appends = {f.name for f in path.glob("*.parquet")}
    foreign = path / f"part-00000-{uuid.uuid4()}-c000.snappy.parquet"  # another engine's write, in flight
    compact = TableOptimizer.compact

    def racing_compact(self, *args, **kwargs):
        write_arrow(str(path), pa.table({"x": [3]}), mode="overwrite")  # commits on the snapshot it compacts
        pq.write_table(pa.table({"x": [4]}), foreign)
        try:
            return compact(self, *args, **kwargs)
        except CommitFailedError as e:
            if failure == "conflict":
                raise
            if failure == "folder read-only":  # delta-rs's error for its own file it may not create
                raise DeltaError(f"Failed to parse parquet: External: Generic LocalFileSystem error: Unable to open "
                                 f"file {path}/part-0.parquet#1: Permission denied (os error 13)") from e
            raise delta_rs_os_error(f"Unable to open file {path}/_delta_log/{3:020d}.json#1",
                                    "Permission denied (os error 13)") from e

    monkeypatch.setattr(TableOptimizer, "compact", racing_compact)
    assert main(["lake", "--table", str(path), "--action", "optimize"]) == 1
    cause, hint = {
        "conflict": ("Failed to commit transaction: Commit failed: a concurrent transaction deleted data this "
                     "operation read.", "nothing was committed: run it again once no write to the table is running"),
        "log not writable": (f"Generic LocalFileSystem error: Unable to open file {path}/_delta_log/{3:020d}.json#1"
                             ": Permission denied (os error 13)", "nothing was committed"),
        "folder read-only": (f"Failed to parse parquet: External: Generic LocalFileSystem error: Unable to open file "
                             f"{path}/part-0.parquet#1: Permission denied (os error 13)", "nothing was committed"),
    }[failure]
    assert capsys.readouterr().err == f"bigopt lake: optimize {path}: {cause} ({hint})\n"
    assert table_version(str(path)) == 2  # the overwrite's commit, no compaction's
    overwrite = {Path(f.uri).name for f in DeltaSnapshot(str(path)).files()}
    assert {f.name for f in path.glob("*.parquet")} == appends | overwrite | {foreign.name}


@pytest.mark.parametrize("other", ["running", "died", "none"])
def test_a_failed_optimize_leaves_a_running_compactions_files(tmp_path, monkeypatch, caplog, other):
    """A second compaction of the table, running when the first fails, has written files named
    and written as the first's: until the twenty-sixth session the failed one deleted them, and
    the second's commit then named files that were gone. Each compaction holds a lease while it
    runs; a failed one that finds another's deletes nothing. A lease whose process is gone is a
    compaction that died: it is deleted, and so are the files."""
    import json
    import logging
    import shutil
    import subprocess
    import sys
    import time
    import uuid

    from deltalake.exceptions import CommitFailedError
    from deltalake.table import TableOptimizer
    from pyarrow.fs import LocalFileSystem

    from pipelines.lake import compaction, optimize

    path = tmp_path / "t"
    for x in (1, 2):
        write_arrow(str(path), pa.table({"x": [x]}))
    for x in (5, 6):  # a file as delta-rs's compaction writes one
        write_arrow(str(tmp_path / "scratch"), pa.table({"x": [x]}))
    optimize(str(tmp_path / "scratch"))
    (scratch,) = (tmp_path / "scratch").glob("part-0000*-c000.*parquet")
    theirs = path / f"part-00001-{uuid.uuid4()}-c000.zstd.parquet"
    leases = path / compaction.LEASE_DIR
    compact = TableOptimizer.compact

    def racing_compact(self, *args, **kwargs):
        write_arrow(str(path), pa.table({"x": [3]}), mode="overwrite")  # fails this compaction
        if other == "running":
            compaction._take_lease(LocalFileSystem(), str(path))  # this process: alive
        elif other == "died":
            gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True)
            (leases / "dead.json").write_text(json.dumps({"host": compaction.socket.gethostname(),
                                                          "pid": int(gone.stdout), "started": time.time()}))
        if other != "none":  # the other compaction's file, not committed yet
            shutil.copy(scratch, theirs)
        return compact(self, *args, **kwargs)

    monkeypatch.setattr(TableOptimizer, "compact", racing_compact)
    with caplog.at_level(logging.WARNING, logger="pipelines.lake.compaction"), pytest.raises(CommitFailedError):
        optimize(str(path))
    ours = {f for f in path.glob("part-0000*-c000.*parquet") if f != theirs}
    if other == "running":
        assert theirs.exists() and ours  # its own, too: left to a vacuum
        assert "another compaction of the table is running (pid" in caplog.text
        assert len(list(leases.glob("*.json"))) == 1  # the running one's; this one's is gone
    else:
        assert not ours and not theirs.exists() and not list(leases.glob("*.json"))
        assert "left to a vacuum" not in caplog.text
    assert DeltaSnapshot(str(path)).to_table().column("x").to_pylist() == [3]


def test_one_compaction_of_a_table_at_a_time(tmp_path, capsys):
    """delta-rs 1.6.6 lets two compactions of the same files both commit: two `bigopt lake
    --action optimize` at once left every row in the table twice (attack probe, 2 of 2 tries).
    A compaction now refuses to start while another's lease is there, in one line; of two run
    at once as processes, the table keeps its rows."""
    import subprocess
    import sys
    from pathlib import Path

    from pyarrow.fs import LocalFileSystem

    from jobs.cli import main
    from pipelines.lake import CompactionRunningError, compaction, optimize, table_version

    path = tmp_path / "t"
    for x in range(40):
        write_arrow(str(path), pa.table({"x": list(range(x * 50, x * 50 + 50))}))
    other = compaction._take_lease(LocalFileSystem(), str(path))  # this process: alive
    with pytest.raises(CompactionRunningError, match=r"another compaction of .* is running \(pid \d+ on "):
        optimize(str(path))
    assert table_version(str(path)) == 39 and [p.name for p in (path / compaction.LEASE_DIR).iterdir()] == [
        Path(other.path).name]  # nothing done; its own lease gone
    assert main(["lake", "--table", str(path), "--action", "optimize"]) == 1
    assert "nothing was done. If it is not running" in capsys.readouterr().err
    compaction._drop_lease(LocalFileSystem(), other.path)

    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "jobs.cli", "lake", "--table", str(path), "--action", "optimize", "--target-mb", "1"]
    procs = [subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert sorted(p.returncode for p in procs) in ([0, 0], [0, 1]), outs
    table = DeltaSnapshot(str(path)).to_table()
    assert sorted(table.column("x").to_pylist()) == list(range(2000))  # every row once
    compactions = [h for h in history(str(path)) if h["operation"] == "OPTIMIZE"]
    assert len({h.get("readVersion") for h in compactions}) == len(compactions)  # none planned on the same version


def test_time_travel_before_the_first_commit_is_refused(tmp_path):
    """delta-rs loads its earliest version for a timestamp before the table's first commit;
    Delta's timestampAsOf refuses it. A pinned timestamp read version 0's rows instead."""
    import datetime as dt

    path = str(tmp_path / "t")
    write_arrow(path, pa.table({"x": [1]}))
    write_arrow(path, pa.table({"x": [2]}))
    (_, v0) = history(path)
    # version 0's time: its log file's (what delta-rs compares) or its commitInfo's (the history's), the earlier
    mtime_ms = int((tmp_path / "t" / "_delta_log" / f"{0:020d}.json").stat().st_mtime * 1000)
    first = dt.datetime.fromtimestamp(min(v0["timestamp"], mtime_ms) / 1000, dt.timezone.utc)
    for before in ("2020-01-01T00:00:00Z", first - dt.timedelta(milliseconds=1)):
        with pytest.raises(ValueError, match=r"that is before its earliest commit \(version 0, 20") as e:
            DeltaSnapshot(path, timestamp=before)
        assert first.isoformat(timespec="milliseconds") in str(e.value)
    for at in (first, dt.datetime.fromtimestamp(v0["timestamp"] / 1000, dt.timezone.utc)):
        assert DeltaSnapshot(path, timestamp=at).version == 0
    assert DeltaSnapshot(path, timestamp=dt.datetime.now(dt.timezone.utc)).version == 1


def test_vacuum_counts_a_file_that_became_deletable_after_its_dry_run(tmp_path, monkeypatch):
    """Vacuum lists (dry run), then deletes: a file that became deletable between the two (a
    retention boundary passed, a commit removed it) was deleted but left out of the report,
    which counted the dry run's files only. The report is delta-rs's own list of the delete,
    less the files that were not there (tombstones an earlier vacuum deleted)."""
    from deltalake import DeltaTable

    from pipelines.lake import vacuum

    path = str(tmp_path / "t")
    write_arrow(path, pa.table({"x": [1]}))
    write_arrow(path, pa.table({"x": [2]}), mode="overwrite")
    write_arrow(path, pa.table({"x": [3]}), mode="overwrite")  # versions 0 and 1's files: removed
    a, b = sorted(vacuum(path, retention_hours=0, enforce_retention=False))
    real = DeltaTable.vacuum

    def late(self, *args, dry_run=True, **kwargs):  # b becomes deletable only after the dry run
        got = real(self, *args, dry_run=dry_run, **kwargs)
        return [r for r in got if r != b] if dry_run else got

    monkeypatch.setattr(DeltaTable, "vacuum", late)
    assert sorted(vacuum(path, retention_hours=0, enforce_retention=False, dry_run=False)) == [a, b]
    assert not (tmp_path / "t" / a).exists() and not (tmp_path / "t" / b).exists()
    monkeypatch.undo()
    assert vacuum(path, retention_hours=0, enforce_retention=False, dry_run=False) == []  # tombstones: not again


def test_a_version_whose_log_entry_was_cleaned_up_names_the_versions_left(tmp_path, capsys):
    """delta-rs deletes log entries older than delta.logRetentionDuration when it writes a
    checkpoint: a pinned version from before then cannot be read, and the error said the table
    had versions 0..latest (found by the lake-longevity probe). It names the oldest readable
    version and why."""
    from deltalake import DeltaTable

    from pipelines.lake.maintenance import versions_held
    from training.dataspec import GoldVersionError, _snapshot

    path = tmp_path / "t"
    for i in range(4):
        write_arrow(str(path), pa.table({"x": [i]}))
    assert versions_held(str(path)) == "0..3"
    DeltaTable(str(path)).create_checkpoint()  # at version 3
    for v in (0, 1, 2):
        (path / "_delta_log" / f"{v:020d}.json").unlink()
    held = versions_held(str(path))
    assert held.startswith("3..3: the log entries of older versions were cleaned up (Delta keeps them "
                           "delta.logRetentionDuration"), held
    with pytest.raises(GoldVersionError, match=r"train.table_version: .* has no version 1 \(it has 3\.\.3: the log"):
        _snapshot(str(path), 1, "train.table_version")
    assert DeltaSnapshot(str(path)).to_table().num_rows == 4
    from jobs.cli import main

    assert main(["lake", "--table", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(no older entries: the log entries before version 3 were cleaned up;" in out
    write_arrow(str(path), pa.table({"x": [9]}))
    assert main(["lake", "--table", str(path), "--limit", "1"]) == 0  # the limit ends it: nothing to say
    assert "no older entries" not in capsys.readouterr().out


def test_lake_optimize_says_what_it_compacted(tmp_path, capsys):
    """`bigopt lake --action optimize` printed delta-rs's metrics dict (JSON strings inside a
    Python dict); now one line of what it did (found by the docs walkthrough probe)."""
    from jobs.cli import main

    path = str(tmp_path / "t")
    for i in range(3):
        write_arrow(path, pa.table({"x": [i]}))
    assert main(["lake", "--table", path, "--action", "optimize"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("compacted 3 file(s) (0.0 MB) into 1 (0.0 MB) in 1 partition(s); 0 file(s) left"), out
    assert main(["lake", "--table", path, "--action", "optimize"]) == 0
    assert capsys.readouterr().out.startswith("nothing to compact: 1 file(s)")
