"""benchmarks/lake_write.py's figures: one ``name: value`` a line, from the medians of the repeats."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "lake_write.py"
_spec = importlib.util.spec_from_file_location("lake_write_bench", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_every_figure_is_one_name_value_line():
    """Until the twenty-eighth session the first line held rows, columns and repeats at once."""
    secs = {"w_pq": [2.0, 4.0], "w_dl": [4.0, 4.0], "r_pq": [1.0, 1.0, 4.0], "r_dl": [2.0, 2.0, 2.0]}
    lines = bench.report_lines(1000, 2, secs)
    assert all(re.fullmatch(r"[a-z_]+: [0-9.]+", line) for line in lines), lines
    figures = dict(line.split(": ") for line in lines)
    assert (figures["rows"], figures["columns"], figures["repeats"]) == ("1000", "40", "2")
    # two repeats: the median is their mean; three: the middle one
    assert figures["write_rows_per_s_parquet"] == "333" and figures["write_ratio_vs_parquet"] == "0.750"
    assert figures["read_rows_per_s_parquet"] == "1000" and figures["read_ratio_vs_parquet"] == "0.500"
    assert list(figures)[-2:] == ["write_ratio_vs_parquet", "read_ratio_vs_parquet"]
