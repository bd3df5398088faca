"""Random-initialised, seeded models built from the architecture folders in ``configs/models/``.

No network and no weights: the tiny profile's models (used by tests and the demo),
and the full-size random architectures benchmarks ask for. The same seed, architecture
files and library versions give the same weights, so those make up a tiny model's identity.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import threading
import types
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2ImageProcessorPil,
    Owlv2Processor,
)

from tokencompose_core.config import ModelsConfig
from tokencompose_core.identity import bytes_hash, component_seed, folders_identity
from tokencompose_core.models.architectures import TINY, arch_dir, read_config_json
from tokencompose_core.models.mmdit import PIPELINES
from tokencompose_core.models.tokenizers import owlv2_tokenizer, clip_tokenizer, clip_tokenizer_2

# torch's global RNG is shared by all threads: two tiny models built at once (two
# mask shards on a thread pool) would interleave their draws and get different
# weights. One lock makes every seeded build see only its own draws.
_SEEDED_BUILD = threading.RLock()


@contextmanager
def seeded_init(seed: int, component: str) -> Iterator[None]:
    """Seed initialisation per component, leaving the caller's RNG state untouched."""
    with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(seed, component))
        yield


def library_versions() -> str:
    """The versions of the libraries that build a tiny model (part of its identity)."""
    import diffusers
    import transformers

    # Random init depends on library code, so it is part of a tiny model's identity.
    versions = (("torch", torch), ("diffusers", diffusers), ("transformers", transformers))
    return ";".join(f"{name}={module.__version__}" for name, module in versions)


# --------------------------------------------------------------------------- diffusion


def materialise_tiny_diffusion(models: ModelsConfig) -> str:
    arch = arch_dir(models.diffusion)
    identity = f"{folders_identity(diffusion_parts(arch))};seed={models.seed};{library_versions()}"
    cache = Path(models.cache_dir).resolve()
    target = cache / f"{models.diffusion}-{bytes_hash(identity.encode())}"
    if (target / "model_index.json").is_file():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    temp = cache / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        _write_tiny_diffusion(arch, models.seed, temp)
        try:
            os.rename(temp, target)  # atomic publish of the whole folder
        except OSError:
            if not (target / "model_index.json").is_file():
                raise  # not a lost race with another builder: a real error
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return str(target)


def diffusion_parts(arch: Path) -> list[Path]:
    """The sub-folders of an architecture folder that make up the diffusion model (the
    MMDiT ones ship their T5 tokenizer, so it is part of their identity)."""
    parts = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer_2",
             "tokenizer_3", "scheduler")
    return [arch / part for part in parts if (arch / part).is_dir()]


def _write_tiny_diffusion(arch: Path, seed: int, out: Path) -> None:
    if mmdit_arch_family(arch):
        _write_tiny_mmdit(arch, seed, out)
        return
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    # A second text encoder makes it SDXL-shaped (tiny-xl); its pipeline zeroes empty prompts' embeddings.
    xl = (arch / "text_encoder_2" / "config.json").is_file()
    index: dict[str, Any] = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True} \
        if xl else {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False}
    components = [
        ("unet", "diffusers", "UNet2DConditionModel", UNet2DConditionModel.from_config),
        ("vae", "diffusers", "AutoencoderKL", AutoencoderKL.from_config),
        ("text_encoder", "transformers", "CLIPTextModel", lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c))),
        ("text_encoder_2", "transformers", "CLIPTextModelWithProjection",
         lambda c: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(c))),
    ]
    for name, library, class_name, build in components:
        config_file = arch / name / "config.json"
        if name in ("vae", "text_encoder_2") and not config_file.is_file():
            continue  # no VAE: a pixel-space model; no second encoder: SD 1.x/2.x-shaped
        with seeded_init(seed, name):
            module = build(read_config_json(config_file))
        module.save_pretrained(out / name)
        index[name] = [library, class_name]
    tokenizers = [("tokenizer", clip_tokenizer())] + ([("tokenizer_2", clip_tokenizer_2())] if xl else [])
    for name, tokenizer in tokenizers:
        tokenizer.save_pretrained(out / name)
        index[name] = ["transformers", "CLIPTokenizer"]
    scheduler = DDPMScheduler.from_config(read_config_json(arch / "scheduler" / "scheduler_config.json"))
    scheduler.save_pretrained(out / "scheduler")
    index["scheduler"] = ["diffusers", "DDPMScheduler"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


# The stock pipelines' components, as the real snapshots' model_index.json lists them:
# (folder, library, class).
MMDIT_COMPONENTS = {
    "sd3": (
        ("transformer", "diffusers", "SD3Transformer2DModel"),
        ("vae", "diffusers", "AutoencoderKL"),
        ("text_encoder", "transformers", "CLIPTextModelWithProjection"),
        ("text_encoder_2", "transformers", "CLIPTextModelWithProjection"),
        ("text_encoder_3", "transformers", "T5EncoderModel"),
        ("tokenizer", "transformers", "CLIPTokenizer"),
        ("tokenizer_2", "transformers", "CLIPTokenizer"),
        ("tokenizer_3", "transformers", "T5TokenizerFast"),
        ("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler"),
    ),
    "flux": (
        ("transformer", "diffusers", "FluxTransformer2DModel"),
        ("vae", "diffusers", "AutoencoderKL"),
        ("text_encoder", "transformers", "CLIPTextModel"),
        ("text_encoder_2", "transformers", "T5EncoderModel"),
        ("tokenizer", "transformers", "CLIPTokenizer"),
        ("tokenizer_2", "transformers", "T5TokenizerFast"),
        ("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler"),
    ),
}


def mmdit_arch_family(arch: Path) -> str | None:
    """"sd3" or "flux" for an MMDiT architecture folder (it has ``transformer/``), None for a U-Net one.
    SD 3 has a third text encoder (T5); FLUX's second one is T5."""
    if not (arch / "transformer").is_dir():
        return None
    return "sd3" if (arch / "text_encoder_3").is_dir() else "flux"


def _write_tiny_mmdit(arch: Path, seed: int, out: Path) -> None:
    import diffusers
    import transformers

    family = mmdit_arch_family(arch)
    index: dict[str, Any] = {"_class_name": PIPELINES[family]}
    for name, library, class_name in MMDIT_COMPONENTS[family]:
        index[name] = [library, class_name]
        if name == "scheduler":
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
                read_config_json(arch / name / "scheduler_config.json"))
            scheduler.save_pretrained(out / name)
        elif name.startswith("tokenizer"):
            if (arch / name).is_dir():  # the T5 tokenizer ships with the architecture
                shutil.copytree(arch / name, out / name)
            else:  # SD 3's second CLIP tokenizer pads with "!" as SDXL's does
                (clip_tokenizer_2() if name == "tokenizer_2" else clip_tokenizer()).save_pretrained(out / name)
        else:
            config = read_config_json(arch / name / "config.json")
            with seeded_init(seed, name):
                if library == "diffusers":
                    module = getattr(diffusers, class_name).from_config(config)
                else:
                    model_class = getattr(transformers, class_name)
                    module = model_class(model_class.config_class.from_dict(config))
            module.save_pretrained(out / name)
    (out / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


# --------------------------------------------------------------------------- SAM


def build_tiny_sam(spec: dict[str, Any], variant: str, package: types.ModuleType) -> nn.Module:
    # ``package`` is ``sam_package(variant)``; the caller passes it so that this module
    # does not import the loaders, which import it.
    modeling = importlib.import_module(f"{package.__name__}.modeling")
    size, patch, dim = spec["img_size"], spec["patch_size"], spec["prompt_embed_dim"]
    decoder = dict(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(
            depth=2,
            embedding_dim=dim,
            mlp_dim=spec["decoder_mlp_dim"],
            num_heads=spec["decoder_num_heads"],
        ),
        transformer_dim=dim,
        iou_head_depth=3,
        iou_head_hidden_dim=spec["iou_head_hidden_dim"],
    )
    # SAM-HQ's decoder also reads the encoder's first global-attention features.
    mask_decoder = (
        modeling.MaskDecoderHQ(**decoder, vit_dim=spec["encoder_embed_dim"])
        if variant == "sam_hq"
        else modeling.MaskDecoder(**decoder)
    )
    # Same composition as the packages' own _build_sam, at a small width.
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            img_size=size,
            patch_size=patch,
            embed_dim=spec["encoder_embed_dim"],
            depth=spec["encoder_depth"],
            num_heads=spec["encoder_num_heads"],
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(spec["encoder_global_attn_indexes"]),
            window_size=spec["window_size"],
            out_chans=dim,
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(size // patch, size // patch),
            input_image_size=(size, size),
            mask_in_chans=16,
        ),
        mask_decoder=mask_decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


# --------------------------------------------------------------------------- OWLv2


def owlv2_from_arch(name: str, seed: int, backend: str = "torchvision") -> tuple[Owlv2ForObjectDetection,
                                                                                   Owlv2Processor]:
    folder = arch_dir(name) / "owlv2" if name == TINY else arch_dir(name)
    config = Owlv2Config.from_dict(read_config_json(folder / "config.json"))
    with seeded_init(seed, "owlv2"):
        model = Owlv2ForObjectDetection(config)
    side = config.vision_config.image_size
    image_processor = {"torchvision": Owlv2ImageProcessor, "pil": Owlv2ImageProcessorPil}[backend]
    processor = Owlv2Processor(
        image_processor=image_processor(size={"height": side, "width": side}),
        tokenizer=owlv2_tokenizer(),
    )
    return model, processor
