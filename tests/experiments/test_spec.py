"""Experiment specs: every problem named by its key before anything runs; every shipped spec is valid."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from reclora_ds.config import ConfigError
from reclora_ds.experiments.plan import variant_settings
from reclora_ds.experiments.spec import SPECS_DIR, find_spec, load_spec, parse_spec
from tests.experiments.tiny import tiny_spec

SHIPPED = ("table2", "table3", "fig4", "fig5", "table4", "fig6")


def minimal(**extra):
    return {
        "name": "t",
        "base": "launch/configs/quickstart.yaml",
        "reference": "a",
        "variants": [{"name": "a", "mode": "plora"}, {"name": "b", "mode": "lora"}],
        **extra,
    }


def problems_of(data, quick=False) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_spec(data, "spec.yaml", quick)
    return info.value.problems


def test_a_minimal_spec_gets_the_documented_defaults():
    spec = parse_spec(minimal())
    assert spec.seeds == (42,) and spec.metrics == ("auc", "logloss") and spec.split == "test"
    assert spec.relative == "row_vs_reference" and spec.significance.alpha == 0.01
    assert [v.name for v in spec.variants] == ["a", "b"] and spec.run_name == "t"


def test_unknown_keys_are_named_at_every_level():
    problems = problems_of(
        minimal(
            seedz=[1],
            plot={"kind": "bars", "xlabel": "x"},
            variants=[{"name": "a", "mode": "plora", "overides": {}}, {"name": "b", "mode": "lora"}],
            quick={"base": "x.yaml", "variant": []},
        )
    )
    text = "\n".join(problems)
    for needle in ("seedz: unknown key", "plot.xlabel: unknown key", "variants[0].overides: unknown key",
                   "quick.variant: unknown key"):  # fmt: skip
        assert needle in text, text


def test_bad_values_and_references_are_reported_together():
    problems = problems_of(
        minimal(
            reference="c",
            seeds=[1, 1],
            metrics=["auc", "ndcg"],
            relative="up",
            plot={"kind": "line"},
            variants=[{"name": "a", "mode": "plora"}, {"name": "a/b", "mode": "sft"}],
        )
    )
    text = "\n".join(problems)
    for needle in ("reference: 'c' is not a variant", "seeds:", "metrics:", "relative:", "variants[1].name",
                   "variants[1].mode", "needs x (plot.kind is line)"):  # fmt: skip
        assert needle in text, text


def test_keys_the_experiment_owns_are_refused():
    problems = problems_of(
        minimal(
            overrides={"plora.seed": 3},
            variants=[{"name": "a", "mode": "plora", "overrides": {"pipeline.modes": ["lora"]}},
                      {"name": "b", "mode": "lora", "overrides": {"pipeline.nproc": 4}}],
        )
    )  # fmt: skip
    text = "\n".join(problems)
    assert "overrides.plora.seed: set by the experiment" in text
    assert "variants[0].overrides.pipeline.modes: set by the experiment" in text
    assert "variants[1].overrides.pipeline.nproc: a variant may set only" in text


def test_nested_and_dotted_overrides_are_the_same_and_quick_merges(tmp_path):
    spec = parse_spec(
        minimal(
            overrides={"plora": {"adapter": {"num_experts": 2}}, "sim.epochs": 1},
            quick={"overrides": {"plora.max_steps": 3}, "seeds": [1, 2],
                   "variant_overrides": {"b": {"plora.lora_rank": 32}}},
        ),
        quick=True,
    )  # fmt: skip
    assert spec.overrides == {"plora.adapter.num_experts": 2, "sim.epochs": 1, "plora.max_steps": 3}
    assert spec.seeds == (1, 2) and spec.variant("b").overrides == {"plora.lora_rank": 32}
    assert spec.run_name == "t-quick"
    assert "quick: --quick needs a quick: block" in "\n".join(problems_of(minimal(), quick=True))
    bad = problems_of(minimal(quick={"variant_overrides": {"zz": {"plora.lr": 1}}}), quick=True)
    assert any("quick.variant_overrides.zz: not a variant" in p for p in bad)


def test_unknown_pipeline_keys_of_a_variant_name_the_variant_and_the_key(tmp_path, ml1m_dir):
    path = tiny_spec(tmp_path, ml1m_dir, "default")
    data = yaml.safe_load(path.read_text())
    data["variants"][1]["overrides"]["plora.adapter.num_expert"] = 3
    data["overrides"]["sim.epochz"] = 1
    spec = parse_spec(data, "tiny_spec.yaml")
    with pytest.raises(ConfigError) as info:
        variant_settings(spec)
    text = str(info.value)
    assert "variant plora_n3:" in text and "num_expert" in text
    assert "epochz" in text
    # a command-line override that a variant sets would silently change the row: refused
    with pytest.raises(ConfigError, match="plora.lora_rank: variant 'lora_r2' sets it"):
        variant_settings(load_spec(path), ["plora.lora_rank=8"])


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_spec_and_its_quick_form_is_valid(name, quick):
    spec = load_spec(name, quick=quick)
    if any("few_shot_size" in k for v in spec.variants for k in v.overrides):
        from reclora_ds.training.plora_config import PLoRATrainConfig

        if "few_shot_size" not in {f.name for f in dataclasses.fields(PLoRATrainConfig)}:
            pytest.skip("plora.few_shot_size has not landed yet")
    settings = variant_settings(spec)
    assert len(settings) == sum(len(spec.seeds_of(v)) for v in spec.variants)
    if quick:
        assert spec.base.endswith("quickstart.yaml")
    for (vname, _), s in settings.items():
        variant = spec.variant(vname)
        if variant.mode != "crm":
            assert s.pipeline.modes == (variant.mode,)
            assert spec.split in s.plora.eval_splits


def test_shipped_specs_are_package_data_and_found_by_name():
    assert SPECS_DIR.is_dir()
    assert {p.stem for p in SPECS_DIR.glob("*.yaml")} >= set(SHIPPED)
    assert find_spec("table3") == SPECS_DIR / "table3.yaml"
    assert find_spec("launch/experiments/fig4.yaml").name == "fig4.yaml"
    with pytest.raises(FileNotFoundError, match="shipped specs"):
        find_spec("nope")


def test_table3_states_the_alpha_of_the_same_params_lora():
    spec = load_spec("table3")
    same = spec.variant("wo_meta_same_params").overrides
    # alpha / r = 2, the paper's 16 / 8
    assert same["plora.lora_rank"] == 128 and same["plora.lora_alpha"] == 256
    quick = load_spec("table3", quick=True).variant("wo_meta_same_params").overrides
    assert quick["plora.lora_rank"] / quick["plora.lora_alpha"] == 0.5
    assert "alpha / r" in Path(spec.source).read_text()


def test_comparisons_name_variants_and_bad_pairs_are_reported():
    assert parse_spec(minimal(comparisons=[["b", "a"]])).comparisons == (("b", "a"),)
    text = "\n".join(problems_of(minimal(comparisons=[["b", "z"], ["a", "a"], "a"])))
    for needle in ("comparisons[0]: ['z'] not a variant", "comparisons[1]: compares 'a' with itself",
                   "comparisons[2]: 'a' must be a [row, against] pair"):  # fmt: skip
        assert needle in text, text
