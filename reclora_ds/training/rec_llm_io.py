"""Building a RecLLM from its parts, and its exported description ``rec_llm.json`` (one format, versioned).

:func:`build_rec_llm` loads the frozen LM (:func:`reclora_ds.llm_loader.load_causal_lm`), its tokenizer and,
for mode ``plora``, the frozen CRM (:func:`reclora_ds.training.checkpoint.load_crm`), and assembles the
(pure) :class:`reclora_ds.models.rec_llm.RecLLM` with the gates' ``crm_dim`` set to the CRM's d_c.

An exported adapter folder (``<run>/adapter``) holds the adapter tensors and ``rec_llm.json``
(``format_version`` :data:`REC_LLM_FORMAT_VERSION`)::

    format, format_version
    mode                 plora | lora
    step                 optimizer steps the adapter was trained for
    rec_llm              the model's RecLLMConfig (mode, adapter, LoRA settings, ...)
    load                 where and how the frozen parts were loaded: backbone, crm_path, dtype,
                         load_in_8bit, attn_implementation, norm_implementation (absent in records
                         written before it existed: the default, fused)
    crm                  the CRM checkpoint's description (crm.json), or null
    answer_tokens        {"yes": [...], "no": [...]} token ids of the answers
    dataset              the processed dataset's name

:func:`load_rec_llm` rebuilds the trained model from such a folder alone and checks it against the record.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from reclora_ds.config import config_from_dict, config_to_dict
from reclora_ds.data.prompts import AnswerTokens, resolve_answer_tokens
from reclora_ds.files import SidecarError, read_sidecar, write_sidecar
from reclora_ds.llm_loader import load_causal_lm, rank_device
from reclora_ds.models.norms import fuse_rms_norms
from reclora_ds.models.rec_llm import RecLLM
from reclora_ds.training.plora_config import PLoRATrainConfig, model_config

log = logging.getLogger(__name__)

REC_LLM_FILE = "rec_llm.json"
REC_LLM_FORMAT = "reclora_ds.rec_llm"
REC_LLM_FORMAT_VERSION = (
    2  # 2: the model config is RecLLMConfig (its adapter under "adapter"), paths in "load"
)
LOAD_KEYS = ("backbone", "crm_path", "load_in_8bit", "attn_implementation", "norm_implementation")


class RecLLMFileError(ValueError):
    """An exported adapter folder that cannot be rebuilt: missing or malformed ``rec_llm.json``, another
    CRM or tokenizer than the run recorded, adapter tensors that do not match."""


def build_rec_llm(cfg: PLoRATrainConfig, dtype: str) -> tuple[RecLLM, Any, Any]:
    """The RecLLM of a stage-2 config, its tokenizer and the CRM checkpoint's description (or None).

    The LM is loaded on the CPU (an 8-bit one on this rank's GPU, where bitsandbytes puts it) with weights of
    ``dtype``, its RMSNorm layers fused when ``cfg.norm_implementation`` says so; mode ``plora`` loads the CRM of ``cfg.crm_path`` and sets ``adapter.crm_dim`` to its d_c.
    """
    device = rank_device() if cfg.load_in_8bit else None
    llm, tokenizer = load_causal_lm(
        cfg.backbone,
        dtype=dtype,
        device=device,
        load_in_8bit=cfg.load_in_8bit,
        attn_implementation=cfg.attn_implementation,
    )
    if cfg.norm_implementation == "fused":
        fuse_rms_norms(llm)
    config = model_config(cfg)
    crm, crm_info = None, None
    if config.mode == "plora":
        if not cfg.crm_path:
            raise ValueError("mode 'plora' needs crm_path (the stage-1 run or checkpoint folder)")
        from reclora_ds.training.checkpoint import load_crm

        crm, crm_info = load_crm(cfg.crm_path)
        config = dataclasses.replace(
            config, adapter=dataclasses.replace(config.adapter, crm_dim=crm_info.hidden_dim)
        )
    model = RecLLM(llm, resolve_answer_tokens(tokenizer), crm, config)
    n_train = sum(p.numel() for p in model.trainable_parameters().values())
    n_all = sum(p.numel() for p in model.parameters())
    log.info("RecLLM mode=%s: %s trainable of %s parameters", config.mode, f"{n_train:,}", f"{n_all:,}")
    return model, tokenizer, crm_info


def describe(
    model: RecLLM,
    cfg: PLoRATrainConfig,
    dtype: str,
    crm_info: Any,
    answers: AnswerTokens,
    step: int,
    dataset: str,
) -> dict[str, Any]:
    """The content of ``rec_llm.json`` for a trained model (see the module docstring)."""
    return {
        "mode": model.config.mode,
        "step": step,
        "rec_llm": config_to_dict(model.config),
        "load": {**{key: getattr(cfg, key) for key in LOAD_KEYS}, "dtype": dtype},
        "crm": None if crm_info is None else crm_info.to_dict(),
        "answer_tokens": {"yes": list(answers.yes_ids), "no": list(answers.no_ids)},
        "dataset": dataset,
    }


def write_description(folder: Path, description: dict[str, Any]) -> None:
    """``rec_llm.json`` (format and version added) into an adapter folder, atomically."""
    write_sidecar(Path(folder) / REC_LLM_FILE, REC_LLM_FORMAT, REC_LLM_FORMAT_VERSION, description)


def read_description(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked ``rec_llm.json`` of an exported adapter folder."""
    path = Path(adapter_dir) / REC_LLM_FILE
    if not path.is_file():
        raise RecLLMFileError(
            f"{path}: no {REC_LLM_FILE}; not an adapter folder exported by the stage-2 recipe"
        )
    try:
        return read_sidecar(
            path,
            REC_LLM_FORMAT,
            REC_LLM_FORMAT_VERSION,
            required=("mode", "rec_llm", "load", "answer_tokens"),
        )
    except SidecarError as exc:
        raise RecLLMFileError(str(exc)) from exc


def load_rec_llm(
    adapter_dir: str | os.PathLike[str],
    *,
    backbone: str | None = None,
    crm_path: str | None = None,
) -> tuple[RecLLM, Any, Any]:
    """Rebuild the trained RecLLM of an exported adapter folder (``<run>/adapter``), in eval mode on the CPU.

    The backbone, the CRM checkpoint and every module setting come from ``rec_llm.json`` (``backbone`` /
    ``crm_path`` replace the recorded paths, e.g. after moving the files). Checks: the CRM found there is
    the one the adapter was trained with (``crm.json`` as recorded), the tokenizer gives the recorded
    Yes / No tokens, and the adapter's tensors are exactly the model's (PLoRA: strict loading of banks and
    gates; LoRA: every ``lora_`` tensor present, nothing unexpected).

    Returns:
        ``(model, tokenizer, crm_info)`` as :func:`build_rec_llm` does.

    Raises:
        RecLLMFileError: a missing / malformed ``rec_llm.json``, another CRM or tokenizer, LoRA tensor mismatch.
        reclora_ds.training.adapter_io.AdapterConfigMismatchError, AdapterKeyError: PLoRA adapter mismatch.
    """
    folder = Path(adapter_dir)
    where = str(folder / REC_LLM_FILE)
    description = read_description(folder)
    load = dict(description["load"])
    settings = {**description["rec_llm"], "gradient_checkpointing": False}  # inference
    settings |= {key: load[key] for key in LOAD_KEYS if key in load}
    if backbone:
        settings["backbone"] = backbone
    if crm_path and description["mode"] == "plora":
        settings["crm_path"] = crm_path
    cfg = config_from_dict(PLoRATrainConfig, settings, where)
    if cfg.mode != description["mode"]:
        raise RecLLMFileError(f"{where}: mode {description['mode']!r} but rec_llm.mode {cfg.mode!r}")
    if cfg.mode == "zero_shot":
        raise RecLLMFileError(f"{where}: mode 'zero_shot' has no adapter to load")
    model, tokenizer, crm_info = build_rec_llm(cfg, load.get("dtype", "float32"))

    recorded_crm = description.get("crm") or {}
    found_crm = {} if crm_info is None else crm_info.to_dict()
    if recorded_crm != found_crm:
        differ = sorted(k for k in {*recorded_crm, *found_crm} if recorded_crm.get(k) != found_crm.get(k))
        raise RecLLMFileError(
            f"{where}: the CRM at {cfg.crm_path} is not the one the adapter was trained with (crm.json differs "
            f"in {differ})"
        )
    answers = resolve_answer_tokens(tokenizer)
    recorded = description["answer_tokens"]
    if (list(answers.yes_ids), list(answers.no_ids)) != (recorded.get("yes"), recorded.get("no")):
        raise RecLLMFileError(
            f"{where}: the backbone {cfg.backbone}'s tokenizer gives Yes/No tokens {list(answers.yes_ids)}/"
            f"{list(answers.no_ids)}, the run recorded {recorded.get('yes')}/{recorded.get('no')}"
        )
    if cfg.mode == "plora":
        from reclora_ds.training.adapter_io import load_plora_adapter

        load_plora_adapter(model.llm, folder, config=model.config.adapter)
    else:
        _load_lora(model, folder)
    model.eval()
    log.info("RecLLM (%s) rebuilt from %s (step %s)", cfg.mode, folder, description.get("step"))
    return model, tokenizer, crm_info


def _load_lora(model: RecLLM, folder: Path) -> None:
    """peft's LoRA weights of ``folder`` into the peft model ``model.llm``: all of them, nothing else."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise RecLLMFileError(f"{weights_file}: missing; not a peft LoRA adapter folder")
    result = set_peft_model_state_dict(model.llm, load_peft_weights(str(folder), device="cpu"))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise RecLLMFileError(
            f"{folder}: the LoRA adapter does not match the model: missing {missing[:10]}, "
            f"unexpected {list(result.unexpected_keys)[:10]}"
        )
