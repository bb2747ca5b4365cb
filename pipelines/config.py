"""Config sections shared by every pipeline: the Spark session and the lake layout, and
:class:`Section`, the base of every section model (here, the layer below all the others)."""
from __future__ import annotations

import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


class Section(BaseModel):
    """Base of every config section: an unknown key is an error, and so are a boolean for a
    number setting and an infinite or NaN number. Pydantic's lax mode reads ``true`` as 1 / 1.0
    (``train.lr=true`` ran with lr 1.0), and its JSON dump writes inf and NaN as null, so
    ``bigopt config`` and MLflow showed ``lr: null`` for the ``.inf`` that ran. Text such as
    ``"3"`` (an ``${ENV_VAR}``) still reads as a number, and 1 as 1.0."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        members = _members(cls.model_fields[info.field_name].annotation)
        if any(isinstance(m, type) and issubclass(m, BaseModel) for m in members):
            return value  # a section: its own fields are checked, each under its own key
        if _bool_for_number(members, value):
            raise PydanticCustomError("bool_for_number", "Input should be a number, not a boolean")
        if not _holds_numbers(cls.model_fields[info.field_name].annotation):
            return value  # text (run.name, tracking.tags): a float there is the type's own error
        if (where := _non_finite(value)) == "":
            raise PydanticCustomError("finite_number", "Input should be a finite number")
        if where is not None:  # free-form mappings (train.optimizer_params, spark.conf): logged alike
            raise PydanticCustomError("finite_number", "{key} should be a finite number", {"key": where})
        return value


def _members(ann: Any) -> tuple[Any, ...]:
    """The types a union annotation allows (``(float, NoneType)`` for ``float | None``)."""
    return typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)


def _bool_for_number(members: tuple[Any, ...], value: Any) -> bool:
    """Whether ``value`` holds a boolean where the setting (of the types ``members``) wants a
    number and no boolean (``int``, ``float | None``, the items of ``list[int]``)."""
    if isinstance(value, bool):
        return bool not in members and any(m in (int, float) for m in members)
    if isinstance(value, list):
        items = [typing.get_args(m)[0] for m in members if typing.get_origin(m) is list and typing.get_args(m)]
        return any(_bool_for_number(_members(item), v) for item in items for v in value)
    return False


def _holds_numbers(ann: Any) -> bool:
    """Whether a setting of type ``ann`` can hold a number anywhere (int, float, Any, or a union,
    mapping or list of them). One that cannot, such as ``str`` or ``dict[str, str]``, is not
    checked for infinite or NaN numbers: a float there is refused as no text, which an override
    then takes as the text typed (``run.name=.nan``, ``tracking.tags.commit=8e12345``, a git
    hash YAML reads as 8 x 10^12345). Until the twenty-eighth session they were refused as
    "should be a finite number"."""
    if ann in (int, float, Any, object):
        return True
    return typing.get_origin(ann) is not typing.Literal and any(_holds_numbers(a) for a in typing.get_args(ann))


def _non_finite(value: Any, where: str = "") -> str | None:
    """The path (``''``: the value itself) of the first infinite or NaN float in ``value``,
    descending into mappings and lists; None when there is none."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, dict):
        found = (_non_finite(v, f"{where}.{k}" if where else str(k)) for k, v in value.items())
    elif isinstance(value, list):
        found = (_non_finite(v, f"{where}[{i}]") for i, v in enumerate(value))
    else:
        return None
    return next((w for w in found if w is not None), None)


# Spark's own forms (org.apache.spark.SparkMasterRegex): local[N] / local[*], with a failure count F
_LOCAL_MASTER = re.compile(r"local(?:\[([0-9]+|\*)\]|\[([0-9]+|\*)\s*,\s*([0-9]+)\])?")
_LOCAL_CLUSTER_MASTER = re.compile(r"local-cluster\[\s*([0-9]+)\s*,\s*([0-9]+)\s*,\s*([0-9]+)\s*\]")
# what SparkContext.setLogLevel accepts (its VALID_LOG_LEVELS)
SPARK_LOG_LEVELS = ("ALL", "DEBUG", "ERROR", "FATAL", "INFO", "OFF", "TRACE", "WARN")


class SparkConfig(Section):
    master: str | None = Field(None, description="None: spark-submit's master, else local[*]")
    app_name: str = "bigopt"
    conf: dict[str, Any] = Field(default_factory=dict, description="extra spark.* settings; nested mappings are "
                                 "dotted keys ({spark: {sql: {x: 1}}} is spark.sql.x)")
    log_level: str = "WARN"
    ui: bool | None = None

    @field_validator("master")
    @classmethod
    def _spark_master(cls, master: str | None) -> str | None:
        """A master URL of a form Spark parses (``SparkMasterRegex``, and the cluster managers it
        ships), with at least one thread, worker, core and MB. Until the twenty-eighth session
        ``foo`` made Spark's JVM print a stack trace and the command blame a wrong JAVA_HOME,
        after it had made the lake's folders, and ``local[x]`` / ``local[0]`` failed as a Spark job."""
        if master is None:
            return None
        counts = None
        if m := _LOCAL_MASTER.fullmatch(master):
            counts = [c for c in m.groups() if c not in (None, "*")]
        elif m := _LOCAL_CLUSTER_MASTER.fullmatch(master):
            counts = list(m.groups())
        elif master.startswith("spark://"):
            from pipelines.spark import SparkStartError, _master_addresses

            try:
                counts = [] if all(host for host, _ in _master_addresses(master)) else None
            except SparkStartError:  # a port that is no number
                counts = None
        elif master == "yarn" or (master.startswith("k8s://") and master != "k8s://"):
            counts = []
        if counts is None or any(int(c) < 1 for c in counts):
            raise PydanticCustomError(
                "spark_master", "Spark's masters are local, local[N], local[*], local[N,F], local[*,F], "
                "local-cluster[N,C,M], spark://HOST:PORT[,HOST:PORT...], yarn and k8s://URL, with N, F, C and M "
                "at least 1")
        return master

    @field_validator("log_level")
    @classmethod
    def _spark_log_level(cls, level: str) -> str:
        """One of the levels ``SparkContext.setLogLevel`` takes, in its spelling (any case is
        read). Until the twenty-eighth session another (``FOO``) passed, and setLogLevel's
        IllegalArgumentException came as a traceback once Spark had started."""
        if level.strip().upper() not in SPARK_LOG_LEVELS:
            raise PydanticCustomError("spark_log_level", "Spark's log levels are {levels} (any case)",
                                      {"levels": ", ".join(SPARK_LOG_LEVELS)})
        return level.strip().upper()

    @field_validator("conf")
    @classmethod
    def _spark_settings(cls, conf: dict[str, Any]) -> dict[str, Any]:
        """Each setting as the one dotted key Spark reads (``spark: {sql: {shuffle: {partitions:
        3}}}`` is ``spark.sql.shuffle.partitions``), a later one over an earlier one of the same
        key (an override over the file's). Until the twenty-eighth session a nested mapping
        reached Spark as one key, ``spark``, holding the mapping's text, and Spark said only
        "Ignoring non-Spark config property: spark"; it ignores every key not under ``spark.``
        as well, and a list or a null has no text Spark reads, so those are errors naming the key."""
        flat: dict[str, Any] = {}
        for key, value in _dotted(conf):
            if not key.startswith("spark."):
                raise PydanticCustomError(
                    "spark_conf", "{key}: Spark ignores a setting whose key does not start with 'spark.' (nested "
                    "mappings are joined with dots: {example} is spark.sql.shuffle.partitions)",
                    {"key": key, "example": "spark: {sql: {shuffle: {partitions: 8}}}"})
            if value is None or isinstance(value, list):
                raise PydanticCustomError(
                    "spark_conf", "{key}: a Spark setting is one value (text, a number or a boolean), not {what}",
                    {"key": key, "what": "null" if value is None else f"a list ({value!r})"})
            flat.pop(key, None)  # the later one's place as well as its value
            flat[key] = value
        return flat


def _dotted(conf: dict[str, Any], prefix: str = ""):
    """``(key, value)`` of every setting in ``conf``, a nested mapping's keys joined to their
    parent's with dots, in the mapping's order."""
    for key, value in conf.items():
        if not isinstance(key, str) or not key.strip("."):
            raise PydanticCustomError("spark_conf", "{key}: a Spark setting's key must be text, not {got}",
                                      {"key": f"{prefix}{key}", "got": repr(key)})
        key = f"{prefix}{key}"
        if isinstance(value, dict):
            if not value:
                raise PydanticCustomError("spark_conf", "{key}: an empty mapping sets nothing", {"key": key})
            yield from _dotted(value, f"{key}.")
        else:
            yield key, value


class LakeConfig(Section):
    """Where the Delta tables live: ``<root>/<dataset>/<layer>/<table>``."""

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
