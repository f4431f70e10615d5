#!/usr/bin/env bash
# Install a one-node SLURM (Debian's slurm-wlm) and munge for the `slurm` tests; idempotent.
# Needs root (or passwordless sudo). The daemons are started by tests/slurm/conftest.py, not here.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install_slurm.sh: needs root or sudo" >&2; exit 1; }
  SUDO="sudo"
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
  || ! command -v sbatch >/dev/null; then
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends slurm-wlm munge
fi

# The package normally creates the key; create it if an image stripped it.
if [ ! -s /etc/munge/munge.key ]; then
  $SUDO mkdir -p /etc/munge
  $SUDO mungekey --create --keyfile /etc/munge/munge.key
fi
$SUDO chown munge:munge /etc/munge/munge.key
$SUDO chmod 400 /etc/munge/munge.key
$SUDO mkdir -p /run/munge
$SUDO chown munge:munge /run/munge

echo "installed: $(dpkg-query -W -f '${Package} ${Version}  ' slurm-wlm munge)"
