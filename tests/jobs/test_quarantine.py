"""``bigopt quarantine`` on a quarantine table it cannot read: one line, as ``bigopt lake`` says it."""
from __future__ import annotations

import pyarrow as pa

from jobs.config import load_config
from jobs.spark_step import error_line
from pipelines.criteo.schema import tables
from pipelines.lake.tasks import write_arrow


def test_a_damaged_quarantine_log_is_one_line(tmp_path, capsys, monkeypatch, spark_forbidden):
    """The quarantine's log damaged: `bigopt quarantine` was a ~40-line DeltaError traceback
    through DeltaSnapshot (and the Rust backtrace, RUST_BACKTRACE being set); now the line
    `bigopt lake --table` gives for the same table, on stderr, exit 1 - with --raw too."""
    from jobs.cli import main

    monkeypatch.setenv("RUST_BACKTRACE", "1")
    lake = f"lake.root={tmp_path / 'lake'}"
    path = tables(load_config(None, [lake]))["quarantine"]
    write_arrow(path, pa.table({"source": ["day_0"], "reason": ["hex"], "line": ["x"]}))
    (tmp_path / "lake" / "criteo" / "bronze" / "quarantine" / "_delta_log" / f"{0:020d}.json").write_text("garbage\n")
    want = (f"{path}: its log cannot be read: Kernel error: Json error: Encountered unexpected 'g' whilst parsing "
            "value")
    with spark_forbidden("bigopt quarantine"):
        for flags in ([], ["--raw"], ["--source", "day_0", "--raw"]):
            assert main(["quarantine", lake, *flags]) == 1, flags
            out, err = capsys.readouterr()
            assert (out, err) == ("", f"bigopt quarantine: {want}\n"), flags
    assert main(["lake", "--table", path]) == 1
    assert capsys.readouterr().err == f"bigopt lake: history {want}\n"


def test_a_quarantine_log_it_may_not_read_is_one_line(tmp_path, capsys, monkeypatch, spark_forbidden,
                                                      delta_rs_os_error):
    """A quarantine _delta_log without read permission: delta-rs's ``OSError`` (its causes on
    lines of their own, in colour) was a traceback; now the one line a damaged log gets."""
    from deltalake import DeltaTable

    from jobs.cli import main

    lake = f"lake.root={tmp_path / 'lake'}"
    path = tables(load_config(None, [lake]))["quarantine"]
    write_arrow(path, pa.table({"source": ["day_0"], "reason": ["hex"], "line": ["x"]}))

    def unreadable(*args, **kwargs):
        raise delta_rs_os_error("Unable to walk dir", "Permission denied (os error 13)")

    monkeypatch.setattr(DeltaTable, "is_deltatable", staticmethod(unreadable))
    want = (f"bigopt quarantine: {path}: its log cannot be read: Generic LocalFileSystem error: Unable to walk "
            "dir: Permission denied (os error 13)\n")
    with spark_forbidden("bigopt quarantine"):
        for flags in ([], ["--raw"]):
            assert main(["quarantine", lake, *flags]) == 1, flags
            assert capsys.readouterr() == ("", want), flags


def test_a_damaged_quarantine_data_file_is_one_line(tmp_path, capsys, spark_forbidden):
    """A quarantine data file damaged (or gone) behind the log: one line naming the table,
    on stderr, exit 1, for the counts and for --raw alike; pyarrow's traceback before."""
    from jobs.cli import main

    lake = f"lake.root={tmp_path / 'lake'}"
    path = tables(load_config(None, [lake]))["quarantine"]
    write_arrow(path, pa.table({"source": ["day_0"], "reason": ["hex"], "line": ["x"],
                                "line_bytes": pa.array([None], pa.binary())}))
    for f in (tmp_path / "lake").rglob("*.parquet"):
        f.write_bytes(b"PAR1 damaged")
    with spark_forbidden("bigopt quarantine"):
        for flags in ([], ["--raw"]):
            assert main(["quarantine", lake, *flags]) == 1, flags
            out, err = capsys.readouterr()
            assert err.startswith(f"bigopt quarantine: {path}: a data file cannot be read: ") and err.count("\n") == 1
            assert "Traceback" not in out + err, flags


def test_error_line_drops_delta_rs_colours_and_rust_backtrace():
    """What delta-rs's errors carry (its colours; the backtrace where RUST_BACKTRACE is set) is
    left out of every ``bigopt <command>:`` line, not only `bigopt lake`'s."""
    e = RuntimeError("Kernel error: \x1b[31m↳\x1b[0m Json error: bad\n   0: <unknown>\n  12: start_thread\n"
                     "             at ./nptl/pthread_create.c:442:8")
    assert error_line(e) == "Kernel error: ↳ Json error: bad"
    chain = OSError("Generic LocalFileSystem error\n          \x1b[31m↳\x1b[0m Unable to walk dir\n"
                    "           \x1b[31m↳\x1b[0m Permission denied (os error 13)\n   0: <unknown>")
    assert error_line(chain) == "Generic LocalFileSystem error: Unable to walk dir: Permission denied (os error 13)"
    assert error_line(ValueError("two\nlines")) == "two\nlines"  # a message of its own is kept whole


def test_a_batch_without_lines_now_says_what_became_of_its_files(tmp_path, capsys, spark_forbidden):
    """`--batch` of a batch whose files were ingested again since (`--force`, a changed file:
    the new rows replaced its quarantined lines) or dropped said "0 line(s)" and nothing more,
    as for a typo; now the ledger names each file's fate, the batch holding its lines now, or
    the latest batches when the id is none of the ledger's."""
    import datetime as dt

    from jobs.cli import main
    from pipelines.criteo.bronze import LEDGER_SCHEMA, QUARANTINE_SCHEMA

    lake = f"lake.root={tmp_path / 'lake'}"
    paths = tables(load_config(None, [lake]))
    t0 = dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.timezone.utc)

    def entry(source, batch, hours, rejected, size=100):
        return {"source": source, "path": f"/raw/{source}", "day": int(source[-1]), "size": size,
                "rows_rejected": rejected, "ingest_batch": batch, "ingested_at": t0 + dt.timedelta(hours=hours)}

    ledger = [entry("day_0", "b1", 0, 2), entry("day_1", "b1", 0, 0), entry("day_2", "b1", 0, 1),
              entry("day_0", "b2", 1, 3), entry("day_2", "b3", 2, 0, size=None)]
    write_arrow(paths["ledger"], pa.Table.from_pylist(ledger, schema=LEDGER_SCHEMA))
    write_arrow(paths["quarantine"], pa.Table.from_pylist(
        [{"line": "x", "reason": "I3 not an integer", "num_fields": 40, "ingest_batch": "b2", "day": 0,
          "source": "day_0"}] * 3, schema=QUARANTINE_SCHEMA))

    def said(*flags):
        assert main(["quarantine", lake, *flags]) == 0, flags
        out, err = capsys.readouterr()
        return " ".join((out + err).split())

    with spark_forbidden("bigopt quarantine"):
        b1 = said("--batch", "b1")
        assert "0 line(s) where batch 'b1'" in b1 and "batch b1 has no quarantined line now:" in b1
        assert ("day_0: ingested again in batch b2 (2026-11-20 09:00 UTC), whose rows replaced this batch's: "
                "3 line(s) quarantined there") in b1
        assert "day_1: no line quarantined" in b1 and "day_2: dropped since (--drop-source)" in b1
        assert "day_2: dropped by this batch" in said("--batch", "b3")
        assert "no ingest batch 'b9' in the ledger; the latest: b3, b2, b1" in said("--batch", "b9")
        assert "no line of batch 'b2' where --reason 'hex'" in said("--batch", "b2", "--reason", "hex")
        assert "batch b1 did not ingest 'day_7'; its files: day_0, day_1, day_2" in said("--batch", "b1", "--source",
                                                                                         "day_7")
        assert "3 line(s) where batch 'b2'" in said("--batch", "b2")
        assert main(["quarantine", lake, "--batch", "b1", "--raw"]) == 0
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("bigopt quarantine: batch b1 has no quarantined line now:\n  day_0: ")
