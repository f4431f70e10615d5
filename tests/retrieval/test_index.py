"""Embeddings contract, PCA, exact index-space scores, FAISS kinds and recall, sidecar checks, the id map."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.retrieval.errors import RetrievalInputError
from reclora_ds.retrieval.index import (
    DEFAULT_INDEX_KIND,
    build_index,
    gpu_available,
    index_vectors,
    load_index,
    load_item_embeddings,
    make_sidecar,
    raw_item_ids,
    recall_at_k,
    save_index,
)
from reclora_ds.retrieval.index_space import fit_pca, on_score_grid, snap_unit_rows, to_index_space


def clustered(n: int, d: int, seed: int = 0, clusters: int = 64, spread: float = 0.35) -> np.ndarray:
    """A Gaussian mixture, like real item embeddings (approximate recall is meaningless on uniform noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d))
    return (centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d))).astype(np.float32)


def write_embeddings(directory: Path, x: np.ndarray, dataset: str = "ds", **overrides) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "embeddings.npy", x)
    sha = hashlib.sha256((directory / "embeddings.npy").read_bytes()).hexdigest()
    meta = {"n_items": x.shape[0], "dim": x.shape[1], "backbone": "test", "sha256": sha, "dataset": dataset}
    (directory / "embeddings.json").write_text(json.dumps({**meta, **overrides}))
    return directory


# ----------------------------------------------------------------------------------------------------------
# Embeddings contract
# ----------------------------------------------------------------------------------------------------------


def test_load_item_embeddings_validates(tmp_path):
    x = clustered(50, 8)
    d = write_embeddings(tmp_path / "ok", x)
    emb = load_item_embeddings(d, expected_n_items=50)
    np.testing.assert_array_equal(emb.vectors, x)
    assert emb.sha256 == hashlib.sha256((d / "embeddings.npy").read_bytes()).hexdigest()

    with pytest.raises(RetrievalInputError, match="processed dataset has 49 items"):
        load_item_embeddings(d, expected_n_items=49)
    no_json = write_embeddings(tmp_path / "nojson", x)
    (no_json / "embeddings.json").unlink()
    with pytest.raises(RetrievalInputError, match=r"embeddings.json: missing"):
        load_item_embeddings(no_json)
    with pytest.raises(RetrievalInputError, match="does not match"):
        load_item_embeddings(write_embeddings(tmp_path / "badsha", x, sha256="0" * 64))
    with pytest.raises(RetrievalInputError, match="n_items=51"):
        load_item_embeddings(write_embeddings(tmp_path / "badshape", x, n_items=51))
    with pytest.raises(RetrievalInputError, match=r"missing keys \['backbone'\]"):
        d2 = write_embeddings(tmp_path / "nokey", x)
        meta = json.loads((d2 / "embeddings.json").read_text())
        del meta["backbone"]
        (d2 / "embeddings.json").write_text(json.dumps(meta))
        load_item_embeddings(d2)
    with pytest.raises(RetrievalInputError, match="float32"):
        load_item_embeddings(write_embeddings(tmp_path / "f64", x.astype(np.float64)))
    bad = x.copy()
    bad[7, 3] = np.nan
    with pytest.raises(RetrievalInputError, match="row 7"):
        load_item_embeddings(write_embeddings(tmp_path / "nan", bad))


# ----------------------------------------------------------------------------------------------------------
# PCA and the index space
# ----------------------------------------------------------------------------------------------------------


def test_pca_matches_sklearn_and_is_deterministic():
    from sklearn.decomposition import PCA as SkPCA

    x = clustered(400, 24, seed=1)
    pca = fit_pca(x, n_components=10)
    ref = SkPCA(n_components=10, svd_solver="full").fit(x.astype(np.float64))
    np.testing.assert_allclose(pca.explained_variance, ref.explained_variance_, rtol=1e-9)
    np.testing.assert_allclose(pca.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-9)
    # same axes up to sign, hence the same projections up to sign
    signs = np.sign((pca.components * ref.components_).sum(axis=1))
    np.testing.assert_allclose(pca.components, ref.components_ * signs[:, None], atol=1e-9)
    np.testing.assert_allclose(pca.transform(x), ref.transform(x.astype(np.float64)) * signs, atol=1e-6)
    again = fit_pca(x.copy(), n_components=10)
    assert np.array_equal(again.components, pca.components) and np.array_equal(again.mean, pca.mean)
    assert fit_pca(x[:5], n_components=512).n_components == 5  # capped by n
    assert fit_pca(x, n_components=512).n_components == 24  # capped by d


def test_index_space_is_unit_cosine_and_scores_are_exact():
    x = clustered(300, 40, seed=2)
    pca = fit_pca(x, 32)
    y = pca.transform(x)
    v = to_index_space(pca, x)
    assert v.dtype == np.float32 and v.shape == (300, 32) and on_score_grid(v)
    norms = np.linalg.norm(v.astype(np.float64), axis=1)
    assert (norms <= 1).all() and (norms > 1 - 1e-3).all()
    unit = y / np.linalg.norm(y, axis=1, keepdims=True)
    np.testing.assert_allclose(v.astype(np.float64) @ v.T.astype(np.float64), unit @ unit.T, atol=2e-3)
    # float32 BLAS (any blocking), FAISS and exact float64 give identical bits
    exact = v.astype(np.float64) @ v.astype(np.float64).T
    assert np.array_equal((v @ v.T).astype(np.float64), exact)
    assert np.array_equal((v[:7] @ v[100:].T).astype(np.float64), exact[:7, 100:])
    dist, ids = build_index(v, "flat").search(v[:5], 10)
    assert np.array_equal(dist.astype(np.float64), exact[np.arange(5)[:, None], ids])
    assert not on_score_grid(unit.astype(np.float32))
    # rows whose rounding would leave the unit ball are shrunk; zero rows stay zero
    tricky = snap_unit_rows(np.vstack([np.ones((1, 512)), np.zeros((1, 512))]))
    assert (tricky[0] ** 2).astype(np.float64).sum() <= 1 and not tricky[1].any()


# ----------------------------------------------------------------------------------------------------------
# FAISS indexes
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def realistic_vectors():
    x = clustered(20_000, 128, seed=3, clusters=200, spread=1.0)  # overlapping clusters
    return to_index_space(fit_pca(x, 64), x)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_recall_on_clustered_vectors(realistic_vectors, kind):
    v = realistic_vectors
    flat = build_index(v, "flat")
    queries = v[np.random.default_rng(0).choice(len(v), 300, replace=False)]
    recall = recall_at_k(build_index(v, kind), flat, queries, 60)
    print(f"{kind} recall@60 on 20k clustered 64-d vectors: {recall:.4f}")
    assert recall >= 0.95


def test_default_kind_reaches_recall_and_flat_is_exact(realistic_vectors):
    v = realistic_vectors[:5000]
    flat = build_index(v, "flat")
    assert recall_at_k(flat, flat, v[:100], 60) == 1.0
    assert recall_at_k(build_index(v), flat, v[:200], 60) >= 0.95
    assert DEFAULT_INDEX_KIND in ("hnsw", "ivf")  # the default is approximate: the assertion above matters


def test_build_index_defaults_and_errors():
    v = to_index_space(fit_pca(clustered(2000, 16), 16), clustered(2000, 16))
    hnsw = build_index(v, "hnsw")
    assert hnsw.hnsw.efSearch == 128 and hnsw.hnsw.nb_neighbors(1) == 32
    ivf = faiss.extract_index_ivf(build_index(v, "ivf"))
    assert ivf.nlist == min(round(4 * np.sqrt(2000)), 2000 // 39) and ivf.nprobe == 32
    for kind in ("flat", "hnsw", "ivf"):
        assert np.array_equal(index_vectors(build_index(v, kind)), v)  # the index serves the vectors
    with pytest.raises(ValueError, match="unknown hnsw index parameters"):
        build_index(v, "hnsw", nprobe=3)
    with pytest.raises(ValueError, match="index kind"):
        build_index(v, "lsh")


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="FAISS sees no GPU")
def test_gpu_flat_matches_cpu(realistic_vectors):
    v = realistic_vectors
    d_cpu, i_cpu = build_index(v, "flat").search(v[:50], 60)
    d_gpu, i_gpu = build_index(v, "flat", use_gpu=True).search(v[:50], 60)
    np.testing.assert_array_equal(d_gpu, d_cpu)  # exact scores on any device (no TF32)
    assert recall_at_k(build_index(v, "ivf", use_gpu=True), build_index(v, "flat"), v[:200], 60) >= 0.95


# ----------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------


def _saved(tmp_path: Path, x: np.ndarray, kind: str = "hnsw") -> tuple[Path, str]:
    emb = load_item_embeddings(write_embeddings(tmp_path / "emb", x))
    pca = fit_pca(emb.vectors, 16)
    index = build_index(to_index_space(pca, emb.vectors), kind)
    save_index(tmp_path / "index", index, pca, make_sidecar(index, pca, emb.meta))
    return tmp_path / "index", emb.sha256


def test_save_load_roundtrip_and_sidecar(tmp_path):
    x = clustered(800, 24, seed=4)
    d, sha = _saved(tmp_path, x)
    assert sorted(p.name for p in d.iterdir()) == ["index.faiss", "index.json", "pca.npz"]  # no temporaries
    side = json.loads((d / "index.json").read_text())
    assert (
        side["kind"] == "hnsw" and side["metric"] == "ip" and side["count"] == 800 and side["dimension"] == 16
    )
    assert side["pca"]["n_components"] == 16 and 0 < side["pca"]["explained_variance_ratio_sum"] <= 1
    assert side["embeddings"]["sha256"] == sha and "item_index" in side["item_map"]["rule"]
    loaded = load_index(d, expected_embeddings_sha256=sha)
    assert loaded.index.hnsw.efSearch == 128
    np.testing.assert_array_equal(loaded.vectors(), to_index_space(loaded.pca, x))


def test_load_index_rejects_other_embeddings_and_damaged_files(tmp_path):
    d, sha = _saved(tmp_path, clustered(500, 24, seed=5), kind="flat")
    other = "f" * 64
    with pytest.raises(RetrievalInputError) as err:
        load_index(d, expected_embeddings_sha256=other)
    assert sha in str(err.value) and other in str(err.value)

    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    pca = dict(np.load(broken / "pca.npz"))
    np.savez(broken / "pca.npz", **{**pca, "mean": pca["mean"] + 1})  # a pca.npz from another run
    with pytest.raises(RetrievalInputError, match="pca.npz has another sha256 than index.json lists"):
        load_index(broken)

    wrong_count = tmp_path / "count"
    shutil.copytree(d, wrong_count)
    side = json.loads((wrong_count / "index.json").read_text())
    (wrong_count / "index.json").write_text(json.dumps({**side, "count": 499}))
    with pytest.raises(RetrievalInputError, match="holds 500 vectors, sidecar count 499"):
        load_index(wrong_count)
    with pytest.raises(RetrievalInputError, match="index.json: missing"):
        load_index(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------------
# Ids: FAISS id = item_index (0-based row), raw ids only through items.parquet
# ----------------------------------------------------------------------------------------------------------


def test_ids_are_item_index_rows_and_raw_ids_go_through_items_parquet(ml_small_prepared, ml_small_dir):
    ds = ProcessedDataset(ml_small_prepared.output_dir)
    n = ds.items.num_rows
    rng = np.random.default_rng(6)
    # row i gets a distinctive vector: a one-hot spike in its own coordinate pair plus small noise
    d = 64
    x = 0.05 * rng.standard_normal((n, d))
    x[np.arange(n), np.arange(n) % d] += 1.0
    x[np.arange(n), (np.arange(n) * 7 + 3) % d] += 0.5 + (np.arange(n) % 97) / 97
    v = snap_unit_rows(x)
    index = build_index(v, "flat")
    queries = np.array([0, 1, 2, 500, n // 2, n - 1])
    _, ids = index.search(v[queries], 1)
    assert ids[:, 0].tolist() == queries.tolist()  # searching item_index j returns j itself first

    raw = raw_item_ids(ds.items, ids[:, 0])
    with open(ml_small_dir / "movies.csv", newline="") as f:
        titles = {int(r["movieId"]): r["title"] for r in csv.DictReader(f)}
    parquet_titles = ds.items.column("title").to_pylist()
    for j, movie_id in zip(queries, raw):
        assert titles[int(movie_id)] == parquet_titles[j]  # the raw id names the same movie as row j
    # the predecessor's bug: treating row j as movieId j + 1 names another movie for most rows
    assert all(titles.get(int(j) + 1) != parquet_titles[j] for j in (500, n // 2, n - 1))
    assert (raw_item_ids(ds.items, np.arange(n)) != np.arange(n) + 1).mean() > 0.9
    assert raw_item_ids(ds.items, np.array([-1, 0]))[0] == -1


def test_build_cli(tmp_path, capsys, ml_small_prepared):
    import runpy

    main = runpy.run_path(
        str(Path(__file__).resolve().parents[2] / "tools" / "build_faiss_index.py"), run_name="cli"
    )["main"]
    emb = write_embeddings(tmp_path / "emb", clustered(400, 24, seed=7))
    out = tmp_path / "index"
    assert (
        main(["--embeddings", str(emb), "--out", str(out), "--pca-components", "16", "--param", "M=16"]) == 0
    )
    printed = capsys.readouterr().out
    assert "built hnsw index" in printed and "recall@60 vs exact" in printed
    assert load_index(out).sidecar["params"]["M"] == 16
    assert (
        main(["--embeddings", str(emb), "--out", str(out), "--processed", str(ml_small_prepared.output_dir)])
        == 2
    )
    assert "has 9724 items" in capsys.readouterr().err
    assert main(["--embeddings", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "embeddings.npy: missing" in capsys.readouterr().err
