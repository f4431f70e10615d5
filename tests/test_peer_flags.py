"""The peer watch's sweep of flags left by killed jobs (``reclora_ds.distributed._sweep_dead_flags``)."""

from __future__ import annotations

import os
from pathlib import Path

from reclora_ds import distributed as D


def test_sweep_removes_dead_flags_keeps_live_ones_and_survives_a_folder_removed_meanwhile(
    tmp_path, monkeypatch
):
    """Several jobs share the flag root: a job's last rank removes its folder when it ends, possibly between
    this sweep's listing of the root and its look into that folder (Python's glob then raises
    FileNotFoundError, seen in CI as a rank failing at start). The sweep goes on with the other folders."""
    gone, dead, alive = tmp_path / "127.0.0.1_1", tmp_path / "127.0.0.1_2", tmp_path / "127.0.0.1_3"
    for folder in (gone, dead, alive):
        folder.mkdir()
    (dead / "rank1.4194305").write_text("")  # above Linux's largest pid: no such process
    (alive / f"rank0.{os.getpid()}").write_text("")
    real_glob = Path.glob

    def racing_glob(self, pattern, *args, **kwargs):
        if self == gone:  # its job ends after the root was listed: what glob's scandir then raises
            self.rmdir()
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_glob(self, pattern, *args, **kwargs)

    monkeypatch.setattr(Path, "glob", racing_glob)
    D._sweep_dead_flags(tmp_path)
    # the dead job's folder emptied and removed, the live job's flag kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name]
    assert [p.name for p in alive.iterdir()] == [f"rank0.{os.getpid()}"]
