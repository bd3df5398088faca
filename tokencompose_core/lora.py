"""LoRA fine-tuning of the U-Net (or an MMDiT's transformer) through peft, saved in diffusers' LoRA format.

``train.lora.rank > 0`` freezes the U-Net and adds low-rank adapters to the
``train.lora.target_modules`` projections (:func:`add_lora`); only the adapters
train, and the grounding losses reach them through the cross-attention
projections the capture processor calls. A run publishes ``lora/`` instead of
``unet/``::

    lora/pytorch_lora_weights.safetensors   keys "unet.<module>.lora.{down,up}.weight",
                                            the adapter's settings in the file's metadata

which ``StableDiffusionPipeline.load_lora_weights(<run>/lora)`` loads onto the
same base model. An MMDiT's adapter is keyed ``transformer.<module>...`` and loads with
``StableDiffusion3Pipeline.load_lora_weights`` / ``FluxPipeline.load_lora_weights``.
Checkpoints hold the same file, so a checkpoint is loadable too.
"""

from __future__ import annotations

import os

import torch
from diffusers.loaders import FluxLoraLoaderMixin, SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from tokencompose_core.config import LoraAdapterConfig

LORA_DIR = "lora"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights finds it


def enabled(settings: LoraAdapterConfig) -> bool:
    return settings.rank > 0


def peft_config(settings: LoraAdapterConfig) -> LoraConfig:
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha or settings.rank,
        target_modules=list(settings.target_modules),
        lora_dropout=settings.dropout,
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: the adapted U-Net starts as the base
    )


def add_lora(unet: torch.nn.Module, settings: LoraAdapterConfig) -> None:
    """Freeze ``unet`` and add trainable adapters (the only parameters left with gradients)."""
    unet.requires_grad_(False)
    unet.add_adapter(peft_config(settings))


def has_lora(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


def _metadata(unet: torch.nn.Module) -> dict:
    """The settings diffusers rebuilds the adapter from. Only these, target modules sorted:
    peft's full config dict iterates a set, and the file's bytes must not depend on hash order."""
    config = unet.peft_config["default"]
    return {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "target_modules": sorted(config.target_modules)}


def _prefix(model: torch.nn.Module) -> str:
    """How diffusers' pipelines name the model's entries in a LoRA file: ``unet`` or ``transformer``."""
    from diffusers import UNet2DConditionModel

    return "unet" if isinstance(model, UNet2DConditionModel) else "transformer"


def save_lora(model: torch.nn.Module, folder: str) -> None:
    """Write the adapter to ``folder/pytorch_lora_weights.safetensors`` in diffusers' format,
    with the saving mixin of the pipeline that loads it."""
    state = get_peft_model_state_dict(model)
    common = dict(weight_name=WEIGHTS_NAME, safe_serialization=True)
    if _prefix(model) == "unet":
        # The U-Net's entries in diffusers' own key names; transformers' stay in peft's, as the
        # SD 3 and FLUX pipelines read them.
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            folder, unet_lora_layers=convert_state_dict_to_diffusers(state),
            unet_lora_adapter_metadata=_metadata(model), **common)
        return
    from diffusers import FluxTransformer2DModel

    mixin = FluxLoraLoaderMixin if isinstance(model, FluxTransformer2DModel) else SD3LoraLoaderMixin
    mixin.save_lora_weights(folder, transformer_lora_layers=state,
                            transformer_lora_adapter_metadata=_metadata(model), **common)


def load_lora_state(unet: torch.nn.Module, folder: str) -> None:
    """Copy saved adapter weights, exactly, into the adapter :func:`add_lora` made (resume)."""
    saved = load_file(os.path.join(folder, WEIGHTS_NAME))
    prefix = f"{_prefix(unet)}."
    state = convert_unet_state_dict_to_peft({key.removeprefix(prefix): value for key, value in saved.items()})
    expected = set(get_peft_model_state_dict(unet))
    if set(state) != expected:
        raise ValueError(f"{folder}: the saved adapter does not fit this U-Net's (missing "
                         f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})")
    set_peft_model_state_dict(unet, state)


def merge_lora(unet: torch.nn.Module, folder: str) -> None:
    """Load a saved adapter as diffusers does and merge it into the weights: a plain U-Net
    again, which samples as fast as the base model."""
    unet.load_lora_adapter(folder, prefix=_prefix(unet), weight_name=WEIGHTS_NAME, use_safetensors=True)
    unet.fuse_lora()
    unet.unload_lora()


def is_lora_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, WEIGHTS_NAME))
