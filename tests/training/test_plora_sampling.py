"""Which samples stage 2 trains on: the nested ``few_shot_size`` subsets and length-grouped micro-batches.

* ``nested_sample_ids``: a prefix of one seeded permutation (checked against a hand-written draw), nested
  across sizes, independent of the number of ranks (the loaders of 1 and 2 ranks read exactly the subset);
  ``uniform_sample_ids`` (the evaluation subsets) is shown not to be nested, which is why it is not reused;
* length grouping: per epoch, the multiset of sample ids of every rank is the one without grouping, the
  ranks' union is the epoch, micro-batches pad less, and a resume mid-epoch continues the same sequence.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from reclora_ds.data.loader import split_sample_ids, uniform_sample_ids
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.data.prompts import PromptEncoder
from reclora_ds.training.plora_data import PLoRABatchLoader, nested_sample_ids

CRM_HISTORY = 20  # the plora_assets CRM's history length (tests/conftest.py)


@pytest.fixture(scope="module")
def dataset(plora_assets) -> ProcessedDataset:
    return ProcessedDataset(plora_assets["data_dir"])


@pytest.fixture(scope="module")
def encoder(plora_assets) -> PromptEncoder:
    return PromptEncoder(AutoTokenizer.from_pretrained(plora_assets["backbone"]), "ml-1m")


def loader(dataset, encoder, *, rank=0, world=1, group=0, ids=None, batch=8, **kwargs) -> PLoRABatchLoader:
    settings = {"shuffle": True, "seed": 5, "drop_last": True} | kwargs
    return PLoRABatchLoader(
        dataset, "fewshot", batch, encoder, history_length=CRM_HISTORY, rank=rank, world_size=world,
        sample_ids=ids, length_group_size=group, short_history_length=3, **settings,
    )  # fmt: skip


def epoch_ids(ld: PLoRABatchLoader, epoch: int = 0) -> list[int]:
    ld.set_epoch(epoch)
    return [int(s) for batch in ld for s in batch["sample_id"]]


def padding_fraction(ld: PLoRABatchLoader) -> float:
    pad = total = 0
    for batch in ld:
        mask = batch["attention_mask"]
        pad += int((mask == 0).sum())
        total += mask.numel()
    return pad / total


def test_few_shot_subsets_are_nested_uniform_draws_independent_of_ranks(dataset, encoder):
    ids = split_sample_ids(dataset, "fewshot")
    perm = np.random.default_rng(7).permutation(len(ids))  # the draw, written out
    subsets = {n: nested_sample_ids(dataset, "fewshot", n, seed=7) for n in (64, 128, 512)}
    for n, subset in subsets.items():
        np.testing.assert_array_equal(subset, np.sort(ids[perm[:n]]))
    assert set(subsets[64]) < set(subsets[128]) < set(subsets[512]) <= set(ids)
    assert set(nested_sample_ids(dataset, "fewshot", 64, seed=8)) != set(subsets[64])
    np.testing.assert_array_equal(nested_sample_ids(dataset, "fewshot", 10**6, seed=7), ids)
    with pytest.raises(ValueError, match="n must be >= 1"):
        nested_sample_ids(dataset, "fewshot", 0, seed=7)
    # the evaluation subsets' draw is not nested across sizes: it could not serve Fig. 6
    small, large = (set(uniform_sample_ids(dataset, "fewshot", n, 7)) for n in (64, 128))
    assert not small <= large

    # the loaders of 1 and 2 ranks train on exactly the subset (no drop_last: nothing is cut)
    subset = subsets[128]
    one = epoch_ids(loader(dataset, encoder, ids=subset, drop_last=False, even_batches=False))
    two = [
        epoch_ids(loader(dataset, encoder, rank=r, world=2, ids=subset, drop_last=False, even_batches=False))
        for r in (0, 1)
    ]
    assert sorted(one) == sorted(two[0] + two[1]) == subset.tolist()
    assert not set(two[0]) & set(two[1])


@pytest.mark.parametrize("world", [1, 2])
def test_length_grouping_visits_the_same_samples_and_pads_less(dataset, encoder, world):
    for epoch in (0, 1):
        union = []
        for rank in range(world):
            plain = epoch_ids(loader(dataset, encoder, rank=rank, world=world), epoch)
            grouped = epoch_ids(loader(dataset, encoder, rank=rank, world=world, group=4), epoch)
            assert Counter(grouped) == Counter(plain)  # the same multiset of samples on this rank
            assert grouped != plain  # but another order
            # each window of 4 micro-batches holds the samples it held without grouping
            for start in range(0, len(plain) - 32 + 1, 32):
                assert sorted(grouped[start : start + 32]) == sorted(plain[start : start + 32])
            union += grouped
        # the ranks' union is the epoch: every drop_last-kept sample once (even batches, no padding here)
        rows = len(split_sample_ids(dataset, "fewshot"))
        assert len(union) == len(set(union)) == rows // (8 * world) * 8 * world

    plain = padding_fraction(loader(dataset, encoder, world=world))
    grouped = padding_fraction(loader(dataset, encoder, world=world, group=8))
    print(f"world {world}: padding fraction {plain:.3f} without grouping, {grouped:.3f} with 8-batch groups")
    assert grouped < plain


def test_length_grouping_resumes_mid_window(dataset, encoder):
    first = loader(dataset, encoder, group=4)
    first.set_epoch(1)
    iterator = iter(first)
    for _ in range(6):  # inside the second window of 4 micro-batches
        next(iterator)
    state = first.state_dict()
    rest = list(iterator)
    again = loader(dataset, encoder, group=4)
    again.load_state_dict(state)
    resumed = list(again)
    assert len(resumed) == len(rest) > 0
    for a, b in zip(rest, resumed):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="length_group_size must be >= 0"):
        loader(dataset, encoder, group=-1)
