"""CPU-only speed-ups in one corner, switched on by a recipe for a CPU run; the GPU path never calls them.

- :mod:`reclora_ds.cpu.kernels`: C++ implementations of :mod:`reclora_ds.models.ops`' ``gather_dot`` (SIM's
  soft-search scores) and ``attention_pool`` (DIN's activation unit), built once and registered as those
  ops' implementations for float32 CPU tensors. The models only call the ops: they run the PyTorch forms
  until a recipe registers the kernels.
  The same library holds the LLM's attention for ``eager_fused`` and its RMSNorm for
  ``norm_implementation=fused`` (bf16, forward and backward), each registered on its own as
  ``decoder_attention``'s / ``rms_norm``'s implementation.
- :mod:`reclora_ds.cpu.allocator`: glibc malloc thresholds so a CPU step reuses its freed temporaries.
- :mod:`reclora_ds.cpu.shm_allreduce`: DeepSpeed's same-node shared-memory all-reduce as DDP's comm hook
  and under ZeRO-2's gradient reductions, and the unlinking of DeepSpeed's ``/dev/shm`` segments once every
  rank has mapped them.
- :mod:`reclora_ds.cpu.build_lock`: every JIT build or load of an extension above runs under a guard that
  clears a killed builder's stale lock and reports any wait longer than a few seconds.

:func:`enable_cpu_extras` is the one call the recipes and the scoring runner make; each of its arguments
switches one part on.
Stage 1 (:mod:`reclora_ds.training.crm_recipe`) on the CPU switches on the allocator setting and, with
``cpu_kernels=true``, the kernels, and its DDP wrapper the shared-memory all-reduce. Scoring a stage-2 run
(:func:`reclora_ds.training.scoring.score_table`, ``reclora-ds score``) on the CPU switches on the allocator
setting and, for an ``eager_fused`` backbone, the attention kernel, for fused norms the RMSNorm kernel.
Stage 2 (:mod:`reclora_ds.training.plora_recipe`) on the CPU switches on the attention kernel where the
backbone trains or scores with ``eager_fused`` (its CPU default for training), the RMSNorm kernel where its
norms are fused (the default), sends ZeRO-2's gradient sums through DeepSpeed's shared-memory kernel
(``cpu_allreduce``), unlinks DeepSpeed's segments and runs
the frozen CRM in its PyTorch forms, as every other reader of a trained CRM does (CRM states, scoring): the
CRM's forward is a negligible share of a stage-2 step (docs/RESULTS.md section 2), nothing is compiled for
it, and the readers agree with each other bit for bit on any device.

Why C++ kernels and not ``torch.compile``: inductor's code for the same SIM training step (the whole model
compiled, or the two ops alone) was timed against the kernels and was slower, after a compile of tens of
seconds, so the kernels stay (docs/CRM_RESULTS.md, "torch.compile against the C++ kernels").
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.nn.parallel import DistributedDataParallel

from reclora_ds import distributed as dist_utils
from reclora_ds.cpu import allocator as _allocator
from reclora_ds.cpu import kernels as _kernels
from reclora_ds.cpu import shm_allreduce

ALLREDUCES = ("auto", "shm", "gloo")


@dataclass(frozen=True)
class CPUExtras:
    """What is switched on in this process after an :func:`enable_cpu_extras` call.

    Attributes:
        kernels: the CRM's ops use the C++ kernels.
        allocator: glibc keeps freed memory in the process.
        shm_allreduce: the gradients all-reduce through shared memory (the DDP model given to the call,
            or DeepSpeed's communication with ``deepspeed_comm``).
    """

    kernels: bool
    allocator: bool
    shm_allreduce: bool = False
    attention_form: str | None = None
    """The form (``dot`` / ``matmul``: :data:`reclora_ds.cpu.kernels.ATTENTION_FORMS`) of the C++ kernel
    ``decoder_attention`` (the backbone's ``eager_fused`` attention) uses; None: its PyTorch form."""
    rms_norm: bool = False
    """``rms_norm`` (the backbone's RMSNorm under ``norm_implementation=fused``) uses the C++ kernel."""

    @property
    def attention(self) -> bool:
        """``decoder_attention`` uses the C++ kernel (either form)."""
        return self.attention_form is not None


def enable_cpu_extras(
    *,
    kernels: bool | None = None,
    allocator: bool = False,
    attention: bool = False,
    attention_form: str = "auto",
    rms_norm: bool = False,
    ddp_model: DistributedDataParallel | None = None,
    allreduce: str = "auto",
    deepspeed_comm: bool = False,
    prebuild_deepspeed_comm: bool = False,
) -> CPUExtras:
    """Switch on this process's CPU speed-ups; call it for a CPU run only (never for a GPU one).

    Args:
        kernels: True registers the C++ kernels as :mod:`reclora_ds.models.ops`' implementations (built on
            first use; when they cannot be built, a warning and the PyTorch forms). False puts the PyTorch
            forms back; None leaves the ops as they are.
        allocator: True sets glibc's malloc thresholds (once per process; not undone).
        attention: True registers the C++ attention kernel as ``decoder_attention``'s implementation
            (:func:`reclora_ds.cpu.kernels.enable_attention`: where it cannot run, a logged note and
            eager attention's PyTorch ops).
        attention_form: the attention kernel's form (:data:`reclora_ds.cpu.kernels.ATTENTION_FORMS`), or
            ``auto``; an explicit form makes a kernel that cannot run a RuntimeError.
        rms_norm: True registers the C++ RMSNorm kernel as ``rms_norm``'s implementation
            (:func:`reclora_ds.cpu.kernels.enable_rms_norm`; where it cannot run, a logged note and
            transformers' PyTorch ops).
        ddp_model: a CPU DDP model whose gradients should all-reduce through shared memory, as
            ``allreduce`` says: ``shm`` (a RuntimeError when it cannot), ``auto`` (when it can, else
            gloo), ``gloo`` (nothing changes). A collective: every rank calls it.
        deepspeed_comm: ``deepspeed.initialize`` has run with DeepSpeed's CPU communication: route its
            sums through shared memory as ``allreduce`` says
            (:func:`reclora_ds.cpu.shm_allreduce.route_deepspeed_all_reduce`: ZeRO's gradient reductions),
            then, once every rank has mapped the others' shared-memory segments (a barrier, so a
            collective), unlink this rank's segment name.
        prebuild_deepspeed_comm: load (building it on first use) DeepSpeed's shm comm op now, under
            :func:`reclora_ds.cpu.build_lock.guarded_build`; call it before ``deepspeed.initialize`` on the
            CPU, which loads the op itself without that guard (a killed builder's stale lock would make it
            wait forever). Not a collective.

    Returns:
        What is on now (:class:`CPUExtras`).

    Example::

        if device.type == "cpu":
            enable_cpu_extras(kernels=cfg.cpu_kernels, allocator=True)
    """
    if allreduce not in ALLREDUCES:
        raise ValueError(f"allreduce must be one of {ALLREDUCES}, got {allreduce!r}")
    if kernels is True:
        _kernels.enable()
    elif kernels is False:
        _kernels.disable()
    if allocator:
        _allocator.keep_freed_memory()
    if attention:
        _kernels.enable_attention(required=attention_form != "auto", form=attention_form)
    if rms_norm:
        _kernels.enable_rms_norm()
    if prebuild_deepspeed_comm:
        shm_allreduce.load_op()
    shm = False
    if ddp_model is not None and allreduce != "gloo":
        shm = shm_allreduce.enable_shm_allreduce(ddp_model, required=allreduce == "shm")
    if deepspeed_comm:
        info = dist_utils.dist_info()
        if allreduce != "gloo":
            from deepspeed import comm as ds_comm

            backend = getattr(ds_comm.comm, "cdb", None)  # None: a DeepSpeed without it; the route says why
            shm = shm_allreduce.route_deepspeed_all_reduce(backend, required=allreduce == "shm")
        dist_utils.barrier()  # every rank has mapped every segment
        shm_allreduce.unlink_own_segment(info.rank)
    return CPUExtras(
        kernels=_kernels.enabled(),
        allocator=_allocator.keeping_freed_memory(),
        shm_allreduce=shm,
        attention_form=_kernels.attention_form(),
        rms_norm=_kernels.rms_norm_enabled(),
    )
