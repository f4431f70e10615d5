"""Shared-memory gradient all-reduce on one node: DeepSpeed's shm kernel as a DDP comm hook (stage 1) and
under ZeRO-2's reductions (stage 2, :func:`route_deepspeed_all_reduce`).

DDP on CPU all-reduces every bucket of gradients through gloo, which goes over TCP even between two
processes of one machine. DeepSpeed ships a same-node all-reduce over POSIX shared memory
(``deepspeed_shm_comm``, the op its CPU accelerator JIT-builds and uses for tensor-parallel inference);
what it saves per step: ``benchmarks/bench_crm.py``, docs/CRM_RESULTS.md section 4.
:func:`enable_shm_allreduce` registers it as the DDP communication hook, so DDP keeps bucketing, ordering
and the division by the world size, and only the transport changes. The sum of two ranks' buffers is the
same float sum gloo computes, so parameters stay bitwise identical to a gloo run
(``tests/training/test_crm_ddp.py``).

It is used only when every rank is on this node (the launcher's local world size equals the world size),
the model is on the CPU, and the op builds and loads on every rank (a C++ compiler; DeepSpeed caches the
build under ``TORCH_EXTENSIONS_DIR``). Otherwise DDP keeps gloo.

DeepSpeed never unlinks its segments (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``,
66 MB each), so every run would leave one per rank in RAM-backed ``/dev/shm``. Once every rank has mapped
every segment, each rank unlinks its own (:func:`unlink_own_segment`): the mappings stay valid and
nothing is left behind. DeepSpeed's CPU communication backend maps the same segments in
``deepspeed.initialize`` under the deepspeed launcher, so a CPU run of stage 2 unlinks its own there too
(:func:`reclora_ds.cpu.enable_cpu_extras` with ``deepspeed_comm``). Both are CPU-only: nothing here runs for
a GPU job.
"""

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from reclora_ds import distributed as dist_utils
from reclora_ds.cpu.build_lock import guarded_build

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "deepspeed_allreduce_buffer"
LOCAL_SIZE_ENV = "LOCAL_SIZE"  # what DeepSpeed's shm initialize() reads (the deepspeed launcher sets it)
FP32_KERNEL_LEVEL = 1  # deepspeed's vector_kernel_level(): 1 = avx2 (fp32 reductions), 2 = avx512bw


def segment_path(rank: int) -> Path:
    """Where DeepSpeed's shm all-reduce keeps ``rank``'s segment (its ``shm_initialize`` naming)."""
    addr, port = dist_utils.rendezvous_address()
    return SHM_DIR / f"{SEGMENT_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def unlink_own_segment(rank: int) -> None:
    """Remove this rank's segment name; call only after every rank has mapped every segment (a barrier)."""
    segment_path(rank).unlink(missing_ok=True)


def load_op() -> Any | None:
    """DeepSpeed's shm comm module, built or loaded from the extension cache; None when it cannot be.

    DeepSpeed keeps a loaded op for the whole process, so its own later load of the same op (in
    ``deepspeed.initialize`` on the CPU) takes it from memory, without touching the build lock again.
    """
    try:
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        builder = ShareMemCommBuilder()
        if not builder.is_compatible():
            return None
        with guarded_build(builder.NAME):  # a dead process's build lock is cleared, a wait is reported
            op = builder.load(verbose=False)
    except Exception as exc:  # no DeepSpeed, no compiler, a failed build: gloo does the job
        log.warning(
            "DeepSpeed's shm all-reduce is unavailable (%s: %s); DDP uses gloo", type(exc).__name__, exc
        )
        return None
    if op.vector_kernel_level() < FP32_KERNEL_LEVEL:
        log.warning("this CPU lacks AVX2, which DeepSpeed's fp32 shm all-reduce needs; DDP uses gloo")
        return None
    return op


def every_rank_can(reason: str | None, required: bool, fallback: str) -> bool:
    """True when no rank has a ``reason`` not to use shared memory; a collective (a MIN over the ranks).

    The ranks agree before any of them touches shared memory, so a rank that cannot (a failed build, no
    mapped segments) never leaves the others waiting on it. Otherwise ``required`` raises a RuntimeError
    that gives this rank's reason (or says another rank had one), and without it the ``fallback`` note
    is logged with the reason and False returned.
    """
    ready = torch.tensor([int(reason is None)])
    if dist_utils.dist_info().world_size > 1:
        dist.all_reduce(ready, op=dist.ReduceOp.MIN)
    if ready.item():
        return True
    reason = reason or "another rank cannot use DeepSpeed's shared memory (see its log)"
    if required:
        raise RuntimeError(f"shm all-reduce requested but unavailable: {reason}")
    log.info("%s: %s", fallback, reason)
    return False


# No ``from __future__ import annotations`` in this module: DDP checks the hook's annotations as objects.
def shm_allreduce_hook(world_size: int, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average the bucket over the ranks in shared memory (divide, then sum, as DDP's
    default gloo hook does)."""
    buffer = bucket.buffer()
    buffer.div_(world_size)
    torch.ops.deepspeed.inference_all_reduce_(buffer)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(buffer)
    return future


def enable_shm_allreduce(
    ddp_model: torch.nn.parallel.DistributedDataParallel, required: bool = False
) -> bool:
    """Make ``ddp_model`` all-reduce through shared memory when every rank can; True when it does.

    A collective: every rank of the group must call it. The ranks agree (through the process group)
    before any of them touches shared memory, so a rank whose build failed cannot leave the others
    waiting on it. ``required`` turns "cannot" into a RuntimeError that gives the reason.
    """
    info = dist_utils.dist_info()
    reason = None
    if info.world_size < 2:
        reason = "a single process has nothing to all-reduce"
    elif any(p.device.type != "cpu" for p in ddp_model.parameters()):
        reason = "the model is not on the CPU"
    elif dist_utils.local_world_size() != info.world_size:
        reason = (
            f"the ranks are not all on this node (local world size {dist_utils.local_world_size()}, "
            f"world size {info.world_size})"
        )
    op = load_op() if reason is None else None
    if op is None:
        reason = reason or "DeepSpeed's shm all-reduce could not be loaded (see the warnings)"
    if not every_rank_can(reason, required, "DDP all-reduces through gloo"):
        return False
    # DeepSpeed's initialize() maps the other ranks' segments only when LOCAL_SIZE is set; it is set for
    # that call alone, so the process's environment is left as the launcher made it.
    saved = os.environ.get(LOCAL_SIZE_ENV)
    os.environ[LOCAL_SIZE_ENV] = str(info.world_size)
    try:
        op.initialize(info.world_size, info.rank)  # creates this rank's segment, maps every other rank's
    finally:
        if saved is None:
            del os.environ[LOCAL_SIZE_ENV]
        else:
            os.environ[LOCAL_SIZE_ENV] = saved
    dist.barrier()  # every rank has mapped every segment
    unlink_own_segment(info.rank)
    ddp_model.register_comm_hook(info.world_size, shm_allreduce_hook)
    log.info(
        "DDP all-reduces through DeepSpeed's shared-memory kernel (%d ranks on this node)", info.world_size
    )
    return True


# The shm kernel's ISA level each dtype needs (DeepSpeed's TorchBackend.inference_all_reduce: bf16 / fp16
# use avx512bw, fp32 avx2); a tensor of another dtype keeps gloo.
SHM_DTYPE_LEVELS = {torch.float32: FP32_KERNEL_LEVEL, torch.bfloat16: 2, torch.float16: 2}


def route_deepspeed_all_reduce(backend: Any, required: bool = False) -> bool:
    """Make DeepSpeed's CPU communication backend sum through shared memory; True when it does.

    ZeRO-2 averages its gradient buckets with ``deepspeed.comm.all_reduce``, which DeepSpeed's
    ``TorchBackend`` hands to ``torch.distributed`` (gloo: TCP between two processes of one machine,
    its receive buffers page-faulting at every step, docs/PLORA_BENCH.md). The same backend has already
    mapped its shared-memory segments (under the deepspeed launcher) but uses them for inference
    only. This replaces the backend's ``all_reduce`` with one that sends a synchronous SUM of a
    contiguous CPU tensor over every rank, of a dtype the kernel handles on this CPU, to
    ``torch.ops.deepspeed.inference_all_reduce_``; everything else (MAX / MIN, async work, a sub-group,
    other dtypes) still goes to gloo. Which path a call takes depends only on what every rank passes
    alike, so the ranks stay in step. On two ranks the kernel computes the same sum as gloo, elementwise
    ``a + b`` (bf16 / fp16 in float32, rounded once), so training is bitwise the same
    (``tests/training/test_plora_recipe.py``). What it saves: docs/PLORA_BENCH.md, "ZeRO-2's gradient sums
    through shared memory".

    A collective: call it on every rank after ``deepspeed.initialize`` and before the segments are
    unlinked (:func:`unlink_own_segment`): the segment of this rank is the proof that DeepSpeed mapped
    them (it does only when ``LOCAL_SIZE`` equals the world size), and the ranks agree on it before any
    of them changes path. ``required`` turns "cannot" into a RuntimeError that gives the reason.
    """
    info = dist_utils.dist_info()
    reason = None
    shm_op = getattr(backend, "shm_comm_op", None)
    if info.world_size < 2:
        reason = "a single process has nothing to all-reduce"
    elif backend is None:
        reason = "DeepSpeed's communication backend (deepspeed.comm.comm.cdb) is not there"
    elif shm_op is None:
        reason = "DeepSpeed did not load its shm comm op"
    elif not callable(getattr(backend, "_reduce_op", None)):
        reason = "this DeepSpeed's communication backend has no _reduce_op (a newer DeepSpeed?)"
    elif not segment_path(info.rank).exists():
        reason = f"DeepSpeed did not map its shared memory ({segment_path(info.rank)} is missing; LOCAL_SIZE unset?)"
    if not every_rank_can(reason, required, "ZeRO's reductions go through gloo"):
        return False
    level = shm_op.vector_kernel_level()  # a DeepSpeed op: fixed for the process
    world_size = info.world_size
    gloo_all_reduce = backend.all_reduce

    def all_reduce(
        tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None, async_op: bool = False
    ) -> Any:
        if (
            not async_op
            and backend._reduce_op(op) == dist.ReduceOp.SUM
            and tensor.device.type == "cpu"
            and tensor.is_contiguous()
            and level >= SHM_DTYPE_LEVELS.get(tensor.dtype, level + 1)
            and dist.get_world_size(group) == world_size
        ):
            torch.ops.deepspeed.inference_all_reduce_(tensor)
            return None
        return gloo_all_reduce(tensor, op, group, async_op)

    backend.all_reduce = all_reduce
    log.info(
        "ZeRO's reductions go through DeepSpeed's shared-memory kernel (%d ranks on this node)", world_size
    )
    return True
