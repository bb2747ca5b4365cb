"""DeltaTorchLoader: exact-once coverage across ranks, equal batch counts, shuffle determinism,
exact mid-epoch resume, version pinning, projection, list columns, eval padding.

Small Delta tables written with deltalake (no Spark); row groups of 64 rows so that the
sharding, the read-ahead and the shuffle reservoir all cross many unit boundaries.
"""
from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from deltalake import WriterProperties, write_deltalake

from training.data import VALID_KEY, DeltaTorchLoader, UnsupportedColumnError, lpt_assign
from training.data.loader import default_read_ahead

B = 64
SIZES = (700, 450, 853)  # three appends -> three files, uneven
TOTAL = sum(SIZES)
WP = WriterProperties(max_row_group_size=B, compression="ZSTD")


def gold_table(start: int, n: int) -> pa.Table:
    ids = np.arange(start, start + n, dtype=np.int64)
    dense = np.stack([ids, ids + 0.25, ids + 0.5], axis=1).astype(np.float32).ravel()
    sparse = np.stack([ids, -ids], axis=1).astype(np.int32).ravel()
    return pa.table({
        "id": ids,
        "label": (ids % 2).astype(np.float32),
        "dense": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * 3), pa.array(dense)),
        "sparse": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * 2), pa.array(sparse)),
        "name": pa.array([f"r{i}" for i in ids]),
    })


@pytest.fixture(scope="module")
def gold(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("lake") / "gold")
    start = 0
    for n in SIZES:
        write_deltalake(path, gold_table(start, n), mode="append", writer_properties=WP)
        start += n
    return path


COLS = ["id", "label", "dense", "sparse"]


def make(gold, **kw) -> DeltaTorchLoader:
    kw.setdefault("shuffle_buffer_rows", 256)
    return DeltaTorchLoader(gold, kw.pop("columns", COLS), kw.pop("batch_size", B), **kw)


def ids_of(batches, valid_only: bool = True) -> np.ndarray:
    out = []
    for b in batches:
        ids = b["id"]
        if valid_only and VALID_KEY in b:
            ids = ids[b[VALID_KEY]]
        out.append(ids.numpy())
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def check_aligned(batch) -> None:
    """Every column of a row comes from the same table row."""
    ids = batch["id"]
    m = batch[VALID_KEY] if VALID_KEY in batch else torch.ones(len(ids), dtype=torch.bool)
    ids = ids[m]
    assert torch.equal(batch["label"][m], (ids % 2).float())
    assert torch.equal(batch["dense"][m][:, 0], ids.float())
    assert torch.equal(batch["dense"][m][:, 2], ids.float() + 0.5)
    assert torch.equal(batch["sparse"][m][:, 1], (-ids).int())


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# ---------------------------------------------------------------- basics
def test_version_rows_len_shapes(gold):
    ld = make(gold, shuffle=False, drop_last=False)
    assert ld.version == len(SIZES) - 1
    assert ld.num_rows == TOTAL and ld.shard_rows == TOTAL
    assert len(ld) == -(-TOTAL // B)
    batches = list(ld)
    assert len(batches) == len(ld)
    b = batches[0]
    assert set(b) == set(COLS)
    assert b["id"].dtype == torch.int64 and b["id"].shape == (B,)
    assert b["label"].dtype == torch.float32 and b["label"].shape == (B,)
    assert b["dense"].dtype == torch.float32 and b["dense"].shape == (B, 3)
    assert b["sparse"].dtype == torch.int32 and b["sparse"].shape == (B, 2)
    assert len(batches[-1]["id"]) == TOTAL % B
    ids = ids_of(batches)
    np.testing.assert_array_equal(np.sort(ids), np.arange(TOTAL))  # exactly once
    # unshuffled = files in path order, rows in file order: runs of consecutive ids
    assert int((np.diff(ids) != 1).sum()) <= len(SIZES) - 1
    for x in batches:
        check_aligned(x)


def test_projection_reads_only_requested_columns(gold):
    ld = make(gold, columns=["label", "sparse"], shuffle=False)
    b = next(iter(ld))
    assert list(b) == ["label", "sparse"] and b["sparse"].shape == (B, 2)
    with pytest.raises(KeyError):
        make(gold, columns=["label", "nope"])
    with pytest.raises(UnsupportedColumnError):
        make(gold, columns=["name"])  # strings have no tensor form


# ---------------------------------------------------------------- sharding
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_exact_once_across_ranks_eval_padding(gold, world, shuffle):
    loaders = [make(gold, rank=r, world_size=world, shuffle=shuffle, drop_last=False) for r in range(world)]
    assert all(ld.pad_to_equal == (world > 1) for ld in loaders)
    per_rank = [list(ld) for ld in loaders]
    n = len(loaders[0])
    assert all(len(ld) == n for ld in loaders) and all(len(b) == n for b in per_rank)
    # batch i has the same size on every rank (allgather-friendly)
    for i in range(n):
        assert len({len(b[i]["id"]) for b in per_rank}) == 1
    all_ids = np.concatenate([ids_of(b) for b in per_rank])
    np.testing.assert_array_equal(np.sort(all_ids), np.arange(TOTAL))  # every row exactly once
    for ld, batches in zip(loaders, per_rank):
        assert len(ids_of(batches)) == ld.shard_rows
        for b in batches:
            check_aligned(b)
    # shards balanced by rows: spread at most one row group
    rows = loaders[0].rank_rows
    assert sum(rows) == TOTAL and max(rows) - min(rows) <= B


@pytest.mark.parametrize("world", [1, 2, 3])
def test_drop_last_equal_full_batches(gold, world):
    loaders = [make(gold, rank=r, world_size=world, seed=3) for r in range(world)]
    n = len(loaders[0])
    assert n == min(loaders[0].rank_rows) // B
    seen = []
    for ld in loaders:
        batches = list(ld)
        assert len(batches) == n == len(ld)
        assert all(len(b["id"]) == B and VALID_KEY not in b for b in batches)
        seen.append(ids_of(batches))
    ids = np.concatenate(seen)
    assert len(np.unique(ids)) == len(ids) == n * B * world  # no row twice, dropped rows only


def test_eval_padding_mask_zeros(gold):
    world = 3
    loaders = [make(gold, rank=r, world_size=world, shuffle=False, drop_last=False, pad_to_equal=True)
               for r in range(world)]
    for ld in loaders:
        batches = list(ld)
        valid = torch.cat([b[VALID_KEY] for b in batches])
        assert valid.dtype == torch.bool and int(valid.sum()) == ld.shard_rows
        assert bool(valid[: ld.shard_rows].all())  # real rows first, padding only at the end
        last = batches[-1]
        pad = ~last[VALID_KEY]
        assert len(last["id"]) == max(ld.rank_rows) - (len(ld) - 1) * B
        assert bool((last["dense"][pad] == 0).all()) and bool((last["id"][pad] == 0).all())
    with pytest.raises(ValueError):
        make(gold, drop_last=True, pad_to_equal=True)


def test_more_ranks_than_row_groups(tmp_path):
    path = str(tmp_path / "tiny")
    write_deltalake(path, gold_table(0, 10), writer_properties=WP)  # one row group
    loaders = [make(path, rank=r, world_size=3, shuffle=False, drop_last=False) for r in range(3)]
    assert [ld.shard_rows for ld in loaders] == [10, 0, 0]
    out = [list(ld) for ld in loaders]
    assert [len(b) for b in out] == [1, 1, 1]
    assert out[1][0]["dense"].shape == (10, 3) and not bool(out[1][0][VALID_KEY].any())
    with pytest.warns(UserWarning, match="empty"):
        assert len(make(path, world_size=3)) == 0


def test_shard_by_file(gold):
    loaders = [make(gold, rank=r, world_size=2, shard_by="file", drop_last=False) for r in range(2)]
    assert sorted(ld.shard_rows for ld in loaders) == sorted([SIZES[2], SIZES[0] + SIZES[1]])
    ids = np.concatenate([ids_of(list(ld)) for ld in loaders])
    np.testing.assert_array_equal(np.sort(ids), np.arange(TOTAL))


def test_lpt_assign_balanced_deterministic():
    rows = [5, 9, 1, 9, 3, 3, 7]
    a = lpt_assign(rows, 3)
    assert a == lpt_assign(rows, 3)
    assert sorted(i for r in a for i in r) == list(range(len(rows)))
    loads = [sum(rows[i] for i in r) for r in a]
    assert max(loads) - min(loads) <= max(rows)
    assert all(r == sorted(r) for r in a)


# ---------------------------------------------------------------- shuffling
def test_shuffle_deterministic_per_seed_and_epoch(gold):
    a, b = make(gold, seed=7, drop_last=False), make(gold, seed=7, drop_last=False)
    e0a, e0b = list(a), list(b)
    assert same_batches(e0a, e0b)  # same seed + epoch -> same batches, same order
    ids0 = ids_of(e0a)
    np.testing.assert_array_equal(np.sort(ids0), np.arange(TOTAL))
    assert not np.array_equal(ids0, ids_of(list(make(gold, shuffle=False, drop_last=False))))
    e1 = ids_of(list(a))  # second iter() = epoch 1
    assert not np.array_equal(ids0, e1) and np.array_equal(np.sort(e1), np.arange(TOTAL))
    b.set_epoch(1)
    np.testing.assert_array_equal(ids_of(list(b)), e1)
    b.set_epoch(0)
    np.testing.assert_array_equal(ids_of(list(b)), ids0)
    assert not np.array_equal(ids_of(list(make(gold, seed=8, drop_last=False))), ids0)
    for x in e0a:
        check_aligned(x)
    # row-level mixing, not just row-group order: few neighbours within a batch
    assert float(np.mean(np.diff(e0a[0]["id"].numpy()) == 1)) < 0.2
    # well mixed: rows from all three files within the first few batches
    first = ids_of(e0a[:4])
    assert len({int(np.searchsorted(np.cumsum(SIZES), i, side="right")) for i in first}) >= 2


def test_shuffle_same_order_regardless_of_threads(gold):
    ref = ids_of(list(make(gold, seed=1)))
    for kw in ({"prefetch": 0, "read_ahead": 0}, {"prefetch": 5, "read_ahead": 4, "use_threads": False}):
        np.testing.assert_array_equal(ids_of(list(make(gold, seed=1, **kw))), ref)


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize(
    "shuffle,drop_last,world,k,buf",
    [
        (True, True, 1, 1, 256),
        (True, True, 1, 9, 256),      # 3rd reservoir round, after the ring arena wrapped
        (True, False, 2, 14, 256),    # drain phase, with padding
        (True, True, 1, 20, 0),       # buffer of one batch
        (False, False, 1, 17, 256),
        (False, True, 2, 5, 256),
        (True, True, 3, 0, 256),
    ],
)
def test_resume_mid_epoch_yields_exactly_the_rest(gold, shuffle, drop_last, world, k, buf):
    rank = world - 1
    kw = dict(shuffle=shuffle, drop_last=drop_last, rank=rank, world_size=world, seed=11, shuffle_buffer_rows=buf)
    ref = make(gold, **kw)
    ref.set_epoch(2)
    full = list(ref)
    assert k < len(full)
    first = make(gold, **kw)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(k)]
    assert same_batches(head, full[:k])
    state = first.state_dict()
    assert (state["epoch"], state["batches_consumed"], state["seed"]) == (2, k, 11)
    del it
    first.close()

    resumed = make(gold, **{**kw, "seed": 0}, version=state["version"])  # seed comes from the state
    resumed.load_state_dict(state)
    assert resumed.epoch == 2  # what a training loop reads back after a restart
    rest = list(resumed)
    assert same_batches(rest, full[k:])
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["batches_consumed"] == 0
    nxt = make(gold, **kw)
    nxt.set_epoch(3)
    assert same_batches(list(resumed), list(nxt))  # and the following epoch continues normally


def test_state_dict_epoch_boundaries_and_mismatch(gold):
    ld = make(gold, seed=2)
    assert ld.state_dict()["epoch"] == 0 and ld.state_dict()["batches_consumed"] == 0
    for i, _ in enumerate(ld):
        if i == 2:
            assert ld.state_dict()["batches_consumed"] == 3
    assert (ld.state_dict()["epoch"], ld.state_dict()["batches_consumed"]) == (1, 0)
    sd = ld.state_dict()
    sd_end = {**sd, "epoch": 0, "batches_consumed": len(ld)}
    ld.load_state_dict(sd_end)
    assert (ld.state_dict()["epoch"], ld.state_dict()["batches_consumed"]) == (1, 0)
    with pytest.raises(ValueError):
        make(gold, batch_size=32).load_state_dict(sd)
    with pytest.raises(ValueError):
        make(gold, world_size=2).load_state_dict(sd)


# ---------------------------------------------------------------- versions
def test_version_pinning(tmp_path):
    path = str(tmp_path / "t")
    write_deltalake(path, gold_table(0, 300), writer_properties=WP)
    pinned = make(path, shuffle=False, drop_last=False)
    v = pinned.version
    write_deltalake(path, gold_table(300, 200), mode="append", writer_properties=WP)
    assert pinned.version == v and pinned.num_rows == 300
    np.testing.assert_array_equal(ids_of(list(pinned)), np.arange(300))  # still version v
    latest = make(path, shuffle=False, drop_last=False)
    assert latest.version == v + 1 and latest.num_rows == 500
    np.testing.assert_array_equal(np.sort(ids_of(list(latest))), np.arange(500))
    old = make(path, shuffle=False, drop_last=False, version=v)
    assert old.num_rows == 300
    write_deltalake(path, gold_table(1000, 50), mode="overwrite", writer_properties=WP)
    np.testing.assert_array_equal(ids_of(list(make(path, shuffle=False, drop_last=False))), np.arange(1000, 1050))
    np.testing.assert_array_equal(ids_of(list(old)), np.arange(300))  # old files still there (no vacuum)


# ---------------------------------------------------------------- column kinds
def test_list_columns_fixed_variable_and_dtypes(tmp_path):
    path = str(tmp_path / "lists")
    n = 200
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(n * 4, dtype=np.int16)), 4)
    lens = np.arange(n) % 4
    offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    ragged = pa.ListArray.from_arrays(pa.array(offs), pa.array(np.arange(offs[-1], dtype=np.int64)))
    write_deltalake(path, pa.table({"fixed": fixed, "ragged": ragged, "x": np.arange(n, dtype=np.float64)}),
                    writer_properties=WP)
    ld = make(path, columns=["fixed", "x"], shuffle=False, dtypes={"x": "float32", "fixed": torch.int64})
    b = next(iter(ld))
    assert b["fixed"].shape == (B, 4) and b["fixed"].dtype == torch.int64 and b["x"].dtype == torch.float32
    assert torch.equal(b["fixed"][1], torch.arange(4, 8))
    with pytest.raises(UnsupportedColumnError, match="different lengths"):
        list(make(path, columns=["ragged"], shuffle=False))
    padded = list(make(path, columns=["ragged"], shuffle=False, drop_last=False, pad={"ragged": (2, -1)}))
    r = torch.cat([p["ragged"] for p in padded])
    assert r.shape == (n, 2)
    assert r[0].tolist() == [-1, -1] and r[1].tolist() == [0, -1] and r[3].tolist() == [3, 4]  # row 3 truncated
    bf = next(iter(make(path, columns=["x"], dtypes={"x": torch.bfloat16})))
    assert bf["x"].dtype == torch.bfloat16 and len(bf["x"]) == B


def test_partition_columns_and_nulls(tmp_path):
    path = str(tmp_path / "part")
    t = pa.table({"day": np.repeat(np.array([3, 4], dtype=np.int32), 100), "v": np.arange(200, dtype=np.float32)})
    write_deltalake(path, t, partition_by=["day"], writer_properties=WP)
    batches = list(make(path, columns=["v", "day"], shuffle=True, drop_last=False))
    v = torch.cat([b["v"] for b in batches])
    d = torch.cat([b["day"] for b in batches])
    assert sorted(v.tolist()) == list(range(200))
    assert torch.equal(d, torch.where(v < 100, 3, 4).to(d.dtype))
    npath = str(tmp_path / "nulls")
    write_deltalake(npath, pa.table({"v": pa.array([1.0, None, 3.0], pa.float32())}))
    with pytest.raises(UnsupportedColumnError, match="null"):
        list(make(npath, columns=["v"], batch_size=2, drop_last=False))
    got = torch.cat([b["v"] for b in make(npath, columns=["v"], batch_size=2, shuffle=False, drop_last=False,
                                          fill_null=-1.0)])
    assert got.tolist() == [1.0, -1.0, 3.0]


# ---------------------------------------------------------------- filesystems, threads
class _CountingHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem that delegates to the local one and counts file opens."""

    def __init__(self):
        self.fs, self.opened = pafs.LocalFileSystem(), []

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def open_input_file(self, path):
        self.opened.append(path)
        return self.fs.open_input_file(path)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def _read_only(self, *a, **k):
        raise NotImplementedError("read-only test filesystem")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_output_stream = open_append_stream = _read_only


def test_uri_and_explicit_filesystem(gold):
    ref = ids_of(list(make(gold, shuffle=False, drop_last=False)))
    via_uri = make("file://" + gold, shuffle=False, drop_last=False)
    np.testing.assert_array_equal(ids_of(list(via_uri)), ref)
    h = _CountingHandler()
    ld = make(gold, shuffle=False, drop_last=False, filesystem=pafs.PyFileSystem(h))
    np.testing.assert_array_equal(ids_of(list(ld)), ref)
    assert h.opened and all(p.endswith(".parquet") for p in h.opened)


def test_a_percent_escaped_file_uri_reads_its_table(gold, tmp_path):
    """``Path.as_uri()`` of a folder with a space (``sp%20ace``): the loader said "no Delta
    table at .../sp%20ace/t" until the twentieth session (the URI was not decoded)."""
    import shutil

    shutil.copytree(gold, tmp_path / "sp ace" / "t")
    ld = make((tmp_path / "sp ace" / "t").as_uri(), shuffle=False, drop_last=False)
    assert ld.table_uri == str(tmp_path / "sp ace" / "t")
    np.testing.assert_array_equal(ids_of(list(ld)), ids_of(list(make(gold, shuffle=False, drop_last=False))))


def test_early_break_stops_prefetch_thread(gold):
    def producers():
        return [t for t in threading.enumerate() if t.name.startswith("delta-loader")]

    ld = make(gold, prefetch=2)
    for i, _ in enumerate(ld):
        if i == 1:
            break
    gc.collect()
    deadline = time.time() + 5
    while producers() and time.time() < deadline:
        time.sleep(0.05)
    assert not producers()
    assert ld.state_dict()["epoch"] == 0 and ld.state_dict()["batches_consumed"] == 2
    assert len(list(ld)) == len(ld)  # a new iter() is the next epoch, complete


def test_errors_surface_in_consumer(gold, monkeypatch):
    ld = make(gold, shuffle=False)

    def boom(u):
        raise OSError("disk on fire")

    monkeypatch.setattr(ld, "_read_unit", boom)
    with pytest.raises(OSError, match="disk on fire"):
        list(ld)


def test_a_damaged_data_file_is_named(tmp_path):
    """A row group that cannot be decoded fails the iteration with an error naming the file,
    the table and version, and the way out (before: pyarrow's bare "Corrupt ... data")."""
    from pipelines.lake import DeltaSnapshot
    from training.data.loader import UnreadableDataFileError

    path = str(tmp_path / "gold")
    write_deltalake(path, gold_table(0, 500), writer_properties=WP)
    (fe,) = DeltaSnapshot(path).files()
    f = fe.uri.removeprefix("file://")
    data = bytearray(open(f, "rb").read())
    data[len(data) // 3:len(data) // 2] = bytes(len(data) // 2 - len(data) // 3)  # pages, not the footer
    open(f, "wb").write(bytes(data))
    with pytest.raises(UnreadableDataFileError, match=rf"{f}.*\(row group \d+, .*gold v0\) cannot be read: .*"
                                                      r"bigopt featurize --force"):
        for _ in DeltaTorchLoader(path, COLS, B, shuffle=False):
            pass


def test_files_a_vacuum_took_while_reading_are_not_called_damage(tmp_path):
    """A vacuum (retention 0, --no-retention-check) that removes the files of the version a run
    is reading, after a later version replaced them: the run fails saying so, with the remedy
    (a run on the latest version), not "rebuild the table or restore the file" (concurrency
    probe). A file gone that the latest version still has is damage, as before."""
    from deltalake import DeltaTable

    from pipelines.criteo.bronze_slices import UnreadableBronzeError
    from pipelines.criteo.featurize import FeaturizeError, _vacuumed_errors
    from pipelines.criteo.split import BronzeView
    from pipelines.lake import DeltaSnapshot
    from training.data.loader import UnreadableDataFileError

    path = str(tmp_path / "gold")
    write_deltalake(path, gold_table(0, 500), writer_properties=WP)
    ld = DeltaTorchLoader(path, COLS, B, shuffle=False)  # reads v0
    write_deltalake(path, gold_table(1, 500), mode="overwrite", writer_properties=WP)  # v1 replaces its file
    DeltaTable(path).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    with pytest.raises(UnreadableDataFileError, match=r"is gone: a vacuum removed 1 of v0's files while this run read "
                                                      r"it \(v\d+ replaced them.*not damaged: run again on v\d+"):
        list(ld)
    old = DeltaSnapshot(path, version=0)
    with pytest.raises(FeaturizeError, match="1 of bronze v0's files were removed by a vacuum while featurize read "
                                             "them .*bronze is not damaged: run featurize again"):
        with _vacuumed_errors(BronzeView(0, {}, old)):
            raise UnreadableBronzeError(["x (FileNotFoundError: gone)"])
    # the latest version's own file deleted by hand: damage, as before
    ld = DeltaTorchLoader(path, COLS, B, shuffle=False)
    (fe,) = DeltaSnapshot(path).files()
    import os

    os.remove(fe.uri.removeprefix("file://"))
    with pytest.raises(UnreadableDataFileError, match="cannot be read: .*bigopt featurize --force"):
        list(ld)
    with pytest.raises(UnreadableBronzeError):
        with _vacuumed_errors(BronzeView(1, {}, DeltaSnapshot(path))):
            raise UnreadableBronzeError(["x (FileNotFoundError: gone)"])


def test_read_ahead_scales_with_cores():
    """Decoding is most of the loader's time: a many-core GPU host decodes 4 row groups at once
    (2.2 -> 4.3 M rows/s on 16 cores), a 2-core box leaves the other core to the model."""
    assert [default_read_ahead(True, c) for c in (1, 2, 4, 8, 16, 64)] == [1, 1, 1, 2, 4, 4]
    assert default_read_ahead(False, 2) == 4  # object stores: hide request latency


def test_files_with_deletion_vectors_are_refused(tmp_path):
    """delta-rs 1.6.6's add actions carry no deletionVector field, so the loader could not see
    one: it warned "cannot verify" and read the file whole, the deleted rows with it (loader
    probe). The log is read for them now; a table with the feature on and no vector is read."""
    from lake_helpers import with_deletion_vector

    path = str(tmp_path / "dv")
    write_deltalake(path, pa.table({"id": np.arange(20, dtype=np.int64)}))
    with_deletion_vector(path, dv=True)
    with pytest.raises(NotImplementedError, match=r"has deletion vectors on 1 file\(s\) .*REORG TABLE"):
        DeltaTorchLoader(path, ["id"], 4, shuffle=False, drop_last=False)
    from pipelines.lake import DeltaSnapshot

    snap = DeltaSnapshot(path)  # its log and history still read (maintenance works) ...
    assert snap.version == 1 and len(snap.deletion_vector_files()) == 1
    with pytest.raises(NotImplementedError, match="deletion vectors"):  # ... its rows do not: Spark, featurize
        snap.to_table()
    assert len(DeltaTorchLoader(path, ["id"], 4, version=0, shuffle=False, drop_last=False)) == 5  # before it
    clean = str(tmp_path / "clean")
    write_deltalake(clean, pa.table({"id": np.arange(20, dtype=np.int64)}))
    with_deletion_vector(clean, dv=False)
    loader = DeltaTorchLoader(clean, ["id"], 4, shuffle=False, drop_last=False)
    assert sorted(torch.cat([b["id"] for b in loader]).tolist()) == list(range(20))


def test_a_file_that_cannot_be_read_while_the_loader_is_built_is_named(tmp_path):
    """The footers read while the loader is built (every file's, sharding by row group) gave
    pyarrow's bare error: "Parquet magic bytes not found", or a FileNotFoundError with no word of
    the vacuum that removed the file, where a row group read later says both (loader probe)."""
    import glob

    from deltalake import DeltaTable

    from training.data.loader import UnreadableDataFileError

    damaged = str(tmp_path / "a")
    for _ in (1, 2):
        write_deltalake(damaged, pa.table({"id": np.arange(10)}), mode="append")
    f = sorted(glob.glob(damaged + "/*.parquet"))[0]
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(UnreadableDataFileError, match=r"\(its footer, .* v1\) cannot be read: .*restore the file"):
        DeltaTorchLoader(damaged, ["id"], 4)
    vacuumed = str(tmp_path / "b")
    write_deltalake(vacuumed, pa.table({"id": np.arange(10)}))
    write_deltalake(vacuumed, pa.table({"id": np.arange(5)}), mode="overwrite")
    DeltaTable(vacuumed).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    with pytest.raises(UnreadableDataFileError, match=r"is gone: a vacuum removed 1 of v0's files .* run again on v3"):
        DeltaTorchLoader(vacuumed, ["id"], 4, version=0)
