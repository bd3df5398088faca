"""Model profiles: tiny models build, are seeded and run; real profiles fail clearly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from tokencompose_core import models as M
from tokencompose_core.config import GroundingDinoConfig, ModelsConfig, SamConfig, configs_dir
from tokencompose_core.gdino_compat import BertModelWarper
from tokencompose_core.models.loaders import _gdino_args
from tokencompose_core.models.weights import load_exact

PRETRAINED = dict(
    kind="pretrained",
    diffusion="tokencompose-tests/absent-sd",
    grounding_dino=GroundingDinoConfig(config="swint_ogc", checkpoint="weights/absent_groundingdino_swint_ogc.pth"),
    sam=SamConfig(model_type="vit_h", checkpoint="weights/absent_sam_vit_h_4b8939.pth"),
    owlv2="tokencompose-tests/absent-owlv2",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelsConfig:
    return ModelsConfig(cache_dir=str(tmp_path_factory.mktemp("model-cache")))


@pytest.fixture(scope="module")
def tiny_dir(tiny: ModelsConfig) -> str:
    return M.resolve_diffusion_dir(tiny)


@pytest.fixture(scope="module")
def gdino(tiny: ModelsConfig) -> torch.nn.Module:
    return M.load_grounding_dino(tiny)


# --------------------------------------------------------------------------- tokenizer


def test_clip_tokenizer_gives_stable_diffusion_ids() -> None:
    tokenizer = M.clip_tokenizer()
    assert tokenizer("a photo of a wine glass").input_ids == [49406, 320, 1125, 539, 320, 2604, 3313, 49407]
    # A word CLIP splits into two pieces.
    assert tokenizer.tokenize("teddybear") == ["teddy", "bear</w>"]
    assert tokenizer("teddybear").input_ids == [49406, 25758, 4298, 49407]
    assert tokenizer.model_max_length == 77 and len(tokenizer) == 49408
    assert M.clip_tokenizer() is tokenizer


# --------------------------------------------------------------------------- diffusion


def test_tiny_diffusion_dir_is_reused_and_seeded(tiny: ModelsConfig, tiny_dir: str, tmp_path: Path) -> None:
    assert M.resolve_diffusion_dir(tiny) == tiny_dir
    assert sorted(os.listdir(tiny_dir)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert not [name for name in os.listdir(Path(tiny_dir).parent) if ".tmp-" in name]
    again = M.resolve_diffusion_dir(tiny.model_copy(update={"cache_dir": str(tmp_path / "a")}))
    other_seed = M.resolve_diffusion_dir(tiny.model_copy(update={"cache_dir": str(tmp_path / "b"), "seed": 1}))
    for part, weights in [("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")]:
        first, second = load_file(f"{tiny_dir}/{part}/{weights}"), load_file(f"{again}/{part}/{weights}")
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)
        reseeded = load_file(f"{other_seed}/{part}/{weights}")
        assert not all(torch.equal(first[k], reseeded[k]) for k in first)


def test_tiny_diffusion_loads_and_denoises_at_64px(tiny_dir: str) -> None:
    parts = M.load_diffusion(tiny_dir)
    assert (parts.sample_size, parts.vae_scale_factor, parts.latent_channels) == (64, 8, 4)
    assert parts.latent_scaling == pytest.approx(0.18215)
    assert parts.prediction_type == "epsilon" and parts.scheduler.config.num_train_timesteps == 1000
    assert parts.scheduler.config.beta_schedule == "scaled_linear"
    # Cross-attention at two U-Net resolutions plus the mid block.
    attn_blocks = [name.split(".attentions")[0] for name in parts.unet.attn_processors if "attn2" in name]
    assert {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.1", "up_blocks.2"} <= set(attn_blocks)
    ids = parts.tokenizer(["a cat and a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = parts.text_encoder(ids).last_hidden_state
        latents = parts.vae.encode(torch.randn(1, 3, 64, 64)).latent_dist.sample() * parts.latent_scaling
        noise = parts.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample
    assert latents.shape == noise.shape == (1, 4, 8, 8)
    assert torch.isfinite(noise).all()


def test_trained_unet_dir_replaces_the_models_unet(tiny_dir: str, tmp_path: Path) -> None:
    parts = M.load_diffusion(tiny_dir)
    with torch.no_grad():
        parts.unet.conv_out.bias.fill_(0.5)
    parts.unet.save_pretrained(tmp_path / "unet")
    trained = M.load_diffusion(tiny_dir, unet_dir=str(tmp_path / "unet"))
    assert torch.equal(trained.unet.conv_out.bias, torch.full_like(trained.unet.conv_out.bias, 0.5))


# --------------------------------------------------------------------------- GroundingDINO


def test_tiny_grounding_dino_runs_a_caption(gdino: torch.nn.Module) -> None:
    with torch.no_grad():
        out = gdino(torch.rand(2, 3, 96, 128), captions=["cat . dog .", "a red car ."])
    queries = gdino.num_queries
    assert out["pred_logits"].shape == (2, queries, 256) and out["pred_boxes"].shape == (2, queries, 4)
    assert torch.isfinite(out["pred_boxes"]).all()
    assert gdino.tokenizer.tokenize("cat . dog .") == ["cat", ".", "dog", "."]


def test_grounding_dino_is_seeded(tiny: ModelsConfig, gdino: torch.nn.Module) -> None:
    again = M.load_grounding_dino(tiny).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in gdino.state_dict().items())


def test_concurrent_builds_get_the_same_seeded_weights(tiny: ModelsConfig, gdino: torch.nn.Module) -> None:
    # Mask shards on a thread pool build their models at the same time.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        builds = list(pool.map(lambda _: M.load_grounding_dino(tiny).state_dict(), range(2)))
    for built in builds:
        assert all(torch.equal(v, built[k]) for k, v in gdino.state_dict().items())


def test_bert_wrapper_keeps_the_checkpoint_layout(gdino: torch.nn.Module) -> None:
    assert isinstance(gdino.bert, BertModelWarper)
    bert_keys = {k for k in gdino.state_dict() if k.startswith("bert.")}
    unwrapped = BertModel(BertConfig(vocab_size=gdino.bert.config.vocab_size, **_tiny_bert_shape(gdino)))
    assert bert_keys == {f"bert.{k}" for k in unwrapped.state_dict()}


def _tiny_bert_shape(gdino: torch.nn.Module) -> dict[str, int]:
    config = gdino.bert.config
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings")
    return {key: getattr(config, key) for key in keys}


def test_bert_wrapper_matches_bert_model_and_honours_3d_masks() -> None:
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32)).eval()
    wrapper = BertModelWarper(bert_model=bert)
    ids = torch.randint(5, 50, (2, 6))
    padding = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=padding).last_hidden_state
        got = wrapper(input_ids=ids, attention_mask=padding).last_hidden_state
        assert torch.allclose(got[padding.bool()], expected[padding.bool()], atol=1e-5)
        # Block-diagonal mask: the first three tokens must not see the last three.
        block = torch.zeros(1, 6, 6, dtype=torch.bool)
        block[0, :3, :3] = block[0, 3:, 3:] = True
        changed = ids[:1].clone()
        changed[0, 4] = 7 if changed[0, 4] != 7 else 8
        first = wrapper(input_ids=ids[:1], attention_mask=block).last_hidden_state
        second = wrapper(input_ids=changed, attention_mask=block).last_hidden_state
    assert torch.allclose(first[0, :3], second[0, :3], atol=1e-6)
    assert not torch.allclose(first[0, 3:], second[0, 3:])


def test_groundingdino_py_config_is_read_as_data(tmp_path: Path) -> None:
    assert _gdino_args("swint_ogc").hidden_dim == 256
    config = tmp_path / "evil.py"
    config.write_text("import os\nhidden_dim = 256\n")
    with pytest.raises(ValueError, match="not a simple"):
        _gdino_args(str(config))


# --------------------------------------------------------------------------- SAM and OWLv2


def test_tiny_sam_predicts_masks_for_a_batch_of_boxes(tiny: ModelsConfig) -> None:
    from segment_anything import SamPredictor

    predictor = SamPredictor(M.load_sam(tiny))
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    boxes = predictor.transform.apply_boxes_torch(torch.tensor([[0.0, 0, 60, 40], [30, 20, 110, 85]]), (90, 120))
    masks, scores, _ = predictor.predict_torch(point_coords=None, point_labels=None, boxes=boxes, multimask_output=False)
    assert masks.shape == (2, 1, 90, 120) and masks.dtype == torch.bool and scores.shape == (2, 1)


def test_tiny_owlv2_detects_with_its_offline_processor(tiny: ModelsConfig) -> None:
    model, processor = M.load_owlv2(tiny)
    inputs = processor(text=[["a cat", "a teddy bear"]], images=[Image.new("RGB", (80, 60))], return_tensors="pt")
    assert inputs["input_ids"].shape == (2, 16) and inputs["pixel_values"].shape[-1] == 64
    with torch.no_grad():
        outputs = model(**inputs)
    results = processor.post_process_grounded_object_detection(outputs, threshold=0.0, target_sizes=[(60, 80)])
    assert outputs.logits.shape == (1, 16, 2) and len(results[0]["scores"]) == 16


# --------------------------------------------------------------------------- real profiles


def test_missing_real_weights_name_the_file_and_where_to_get_it() -> None:
    models = ModelsConfig(**PRETRAINED)
    with pytest.raises(M.MissingWeightsError, match="absent_groundingdino_swint_ogc.pth.*github.com/IDEA-Research"):
        M.load_grounding_dino(models)
    with pytest.raises(M.MissingWeightsError, match="absent_sam_vit_h_4b8939.pth.*dl.fbaipublicfiles.com"):
        M.load_sam(models)
    with pytest.raises(M.MissingWeightsError, match="tokencompose-tests/absent-owlv2.*huggingface-cli download"):
        M.load_owlv2(models)
    with pytest.raises(M.MissingWeightsError, match="tokencompose-tests/absent-sd.*huggingface-cli download"):
        M.resolve_diffusion_dir(models)


def test_sam_hq_missing_checkpoint_names_its_own_file_and_a_tiny_one_round_trips(tmp_path: Path) -> None:
    hq = SamConfig(model_type="vit_h", variant="sam_hq", checkpoint="weights/absent_sam_hq_vit_h.pth")
    with pytest.raises(M.MissingWeightsError, match="SAM-HQ checkpoint .*absent_sam_hq_vit_h.pth.*lkeab/hq-sam"):
        M.load_sam(ModelsConfig(**{**PRETRAINED, "sam": hq}))
    tiny_hq = ModelsConfig(sam=SamConfig(variant="sam_hq"))
    model = M.load_sam(tiny_hq)
    assert type(model).__module__.startswith("segment_anything_hq")
    torch.save(model.state_dict(), tmp_path / "sam_hq_tiny.pth")
    load_exact(M.load_sam(tiny_hq), M.load_state_dict_file(tmp_path / "sam_hq_tiny.pth"), "sam_hq_tiny.pth")
    assert M.fingerprint(tiny_hq) != M.fingerprint(ModelsConfig())


class _Payload:
    def __reduce__(self):  # unpickling this would run a shell command
        return (os.system, ("touch pwned-by-checkpoint",))


def test_pickle_payload_checkpoints_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "sam_vit_b.pth"
    torch.save({"model": _Payload()}, checkpoint)
    with pytest.raises(M.UnsafeCheckpointError, match="sam_vit_b.pth"):
        M.load_sam(ModelsConfig(sam=SamConfig(model_type="vit_b", checkpoint=str(checkpoint))))
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_checkpoint_missing_parameters_is_an_error(tiny: ModelsConfig, tmp_path: Path) -> None:
    sam = M.load_sam(tiny)
    state = sam.state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("mask_decoder.")}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing keys"):
        load_exact(sam, M.load_state_dict_file(tmp_path / "partial.pth"), "partial.pth")


def test_fingerprint_tracks_config_seed_and_weight_files(tiny: ModelsConfig, tmp_path: Path) -> None:
    base = M.fingerprint(tiny)
    assert base == M.fingerprint(tiny.model_copy(update={"cache_dir": "elsewhere"}))
    assert base != M.fingerprint(tiny.model_copy(update={"seed": 1}))
    checkpoint = tmp_path / "sam.pth"
    checkpoint.write_bytes(b"v1")
    real = ModelsConfig(**{**PRETRAINED, "sam": SamConfig(model_type="vit_h", checkpoint=str(checkpoint))})
    before = M.fingerprint(real)
    checkpoint.write_bytes(b"v2-longer")
    assert M.fingerprint(real) != before and len(before) == 16


def test_arch_without_vae_is_a_pixel_space_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import shutil

    arch = tmp_path / "configs" / "models" / "pixel-test"
    shutil.copytree(configs_dir() / "models" / "tiny", arch, ignore=shutil.ignore_patterns("vae"))
    unet_config = json.loads((arch / "unet" / "config.json").read_text())
    unet_config.update(in_channels=3, out_channels=3, sample_size=16)
    (arch / "unet" / "config.json").write_text(json.dumps(unet_config))
    monkeypatch.setenv("TOKENCOMPOSE_CONFIGS", str(tmp_path / "configs"))
    model_dir = M.resolve_diffusion_dir(ModelsConfig(diffusion="pixel-test", cache_dir=str(tmp_path / "cache")))
    parts = M.load_diffusion(model_dir)
    assert parts.vae is None and not os.path.exists(f"{model_dir}/vae")
    assert (parts.sample_size, parts.vae_scale_factor, parts.latent_channels, parts.latent_scaling) == (16, 1, 3, 1.0)
