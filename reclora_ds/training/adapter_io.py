"""Save and load trained PLoRA adapters, and export one user's PLoRA as a standard peft LoRA.

Shape legend:
    N      experts (meta-LoRAs) per bank
    r      rank of each expert
    r_eff  rank of an exported per-sample LoRA: ``N * r`` (``products``) or ``r`` (``factors``)
    d_in / d_out   in / out features of an adapted projection
    d_c    width of the CRM state that drives the gates

Two formats:

1. **PLoRA adapter** (what a trained PLoRA model is saved as; peft's conventions: weights-only safetensors
   plus a config JSON)::

       adapter_model.safetensors   every PLoRA tensor (banks and gates), named as the backbone names it:
                                   model.layers.0.self_attn.q_proj.plora_A          [N, r, d_in]
                                   model.layers.0.self_attn.q_proj.plora_B          [N, d_out, r]
                                   model.layers.0.self_attn.q_proj.plora_gate.proj_in.weight ...
                                   (with a shared gate: plora_gate.norm.weight, ... at the root)
       plora_config.json           format and format_version, the PLoRAConfig fields (but the runtime
                                   precision ``compute_dtype``), the replaced module
                                   names, base_model_name_or_path and base_model_sha256 (when given), extra

   Wrapper prefixes (DeepSpeed / DDP ``module.``, peft ``base_model.model.``, torch.compile ``_orig_mod.``,
   and checkpoint / FSDP wrapper components) are stripped, so an adapter saved from a DeepSpeed engine
   loads into a bare backbone and back. Loading is strict: a config field that differs, a missing or an
   unexpected tensor, or a shape that differs is an error that names all of them.

2. **Personalized LoRA**: for one sample, the gate weights ``alpha`` [N] fix every adapted projection's
   update, which is then an ordinary LoRA:

   - ``products`` (paper Eq. 11): ``sum_k alpha_k B_k A_k`` = ``B_eff A_eff`` with
     ``A_eff = [A_1; ...; A_N]`` [N r, d_in] and ``B_eff = [alpha_1 B_1, ..., alpha_N B_N]`` [d_out, N r];
     exact, rank ``N r``.
   - ``factors`` (the authors' code): ``A_eff = sum_k alpha_k A_k`` [r, d_in],
     ``B_eff = sum_k alpha_k B_k`` [d_out, r]; rank ``r``.

   :func:`save_peft_adapter` writes it as a standard peft LoRA folder that
   ``peft.PeftModel.from_pretrained(backbone, folder)`` loads (no reclora_ds needed to serve it).

Example::

    names = inject_plora(llm, plora_config)
    ...  # train
    save_plora_adapter(llm, plora_config, "runs/x/adapter", {"base_model_name_or_path": backbone_dir})

    manifest = read_plora_adapter_config("runs/x/adapter")
    inject_plora(fresh_llm, manifest.config)
    load_plora_adapter(fresh_llm, "runs/x/adapter")
    lora = personalized_lora(fresh_llm, crm_state)  # crm_state: [d_c], one sample
    save_peft_adapter(lora, "runs/x/user_42", backbone_dir, manifest.config.target_modules)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from reclora_ds.files import atomic_file, write_text_atomic
from reclora_ds.models.inject import SHARED_GATE_NAME, is_plora_parameter_name
from reclora_ds.models.plora import PLoRAConfig, PLoRAGate, PLoRALinear

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
"""Tensor file of both formats (the name peft uses)."""
PLORA_CONFIG_NAME = "plora_config.json"
"""Config file of a PLoRA adapter (a peft LoRA folder has ``adapter_config.json`` instead)."""
PLORA_ADAPTER_FORMAT = "reclora_ds.plora_adapter"
PLORA_ADAPTER_FORMAT_VERSION = 1

# Name prefixes that wrappers add in front of the backbone's own module names, stripped repeatedly:
# DeepSpeed engines / DDP (``module.``), torch.compile (``_orig_mod.``), a peft model (``base_model.model.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
# Name components that wrappers insert inside the names (activation checkpointing, FSDP); dropped anywhere.
WRAPPER_COMPONENTS = frozenset({"_checkpoint_wrapped_module", "_fsdp_wrapped_module"})

# Key naming of a peft LoRA (checked against what peft 0.21 saves for a PeftModelForCausalLM):
# ``base_model.model.<backbone module>.lora_A.weight`` [r, d_in] and ``...lora_B.weight`` [d_out, r].
PEFT_KEY_PREFIX = "base_model.model."
PEFT_LORA_A_SUFFIX = ".lora_A.weight"
PEFT_LORA_B_SUFFIX = ".lora_B.weight"

# How many names an error message lists per kind of problem.
_NAMES_SHOWN = 10


class AdapterConfigMismatchError(ValueError):
    """The adapter's PLoRA config (or replaced modules) differs from the model's or the given one."""


class AdapterKeyError(KeyError):
    """The adapter's tensors do not match the model's PLoRA tensors (missing, unexpected, shape)."""

    def __str__(self) -> str:  # KeyError would print the message repr()-quoted
        return str(self.args[0]) if self.args else ""


@dataclass
class PLoRAAdapterManifest:
    """The contents of ``plora_config.json``.

    Example:
        >>> manifest = read_plora_adapter_config("runs/x/adapter")  # doctest: +SKIP
        >>> inject_plora(backbone, manifest.config)  # doctest: +SKIP
    """

    config: PLoRAConfig
    """The bank and gate settings the adapter was trained with."""
    replaced_modules: list[str]
    """Backbone module names wrapped by PLoRA (``model.layers.0.self_attn.q_proj``, ...)."""
    base_model_name_or_path: str | None = None
    """The backbone the adapter belongs to, when the trainer recorded it."""
    base_model_sha256: str | None = None
    """A checksum of that backbone, when the trainer recorded one."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Everything the trainer passed as ``extra`` (JSON values)."""
    format_version: int = PLORA_ADAPTER_FORMAT_VERSION


class EffectiveLoRA(NamedTuple):
    """One projection's LoRA for one sample: ``delta W = scaling * B @ A``."""

    A: torch.Tensor
    """[r_eff, d_in]"""
    B: torch.Tensor
    """[d_out, r_eff]"""
    scaling: float
    """PLoRA's ``alpha / rank`` (the same for every rank the export has)."""


# --- names ----------------------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """``name`` without wrapper prefixes and components: the backbone's own name for it.

    >>> canonical_name("module.base_model.model.model.layers.0.self_attn.q_proj.plora_A")
    'model.layers.0.self_attn.q_proj.plora_A'
    """
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                stripped = True
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def _matches_target(module_name: str, target_modules: Iterable[str]) -> bool:
    """The suffix rule of :func:`~reclora_ds.models.inject.inject_plora` and of peft's list targets."""
    return any(module_name == t or module_name.endswith(f".{t}") for t in target_modules)


def _shown(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
    return f"{names[:_NAMES_SHOWN]}{more}"


def _plora_layers(model: nn.Module) -> dict[str, PLoRALinear]:
    """The model's PLoRA layers by canonical module name, in model order."""
    layers = {
        canonical_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, PLoRALinear)
    }
    if not layers:
        raise ValueError("the model has no PLoRA layers; call inject_plora first")
    return layers


def _shared_gate(model: nn.Module) -> PLoRAGate | None:
    """The shared gate registered by ``inject_plora`` on the backbone root, also through wrappers."""
    for name, module in model.named_modules():
        if isinstance(module, PLoRAGate) and canonical_name(name) == SHARED_GATE_NAME:
            return module
    return None


def _gate_of(layer: PLoRALinear, shared_gate: PLoRAGate | None) -> PLoRAGate:
    gate = layer.plora_gate if layer.plora_gate is not None else shared_gate
    if gate is None:
        raise ValueError(f"a PLoRA layer has no gate of its own and the model has no {SHARED_GATE_NAME!r}")
    return gate


def _plora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every PLoRA parameter and buffer of ``model`` by canonical name (the live tensors, not copies)."""
    tensors: dict[str, torch.Tensor] = {}
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in named:
        if not is_plora_parameter_name(name):
            continue
        key = canonical_name(name)
        if key in tensors and tensors[key] is not tensor:
            raise ValueError(
                f"two PLoRA tensors of the model share the name {key!r} once wrappers are stripped"
            )
        tensors[key] = tensor
    return tensors


# --- config checks --------------------------------------------------------------------------------------


# PLoRAConfig fields that choose how the adapter computes, not what it is: neither saved nor compared, so an
# adapter trained with one precision loads under another (and adapters saved before the field existed load).
RUNTIME_FIELDS = ("compute_dtype",)


def _config_fields(config: PLoRAConfig) -> dict[str, Any]:
    """The saved and compared PLoRAConfig fields (all but :data:`RUNTIME_FIELDS`)."""
    fields = dataclasses.asdict(config)
    for name in RUNTIME_FIELDS:
        del fields[name]
    fields["target_modules"] = list(config.target_modules)
    return fields


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _model_config_mismatches(model: nn.Module, config: PLoRAConfig) -> list[str]:
    """The ``config`` fields that the model's PLoRA layers and gates contradict, one line per field."""
    layers = _plora_layers(model)
    shared_gate = _shared_gate(model)
    found: dict[str, set] = {}

    def record(name: str, value: Any) -> None:
        found.setdefault(name, set()).add(value)

    for layer in layers.values():
        record("num_experts", layer.plora_A.shape[0])
        record("rank", layer.plora_A.shape[1])
        record("alpha", layer.scale * layer.rank)
        record("mixing", layer.mixing)
        dropout = layer.plora_dropout
        record("dropout", float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0)
        record("shared_gate", layer.plora_gate is None)
        gate = _gate_of(layer, shared_gate)
        record("num_experts", gate.proj_out.out_features)
        record("crm_dim", gate.norm.normalized_shape[0])
        record("gate_hidden", gate.proj_in.out_features)
        record("gate_dropout", float(gate.dropout.p))
        record("temperature", float(gate.temperature))
    expected = _config_fields(config)
    problems = [
        f"{name}: expected {expected[name]!r}, the model has {sorted(values, key=repr)}"
        for name, values in found.items()
        if not all(_same(expected[name], value) for value in values)
    ]
    # target_modules: every PLoRA layer is a target, and no target Linear was left unwrapped.
    not_targets = [name for name in layers if not _matches_target(name, config.target_modules)]
    unwrapped = [
        canonical_name(name)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not name.endswith(".base_layer")
        and _matches_target(canonical_name(name), config.target_modules)
    ]
    if not_targets or unwrapped:
        problems.append(
            f"target_modules: expected {list(config.target_modules)}; PLoRA layers that match none of them: "
            f"{_shown(not_targets)}; matching Linear layers without PLoRA: {_shown(unwrapped)}"
        )
    return problems


# --- PLoRA adapter --------------------------------------------------------------------------------------


def save_plora_adapter(
    model: nn.Module,
    config: PLoRAConfig,
    out_dir: str | os.PathLike[str],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the PLoRA banks and gates of ``model`` as a PLoRA adapter folder (see the module docstring).

    Args:
        model: the module :func:`~reclora_ds.models.inject.inject_plora` adapted, bare or inside wrappers
            (a DeepSpeed engine, DDP, a peft model, torch.compile); names are stored without the wrappers.
            Under ZeRO-3 gather the parameters first (partitioned tensors fail the shape check).
        config: the config ``inject_plora`` was called with; it must describe the model.
        out_dir: created if needed; its two files are replaced.
        extra: JSON values stored as ``extra``; its ``base_model_name_or_path`` and ``base_model_sha256``
            are also stored at the top level of ``plora_config.json``.

    Returns:
        ``out_dir``.

    Raises:
        AdapterConfigMismatchError: ``config`` contradicts the model (the message names the fields).
    """
    extra = dict(extra or {})
    problems = _model_config_mismatches(model, config)
    if problems:
        raise AdapterConfigMismatchError(
            "the PLoRAConfig does not describe the model's PLoRA layers:\n  " + "\n  ".join(problems)
        )
    tensors = {
        name: t.detach().to("cpu", copy=True).contiguous() for name, t in _plora_tensors(model).items()
    }
    manifest = {
        "format": PLORA_ADAPTER_FORMAT,
        "format_version": PLORA_ADAPTER_FORMAT_VERSION,
        "plora_config": _config_fields(config),
        "replaced_modules": list(_plora_layers(model)),
        "base_model_name_or_path": _optional_str(extra.get("base_model_name_or_path")),
        "base_model_sha256": _optional_str(extra.get("base_model_sha256")),
        "extra": extra,
    }
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"  # fails early on non-JSON extra values
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: a folder with a config has complete weights.
    # One metadata entry only (peft's): safetensors writes metadata in hash order, so the file stays
    # byte-identical between saves of the same tensors.
    _write_safetensors(out / ADAPTER_WEIGHTS_NAME, tensors, {"format": "pt"})
    write_text_atomic(out / PLORA_CONFIG_NAME, text)
    logger.info(
        "PLoRA adapter (%d tensors, %d modules) -> %s", len(tensors), len(manifest["replaced_modules"]), out
    )
    return out


def read_plora_adapter_config(adapter_dir: str | os.PathLike[str]) -> PLoRAAdapterManifest:
    """Parse ``plora_config.json`` of a PLoRA adapter folder (no tensors are read).

    Raises:
        FileNotFoundError: no ``plora_config.json``.
        AdapterConfigMismatchError: another format or version, or PLoRAConfig fields unknown or missing.
    """
    path = Path(adapter_dir) / PLORA_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a PLoRA adapter folder (no {PLORA_CONFIG_NAME})")
    data = json.loads(path.read_text())
    if (
        data.get("format") != PLORA_ADAPTER_FORMAT
        or data.get("format_version") != PLORA_ADAPTER_FORMAT_VERSION
    ):
        raise AdapterConfigMismatchError(
            f"{path}: format {data.get('format')!r} version {data.get('format_version')!r}; this reclora_ds "
            f"reads {PLORA_ADAPTER_FORMAT!r} version {PLORA_ADAPTER_FORMAT_VERSION}"
        )
    fields = data.get("plora_config", {})
    known = {f.name for f in dataclasses.fields(PLoRAConfig)} - set(RUNTIME_FIELDS)
    unknown, missing = set(fields) - known, known - set(fields)
    if unknown or missing:
        raise AdapterConfigMismatchError(
            f"{path}: plora_config has unknown fields {sorted(unknown)} and lacks fields {sorted(missing)}"
        )
    return PLoRAAdapterManifest(
        config=PLoRAConfig(**fields),
        replaced_modules=list(data["replaced_modules"]),
        base_model_name_or_path=data.get("base_model_name_or_path"),
        base_model_sha256=data.get("base_model_sha256"),
        extra=dict(data.get("extra") or {}),
        format_version=data["format_version"],
    )


def load_plora_adapter(
    model: nn.Module, adapter_dir: str | os.PathLike[str], config: PLoRAConfig | None = None
) -> PLoRAAdapterManifest:
    """Load a PLoRA adapter folder into a model that already has PLoRA layers, strictly.

    Checks, in order, and raises with every problem found:

    1. the adapter's PLoRAConfig against ``config`` (when given) field by field, against what the model's
       layers and gates show (num_experts, rank, alpha, mixing, dropouts, gate sizes, temperature,
       shared_gate, target_modules), and its replaced modules against the model's PLoRA layers;
    2. its tensors against the model's PLoRA tensors: missing keys, unexpected keys, shape mismatches.

    Values are copied into the model's parameters (cast to their dtype and device).

    Args:
        model: the backbone after ``inject_plora(model, manifest.config)``, bare or wrapped.
        adapter_dir: a folder written by :func:`save_plora_adapter`.
        config: the config the caller built the model with, if it should be compared too.

    Returns:
        The adapter's manifest.

    Raises:
        AdapterConfigMismatchError: a config field (named in the message) or the replaced modules differ.
        AdapterKeyError: missing, unexpected or wrongly shaped tensors (all listed in the message).
    """
    manifest = read_plora_adapter_config(adapter_dir)
    problems = []
    if config is not None:
        given, saved = _config_fields(config), _config_fields(manifest.config)
        problems += [
            f"{name}: the adapter has {saved[name]!r}, the given config {given[name]!r}"
            for name in saved
            if not _same(saved[name], given[name])
        ]
    problems += _model_config_mismatches(model, manifest.config)
    model_modules = list(_plora_layers(model))
    if set(model_modules) != set(manifest.replaced_modules):
        problems.append(
            "replaced_modules: in the adapter only: "
            f"{_shown(set(manifest.replaced_modules) - set(model_modules))}; in the model only: "
            f"{_shown(set(model_modules) - set(manifest.replaced_modules))}"
        )
    if problems:
        raise AdapterConfigMismatchError(
            f"the PLoRA adapter {adapter_dir} does not fit the model:\n  " + "\n  ".join(problems)
        )

    targets = _plora_tensors(model)
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS_NAME), framework="pt") as f:
        saved_keys = set(f.keys())
        missing = set(targets) - saved_keys
        unexpected = saved_keys - set(targets)
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in saved_keys & set(targets)}
        wrong_shape = [
            f"{key}: adapter {shape}, model {tuple(targets[key].shape)}"
            for key, shape in sorted(shapes.items())
            if shape != tuple(targets[key].shape)
        ]
        if missing or unexpected or wrong_shape:
            lines = []
            if missing:
                lines.append(f"missing keys ({len(missing)}): {_shown(missing)}")
            if unexpected:
                lines.append(f"unexpected keys ({len(unexpected)}): {_shown(unexpected)}")
            if wrong_shape:
                lines.append(
                    f"shape mismatches ({len(wrong_shape)}): " + "; ".join(wrong_shape[:_NAMES_SHOWN])
                )
            raise AdapterKeyError(
                f"the PLoRA adapter {adapter_dir} does not match the model's PLoRA tensors:\n  "
                + "\n  ".join(lines)
            )
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(f.get_tensor(key))
    logger.info("PLoRA adapter %s loaded (%d tensors)", adapter_dir, len(targets))
    return manifest


# --- personalized LoRA ----------------------------------------------------------------------------------


def _one_state(crm_state: torch.Tensor) -> torch.Tensor:
    """A [d_c] or [1, d_c] CRM state as [1, d_c]."""
    crm_state = torch.as_tensor(crm_state)
    if crm_state.ndim == 1:
        crm_state = crm_state[None, :]
    if crm_state.ndim != 2 or crm_state.shape[0] != 1:
        raise ValueError(f"crm_state must be one sample, [d_c] or [1, d_c]; got {tuple(crm_state.shape)}")
    return crm_state


@torch.no_grad()
def module_gate_weights(model: nn.Module, crm_state: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each PLoRA layer's gate weights ``alpha`` [N] for one sample, by canonical module name.

    Gates run in eval mode (no gate dropout), as at inference; their train/eval mode is restored after.

    Shapes:
        crm_state: [d_c] or [1, d_c] -> {module name: alpha [N]}, each summing to 1.
    """
    state = _one_state(crm_state)
    layers = _plora_layers(model)
    shared_gate = _shared_gate(model)
    alpha_of_gate: dict[PLoRAGate, torch.Tensor] = {}
    for layer in layers.values():
        gate = _gate_of(layer, shared_gate)
        if gate not in alpha_of_gate:
            was_training = gate.training
            gate.eval()
            try:
                weight = gate.proj_in.weight
                alpha_of_gate[gate] = gate(state.to(device=weight.device, dtype=weight.dtype))[0]  # [N]
            finally:
                gate.train(was_training)
    return {name: alpha_of_gate[_gate_of(layer, shared_gate)] for name, layer in layers.items()}


@torch.no_grad()
def personalized_lora(model: nn.Module, crm_state: torch.Tensor) -> dict[str, EffectiveLoRA]:
    """Every adapted projection's LoRA for one sample: ``scaling * B @ A`` is that sample's PLoRA update.

    ``products``: rank ``N r``, ``A = [A_1; ...; A_N]``, ``B = [alpha_1 B_1, ..., alpha_N B_N]`` (exact).
    ``factors``: rank ``r``, ``A = sum_k alpha_k A_k``, ``B = sum_k alpha_k B_k``.
    The tensors are new (detached, on the bank's device and dtype).

    Args:
        model: a PLoRA model (bare or wrapped).
        crm_state: the sample's CRM state.

    Shapes:
        crm_state: [d_c] or [1, d_c] -> {module name: (A [r_eff, d_in], B [d_out, r_eff], scaling)}.
    """
    layers = _plora_layers(model)
    alphas = module_gate_weights(model, crm_state)
    result = {}
    for name, layer in layers.items():
        bank_a, bank_b = layer.plora_A, layer.plora_B  # [N, r, d_in], [N, d_out, r]
        alpha = alphas[name].to(device=bank_a.device, dtype=bank_a.dtype)  # [N]
        n, r, d_in = bank_a.shape
        if layer.mixing == "products":
            a_eff = bank_a.reshape(n * r, d_in).clone()  # [N*r, d_in], row k*r + j is row j of A_k
            # [N, d_out, r] -> [d_out, N, r] -> [d_out, N*r]: column k*r + j is alpha_k times column j of B_k
            b_eff = (bank_b * alpha[:, None, None]).permute(1, 0, 2).reshape(layer.out_features, n * r)
        else:
            a_eff = torch.einsum("n,nri->ri", alpha, bank_a)  # [r, d_in]
            b_eff = torch.einsum("n,nor->or", alpha, bank_b)  # [d_out, r]
        result[name] = EffectiveLoRA(a_eff.contiguous(), b_eff.contiguous(), float(layer.scale))
    return result


def _lora_alpha(rank: int, scaling: float) -> float | int:
    """peft's ``lora_alpha`` for a ``scaling = lora_alpha / r``; an int when it is one."""
    value = scaling * rank
    return int(round(value)) if math.isclose(value, round(value), rel_tol=0, abs_tol=1e-9) else value


def save_peft_adapter(
    personalized: Mapping[str, EffectiveLoRA | tuple[torch.Tensor, torch.Tensor, float]],
    out_dir: str | os.PathLike[str],
    base_model_name_or_path: str | os.PathLike[str] | None = None,
    target_modules: Sequence[str] | None = None,
) -> Path:
    """Write LoRAs as a standard peft LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    The config is peft's own ``LoraConfig`` (task CAUSAL_LM, dropout 0, bias none) with ``r`` the most
    common rank and ``lora_alpha = scaling * r``, so peft's ``lora_alpha / r`` is the PLoRA scaling; modules
    with another rank or scaling get ``rank_pattern`` / ``alpha_pattern`` entries. Tensors are named as peft
    names them for a causal LM: ``base_model.model.<module>.lora_A.weight`` [r, d_in] and
    ``...lora_B.weight`` [d_out, r].

    Args:
        personalized: ``{backbone module name: (A [r, d_in], B [d_out, r], scaling)}``, e.g. from
            :func:`personalized_lora`.
        out_dir: created if needed.
        base_model_name_or_path: recorded in the config (peft loads it when none is given).
        target_modules: peft's ``target_modules``; default: the last name components of the modules
            (``["q_proj", "v_proj"]``). Every module must match one, and the backbone's Linear layers that
            match should be exactly the exported ones (peft leaves others at zero and warns).

    Returns:
        ``out_dir``.
    """
    from peft import LoraConfig

    if not personalized:
        raise ValueError("no LoRA to save")
    tensors: dict[str, torch.Tensor] = {}
    settings: dict[str, tuple[int, float | int]] = {}
    for name, (lora_a, lora_b, scaling) in personalized.items():
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
            raise ValueError(
                f"{name}: need A [r, d_in] and B [d_out, r], "
                f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
            )
        rank = lora_a.shape[0]
        settings[name] = (rank, _lora_alpha(rank, scaling))
        tensors[f"{PEFT_KEY_PREFIX}{name}{PEFT_LORA_A_SUFFIX}"] = (
            lora_a.detach().to("cpu", copy=True).contiguous()
        )
        tensors[f"{PEFT_KEY_PREFIX}{name}{PEFT_LORA_B_SUFFIX}"] = (
            lora_b.detach().to("cpu", copy=True).contiguous()
        )
    if target_modules is None:
        target_modules = sorted({name.rpartition(".")[2] for name in personalized})
    target_modules = list(target_modules)
    off_target = [name for name in personalized if not _matches_target(name, target_modules)]
    if off_target:
        raise ValueError(f"modules that match none of target_modules={target_modules}: {_shown(off_target)}")
    default_rank, default_alpha = Counter(settings.values()).most_common(1)[0][0]
    # Pattern keys are regular expressions matched against the module name; escape the names.
    rank_pattern = {re.escape(n): r for n, (r, _) in settings.items() if r != default_rank}
    alpha_pattern = {re.escape(n): a for n, (_, a) in settings.items() if a != default_alpha}
    config = LoraConfig(
        r=default_rank,
        lora_alpha=default_alpha,
        target_modules=target_modules,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=None if base_model_name_or_path is None else str(base_model_name_or_path),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        inference_mode=True,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_safetensors(out / ADAPTER_WEIGHTS_NAME, tensors, {"format": "pt"})
    config.save_pretrained(str(out))
    logger.info(
        "peft LoRA (%d modules, r=%d, lora_alpha=%s) -> %s",
        len(personalized),
        default_rank,
        default_alpha,
        out,
    )
    return out


# --- files ----------------------------------------------------------------------------------------------


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
