"""Run the stages in order; skip the finished ones, redo the stale ones, resume the interrupted one.

Every stage has a hash: sha256 of its name, its resolved settings (without the paths between stages), the
hashes of the stages it reads and a fingerprint of outside inputs (raw files, backbone); it names what the
stage produces, not where. The record ``<run>/_pipeline/<stage>.json`` holds the
hash, the status (``running`` / ``done``), start, end and wall time; ``<run>/_pipeline/<stage>.log`` holds
everything the stage printed. Before a stage runs:

    record done, same hash      -> skipped
    record running, same hash   -> run again over its folder: the stage continues (stage 2 resumes from its
                                   last DeepSpeed checkpoint, embedding extraction keeps finished shards)
    no record / another hash    -> its folder is deleted, then it runs
    at or after ``--from STAGE``-> its folder is deleted, then it runs

Because a stage's hash contains its inputs' hashes, redoing a stage makes every stage after it that reads
it stale. A failed stage stops the pipeline with its exit status and log path; a rerun resumes there.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reclora_ds.distributed import free_port
from reclora_ds.files import write_json_atomic
from reclora_ds.pipeline.config import PipelineConfig, PipelineSettings
from reclora_ds.pipeline.stages import Command, Stage, build_stages, stage_env

log = logging.getLogger(__name__)

PIPELINE_VERSION = 2  # part of every hash: bump when a stage's outputs or the hash's content change
# 2: the connecting paths left the hashed settings (stages.CONNECTING_PATHS): a hash names content, so an
#    experiment can share a stage folder between variants; records of version 1 are redone once.
RECORD_DIR = "_pipeline"
SLURM_LAUNCH = 'source "${RECLORA_SLURM_DIR:-launch/slurm}/common.sh" && reclora_launch "$@"'


class PipelineError(RuntimeError):
    """A stage failed; the message names it, its exit status and its log."""


@dataclasses.dataclass
class PlannedStage:
    stage: Stage
    hash: str
    action: str  # skip | resume | run | redo | forced


def stage_hash(stage: Stage, input_hashes: dict[str, str], fingerprint: str) -> str:
    payload = {
        "version": PIPELINE_VERSION,
        "stage": stage.name,
        "settings": stage.settings,
        "inputs": {name: input_hashes[name] for name in stage.inputs},
        "fingerprint": fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def launch_argv(command: Command, nproc: int, launcher: str, plora_launcher: str) -> list[str]:
    """The argv of one command: one process, or ``nproc`` ranks under torchrun / deepspeed / Slurm.

    Every launcher runs the command's package module, as ``python -m`` does: ``torchrun -m``, the DeepSpeed
    launcher's ``--module``, and ``reclora_launch -m`` of ``launch/slurm/common.sh``.
    """
    py = sys.executable
    if command.kind == "python" or (nproc == 1 and launcher == "local"):
        return [py, "-m", command.module, *command.args]
    if launcher == "slurm":  # a job step per stage, through launch/slurm/common.sh (RECLORA_LAUNCHER picks)
        return ["bash", "-c", SLURM_LAUNCH, "reclora-stage", "-m", command.module, *command.args]
    if command.kind == "deepspeed" and plora_launcher == "deepspeed":
        return [
            py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(free_port()),
            "--module", command.module, *command.args,
        ]  # fmt: skip
    return [
        py,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        command.module,
        *command.args,
    ]


def plan_hashes(stages: list[Stage], fingerprint: Callable[[Stage], str] | None = None) -> dict[str, str]:
    """``{stage name: hash}`` of stages in order (each reads only earlier ones).

    ``fingerprint``: how a stage's outside inputs are fingerprinted (default: its own ``fingerprint``; an
    experiment passes a cache, so the raw files are read once for all its variants).
    """
    hashes: dict[str, str] = {}
    for stage in stages:
        if fingerprint is not None:
            fp = fingerprint(stage)
        else:
            fp = stage.fingerprint() if stage.fingerprint else ""
        hashes[stage.name] = stage_hash(stage, hashes, fp)
    return hashes


class StageExecutor:
    """Runs planned stages and keeps their records: one per stage under ``records`` (``<key>.json`` and
    ``<key>.log``; a key may hold ``/``). The pipeline uses one per run, an experiment one per records folder.

    A stage runs under an exclusive lock (``<key>.lock``, released by the OS if the process dies), and its
    record is read again once the lock is held: two commands sharing a stage folder (two experiments over
    one store) never run it at the same time, and the second skips what the first finished.
    """

    def __init__(self, records: Path) -> None:
        self.records = Path(records)
        self._child: subprocess.Popen | None = None

    def path(self, key: str, suffix: str) -> Path:
        return self.records / f"{key}{suffix}"

    def record(self, key: str) -> dict[str, Any] | None:
        path = self.path(key, ".json")
        return json.loads(path.read_text()) if path.is_file() else None

    def write_record(self, key: str, record: dict[str, Any]) -> None:
        path = self.path(key, ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)

    def action(self, key: str, h: str) -> str:
        """``skip`` (done, same hash), ``resume`` (running, same hash), ``redo`` (another hash), ``run``."""
        rec = self.record(key)
        if rec is None:
            return "run"
        if rec.get("hash") != h:
            return "redo"
        return "skip" if rec.get("status") == "done" else "resume"

    def execute(
        self, item: PlannedStage, pipeline: PipelineConfig, key: str, title: str, port_offset: int = 0
    ) -> dict[str, Any]:
        """Run one planned stage (not a ``skip``) and return its ``done`` record.

        Raises:
            PipelineError: a command of the stage failed (the message names its log).
        """
        name, out = item.stage.name, item.stage.folder
        lock_path = self.path(key, ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            action = item.action
            # another process may have run it while this one planned or waited (not for a forced stage, nor
            # for an inline one: the report always runs)
            if action != "forced" and item.stage.run_inline is None:
                action = self.action(key, item.hash)
                if action == "skip":
                    return self.record(key) or {}
            if action in ("redo", "forced") and out.exists():
                shutil.rmtree(out)
            start = time.time()
            self.write_record(key, {"stage": name, "hash": item.hash, "status": "running", "started": _now()})
            print(f"\n=== {title} {name} ({action}) log: {self.path(key, '.log')}")
            sys.stdout.flush()
            self._run_stage(item.stage, pipeline, key, port_offset)
            record = {
                "stage": name,
                "hash": item.hash,
                "status": "done",
                "started": _iso(start),
                "finished": _now(),
                "wall_s": round(time.time() - start, 2),
                "folder": str(out),
            }
            self.write_record(key, record)
        return record

    def _run_stage(self, stage: Stage, p: PipelineConfig, key: str, port_offset: int) -> None:
        out = stage.folder
        if stage.write_files:
            out.mkdir(parents=True, exist_ok=True)
            for filename, text in stage.write_files.items():
                (out / filename).write_text(text)
        if stage.run_inline is not None:
            stage.run_inline()
            return
        # Ranks sharing a node's cores; under Slurm, common.sh's reclora_setup has set OMP_NUM_THREADS.
        threads = p.threads_per_rank or (
            None if p.launcher == "slurm" else max(1, (os.cpu_count() or 1) // p.nproc)
        )
        logfile = self.path(key, ".log")
        with open(logfile, "ab") as logf:
            for command in stage.commands:
                argv = launch_argv(command, p.nproc, p.launcher, p.plora_launcher)
                distributed = command.kind != "python" and (p.nproc > 1 or p.launcher == "slurm")
                env = stage_env(threads if distributed else None)
                if p.launcher == "slurm" and "MASTER_PORT" in env:  # a fresh rendezvous port per stage step
                    env["MASTER_PORT"] = str(int(env["MASTER_PORT"]) + 1 + port_offset)
                logf.write(f"$ {' '.join(argv)}\n".encode())
                rc = self._stream(argv, env, logf)
                if rc != 0:
                    raise PipelineError(
                        f"stage {stage.name} failed: `{' '.join(argv)}` exited with status {rc}; "
                        f"its output is in {logfile}. Fix the cause and rerun: finished stages are skipped."
                    )

    def _stream(self, argv: list[str], env: dict[str, str], logf: Any) -> int:
        """Run ``argv`` in this working directory; copy its output to this terminal and the log as it comes."""
        child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._child = child
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            assert child.stdout is not None
            fd = child.stdout.fileno()
            while chunk := os.read(fd, 65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                logf.write(chunk)
                logf.flush()
            return child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._child = None

    def _forward(self, signum: int, _frame: Any) -> None:
        """Pass SIGTERM / SIGINT to the running stage (its launcher ends its ranks), then stop."""
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signum)
            try:
                self._child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._child.kill()
        raise KeyboardInterrupt(f"interrupted by signal {signum}; rerun to continue")


class PipelineRunner:
    """Plans and runs the stages of one pipeline file (see the module docstring)."""

    def __init__(self, settings: PipelineSettings, from_stage: str | None = None) -> None:
        from reclora_ds.pipeline.report import write_report

        self.settings = settings
        self.run_dir = settings.pipeline.run_dir
        self.records = self.run_dir / RECORD_DIR
        self.executor = StageExecutor(self.records)
        self.stages = build_stages(settings, run_report=lambda: write_report(self.run_dir, settings))
        names = [s.name for s in self.stages]
        if from_stage is not None and from_stage not in names:
            raise ValueError(f"--from {from_stage!r}: not a stage of this pipeline ({', '.join(names)})")
        self.from_index = names.index(from_stage) if from_stage else len(names)

    # ------------------------------------------------------------------------------------------------------
    def record(self, name: str) -> dict[str, Any] | None:
        return self.executor.record(name)

    def _write_record(self, name: str, record: dict[str, Any]) -> None:
        self.executor.write_record(name, record)

    def plan(self) -> list[PlannedStage]:
        """Each stage with its hash and what a run will do with it (fingerprints are computed here)."""
        hashes = plan_hashes(self.stages)
        planned = []
        for index, stage in enumerate(self.stages):
            if index >= self.from_index:
                action = "forced"
            elif stage.name == "report":
                action = "run"  # cheap, and it reads every stage's latest numbers
            else:
                action = self.executor.action(stage.name, hashes[stage.name])
            planned.append(PlannedStage(stage, hashes[stage.name], action))
        return planned

    # ------------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the plan; returns ``{stage: record}``. Raises :class:`PipelineError` on a failed stage."""
        plan = self.plan()
        p = self.settings.pipeline
        print(f"pipeline {p.name}: {len(plan)} stages under {self.run_dir} (config {self.settings.source})")
        for item in plan:
            print(f"  {item.stage.name:<11} {item.action:<7} {item.hash[:12]}")
        sys.stdout.flush()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        records = {}
        total = time.perf_counter()
        for number, item in enumerate(plan, 1):
            name = item.stage.name
            if item.action == "skip":
                records[name] = self.record(name)
                continue
            records[name] = self.executor.execute(
                item, p, name, f"[{number}/{len(plan)}]", port_offset=number - 1
            )
        print(
            f"\npipeline {p.name} finished in {time.perf_counter() - total:.0f} s; report: {self.run_dir / 'report.md'}"
        )
        return records


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).isoformat(timespec="seconds")


def _now() -> str:
    return _iso(time.time())


def run_pipeline(settings: PipelineSettings, from_stage: str | None = None) -> dict[str, Any]:
    """Plan and run a pipeline (see the module docstring); returns ``{stage: record}``."""
    return PipelineRunner(settings, from_stage).run()
