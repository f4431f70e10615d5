"""RecLLM: a frozen causal LM, a frozen CRM and Personalized LoRA between them (paper §3.1-3.3).

Shape legend:
    B    batch (samples)
    T    tokens of a left-padded prompt (+ answer); every sequence ends at position T - 1
    V    vocabulary size
    K    trailing positions whose logits are computed (``T - min(answer_position)``)
    d_c  width of the CRM state R_c
    N    experts (meta-LoRAs) of each PLoRA bank
    G    distinct PLoRA gates (one per adapted projection, or one shared)

Modes (:data:`MODES`):
    ``plora``      PLoRA banks on ``q_proj`` / ``v_proj`` mixed per sample by gates on the frozen CRM state
                   (:mod:`reclora_ds.models.plora`, :mod:`reclora_ds.models.inject`); trainable: banks + gates.
    ``lora``       peft's own LoRA on the same projections (the "w/o meta-LoRA" ablations); no CRM.
    ``zero_shot``  nothing trainable: the frozen LM as it is.

Forward (``plora``): ``R_c = CRM(ID view).hidden`` [B, d_c] under ``no_grad`` -> every gate gives ``alpha``
[B, N] once per forward -> the LM runs on the prompt tokens with ``position_ids`` from the attention mask
(so a left-padded row sees the same positions as alone) and only the last K positions go through the
LM head. The loss is the causal-LM cross-entropy on the answer tokens only; the score is
``p(yes) = softmax([s_yes, s_no])[0]`` at ``answer_position`` (Eq. 4 / 16), with the token ids resolved from
the tokenizer (:class:`reclora_ds.batch.AnswerTokens`).

Activation checkpointing recomputes the adapted layers during backward, so the gate weights must still be
routed then: open :meth:`RecLLM.routing` around forward *and* backward (the recipe does)::

    with model.routing(batch):
        loss = model(batch).loss
        loss.backward()

Without an open routing block, ``forward`` opens one for its own duration (enough without checkpointing).
The module is pure (no I/O): :func:`reclora_ds.training.rec_llm_io.build_rec_llm` loads the backbone, the
tokenizer and the CRM checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from reclora_ds.batch import IGNORE_INDEX, AnswerTokens
from reclora_ds.models.inject import inject_plora, route_gate_inputs
from reclora_ds.models.plora import PLoRAConfig, PLoRAGate

log = logging.getLogger(__name__)

MODES = ("plora", "lora", "zero_shot")
LM_BATCH_KEYS = ("input_ids", "attention_mask", "answer_position")


@dataclasses.dataclass
class RecLLMConfig:
    """What a RecLLM is made of: the adapter and how the frozen parts behave (no paths, no precision).

    :class:`reclora_ds.training.plora_config.PLoRATrainConfig` inherits these fields; the stage-2 YAML
    section sets them (``plora.mode``, ``plora.adapter.num_experts``...).
    """

    mode: str = "plora"
    """``plora`` (RecLoRA), ``lora`` (peft LoRA: "w/o meta-LoRA") or ``zero_shot`` (evaluation only)."""
    adapter: PLoRAConfig = dataclasses.field(default_factory=PLoRAConfig)
    """Bank and gate settings of mode ``plora`` (``reclora_ds.models.plora.PLoRAConfig``); ``crm_dim`` must
    be the CRM's d_c (the loaders set it from the CRM checkpoint)."""
    lora_rank: int = 8
    """Rank of mode ``lora`` (8; 128 for "w/o meta-LoRA, same params")."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator of mode ``lora`` (peft ``lora_alpha``; the update is scaled by alpha / rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input of mode ``lora`` (peft ``lora_dropout``)."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Module-name suffixes of the nn.Linear layers that mode ``lora`` adapts (peft ``target_modules``)."""
    crm_train_mode: bool = False
    """Keep the frozen CRM's dropout active (the authors' code); default eval mode."""
    gradient_checkpointing: bool = False
    """Recompute the LM's layers in backward (non-reentrant; the paper uses it for N_m = 16); backward must
    run inside ``routing``."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.lora_rank < 1 or not self.lora_alpha > 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(
                f"need lora_rank >= 1, lora_alpha > 0, 0 <= lora_dropout < 1; got "
                f"{self.lora_rank}, {self.lora_alpha}, {self.lora_dropout}"
            )
        self.lora_target_modules = tuple(self.lora_target_modules)


class RecLLMOutput(NamedTuple):
    """``loss``: scalar CE over the answer tokens (``None`` without labels); ``p_yes`` [B] float32;
    ``answer_logits`` [B, 2] float32, the logits of (Yes, No) at the answer position."""

    loss: torch.Tensor | None
    p_yes: torch.Tensor
    answer_logits: torch.Tensor


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... from each row's first real token; 0 on the left padding. [B, T] -> [B, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_logits(
    llm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int
) -> torch.Tensor:
    """The causal LM's logits of the last ``keep`` positions [B, K, V] of left-padded prompts [B, T].

    Column c is position T - K + c; ``position_ids`` come from the mask. The K positions go to the model as an
    index tensor, not the int K: an index gathers a contiguous [B, K, D] copy, so the LM head is one
    [B K, D] @ [D, V] GEMM, while the int's strided slice made torch's matmul expand the [V, D] weight to
    [B, D, V] and run a batched GEMM, forward and backward (its cost: docs/PLORA_BENCH.md).
    """
    width = input_ids.shape[1]
    return llm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=torch.arange(width - keep, width, device=input_ids.device),
    ).logits


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions.

    ``logits`` [B, K, V] are the last K positions; ``labels`` [B, K] the labels of the same positions
    (``IGNORE_INDEX`` where there is no answer token): position t's logits predict the label at t + 1.
    """
    predicted = logits[:, :-1].float()  # [B, K-1, V]
    target = labels[:, 1:]  # [B, K-1]
    return F.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX
    )


def enable_activation_checkpointing(llm: nn.Module) -> None:
    """Non-reentrant activation checkpointing of a Hugging Face model's layers (any transformers version)."""
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class RecLLM(nn.Module):
    """A frozen causal LM + a frozen CRM + PLoRA (or peft LoRA, or nothing) for yes/no recommendation.

    Args:
        llm: the causal LM (e.g. ``LlamaForCausalLM``); adapted in place (mode ``plora``) or wrapped by peft
            (mode ``lora``). All its own weights are frozen.
        answers: the Yes / No token ids (:func:`reclora_ds.data.prompts.resolve_answer_tokens`).
        crm: the stage-1 CRM (``forward(batch) -> CRMOutput(logit, hidden [B, d_c])``); mode ``plora`` only.
            Frozen, and kept in eval mode unless ``config.crm_train_mode``.
        config: the mode and adapter settings.

    Shapes:
        batch: ``input_ids`` / ``attention_mask`` [B, T] (left-padded), ``answer_position`` [B], optional
        ``labels`` [B, T], plus the CRM's ID-view tensors (:mod:`reclora_ds.training.plora_data`)
        -> :class:`RecLLMOutput` (loss, p_yes [B], answer_logits [B, 2]).

    Example::

        model = RecLLM(llm, resolve_answer_tokens(tokenizer), crm, RecLLMConfig(adapter=PLoRAConfig(crm_dim=256)))
        with model.routing(batch):
            out = model(batch)
            out.loss.backward()
    """

    def __init__(
        self,
        llm: nn.Module,
        answers: AnswerTokens,
        crm: nn.Module | None = None,
        config: RecLLMConfig | None = None,
    ) -> None:
        super().__init__()
        config = config or RecLLMConfig()
        self.config = config
        self.mode = config.mode
        self.answers = answers
        for param in llm.parameters():
            param.requires_grad_(False)
        if config.gradient_checkpointing:
            enable_activation_checkpointing(llm)
        if self.mode == "plora":
            if crm is None:
                raise ValueError("mode 'plora' needs the CRM whose state drives the gates")
            crm_dim = getattr(crm, "hidden_dim", config.adapter.crm_dim)
            if crm_dim != config.adapter.crm_dim:
                raise ValueError(
                    f"PLoRAConfig.crm_dim={config.adapter.crm_dim} but the CRM's d_c is {crm_dim}"
                )
            inject_plora(llm, config.adapter)  # freezes everything but the banks and gates
        elif self.mode == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=list(config.lora_target_modules),
                bias="none",
                task_type="CAUSAL_LM",
            )
            llm = get_peft_model(llm, lora)
        self.llm = llm
        self.crm = crm if self.mode == "plora" else None
        if self.crm is not None:
            for param in self.crm.parameters():
                param.requires_grad_(False)
            self.crm.train(config.crm_train_mode)
        self._routed_ids: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------------
    # modes and parameters
    # ------------------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> RecLLM:
        """Set the train/eval mode; the frozen CRM stays in eval mode unless ``crm_train_mode``."""
        super().train(mode)
        if self.crm is not None and not self.config.crm_train_mode:
            self.crm.eval()
        return self

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the optimizer updates (PLoRA banks and gates, or peft's LoRA), by name."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the trainable parameters (the adapter), by name."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self.trainable_parameters().items()}

    def gates(self) -> list[PLoRAGate]:
        """The distinct PLoRA gates, in module order (empty outside mode ``plora``)."""
        return list(dict.fromkeys(m for m in self.llm.modules() if isinstance(m, PLoRAGate)))

    # ------------------------------------------------------------------------------------------------------
    # CRM state and routing
    # ------------------------------------------------------------------------------------------------------

    def crm_state(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The frozen CRM's hidden state R_c [B, d_c] of the batch's ID view (no gradient)."""
        if self.crm is None:
            raise RuntimeError(f"mode {self.mode!r} has no CRM")
        with torch.no_grad():
            hidden = self.crm(batch).hidden  # [B, d_c]
        gates = self.gates()
        return hidden.to(gates[0].proj_in.weight.dtype) if gates else hidden

    @contextlib.contextmanager
    def routing(self, batch: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Route the batch's CRM state to the PLoRA gates for every forward (and backward) inside the block.

        A no-op outside mode ``plora``. Calls of :meth:`forward` inside must get the same batch.
        """
        if self.mode != "plora":
            yield
            return
        if self._routed_ids is not None:
            raise RuntimeError("RecLLM.routing blocks cannot be nested")
        with route_gate_inputs(self.llm, self.crm_state(batch)):
            self._routed_ids = batch["sample_id"]
            try:
                yield
            finally:
                self._routed_ids = None

    @torch.no_grad()
    def gate_weights(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Every gate's weights for the batch, without dropout: [G, B, N] (for gate statistics)."""
        gates = self.gates()
        if not gates:
            raise RuntimeError(f"mode {self.mode!r} has no gates")
        state = self.crm_state(batch)
        modes = [gate.training for gate in gates]
        try:
            for gate in gates:
                gate.eval()
            return torch.stack([gate(state) for gate in gates])
        finally:
            for gate, mode in zip(gates, modes):
                gate.train(mode)

    # ------------------------------------------------------------------------------------------------------
    # forward and scoring
    # ------------------------------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, torch.Tensor]) -> RecLLMOutput:
        """Loss on the answer tokens (when the batch has ``labels``) and p(yes) of every sample."""
        missing = [k for k in LM_BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"the batch lacks {missing}; it has {sorted(batch)}")
        if self.mode != "plora":
            return self._forward_lm(batch)
        if self._routed_ids is None:
            with self.routing(batch):
                return self._forward_lm(batch)
        routed = self._routed_ids
        if routed.shape != batch["sample_id"].shape or not torch.equal(routed, batch["sample_id"]):
            raise RuntimeError("forward got another batch than the one its routing block was opened for")
        return self._forward_lm(batch)

    def _forward_lm(self, batch: Mapping[str, torch.Tensor]) -> RecLLMOutput:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        answer_position = batch["answer_position"]  # [B]
        width = input_ids.shape[1]
        # Left padding: every sequence ends at T - 1, so the positions that matter (the answer position and
        # the answer tokens after it) are the last K; only those go through the LM head ([B, K, V]).
        keep = int(width - answer_position.min())
        logits = last_logits(self.llm, input_ids, attention_mask, keep)  # [B, K, V]
        rows = torch.arange(len(input_ids), device=logits.device)
        at_answer = logits[rows, answer_position - (width - keep)]  # [B, V]
        answer_logits = at_answer[:, [self.answers.yes_id, self.answers.no_id]].float()  # [B, 2]
        p_yes = torch.softmax(answer_logits, dim=-1)[:, 0]
        loss = None
        if "labels" in batch:
            loss = answer_loss(logits, batch["labels"][:, width - keep :])
        return RecLLMOutput(loss=loss, p_yes=p_yes, answer_logits=answer_logits)

    @torch.no_grad()
    def score(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """p(yes) [B] (float32) of each sample: ``softmax([s_yes, s_no])[0]`` at the answer position."""
        return self.forward(batch).p_yes
