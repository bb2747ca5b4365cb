"""What ingest quarantined: counts per file and reason, and the lines themselves (no Spark).

    view = quarantined(cfg, batch="b20261122-...", reason="hex", limit=20)
    view.counts    # [(source, reason, lines)], most first
    view.examples  # up to `limit` rows (source, day, reason, num_fields, line, ingest_batch),
                   # spread over the (source, reason) groups, most common first
    for line in quarantined_lines(cfg, source="day_3.gz"):   # every matching line's bytes, streamed
        ...

The quarantine table (``<lake.root>/criteo/bronze/quarantine``, partitioned by day and source)
holds the bad lines of every file as last ingested: ``--force`` replaces a file's rows there
as in bronze. Filters: ``source`` (a file's name: only its partition's files are read),
``batch`` (an ingest batch id, as ``bigopt ingest`` prints it) and ``reason`` (a substring,
any case). The counts read only the columns they and the filters need. A quarantine table whose
log cannot be read (a damaged ``_delta_log/*.json``, a ``_delta_log`` without read permission),
or one of whose data files cannot, is a :class:`QuarantineError` naming it.
"""
from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.criteo.schema import tables


class QuarantineError(RuntimeError):
    """The quarantine table cannot be read; the message names it and says why."""


@dataclass
class QuarantineView:
    table: str
    version: int | None  # None: no quarantine table yet (nothing was ever quarantined)
    counts: list[tuple[str, str, int]] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)

    @property
    def lines(self) -> int:
        return sum(n for _, _, n in self.counts)


def _where(source: str | None, batch: str | None, reason: str | None):
    """The filter expression of the given filters (None: every row)."""
    conds = []
    if source is not None:  # a partition column: the other files are not read
        conds.append(pc.field("source") == source)
    if batch is not None:
        conds.append(pc.field("ingest_batch") == batch)
    if reason:
        conds.append(pc.match_substring(pc.field("reason"), reason, ignore_case=True))
    return functools.reduce(operator.and_, conds) if conds else None


def _snapshot(cfg):
    from deltalake.exceptions import DeltaError

    from pipelines.lake import DeltaSnapshot

    path = tables(cfg)["quarantine"]
    try:
        return path, DeltaSnapshot(path)
    except FileNotFoundError:  # no table yet: nothing was ever quarantined
        return path, None
    except (DeltaError, OSError) as e:  # a damaged log, or one it may not list: as `bigopt lake` says it
        raise QuarantineError(f"{path}: its log cannot be read: {e}") from e


@contextlib.contextmanager
def _reading(path: str):
    """A damaged or missing data file of the table (its log names it): a QuarantineError
    naming the table and the cause, not pyarrow's traceback."""
    try:
        yield
    except (OSError, pa.ArrowException) as e:
        raise QuarantineError(f"{path}: a data file cannot be read: {type(e).__name__}: {e}") from e


def quarantined(cfg, *, batch: str | None = None, source: str | None = None, reason: str | None = None,
                limit: int = 20) -> QuarantineView:
    """The quarantined lines matching every filter given (see the module docstring)."""
    path, snap = _snapshot(cfg)
    if snap is None:
        return QuarantineView(path, None)
    view = QuarantineView(path, snap.version)
    cond = _where(source, batch, reason)
    with _reading(path):
        ds = snap.dataset()
        counts = ds.to_table(columns=["source", "reason"], filter=cond).group_by(["source", "reason"]).aggregate(
            [("reason", "count")])
    view.counts = sorted(
        zip(counts.column("source").to_pylist(), counts.column("reason").to_pylist(),
            counts.column("reason_count").to_pylist()),
        key=lambda t: (-t[2], t[0], t[1]))
    cols = ["source", "day", "reason", "num_fields", "line", "ingest_batch"]
    per_group = max(1, limit // max(1, len(view.counts)))
    for src, rsn, _ in view.counts:  # a few of each kind, not the first `limit` of the most common
        if len(view.examples) >= limit:
            break
        group = (pc.field("source") == src) & (pc.field("reason") == rsn)
        take = min(per_group, limit - len(view.examples))
        with _reading(path):
            view.examples += ds.head(take, columns=cols, filter=group if cond is None else cond & group).to_pylist()
    return view


def quarantined_sources(cfg) -> list[str]:
    """The files (bronze ``source`` names) the quarantine holds lines of, from its log."""
    _, snap = _snapshot(cfg)
    return [] if snap is None else sorted({fe.partition_values.get("source") for fe in snap.files()} - {None})


def quarantined_lines(cfg, *, batch: str | None = None, source: str | None = None,
                      reason: str | None = None) -> Iterator[bytes]:
    """Every matching quarantined line's exact bytes (without its line end), streamed:
    ``line_bytes`` where the ``line`` text is not the whole line (undecodable bytes, or longer
    than ``max_line_preview``), else ``line``."""
    path, snap = _snapshot(cfg)
    if snap is None:
        return
    with _reading(path):
        batches = snap.dataset().to_batches(columns=["line", "line_bytes"], filter=_where(source, batch, reason))
        for b in batches:
            for text, exact in zip(b.column(0).to_pylist(), b.column(1).to_pylist()):
                yield exact if exact is not None else text.encode()
