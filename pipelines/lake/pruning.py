"""File pruning for pushed-down Spark filters.

A filter on a partition column decides a file exactly (its partition value is known). A filter
on any other column can only rule a file out through its min/max statistics; Spark still
evaluates it on the rows that are read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyspark.sql import datasource as ds


@dataclass(frozen=True)
class Predicate:
    column: str
    op: str  # '=', '<', '<=', '>', '>=', 'in', 'is_null', 'not_null'
    value: Any = None


_OPS = {
    ds.EqualTo: "=",
    ds.GreaterThan: ">",
    ds.GreaterThanOrEqual: ">=",
    ds.LessThan: "<",
    ds.LessThanOrEqual: "<=",
}


def to_predicate(f) -> Predicate | None:
    """A pushed Spark filter on a top-level column as a :class:`Predicate` (None if unsupported)."""
    attr = getattr(f, "attribute", None)
    if not attr or len(attr) != 1:
        return None
    col = attr[0]
    for cls, op in _OPS.items():
        if type(f) is cls:
            return Predicate(col, op, f.value)
    if type(f) is ds.In:
        return Predicate(col, "in", tuple(f.value))
    if type(f) is ds.IsNull:
        return Predicate(col, "is_null")
    if type(f) is ds.IsNotNull:
        return Predicate(col, "not_null")
    return None


def _cmp(op: str, v: Any, target: Any) -> bool:
    try:
        if op == "=":
            return v == target
        if op == ">":
            return v > target
        if op == ">=":
            return v >= target
        if op == "<":
            return v < target
        if op == "<=":
            return v <= target
    except TypeError:
        return True
    return True


def _coerce(v: Any, like: Any) -> Any:
    if v is None or like is None or type(v) is type(like):
        return v
    try:
        return type(like)(v)
    except (TypeError, ValueError):
        return v


def file_may_match(fe, p: Predicate, partition_columns: list[str]) -> bool:
    """False only when the file certainly holds no row satisfying ``p``."""
    if p.column in partition_columns:
        v = fe.partition_values.get(p.column)
        if p.op == "is_null":
            return v is None
        if p.op == "not_null":
            return v is not None
        if v is None:
            return False
        if p.op == "in":
            return any(_cmp("=", v, _coerce(t, v)) for t in p.value)
        return _cmp(p.op, v, _coerce(p.value, v))
    lo, hi = fe.min_values.get(p.column), fe.max_values.get(p.column)
    nulls, n = fe.null_counts.get(p.column), fe.num_records
    if p.op == "is_null":
        return nulls is None or nulls > 0
    if p.op == "not_null":
        return nulls is None or n is None or nulls < n
    if lo is None or hi is None:
        return True
    if p.op == "=":
        t = _coerce(p.value, lo)
        return _cmp("<=", lo, t) and _cmp(">=", hi, t)
    if p.op == "in":
        return any(_cmp("<=", lo, _coerce(t, lo)) and _cmp(">=", hi, _coerce(t, lo)) for t in p.value)
    if p.op in (">", ">="):
        return _cmp(p.op, hi, _coerce(p.value, hi))
    if p.op in ("<", "<="):
        return _cmp(p.op, lo, _coerce(p.value, lo))
    return True
