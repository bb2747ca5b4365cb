"""The rich console every ``bigopt`` command prints through.

On a terminal it takes the terminal's width. Anywhere else (a log file, an Airflow task log,
spark-submit's driver output) rich would assume 80 columns and cut table cells to fit, so a
file name, table path or batch id in a log ended in "…"; there it is 200 columns wide instead
(tables are only as wide as their contents) unless ``COLUMNS`` says otherwise.
"""
from __future__ import annotations

import os

LOG_WIDTH = 200


def make_console(**kwargs):
    from rich.console import Console

    console = Console(**kwargs)
    if not console.is_terminal and "COLUMNS" not in os.environ and "width" not in kwargs:
        console.width = LOG_WIDTH
    return console
