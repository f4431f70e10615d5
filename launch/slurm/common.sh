# Shared helpers of the reclora_ds sbatch scripts; sourced, never run. See launch/slurm/README.md.
#
#   reclora_setup                     cd to the submit directory, pick the interpreter, export MASTER_ADDR,
#                                     MASTER_PORT and OMP_NUM_THREADS
#   reclora_launch -m MODULE ARGS...  start `python -m MODULE ARGS` on every rank of the job (the sbatch
#                                     scripts run the installed reclora_ds.commands.<name>), or
#   reclora_launch SCRIPT ARGS...     `python SCRIPT ARGS`, with $RECLORA_LAUNCHER:
#       torchrun   one `torchrun` per node (srun), c10d rendezvous on the head node
#       srun       one task per rank (srun); each task exports RANK/LOCAL_RANK/WORLD_SIZE from SLURM_*
#       deepspeed  the `deepspeed` launcher on the batch host with a hostfile built from the node list
#                  (reaches the other nodes over pdsh/ssh, which the cluster must allow)
#
# Failure handling: srun --kill-on-bad-exit=1 ends every task when one exits non-zero, torchrun ends its
# workers when one fails (no restarts), so the job ends FAILED with the failing rank's status.

# Most processes a node runs for this job: NPROC_PER_NODE, GPUS_PER_NODE, the GPUs Slurm gave the node,
# otherwise the job's tasks per node.
reclora_procs_per_node() {
  if [ -n "${NPROC_PER_NODE:-}" ]; then
    echo "$NPROC_PER_NODE"
  elif [ -n "${GPUS_PER_NODE:-}" ]; then
    echo "$GPUS_PER_NODE"
  elif [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ] 2>/dev/null; then
    echo "$SLURM_GPUS_ON_NODE"
  else
    echo $(( ${SLURM_NTASKS:-1} / ${SLURM_NNODES:-1} > 0 ? ${SLURM_NTASKS:-1} / ${SLURM_NNODES:-1} : 1 ))
  fi
}

reclora_setup() {
  : "${SLURM_JOB_ID:?reclora_setup: not inside a Slurm job (submit the script with sbatch)}"
  cd "${SLURM_SUBMIT_DIR:-.}"
  RECLORA_PYTHON="${RECLORA_PYTHON:-python}"
  command -v "$RECLORA_PYTHON" >/dev/null || { echo "error: no interpreter '$RECLORA_PYTHON'" >&2; return 2; }
  export RECLORA_PYTHON

  SLURM_NNODES="${SLURM_NNODES:-1}"
  MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}"
  # A port per job, so two jobs sharing a head node do not collide.
  MASTER_PORT="${MASTER_PORT:-$(( 10000 + SLURM_JOB_ID % 50000 ))}"
  export MASTER_ADDR MASTER_PORT

  if [ "${RECLORA_LAUNCHER:-torchrun}" = "srun" ]; then
    RECLORA_PROCS_PER_NODE=$(( ${SLURM_NTASKS:-1} / SLURM_NNODES > 0 ? ${SLURM_NTASKS:-1} / SLURM_NNODES : 1 ))
  else
    RECLORA_PROCS_PER_NODE="$(reclora_procs_per_node)"
  fi
  export RECLORA_PROCS_PER_NODE
  # Processes sharing a node's cores; without it each rank starts one thread per core (2-5x slower steps).
  local cpus="${SLURM_CPUS_ON_NODE:-1}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cpus / RECLORA_PROCS_PER_NODE > 0 ? cpus / RECLORA_PROCS_PER_NODE : 1 ))}"

  echo "reclora: job $SLURM_JOB_ID nodes=$SLURM_NNODES ($SLURM_JOB_NODELIST) procs/node=$RECLORA_PROCS_PER_NODE" \
    "launcher=${RECLORA_LAUNCHER:-torchrun} master=$MASTER_ADDR:$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS" \
    "python=$(command -v "$RECLORA_PYTHON")"
}

# One torchrun agent per node; it starts RECLORA_PROCS_PER_NODE workers and ends them all when one fails.
reclora_launch_torchrun() {
  local cpus=()
  [ -n "${SLURM_CPUS_ON_NODE:-}" ] && cpus=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
  srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 "${cpus[@]}" \
    "$RECLORA_PYTHON" -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$RECLORA_PROCS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv_conf "join_timeout=${RDZV_TIMEOUT_S:-600}" --max_restarts 0 \
    "$@"
}

# One Slurm task per rank; the variables torch.distributed / DeepSpeed read come from srun's own.
reclora_launch_srun() {
  # shellcheck disable=SC2016  # expanded by each task, not here
  srun --kill-on-bad-exit=1 bash -c \
    'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' \
    reclora-rank "$RECLORA_PYTHON" "$@"
}

# The deepspeed launcher with a hostfile (`host slots=N` per node); it reaches the nodes over pdsh/ssh.
# Its flag for a module is --module (torchrun and python take -m as it is).
reclora_launch_deepspeed() {
  local hostfile="${DS_HOSTFILE:-${TMPDIR:-/tmp}/reclora-hostfile-$SLURM_JOB_ID}"
  local module=()
  if [ "${1:-}" = "-m" ]; then
    module=(--module)
    shift
  fi
  scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$RECLORA_PROCS_PER_NODE/" >"$hostfile"
  "$RECLORA_PYTHON" -m deepspeed.launcher.runner --hostfile "$hostfile" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${module[@]}" "$@"
}

reclora_launch() {
  local launcher="${RECLORA_LAUNCHER:-torchrun}"
  case "$launcher" in
    torchrun | srun | deepspeed) "reclora_launch_$launcher" "$@" ;;
    *) echo "error: RECLORA_LAUNCHER=$launcher (expected torchrun, srun or deepspeed)" >&2; return 2 ;;
  esac
}
