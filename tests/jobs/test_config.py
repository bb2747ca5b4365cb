"""Configuration: validation names the key, overrides, env interpolation, includes, CLI."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from jobs.config import ConfigError, apply_override, config_hash, dump_config, flatten, load_config


def test_defaults_validate_and_dump():
    cfg = load_config()
    text = dump_config(cfg)
    assert "run:" in text and "spark:" in text and "lake:" in text
    assert load_config(data={"run": {"seed": 1}}).run.seed == 1


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  seeed: 3\n")
    with pytest.raises(ConfigError, match=r"run\.seeed: unknown key"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"nosuchsection: unknown key"):
        load_config(data={"nosuchsection": {}})


def test_wrong_type_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  seed: abc\n")
    with pytest.raises(ConfigError, match=r"run\.seed: .*integer.*'abc'"):
        load_config(f)
    # a value gold's int32 ids cannot hold is refused up front, not after the featurize job
    with pytest.raises(ConfigError, match=r"criteo\.featurize\.hash_buckets: .*2147483647"):
        load_config(None, ["criteo.featurize.hash_buckets=4294967296"])
    # nor one vocab_sizes' int32 column cannot (until the thirteenth session: after both jobs ran)
    with pytest.raises(ConfigError, match=r"criteo\.featurize\.freq_threshold: .*2147483647"):
        load_config(None, ["criteo.featurize.freq_threshold=2147483648"])
    # the generator's seed feeds numpy's SeedSequence: a negative one is named, not numpy's error
    with pytest.raises(ConfigError, match=r"criteo\.generate\.seed: .*greater than or equal to 0"):
        load_config(None, ["criteo.generate.seed=-1"])
    # the split's seed is a literal of Spark's xxhash64: past a bigint it failed in the tasks
    with pytest.raises(ConfigError, match=r"criteo\.featurize\.split\.seed: .*9223372036854775807"):
        load_config(None, ["criteo.featurize.split.seed=9223372036854775808"])
    assert load_config(None, ["criteo.featurize.split.seed=-9223372036854775808"]).criteo.featurize.split.seed == -2**63


def _refused(pattern: str, *overrides: str, path=None) -> None:
    """Loading ``path`` with ``overrides`` is a ConfigError matching ``pattern``."""
    with pytest.raises(ConfigError, match=pattern):
        load_config(path, list(overrides))


def test_a_boolean_is_no_number(tmp_path, monkeypatch):
    """Pydantic's lax mode read ``true`` as 1 / 1.0: ``train.lr=true`` ran (and was logged) with
    lr 1.0. A boolean for a number setting is an error naming the key, in every section, from
    an override or the file; text and integers still read as numbers."""
    for key in ("train.lr", "train.weight_decay", "train.batch_size", "train.clip_grad_norm", "run.seed",
                "tracking.flush_every_s", "criteo.generate.days", "criteo.generate.positive_rate",
                "criteo.ingest.chunk_bytes", "criteo.featurize.split.valid_share"):
        _refused(rf"{key}: Input should be a number, not a boolean \(got True\)", f"{key}=true")
    _refused(r"criteo\.featurize\.split\.test_days: .*not a boolean", "criteo.featurize.split.test_days=[3, false]")
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: yes\n")
    _refused(r"train\.lr: .*not a boolean", path=f)
    # what stays: booleans where a boolean is meant (free-form mappings included), numbers from
    # text (an ${ENV_VAR}), an integer for a float
    monkeypatch.setenv("BIGOPT_TEST_SEED", "3")
    cfg = load_config(None, ["train.sparse_embeddings=true", "spark.ui=false", "train.optimizer_params.foreach=false",
                             "train.lr=1", "run.seed=${BIGOPT_TEST_SEED}", "train.max_steps='50'"])
    assert (cfg.train.sparse_embeddings, cfg.spark.ui, cfg.train.optimizer_params) == (True, False, {"foreach": False})
    assert (cfg.train.lr, cfg.run.seed, cfg.train.max_steps) == (1.0, 3, 50) and isinstance(cfg.train.lr, float)


def test_numbers_are_finite(tmp_path):
    """``train.lr=.inf`` was taken, and printed (and logged to MLflow) as ``lr: null``: no
    setting gives inf or NaN a meaning, so each is an error naming the key, in every section
    and in the free-form mappings, whose numbers are logged alike."""
    for override in ("train.lr=.inf", "train.lr=.nan", "train.clip_grad_norm=-.inf", "train.lr='inf'",
                     "train.weight_decay=.NaN", "tracking.flush_every_s=.inf", "criteo.generate.zipf_exponent=.nan",
                     "criteo.featurize.split.valid_share=.nan", "train.target_auc=.nan"):
        _refused(rf"{override.split('=')[0]}: Input should be a finite number", override)
    _refused(r"train\.optimizer_params: eps should be a finite number", "train.optimizer_params.eps=.inf")
    _refused(r"train\.model_params: top_mlp\[1\] should be a finite number", "train.model_params.top_mlp=[8, .nan]")
    f = tmp_path / "c.yaml"
    f.write_text("spark:\n  conf:\n    spark.x: .inf\n")
    _refused(r"spark\.conf: spark\.x should be a finite number", path=f)
    # what is printed is what ran
    cfg = load_config(None, ["train.lr=0.01", "train.optimizer_params.eps=1.0e-8"])
    assert "  lr: 0.01\n" in dump_config(cfg) and "  eps: 1.0e-08\n" in dump_config(cfg)


def test_an_override_for_a_string_setting_is_the_text_as_typed():
    """``run.name=2024`` / ``run.name=yes``: YAML reads a number or a boolean, the setting is a
    string, so the text as typed is meant (a 'valid string' error until the twelfth session)."""
    cfg = load_config(None, ["run.name=2024", "criteo.raw_dir=007", "run.name=yes"])
    assert (cfg.run.name, cfg.criteo.raw_dir) == ("yes", "007")
    with pytest.raises(ConfigError, match="run.seed"):  # a number setting still wants a number
        load_config(None, ["run.seed=abc"])
    # a list of globs YAML cannot read ('*' starts an alias) is the list of those words
    cfg = load_config(None, ["criteo.ingest.unlabeled_globs=[*test*, *eval*]"])
    assert cfg.criteo.ingest.unlabeled_globs == ["*test*", "*eval*"]
    # ' #' is text on a command line, not a YAML comment: the lake went to '/tmp/a' (fifteenth session)
    cfg = load_config(None, ["lake.root=/tmp/a #b", "run.name=#1", "criteo.raw_dir='/tmp/q #r'"])
    assert (cfg.lake.root, cfg.run.name, cfg.criteo.raw_dir) == ("/tmp/a #b", "#1", "/tmp/q #r")
    with pytest.raises(ConfigError, match="run.seed"):  # '5 #x' is no number: an error, not a silent 5
        load_config(None, ["run.seed=5 #x"])


def test_overrides_are_typed_and_nested(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  name: x\n")
    cfg = load_config(f, ["run.seed=7", "spark.conf.spark.sql.shuffle.partitions=4", "spark.ui=false"])
    assert cfg.run.seed == 7 and cfg.run.name == "x" and cfg.spark.ui is False
    # a free-form mapping's keys hold dots themselves: the rest of the key is one key
    assert cfg.spark.conf == {"spark.sql.shuffle.partitions": 4}
    cfg = load_config(f, ["tracking.tags.mlflow.note.content=hi", "spark.conf={spark.a.b: 1}",
                          "spark.conf.spark.c=2"])
    assert cfg.tracking.tags == {"mlflow.note.content": "hi"} and cfg.spark.conf == {"spark.a.b": 1, "spark.c": 2}
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(f, ["noequals"])
    d: dict = {"a": 1}
    with pytest.raises(ConfigError, match="not a section"):
        apply_override(d, "a.b=2")


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads ``1e-8`` (no dot) as text: a free-form setting passed it on as '1e-8'
    and the optimizer refused it."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  optimizer_params: {eps: 1e-8, betas: [0.9, 9.99E-1]}\n")
    cfg = load_config(f, ["train.model_params={dropout: 5e-1}", "run.name=1e5"])
    assert cfg.train.optimizer_params == {"eps": 1e-8, "betas": [0.9, 0.999]}
    assert cfg.train.model_params == {"dropout": 0.5}
    assert cfg.run.name == "1e5"  # a string setting keeps the text as typed
    from training.optimizers import build_optimizer
    import torch
    opt = build_optimizer("adam", torch.nn.Linear(2, 1), lr=1e-3, params=cfg.train.optimizer_params)
    assert opt.param_groups[0]["eps"] == 1e-8


def test_integers_are_read_as_yaml_1_2(tmp_path):
    """PyYAML reads YAML 1.1: ``run.seed=010`` ran with seed 8 (octal), ``test_days: [09, 010]``
    held out days 9 and 8, and ``warmup_steps=1:30`` was 90 (base 60). YAML 1.2, as JSON and a
    user read them: decimal whatever the leading zeros, ``0x``/``0o`` prefixes, ``1:30`` text."""
    f = tmp_path / "c.yaml"
    f.write_text("criteo:\n  featurize:\n    split:\n      test_days: [09, 010]\n")
    cfg = load_config(f, ["run.seed=010", "train.optimizer_params={k: 0x10, o: 0o17, big: 1_000}"])
    assert cfg.run.seed == 10 and cfg.criteo.featurize.split.test_days == [9, 10]
    assert cfg.train.optimizer_params == {"k": 16, "o": 15, "big": 1000}
    _refused(r"train.warmup_steps: Input should be a valid integer.*\(got '1:30'\)", "train.warmup_steps=1:30")


def test_a_key_given_twice_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: a second ``train:`` section further down a file
    silently replaced the first (its lr, batch size and optimizer gone, the defaults run). A
    merge key's values may still be overridden."""
    f = tmp_path / "dup.yaml"
    f.write_text("train:\n  lr: 0.1\n  optimizer: lamb\nrun:\n  seed: 3\ntrain:\n  max_steps: 50\n")
    _refused(rf"^{re.escape(str(f))}: invalid YAML at line 6, column 1: duplicate key 'train' \(first at line 1\)",
             path=f)
    f.write_text("train: {lr: 0.1, lr: 0.2}\n")
    _refused(r"at line 1, column 18: duplicate key 'lr' \(first at line 1\)", path=f)
    f.write_text("base: &b {lr: 0.1, optimizer: lamb}\ntrain:\n  <<: *b\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="base: unknown key"):  # the merge itself is fine
        load_config(f)


def test_what_bigopt_config_prints_loads_back_the_same(tmp_path):
    """``bigopt config`` printed with YAML 1.1's rules: the text ``1e5`` (a run name, a git hash
    as a tag) and ``010`` came out plain and were read back as numbers (a "valid string" error,
    or a float in a free-form mapping). Non-ASCII text was printed escaped."""
    cfg = load_config(None, ["run.name=1e5", "tracking.tags.commit=8e12345", "tracking.tags.day=010",
                             "tracking.tags.t=.nan", "train.optimizer_params={note: '1e-3', eps: 1e-8}",
                             "criteo.raw_dir=café"])
    assert cfg.tracking.tags == {"commit": "8e12345", "day": "010", "t": ".nan"}  # text as typed, not inf/nan
    text = dump_config(cfg)
    assert "name: '1e5'" in text and "raw_dir: café" in text
    f = tmp_path / "printed.yaml"
    f.write_text(text)
    again = load_config(f)
    assert config_hash(again) == config_hash(cfg) and again.train.optimizer_params == {"note": "1e-3", "eps": 1e-8}


def test_an_empty_section_takes_its_defaults_and_errors_name_their_key(tmp_path):
    """``train:`` with every line under it commented out (YAML's null) was "Input should be a
    valid dictionary"; a setting's own message was said after pydantic's "Value error, " with
    its value twice; negative sizes were one section-wide line hiding the other errors; a
    missing include did not say which file included it; a config file after an override was
    "must look like key.sub=value"."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  # lr: 1\ncriteo:\n  featurize:\nrun:\n  seed: 4\n")
    cfg = load_config(f)
    assert cfg.run.seed == 4 and cfg.train.lr == load_config(None).train.lr
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["lake.root=", "train.batch_size=-1", "train.max_steps=0"])
    said = str(ei.value).splitlines()[1:]
    assert said == ["  lake.root: must name a directory or URI (got an empty string: an empty ${VAR}?)",
                    "  train.batch_size: Input should be greater than or equal to 1 (got -1)",
                    "  train.max_steps: Input should be greater than or equal to 1 (got 0)"]
    (tmp_path / "inc.yaml").write_text("include: nothere.yaml\n")
    _refused(rf"^{re.escape(str(tmp_path / 'inc.yaml'))}: include: config file not found: .*/nothere.yaml$",
             path=tmp_path / "inc.yaml")
    with pytest.raises(ConfigError, match="looks like a config file: give it first"):
        load_config(None, [str(f)])
    f.write_text("criteo:\n  ingest:\n    unlabeled_globs: [*test*]\n")  # YAML reads *test* as an alias
    _refused(r"while scanning an alias at line 3, column 23\); a value that starts with \* or & .*: quote it", path=f)


def test_env_interpolation(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("lake:\n  root: ${BIGOPT_TEST_ROOT}/lake\nrun:\n  name: ${BIGOPT_TEST_UNSET:-fallback}\n")
    monkeypatch.setenv("BIGOPT_TEST_ROOT", "/data")
    cfg = load_config(f)
    assert cfg.lake.root == "/data/lake" and cfg.run.name == "fallback"
    monkeypatch.delenv("BIGOPT_TEST_ROOT")
    with pytest.raises(ConfigError, match=r"lake\.root: environment variable \$\{BIGOPT_TEST_ROOT\} is not set"):
        load_config(f)


def test_env_default_stands_in_for_an_empty_variable(tmp_path, monkeypatch):
    """As in the shell, ``${VAR:-default}`` takes the default when VAR is set but empty (an
    empty BIGOPT_DATA once sent the demo's files to /criteo/raw); an empty lake root is an error."""
    f = tmp_path / "c.yaml"
    f.write_text("lake:\n  root: ${BIGOPT_TEST_EMPTY:-lake}\nrun:\n  name: x${BIGOPT_TEST_EMPTY}y\n")
    monkeypatch.setenv("BIGOPT_TEST_EMPTY", "")
    cfg = load_config(f)
    assert cfg.lake.root == "lake" and cfg.run.name == "xy"
    monkeypatch.setenv("BIGOPT_TEST_EMPTY", "/data/lake")
    assert load_config(f).lake.root == "/data/lake"
    with pytest.raises(ConfigError, match=r"lake\.root.*empty string"):
        load_config(data={"lake": {"root": " "}})


def test_a_decaying_schedule_needs_more_steps_than_its_warmup():
    """Checked when the config loads, not after `bigopt run` has ingested and featurized."""
    with pytest.raises(ConfigError, match=r"max_steps \(10\) must be greater than warmup_steps \(20\)"):
        load_config(data={"train": {"scheduler": "cosine", "warmup_steps": 20, "max_steps": 10}})
    assert load_config(data={"train": {"scheduler": "constant", "warmup_steps": 20, "max_steps": 10}})


def test_include_and_hash(tmp_path):
    (tmp_path / "base.yaml").write_text("run:\n  name: base\n  seed: 1\n")
    (tmp_path / "top.yaml").write_text("include: base.yaml\nrun:\n  seed: 2\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert (cfg.run.name, cfg.run.seed) == ("base", 2)
    assert config_hash(cfg) == config_hash(load_config(tmp_path / "top.yaml"))
    assert config_hash(cfg) != config_hash(load_config(tmp_path / "top.yaml", ["run.seed=3"]))
    assert flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}


def test_later_includes_override_earlier_ones(tmp_path):
    """In ``include: [a.yaml, b.yaml]`` the first file won (512), the reverse of the command
    line's "the last one wins"; the including file still overrides every include."""
    (tmp_path / "a.yaml").write_text("train: {batch_size: 512, lr: 0.5}\nrun: {name: a, seed: 1}\n")
    (tmp_path / "b.yaml").write_text("train: {batch_size: 1024}\nrun: {name: b}\n")
    (tmp_path / "top.yaml").write_text("include: [a.yaml, b.yaml]\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert (cfg.train.batch_size, cfg.train.lr, cfg.run.name, cfg.run.seed) == (1024, 0.5, "b", 1)  # merged, b on top
    (tmp_path / "top.yaml").write_text("include: [a.yaml, b.yaml]\ntrain: {batch_size: 256}\n")
    assert load_config(tmp_path / "top.yaml").train.batch_size == 256
    # an include's own includes stay under it: b.yaml over a.yaml over c.yaml
    (tmp_path / "c.yaml").write_text("run: {name: c, seed: 3}\n")
    (tmp_path / "a.yaml").write_text("include: c.yaml\nrun: {name: a}\n")
    (tmp_path / "top.yaml").write_text("include: [a.yaml, b.yaml]\n")
    assert (load_config(tmp_path / "top.yaml").run.name, load_config(tmp_path / "top.yaml").run.seed) == ("b", 3)


def test_bad_includes_are_one_clear_error(tmp_path, monkeypatch):
    """An include cycle (it was a RecursionError traceback), an include that is not a path
    (a TypeError traceback, or a mapping read as its keys' file names); ${ENV} in a path."""
    (tmp_path / "a.yaml").write_text("include: b.yaml\nrun: {name: a}\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    (tmp_path / "self.yaml").write_text("include: ./self.yaml\n")
    a, b, me = (str((tmp_path / f).resolve()) for f in ("a.yaml", "b.yaml", "self.yaml"))
    with pytest.raises(ConfigError, match=f"^include cycle: {a} -> {b} -> {a}$"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match=f"^include cycle: {me} -> {me}$"):
        load_config(tmp_path / "self.yaml")
    for bad in ("[1]", "[base.yaml, null]", "{a: 1}", "''", "7"):
        (tmp_path / "i.yaml").write_text(f"include: {bad}\n")
        with pytest.raises(ConfigError, match="include: must be a path or a list of paths"):
            load_config(tmp_path / "i.yaml")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "base.yaml").write_text("run: {name: from-env}\n")
    (tmp_path / "top.yaml").write_text("include: ${CONF_DIR:-nowhere}/base.yaml\n")
    monkeypatch.setenv("CONF_DIR", str(tmp_path / "conf"))
    assert load_config(tmp_path / "top.yaml").run.name == "from-env"
    monkeypatch.delenv("CONF_DIR")
    with pytest.raises(ConfigError, match="config file not found: .*/nowhere/base.yaml"):
        load_config(tmp_path / "top.yaml")


def test_invalid_yaml_and_missing_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    f.write_bytes(b"run:\n  name: \xff\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(f)


def test_invalid_yaml_is_one_line_naming_the_file(tmp_path, capsys):
    """PyYAML's message was 9 lines naming ``"<unicode string>"``, with the source quoted and
    a caret under it: now one line with the file, the line and column, and the problem."""
    from jobs.cli import main

    f = tmp_path / "s.yaml"
    f.write_text("train: [1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == (f"{f}: invalid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>' "
                            "(while parsing a flow sequence at line 1, column 8)")
    assert main(["config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err == f"bigopt config: {e.value}\n"
    for text, said in (("a: 1\n a: 2\n", "at line 2, column 3: mapping values are not allowed here"),
                       ("x: 1\ny: [b, \x07]\n", "at line 2, column 8: special characters are not allowed (#x0007)"),
                       ("a: !foo 1\n", "at line 1, column 4: could not determine a constructor for the tag '!foo'")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=f"^{re.escape(f'{f}: invalid YAML {said}')}$"):
            load_config(f)
    (tmp_path / "top.yaml").write_text("include: s.yaml\n")  # an include's error names the include
    with pytest.raises(ConfigError, match=f"^{re.escape(str(f.resolve()))}: invalid YAML at line 1, column 4: "):
        load_config(tmp_path / "top.yaml")


def test_lake_table_paths():
    cfg = load_config(data={"lake": {"root": "s3://bucket/lake/"}})
    assert cfg.lake.table("criteo", "bronze", "events") == "s3://bucket/lake/criteo/bronze/events"


def test_cli_help_and_config_errors():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("config", "lake"):
        assert cmd in out.stdout
    bad = subprocess.run([sys.executable, "-m", "jobs.cli", "config", "run.seed=x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "run.seed" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "jobs.cli", "config", "run.seed=5"], capture_output=True, text=True)
    assert ok.returncode == 0 and "seed: 5" in ok.stdout
    # no command: a usage error, its help on stderr (it was printed to stdout, with exit 2)
    none = subprocess.run([sys.executable, "-m", "jobs.cli"], capture_output=True, text=True)
    assert none.returncode == 2 and none.stdout == "" and "usage: bigopt" in none.stderr


def test_cli_runs_from_a_plain_install():
    """A wheel install has no setuptools editable finder, which imports importlib.util as a side
    effect (`bigopt --help` once failed on every non-editable install): ``python -S`` reads no
    .pth file, so the packages come from plain sys.path entries, as in site-packages."""
    import site
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    code = "import sys; sys.path[:0] = sys.argv[1:]; from jobs.cli import main; sys.exit(main(['--help']))"
    out = subprocess.run([sys.executable, "-S", "-c", code, str(repo), *site.getsitepackages()],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert all(cmd in out.stdout for cmd in ("ingest", "featurize", "train"))


def test_cli_overrides_may_follow_flags(capsys):
    from jobs.cli import build_parser, parse_command_line

    parser = build_parser()
    args = parse_command_line(parser, ["ingest", "conf/demo.yaml", "run.seed=1", "--input", "a.gz",
                                       "criteo.ingest.verify=false", "--force", "run.seed=2"])
    assert args.config == "conf/demo.yaml" and args.input == ["a.gz"] and args.force
    assert args.overrides == ["run.seed=1", "criteo.ingest.verify=false", "run.seed=2"]  # the last one wins
    with pytest.raises(SystemExit) as e:  # anything else left over is still an error
        parse_command_line(parser, ["ingest", "conf/demo.yaml", "--force", "second.yaml"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized arguments: second.yaml" in err
    assert err.startswith("usage: bigopt ingest ")  # the command's usage, not bigopt's


def test_mlflow_file_store_is_a_config_error(monkeypatch):
    """MLflow 3 refuses its file store (unless MLFLOW_ALLOW_FILE_STORE=true): a config error
    up front, not a traceback once training starts (in `bigopt run`, after ingest and featurize)."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in ("file:/tmp/x/mlruns", "/tmp/x/mlruns", "./mlruns"):
        with pytest.raises(ConfigError, match="MLflow's file store, which MLflow 3 refuses"):
            load_config(None, [f"tracking.tracking_uri={uri}"])
    assert load_config(None, ["tracking.tracking_uri=file:/tmp/x", "tracking.enabled=false"])
    for uri in ("sqlite:////tmp/x.db", "http://127.0.0.1:5000", "databricks"):
        assert load_config(None, [f"tracking.tracking_uri={uri}"]).tracking.tracking_uri == uri
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert load_config(None, ["tracking.tracking_uri=file:/tmp/x"])


def test_any_path_and_the_env_fallback_are_checked_as_file_stores(monkeypatch, capsys):
    """MLflow reads any URI without a scheme as a path to its file store. Until the twentieth
    session only paths starting with / ./ ../ ~ were caught (`tracking.tracking_uri=mlruns` was
    MLflow's "maintenance mode" traceback), and $MLFLOW_TRACKING_URI, the documented fallback,
    was never checked."""
    from jobs.cli import main

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for uri in ("mlruns_rel", "mlruns/sub", "FILE:///tmp/x", "C:/mlruns"):
        with pytest.raises(ConfigError, match="MLflow's file store, which MLflow 3 refuses"):
            load_config(None, [f"tracking.tracking_uri={uri}"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/fs3")
    with pytest.raises(ConfigError, match=r"\$MLFLOW_TRACKING_URI='file:///tmp/fs3' is MLflow's file store"):
        load_config(None, [])
    assert main(["train", "--local"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigopt train: ") and "$MLFLOW_TRACKING_URI" in err and "Traceback" not in err
    # the config's own URI wins over the variable; tracking off needs no store
    assert load_config(None, ["tracking.tracking_uri=sqlite:////tmp/x.db"]).tracking.tracking_uri
    assert load_config(None, ["tracking.enabled=false"]).tracking.enabled is False
    for uri in ("sqlite:///rel.db", "postgresql+psycopg2://u@h/db", "https://mlflow.example", "databricks", "uc"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert load_config(None, []).tracking.tracking_uri is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "1")
    assert load_config(None, []).tracking.enabled


def test_a_sections_own_check_is_said_without_the_whole_section():
    """A section-level check (max_steps vs warmup_steps) ended with the whole section as its
    input, `(got {'model': 'dlrm', 'model_params': {...}, ...})`: its message names the values."""
    from jobs.config import ConfigError, load_config

    with pytest.raises(ConfigError) as ei:
        load_config(None, ["train.max_steps=20", "train.warmup_steps=20", "train.scheduler=cosine"])
    assert str(ei.value).endswith("max_steps (20) must be greater than warmup_steps (20)") and "(got" not in str(ei.value)
    assert "train: scheduler 'cosine' decays" in str(ei.value)  # without pydantic's "Value error, "
    with pytest.raises(ConfigError, match=r"train.lr: .* \(got 'fast'\)"):  # a field's own: its input said
        load_config(None, ["train.lr=fast"])


def test_verbose_after_the_command_and_a_dataset_without_a_pipeline(tmp_path, capsys):
    """`bigopt train conf.yaml -v` was "unrecognized arguments: -v" (the synopsis puts flags
    after the command); run.dataset=typo sent the user to `bigopt featurize`, which never
    writes there."""
    from jobs.cli import build_parser, main

    p = build_parser()
    assert p.parse_args(["train", "conf/demo.yaml", "-v"]).verbose and p.parse_args(["-v", "train"]).verbose
    assert not p.parse_args(["train", "conf/demo.yaml"]).verbose
    assert main(["train", f"lake.root={tmp_path}", "run.dataset=typo"]) == 2
    err = capsys.readouterr().err
    assert "run.dataset=typo has no pipeline in bigopt" in err and "train.train_table" in err, err
    assert main(["train", f"lake.root={tmp_path}"]) == 2
    assert "(run `bigopt featurize` first)" in capsys.readouterr().err


def test_docs_name_every_criteo_setting():
    """docs/criteo.md's Config section lists the `criteo:` keys; four generate keys were missing
    from it (found by the docs walkthrough probe)."""
    from pathlib import Path

    import pipelines.criteo.config as c

    doc = (Path(__file__).resolve().parents[2] / "docs" / "criteo.md").read_text()
    section = doc.split("## Config (`criteo:` section", 1)[1].split("\n## ", 1)[0]
    for model in (c.CriteoConfig, c.GenerateConfig, c.IngestConfig, c.FeaturizeConfig, c.SplitConfig):
        missing = [k for k in model.model_fields if not re.search(rf"\b{k}\b", section)]
        assert not missing, (model.__name__, missing)


def test_num_proc_keeps_which_settings_the_config_gave():
    """--num-proc re-validated the train section from a full dump, so every default counted as
    given: `bigopt train conf/demo.yaml --num-proc 1` warned of a min_compress_numel nobody set."""
    from jobs.train import apply_cli_overrides
    from training.loop import unused_settings

    cfg = load_config("conf/demo.yaml")
    args = type("Args", (), {"num_proc": 1, "local": False})()
    again = apply_cli_overrides(cfg, args)
    assert again.train.num_proc == 1 and unused_settings(again.train) == []
    assert "min_compress_numel" not in again.train.compression.model_fields_set


def test_nested_spark_conf_mappings_are_dotted_keys(tmp_path):
    """``spark: {conf: {spark: {sql: {shuffle: {partitions: 3}}}}}`` loaded, and Spark got one
    key, ``spark``, holding the mapping's text ("Ignoring non-Spark config property: spark"):
    a nested mapping is the dotted key Spark reads, an override of that key still wins, and a
    key Spark ignores, a list and a null are errors naming the key."""
    f = tmp_path / "c.yaml"
    f.write_text("spark:\n  conf:\n    spark:\n      sql:\n        shuffle: {partitions: 3}\n"
                 "        adaptive.enabled: false\n    spark.executorEnv: {A: x}\n")
    assert load_config(f).spark.conf == {"spark.sql.shuffle.partitions": 3, "spark.sql.adaptive.enabled": False,
                                         "spark.executorEnv.A": "x"}
    cfg = load_config(f, ["spark.conf.spark.sql.shuffle.partitions=8"])
    assert cfg.spark.conf["spark.sql.shuffle.partitions"] == 8 and "spark" not in cfg.spark.conf
    _refused(r"spark\.conf: sql\.shuffle\.partitions: Spark ignores a setting whose key does not start with 'spark\.'",
             "spark.conf={sql: {shuffle: {partitions: 8}}}")
    _refused(r"spark\.conf: hive\.x: Spark ignores", "spark.conf.hive.x=1")
    _refused(r"spark\.conf: spark\.jars: a Spark setting is one value .*not a list \(\['a', 'b'\]\)",
             "spark.conf.spark.jars=[a, b]")
    _refused(r"spark\.conf: spark\.x: a Spark setting is one value .*not null", "spark.conf.spark.x=null")
    _refused(r"spark\.conf: spark\.x: an empty mapping sets nothing", "spark.conf.spark.x={}")


def test_spark_log_level_is_one_spark_takes():
    """``spark.log_level=FOO`` passed, and SparkContext.setLogLevel's IllegalArgumentException
    was a traceback once Spark had started: a config error naming Spark's levels; any case is
    read, and kept in Spark's spelling."""
    _refused(r"spark\.log_level: Spark's log levels are ALL, DEBUG, ERROR, FATAL, INFO, OFF, TRACE, WARN "
             r"\(any case\) \(got 'FOO'\)", "spark.log_level=FOO")
    assert load_config(None, ["spark.log_level=info"]).spark.log_level == "INFO"
    assert load_config().spark.log_level == "WARN"


def test_spark_master_has_a_form_spark_takes(tmp_path, capsys):
    """``spark.master=foo`` made Spark's JVM print a stack trace and the command blame a wrong
    JAVA_HOME (exit 1, after making the lake's folders); ``local[x]`` and ``local[0]`` failed as
    a Spark job. Each is a config error listing the forms, before anything is touched."""
    from jobs.cli import main

    for master in ("local", "local[2]", "local[*]", "local[2,3]", "local[*, 4]", "local-cluster[2, 1, 1024]",
                   "spark://h:7077", "spark://a:7077,b:7078", "spark://h", "yarn", "k8s://https://h:6443"):
        assert load_config(None, [f"spark.master={master}"]).spark.master == master
    for master in ("foo", "local[x]", "local[0]", "local[2,0]", "local-cluster[0,1,1024]", "spark://", "spark://h:x",
                   "spark://a:1,", "k8s://", "yarn-client", "sc://h:15002"):
        _refused(rf"spark\.master: Spark's masters are local, local\[N\], .* with N, F, C and M at least 1 "
                 rf"\(got {re.escape(repr(master))}\)", f"spark.master={master}")
    assert main(["lake", "--action", "roundtrip", f"lake.root={tmp_path / 'lake'}", "spark.master=foo"]) == 2
    assert "spark.master: Spark's masters are local" in capsys.readouterr().err
    assert not (tmp_path / "lake").exists()


def test_the_environment_switches_are_checked_as_bigopt_starts(monkeypatch, capsys):
    """``BIGOPT_DELTA_ENGINE=foo`` was a ValueError traceback once Spark had started, and
    ``BIGOPT_SPARK_UI=true`` turned the UI off (only ``1`` meant on): each bad value is one line
    and exit 2 as the command starts, and the UI switch reads the usual words for on and off."""
    from jobs.cli import main
    from pipelines.env import spark_ui

    monkeypatch.setenv("BIGOPT_DELTA_ENGINE", "foo")
    assert main(["config"]) == 2
    assert capsys.readouterr().err == "bigopt config: BIGOPT_DELTA_ENGINE='foo': expected auto, native or deltars (any case)\n"
    monkeypatch.setenv("BIGOPT_DELTA_ENGINE", "Native")
    monkeypatch.setenv("BIGOPT_SPARK_UI", "maybe")
    assert main(["config"]) == 2
    assert capsys.readouterr().err.startswith("bigopt config: BIGOPT_SPARK_UI='maybe': expected one of 1, true, yes, on")
    for on in ("1", "true", "Yes", "ON"):
        monkeypatch.setenv("BIGOPT_SPARK_UI", on)
        assert spark_ui() is True
    for off in ("0", "False", "no", "off"):
        monkeypatch.setenv("BIGOPT_SPARK_UI", off)
        assert spark_ui() is False
    monkeypatch.setenv("BIGOPT_SPARK_UI", "")
    assert spark_ui() is False  # unset or empty: on, except under pytest
    assert main(["config"]) == 0


def test_run_skip_data_refuses_the_data_steps_flags(capsys):
    """``bigopt run --skip-data`` ignored --force-ingest, --force-featurize and --no-generate
    without a word (the old gold was trained on): a usage error naming them, exit 2."""
    from jobs.cli import build_parser, parse_command_line

    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        parse_command_line(parser, ["run", "conf/demo.yaml", "--skip-data", "--force-featurize", "--no-generate"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: bigopt run ")
    assert "bigopt run: error: argument --skip-data: not allowed with --no-generate, --force-featurize" in err
    for flags in (["--skip-data", "--resume"], ["--force-ingest", "--no-generate"]):
        assert parse_command_line(parser, ["run", "conf/demo.yaml", *flags])


def test_featurize_bronze_version_flag_is_a_non_negative_integer(capsys):
    """``--bronze-version -1`` failed in the featurize step (exit 1) where
    ``criteo.featurize.bronze_version=-1`` is a config error (exit 2): a usage error now."""
    from jobs.cli import build_parser, parse_command_line

    parser = build_parser()
    for bad in ("-1", "x"):
        with pytest.raises(SystemExit) as e:
            parse_command_line(parser, ["featurize", "conf/demo.yaml", "--bronze-version", bad])
        assert e.value.code == 2
        assert f"argument --bronze-version: expected an integer >= 0, got {bad!r}" in capsys.readouterr().err
    assert parse_command_line(parser, ["featurize", "conf/demo.yaml", "--bronze-version", "0"]).bronze_version == 0


def test_an_unwritable_checkpoint_dir_is_refused_before_training(tmp_path, capsys):
    """``train.checkpoint_dir=/proc/x/{run}`` failed only at the first checkpoint, after training,
    in every rank's traceback (exit 1): `bigopt train` and `bigopt run` (before its data steps)
    refuse it in one line naming the setting, exit 2. A folder that exists (a resume's) passes
    and keeps only its own files; with no checkpoints to write nothing is made or checked."""
    from jobs.cli import main
    from training.api import check_checkpoint_dir

    common = [f"lake.root={tmp_path / 'lake'}", f"criteo.raw_dir={tmp_path / 'raw'}", "tracking.enabled=false",
              "train.checkpoint_every=5"]
    for command in ("train", "run"):
        assert main([command, "conf/demo.yaml", *common, "train.checkpoint_dir=/proc/x/{run}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"bigopt {command}: train.checkpoint_dir='/proc/x/{{run}}': cannot write to /proc/x/demo: "
                              "[Errno 2] ") and err.endswith("; set it to a folder this user may write\n"), err
    assert not (tmp_path / "raw").exists() and not (tmp_path / "lake").exists()  # no data step ran
    cfg = load_config("conf/demo.yaml", [f"train.checkpoint_dir={tmp_path}/ck/{{run}}", "train.checkpoint_every=5"])
    check_checkpoint_dir(cfg)
    (tmp_path / "ck" / "demo" / "step-00000005.pt").write_bytes(b"x")
    check_checkpoint_dir(cfg)
    assert [p.name for p in (tmp_path / "ck" / "demo").iterdir()] == ["step-00000005.pt"]
    check_checkpoint_dir(load_config(None, ["train.checkpoint_dir=/proc/x", "train.checkpoint_every=0"]))
    _refused(r"train\.checkpoint_dir: \{run\} \(run\.name\) is its one placeholder.*KeyError 'foo'",
             "train.checkpoint_dir=/x/{foo}")


def test_an_unwritable_artifact_location_is_refused_before_training(tmp_path, capsys):
    """``tracking.artifact_location=/proc/x`` for a new experiment failed when the model was
    logged, after training: `bigopt train: [Errno 2] No such file or directory: '/proc/x'` (no
    setting named: every FileNotFoundError was taken for missing gold), the MLflow run left
    FAILED. Now one line naming the setting, before the data is read. An existing experiment
    keeps its own location, and that is checked instead (it was not: an experiment another user
    made, or a checkout since moved, failed the same way after training)."""
    import mlflow
    from train_helpers import fresh_store

    from jobs.cli import main

    uri, _ = fresh_store(tmp_path)
    capsys.readouterr()  # MLflow's lines as it made the template store
    common = ["conf/demo.yaml", f"lake.root={tmp_path / 'lake'}", f"criteo.raw_dir={tmp_path / 'raw'}",
              f"tracking.tracking_uri={uri}", "tracking.experiment=new-one"]
    for location in ("/proc/x", "file:///proc/x"):
        for command in ("train", "run"):
            assert main([command, *common, f"tracking.artifact_location={location}"]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"bigopt {command}: tracking.artifact_location={location!r}, the new MLflow "
                                  "experiment 'new-one''s artifact folder: cannot write to /proc/x: [Errno 2] "), err
            assert err.endswith("; set it to a folder this user may write\n") and err.count("\n") == 1
    assert not (tmp_path / "raw").exists()  # `bigopt run` refused before its data steps
    mlflow.MlflowClient(uri).create_experiment("new-one", artifact_location=str(tmp_path / "art"))
    assert main(["train", *common, "tracking.artifact_location=/proc/x"]) == 2
    assert "gold train table not found" in capsys.readouterr().err  # the experiment's own location stands
    client = mlflow.MlflowClient(uri)
    for name, location in (("elsewhere", "/proc/y"), ("elsewhere-uri", "file:///proc/y")):
        client.create_experiment(name, artifact_location=location)
        for command in ("train", "run"):
            assert main([command, *common[:-1], f"tracking.experiment={name}", f"tracking.artifact_location={tmp_path}"]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"bigopt {command}: the MLflow experiment {name!r} keeps its artifacts in "), err
            assert "cannot write to /proc/y: [Errno 2] " in err and err.count("\n") == 1, err
            assert err.endswith("; make it writable for this user, or train under another experiment "
                                "(tracking.experiment)\n"), err
    assert not (tmp_path / "raw").exists()
    assert main(["train", *common[:-1], "tracking.experiment=s3-one", "tracking.artifact_location=s3://b/x"]) == 2
    assert "gold train table not found" in capsys.readouterr().err  # not a local folder: MLflow's to reach


def test_only_missing_data_is_a_usage_error_of_train(monkeypatch, capsys):
    """Another FileNotFoundError raised while training is not said as a usage error (it was:
    exit 2 and a bare ``[Errno 2]`` line); missing gold still is."""
    import jobs.train
    import training.api
    from jobs.cli import main
    from training.dataspec import DataNotFoundError

    def raising(error):
        def run_training(*args, **kwargs):
            raise error

        return run_training

    monkeypatch.setattr(training.api, "run_training",
                        raising(FileNotFoundError(2, "No such file or directory", "/gone/artifact")))
    args = type("Args", (), {"resume": False, "local": True, "num_proc": None})()
    with pytest.raises(FileNotFoundError):
        jobs.train.run(load_config(None, ["tracking.enabled=false"]), args)
    monkeypatch.setattr(training.api, "run_training", raising(DataNotFoundError("gold x")))
    assert main(["train", "tracking.enabled=false"]) == 2
    assert capsys.readouterr().err == "bigopt train: gold x\n"


def test_run_refuses_gold_settings_its_featurize_does_not_write(tmp_path, capsys):
    """``bigopt run conf/demo.yaml train.train_table=/nope/train`` ran generate, ingest and
    featurize (~50 s), then said the table was not found: without --skip-data a train.* table
    or vocabulary other than what its featurize step writes is refused up front (exit 2); the
    same path spelled out, and any path with --skip-data, pass on."""
    from jobs.cli import main

    lake = tmp_path / "lake"
    common = ["conf/demo.yaml", f"lake.root={lake}", f"criteo.raw_dir={tmp_path / 'raw'}", "tracking.enabled=false"]
    assert main(["run", *common, "train.train_table=/nope/train", "train.vocabulary=/nope/v.json"]) == 2
    assert capsys.readouterr().err == (
        f"bigopt run: train.train_table=/nope/train (featurize writes {lake}/demo/gold/train); train.vocabulary="
        f"/nope/v.json (featurize writes {lake}/demo/gold/features.json): not the gold its featurize step writes; "
        "to train on it, add --skip-data (no data steps), else leave the setting unset\n")
    assert not (tmp_path / "raw").exists()
    assert main(["run", *common, "--skip-data", "train.train_table=/nope/train"]) == 2
    assert "gold train table not found at /nope/train" in capsys.readouterr().err  # asked for: tried
    from jobs.run import gold_elsewhere

    assert gold_elsewhere(load_config("conf/demo.yaml", [f"lake.root={lake}",
                                                         f"train.test_table=file://{lake}/demo/gold/test"])) == []
