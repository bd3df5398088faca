"""SD 3 and FLUX models, offline: the tiny-sd3 / tiny-flux profiles, their T5 tokenizer, the
joint text segment's token columns, stage 1 on them, and the real profiles without weights."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from helpers import cli_summary, photo_manifest
from tokencompose_core.config import load_config
from tokencompose_core.models import (MissingWeightsError, clip_tokenizer, diffusion_family, fingerprint, is_mmdit,
                                      load_mmdit, mmdit_family, resolve_diffusion_dir, text_layout)
from tokencompose_core.models.architectures import arch_dir, read_config_json
from tokencompose_core.models.t5_vocab import TOKENIZER_FOLDERS, read_captions, train_t5_tokenizer, training_texts
from tokencompose_core.models.tiny import diffusion_parts
from tokencompose_core.stages.nouns import nouns_table, write_nouns
from tokencompose_core.text import TRUNCATED, joint_token_positions, t5_token_positions, token_positions

STOCK = {"tiny-sd3": StableDiffusion3Pipeline, "tiny-flux": FluxPipeline}
T5_FOLDER = {"tiny-sd3": "tokenizer_3", "tiny-flux": "tokenizer_2"}
CAPTION = "A zebra stands next to a red Fire Hydrant on the sidewalk."


@pytest.fixture(scope="module", params=sorted(STOCK))
def tiny(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(profile, its materialised model folder)."""
    return request.param, resolve_diffusion_dir(load_config(request.param).models)


@pytest.fixture(scope="module")
def t5() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(arch_dir("tiny-sd3") / "tokenizer_3", local_files_only=True)


def test_tiny_mmdit_loads_with_our_loader_and_the_stock_pipeline(tiny: tuple[str, str]) -> None:
    profile, folder = tiny
    family = {"tiny-sd3": "sd3", "tiny-flux": "flux"}[profile]
    assert is_mmdit(folder) and diffusion_family(load_config(profile).models) == family
    parts = load_mmdit(folder, max_sequence_length=32)
    assert (parts.family, parts.latent_channels, parts.vae_scale_factor, parts.sample_size) == (family, 16, 4, 64)
    # 64 px -> a 16 x 16 latent -> 8 x 8 image tokens (SD 3: 2 x 2 patches; FLUX: 2 x 2 packing).
    assert (parts.sample_size // parts.vae_scale_factor // 2) ** 2 == 64
    assert isinstance(parts.scheduler, FlowMatchEulerDiscreteScheduler)
    assert parts.scheduler.config.use_dynamic_shifting == (family == "flux")
    expected_layout = [("clip", 0, 77), ("t5", 77, 32)] if family == "sd3" else [("t5", 0, 32)]
    assert [tuple(segment) for segment in parts.text_layout] == expected_layout
    captions = ["a cat on a table", "Two dogs near a Fire Hydrant."]
    ours = parts.encode_prompt(captions)
    assert ours.prompt_embeds.shape[:2] == (2, sum(segment.length for segment in parts.text_layout))

    stock = STOCK[profile].from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        if family == "sd3":
            embeds, _, pooled, _ = stock.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                       max_sequence_length=32)
            ids = None
        else:
            embeds, pooled, ids = stock.encode_prompt(captions, None, max_sequence_length=32)
    torch.testing.assert_close(ours.prompt_embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled_prompt_embeds, pooled, rtol=0, atol=0)
    assert (ours.text_ids is None) == (ids is None)
    # The pipeline our parts build is the stock class over the very same modules.
    pipe = parts.pipeline()
    assert type(pipe) is STOCK[profile] and pipe.transformer is parts.transformer


def test_a_trained_transformer_replaces_the_models_own(tiny: tuple[str, str], tmp_path) -> None:
    transformer = load_mmdit(tiny[1]).transformer
    own = next(transformer.parameters()).detach().clone()
    with torch.no_grad():
        next(transformer.parameters()).add_(1.0)
    transformer.save_pretrained(tmp_path / "transformer")
    trained = load_mmdit(tiny[1], transformer_dir=str(tmp_path / "transformer"))
    torch.testing.assert_close(next(trained.transformer.parameters()), own + 1.0)


def test_the_t5_tokenizer_works_offline_with_t5_semantics(t5) -> None:
    ids = t5(CAPTION)["input_ids"]
    pieces = t5.convert_ids_to_tokens(ids)
    assert (t5.pad_token_id, t5.eos_token_id, ids[-1]) == (0, 1, 1)  # </s> appended, pad 0
    assert pieces[0] == "▁A" and t5.bos_token is None  # no start token; "▁" starts a word
    assert t5.unk_token_id not in t5("QUICK brown FOX; xyzzy 42 zebras!")["input_ids"]  # any case, any ASCII
    assert t5.decode(ids, skip_special_tokens=True) == CAPTION
    padded = t5(CAPTION, padding="max_length", max_length=32)["input_ids"]
    assert len(padded) == 32 and padded[len(ids):] == [0] * (32 - len(ids))


def test_t5_positions_of_a_multi_piece_noun(t5) -> None:
    pieces = t5.convert_ids_to_tokens(t5(CAPTION)["input_ids"])
    positions = t5_token_positions(CAPTION, "fire hydrant", t5)
    assert len(positions) > 2  # two words, one of them in several pieces
    assert "".join(pieces[p] for p in positions) == "▁Fire▁Hydrant"
    assert pieces[t5_token_positions(CAPTION, "zebra", t5)[0]] == "▁zebra"
    assert t5_token_positions(CAPTION, "sidewalk", t5, max_length=8).reason == TRUNCATED


def test_the_shipped_t5_tokenizer_is_what_the_tool_builds(shared_dir) -> None:
    built = train_t5_tokenizer(training_texts(read_captions(shared_dir / "data" / "coco" / "captions_nouns_dev.jsonl")))
    for arch, folder in TOKENIZER_FOLDERS:
        shipped = json.loads((arch_dir(arch) / folder / "tokenizer.json").read_text(encoding="utf-8"))
        assert shipped["model"]["vocab"] == json.loads(built.backend_tokenizer.to_str())["model"]["vocab"]
        t5_config = "text_encoder_3" if arch == "tiny-sd3" else "text_encoder_2"
        assert read_config_json(arch_dir(arch) / t5_config / "config.json")["vocab_size"] == len(built)


def test_joint_columns_on_both_layouts(t5) -> None:
    clip = clip_tokenizer()
    tokenizers = {"clip": clip, "t5": t5}
    clip_positions = token_positions(CAPTION, "fire hydrant", clip)
    t5_positions = t5_token_positions(CAPTION, "fire hydrant", t5, 32)
    sd3 = joint_token_positions(CAPTION, "fire hydrant", tokenizers, text_layout("sd3", 32))
    assert list(sd3) == list(clip_positions) + [77 + q for q in t5_positions]
    assert sd3.by_encoder == {"clip": list(clip_positions), "t5": list(t5_positions)}
    flux = joint_token_positions(CAPTION, "fire hydrant", tokenizers, text_layout("flux", 32))
    assert list(flux) == list(t5_positions) and flux.by_encoder == {"t5": list(t5_positions)}


def test_a_noun_one_encoder_cannot_place_is_rejected_naming_it(t5, tmp_path) -> None:
    # 8 T5 tokens cut "sidewalk" off; CLIP's 77 place it.
    layout = text_layout("sd3", 8)
    found = joint_token_positions(CAPTION, "sidewalk", {"clip": clip_tokenizer(), "t5": t5}, layout)
    assert not found and (found.encoder, found.reason) == ("t5", f"t5: {TRUNCATED}")
    manifest = pd.DataFrame([{"id": "z", "image": "z.png", "captions": [CAPTION], "path_problem": None},
                             {"id": "n", "image": "n.png", "captions": ["Very quickly."], "path_problem": None}])
    table, rejects = nouns_table(manifest, {"clip": clip_tokenizer(), "t5": t5}, layout=layout)
    assert "sidewalk" not in set(table["noun"])
    assert rejects.set_index("noun").loc["sidewalk", "reason"] == f"token-span failure: t5: {TRUNCATED}"
    # Written and read back: each encoder's positions beside the joint columns; none on a noun-less image.
    table = pd.read_parquet(write_nouns(table, rejects, str(tmp_path))["nouns_uri"]).set_index("image_id")
    zebra = table[table["noun"] == "zebra"].iloc[0]
    assert [item["encoder"] for item in zebra["encoder_positions"]] == ["clip", "t5"]
    assert pd.isna(table.loc["n", "noun"]) and len(table.loc["n", "encoder_positions"]) == 0


def test_nouns_through_the_cli_gives_joint_columns(prefect_harness, tiny: tuple[str, str], tmp_path) -> None:
    profile, folder = tiny
    manifest = photo_manifest(tmp_path)
    summary = cli_summary(["nouns", "-p", profile, "--input", manifest, f"storage.root={tmp_path / 'runs'}"])
    table = pd.read_parquet(summary["nouns_uri"])
    layout = load_mmdit(folder, max_sequence_length=32).text_layout
    tokenizers = {"clip": clip_tokenizer(),
                  "t5": AutoTokenizer.from_pretrained(f"{folder}/{T5_FOLDER[profile]}", local_files_only=True)}
    assert set(table["noun"]) >= {"astronaut", "cat", "coffee"}
    for row in table.itertuples():
        expected = joint_token_positions(row.caption, row.noun, tokenizers, layout)
        assert list(row.token_positions) == list(expected)
        assert {item["encoder"]: list(item["positions"]) for item in row.encoder_positions} == expected.by_encoder
        # SD 3: the CLIP columns, then T5's from 77 on; FLUX: T5's alone.
        assert [item["encoder"] for item in row.encoder_positions] == [segment.encoder for segment in layout]
        assert (max(row.token_positions) >= 77) == (profile == "tiny-sd3")


@pytest.mark.parametrize(("profile", "snapshot"), [("sd35", "stabilityai/stable-diffusion-3.5-medium"),
                                                   ("flux", "black-forest-labs/FLUX.1-dev")])
def test_real_mmdit_profiles_without_weights_fail_in_one_line(prefect_harness, tmp_path, capsys, profile: str,
                                                               snapshot: str) -> None:
    from flows.cli import main

    manifest = photo_manifest(tmp_path)
    assert main(["nouns", "-p", profile, "--input", manifest, f"storage.root={tmp_path / 'runs'}"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "tokencompose: " in line]
    assert snapshot in line and f"huggingface-cli download {snapshot}" in line


def test_a_real_mmdit_folder_missing_a_component_names_it(tiny: tuple[str, str], tmp_path) -> None:
    profile, folder = tiny
    copy = tmp_path / profile
    shutil.copytree(folder, copy)
    models = load_config("sd35" if profile == "tiny-sd3" else "flux", [f"models.diffusion={copy}"]).models
    assert resolve_diffusion_dir(models) == str(copy) and diffusion_family(models) == mmdit_family(folder)
    (copy / T5_FOLDER[profile] / "tokenizer_config.json").unlink()
    with pytest.raises(MissingWeightsError, match=f"has no {T5_FOLDER[profile]}/tokenizer_config.json"):
        resolve_diffusion_dir(models)


def test_the_identity_covers_the_tokenizer_and_the_text_length() -> None:
    arch = arch_dir("tiny-sd3")
    assert arch / "tokenizer_3" in diffusion_parts(arch) and arch / "transformer" in diffusion_parts(arch)
    models = load_config("tiny-sd3").models
    assert fingerprint(models) != fingerprint(models.model_copy(update={"max_sequence_length": 64}))
