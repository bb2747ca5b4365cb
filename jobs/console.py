"""The rich console every ``bigopt`` command prints through.

On a terminal it takes the terminal's width. Anywhere else (a log file, an Airflow task log,
spark-submit's driver output) rich would assume 80 columns and cut table cells to fit, so a
file name, table path or batch id in a log ended in "…"; there it is 200 columns wide instead
(tables are only as wide as their contents) unless ``COLUMNS`` says otherwise, and the spaces
rich pads log lines with up to that width are trimmed.

Markup is off: what the commands print is mostly data (file names, table paths, raw lines
from the quarantine, error messages naming them), and rich took any ``[...]`` in it for a
style: ``day [copy].txt`` printed as ``day .txt`` and a quarantined line holding ``[/x]``
stopped ``bigopt quarantine`` with a MarkupError. Style with :func:`styled` (or
``rich.text.Text``) instead.

A command's progress and results go to stdout; its ``bigopt <command>: <error>`` lines go to
stderr, every command's alike (:func:`print_error`), so ``2>/dev/null`` hides only errors and
``>/dev/null`` (or a pipe: ``bigopt quarantine --raw | ...``) still shows them.
"""
from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.text import Text

LOG_WIDTH = 200
_PADDING = re.compile(r"[ \t]+(?=\n)")


class _TrimmedLines:
    """A text stream that drops the trailing blanks of every line written through it."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(_PADDING.sub("", text))
        return len(text)

    def __getattr__(self, name):  # flush, encoding, fileno, isatty, ...
        return getattr(self._stream, name)


# control characters shown as their Unicode pictures (␛, ␀, ␊, ␡), TABs as ⇥: an escape
# sequence in a quarantined line or a file name would otherwise recolour or clear the
# operator's terminal, and a newline in a name split its table row in two
_SHOWN = {**{i: 0x2400 + i for i in range(32)}, 0x7F: 0x2421, 0x09: "⇥"}


def shown(text: str) -> str:
    """``text`` (a raw line, a file name) safe to print: its control characters as pictures."""
    return text.translate(_SHOWN)


def _shown_lines(text: str) -> str:
    """:func:`shown` of each line of ``text``, its newlines kept (one character for one: a
    styled line's spans stay where they were)."""
    return "\n".join(shown(part) for part in text.split("\n"))


def styled(*parts):
    """A line of plain strings and ``(text, style)`` pairs, e.g.
    ``styled(("ingest", "bold"), " raw -> bronze")``; the strings are never read as markup."""
    from rich.text import Text

    return Text.assemble(*parts)


def print_error(line: str | Text) -> None:
    """Print a ``bigopt <command>: <error>`` line to stderr: a ``str`` in red, or a line
    already styled (``jobs.spark_step.error_text``). Never hard-wrapped: it stays one line,
    a path in it whole."""
    from rich.text import Text

    if isinstance(line, Text):  # a file name in it with an escape sequence, as in the tables: shown, not obeyed
        line = Text(_shown_lines(line.plain), style=line.style, spans=line.spans, end=line.end)
    else:
        line = styled((_shown_lines(line), "red"))
    make_console(stderr=True, soft_wrap=True).print(line)


def make_console(**kwargs):
    from rich.console import Console

    kwargs.setdefault("markup", False)
    kwargs.setdefault("emoji", False)  # data as written: ':fire:' in a path or a raw line is no 🔥
    console = Console(**kwargs)
    if not console.is_terminal and "COLUMNS" not in os.environ and "width" not in kwargs:
        stream = kwargs.get("file") or (sys.stderr if kwargs.get("stderr") else sys.stdout)
        console = Console(**{**kwargs, "file": _TrimmedLines(stream), "width": LOG_WIDTH})
    return console
