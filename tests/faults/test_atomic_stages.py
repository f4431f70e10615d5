"""Issue #15, class 2 for the retrieval stages and the synthetic generator: an output is old or new, never a mix.

For each writer (item embeddings, the FAISS index, the retrieval folder, the synthetic ML-25M folder):

(a) a rerun into a finished output that is interrupted mid-way (an exception raised inside the writer after
    some files are written; for the index and the synthetic folder also a real ``kill -9`` of a writing
    subprocess) leaves the previous output byte for byte (sha256 of every file) and loadable;
(b) the reader refuses a folder with a file removed or added, or with the sidecar of another run, naming
    the folder and the difference;
(c) a full disk (a small tmpfs, ``tests/faults/conftest.py``) raises ``DiskFullError`` and leaves the
    previous output byte for byte, with no temporary left.

The reference for "intact" is independent of the code under test: a sha256 of every file taken before the
rerun, compared after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from reclora_ds.data.histories import load_retrieved
from reclora_ds.data.synthetic import (
    SyntheticConfig,
    SyntheticFolderError,
    check_synthetic,
    existing_synthetic,
    write_synthetic_ml25m,
)
from reclora_ds.files import DiskFullError, resolve_old
from reclora_ds.retrieval import index as index_mod
from reclora_ds.retrieval import retriever as retriever_mod
from reclora_ds.retrieval.embeddings import ItemEmbeddingConfig, extract_item_embeddings, work_shard_dir
from reclora_ds.retrieval.errors import RetrievalInputError
from reclora_ds.retrieval.index import (
    build_index,
    load_index,
    load_item_embeddings,
    make_sidecar,
    save_index,
    write_item_embeddings,
)
from reclora_ds.retrieval.index_space import fit_pca, to_index_space
from reclora_ds.retrieval.retriever import check_retrieval_folder, retrieve_histories
from tests.faults.conftest import fill
from tests.item_index import build_item_index
from tests.tiny_llm import tiny_llama, word_tokenizer

REPO = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex), hidden files included."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.tmp-")]


def damaged_copies(source: Path, tmp_path: Path, cases: dict) -> Iterator[tuple[str, Path, str]]:
    """(case name, a damaged copy of ``source``, the message its reader must give) for each
    ``{name: (damage, message)}`` case: ``damage`` changes the copy in place."""
    for name, (damage, message) in cases.items():
        copy = tmp_path / name.replace(" ", "_")
        shutil.copytree(source, copy)
        damage(copy)
        yield name, copy, message


class Interrupted(RuntimeError):
    """The simulated kill."""


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((16, d))
    return (centers[rng.integers(0, 16, n)] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)


def embeddings_meta(tag: str) -> dict:
    return {"backbone": f"test-{tag}", "dataset": "ds"}


# ----------------------------------------------------------------------------------------------------------
# Item embeddings
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset_dir(ml_small_prepared) -> Path:
    return Path(ml_small_prepared.output_dir)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory, dataset_dir) -> Path:
    import pyarrow.parquet as pq

    descriptions = pq.read_table(dataset_dir / "items.parquet").column("description").to_pylist()
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = word_tokenizer(descriptions, chat_template=None, vocab_size=3000)
    tokenizer.save_pretrained(folder)
    tiny_llama(tokenizer, hidden=16, layers=1, heads=2, kv_heads=1, max_positions=256).save_pretrained(folder)
    return folder


def _extract(dataset_dir: Path, out: Path, backbone: Path, **kwargs) -> Path:
    config = ItemEmbeddingConfig(backbone=str(backbone), show_progress=False, limit_items=40, **kwargs)
    return extract_item_embeddings(dataset_dir, out, config, device=torch.device("cpu"))


def test_embeddings_rerun_interrupted_in_the_merge_keeps_the_previous_output(
    tmp_path, dataset_dir, tiny_backbone, monkeypatch
):
    out = _extract(dataset_dir, tmp_path / "emb", tiny_backbone)
    assert sorted(p.name for p in out.iterdir()) == [
        "embeddings.json",
        "embeddings.npy",
        "item_ids.npy",
        "shards",
    ]
    assert not work_shard_dir(out).exists()
    before = snapshot(out)
    old = load_item_embeddings(out, expected_n_items=40)

    calls = []

    def listing_then_die(folder, names):  # every data file and the linked shards are in the temporary folder
        calls.append(sorted(p.name for p in Path(folder).iterdir()))
        raise Interrupted("killed while writing the new embeddings folder")

    monkeypatch.setattr(index_mod, "listing", listing_then_die)
    with pytest.raises(Interrupted):
        _extract(dataset_dir, out, tiny_backbone, max_length=4)  # other inputs: other vectors
    assert calls == [["embeddings.npy", "item_ids.npy", "shards"]]  # it died with the new files written
    assert snapshot(out) == before and no_temporaries(out)
    again = load_item_embeddings(out, expected_n_items=40)
    np.testing.assert_array_equal(again.vectors, old.vectors)
    # the new run's shards are still in the work folder: the next try reuses them
    assert sorted(p.name for p in work_shard_dir(out).iterdir()) == [
        "rank000-of-001.json",
        "rank000-of-001.npy",
    ]

    monkeypatch.undo()
    _extract(dataset_dir, out, tiny_backbone, max_length=4)
    new = load_item_embeddings(out, expected_n_items=40)
    assert new.meta["max_length"] == 4 and not np.array_equal(new.vectors, old.vectors)
    assert not work_shard_dir(out).exists()


def test_embeddings_rerun_reuses_the_old_shards_without_touching_them(tmp_path, dataset_dir, tiny_backbone):
    out = _extract(dataset_dir, tmp_path / "emb", tiny_backbone)
    shard = out / "shards" / "rank000-of-001.npy"
    inode, before = shard.stat().st_ino, snapshot(out)
    _extract(dataset_dir, out, tiny_backbone)  # same inputs: the shard is linked, not computed
    assert (out / "shards" / "rank000-of-001.npy").stat().st_ino == inode
    assert snapshot(out) == before


def _two_embeddings(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    shard_a = tmp_path / "work-a"
    shard_a.mkdir()
    for name in ("rank000-of-002.npy", "rank001-of-002.npy"):
        np.save(shard_a / name, np.zeros(3, dtype=np.float32))
    write_item_embeddings(
        a, clustered(30, 8, 0), np.arange(30), embeddings_meta("a"), shard_files=sorted(shard_a.iterdir())
    )
    write_item_embeddings(b, clustered(30, 8, 1), np.arange(30), embeddings_meta("b"))
    return a, b


def test_embeddings_reader_refuses_a_folder_that_differs_from_its_sidecar(tmp_path):
    a, b = _two_embeddings(tmp_path)
    load_item_embeddings(a, expected_n_items=30)

    cases = {}
    cases["shard removed"] = lambda d: (d / "shards" / "rank001-of-002.npy").unlink()
    cases["shard added"] = lambda d: np.save(d / "shards" / "rank002-of-003.npy", np.zeros(3, np.float32))
    cases["file added"] = lambda d: (d / "notes.txt").write_text("x")
    cases["item_ids removed"] = lambda d: (d / "item_ids.npy").unlink()
    cases["item_ids of another run"] = lambda d: np.save(d / "item_ids.npy", np.arange(30)[::-1].copy())
    cases["sidecar of another run"] = lambda d: shutil.copy2(b / "embeddings.json", d / "embeddings.json")
    cases["arrays of another run"] = lambda d: shutil.copy2(b / "embeddings.npy", d / "embeddings.npy")
    expected = {
        "shard removed": "shards/rank001-of-002.npy is listed in embeddings.json but missing",
        "shard added": "shards/rank002-of-003.npy is in the folder but not listed",
        "file added": "notes.txt is in the folder but not listed",
        "item_ids removed": "item_ids.npy is listed in embeddings.json but missing",
        "item_ids of another run": "item_ids.npy has another sha256",
        "sidecar of another run": "shards is in the folder but not listed",
        "arrays of another run": "embeddings.npy: sha256",
    }
    for name, damage in cases.items():
        d = tmp_path / name.replace(" ", "_")
        shutil.copytree(a, d)
        damage(d)
        with pytest.raises(RetrievalInputError) as err:
            load_item_embeddings(d)
        assert str(d) in str(err.value) and expected[name] in str(err.value), name

    whole = tmp_path / "cache_deleted"  # the shard cache may go as a whole
    shutil.copytree(a, whole)
    shutil.rmtree(whole / "shards")
    load_item_embeddings(whole, expected_n_items=30)

    meta = json.loads((a / "embeddings.json").read_text())
    future = tmp_path / "future"
    shutil.copytree(a, future)
    (future / "embeddings.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(RetrievalInputError, match="format_version 99"):
        load_item_embeddings(future)


def test_embeddings_writer_refuses_a_foreign_folder(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("mine")
    with pytest.raises(RetrievalInputError, match="no embeddings.json"):
        write_item_embeddings(user, clustered(5, 4, 0), np.arange(5), embeddings_meta("a"))
    assert snapshot(user) == {"thesis.tex": hashlib.sha256(b"mine").hexdigest()}


def test_embeddings_full_disk_keeps_the_previous_output(small_tmpfs):
    disk = small_tmpfs(4 << 20)
    out = disk / "emb"
    write_item_embeddings(out, clustered(100, 16, 0), np.arange(100), embeddings_meta("a"))
    before = snapshot(out)
    fill(disk, 64 << 10)
    with pytest.raises(DiskFullError) as err:
        write_item_embeddings(out, clustered(20_000, 16, 1), np.arange(20_000), embeddings_meta("b"))
    assert "no space left" in str(err.value) and str(out) in str(err.value)
    assert snapshot(out) == before and no_temporaries(out)
    load_item_embeddings(out, expected_n_items=100)


# ----------------------------------------------------------------------------------------------------------
# FAISS index
# ----------------------------------------------------------------------------------------------------------


def _index(x: np.ndarray, emb_meta: dict, kind: str = "flat"):
    pca = fit_pca(x, min(8, x.shape[1]))
    index = build_index(to_index_space(pca, x), kind)
    return index, pca, make_sidecar(index, pca, {**emb_meta, "sha256": "e" * 64})


def test_index_save_interrupted_keeps_the_previous_index(tmp_path, monkeypatch):
    out = tmp_path / "index"
    save_index(out, *_index(clustered(300, 12, 0), embeddings_meta("a")))
    before = snapshot(out)
    old = load_index(out).vectors()

    real_save = index_mod.PCA.save

    def save_then_die(self, path):  # index.faiss is already written into the temporary folder
        real_save(self, path)
        raise Interrupted("killed after pca.npz")

    monkeypatch.setattr(index_mod.PCA, "save", save_then_die)
    with pytest.raises(Interrupted):
        save_index(out, *_index(clustered(500, 12, 1), embeddings_meta("b")))
    assert snapshot(out) == before and no_temporaries(out)
    np.testing.assert_array_equal(load_index(out).vectors(), old)


def test_index_reader_refuses_a_folder_that_differs_from_its_sidecar(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save_index(a, *_index(clustered(300, 12, 0), embeddings_meta("a")))
    save_index(b, *_index(clustered(300, 12, 1), embeddings_meta("b")))
    cases = {
        "index removed": (
            lambda d: (d / "index.faiss").unlink(),
            "index.faiss is listed in index.json but missing",
        ),
        "file added": (
            lambda d: (d / "old.faiss").write_bytes(b"x"),
            "old.faiss is in the folder but not listed",
        ),
        "sidecar of another run": (
            lambda d: shutil.copy2(b / "index.json", d / "index.json"),
            "index.faiss has another sha256",
        ),
        "index of another run": (
            lambda d: shutil.copy2(b / "index.faiss", d / "index.faiss"),
            "index.faiss has another sha256",
        ),
    }
    for name, d, message in damaged_copies(a, tmp_path, cases):
        with pytest.raises(RetrievalInputError) as err:
            load_index(d)
        assert str(d) in str(err.value) and message in str(err.value), name
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(RetrievalInputError, match="no index.json"):
        save_index(user, *_index(clustered(50, 12, 0), embeddings_meta("a")))
    assert (user / "notes.txt").read_text() == "mine"


def test_index_full_disk_keeps_the_previous_index(small_tmpfs):
    disk = small_tmpfs(4 << 20)
    out = disk / "index"
    save_index(out, *_index(clustered(200, 12, 0), embeddings_meta("a")))
    before = snapshot(out)
    fill(disk, 64 << 10)
    with pytest.raises(DiskFullError):
        save_index(out, *_index(clustered(20_000, 12, 1), embeddings_meta("b")))
    assert snapshot(out) == before and no_temporaries(out)
    load_index(out)


KILL_SCRIPT = """
import sys
import numpy as np
from reclora_ds.retrieval.index import build_index, make_sidecar, save_index
from reclora_ds.retrieval.index_space import fit_pca, to_index_space
x = np.random.default_rng(1).standard_normal((int(sys.argv[2]), 32)).astype(np.float32)
pca = fit_pca(x, 32)
index = build_index(to_index_space(pca, x), "flat")
print("writing", flush=True)
while True:
    save_index(sys.argv[1], index, pca, make_sidecar(index, pca, {"backbone": "b", "dataset": "d", "sha256": "e"}))
"""


@pytest.mark.slow
def test_index_kill_9_while_saving_leaves_a_loadable_index(tmp_path):
    """A real ``kill -9`` at several moments of a writer that saves an index over and over."""
    out = tmp_path / "index"
    save_index(out, *_index(clustered(300, 12, 0), embeddings_meta("a")))
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for delay in (0.0, 0.05, 0.2, 0.5):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(out), "200000"], stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        found = resolve_old(out)  # the index, or its .old twin when the kill fell between the two renames
        loaded = load_index(found)
        assert loaded.sidecar["count"] in (300, 200_000), delay


# ----------------------------------------------------------------------------------------------------------
# Retrieval folder
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def retrieval_setup(tmp_path_factory, ml_small_prepared):
    root = tmp_path_factory.mktemp("atomic_retrieval")
    data = root / "data"
    shutil.copytree(ml_small_prepared.output_dir, data)
    build_item_index(data, root, dim=16, components=8, noise=0.8)
    return {"root": root, "data": data, "index": root / "index"}


def test_retrieval_rerun_interrupted_keeps_the_previous_folder(tmp_path, retrieval_setup, monkeypatch):
    data, index = retrieval_setup["data"], retrieval_setup["index"]
    out = tmp_path / "ret"
    retrieve_histories(data, index, ks=(12, 4), out_dir=out)
    before = snapshot(out)
    old = load_retrieved(out, data)

    real = retriever_mod.retrieve_rows

    def half_then_die(*args, **kwargs):  # the engine fills the new arrays, then the process dies
        real(*args, **kwargs)
        raise Interrupted("killed after the rows were written")

    monkeypatch.setattr(retriever_mod, "retrieve_rows", half_then_die)
    with pytest.raises(Interrupted):
        retrieve_histories(data, index, ks=(20, 4), out_dir=out)
    monkeypatch.undo()
    assert snapshot(out) == before and no_temporaries(out)
    again = load_retrieved(out, data)
    assert again.ks == old.ks == (4, 12)
    np.testing.assert_array_equal(again.rows[12], old.rows[12])
    check_retrieval_folder(out, verify_sha256=True)

    def sidecar_then_die(*args, **kwargs):  # everything but the sidecar is written
        raise Interrupted("killed before retrieval.json")

    monkeypatch.setattr(retriever_mod, "write_sidecar", sidecar_then_die)
    with pytest.raises(Interrupted):
        retrieve_histories(data, index, ks=(20, 4), out_dir=out)
    assert snapshot(out) == before and no_temporaries(out)


def test_retrieval_folder_check_refuses_differences(tmp_path, retrieval_setup):
    data, index = retrieval_setup["data"], retrieval_setup["index"]
    a, b = tmp_path / "a", tmp_path / "b"
    retrieve_histories(data, index, ks=(12, 4), out_dir=a)
    retrieve_histories(data, None, ks=(12, 4), mode="recent", out_dir=b)
    cases = {
        "rows removed": (
            lambda d: (d / "rows_k4.npy").unlink(),
            "rows_k4.npy is listed in retrieval.json but missing",
        ),
        "rows added": (
            lambda d: np.save(d / "rows_k60.npy", np.zeros((2, 60), np.int32)),
            "rows_k60.npy is in the folder but not listed",
        ),
        "rows of another run": (
            lambda d: shutil.copy2(b / "rows_k12.npy", d / "rows_k12.npy"),
            "rows_k12.npy has another sha256",
        ),
        "sidecar of another run": (
            lambda d: shutil.copy2(b / "retrieval.json", d / "retrieval.json"),
            "has another sha256",
        ),
    }
    for name, d, message in damaged_copies(a, tmp_path, cases):
        with pytest.raises(RetrievalInputError) as err:
            check_retrieval_folder(d, verify_sha256=True)
        assert str(d) in str(err.value) and message in str(err.value), name
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(RetrievalInputError, match="no retrieval.json"):
        retrieve_histories(data, index, ks=(4,), out_dir=user)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]


def test_load_retrieved_refuses_an_unlisted_rows_file(tmp_path, retrieval_setup):
    out = tmp_path / "ret"
    retrieve_histories(retrieval_setup["data"], retrieval_setup["index"], ks=(12, 4), out_dir=out)
    np.save(out / "rows_k60.npy", np.zeros((2, 60), np.int32))
    with pytest.raises(ValueError, match="rows_k60.npy"):
        load_retrieved(out)


def test_retrieval_full_disk_keeps_the_previous_folder(small_tmpfs, retrieval_setup):
    data, index = retrieval_setup["data"], retrieval_setup["index"]
    disk = small_tmpfs(16 << 20)
    out = disk / "ret"
    retrieve_histories(data, index, ks=(4,), out_dir=out)
    before = snapshot(out)
    fill(disk, 256 << 10)
    with pytest.raises(DiskFullError):
        retrieve_histories(data, index, ks=(60, 10), out_dir=out)
    assert snapshot(out) == before and no_temporaries(out)
    check_retrieval_folder(out, verify_sha256=True)
    load_retrieved(out, data)


# ----------------------------------------------------------------------------------------------------------
# Synthetic ML-25M folder
# ----------------------------------------------------------------------------------------------------------

SMALL = SyntheticConfig(rows=12_000, users=150, items=700, seed=3, chunk_rows=4000)
OTHER = SyntheticConfig(rows=12_000, users=150, items=700, seed=4, chunk_rows=4000)


def test_synthetic_rerun_interrupted_keeps_the_previous_folder(tmp_path, monkeypatch):
    import reclora_ds.data.synthetic as synthetic

    out = write_synthetic_ml25m(tmp_path / "raw", SMALL).raw_dir
    before = snapshot(out)
    real, calls = synthetic._ratings, []

    def die_in_the_second_chunk(*args):  # movies.csv and the first chunk of ratings.csv are written
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted("killed in the middle of ratings.csv")
        return real(*args)

    monkeypatch.setattr(synthetic, "_ratings", die_in_the_second_chunk)
    with pytest.raises(Interrupted):
        write_synthetic_ml25m(out, OTHER)
    assert snapshot(out) == before and no_temporaries(out)
    assert existing_synthetic(out, SMALL) and not existing_synthetic(out, OTHER)
    check_synthetic(out)


def test_synthetic_check_refuses_differences(tmp_path):
    a = write_synthetic_ml25m(tmp_path / "a", SMALL).raw_dir
    b = write_synthetic_ml25m(tmp_path / "b", OTHER).raw_dir
    cases = {
        "movies removed": (
            lambda d: (d / "movies.csv").unlink(),
            "movies.csv is listed in synthetic.json but missing",
        ),
        "file added": (
            lambda d: (d / "tags.csv").write_text("x"),
            "tags.csv is in the folder but not listed",
        ),
        "manifest of another run": (
            lambda d: shutil.copy2(b / "synthetic.json", d / "synthetic.json"),
            "bytes, synthetic.json lists",
        ),
        "ratings cut short": (
            lambda d: os.truncate(d / "ratings.csv", (d / "ratings.csv").stat().st_size - 10),
            "ratings.csv has",
        ),
    }
    for name, d, message in damaged_copies(a, tmp_path, cases):
        with pytest.raises(SyntheticFolderError) as err:
            check_synthetic(d)
        assert str(d) in str(err.value) and message in str(err.value), name
        assert not existing_synthetic(d, SMALL)
    user = tmp_path / "user"
    user.mkdir()
    (user / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,1\n")
    with pytest.raises(SyntheticFolderError, match="no synthetic.json"):
        write_synthetic_ml25m(user, SMALL)
    assert (user / "ratings.csv").read_text().endswith("1,1,4.0,1\n")


def test_synthetic_full_disk_keeps_the_previous_folder(small_tmpfs):
    disk = small_tmpfs(2 << 20)
    out = write_synthetic_ml25m(disk / "raw", SMALL).raw_dir
    before = snapshot(out)
    fill(disk, 64 << 10)
    with pytest.raises(DiskFullError):
        write_synthetic_ml25m(out, OTHER)
    assert snapshot(out) == before and no_temporaries(out)
    assert existing_synthetic(out, SMALL)


SYNTHETIC_KILL_SCRIPT = """
import sys, time
from reclora_ds.data import synthetic
sample_chunk = synthetic._sample_chunk
calls = []
def pausing_sample_chunk(*args, **kwargs):  # stops for good before the third chunk: ratings.csv is half written
    calls.append(1)
    if len(calls) == 3:
        print("inside", flush=True)
        time.sleep(600)
    return sample_chunk(*args, **kwargs)
synthetic._sample_chunk = pausing_sample_chunk
synthetic.write_synthetic_ml25m(
    sys.argv[1], synthetic.SyntheticConfig(rows=400_000, users=4000, items=3000, seed=9, chunk_rows=20_000)
)
"""


@pytest.mark.slow
def test_synthetic_kill_9_while_writing_leaves_the_previous_folder(tmp_path):
    out = write_synthetic_ml25m(tmp_path / "raw", SMALL).raw_dir
    before = snapshot(out)
    script = tmp_path / "writer.py"
    script.write_text(SYNTHETIC_KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert (
        proc.stdout.readline().strip() == "inside"
    )  # the writer waits inside ratings.csv (not a timing guess)
    assert not no_temporaries(out)  # its temporary folder is there, half written
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert snapshot(out) == before
    assert existing_synthetic(out, SMALL)
    write_synthetic_ml25m(out, OTHER)  # the next write clears the dead writer's temporary
    assert no_temporaries(out) and existing_synthetic(out, OTHER)


def test_embeddings_shard_dir_inside_the_output_is_refused(tmp_path, dataset_dir, tiny_backbone):
    with pytest.raises(ValueError, match="lies inside the output folder"):
        _extract(dataset_dir, tmp_path / "emb", tiny_backbone, shard_dir=str(tmp_path / "emb" / "shards"))
    assert not (tmp_path / "emb").exists()
