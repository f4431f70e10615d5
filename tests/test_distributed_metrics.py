"""Metrics against sklearn and plain-Python references; a real 2-process gloo job for the gather helpers.

Run as a script (``python tests/test_distributed_metrics.py`` with RANK/WORLD_SIZE/... set) this file is
the worker of :func:`test_two_process_gloo`, which starts two of them like a launcher would.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from reclora_ds import distributed as D
from reclora_ds.metrics import (
    auc,
    calibration_ratio,
    evaluate_predictions,
    expected_calibration_error,
    expert_usage,
    gate_entropy,
    gather_predictions,
    group_auc,
    log_loss,
)
from tests.launch import LAUNCH_VARS, clean_env

# ----------------------------------------------------------------------------------------------------------
# Single-process metrics
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) + 0.3 * labels, 1)  # one decimal: many ties, across classes too
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auc(labels, np.zeros(500)) == pytest.approx(0.5)  # all tied
    assert auc(torch.tensor(labels), torch.tensor(scores)) == pytest.approx(roc_auc_score(labels, scores))


def test_auc_single_class_is_nan():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.5, 0.9]))


def test_log_loss_equals_sklearn_and_clips():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    probs = rng.uniform(0.01, 0.99, 300)
    assert log_loss(labels, probs) == pytest.approx(sk_log_loss(labels, probs), rel=1e-12)
    assert log_loss([1, 0], [0.0, 1.0], eps=1e-7) == pytest.approx(-math.log(1e-7))


def reference_gauc(users, labels, scores):
    """Plain Python: per-user sklearn AUC, weighted by the user's sample count, users with both classes."""
    by_user = {}
    for u, y, s in zip(users.tolist(), labels.tolist(), scores.tolist()):
        by_user.setdefault(u, ([], []))
        by_user[u][0].append(y)
        by_user[u][1].append(s)
    num = den = 0.0
    for ys, ss in by_user.values():
        if 0 < sum(ys) < len(ys):
            num += len(ys) * roc_auc_score(ys, ss)
            den += len(ys)
    return num / den


def test_group_auc_equals_per_user_loop():
    rng = np.random.default_rng(4)
    n = 2000
    users = rng.integers(0, 60, n) * 7 + 3  # sparse raw ids
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.random(n) + 0.2 * labels, 1)
    single = rng.integers(0, 2, 5)  # a user with one class only is left out
    users = np.concatenate([users, np.full(5, 10_000)])
    labels = np.concatenate([labels, np.ones(5, dtype=labels.dtype)])
    scores = np.concatenate([scores, single.astype(float)])
    assert group_auc(users, labels, scores) == pytest.approx(reference_gauc(users, labels, scores), abs=1e-12)


def test_ece_and_calibration_hand_checked():
    labels = [0, 1, 1, 0]
    probs = [0.1, 0.2, 0.8, 0.9]
    # 2 bins: [0, .5) holds .1, .2 (mean .15, rate .5); [.5, 1] holds .8, .9 (mean .85, rate .5)
    # ECE = 2/4 * |.5 - .15| + 2/4 * |.5 - .85| = .35
    assert expected_calibration_error(labels, probs, n_bins=2) == pytest.approx(0.35)
    assert calibration_ratio(labels, probs) == pytest.approx(1.0)
    # p = 1.0 belongs to the last bin; a perfectly calibrated bin contributes 0
    assert expected_calibration_error([1, 1, 0, 0], [1.0, 1.0, 0.0, 0.0], n_bins=15) == pytest.approx(0.0)
    assert calibration_ratio([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(2.0)


def test_gate_statistics():
    n = 4
    uniform = torch.full((3, n), 1.0 / n)
    one_hot = torch.eye(n)[[0, 0, 2]]
    assert gate_entropy(uniform).item() == pytest.approx(math.log(n))
    assert gate_entropy(one_hot).item() == pytest.approx(0.0)
    assert expert_usage(one_hot).tolist() == pytest.approx([2 / 3, 0.0, 1 / 3, 0.0])


def test_gather_dedups_by_sample_id_without_group():
    pred = gather_predictions([1, 0, 1, 0], [0.9, 0.2, 0.9, 0.4], [7, 8, 7, 9], [30, 10, 30, 20])
    assert pred.sample_ids.tolist() == [10, 20, 30]
    assert pred.labels.tolist() == [0, 0, 1]
    assert pred.users.tolist() == [8, 9, 7]
    with pytest.raises(ValueError, match="different labels"):
        gather_predictions([1, 0], [0.5, 0.5], [1, 1], [5, 5])


def test_dist_info_defaults_and_env(monkeypatch):
    assert D.dist_info() == D.DistInfo(rank=0, local_rank=0, world_size=1)
    assert D.init_distributed() == D.DistInfo()
    assert not torch.distributed.is_initialized()
    assert D.is_main_process()
    assert D.main_process_only(lambda: "written")() == "written"
    D.barrier()  # no-op without a group
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert D.dist_info() == D.DistInfo(rank=1, local_rank=1, world_size=2)
    assert not D.is_main_process()
    assert D.main_process_only(lambda: "written")() is None
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        D.init_distributed()  # WORLD_SIZE 2 without a rendezvous


def test_single_process_group_without_launcher(monkeypatch):
    """What DeepSpeed needs in a plain ``python`` run: a 1-rank group and the launcher variables."""
    for name in LAUNCH_VARS:
        monkeypatch.setenv(name, "")  # recorded, so that the variables set below are removed afterwards
        monkeypatch.delenv(name)
    try:
        info = D.init_distributed("gloo", single_process_group=True)
        assert info == D.DistInfo() and torch.distributed.get_world_size() == 1
        assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_ADDR"] == "127.0.0.1"
        assert D.init_distributed() == info  # idempotent
        part = torch.arange(3)
        assert D.all_gather_variable(part) is part
        assert gather_predictions([1, 0], [0.7, 0.1], [1, 1], [4, 3]).sample_ids.tolist() == [3, 4]
    finally:
        D.destroy()
    assert not torch.distributed.is_initialized()


# ----------------------------------------------------------------------------------------------------------
# Two real processes (gloo)
# ----------------------------------------------------------------------------------------------------------


def split_predictions(seed: int = 5, n: int = 100, cut: int = 37):
    """A split's predictions, cut unevenly between two ranks; rank 1 repeats two samples (loader padding)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(np.float64)
    probs = np.clip(np.round(0.35 * labels + 0.65 * rng.random(n), 2), 0.0, 1.0)
    users = rng.integers(0, 9, n)
    ids = rng.permutation(n) + 1000
    parts = [np.arange(cut), np.concatenate([np.arange(cut, n), [cut, cut + 1]])]
    return (labels, probs, users, ids), parts


def _worker() -> None:
    info = D.init_distributed()
    assert info == D.DistInfo(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), 2)
    assert torch.distributed.get_backend() == "gloo"
    rank = info.rank

    # unequal lengths, 1-D and 2-D, an empty part, bools
    part = torch.arange(3) if rank == 0 else torch.arange(5) + 10
    assert D.all_gather_variable(part).tolist() == [0, 1, 2, 10, 11, 12, 13, 14]
    part2 = torch.full((1 + 2 * rank, 2), float(rank))
    assert D.all_gather_variable(part2).tolist() == [[0.0, 0.0]] + [[1.0, 1.0]] * 3
    empty = torch.zeros(0, dtype=torch.int64) if rank == 0 else torch.tensor([7])
    assert D.all_gather_variable(empty).tolist() == [7]
    flags = torch.tensor([True]) if rank == 0 else torch.tensor([False, True])
    assert D.all_gather_variable(flags).tolist() == [True, False, True]
    assert D.broadcast_object({"from": rank}) == {"from": 0}

    # per-rank AUCs are 1.0 each, the split's AUC is 3/4: averaging ranks is wrong
    labels, scores = ([0, 1], [0.1, 0.2]) if rank == 0 else ([0, 1], [0.8, 0.9])
    assert auc(labels, scores) == 1.0
    gathered = evaluate_predictions(labels, scores, [rank, rank], [2 * rank, 2 * rank + 1])
    assert gathered["auc"] == 0.75 and gathered["n"] == 4

    # gathered metrics over uneven, padded parts == single-process metrics over the whole split
    (labels, probs, users, ids), parts = split_predictions()
    mine = parts[rank]
    got = evaluate_predictions(labels[mine], probs[mine], users[mine], torch.from_numpy(ids[mine]))
    want = evaluate_predictions(labels, probs, users, gather=False)
    with pytest.raises(ValueError, match="sample_ids"):
        evaluate_predictions(labels, probs, users)  # across ranks without ids: refused
    assert got["n"] == want["n"] == len(labels)
    for key in ("auc", "logloss", "gauc", "ece", "calibration"):
        assert math.isclose(got[key], want[key], rel_tol=1e-12), (key, got[key], want[key])
    per_rank_mean = np.mean([auc(labels[p], probs[p]) for p in parts])
    assert abs(per_rank_mean - want["auc"]) > 1e-3
    with_ids = gather_predictions(labels[mine], probs[mine], users[mine], ids[mine])
    assert with_ids.sample_ids.tolist() == sorted(ids.tolist())

    D.barrier()
    D.destroy()


@pytest.mark.distributed
def test_two_process_gloo(tmp_path):
    """Two processes started like a launcher does (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    port = D.free_port()
    procs = []
    for rank in range(2):
        env = clean_env() | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU even on a GPU machine
        }
        log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 - closed after wait
        procs.append((subprocess.Popen([sys.executable, __file__], env=env, stdout=log, stderr=log), log))
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=120))
        finally:
            log.close()
            if proc.poll() is None:
                proc.kill()
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text() for r in range(2))
    assert codes == [0, 0], logs


if __name__ == "__main__":
    _worker()
