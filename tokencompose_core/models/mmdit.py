"""MMDiT models (Stable Diffusion 3 / 3.5 and FLUX): loading them and their text conditioning.

These transformers have no cross-attention: image and text tokens attend jointly over one
sequence whose text segment is the concatenation, along the tokens, of the encoders'
outputs (:func:`text_layout`). SD 3 puts its two CLIP encoders' hidden states side by side
(feature axis, so one 77-token CLIP span) before T5's tokens; FLUX conditions its tokens on
T5 alone (CLIP gives only the pooled vector).

The conditioning comes from the stock diffusers pipeline's own ``encode_prompt``
(:meth:`MMDiTParts.encode_prompt`), so training sees exactly what the pipeline samples with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from tokencompose_core.models.weights import require_weights

# Family -> its stock diffusers pipeline, the ``_class_name`` of its model_index.json.
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# The pipelines' own max_sequence_length defaults (T5 tokens).
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}
# The pipeline component that tokenizes for each encoder of the joint text segment.
ENCODER_TOKENIZERS = {"sd3": {"clip": "tokenizer", "t5": "tokenizer_3"}, "flux": {"t5": "tokenizer_2"}}


class TextSegment(NamedTuple):
    """One encoder's tokens in the joint text segment: columns first .. first + length - 1."""

    encoder: str  # "clip" (start token at 0) or "t5" (none)
    first: int
    length: int


def model_index(model_dir: str | Path) -> dict[str, Any]:
    """A diffusers folder's ``model_index.json`` ({} when it has none)."""
    index = Path(model_dir) / "model_index.json"
    return json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}


def _components(index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Component folder -> (library, class) of a model_index.json; optional ones left out are [null, null]."""
    return {name: (spec[0], spec[1]) for name, spec in index.items()
            if not name.startswith("_") and isinstance(spec, list) and spec[0] is not None}


def mmdit_family(model_dir: str | Path) -> str | None:
    """"sd3" or "flux" from the folder's ``model_index.json``; None for any other model."""
    class_name = model_index(model_dir).get("_class_name")
    return next((family for family, pipeline in PIPELINES.items() if pipeline == class_name), None)


def is_mmdit(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds an SD 3 or FLUX pipeline."""
    return mmdit_family(model_dir) is not None


def text_layout(family: str, max_sequence_length: int, clip_length: int = 77) -> tuple[TextSegment, ...]:
    """The joint attention's text segment as (encoder, first column, length), in order.

    SD 3 (``StableDiffusion3Pipeline.encode_prompt``): the CLIP tokens, then T5's. FLUX: T5's only.
    """
    if family == "sd3":
        return (TextSegment("clip", 0, clip_length), TextSegment("t5", clip_length, max_sequence_length))
    if family == "flux":
        return (TextSegment("t5", 0, max_sequence_length),)
    raise ValueError(f"unknown MMDiT family {family!r}; known: {', '.join(PIPELINES)}")


def required_files(model_dir: str | Path) -> list[str]:
    """The files an MMDiT folder needs, from the components its ``model_index.json`` lists."""
    files = ["model_index.json"]
    for name in _components(model_index(model_dir)):
        if name == "scheduler":
            files.append("scheduler/scheduler_config.json")
        elif name.startswith("tokenizer"):
            files.append(f"{name}/tokenizer_config.json")
        else:
            files.append(f"{name}/config.json")
    return files


def encoder_text(model_dir: str | Path, max_sequence_length: int | None = None
                 ) -> tuple[dict[str, Any], tuple[TextSegment, ...]]:
    """The folder's own tokenizers by the encoder they serve ("clip", "t5") and the joint text
    segment they fill (``max_sequence_length`` None: the pipeline's default)."""
    from transformers import AutoTokenizer

    family = _family(model_dir)
    tokenizers = {encoder: AutoTokenizer.from_pretrained(Path(model_dir) / folder, local_files_only=True)
                  for encoder, folder in ENCODER_TOKENIZERS[family].items()}
    return tokenizers, _layout(family, tokenizers, max_sequence_length)


def _family(model_dir: str | Path) -> str:
    family = mmdit_family(model_dir)
    if family is None:
        raise ValueError(f"{model_dir} is not an SD 3 or FLUX pipeline folder (model_index.json)")
    return family


def _layout(family: str, encoder_tokenizers: dict[str, Any], max_sequence_length: int | None
            ) -> tuple[TextSegment, ...]:
    length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[family]
    if "clip" in encoder_tokenizers:
        return text_layout(family, length, encoder_tokenizers["clip"].model_max_length)
    return text_layout(family, length)


@dataclass
class MMDiTText:
    """A batch of captions as the stock pipeline conditions on them (no classifier-free branch)."""

    prompt_embeds: torch.Tensor  # (B, text tokens, joint_attention_dim)
    pooled_prompt_embeds: torch.Tensor  # (B, pooled_projection_dim)
    text_ids: torch.Tensor | None = None  # FLUX: (text tokens, 3) RoPE ids of the text tokens


@dataclass
class MMDiTParts:
    """The pieces of an SD 3 or FLUX model, loaded and ready to use."""

    family: str  # "sd3" | "flux"
    transformer: nn.Module
    vae: nn.Module
    # Pipeline component name -> module: text_encoder, text_encoder_2 (, text_encoder_3 for SD 3).
    text_encoders: dict[str, nn.Module]
    tokenizers: dict[str, Any]  # tokenizer, tokenizer_2 (, tokenizer_3)
    scheduler: Any  # FlowMatchEulerDiscreteScheduler
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    scaling_factor: float  # latents = (vae latents - shift_factor) * scaling_factor
    shift_factor: float
    sample_size: int  # image side in pixels
    max_sequence_length: int  # T5 tokens
    text_layout: tuple[TextSegment, ...]

    # What every stage asks of a loaded model, whichever family (DiffusionParts answers too).
    is_mmdit = True

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    @property
    def encoder_tokenizers(self) -> dict[str, Any]:
        """Tokenizer of each encoder of :attr:`text_layout` ("clip", "t5")."""
        return {encoder: self.tokenizers[name] for encoder, name in ENCODER_TOKENIZERS[self.family].items()}

    def pipeline(self, scheduler: Any = None) -> Any:
        """The stock diffusers pipeline over these very modules (nothing is reloaded)."""
        import diffusers

        pipeline_class = getattr(diffusers, PIPELINES[self.family])
        return pipeline_class(transformer=self.transformer, vae=self.vae, scheduler=scheduler or self.scheduler,
                              **self.text_encoders, **self.tokenizers)

    @torch.no_grad()
    def encode_prompt(self, captions: list[str]) -> MMDiTText:
        """The conditioning of ``captions`` through the stock pipeline's own ``encode_prompt``."""
        pipe = self.pipeline()
        device = self.transformer.device
        if self.family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=device,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=self.max_sequence_length)
            return MMDiTText(embeds, pooled)
        embeds, pooled, text_ids = pipe.encode_prompt(captions, None, device=device,
                                                      max_sequence_length=self.max_sequence_length)
        return MMDiTText(embeds, pooled, text_ids)


def load_mmdit(
    model_dir: str,
    transformer_dir: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_sequence_length: int | None = None,
) -> MMDiTParts:
    """Load an SD 3 or FLUX diffusers folder; ``transformer_dir`` (a trained transformer) replaces
    ``transformer/``; ``max_sequence_length`` None is the pipeline's default."""
    import diffusers
    import transformers

    root = Path(model_dir)
    family = _family(root)
    modules: dict[str, Any] = {}
    tokenizers: dict[str, Any] = {}
    for name, (library, class_name) in _components(model_index(root)).items():
        folder = Path(transformer_dir) if name == "transformer" and transformer_dir else root / name
        if name == "scheduler":
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder, local_files_only=True)
        elif name.startswith("tokenizer"):
            tokenizers[name] = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        elif library == "diffusers":
            model_class = getattr(diffusers, class_name)
            # Every module in ``dtype``, the VAE too, as the stock pipelines load them (their decode
            # does not cast the latents); training upcasts its frozen VAE itself (models.vae_dtype).
            modules[name] = model_class.from_pretrained(require_weights(folder), torch_dtype=dtype,
                                                        local_files_only=True).to(device)
        else:
            modules[name] = getattr(transformers, class_name).from_pretrained(
                require_weights(folder), dtype=dtype, local_files_only=True).to(device)
    vae = modules.pop("vae")
    layout = _layout(family, {e: tokenizers[name] for e, name in ENCODER_TOKENIZERS[family].items()},
                     max_sequence_length)
    return MMDiTParts(
        family=family,
        transformer=modules.pop("transformer"),
        vae=vae,
        text_encoders=modules,
        tokenizers=tokenizers,
        scheduler=scheduler,
        latent_channels=vae.config.latent_channels,
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=float(vae.config.shift_factor or 0.0),
        sample_size=int(vae.config.sample_size),
        max_sequence_length=max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[family],
        text_layout=layout,
    )
