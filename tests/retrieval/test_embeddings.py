"""Item embeddings: pooling, padding, post-norm states, sharded extraction, reruns, errors.

The backbone is a tiny random Llama (hidden 16, 1 layer) with a word-level tokenizer trained on the bundled
item descriptions, saved as an ordinary Hugging Face folder; the dataset is the bundled ml-latest-small.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from reclora_ds.backbone import BackboneError
from reclora_ds.config import ConfigError, load_config
from reclora_ds.retrieval.embeddings import (
    ItemEmbeddingConfig,
    embed_texts,
    extract_item_embeddings,
    extract_shard,
    load_backbone,
    mean_pool,
    merge_shards,
    read_inputs,
    shard_paths,
    work_shard_dir,
)
from tests.tiny_llm import tiny_llama, word_tokenizer

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "tools" / "extract_item_embeddings.py"
TOL = 1e-5


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def dataset_dir(ml_small_prepared) -> Path:
    return Path(ml_small_prepared.output_dir)


@pytest.fixture(scope="module")
def descriptions(dataset_dir) -> list[str]:
    items = pq.read_table(dataset_dir / "items.parquet")
    assert items.column("item_index").to_pylist() == list(range(items.num_rows))
    return items.column("description").to_pylist()


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory, descriptions) -> Path:
    """A 1-layer hidden-16 Llama + a word-level tokenizer adding BOS, padding on the LEFT by default."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = word_tokenizer(descriptions, chat_template=None, vocab_size=3000, padding_side="left")
    tokenizer.save_pretrained(folder)
    model = tiny_llama(
        tokenizer, hidden=16, layers=1, heads=2, kv_heads=1, max_positions=256, tie_word_embeddings=False
    )
    with torch.no_grad():  # a non-trivial final norm, so post-norm and pre-norm states differ visibly
        model.model.norm.weight.uniform_(0.5, 2.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_backbone):
    model, tokenizer = load_backbone(tiny_backbone, ItemEmbeddingConfig(dtype="float32"), torch.device("cpu"))
    return model, tokenizer


def quiet_config(backbone: Path, **kwargs) -> ItemEmbeddingConfig:
    return ItemEmbeddingConfig(backbone=str(backbone), show_progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------ pooling


def test_mean_pool_ignores_padding_left_and_right():
    torch.manual_seed(1)
    lengths = [3, 7, 1]
    hidden = torch.randn(3, 7, 5)
    reference = torch.stack([hidden[b, :n].double().mean(dim=0) for b, n in enumerate(lengths)]).float()
    for side in ("right", "left"):
        mask = torch.zeros(3, 7, dtype=torch.long)
        padded = hidden.clone()
        for b, n in enumerate(lengths):
            real = slice(0, n) if side == "right" else slice(7 - n, 7)
            mask[b, real] = 1
            padded[b, real] = hidden[b, :n]
        padded[mask == 0] = float("nan")  # padding must not leak, not even as NaN
        pooled = mean_pool(padded, mask)
        assert pooled.dtype == torch.float32
        torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no real token"):
        mean_pool(hidden[:1], torch.zeros(1, 7))


def test_text_alone_equals_text_in_padded_batch(tiny, descriptions):
    model, tokenizer = tiny
    by_length = sorted(descriptions[:500], key=len)
    short, long1, long2 = by_length[0], by_length[-1], by_length[-2]
    alone = embed_texts(model, tokenizer, [short])
    in_batch = embed_texts(model, tokenizer, [long1, short, long2], batch_size=3, bucket_by_length=False)
    np.testing.assert_allclose(in_batch[1], alone[0], rtol=0, atol=TOL)
    assert not np.allclose(in_batch[0], alone[0], atol=1e-3)  # a different text gives a different vector

    texts = descriptions[:64]
    bucketed = embed_texts(model, tokenizer, texts, batch_size=8, bucket_by_length=True)
    unbucketed = embed_texts(model, tokenizer, texts, batch_size=8, bucket_by_length=False)
    one_by_one = np.concatenate([embed_texts(model, tokenizer, [t]) for t in texts[:8]])
    assert bucketed.shape == (64, 16) and bucketed.dtype == np.float32
    np.testing.assert_allclose(bucketed, unbucketed, rtol=0, atol=TOL)
    np.testing.assert_allclose(bucketed[:8], one_by_one, rtol=0, atol=TOL)


def test_pooled_vector_is_mean_of_post_norm_last_hidden_state(tiny, descriptions):
    """Independent reference: capture the last decoder layer's output, apply the final norm by hand, average."""
    model, tokenizer = tiny
    text = descriptions[1]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # the tokenizer's special tokens are part of the pooled text
    captured = {}
    handle = model.model.layers[-1].register_forward_hook(
        lambda module, args, output: captured.update(
            pre_norm=output[0] if isinstance(output, tuple) else output
        )
    )
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        handle.remove()
    with torch.no_grad():
        pre_norm = captured["pre_norm"][0].double()  # [T, D]
        variance = pre_norm.pow(2).mean(dim=-1, keepdim=True)
        eps = model.config.rms_norm_eps
        post_norm = (
            model.model.norm.weight.double() * pre_norm / torch.sqrt(variance + eps)
        )  # RMSNorm by hand
        expected = sum(post_norm[t] for t in range(len(ids))) / len(ids)

    got = embed_texts(model, tokenizer, [text])[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=TOL)
    assert not np.allclose(got, pre_norm.mean(dim=0).numpy(), atol=1e-2)


# --------------------------------------------------------------------------------------- sharded extraction


@pytest.mark.distributed
def test_two_ranks_match_one_rank(tmp_path, tiny, tiny_backbone, dataset_dir, descriptions):
    from reclora_ds.retrieval.index import load_item_embeddings

    one = extract_item_embeddings(dataset_dir, tmp_path / "one", quiet_config(tiny_backbone, batch_size=64))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(CLI),
        "--dataset", str(dataset_dir), "--out", str(tmp_path / "two"), "--backbone", str(tiny_backbone),
        "batch_size=64", "show_progress=false",
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"embedded {len(descriptions):,} items x 16 dims on 2 rank(s)" in run.stdout

    two = tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == [
        "embeddings.json",
        "embeddings.npy",
        "item_ids.npy",
        "shards",
    ]
    assert not work_shard_dir(two).exists()  # the shards were moved into the output
    ranges = [json.loads(shard_paths(two / "shards", r, 2)[1].read_text()) for r in range(2)]
    assert [(m["start"], m["stop"]) for m in ranges] == [
        (0, ranges[0]["stop"]),
        (ranges[0]["stop"], len(descriptions)),
    ]

    n_items = len(descriptions)
    emb1, emb2 = (
        load_item_embeddings(one, n_items),
        load_item_embeddings(two, n_items),
    )  # the index's contract
    assert emb2.meta["world_size"] == 2 and emb1.meta["world_size"] == 1
    np.testing.assert_allclose(emb2.vectors, emb1.vectors, rtol=0, atol=TOL)

    items = pq.read_table(dataset_dir / "items.parquet")
    item_ids = np.load(two / "item_ids.npy")
    assert item_ids.dtype == np.int64
    np.testing.assert_array_equal(item_ids, items.column("item").to_numpy())
    model, tokenizer = tiny
    for i in (0, 1, ranges[0]["stop"] - 1, ranges[0]["stop"], n_items - 1):  # both sides of the shard border
        alone = embed_texts(model, tokenizer, [descriptions[i]])[0]
        np.testing.assert_allclose(emb2.vectors[i], alone, rtol=0, atol=TOL, err_msg=f"row {i}")


FAILING_RANK_SCRIPT = """
import sys
from reclora_ds.distributed import destroy, init_distributed
from reclora_ds.retrieval import embeddings

def fail_on_rank_1(inputs, shard_dir, config, rank, world_size, *args):
    if rank == 1:
        raise MemoryError("injected failure on rank 1")
    return real(inputs, shard_dir, config, rank, world_size, *args)

real, embeddings.extract_shard = embeddings.extract_shard, fail_on_rank_1
info = init_distributed(timeout_s=60)
config = embeddings.ItemEmbeddingConfig(backbone=sys.argv[3], limit_items=40, show_progress=False)
try:
    embeddings.extract_item_embeddings(sys.argv[1], sys.argv[2], config)
except Exception as exc:
    print(f"rank {info.rank} raised {type(exc).__name__}: {exc}", flush=True)
destroy()
"""


@pytest.mark.distributed
def test_a_failed_rank_makes_every_rank_raise(tmp_path, tiny_backbone, dataset_dir):
    """No rank waits for a dead one until the timeout, and nothing is merged."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK_SCRIPT)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    command += [str(dataset_dir), str(tmp_path / "out"), str(tiny_backbone)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "rank 1 raised MemoryError: injected failure on rank 1" in run.stdout
    assert "rank 0 raised RuntimeError: rank(s) [1] failed to embed their shards" in run.stdout
    work = work_shard_dir(tmp_path / "out")  # rank 0's work is kept for a rerun, beside the output
    assert shard_paths(work, 0, 2)[1].is_file()
    assert not (tmp_path / "out").exists()


def test_rerun_skips_finished_shards_and_recomputes_bad_ones(tmp_path, tiny_backbone, dataset_dir, caplog):
    """Two ranks simulated in one process: rank 0 then rank 1 write their shards, rank 0 merges."""
    config = quiet_config(tiny_backbone, limit_items=120, batch_size=16)
    inputs = read_inputs(dataset_dir, config)
    shards, out = tmp_path / "shards", tmp_path / "out"

    def run_both() -> list[bool]:
        computed = [extract_shard(inputs, shards, config, rank, 2) for rank in range(2)]
        merge_shards(inputs, shards, out, 2, config)
        return computed

    assert run_both() == [True, True]
    first = np.load(out / "embeddings.npy")
    assert first.shape == (120, 16)
    npy0, json0 = shard_paths(shards, 0, 2)
    npy1, json1 = shard_paths(shards, 1, 2)
    mtime0 = npy0.stat().st_mtime_ns

    npy1.unlink()
    json1.unlink()
    with caplog.at_level("INFO", logger="reclora_ds.retrieval.embeddings"):
        assert run_both() == [False, True]
    assert (
        "shard rank000-of-002.npy is complete" in caplog.text
        and "rank001-of-002.json is missing" in caplog.text
    )
    assert npy0.stat().st_mtime_ns == mtime0
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), first)

    with open(npy0, "r+b") as f:  # flip bytes inside the data: same size, wrong checksum
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    caplog.clear()
    with caplog.at_level("INFO", logger="reclora_ds.retrieval.embeddings"):
        assert run_both() == [True, False]
    assert "rank000-of-002.npy has sha256" in caplog.text
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), first)

    # Other inputs (max_length 4: every description truncated, BOS kept): both shards are redone.
    other = quiet_config(tiny_backbone, limit_items=120, batch_size=16, max_length=4)
    other_inputs = read_inputs(dataset_dir, other)
    assert [extract_shard(other_inputs, shards, other, rank, 2) for rank in range(2)] == [True, True]
    assert sum(json.loads(shard_paths(shards, r, 2)[1].read_text())["n_truncated"] for r in range(2)) == 120
    with pytest.raises(RuntimeError, match="not valid"):  # the merge refuses shards of other inputs
        merge_shards(inputs, shards, out, 2, config)


# ------------------------------------------------------------------------------------------------- errors


def _cli_main():
    spec = importlib.util.spec_from_file_location("extract_item_embeddings_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_missing_dataset_or_backbone_is_a_clear_error(tmp_path, tiny_backbone, dataset_dir, capsys):
    missing_dataset, missing_backbone = tmp_path / "no_dataset", tmp_path / "no_backbone"
    with pytest.raises(FileNotFoundError, match=str(missing_dataset)):
        extract_item_embeddings(missing_dataset, tmp_path / "out", quiet_config(tiny_backbone))
    with pytest.raises(BackboneError, match=str(missing_backbone)):
        extract_item_embeddings(dataset_dir, tmp_path / "out", quiet_config(missing_backbone))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        extract_item_embeddings(tmp_path / "empty", tmp_path / "out", quiet_config(tiny_backbone))

    main = _cli_main()
    assert main(["--dataset", str(missing_dataset), "--out", str(tmp_path / "out")]) == 2
    assert f"error: processed dataset directory {missing_dataset}" in capsys.readouterr().err
    assert (
        main(
            [
                "--dataset",
                str(dataset_dir),
                "--out",
                str(tmp_path / "out"),
                "--backbone",
                str(missing_backbone),
            ]
        )
        == 2
    )
    assert str(missing_backbone) in capsys.readouterr().err
    assert main(["--dataset", str(dataset_dir), "--out", str(tmp_path / "out"), "batch_sise=4"]) == 2
    assert "unknown key 'batch_sise'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_checks(tiny_backbone):
    with pytest.raises(ValueError, match="dtype"):
        ItemEmbeddingConfig(dtype="float16")
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        load_config(ItemEmbeddingConfig, None, ["batch_size=0"])
    assert load_config(ItemEmbeddingConfig, None, ["limit_items=10", "dtype=bfloat16"]).limit_items == 10
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match="bitsandbytes is not installed"):
            load_backbone(tiny_backbone, ItemEmbeddingConfig(load_in_8bit=True), torch.device("cpu"))
