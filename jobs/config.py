"""Configuration: YAML files in ``conf/``, validated with pydantic.

    cfg = load_config("conf/demo.yaml", ["train.lr=0.1", "spark.master=local[2]"])
    print(dump_config(cfg))      # the fully resolved config; this is what gets logged

Rules:
- unknown keys and wrong types are errors that name the key (``train.lr: ...``), a boolean
  for a number setting and an infinite or NaN number included (:class:`pipelines.config.Section`,
  the base of every section);
- ``key.sub=value`` overrides are parsed as YAML scalars (``3`` int, ``0.1`` and ``1e-8`` float,
  ``true`` bool, ``[1,2]`` list) and applied before validation; a string setting given a
  value YAML reads as a number or boolean (``run.name=2024``) takes the text as typed;
- ``${VAR}`` and ``${VAR:-default}`` are replaced from the environment in every string;
  an unset variable without a default is an error;
- ``include: other.yaml`` (or ``include: [a.yaml, b.yaml]``) at the top merges other files
  underneath (paths relative to the file): a later include overrides an earlier one, as a
  later ``key=value`` override does, and the including file overrides all its includes.

Each layer owns its section model next to its code (``pipelines/criteo/config.py``,
``training/config.py``, ...); this module only composes them, so data-layer code never
imports from ``jobs``.
"""
from __future__ import annotations

import collections.abc
import copy
import hashlib
import json
import os
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from pipelines.config import LakeConfig, Section, SparkConfig


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key."""


class RunConfig(Section):
    """What a run is called and where its outputs go."""

    name: str = "bigopt"
    dataset: str = Field("criteo", description="criteo | commoncrawl | ogb; one MLflow experiment each")
    seed: int = 0


def _section_models() -> dict[str, Any]:
    """Optional sections, imported lazily so a missing layer never breaks the others."""
    models: dict[str, Any] = {}
    try:
        from pipelines.criteo.config import CriteoConfig

        models["criteo"] = CriteoConfig
    except ImportError:
        pass
    try:
        from training.config import TrackingConfig, TrainConfig

        models["train"] = TrainConfig
        models["tracking"] = TrackingConfig
    except ImportError:
        pass
    return models


def _root_model() -> type[BaseModel]:
    from pydantic import create_model

    fields: dict[str, Any] = {
        "run": (RunConfig, RunConfig()),
        "spark": (SparkConfig, SparkConfig()),
        "lake": (LakeConfig, LakeConfig()),
    }
    for name, model in _section_models().items():
        # validated like a given section, when absent too: a section's check of the environment
        # (tracking: $MLFLOW_TRACKING_URI) is a config error, not one at import of the model
        fields[name] = (model, Field(default_factory=dict, validate_default=True))
    return create_model("BigoptConfig", __base__=Section, **fields)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, where: str) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            value = os.environ.get(var)
            if default is not None:  # as in the shell, `:-` also stands in for a variable set but empty
                return value or default
            if value is not None:
                return value
            raise ConfigError(f"{where}: environment variable ${{{var}}} is not set (use ${{{var}:-default}})")

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _deep_merge(base: dict, top: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
# YAML 1.2's core schema for numbers (with 1.1's ``_`` digit separators kept: ``1_000_000``).
# PyYAML reads YAML 1.1: a leading zero is octal (``010`` is 8), ``1:30`` is base 60 (90), and
# a float wants a dot (``1e-8`` was the text '1e-8'). 1.2 reads 10, the text '1:30' (refused by a
# number setting) and 1e-08, as JSON and a user would.
_INT_12 = re.compile(r"^[-+]?[0-9][0-9_]*$|^0x[0-9a-fA-F_]+$|^0o[0-7_]+$")
_FLOAT_12 = re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$
                          |^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$
                          |^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$""", re.X)


def _yaml_12_numbers(cls: type) -> type:
    """``cls`` (a PyYAML loader or dumper class) resolving plain numbers by :data:`_INT_12` and
    :data:`_FLOAT_12` instead of YAML 1.1's rules. A dumper with the same rules quotes exactly
    the strings the loader would read as numbers, so what ``bigopt config`` prints loads back
    the same: ``run.name: 1e5`` (text) was printed plain and read back as the float 100000.0."""
    cls.yaml_implicit_resolvers = {ch: [(tag, rx) for tag, rx in rules if tag not in (_INT, _FLOAT)]
                                   for ch, rules in cls.yaml_implicit_resolvers.items()}
    cls.add_implicit_resolver(_INT, _INT_12, list("-+0123456789"))
    cls.add_implicit_resolver(_FLOAT, _FLOAT_12, list("-+0123456789."))
    return cls


@_yaml_12_numbers
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's numbers (:func:`_yaml_12_numbers`), refusing a key
    given twice in one mapping. PyYAML keeps the last one silently: a second ``train:`` section
    further down a file replaced the first, whose settings were lost (defaults ran instead)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys are meant to be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key!r} (first at line {first.line + 1}): a key is given once per mapping",
                        key_node.start_mark)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node) -> int:
        """An integer by :data:`_INT_12`: decimal whatever its leading zeros, ``0x`` hex, ``0o`` octal."""
        text = self.construct_scalar(node).replace("_", "")
        sign, text = (-1 if text[0] == "-" else 1), text.lstrip("+-")
        base = {"0x": 16, "0o": 8}.get(text[:2].lower(), 10)
        return sign * int(text[2:] if base != 10 else text, base)


_Loader.add_constructor(_INT, _Loader.construct_yaml_int)


@_yaml_12_numbers
class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting the strings :class:`_Loader` reads as numbers."""


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _yaml_error(e: yaml.YAMLError, text: str) -> str:
    """``at line L, column C: <problem> (<context> at line l, column c)``, one line. PyYAML's own
    message is several lines, quotes the source with a caret under it and names the text it
    parsed ``"<unicode string>"``, not the file."""
    def at(mark) -> str:
        return f"at line {mark.line + 1}, column {mark.column + 1}"

    if isinstance(e, yaml.MarkedYAMLError) and (e.problem or e.context):
        where = at(e.problem_mark or e.context_mark) + ": " if (e.problem_mark or e.context_mark) else ""
        said = e.problem or e.context
        if e.problem and e.context:  # what it was in the middle of, and where that began
            said += f" ({e.context}{' ' + at(e.context_mark) if e.context_mark else ''})"
        if e.context == "while scanning an alias":  # an unquoted glob such as *test*
            said += "; a value that starts with * or & is read as an alias or an anchor: quote it ('*test*')"
        return f"{where}{said}" + (f"; {e.note}" if e.note else "")
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow: the offset in `text`
        line = text.count("\n", 0, e.position)
        column = e.position - (text.rfind("\n", 0, e.position) + 1)
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        return f"at line {line + 1}, column {column + 1}: {e.reason} ({char})"
    return ": " + " ".join(str(e).split())


def _read_yaml(path: Path, including: tuple[Path, ...] = ()) -> dict:
    """The file's mapping with its ``include:`` files merged under it (``including``: the
    files whose includes led here, to refuse a cycle)."""
    if path.resolve() in including:
        cycle = including[including.index(path.resolve()):]
        raise ConfigError("include cycle: " + " -> ".join(str(p) for p in (*cycle, cycle[0])))
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except IsADirectoryError as e:
        raise ConfigError(f"config path is a directory, not a YAML file: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    try:
        data = _yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML {_yaml_error(e, text)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    inc = data.pop("include", None)
    incs = [inc] if isinstance(inc, str) else inc if isinstance(inc, list) else None
    if inc is not None and (incs is None or not all(isinstance(i, str) and i for i in incs)):
        raise ConfigError(f"{path}: include: must be a path or a list of paths, got {inc!r}")
    base: dict = {}
    for rel in incs or []:  # a path may use ${ENV_VAR} as any string setting may
        rel = Path(os.path.expanduser(_interpolate(rel, f"{path}: include")))
        # each include over the ones before it, as a later override over an earlier one
        included = (path.parent / rel).resolve()
        if not included.exists():
            raise ConfigError(f"{path}: include: config file not found: {included}")
        base = _deep_merge(base, _read_yaml(included, (*including, path.resolve())))
    return _deep_merge(base, data)  # the file itself over all its includes


def apply_override(data: dict, override: str, model: type[BaseModel] | None = None) -> tuple[tuple[str, ...], str]:
    """Set ``key.sub=value`` in ``data`` (the value parsed as YAML); returns (the key's parts,
    the value as typed). With ``model`` (the config's root model), the part of the key after a
    free-form mapping setting is one key: ``spark.conf.spark.sql.shuffle.partitions=8`` sets
    ``spark.conf["spark.sql.shuffle.partitions"]``."""
    if "=" not in override:
        if override.endswith((".yaml", ".yml")) or os.path.isfile(override):
            raise ConfigError(f"{override!r} looks like a config file: give it first, before the key=value overrides")
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {override!r}: bad key {key!r}")
    try:
        value = _yaml(raw) if raw != "" else ""
        # YAML reads ' #...' (or a leading '#') as a comment and drops it: on a command line
        # that is text, so 'lake.root=/data/run #2' is '/data/run #2', not '/data/run'
        if re.search(r"(^|\s)#", raw) and not raw.lstrip().startswith(("'", '"', "[", "{")):
            value = raw
    except yaml.YAMLError:
        # not YAML: the text itself; a bracketed list of words whose YAML failed ([*test*]:
        # '*' starts an alias) is the list of those words
        inner = raw.strip()
        value = [w.strip() for w in inner[1:-1].split(",") if w.strip()] if inner[:1] + inner[-1:] == "[]" else raw
    parts = _key_parts(key, model)
    _set(data, parts, value)
    return tuple(parts), raw


def _key_parts(key: str, model: type[BaseModel] | None) -> list[str]:
    """``key`` split at its dots, up to the first setting that is a free-form mapping (its keys,
    such as Spark's, may hold dots themselves)."""
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        field = model.model_fields.get(p) if model is not None else None
        if field is None:
            break
        ann = field.annotation
        if typing.get_origin(ann) in (dict, Mapping, collections.abc.Mapping):
            return parts[:i + 1] + [".".join(parts[i + 1:])]
        model = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return parts


def _set(data: dict, parts: Sequence[str], value: Any) -> None:
    """``data[parts[0]][parts[1]]... = value``, creating missing sections."""
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(parts)}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def _format_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        elif isinstance(err.get("input"), Mapping):  # a section's own check: its message names the values
            lines.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
        else:  # a setting's own check says what it got, or the value is added
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}" if "(got " in msg else f"{loc}: {msg} (got {err.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), data: Mapping | None = None):
    """Load, interpolate, override and validate. Returns the root pydantic model."""
    raw: dict = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    if data:
        raw = _deep_merge(raw, data)
    model = _root_model()
    typed = dict(apply_override(raw, o, model) for o in overrides)
    raw = _empty_sections(_interpolate(raw, ""), model)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        # an override YAML read as a number or boolean for a string setting (run.name=2024,
        # run.name=yes) means the text as typed
        as_typed = [tuple(err["loc"]) for err in e.errors() if err["type"] == "string_type" and tuple(err["loc"]) in typed]
        if not as_typed:
            raise ConfigError(_format_errors(e)) from None
    for loc in as_typed:
        _set(raw, loc, _interpolate(typed[loc], ".".join(loc)))
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def _empty_sections(data: dict, model: type[BaseModel]) -> dict:
    """``data`` with a section given as nothing (``train:`` with every line under it commented
    out, which YAML reads as null) taken as an empty section, its defaults, as an empty file
    is. Pydantic refused it: "Input should be a valid dictionary or instance of TrainConfig".
    A section that may be None keeps it."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        section = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if section is None or name not in data:
            continue
        if data[name] is None and type(None) not in typing.get_args(ann):
            data[name] = {}
        if isinstance(data[name], dict):
            _empty_sections(data[name], section)
    return data


def config_dict(cfg: BaseModel) -> dict:
    return json.loads(cfg.model_dump_json())


def dump_config(cfg: BaseModel) -> str:
    """The config as YAML that :func:`load_config` reads back to the same config (non-ASCII
    text as itself, not escaped)."""
    return yaml.dump(config_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def config_hash(cfg: BaseModel) -> str:
    """Stable short hash of the resolved config (recorded in Delta commit info and MLflow)."""
    return doc_hash(config_dict(cfg))


def doc_hash(doc: Mapping[str, Any]) -> str:
    """Stable short hash (16 hex digits) of a JSON-able document, whatever its key order."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used to log the config as MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
