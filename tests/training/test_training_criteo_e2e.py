"""The whole first slice on the real Criteo samples: raw -> bronze -> gold -> train -> test -> MLflow.

Two of the shared Kaggle sample files (1,900 labelled rows) keep it short: Spark ingest and
featurize dominate the time. Training runs in-process here; the 2-rank Horovod-on-Spark path
(same SparkSession fixture) is covered by test_training_horovod.py.
"""
from __future__ import annotations

import argparse
import importlib.util

import pytest

pytestmark = [pytest.mark.spark, pytest.mark.slow]

if importlib.util.find_spec("pipelines.criteo.featurize") is None:  # before the Spark fixture starts
    pytest.skip("pipelines.criteo.featurize not written yet", allow_module_level=True)


def test_run_command_on_shared_criteo(spark, criteo_shared, tmp_path, mlflow_store, capsys, spark_forbidden):
    from mlflow import MlflowClient

    from jobs import run as job
    from jobs.config import load_config

    cfg = load_config(None, [
        f"criteo.inputs=[{criteo_shared / 'kaggle_dac_train_head1000_trailing_tabs_stripped.txt'}, "
        f"{criteo_shared / 'kaggle_dac_train_head900.txt'}]",
        "criteo.ingest.verify=false",
        f"criteo.raw_dir={tmp_path}/raw",
        f"lake.root={tmp_path}/lake",
        "criteo.featurize.row_group_rows=1024",  # several row groups: both ranks get a shard
        f"train.checkpoint_dir={tmp_path}/ckpt",
        "train.model=dlrm",
        "train.model_params={embedding_dim: 8, bottom_mlp: [16], top_mlp: [16]}",
        "train.batch_size=128",
        "train.num_proc=1",
        "train.epochs=2",
        "train.max_steps=1000",
        "train.eval_every=0",
        "train.log_every=2",
        f"tracking.tracking_uri={mlflow_store[0]}",
        f"tracking.artifact_location={mlflow_store[1]}",
        "tracking.experiment=criteo-e2e",
        "tracking.model_format=pickle",
    ])
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)  # the command's own flags and defaults
    args = parser.parse_args(["--no-generate"])
    assert job.run(cfg, args) == 0
    out = capsys.readouterr().out
    assert "test AUC" in out and "mlflow ui --backend-store-uri" in out
    client = MlflowClient(tracking_uri=mlflow_store[0])
    exp = client.get_experiment_by_name("criteo-e2e")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "1" and "data.train_version" in run.data.params
    assert run.data.params["data.vocabulary"].endswith("features.json")  # embeddings sized from the vocabulary
    assert run.data.params["data.gold.strategy"] == "vocab" and run.data.params["data.gold.bronze_version"] == "0"
    m = run.data.metrics
    assert 0.0 <= m["test_auc"] <= 1.0 and 0.0 < m["test_logloss"]
    assert "final_valid_auc" in m and "train_loss" in m

    # again, with ingest and featurize up to date and one in-process rank: Spark is not started
    with spark_forbidden("bigopt run with nothing to ingest or featurize"):
        assert job.run(cfg, args) == 0
    out = capsys.readouterr().out
    assert "0 file(s) ingested, 2 skipped" in out and "up to date" in out and "test AUC" in out
    assert len(client.search_runs([exp.experiment_id])) == 2


def test_run_command_stops_clearly_on_a_bad_input(tmp_path, capsys, spark_forbidden):
    """A raw file ingest cannot read stops ``bigopt run`` with the step's own message (file,
    reason, fix) and exit code 1, not a traceback; here found before Spark is needed."""
    from jobs import run as job
    from jobs.config import load_config

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "day_0.gz").write_bytes(b"not gzip at all\n")
    cfg = load_config(None, [f"criteo.raw_dir={tmp_path}/raw", f"lake.root={tmp_path}/lake"])
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    with spark_forbidden("bigopt run on an input it cannot read"):
        assert job.run(cfg, parser.parse_args(["--no-generate"])) == 1
    err = capsys.readouterr().err  # the error line on stderr, as every command's
    assert "bigopt run: 1 input file(s) cannot be ingested, nothing was committed" in err
    assert "day_0.gz: named .gz but not gzip content" in err
    # a file name that is not UTF-8, with or without the generate check (a traceback until the
    # fifteenth session's review)
    import os

    (tmp_path / "raw" / "day_0.gz").unlink()
    with open(os.path.join(os.fsencode(tmp_path / "raw"), b"day_\xff.txt"), "w") as f:
        f.write("1\t2\n")
    for flags in (["--no-generate"], []):
        with spark_forbidden("bigopt run on an input name it cannot take"):
            assert job.run(cfg, parser.parse_args(flags)) == 1, flags
        err = capsys.readouterr().err
        assert "bigopt run: input file name b'" in err and "day_\\xff.txt' is not UTF-8" in err, err


def test_pinned_gold_is_read_as_one_build(spark, tmp_path, caplog, capsys):
    """A gold/train version is read with the valid, test and embedding sizes of the featurize
    run that wrote it. Until the thirteenth session `train.table_version` pinned train alone:
    valid/test came from the latest build (a hash build's ids evaluated a vocab build's model)
    and the sizes from the latest features.json (an IndexError when they were smaller)."""
    import json
    import shutil

    from jobs.config import load_config
    from pipelines.criteo.featurize import featurize
    from pipelines.criteo.generate import generate
    from pipelines.criteo.ingest import ingest
    from training.checkpoint import checkpoint_data_versions
    from training.dataspec import resolve_data

    base = [f"criteo.raw_dir={tmp_path}/raw", f"lake.root={tmp_path}/lake", "criteo.generate.days=3",
            "criteo.generate.rows_per_day=600", "criteo.generate.cardinality_scale=0.001"]
    cfg = load_config(None, [*base, "criteo.featurize.freq_threshold=2"])
    generate(cfg)
    ingest(spark, cfg)
    a = featurize(spark, cfg)
    features = a.features_json
    saved = json.loads(open(features).read())
    b = featurize(spark, load_config(None, [*base, "criteo.featurize.strategy=hash", "criteo.featurize.hash_buckets=50"]))
    assert a.build != b.build and a.cardinalities != b.cardinalities

    caplog.clear()
    latest = resolve_data(cfg)
    assert latest.versions == b.versions and latest.cardinalities == [50] * 26
    assert latest.gold["build"] == b.build and latest.gold["strategy"] == "hash" and latest.gold["bronze_version"] == "0"
    # the settings the build was made with are the run's data.gold.* params, and a command whose
    # own differ is told (MLflow showed the command's criteo.featurize.* alone: probe finding)
    assert latest.gold["hash_buckets"] == "50" and "freq_threshold" not in latest.gold
    assert latest.gold["test_days"] == "[2]" and latest.gold["valid_share"] == "0.5"
    assert latest.gold["split_seed"] == "0"  # the held-out day's rows are split by the row hash
    assert "was built with other criteo.featurize settings than this command's: strategy=vocab (gold: hash)" in caplog.text
    caplog.clear()
    pinned = resolve_data(load_config(None, [*base, "train.table_version=0"]))
    assert pinned.gold["freq_threshold"] == "2" and "hash_buckets" not in pinned.gold
    assert "this command's: freq_threshold=3 (gold: 2)" in caplog.text, caplog.text
    # the command's split is compared as it resolves on the build's bronze: unset test_days is
    # the last day (2, as gold's); before, an added max_vocab_size or valid_days, another mode
    # or an unset test_days against gold's [1] were never said to differ (docs walkthrough probe)
    from training.dataspec import _commit_infos, _settings_not_gold_s

    info = _commit_infos(f"{tmp_path}/lake/criteo/gold/train")[0]
    assert info["test_days"] == "[2]" and info["split_mode"] == "day"

    def differ(*overrides):
        return _settings_not_gold_s(load_config(None, [*base, "criteo.featurize.freq_threshold=2", *overrides]), info)

    assert differ() == [] and differ("criteo.featurize.split.test_days=[2]") == []
    assert differ("criteo.featurize.split.test_days=[1]") == ["split.test_days=[1] (gold: [2])"]
    assert differ("criteo.featurize.max_vocab_size=1000") == ["max_vocab_size=1000 (gold: unset)"]
    assert differ("criteo.featurize.split.valid_days=[1]") == [
        "split.valid_days=[1] (gold: unset)", "split.valid_share=unset (gold: 0.5)", "split.seed=unset (gold: 0)"]
    # another seed puts other held-out rows in valid and test: said (until the twenty-seventh
    # session day mode's seed was not recorded, and nothing was; the featurize probe)
    assert differ("criteo.featurize.split.seed=5") == ["split.seed=5 (gold: 0)"]
    # a day build of the code before, which did not record its seed: not said to differ (the
    # attack probe: the warning named a difference that `bigopt featurize` calls up to date)
    older = {k: v for k, v in info.items() if k != "split_seed"}
    assert _settings_not_gold_s(load_config(None, [*base, "criteo.featurize.freq_threshold=2"]), older) == []
    assert differ("criteo.featurize.split.mode=random")[0] == "split.mode=random (gold: day)"
    assert differ("criteo.featurize.split.test_days=[7]")[0].startswith("split (split: day(s) [7] named in")
    # gold of a lake copied elsewhere: the split's days cannot be planned, the rest still counts
    # (the first version of this check said nothing at all there)
    moved = {**info, "bronze_path": "/elsewhere/criteo/bronze/events"}
    assert _settings_not_gold_s(load_config(None, [*base, "criteo.featurize.freq_threshold=5"]), moved) == [
        "freq_threshold=5 (gold: 2)"]
    assert _settings_not_gold_s(load_config(None, [*base, "criteo.featurize.freq_threshold=2",
                                                   "criteo.featurize.split.test_days=[1]"]), moved) == []
    assert pinned.versions == a.versions == {"train": 0, "valid": 0, "test": 0}
    assert pinned.cardinalities == a.cardinalities and pinned.vocabulary.endswith("vocab_sizes@v0")
    assert pinned.gold["build"] == a.build and pinned.gold["strategy"] == "vocab"
    # a checkpoint's versions (a resume) pin the same way; older checkpoints name train's only
    assert resolve_data(cfg, versions={"train": 0}).versions == a.versions
    assert checkpoint_data_versions({"loaders": [{"version": 0}]}) == {"train": 0}
    assert checkpoint_data_versions({"data_versions": {"train": 1, "valid": 1}, "loaders": []}) == {"train": 1, "valid": 1}
    with pytest.raises(ValueError, match=r"train.table_version: .*gold/train has no version 7 \(it has 0..1\)"):
        resolve_data(load_config(None, [*base, "train.table_version=7"]))
    from jobs.cli import main

    capsys.readouterr()
    assert main(["train", *base, "train.table_version=7", "--local"]) == 2  # a message, not a traceback
    assert "bigopt train: train.table_version: " in capsys.readouterr().err
    # a table of the build gone: refused, naming it (it was trained without, with a warning;
    # test_gold_of_a_featurize_stopped_part_way_is_refused has the cases a stopped featurize leaves)
    from training.dataspec import DataNotFoundError

    shutil.move(f"{tmp_path}/lake/criteo/gold/valid", f"{tmp_path}/valid.away")
    with pytest.raises(DataNotFoundError, match=r"gold valid table not found at .*featurize build .*did not finish"):
        resolve_data(cfg)
    shutil.move(f"{tmp_path}/valid.away", f"{tmp_path}/lake/criteo/gold/valid")
    # a features.json that describes other versions (a featurize stopped between its commits and
    # the JSON) is not trusted: the build's own vocab_sizes size the embeddings
    shutil.copy(features, f"{features}.b")
    with open(features, "w") as f:
        json.dump(saved, f)
    stale = resolve_data(cfg)
    assert stale.versions == b.versions and stale.cardinalities == [50] * 26
    assert stale.vocabulary.endswith("vocab_sizes@v1")
    shutil.copy(f"{features}.b", features)
    assert resolve_data(cfg).vocabulary == features
    # the build's vocab_sizes vacuumed once a later build replaced it: sized from a scan of the
    # ids, with a warning (it failed: "bigopt train: [Errno 2] Failed to open local file")
    from pipelines.lake import vacuum as vacuum_

    vacuum_(f"{tmp_path}/lake/criteo/gold/vocab_sizes", retention_hours=0, dry_run=False, enforce_retention=False)
    caplog.clear()
    scanned = resolve_data(load_config(None, [*base, "train.table_version=0"]))
    assert scanned.versions == a.versions and scanned.vocabulary is None
    assert [c <= x for c, x in zip(scanned.cardinalities, a.cardinalities)] == [True] * 26
    assert "vocab_sizes v0 (featurize build " in caplog.text and "cannot be read any more" in caplog.text
    # compacting and vacuuming gold (as a nightly schedule would) changes no row: featurize
    # stays up to date and training reads the same build. Until the thirteenth session the
    # maintenance commits made the next featurize rebuild everything, and training found no
    # build id on the latest (maintenance) commit
    from pipelines.lake import optimize, table_version, vacuum

    gold = f"{tmp_path}/lake/criteo/gold"
    for split in ("train", "valid"):
        optimize(f"{gold}/{split}")
        vacuum(f"{gold}/{split}", retention_hours=0, dry_run=False, enforce_retention=False)
    assert table_version(f"{gold}/train") > b.versions["train"]
    again = featurize(spark, load_config(None, [*base, "criteo.featurize.strategy=hash",
                                                "criteo.featurize.hash_buckets=50"]))
    assert again.up_to_date and again.versions == b.versions
    after = resolve_data(cfg)
    assert after.versions == {"train": table_version(f"{gold}/train"), "valid": table_version(f"{gold}/valid"),
                              "test": b.versions["test"]}
    assert after.gold["build"] == b.build and after.cardinalities == [50] * 26 and after.vocabulary == features
    # a checkpoint's pins (`--resume`) to the versions the compaction replaced and the vacuum
    # removed: the same rows, read at the latest versions (it failed: "read a later version")
    resumed = resolve_data(cfg, versions=b.versions)
    assert resumed.versions["train"] == after.versions["train"] != b.versions["train"]
    assert resumed.gold["build"] == b.build and resumed.versions["test"] == b.versions["test"]
    # an older version whose files that vacuum removed: named as such (until the thirteenth
    # session training printed "[Errno 2] Failed to open local file", featurize blamed a damaged
    # table after starting Spark and running its vocabulary job)
    from training.dataspec import GoldVersionError

    with pytest.raises(GoldVersionError, match=r"gold train v0 cannot be read any more: \d+ of its \d+ data files "
                                                r"are gone .*removed by a vacuum"):
        resolve_data(load_config(None, [*base, "train.table_version=0"]))
    from pipelines.criteo.featurize import FeaturizeError

    ingest(spark, cfg, force=True)  # bronze v1 replaces v0's files
    vacuum(f"{tmp_path}/lake/criteo/bronze/events", retention_hours=0, dry_run=False, enforce_retention=False)
    with pytest.raises(FeaturizeError, match=r"bronze v0 cannot be read any more: 3 of its 3 data files are gone"):
        featurize(lambda: pytest.fail("Spark started for a version that cannot be read"),
                  load_config(None, [*base, "criteo.featurize.bronze_version=0"]))
    # a damaged gold file: named, with the way out (before: "OSError: Corrupt Lz4 compressed data")
    from pipelines.lake import DeltaSnapshot

    for fe in DeltaSnapshot(f"{gold}/train").files():
        path = fe.uri.removeprefix("file://")
        data = bytearray(open(path, "rb").read())
        data[4:len(data) // 2] = bytes(len(data) // 2 - 4)  # the data pages, not the footer
        open(path, "wb").write(bytes(data))
    capsys.readouterr()
    assert main(["train", *base, "--local", "train.max_steps=2"]) == 1
    err = capsys.readouterr().err
    assert "bigopt train: " in err and "cannot be read" in err and "bigopt featurize --force" in err


def test_gold_of_a_featurize_stopped_part_way_is_refused(spark, tmp_path, capsys, spark_forbidden, mlflow_store):
    """A first featurize stopped between its commits (kill -9, a full disk) leaves gold train of
    a build without its valid or test table, or without ``features.json``: ``bigopt train``
    refuses it in one line (exit 2) saying featurize did not finish. Before, a gold folder whose
    ``_delta_log`` was empty ended in delta-rs's "No files in log segment" traceback (exit 1),
    and valid/test folders without a log were trained without, as a FINISHED run (probe)."""
    import shutil

    from jobs.cli import main
    from jobs.config import load_config
    from pipelines.criteo.featurize import featurize
    from pipelines.criteo.generate import generate
    from pipelines.criteo.ingest import ingest

    base = [f"criteo.raw_dir={tmp_path}/raw", f"lake.root={tmp_path}/lake", "criteo.generate.days=2",
            "criteo.generate.rows_per_day=300", "criteo.generate.cardinality_scale=0.001"]
    cfg = load_config(None, base)
    generate(cfg)
    ingest(spark, cfg)
    featurize(spark, cfg)
    gold = tmp_path / "lake" / "criteo" / "gold"
    train = [*base, f"train.checkpoint_dir={tmp_path}/ckpt", f"tracking.tracking_uri={mlflow_store[0]}",
             f"tracking.artifact_location={mlflow_store[1]}", "tracking.experiment=stopped-featurize",
             "train.model=logreg", "train.batch_size=64", "train.max_steps=1", "--local"]

    def refused(*needles):
        capsys.readouterr()
        with spark_forbidden("bigopt train on gold it refuses"):
            assert main(["train", *train]) == 2
        err = capsys.readouterr().err
        # (MLflow's own lines as it creates the session's sqlite store are not the command's)
        lines = [line for line in err.splitlines() if line.strip() and "mlflow.store.db.utils" not in line]
        assert len(lines) == 1 and lines[0].startswith("bigopt train: "), err
        assert "Traceback" not in err and all(n in lines[0] for n in needles), err

    # disk full at gold valid's commit: its data files written, its `_delta_log` empty
    shutil.move(gold / "valid", tmp_path / "valid.away")
    (gold / "valid" / "_delta_log").mkdir(parents=True)
    for f in (tmp_path / "valid.away").glob("*.parquet"):
        shutil.copy(f, gold / "valid")
    shutil.move(gold / "features.json", tmp_path / "features.away")
    refused(f"gold valid table not found at {gold}/valid", "featurize build", "did not finish",
            "run `bigopt featurize` again")
    # killed after the train commit: valid and test hold data files, no log
    shutil.move(gold / "test" / "_delta_log", tmp_path / "test_log.away")
    shutil.rmtree(gold / "valid" / "_delta_log")
    refused("gold valid table not found at", "did not finish", "run `bigopt featurize` again")
    shutil.rmtree(gold / "valid")
    shutil.move(tmp_path / "valid.away", gold / "valid")
    refused(f"gold test table not found at {gold}/test", "did not finish")
    shutil.move(tmp_path / "test_log.away", gold / "test" / "_delta_log")
    # killed after the last commit, before features.json
    refused(f"{gold}/features.json not found", "did not finish", "run `bigopt featurize` again")
    shutil.move(tmp_path / "features.away", gold / "features.json")
    # an empty `_delta_log` of gold train itself: the one line for no gold yet
    shutil.move(gold / "train", tmp_path / "train.away")
    (gold / "train" / "_delta_log").mkdir(parents=True)
    refused(f"gold train table not found at {gold}/train", "run `bigopt featurize` first")
    shutil.rmtree(gold / "train")
    shutil.move(tmp_path / "train.away", gold / "train")
    # the remedy it names: `bigopt featurize` (no --force) builds again over the stopped one's
    # folders (an empty `_delta_log` of valid, no features.json), and train reads that build
    shutil.rmtree(gold / "valid" / "_delta_log")
    (gold / "valid" / "_delta_log").mkdir()
    (gold / "features.json").unlink()
    assert not featurize(spark, cfg).up_to_date
    capsys.readouterr()
    assert main(["train", *train]) == 0, capsys.readouterr().err
