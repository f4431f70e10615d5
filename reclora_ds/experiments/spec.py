"""An experiment spec: a base pipeline config, named variants (override sets), seeds, a reference row.

A spec file (``launch/experiments/<name>.yaml``)::

    name: fig4                              # run folder: <runs_dir>/<name> (<name>-quick with --quick)
    description: "RQ3: AUC vs N_m"
    base: launch/configs/pipeline_ml1m.yaml # a pipeline config (reclora_ds.pipeline.config)
    overrides: {plora.max_steps: 100}       # dotted pipeline keys, applied to every variant
    seeds: [42, 43, 44]
    reference: nm16                         # the row the others are compared with (a variant name)
    comparisons: [[a, b], ...]              # more paired tests: row a against row b (optional)
    metrics: [auc, logloss]                 # columns of the table (METRICS); auc is always there
    relative: row_vs_reference              # Rel. change: (row - ref) / ref; reference_vs_row: (ref - row) / row
    split: test                             # the evaluated split (a plora.eval_splits entry)
    significance: {bootstrap_samples: 2000, seed: 0, alpha: 0.01}
    plot: {kind: line, x_label: "N_m", log_x: false}
    variants:
      - {name: nm1, label: "N_m = 1", mode: plora, x: 1, overrides: {plora.adapter.num_experts: 1}}
      ...
    quick:                                  # --quick: the bundled data on 2 CPU cores
      base: launch/configs/quickstart.yaml
      overrides: {...}                      # merged over the top-level overrides
      seeds: [1, 2]
      variants: [...]                       # replaces the list (optional)
      variant_overrides: {nm16: {...}}      # merged over a variant's overrides (optional)
      reference: nm4                        # (optional, with variants)
      comparisons: [[a, b], ...]            # (optional, with variants)

A variant's ``mode`` is the stage-2 mode of its row (``zero_shot``, ``lora``, ``plora``), or ``crm``: the
row is the variant's CRM (stage 1) itself. The experiment owns ``pipeline.name`` and ``pipeline.modes``
(one stage-2 folder per variant x seed) and the seed key: ``plora.seed`` for a stage-2 row, ``sim.seed``
for a CRM row (stage-2 rows share the CRM of the base's ``sim.seed``: the paper's frozen, pre-trained CRM).
A ``zero_shot`` row trains nothing and runs once, with the first seed.

Every problem of a file is reported at once (:class:`reclora_ds.config.ConfigError`), each naming its key;
the variants' pipeline settings are validated by :func:`reclora_ds.experiments.plan.variant_settings`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reclora_ds.config import ConfigError, read_yaml_mapping
from reclora_ds.package_data import PACKAGE_DIR, packaged_copy

ROW_MODES = ("zero_shot", "lora", "plora", "crm")
METRICS = ("auc", "logloss", "gauc", "train_s_per_sample", "infer_s_per_sample")
"""Per-run numbers a table can show: AUC, log loss and group AUC over the evaluated ids; stage 2's
training and inference seconds per sample (``metrics.json: perf``; not defined for CRM rows)."""
RELATIVE = ("row_vs_reference", "reference_vs_row")
PLOT_KINDS = ("bars", "line", "time")
OWNED_KEYS = ("pipeline.name", "pipeline.modes", "plora.seed", "plora.mode")
"""Keys the experiment sets itself (``sim.seed`` too, on CRM rows); a spec or override that sets one is an error."""
VARIANT_PIPELINE_KEYS = ("pipeline.index_kind", "pipeline.pca_components")
"""The only ``pipeline.*`` keys a variant may change (the launch settings are the experiment's)."""
SPECS_DIR = PACKAGE_DIR / "experiments" / "specs"  # link to launch/experiments/ (copies in a wheel)
SPECS_PREFIX = ("launch", "experiments")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """One row of the table (one point of a figure)."""

    name: str
    """Folder-safe identifier (letters, digits, ``_ . + -``)."""
    mode: str
    """``zero_shot``, ``lora``, ``plora`` (a stage-2 row) or ``crm`` (the CRM's own row)."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Dotted pipeline keys -> values, over the base config and the experiment's overrides."""
    label: str = ""
    """Display name (default: ``name``)."""
    x: float | None = None
    """Its x value in a ``line`` plot (N_m, ID length, few-shot size)."""
    series: str = ""
    """Its line in a ``line`` plot (default: one line)."""

    @property
    def display(self) -> str:
        return self.label or self.name


@dataclasses.dataclass(frozen=True)
class SignificanceSpec:
    bootstrap_samples: int = 2000
    """Resamples of the paired, class-stratified bootstrap over the evaluated ids."""
    seed: int = 0
    """Seed of the resampling (the same resamples for every row)."""
    alpha: float = 0.01
    """Level of the ``significant`` column (the paper marks p < 0.01)."""


@dataclasses.dataclass(frozen=True)
class PlotSpec:
    kind: str = "bars"
    """``bars`` (a table: AUC per row), ``line`` (AUC vs ``x``, one line per ``series``), ``time`` (AUC and
    train / inference seconds per sample per row: Table 4)."""
    x_label: str = ""
    log_x: bool = False


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    name: str
    base: str
    variants: tuple[VariantSpec, ...]
    reference: str
    seeds: tuple[int, ...] = (42,)
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""
    metrics: tuple[str, ...] = ("auc", "logloss")
    relative: str = "row_vs_reference"
    split: str = "test"
    significance: SignificanceSpec = SignificanceSpec()
    plot: PlotSpec = PlotSpec()
    comparisons: tuple[tuple[str, str], ...] = ()
    """Pairs (row, against) tested like a row against the reference (Fig. 6: RecLoRA against ReLLa at each
    few-shot size), in a second table."""
    store: str = ""
    """Folder of the stage outputs that variants share (content-addressed by hash); empty =
    ``<runs_dir>/_stages``, shared by every experiment under that runs folder."""
    source: str = "<dict>"
    quick: bool = False
    """This is the ``quick:`` form of the file."""

    def variant(self, name: str) -> VariantSpec:
        return next(v for v in self.variants if v.name == name)

    def seeds_of(self, variant: VariantSpec) -> tuple[int, ...]:
        """The seeds a variant runs: all of them, except the untrained ``zero_shot`` (the first only)."""
        return self.seeds[:1] if variant.mode == "zero_shot" else self.seeds

    @property
    def run_name(self) -> str:
        return f"{self.name}-quick" if self.quick else self.name


TOP_KEYS = {f.name for f in dataclasses.fields(ExperimentSpec)} - {"source", "quick"} | {"quick"}
QUICK_KEYS = ("base", "overrides", "seeds", "variants", "variant_overrides", "reference", "comparisons")


def flatten_overrides(value: Any, where: str, problems: list[str], prefix: str = "") -> dict[str, Any]:
    """``{"plora": {"adapter": {"rank": 8}}}`` or ``{"plora.adapter.rank": 8}`` -> ``{"plora.adapter.rank": 8}``."""
    if not isinstance(value, Mapping):
        problems.append(f"{where}: must be a mapping of dotted keys to values, got {type(value).__name__}")
        return {}
    out: dict[str, Any] = {}
    for key, sub in value.items():
        if not isinstance(key, str) or not key:
            problems.append(f"{where}: key {key!r} is not a dotted name")
            continue
        full = f"{prefix}{key}"
        if isinstance(sub, Mapping):
            out.update(flatten_overrides(sub, where, problems, f"{full}."))
        else:
            out[full] = sub
    return out


def _owned(overrides: Mapping[str, Any], where: str, problems: list[str]) -> None:
    for key in overrides:
        if key in OWNED_KEYS:
            problems.append(
                f"{where}.{key}: set by the experiment (one stage-2 row per variant, the seeds); remove it"
            )


def _unknown(
    data: Mapping[str, Any], valid: set[str] | tuple[str, ...], where: str, problems: list[str]
) -> None:
    for key in data:
        if key not in valid:
            problems.append(f"{where}{key}: unknown key (valid: {', '.join(sorted(valid))})")


def _variant(data: Any, where: str, problems: list[str]) -> VariantSpec | None:
    valid = [f.name for f in dataclasses.fields(VariantSpec)]
    if not isinstance(data, Mapping):
        problems.append(f"{where}: must be a mapping with {', '.join(valid)}")
        return None
    _unknown(data, valid, f"{where}.", problems)
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(f"{where}.name: {name!r} must be a folder-safe name (letters, digits, _ . + -)")
        name = str(name)
    mode = data.get("mode")
    if mode not in ROW_MODES:
        problems.append(f"{where}.mode: {mode!r} must be one of {', '.join(ROW_MODES)}")
    overrides = flatten_overrides(data.get("overrides") or {}, f"{where}.overrides", problems)
    _owned(overrides, f"{where}.overrides", problems)
    for key in overrides:
        if key.startswith("pipeline.") and key not in VARIANT_PIPELINE_KEYS:
            problems.append(
                f"{where}.overrides.{key}: a variant may set only {', '.join(VARIANT_PIPELINE_KEYS)} of the "
                "pipeline section (launch settings belong to the experiment)"
            )
    x = data.get("x")
    if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)):
        problems.append(f"{where}.x: {x!r} must be a number")
        x = None
    for key in ("label", "series"):
        if not isinstance(data.get(key, ""), str):
            problems.append(f"{where}.{key}: must be a string")
    return VariantSpec(
        name=name, mode=str(mode), overrides=overrides, label=str(data.get("label", "")),
        x=None if x is None else float(x), series=str(data.get("series", "")),
    )  # fmt: skip


def _section(cls: type, data: Any, where: str, problems: list[str]) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        problems.append(f"{where}: must be a mapping")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _unknown(data, tuple(fields), f"{where}.", problems)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            continue
        default = fields[key].default
        ok = isinstance(value, type(default)) and not (
            isinstance(value, bool) and not isinstance(default, bool)
        )
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            problems.append(f"{where}.{key}: {value!r} must be a {type(default).__name__}")
            continue
        kwargs[key] = value
    return cls(**kwargs)


def _comparisons(
    value: Any, where: str, names: list[str], problems: list[str]
) -> tuple[tuple[str, str], ...]:
    """``[[row, against], ...]`` of variant names, each pair of two different rows."""
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(f"{where}: must be a list of [row, against] pairs of variant names")
        return ()
    pairs = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(n, str) for n in pair)):
            problems.append(f"{where}[{i}]: {pair!r} must be a [row, against] pair of variant names")
            continue
        unknown = [n for n in pair if n not in names]
        if unknown:
            problems.append(f"{where}[{i}]: {unknown} not a variant (variants: {', '.join(names)})")
        elif pair[0] == pair[1]:
            problems.append(f"{where}[{i}]: compares {pair[0]!r} with itself")
        else:
            pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def parse_spec(data: Mapping[str, Any], source: str = "<dict>", quick: bool = False) -> ExperimentSpec:
    """Build and check a spec from a file's mapping; ``quick`` applies its ``quick:`` block.

    Raises:
        ConfigError: every problem found, each naming its key.
    """
    problems: list[str] = []
    _unknown(data, TOP_KEYS, "", problems)
    block = data.get("quick")
    if quick and block is None:
        problems.append("quick: --quick needs a quick: block in the spec")
    if block is not None and not isinstance(block, Mapping):
        problems.append("quick: must be a mapping")
        block = None
    block = dict(block or {})
    if block:
        _unknown(block, QUICK_KEYS, "quick.", problems)
    overrides = flatten_overrides(data.get("overrides") or {}, "overrides", problems)
    _owned(overrides, "overrides", problems)
    raw_variants = data.get("variants")
    reference = data.get("reference")
    base = data.get("base")
    seeds = data.get("seeds", [42])
    extra: dict[str, dict[str, Any]] = {}
    if quick:
        quick_overrides = flatten_overrides(block.get("overrides") or {}, "quick.overrides", problems)
        _owned(quick_overrides, "quick.overrides", problems)
        overrides = {**overrides, **quick_overrides}
        base = block.get("base", base)
        seeds = block.get("seeds", seeds)
        raw_variants = block.get("variants", raw_variants)
        reference = block.get("reference", reference)
        per = block.get("variant_overrides") or {}
        if not isinstance(per, Mapping):
            problems.append("quick.variant_overrides: must map variant names to overrides")
            per = {}
        for vname, ov in per.items():
            extra[str(vname)] = flatten_overrides(ov, f"quick.variant_overrides.{vname}", problems)
            _owned(extra[str(vname)], f"quick.variant_overrides.{vname}", problems)
    where = "quick.variants" if quick and "variants" in block else "variants"
    variants = []
    if not isinstance(raw_variants, list) or not raw_variants:
        problems.append(f"{where}: must be a non-empty list of variants")
    else:
        for i, item in enumerate(raw_variants):
            v = _variant(item, f"{where}[{i}]", problems)
            if v is not None:
                variants.append(v)
    names = [v.name for v in variants]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{where}: variant name {name!r} is used twice")
    for vname in extra:
        if vname not in names:
            problems.append(f"quick.variant_overrides.{vname}: not a variant (variants: {', '.join(names)})")
    variants = [
        dataclasses.replace(v, overrides={**v.overrides, **extra[v.name]}) if v.name in extra else v
        for v in variants
    ]
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(f"name: {name!r} must be a folder-safe name")
    if not isinstance(base, str) or not base:
        problems.append("base: must name a pipeline config file")
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        problems.append(
            f"{'quick.' if quick and 'seeds' in block else ''}seeds: {seeds!r} must be distinct integers >= 0"
        )
        seeds = [42]
    if reference not in names:
        problems.append(f"reference: {reference!r} is not a variant (variants: {', '.join(names)})")
    comparisons = _comparisons(
        block.get("comparisons", data.get("comparisons")) if quick else data.get("comparisons"),
        "quick.comparisons" if quick and "comparisons" in block else "comparisons",
        names,
        problems,
    )
    metrics = data.get("metrics", ["auc", "logloss"])
    if not isinstance(metrics, list) or any(m not in METRICS for m in metrics):
        problems.append(f"metrics: {metrics!r} must be a list of {', '.join(METRICS)}")
        metrics = ["auc"]
    metrics = ["auc", *[m for m in metrics if m != "auc"]]
    relative = data.get("relative", "row_vs_reference")
    if relative not in RELATIVE:
        problems.append(f"relative: {relative!r} must be one of {', '.join(RELATIVE)}")
    split = data.get("split", "test")
    if split not in ("valid", "test"):
        problems.append(f"split: {split!r} must be valid or test")
    significance = _section(SignificanceSpec, data.get("significance"), "significance", problems)
    if significance.bootstrap_samples < 100 or not 0 < significance.alpha < 1 or significance.seed < 0:
        problems.append("significance: need bootstrap_samples >= 100, 0 < alpha < 1, seed >= 0")
    plot = _section(PlotSpec, data.get("plot"), "plot", problems)
    if plot.kind not in PLOT_KINDS:
        problems.append(f"plot.kind: {plot.kind!r} must be one of {', '.join(PLOT_KINDS)}")
    if plot.kind == "line":
        for v in variants:
            if v.x is None:
                problems.append(f"{where}: variant {v.name!r} needs x (plot.kind is line)")
    for key in ("description", "store"):
        if not isinstance(data.get(key, ""), str):
            problems.append(f"{key}: must be a string")
    if problems:
        raise ConfigError(problems, source)
    return ExperimentSpec(
        name=name, base=base, variants=tuple(variants), reference=reference, seeds=tuple(seeds),
        overrides=overrides, description=str(data.get("description", "")), metrics=tuple(metrics),
        relative=relative, split=split, significance=significance, plot=plot, comparisons=comparisons,
        store=str(data.get("store", "")), source=source, quick=quick,
    )  # fmt: skip


def find_spec(path: str | Path) -> Path:
    """A spec path as given (working directory first), else the shipped spec it names (``table3``,
    ``table3.yaml`` or ``launch/experiments/table3.yaml``).

    Raises:
        FileNotFoundError: neither exists; the message lists the shipped specs.
    """
    given = Path(path).expanduser()
    if given.is_file():
        return given
    name = given if given.suffix else given.with_suffix(".yaml")
    packaged = packaged_copy(name, SPECS_DIR, SPECS_PREFIX)
    if packaged is None:
        shipped = ", ".join(sorted(p.stem for p in SPECS_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"experiment spec {path} not found (shipped specs: {shipped})")
    return packaged


def load_spec(path: str | Path, quick: bool = False) -> ExperimentSpec:
    """Read and check a spec file (see the module docstring)."""
    found = find_spec(path)
    return parse_spec(read_yaml_mapping(found), str(found), quick)
