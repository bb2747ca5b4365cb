"""Command output off a terminal (Airflow task logs, spark-submit): tables keep whole cells."""
from __future__ import annotations

from io import StringIO

from jobs.console import LOG_WIDTH, make_console


def test_tables_in_a_log_keep_whole_paths(monkeypatch):
    from rich.table import Table

    monkeypatch.delenv("COLUMNS", raising=False)
    out = StringIO()
    console = make_console(file=out)
    assert not console.is_terminal and console.width == LOG_WIDTH
    path = "s3://bucket/lake/criteo/bronze/events/source=kaggle_dac_train_head1000_trailing_tabs_stripped.txt"
    table = Table()
    table.add_column("file")
    table.add_column("note")
    table.add_row(path, "already ingested in batch b20261122-040728-099e58")
    console.print(table)
    console.log("a log line")  # rich pads it to the console's width: the padding is trimmed
    text = out.getvalue()
    assert path in text and "b20261122-040728-099e58" in text and "…" not in text
    assert "a log line" in text and not any(line.endswith(" ") for line in text.splitlines())
    # a width the user asks for wins
    monkeypatch.setenv("COLUMNS", "100")
    assert make_console(file=StringIO()).width == 100
    monkeypatch.delenv("COLUMNS")
    assert make_console(file=StringIO(), width=90).width == 90


def test_data_is_printed_as_it_is_never_as_markup():
    """File names, paths and quarantined lines may hold '[...]': printed verbatim, a stray
    closing tag raises nothing; styles come from styled() only."""
    from rich.table import Table

    from jobs.console import styled

    out = StringIO()
    console = make_console(file=out, width=120)
    table = Table()
    table.add_column("file")
    table.add_row("day [copy].txt")
    table.add_row("0\t1[/bold]\t[red]x")
    console.print(table)
    console.print("lake /tmp/[a]/lake")
    console.log("bad line [/x]")
    console.print(styled(("ingest", "bold"), " raw [1] -> bronze"))
    text = out.getvalue()
    for shown in ("day [copy].txt", "1[/bold]", "[red]x", "/tmp/[a]/lake", "bad line [/x]", "ingest raw [1] -> bronze"):
        assert shown in text, shown


def test_error_lines_go_to_stderr_for_every_command(tmp_path, capsys, spark_forbidden):
    """ingest, featurize and lake printed their ``bigopt <command>: <error>`` line on stdout,
    config, train, generate and quarantine on stderr: ``bigopt ingest ... >/dev/null`` showed
    nothing and exited 1, ``bigopt lake ... 2>/dev/null`` still showed the error. Every error
    line is on stderr now, one line, with stdout left to progress and results. Each of these
    exits 2, the command unable to run as given: until the twenty-ninth session an input that
    was not there exited 1 from ingest, featurize, lake and run, but 2 from train."""
    from jobs.cli import main

    lake = f"lake.root={tmp_path / 'lake'}"
    cases = (
        (["lake", "--table", str(tmp_path / "nowhere")], f"bigopt lake: no Delta table at {tmp_path / 'nowhere'} "),
        (["lake", "--action", "vacuum"], "bigopt lake: --table is required for --action vacuum"),
        (["ingest", "--input", str(tmp_path / "nowhere"), lake], "bigopt ingest: input "),
        (["featurize", lake], "bigopt featurize: no bronze table at "),
        (["run", "conf/criteo.yaml", lake, "tracking.enabled=false", f"train.checkpoint_dir={tmp_path / 'ck'}",
          f"criteo.inputs=[{tmp_path / 'nowhere'}]"], f"bigopt run: input '{tmp_path / 'nowhere'}' does not exist"),
    )
    for argv, said in cases:
        capsys.readouterr()
        with spark_forbidden(" ".join(argv)):
            assert main(argv) == 2, argv  # each an input not there, or a usage error
        out, err = capsys.readouterr()
        assert "bigopt " not in out, (argv, out)
        assert err.startswith(said) and len(err.splitlines()) == 1, (argv, err)
