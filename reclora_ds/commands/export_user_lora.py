"""Export one user's (one sample's) PLoRA as a standard peft LoRA folder.

    python -m reclora_ds.commands.export_user_lora --run-dir runs/quickstart --sample-id 123456 --out exports/s123456
    python -m reclora_ds.commands.export_user_lora --run-dir runs/quickstart --user-index 42 --out exports/u42
    python -m reclora_ds.commands.export_user_lora --adapter A_DIR --states S.safetensors --backbone B_DIR \
        --sample-id 7 --out OUT

The result is served without reclora_ds::

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backbone), "exports/u42")

Run-directory contract (each path can be given on its own instead):

    RUN_DIR/adapter/                    the trained PLoRA adapter (adapter_io.save_plora_adapter):
                                        plora_config.json + adapter_model.safetensors       (--adapter)
    RUN_DIR/crm_states/test.safetensors CRM states keyed by sample id, as tools/compute_crm_states.py writes
                                        them: tensors ``sample_id`` int64 [N] and ``hidden`` float32
                                        [N, d_c] (or an .npz with the same two arrays)      (--states)
    RUN_DIR/data/                       the processed dataset; only for --user-index        (--data)

A pipeline run folder (``runs/<name>`` of ``reclora-ds pipeline``, recognised by its ``_pipeline/``) works
too: its ``plora/adapter`` and ``prepare/`` are used, and its CRM (``sim/``) computes the sample's state on
the histories it was trained on (no states file needed; ``--user-index`` takes the user's latest sample of
any split).
    backbone                            the adapter's base_model_name_or_path               (--backbone)

--user-index picks that user's most recent sample (largest timestamp, then sample id) among the samples
the states file holds. The output folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
(peft's format; rank N_m*r for ``mixing: products``, r for ``factors``) and ``personalization.json``
(sample, user, gate weights of every module, sources).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from reclora_ds.backbone import BackboneError, resolve_backbone
from reclora_ds.config import check_output_location, report_user_error, run_command
from reclora_ds.llm_loader import load_causal_lm
from reclora_ds.models.inject import inject_plora
from reclora_ds.training.adapter_io import (
    AdapterConfigMismatchError,
    AdapterKeyError,
    load_plora_adapter,
    module_gate_weights,
    personalized_lora,
    read_plora_adapter_config,
    save_peft_adapter,
)
from reclora_ds.training.crm_states import load_crm_states

PERSONALIZATION_NAME = "personalization.json"
DEFAULT_STATES = Path("crm_states") / "test.safetensors"


class ExportError(RuntimeError):
    """The inputs do not allow an export (missing sample, user without states, width mismatch)."""


def most_recent_sample(data_dir: Path, user_index: int, candidate_ids: np.ndarray | None) -> int:
    """The sample id of ``user_index``'s latest sample (timestamp, then id) among ``candidate_ids`` (None:
    among all its samples)."""
    import pyarrow as pa

    from reclora_ds.data.preprocess import SPLITS
    from reclora_ds.data.processed import ProcessedDataset

    dataset = ProcessedDataset(data_dir)
    columns = ["sample_id", "user_index", "timestamp"]
    table = pa.concat_tables(dataset.read_split(split, columns) for split in SPLITS)
    ids = table.column("sample_id").to_numpy()
    keep = table.column("user_index").to_numpy() == user_index
    if candidate_ids is not None:
        keep &= np.isin(ids, candidate_ids)
    if not keep.any():
        where = "the CRM states file" if candidate_ids is not None else str(data_dir)
        raise ExportError(f"user {user_index} has no sample in {where}")
    ids, times = ids[keep], table.column("timestamp").to_numpy()[keep]
    return int(ids[np.lexsort((ids, times))[-1]])


def crm_state_of(sample_ids: np.ndarray, hidden: np.ndarray, sample_id: int) -> torch.Tensor:
    """The [d_c] state of ``sample_id``; an error if the file has it not exactly once."""
    rows = np.flatnonzero(sample_ids == sample_id)
    if len(rows) != 1:
        raise ExportError(f"sample {sample_id} occurs {len(rows)} times in the CRM states file (need once)")
    return torch.from_numpy(np.array(hidden[rows[0]], dtype=np.float32))


def export(args: argparse.Namespace) -> dict:
    """Build backbone + PLoRA from the adapter, load it, pick the sample, write the peft folder."""
    run_dir = Path(args.run_dir) if args.run_dir else None
    pipeline_run = run_dir is not None and (run_dir / "_pipeline").is_dir()
    adapter_dir = (
        Path(args.adapter) if args.adapter else run_dir / ("plora/adapter" if pipeline_run else "adapter")
    )
    manifest = read_plora_adapter_config(adapter_dir)
    backbone_arg = args.backbone or manifest.base_model_name_or_path
    if not backbone_arg:
        raise ExportError(f"{adapter_dir} records no base_model_name_or_path; pass --backbone")
    backbone_dir = resolve_backbone(backbone_arg)
    data_dir = (
        Path(args.data)
        if args.data
        else (run_dir / ("prepare" if pipeline_run else "data") if run_dir else None)
    )

    if args.states or not pipeline_run:  # a CRM states file
        states_path = Path(args.states) if args.states else run_dir / DEFAULT_STATES
        sample_ids, hidden = load_crm_states(states_path)
        where = str(states_path)
        sample_id = args.sample_id
        if sample_id is None:
            sample_id = most_recent_sample(data_dir, args.user_index, sample_ids)
    else:  # a pipeline run: its CRM computes the one state, on the histories it was trained on
        from reclora_ds.training.crm_states import compute_crm_outputs

        sample_id = args.sample_id
        if sample_id is None:
            sample_id = most_recent_sample(data_dir, args.user_index, None)
        try:
            sample_ids, hidden, _ = compute_crm_outputs(run_dir / "sim", data_dir, sample_ids=[sample_id])
        except KeyError as exc:
            raise ExportError(f"sample {sample_id} is in no split of {data_dir}") from exc
        where = f"the CRM {run_dir / 'sim'}"
    if hidden.ndim != 2 or hidden.shape[1] != manifest.config.crm_dim:
        raise ExportError(
            f"{where}: CRM states of shape {hidden.shape}, the adapter's gates read d_c = {manifest.config.crm_dim}"
        )
    crm_state = crm_state_of(sample_ids, hidden, sample_id)

    model, _ = load_causal_lm(str(backbone_dir), dtype="float32", with_tokenizer=False)
    inject_plora(model, manifest.config)
    load_plora_adapter(model, adapter_dir)
    lora = personalized_lora(model, crm_state)
    out = save_peft_adapter(lora, args.out, str(backbone_dir), manifest.config.target_modules)
    rank = next(iter(lora.values())).A.shape[0]
    summary = {
        "sample_id": int(sample_id),
        "user_index": args.user_index,
        "mixing": manifest.config.mixing,
        "rank": int(rank),
        "scaling": manifest.config.scale,
        "adapter": str(adapter_dir),
        "states": where,
        "base_model_name_or_path": str(backbone_dir),
        "base_model_sha256": manifest.base_model_sha256,
        "gate_weights": {
            name: alpha.tolist() for name, alpha in module_gate_weights(model, crm_state).items()
        },
    }
    (out / PERSONALIZATION_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# Files one of which every earlier output folder of this command holds (it may be reused or replaced).
OUTPUT_MARKERS = ("adapter_config.json",)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run-dir", help="run folder with adapter/ and crm_states/, or a pipeline run folder"
    )
    parser.add_argument("--adapter", help="PLoRA adapter folder (default RUN_DIR/adapter)")
    parser.add_argument(
        "--states", help=f"CRM states .safetensors or .npz (default RUN_DIR/{DEFAULT_STATES})"
    )
    parser.add_argument("--data", help="processed dataset, for --user-index (default RUN_DIR/data)")
    parser.add_argument("--backbone", help="backbone folder or 'default' (default: the adapter's base model)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--sample-id", type=int, help="export the PLoRA of this sample")
    which.add_argument("--user-index", type=int, help="export the PLoRA of this user's most recent sample")
    parser.add_argument("--out", required=True, help="output folder (a peft LoRA adapter)")
    args = parser.parse_args(argv)
    check_output_location(args.out, "--out", OUTPUT_MARKERS, source="--out")  # before any heavy work
    if not args.run_dir and not (args.adapter and args.states):
        parser.error("give --run-dir, or both --adapter and --states")
    if args.user_index is not None and not (args.run_dir or args.data):
        parser.error("--user-index needs --data (or --run-dir with data/)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        summary = export(args)
    except (
        ExportError,
        BackboneError,
        AdapterConfigMismatchError,
        AdapterKeyError,
        FileNotFoundError,
    ) as exc:
        report_user_error(exc)
        return 2
    user = f" (user {summary['user_index']})" if summary["user_index"] is not None else ""
    print(
        f"sample {summary['sample_id']}{user}: {len(summary['gate_weights'])} modules, "
        f"{summary['mixing']} rank {summary['rank']} -> {args.out}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a user's mistake prints ``error: <file/key>: <reason>`` and returns 2 (no traceback)."""
    return run_command(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
