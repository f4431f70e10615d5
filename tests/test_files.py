"""The one file-I/O module (reclora_ds.files): atomic files and folders, unique temporary names, stale
temporaries, checksums against hashlib, fingerprints, versioned sidecars."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from reclora_ds import files


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out.json"
    files.write_json_atomic(path, {"a": 1})
    with pytest.raises(RuntimeError), files.atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed while writing")
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary left


def test_temporary_names_are_unique_per_writer(tmp_path):
    names = {files.temporary_sibling(tmp_path / "x.bin").name for _ in range(100)}
    assert len(names) == 100 and all(n.startswith(".x.bin.tmp-") for n in names)


def test_atomic_dir_keeps_a_complete_folder_and_clears_a_dead_writers_temporary(tmp_path):
    target = tmp_path / "last"
    with files.atomic_dir(target) as tmp:
        (tmp / "crm.json").write_text("one")
    with pytest.raises(RuntimeError), files.atomic_dir(target) as tmp:
        (tmp / "crm.json").write_text("half")
        raise RuntimeError("killed while writing")
    assert (target / "crm.json").read_text() == "one"
    # a writer killed with -9 leaves its temporary folder; the next atomic_dir removes it
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".last.tmp-{int(dead.stdout)}-deadbeef"
    stale.mkdir()
    alive = tmp_path / f".last.tmp-{os.getpid()}-0000beef"  # a live writer's is kept
    alive.mkdir()
    with files.atomic_dir(target) as tmp:
        (tmp / "crm.json").write_text("two")
    assert (target / "crm.json").read_text() == "two"
    assert not stale.exists() and alive.exists()


def test_checksums_and_npy(tmp_path):
    data = np.random.default_rng(0).standard_normal((300, 7)).astype(np.float32)
    path = tmp_path / "a.npy"
    digest = files.save_npy_atomic(path, data)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == files.sha256_file(path)
    seen = []
    files.sha256_file(path, seen.append)
    assert sum(seen) == path.stat().st_size
    np.testing.assert_array_equal(np.load(path), data)


def test_fingerprint_follows_names_sizes_and_mtimes(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("1,2\n")
    before = files.files_fingerprint(tmp_path, [a])
    assert files.files_fingerprint(tmp_path, [a]) == before
    a.write_text("1,2,3\n")
    assert files.files_fingerprint(tmp_path, [a]) != before


def test_sidecars_are_checked_by_format_version_and_keys(tmp_path):
    path = tmp_path / "s.json"
    files.write_sidecar(path, "reclora_ds.thing", 2, {"n": 3})
    assert files.read_sidecar(path, "reclora_ds.thing", 2, required=["n"])["n"] == 3
    with pytest.raises(files.SidecarError, match="format_version 2, this reclora_ds reads 3"):
        files.read_sidecar(path, "reclora_ds.thing", 3)
    with pytest.raises(files.SidecarError, match="format 'reclora_ds.thing', expected 'other'"):
        files.read_sidecar(path, "other", 2)
    with pytest.raises(files.SidecarError, match=r"lacks the key\(s\) \['m'\]"):
        files.read_sidecar(path, "reclora_ds.thing", 2, required=["n", "m"])
    with pytest.raises(files.SidecarError, match="missing"):
        files.read_sidecar(tmp_path / "none.json", "reclora_ds.thing", 2)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(files.SidecarError, match="not valid JSON"):
        files.read_sidecar(tmp_path / "bad.json", "reclora_ds.thing", 2)


def test_md5_file_matches_hashlib(tmp_path):
    path = tmp_path / "a.zip"
    data = os.urandom(3 * files.HASH_CHUNK_BYTES // 2)
    path.write_bytes(data)
    assert files.md5_file(path) == hashlib.md5(data, usedforsecurity=False).hexdigest()


@pytest.mark.parametrize(
    ("error", "free", "full"),
    [
        (OSError(28, "No space left on device"), 10**9, True),  # the errno says it
        (
            RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
            10**9,
            True,
        ),
        (
            RuntimeError("[enforce fail at inline_container.cc] unexpected pos"),
            0,
            True,
        ),  # torch.save: no errno
        (RuntimeError("[enforce fail at inline_container.cc] unexpected pos"), 10**9, False),  # room left
        (ValueError("a bad value"), 0, False),  # a caller's mistake is never a full disk
        (OSError(13, "Permission denied"), 10**9, False),
    ],
)
def test_a_full_disk_is_told_apart_from_other_write_errors(tmp_path, monkeypatch, error, free, full):
    monkeypatch.setattr(files, "free_bytes", lambda _path: free)
    path = tmp_path / "out.json"
    files.write_json_atomic(path, {"old": True})
    with (
        pytest.raises(files.DiskFullError if full else type(error)) as caught,
        files.atomic_file(path) as tmp,
    ):
        tmp.write_text("partial")
        raise error
    if full:
        assert caught.value.errno == 28 and caught.value.__cause__ is error
        assert str(caught.value).startswith(f"{path}: no space left on the device")
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
