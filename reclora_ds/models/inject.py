"""Put PLoRA into a model and route the CRM state to its gates.

Shape legend:
    B    batch (samples)
    T    tokens
    D    hidden width
    N    experts (meta-LoRAs)
    r    LoRA rank
    d_c  width of the frozen CRM hidden state

- :func:`inject_plora` replaces the targeted ``nn.Linear`` projections by :class:`PLoRALinear` wrappers
  and freezes every parameter that is not a PLoRA bank or gate parameter.
- :func:`route_gate_inputs` is a context manager (peft's ``poly`` tuner style): inside the ``with`` block,
  each forward of the model computes every gate's weights once from the CRM state [B, d_c], and forward
  pre-hooks hand each PLoRA layer its gate's weights [B, N]. Hooks and weights are removed on exit, so no
  routing state outlives the block.

Example::

    names = inject_plora(llm, PLoRAConfig(crm_dim=256))
    optimizer = torch.optim.AdamW(plora_parameters(llm).values(), lr=1e-3)
    with route_gate_inputs(llm, crm_state):  # crm_state: [B, d_c] from the frozen CRM
        loss = llm(**batch).loss
        loss.backward()  # inside the block when activation checkpointing recomputes layers
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from reclora_ds.models.plora import PLORA_PREFIX, PLoRAConfig, PLoRAGate, PLoRALinear

logger = logging.getLogger(__name__)

# With ``shared_gate=True`` the one gate is registered on the model root under this name.
SHARED_GATE_NAME = f"{PLORA_PREFIX}gate"

# How many candidate module names a "nothing matched" error shows.
_NAMES_SHOWN = 12


def is_plora_parameter_name(name: str) -> bool:
    """Whether a dotted parameter / state-dict name belongs to a PLoRA bank or gate."""
    return any(part.startswith(PLORA_PREFIX) for part in name.split("."))


def _matches_target(module_name: str, target_modules: tuple[str, ...]) -> bool:
    """Suffix match on whole name components: ``q_proj`` matches ``model.layers.0.self_attn.q_proj``."""
    return any(module_name == target or module_name.endswith(f".{target}") for target in target_modules)


def _no_match_message(model: nn.Module, config: PLoRAConfig) -> str:
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    leaf_names = sorted({name.rpartition(".")[2] for name in linear_names})
    return (
        f"no nn.Linear module name ends with any of target_modules={config.target_modules}. "
        f"Linear leaf names in this model: {leaf_names[:_NAMES_SHOWN]}; "
        f"e.g. {linear_names[:_NAMES_SHOWN]}"
    )


def _move_adapter_to_base_device(layer: PLoRALinear) -> None:
    """Place the new bank and gate where the frozen projection already is (as peft does)."""
    base_weight = getattr(layer.base_layer, "weight", None)
    if base_weight is None:
        return
    for name, param in layer.named_parameters():
        if is_plora_parameter_name(name) and param.device != base_weight.device:
            param.data = param.data.to(base_weight.device)


def mark_only_plora_as_trainable(model: nn.Module) -> None:
    """``requires_grad`` True for PLoRA bank and gate parameters, False for everything else."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_plora_parameter_name(name))


def inject_plora(model: nn.Module, config: PLoRAConfig) -> list[str]:
    """Wrap every targeted ``nn.Linear`` of ``model`` in a :class:`PLoRALinear`, in place.

    A module is targeted when its dotted name ends with one of ``config.target_modules`` (whole
    components: ``q_proj`` matches ``model.layers.0.self_attn.q_proj``). With ``config.shared_gate``
    one :class:`PLoRAGate` is registered on ``model`` as ``plora_gate``; otherwise each layer owns its gate.
    New modules take the train/eval mode of what they replace and sit on its device. Everything that is
    not a PLoRA parameter is frozen afterwards.

    Args:
        model: the model to adapt (e.g. a ``LlamaForCausalLM``); modified in place.
        config: bank and gate settings.

    Returns:
        The dotted names of the replaced modules, in ``named_modules`` order.

    Raises:
        ValueError: when nothing matches (the message lists the model's Linear names), or when the
            model already holds PLoRA layers.
    """
    if any(isinstance(module, PLoRALinear) for module in model.modules()):
        raise ValueError("the model already has PLoRA layers; inject_plora runs once per model")
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _matches_target(name, config.target_modules)
    ]
    if not targets:
        raise ValueError(_no_match_message(model, config))
    if config.shared_gate:
        if hasattr(model, SHARED_GATE_NAME):
            raise ValueError(f"the model already has an attribute {SHARED_GATE_NAME!r}")
        shared_gate = PLoRAGate.from_config(config)
        first_base = model.get_submodule(targets[0])
        shared_gate.to(first_base.weight.device).train(model.training)
        model.add_module(SHARED_GATE_NAME, shared_gate)
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base_layer = getattr(parent, child_name)
        layer = PLoRALinear(base_layer, config)
        layer.train(base_layer.training)  # a new module is in train mode; keep the model's eval/train mode
        _move_adapter_to_base_device(layer)
        setattr(parent, child_name, layer)
    mark_only_plora_as_trainable(model)
    logger.info(
        "PLoRA (N=%d, r=%d, mixing=%s, shared_gate=%s) injected into %d modules: %s",
        config.num_experts,
        config.rank,
        config.mixing,
        config.shared_gate,
        len(targets),
        ", ".join(targets),
    )
    return targets


def plora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The PLoRA bank and gate parameters by dotted name (what the optimizer should see)."""
    return {name: param for name, param in model.named_parameters() if is_plora_parameter_name(name)}


def plora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The PLoRA entries of ``model.state_dict()``, keys as the model names them."""
    return {name: tensor for name, tensor in model.state_dict().items() if is_plora_parameter_name(name)}


class _GateRouter:
    """Routing state of one ``route_gate_inputs`` block: the gate of each layer and this forward's weights."""

    def __init__(self, gate_of_layer: dict[PLoRALinear, PLoRAGate], crm_state: torch.Tensor) -> None:
        self.gate_of_layer = gate_of_layer
        self.gates = list(dict.fromkeys(gate_of_layer.values()))  # distinct gates, model order
        self.crm_state = crm_state
        self.alpha_of_gate: dict[PLoRAGate, torch.Tensor] = {}

    def compute_gate_weights(self, _model: nn.Module, _args: tuple) -> None:
        """Model forward pre-hook: run every gate once for this forward, [B, d_c] -> [B, N] each.

        Runs outside any checkpointed layer, so recomputation during backward reuses these weights
        (and their autograd graph) instead of running the gates again.
        """
        self.alpha_of_gate = {
            gate: gate(self.crm_state.to(gate.proj_in.weight.device)) for gate in self.gates
        }

    def pass_gate_weights(self, layer: PLoRALinear, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """PLoRA layer forward pre-hook: add ``alpha=`` (its gate's weights) to the call."""
        if kwargs.get("alpha") is not None:
            return args, kwargs
        alpha = self.alpha_of_gate.get(self.gate_of_layer[layer])
        if alpha is None:
            raise RuntimeError(
                "a PLoRA layer ran inside route_gate_inputs before the routed model's forward: "
                "call the model that was given to route_gate_inputs, not one of its submodules"
            )
        return args, {**kwargs, "alpha": alpha}

    def clear(self) -> None:
        self.alpha_of_gate = {}


def _gate_of_each_layer(model: nn.Module) -> dict[PLoRALinear, PLoRAGate]:
    layers = [module for module in model.modules() if isinstance(module, PLoRALinear)]
    if not layers:
        raise ValueError("the model has no PLoRA layers; call inject_plora first")
    shared_gate = getattr(model, SHARED_GATE_NAME, None)
    gate_of_layer = {}
    for layer in layers:
        gate = layer.plora_gate if layer.plora_gate is not None else shared_gate
        if not isinstance(gate, PLoRAGate):
            raise ValueError(
                f"a PLoRA layer has no gate of its own and the model has no shared gate {SHARED_GATE_NAME!r}"
            )
        gate_of_layer[layer] = gate
    return gate_of_layer


@contextmanager
def route_gate_inputs(model: nn.Module, crm_state: torch.Tensor) -> Iterator[None]:
    """Inside the block, each forward of ``model`` gives every PLoRA layer its per-sample gate weights.

    On each call of ``model`` a forward pre-hook runs each gate once on ``crm_state`` (detached inside
    the gate); forward pre-hooks on the PLoRA layers then pass ``alpha=`` to them. Under activation
    checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``) the recomputed layers get the
    same weights as long as ``backward()`` runs inside the block and before the next forward.
    Hooks are removed and the weights dropped on exit, also on error.

    Args:
        model: the module that will be called (the one :func:`inject_plora` adapted).
        crm_state: the frozen CRM's hidden state ``R_c``, one row per sample.

    Shapes:
        crm_state: [B, d_c]; each PLoRA layer receives alpha: [B, N].
    """
    router = _GateRouter(_gate_of_each_layer(model), crm_state)
    handles = []
    try:
        handles.append(model.register_forward_pre_hook(router.compute_gate_weights))
        for layer in router.gate_of_layer:
            handles.append(layer.register_forward_pre_hook(router.pass_gate_weights, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        router.clear()
