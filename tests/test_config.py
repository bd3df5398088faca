"""Profiles load, overrides apply, invalid values name their field, dumps round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokencompose_core.config import ConfigError, PipelineConfig, dump_config, load_config


@pytest.mark.parametrize(("profile", "kind"), [("tiny", "tiny"), ("sd14", "pretrained"), ("sd21", "pretrained")])
def test_profiles_load(profile: str, kind: str) -> None:
    config = load_config(profile)
    assert isinstance(config, PipelineConfig)
    assert config.name == profile and config.models.kind == kind


def test_overrides_apply_and_parse_as_yaml_scalars() -> None:
    config = load_config("sd14", ["train.learning_rate=1e-4", "masks.box_threshold=0.3", "models.sam.model_type=vit_b"])
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.masks.box_threshold == pytest.approx(0.3)
    assert config.models.sam.model_type == "vit_b"
    assert load_config("sd14").train.learning_rate == pytest.approx(5e-6)  # the profile file is untouched


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.batch_size=0", "train.batch_size"),
        ("train.foo=1", "train.foo"),
        ("train.batch_size=many", "train.batch_size"),
        ("train.gradient_checkpointing=[1, 2]", "train.gradient_checkpointing"),
        ("masks.box_threshold=1.5", "masks.box_threshold"),
        ("models.kind=huge", "models.kind"),
    ],
)
def test_invalid_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [override])
    assert f"{field}:" in str(error.value)


@pytest.mark.parametrize("override", ["train.batch_size", "=3", "train.batch_size.x=1"])
def test_malformed_overrides_are_config_errors(override: str) -> None:
    with pytest.raises(ConfigError, match="train|section|form"):
        load_config("tiny", [override])


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="known profiles: .*sd14.*tiny"):
        load_config("no-such-profile")


@pytest.mark.parametrize("profile", ["tiny", "sd14"])
def test_dump_config_round_trips(profile: str, tmp_path: Path) -> None:
    config = load_config(profile, ["train.max_steps=7", "sample.max_prompts=null"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(config), encoding="utf-8")
    assert load_config(str(path)) == config


def test_yaml_one_one_booleans_stay_strings() -> None:
    config = load_config("tiny", ["masks.mixed_precision=no", "train.gradient_checkpointing=false"])
    assert config.masks.mixed_precision == "no"
    assert config.train.gradient_checkpointing is False
