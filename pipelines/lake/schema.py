"""Schema conversion and enforcement between Spark, Arrow and Delta.

Enforcement rule (the one Delta uses): an append must carry exactly the table's columns with
the same types. With ``merge_schema=True`` it may also carry *new nullable* columns, which are
added to the table; old files read back as null for them. Anything else is a
:class:`SchemaMismatchError` raised on the driver before a single task writes a byte.
"""
from __future__ import annotations

import pyarrow as pa


class SchemaMismatchError(ValueError):
    """The data's schema does not match the Delta table's schema."""


def canonical_type(t: pa.DataType) -> str:
    """A type name that ignores representation-only differences (large vs small offsets,
    list element field names, timestamp zone spelling)."""
    if pa.types.is_large_string(t) or pa.types.is_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_large_binary(t) or pa.types.is_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_list_view(t):
        return f"array<{canonical_type(t.value_type)}>"
    if pa.types.is_map(t):
        return f"map<{canonical_type(t.key_type)},{canonical_type(t.item_type)}>"
    if pa.types.is_struct(t):
        inner = ",".join(f"{t.field(i).name}:{canonical_type(t.field(i).type)}" for i in range(t.num_fields))
        return f"struct<{inner}>"
    if pa.types.is_timestamp(t):
        return "timestamp" if t.tz else "timestamp_ntz"
    if pa.types.is_dictionary(t):
        return canonical_type(t.value_type)
    return str(t)


def spark_to_arrow(struct) -> pa.Schema:
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(struct, timezone="UTC") if _accepts_tz() else to_arrow_schema(struct)


def _accepts_tz() -> bool:
    import inspect

    from pyspark.sql.pandas.types import to_arrow_schema

    return "timezone" in inspect.signature(to_arrow_schema).parameters


def arrow_to_spark(schema: pa.Schema):
    from pyspark.sql.pandas.types import from_arrow_schema

    normalized = pa.schema([pa.field(f.name, _spark_friendly(f.type), f.nullable) for f in schema])
    return from_arrow_schema(normalized)


def _spark_friendly(t: pa.DataType) -> pa.DataType:
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_fixed_size_list(t):
        return pa.list_(_spark_friendly(t.value_type))
    if pa.types.is_list(t):
        return pa.list_(_spark_friendly(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(t.field(i).name, _spark_friendly(t.field(i).type), t.field(i).nullable) for i in range(t.num_fields)])
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz="UTC" if t.tz else None)
    return t


def to_pyarrow_schema(delta_schema) -> pa.Schema:
    """A delta-rs Schema (arro3 or pyarrow flavoured) as a pyarrow Schema."""
    arrow = delta_schema.to_arrow()
    return arrow if isinstance(arrow, pa.Schema) else pa.schema(arrow)


def check_compatible(table: pa.Schema, data: pa.Schema, *, merge_schema: bool, table_uri: str) -> list[pa.Field]:
    """Validate ``data`` against ``table``; return the new columns to add (merge_schema only)."""
    tfields = {f.name.lower(): f for f in table}
    problems: list[str] = []
    for f in data:
        tf = tfields.get(f.name.lower())
        if tf is None:
            continue
        if tf.name != f.name:  # Delta names are case-insensitive, Parquet readers' are not
            problems.append(f"column '{f.name}': the table spells it '{tf.name}'")
        elif canonical_type(tf.type) != canonical_type(f.type):
            problems.append(f"column '{f.name}': table has {canonical_type(tf.type)}, data has {canonical_type(f.type)}")
    data_names = {f.name.lower() for f in data}
    missing = [f.name for f in table if f.name.lower() not in data_names]
    if missing:
        problems.append(f"data lacks table column(s) {missing}")
    new = [f for f in data if f.name.lower() not in tfields]
    if new and not merge_schema:
        problems.append(
            f"data has column(s) {[f.name for f in new]} that the table lacks "
            "(pass merge_schema=True to add nullable columns)"
        )
    if problems:
        raise SchemaMismatchError(f"schema mismatch writing to Delta table {table_uri}: " + "; ".join(problems))
    return new if merge_schema else []
