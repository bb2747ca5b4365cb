"""The bronze layer's three tables and what their Delta logs say per source file.

* ``events`` (bronze): the typed rows, partitioned by ``day`` and ``source`` (the raw file's
  name), with the ``ingest_batch`` that wrote them;
* ``quarantine``: the raw lines ingest rejected, with the reason;
* ``ledger``: one row per ingested (or dropped) file, appended last by each ingest: a file is
  ingested when its ledger row exists.

:mod:`pipelines.criteo.ingest` writes them; featurize, ``bigopt quarantine`` and training's
settings check read them through the functions here (the latest ledger entry per source, the
bronze rows and batches per source from the log's file statistics, and where the two disagree).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence

import pyarrow as pa

from pipelines.criteo.parse import ROW_SCHEMA
from pipelines.criteo.schema import DENSE, SPARSE

log = logging.getLogger(__name__)

PARTITION_BY = ["day", "source"]
BRONZE_DDL = (
    "label int, "
    + ", ".join(f"{c} bigint" for c in DENSE)
    + ", "
    + ", ".join(f"{c} string" for c in SPARSE)
    + ", ingest_batch string, day int, source string"
)
QUARANTINE_DDL = (
    "line string, line_bytes binary, reason string, num_fields int, ingest_batch string, day int, source string"
)
LEDGER_DDL = (
    "source string, path string, day int, labeled boolean, gzip boolean, size bigint, mtime_ns bigint, "
    "quick_hash string, sha256 string, lines bigint, rows_ok bigint, rows_rejected bigint, "
    "ingest_batch string, bronze_version bigint, quarantine_version bigint, forced boolean, "
    "ingested_at timestamp, config_hash string"
)
# Parquet statistics (and so Delta min/max) only where a reader can use them: min/max of
# random 8-hex categoricals skip nothing, and computing them cost 15% of the bronze write
# (0.08 of 0.56 CPU-s per 128 MiB chunk). ingest_batch's are how featurize checks bronze
# against the ledger: it is column 41, past the 32 whose statistics Delta readers parse by
# default, so the table declares these (delta.dataSkippingStatsColumns).
BRONZE_STATS_COLUMNS = ["label", *DENSE, "ingest_batch"]
_BATCH_FIELDS = [pa.field("ingest_batch", pa.string()), pa.field("day", pa.int32()), pa.field("source", pa.string())]
BRONZE_SCHEMA = pa.schema(list(ROW_SCHEMA) + _BATCH_FIELDS)  # = BRONZE_DDL (tested)
LEDGER_SCHEMA = pa.schema(  # = LEDGER_DDL (tested)
    [pa.field(n, t) for n, t in [
        ("source", pa.string()), ("path", pa.string()), ("day", pa.int32()), ("labeled", pa.bool_()),
        ("gzip", pa.bool_()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("quick_hash", pa.string()),
        ("sha256", pa.string()), ("lines", pa.int64()), ("rows_ok", pa.int64()), ("rows_rejected", pa.int64()),
        ("ingest_batch", pa.string()), ("bronze_version", pa.int64()), ("quarantine_version", pa.int64()),
        ("forced", pa.bool_()), ("ingested_at", pa.timestamp("us", tz="UTC")), ("config_hash", pa.string()),
    ]]
)
QUARANTINE_SCHEMA = pa.schema(
    [pa.field("line", pa.string()), pa.field("line_bytes", pa.binary()), pa.field("reason", pa.string()),
     pa.field("num_fields", pa.int32()), *_BATCH_FIELDS]
)
# the raw line (up to max_line_preview characters, past Parquet's statistics size) and its
# bytes get no bound a reader could use: declared without them, a reader knows there is none
# (delta-rs's pyarrow path skipped a file for any filter on a column it had no bound for)
QUARANTINE_STATS_COLUMNS = ["reason", "num_fields", "ingest_batch"]


def read_ledger(path: str) -> list[dict]:
    from pipelines.lake import DeltaSnapshot, table_exists

    if not table_exists(path):
        return []
    return DeltaSnapshot(path).to_table().to_pylist()


def current_entries(ledger_rows: list[dict]) -> dict[str, dict]:
    """The latest ledger row per source; none for a source whose latest row records its drop
    (no ``size``: :func:`pipelines.criteo.ingest._drop_sources`)."""
    cur: dict[str, dict] = {}
    for r in sorted(ledger_rows, key=lambda r: (r["ingested_at"], r["ingest_batch"])):
        cur[r["source"]] = r
    return {s: r for s, r in cur.items() if r["size"] is not None}


def bronze_sources(snapshot) -> dict[str, dict]:
    """Per bronze ``source`` partition of ``snapshot`` (a DeltaSnapshot), from the Delta log
    alone: ``{"rows", "batches" (the ingest_batch ids its files' statistics name), "day"}``."""
    per_source: dict[str, dict] = {}
    for fe in snapshot.files():
        src = fe.partition_values.get("source")
        d = per_source.setdefault(src, {"rows": 0, "batches": set(), "day": fe.partition_values.get("day")})
        d["rows"] += int(fe.num_records or 0)
        for b in (fe.min_values.get("ingest_batch"), fe.max_values.get("ingest_batch")):
            if b is not None:
                d["batches"].add(b)
    unchecked = sorted(s for s, d in per_source.items() if d["rows"] and not d["batches"])
    if unchecked:  # a bronze table from before it declared its statistics columns
        log.warning("bronze files of %d source(s) (e.g. %s) carry no ingest_batch statistics: only their row "
                    "counts are checked against the ledger", len(unchecked), unchecked[0])
    return per_source


def unconfirmed_sources(per_source: dict[str, dict], current: dict[str, dict]) -> dict[str, str]:
    """The sources whose bronze rows (:func:`bronze_sources`) are not the ones the ledger's
    current entry (:func:`current_entries`) records, each with why: rows of an ingest that
    stopped between its bronze commit and its ledger entry, or bronze changed behind the
    ledger's back."""
    out: dict[str, str] = {}
    for src in sorted(set(per_source) | set(current)):
        b, led = per_source.get(src), current.get(src)
        if led is None:
            out[src] = f"{b['rows']} bronze rows but no ledger entry (an interrupted ingest?)"
            continue
        rows = b["rows"] if b else 0
        if rows != led["rows_ok"] or (b and b["batches"] and b["batches"] != {led["ingest_batch"]}):
            out[src] = (f"bronze has {rows} rows from batch(es) {sorted(b['batches']) if b else []}, "
                        f"the ledger says {led['rows_ok']} rows from {led['ingest_batch']}")
    return out


def rows_by_source(path: str, version: int | None, sources: Sequence[str] | None = None) -> dict[str, int]:
    """Row counts per ``source`` partition from the Delta log's file statistics (no data read),
    at ``version`` (None: the latest). From the log's add actions as one Arrow table, filtered
    there: an ingest calls this up to four times per group, and building every file's entry
    (:meth:`DeltaSnapshot.files`) of a 2,000-file bronze took ~12 s of a 2,000-file run."""
    import pyarrow.compute as pc

    from pipelines.lake import DeltaSnapshot

    actions = pa.table(DeltaSnapshot(path, version=version).table.get_add_actions(flatten=True))
    if not actions.num_rows:
        return {}
    src, n = actions.column("partition.source"), actions.column("num_records")
    if sources is not None:
        keep = pc.is_in(src, value_set=pa.array(list(sources), pa.string()))
        src, n = src.filter(keep), n.filter(keep)
    out: dict[str, int] = {}
    for s, k in zip(src.to_pylist(), n.to_pylist()):
        out[s] = out.get(s, 0) + int(k or 0)
    return out


def in_flight(path: str, per_source: Mapping[str, dict], sources: Iterable[str], within_s: float,
              limit: int = 100) -> dict[str, tuple[str, float, int]]:
    """Of ``sources`` (unconfirmed ones: :func:`unconfirmed_sources`), those whose bronze rows
    (``per_source``: :func:`bronze_sources`) a batch committed less than ``within_s``
    seconds ago: source -> (batch, seconds ago, the version it committed). Between its bronze
    commit and its ledger entry an ingest's rows look exactly like an interrupted one's; a drop
    must not take them (nor
    featurize refuse bronze for them). From the commit infos of the newest ``limit`` commits,
    read newest first until one is older than ``within_s``."""
    batches = {src: per_source[src]["batches"] for src in sources if src in per_source}
    if not within_s or not any(batches.values()):
        return {}
    from pipelines.lake.maintenance import history

    now, recent = time.time(), {}
    for info in history(path, limit):
        age = now - float(info.get("timestamp") or 0) / 1000.0
        if age > within_s:
            break
        if b := info.get("ingest_batch"):
            recent.setdefault(b, (max(age, 0.0), int(info["version"])))
    out = {}
    for src, bs in batches.items():
        young = sorted((recent[b], b) for b in bs if b in recent)
        if young:
            (age, version), b = young[0]
            out[src] = (b, age, version)
    return out
