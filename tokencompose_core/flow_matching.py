"""How MMDiT models train and denoise: rectified flow, as SD 3 / 3.5 and FLUX train.

A clean latent x0 and Gaussian noise n are mixed at a noise level s in (0, 1)::

    x_s = (1 - s) x0 + s n        the transformer predicts the velocity v = n - x0
    L_denoise = mean_b( w(s_b) * mean((v_pred - v)^2) )

s is drawn by diffusers' ``compute_density_for_timestep_sampling`` (``train.flow_matching``:
SD 3's logit-normal by default) and weighted by ``compute_loss_weighting_for_sd3``. Then each
family's own noise-level convention:

- SD 3 / 3.5: the draw picks one of the scheduler's 1000 training sigmas, which carry its
  static shift (3.0); the transformer takes the timestep s * 1000.
- FLUX: the draw is shifted by mu = ``calculate_shift`` of the packed image length (the
  scheduler's dynamic shifting, so larger images train at higher noise); latents are
  packed into 2x2 patches with their position ids, the transformer takes s itself and,
  for the guidance-distilled FLUX.1-dev, the guidance value ``train.flow_matching.guidance``.

Latents are ``(vae latent - shift_factor) * scaling_factor``, as the pipelines decode them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from tokencompose_core.conditioning import TextEmbeddings
from tokencompose_core.config import FlowMatchingConfig


@dataclass
class NoisedLatents:
    """One micro-batch at its drawn noise levels: the transformer's input and what it should predict."""

    noisy: torch.Tensor  # (B, C, h, w)
    target: torch.Tensor  # v = n - x0
    sigmas: torch.Tensor  # (B,)
    weighting: torch.Tensor  # (B, 1, 1, 1)


@torch.no_grad()
def encode_latents(parts: Any, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Pixels in [-1, 1] -> the latents the transformer denoises (fp32): a draw from the VAE's
    posterior with ``generator`` (training), its mean without one (scoring)."""
    posterior = parts.vae.encode(pixels.to(parts.vae.dtype)).latent_dist
    latents = (posterior.mean if generator is None else posterior.sample(generator=generator)).float()
    return (latents - parts.shift_factor) * parts.scaling_factor


def noised(latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x0 + s n, ``levels`` s broadcast over each latent."""
    levels = levels.view(-1, *[1] * (latents.ndim - 1))
    return (1.0 - levels) * latents + levels * noise


def image_token_side(parts: Any, resolution: int) -> int:
    """Image tokens per side at ``resolution`` px: SD 3 patches its latent (patch_size), FLUX packs 2x2 cells."""
    patch = parts.transformer.config.patch_size if parts.family == "sd3" else 2
    return resolution // (parts.vae_scale_factor * patch)


def packed_length(latent_height: int, latent_width: int) -> int:
    """Image tokens of a FLUX latent: 2x2 latent cells per token."""
    return (latent_height // 2) * (latent_width // 2)


def flux_shift(scheduler: Any, image_tokens: int) -> float:
    """FLUX's resolution-dependent shift mu, from the scheduler's own settings (as FluxPipeline computes it)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    return calculate_shift(image_tokens, config.base_image_seq_len, config.max_image_seq_len,
                           config.base_shift, config.max_shift)


def training_sigmas(scheduler: Any, draws: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Noise levels for uniform-in-(0, 1) ``draws`` (after the density's warp), in the family's convention."""
    if scheduler.config.use_dynamic_shifting:
        mu = flux_shift(scheduler, packed_length(*latent_size))
        return scheduler.time_shift(mu, 1.0, draws.clamp(1e-5, 1.0)).float()
    steps = scheduler.config.num_train_timesteps
    indices = (draws * steps).long().clamp(max=steps - 1)
    return scheduler.sigmas[indices].float()


def draw_noise(scheduler: Any, settings: FlowMatchingConfig, latents: torch.Tensor,
               generator: torch.Generator) -> NoisedLatents:
    """Noise, noise levels and loss weights for one micro-batch, all from ``generator``."""
    size = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    draws = compute_density_for_timestep_sampling(
        settings.weighting_scheme, size, settings.logit_mean, settings.logit_std, settings.mode_scale,
        generator=generator,
    )
    sigmas = training_sigmas(scheduler, draws, tuple(latents.shape[-2:])).to(latents.device)
    weighting = compute_loss_weighting_for_sd3(settings.weighting_scheme, sigmas.view(size, 1, 1, 1)).float()
    return NoisedLatents(noisy=noised(latents, noise, sigmas), target=noise - latents, sigmas=sigmas,
                         weighting=weighting)


def predict_velocity(parts: Any, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor,
                     text: TextEmbeddings, guidance: float) -> torch.Tensor:
    """The transformer's velocity for ``noisy`` latents (B, C, h, w), in the same layout."""
    dtype = text.hidden.dtype
    if parts.family == "sd3":
        steps = parts.scheduler.config.num_train_timesteps
        return transformer(hidden_states=noisy.to(dtype), timestep=(sigmas * steps).to(dtype),
                           encoder_hidden_states=text.hidden, pooled_projections=text.pooled,
                           return_dict=False)[0]
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    size, channels, height, width = noisy.shape
    packed = FluxPipeline._pack_latents(noisy.to(dtype), size, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(size, height // 2, width // 2, noisy.device, dtype)
    text_ids = torch.zeros(text.hidden.shape[1], 3, device=noisy.device, dtype=dtype)  # as FluxPipeline's
    model = getattr(transformer, "module", transformer)  # a DDP wrapper keeps the config on its module
    embed_guidance = torch.full((size,), guidance, device=noisy.device, dtype=torch.float32) \
        if model.config.guidance_embeds else None
    packed_velocity = transformer(hidden_states=packed, timestep=sigmas.to(dtype), guidance=embed_guidance,
                                  pooled_projections=text.pooled, encoder_hidden_states=text.hidden,
                                  txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
    return FluxPipeline._unpack_latents(packed_velocity, height * parts.vae_scale_factor,
                                        width * parts.vae_scale_factor, parts.vae_scale_factor)


def denoising_loss(prediction: torch.Tensor, noised: NoisedLatents) -> torch.Tensor:
    """SD 3's weighted flow-matching loss: per-sample mean squared error, weighted, averaged."""
    error = noised.weighting * (prediction.float() - noised.target.float()) ** 2
    return error.reshape(error.shape[0], -1).mean(1).mean()
