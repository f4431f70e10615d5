"""A real one-node SLURM cluster on localhost for the ``slurm`` tests (machine-facts: Debian's slurm-wlm + munge).

The session fixture :func:`slurm_cluster` writes a ``slurm.conf`` whose state, spool, logs and pid files all
live in one temporary directory, starts ``munged`` (unless one already answers), ``slurmctld`` and
``slurmd -N localhost``, waits for the node to be ``idle`` and stops the daemons it started by the pids in
their pid files. Without slurm-wlm/munge, or without root, the tests are skipped; under ``CI=true`` they fail
instead (CI runs ``.ci/install_slurm.sh`` first).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launch import LAUNCH_VARS

SBIN_PATH = os.pathsep.join(("/usr/sbin", "/sbin", "/usr/bin", "/bin"))
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
MUNGE_PID_FILE = Path("/run/munge/munged.pid")
MUNGE_KEY = Path("/etc/munge/munge.key")
RESERVED_MEMORY_FRACTION = 0.2  # RealMemory must not exceed what slurmd measures, or the node is drained


@dataclass(frozen=True)
class SlurmCluster:
    """A running one-node cluster.

    Attributes:
        conf: path of its ``slurm.conf`` (clients find it through ``SLURM_CONF``).
        root: temporary directory holding the configuration, state, spool and logs.
        cpus: CPUs of the single node ``localhost``.
    """

    conf: Path
    root: Path
    cpus: int

    def env(self, **extra: str) -> dict[str, str]:
        """The test process's environment for a client command, without launcher or outer-job variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + SBIN_PATH)


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI where the cluster must exist."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: run .ci/install_slurm.sh before the tests)", pytrace=False)
    pytest.skip(f"{reason}; install them with .ci/install_slurm.sh (as root) to run the slurm tests")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * (1 - RESERVED_MEMORY_FRACTION))
    return 1024


def _write_conf(root: Path, cpus: int) -> Path:
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # Own ports: another cluster (or a second session's) on this host keeps the default 6817/6818.
    lines = [
        "ClusterName=reclora-test",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",  # cgroup plugins would write into /sys/fs/cgroup
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "MinJobAge=300",  # finished jobs stay visible to `scontrol show job` (no accounting database)
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        f"NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_real_memory_mib()}",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _munge_ok() -> bool:
    return subprocess.run([_which("munge") or "munge", "-n"], capture_output=True).returncode == 0


def _wait(predicate, timeout_s: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}\n" + "\n".join(p.read_text().splitlines()[-20:]) for p in logs if p.exists())
    raise RuntimeError(f"{what} not reached within {timeout_s:.0f} s\n{tails}")


def _stop(pid_file: Path) -> None:
    """SIGTERM the pid in ``pid_file``, SIGKILL it if it is still alive after STOP_TIMEOUT_S."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Start munged (if needed), slurmctld and slurmd on localhost; yield a :class:`SlurmCluster`."""
    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        _unavailable(f"slurm-wlm/munge are not installed (missing {', '.join(missing)})")
    if os.geteuid() != 0:
        _unavailable("starting slurmd needs root")
    if not MUNGE_KEY.exists():
        _unavailable(f"no munge key at {MUNGE_KEY}")

    root = tmp_path_factory.mktemp("slurm")
    cpus = os.cpu_count() or 1
    conf = _write_conf(root, cpus)
    cluster = SlurmCluster(conf=conf, root=root, cpus=cpus)
    env = cluster.env()
    logs = [root / "log" / "slurmctld.log", root / "log" / "slurmd.log"]
    started: list[Path] = []
    try:
        if not _munge_ok():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], check=True)
            started.append(MUNGE_PID_FILE)
            _wait(_munge_ok, START_TIMEOUT_S, "munge -n succeeding", [])
        subprocess.run([_which("slurmctld"), "-f", str(conf)], env=env, check=True)
        started.append(root / "run" / "slurmctld.pid")
        # -N localhost: the node is named localhost whatever this machine's hostname is
        subprocess.run([_which("slurmd"), "-f", str(conf), "-N", "localhost"], env=env, check=True)
        started.append(root / "run" / "slurmd.pid")

        def idle() -> bool:
            out = subprocess.run([_which("sinfo"), "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            return out.returncode == 0 and out.stdout.strip() == "idle"

        _wait(idle, START_TIMEOUT_S, "node state idle", logs)
        yield cluster
    finally:
        for pid_file in reversed(started):
            _stop(pid_file)
