"""Config sections shared by every pipeline: the Spark session and the lake layout."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SparkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    master: str | None = Field(None, description="None: spark-submit's master, else local[*]")
    app_name: str = "bigopt"
    conf: dict[str, Any] = Field(default_factory=dict, description="extra spark.* settings")
    log_level: str = "WARN"
    ui: bool | None = None


class LakeConfig(BaseModel):
    """Where the Delta tables live: ``<root>/<dataset>/<layer>/<table>``."""

    model_config = ConfigDict(extra="forbid")
    root: str = "lake"
    compression: Literal["zstd", "lz4", "snappy", "gzip", "none"] = Field(
        "zstd",
        description="Parquet codec of the tables the pipelines write (bronze, quarantine, ledgers, "
        "vocabularies); a table with its own setting (criteo.featurize.compression: gold) uses that",
    )

    @field_validator("root")
    @classmethod
    def _root_usable(cls, v: str) -> str:
        if not v.strip():  # '' would put the tables straight into the working directory
            raise ValueError("must name a directory or URI (got an empty string: an empty ${VAR}?)")
        from pipelines.lake.fs import check_table_path

        check_table_path(v)
        return v

    def table(self, dataset: str, layer: str, name: str) -> str:
        if "://" in self.root:
            return f"{self.root.rstrip('/')}/{dataset}/{layer}/{name}"
        return str(Path(self.root).expanduser().resolve() / dataset / layer / name)
