"""Stage 3: fine-tune the U-Net (or an MMDiT's transformer) with the denoising loss plus the grounding losses.

One loop for every setting: CPU, one GPU or ``accelerate launch`` with several
processes; latent (VAE) or pixel-space models; epsilon, v or sample prediction,
or flow matching for SD 3.5 / FLUX (``tokencompose_core.flow_matching``);
mixed precision, gradient checkpointing, accumulation, clipping, EMA, any
diffusers lr schedule. Per step::

    L = L_denoise + sum_g w_g (lambda * L_token(g) + gamma * L_pixel(g))

over the supervised groups g (``attention.supervised_groups``: U-Net parts by
resolution; ``attention.mmdit_groups``: the joint-attention blocks
``train.grounding.blocks``). Only those groups' attention layers run the
capturing processor; with both weights at 0 the step is a plain fine-tune with
fused attention everywhere.

Output folder::

    unet/                        final U-Net (EMA weights when EMA is on), safetensors
    transformer/                 instead of unet/ for an MMDiT model
    lora/                        instead of unet/ with train.lora.rank > 0: the adapter, diffusers' LoRA format
    checkpoints/checkpoint-<N>/  unet/ (or lora/), optimizer.pt, lr_scheduler.pt, ema.pt, rng-<rank>.pt, state.json,
                                 _manifest.json (sizes and sha256 of the others, written last)
    metrics.jsonl                one record per optimizer step
    loss_curve.png, tensorboard/ (when tensorboard is installed)

A checkpoint is built in a hidden temporary folder and renamed into place, so a
killed run never leaves a half checkpoint. ``train.resume`` continues from the
newest whole one (its files match its manifest and load; a damaged newer one is
passed over with a warning): model, optimizer, lr schedule, EMA, RNG states and
data position, so an interrupted run ends where an uninterrupted one would.

Run on several processes (GPUs, or CPU processes over gloo) with::

    accelerate launch --multi_gpu --num_processes 2 -m tokencompose_core.train -p sd14 \\
        --cache runs/sd14/masks/masks-<key> --output runs/sd14/train/ddp
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m tokencompose_core.train ...

(accelerate 1.x's ``--cpu`` flag alone starts one process unless mpirun is set up.)
Every process draws its own share of each epoch's permutation; the losses in
metrics.jsonl are those of process 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from tokencompose_core import lora, storage
from tokencompose_core.attention import AttentionCapture, mmdit_groups, supervised_groups
from tokencompose_core.checkpoints import (
    DENOISER_DIRS,
    Checkpoint,
    TrainingState,
    denoiser_dir_name,
    local_path,
    publish_unet,
    remove_partial_checkpoints,
    resume_checkpoint,
    weights_complete,
    weights_dir,
)
from tokencompose_core.conditioning import TextEmbeddings, encode_mmdit, encode_text, square_time_ids, unet_kwargs
from tokencompose_core.config import FlowMatchingConfig, LoraAdapterConfig, ModelsConfig, TrainConfig, load_config
from tokencompose_core.flow_matching import (
    denoising_loss,
    draw_noise,
    encode_latents,
    image_token_side,
    predict_velocity,
)
from tokencompose_core.data import GroundingDataset, ResumableBatchSampler, collate, training_image_ids
from tokencompose_core.launch import RESULT_FILE
from tokencompose_core.losses import grounding_losses
from tokencompose_core.mask_cache import MaskCache
from tokencompose_core.metrics import MetricsLog, plot_loss_curve, tensorboard_writer
from tokencompose_core.models import (
    is_mmdit,
    load_diffusion,
    load_mmdit,
    resolve_diffusion_dir,
    resolve_vae_dir,
    vae_dtype,
)
from tokencompose_core.threads import pinned_threads

logger = logging.getLogger(__name__)

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    output_uri: str
    unet_uri: str  # the trained weights: <run>/unet, or <run>/lora for a LoRA run
    global_step: int
    final_losses: dict[str, float]  # mean of the last steps' logged losses


# ----------------------------------------------------------------------------- text


class TextEmbedder:
    """Caption -> embeddings of the frozen text encoder(s) (SDXL: both, and the pooled one;
    an MMDiT: its pipeline's own prompt encoding), cached per caption when asked."""

    def __init__(self, encode: Callable[[list[str]], TextEmbeddings], cache: bool) -> None:
        self.encode = encode
        self._cache: dict[str, TextEmbeddings] | None = {} if cache else None

    def __call__(self, captions: list[str]) -> TextEmbeddings:
        if self._cache is None:
            return self.encode(captions)
        missing = sorted(set(captions) - self._cache.keys())
        if missing:
            encoded = self.encode(missing)
            for index, caption in enumerate(missing):
                self._cache[caption] = encoded[index]
        return TextEmbeddings.stack([self._cache[caption] for caption in captions])


# ----------------------------------------------------------------------------- the step


@dataclass
class _Model:
    """Frozen parts and fixed settings the step needs."""

    denoiser: torch.nn.Module  # the U-Net, or an MMDiT's transformer (both possibly DDP-wrapped)
    vae: torch.nn.Module | None
    latent_scaling: float
    embed: TextEmbedder
    noise_scheduler: DDPMScheduler
    capture: AttentionCapture | None
    group_weights: dict[str, float]
    token_weight: float
    pixel_weight: float
    caption_dropout: float
    weight_dtype: torch.dtype
    normalize_by_layers: bool = False  # train.grounding.normalize_by_layers
    # An MMDiT model's loaded parts (SD 3.5, FLUX): it trains by flow matching with ``flow``
    # (tokencompose_core.flow_matching). None: a U-Net with noise_scheduler's objective.
    mmdit: Any = None
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)


def _targets(model: _Model, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = model.noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return model.noise_scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


def step_losses(model: _Model, batch, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """All losses of one micro-batch; ``loss`` is the weighted total to back-propagate."""
    # The VAE may stay fp32 under fp16 (vae_dtype): the pixels take its dtype.
    pixel_dtype = model.vae.dtype if model.vae is not None else model.weight_dtype
    pixels = batch.pixel_values.to(device, dtype=pixel_dtype, non_blocking=True)
    with torch.no_grad():
        if model.mmdit is not None:
            latents = encode_latents(model.mmdit, pixels, generator)
        elif model.vae is None:
            latents = pixels.float()
        else:
            posterior = model.vae.encode(pixels).latent_dist
            latents = posterior.sample(generator=generator).float() * model.latent_scaling
    size = latents.shape[0]
    if model.mmdit is None:
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (size,), generator=generator)
    else:
        noised = draw_noise(model.noise_scheduler, model.flow, latents, generator)
    dropped = torch.rand(size, generator=generator) < model.caption_dropout
    captions = ["" if drop else caption for drop, caption in zip(dropped.tolist(), batch.captions)]
    # A dropped caption has no noun tokens left to ground.
    positions = batch.token_positions.masked_fill(dropped[:, None, None], -1)
    text = model.embed(captions).to(device, dtype=model.weight_dtype)
    if model.capture is not None:
        model.capture.clear()
        # Only the nouns' columns are captured; positions now index those columns.
        positions = model.capture.capture_tokens(positions.to(device))
    if model.mmdit is None:
        timesteps = timesteps.to(device)
        noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
        # SDXL's size conditioning: the data path's crop when it recorded one, else an uncropped R x R.
        time_ids = batch.time_ids if batch.time_ids is not None else square_time_ids(pixels.shape[-1], size)
        prediction = model.denoiser(noisy, timesteps, **unet_kwargs(text, time_ids)).sample
        denoise = F.mse_loss(prediction.float(), _targets(model, latents, noise, timesteps).float())
    else:
        prediction = predict_velocity(model.mmdit, model.denoiser, noised.noisy, noised.sigmas, text,
                                      model.flow.guidance)
        denoise = denoising_loss(prediction, noised)
    losses = {"denoise": denoise}
    total = denoise
    if model.capture is not None:
        masks = batch.masks.to(device, non_blocking=True)
        for group, maps in model.capture.maps().items():
            token, pixel = grounding_losses(maps, masks, positions, model.normalize_by_layers)
            weight = model.group_weights.get(group, 1.0)
            total = total + weight * (model.token_weight * token + model.pixel_weight * pixel)
            losses[f"token/{group}"] = token
            losses[f"pixel/{group}"] = pixel
    losses["loss"] = total
    return losses


# ----------------------------------------------------------------------------- setup


def _groups(denoiser: torch.nn.Module, cfg: TrainConfig, latent_side: int) -> dict[str, list[str]]:
    if cfg.token_loss_weight == 0 and cfg.pixel_loss_weight == 0:
        return {}
    if denoiser_dir_name(denoiser) == "transformer":
        if not cfg.grounding.blocks:
            raise ValueError("an MMDiT model grounds the joint-attention blocks train.grounding.blocks names "
                             "(e.g. [transformer_blocks.9]); it is empty")
        groups = mmdit_groups(denoiser, list(cfg.grounding.blocks))
    else:
        groups = supervised_groups(denoiser, list(cfg.grounding.layers), latent_side)
    unknown = set(cfg.grounding.group_weights) - set(groups)
    if unknown:
        raise ValueError(f"train.grounding.group_weights names unknown groups {sorted(unknown)}; "
                         f"this model at resolution {cfg.resolution} has {sorted(groups)}")
    return {name: layers for name, layers in groups.items() if cfg.grounding.group_weights.get(name, 1.0) > 0}


def _capture_options(denoiser: torch.nn.Module, cfg: TrainConfig) -> dict[str, bool]:
    """The MMDiT map's normalisation (a U-Net's cross-attention has only text keys)."""
    return {"text_only": cfg.grounding.text_keys_only} if denoiser_dir_name(denoiser) == "transformer" else {}


def trainable_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter in a full fine-tune; the adapters' only with LoRA."""
    return [parameter for parameter in unet.parameters() if parameter.requires_grad]


def _init_unet_dir(cfg: TrainConfig, resume: Checkpoint | None) -> str | None:
    """The U-Net (or transformer) to load: the checkpoint's when resuming a full fine-tune, else
    ``train.init_unet``'s; a LoRA run always starts from the base model, which its saved adapter applies to."""
    if not lora.enabled(cfg.lora):
        return weights_dir(resume.path) if resume else init_unet_dir(cfg.init_unet)
    if cfg.init_unet:
        raise ValueError("train.lora.rank > 0 trains an adapter of the base model the sample stage loads; "
                         "to start from a trained U-Net, make it the model (train.init_model)")
    return None


def init_unet_dir(init_unet: str | None) -> str | None:
    """The ``unet/`` (or ``transformer/``) folder ``train.init_unet`` names: a trained run folder's,
    or the folder itself."""
    if not init_unet:
        return None
    inside = [os.path.join(local_path(init_unet), name) for name in DENOISER_DIRS]
    return next((folder for folder in inside if os.path.isdir(folder)), local_path(init_unet))


def _published(output_dir: str, settings: LoraAdapterConfig, denoiser_dir: str) -> bool:
    """The final weights are there whole: a missing weights file is published again."""
    return weights_complete(os.path.join(output_dir, lora.LORA_DIR if lora.enabled(settings) else denoiser_dir))


def _config_digest(cfg: TrainConfig) -> dict:
    """Settings that must match for a resumed run to continue the same data order."""
    return {"batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "seed": cfg.seed, "resolution": cfg.resolution}


@dataclass
class _Loaded:
    """The model a run trains, whatever its family: the denoiser and what stays frozen around it."""

    denoiser: torch.nn.Module
    vae: torch.nn.Module | None
    frozen: list[torch.nn.Module]  # the VAE and text encoders
    encode: Callable[[list[str]], TextEmbeddings]
    noise_scheduler: Any  # DDPMScheduler (U-Net) or FlowMatchEulerDiscreteScheduler (MMDiT)
    latent_scaling: float
    mask_side: int  # the side of the attention maps' image grid the masks are resized to
    mmdit: Any = None  # MMDiTParts for SD 3.5 / FLUX


def _load_model(cfg: TrainConfig, models: ModelsConfig, model_dir: str, init_dir: str | None,
                device: torch.device) -> _Loaded:
    if is_mmdit(model_dir):
        parts = load_mmdit(model_dir, transformer_dir=init_dir, device=device, dtype=torch.float32,
                           max_sequence_length=models.max_sequence_length)
        return _Loaded(parts.transformer, parts.vae, [parts.vae, *parts.text_encoders.values()],
                       partial(encode_mmdit, parts), parts.scheduler, parts.scaling_factor,
                       image_token_side(parts, cfg.resolution), mmdit=parts)
    parts = load_diffusion(model_dir, unet_dir=init_dir, device=device, dtype=torch.float32,
                           vae_dir=resolve_vae_dir(models))
    frozen = [module for module in (parts.vae, parts.text_encoder, parts.text_encoder_2) if module is not None]
    return _Loaded(parts.unet, parts.vae, frozen, partial(encode_text, parts.text_encoders),
                   DDPMScheduler.from_config(parts.scheduler.config), parts.latent_scaling,
                   cfg.resolution // parts.vae_scale_factor)


def train(cfg: TrainConfig, models: ModelsConfig, cache_uri: str, output_uri: str,
          heldout_images: int = 0) -> TrainResult:
    """Fine-tune the U-Net on the mask cache at ``cache_uri``; write the run to ``output_uri``.

    ``heldout_images``: how many cache images stage 5 scores attention mIoU on, left out
    of training when ``train.exclude_heldout``. The model is ``train.init_model`` or the
    profile's, its U-Net ``train.init_unet`` when set. Resumes from the newest checkpoint
    in ``output_uri`` when ``train.resume``. Runs with ``train.torch_threads`` threads.
    """
    with pinned_threads(cfg.torch_threads):
        return _train(cfg, models, cache_uri, output_uri, heldout_images)


def _train(cfg: TrainConfig, models: ModelsConfig, cache_uri: str, output_uri: str, heldout_images: int) -> TrainResult:
    output_dir = local_path(output_uri)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps
    )
    device = accelerator.device
    weight_dtype = _DTYPES[cfg.mixed_precision]
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # same initial state on every process

    if accelerator.is_main_process:
        remove_partial_checkpoints(output_dir)
    resume = resume_checkpoint(output_dir, cfg.resume, accelerator.process_index)
    model_dir = cfg.init_model or resolve_diffusion_dir(models)
    loaded = _load_model(cfg, models, model_dir, _init_unet_dir(cfg, resume), device)
    unet = loaded.denoiser
    unet.train().requires_grad_(True)
    if lora.enabled(cfg.lora):
        lora.add_lora(unet, cfg.lora)
        if resume:
            lora.load_lora_state(unet, weights_dir(resume.path))
    trainable = trainable_parameters(unet)
    for frozen in loaded.frozen:
        dtype = vae_dtype(frozen.config, weight_dtype) if frozen is loaded.vae else weight_dtype
        frozen.requires_grad_(False).eval().to(device, dtype=dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    latent_side = loaded.mask_side
    groups = _groups(unet, cfg, latent_side)
    capture = AttentionCapture(unet, groups, **_capture_options(unet, cfg)) if groups else None

    # The fused kernel updates every parameter in one pass: 5-10% faster steps on the demo model (CPU).
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, fused=device.type in ("cpu", "cuda"),
    )
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
    )
    ema = EMAModel(trainable, decay=cfg.ema_decay, foreach=True) if cfg.ema_decay else None
    if ema is not None:
        ema.to(device)
    prepared_unet, optimizer = accelerator.prepare(unet, optimizer)
    noise = torch.Generator().manual_seed(cfg.seed * 1_000_003 + accelerator.process_index)
    trainer = TrainingState(accelerator, prepared_unet, optimizer, lr_scheduler, ema, noise)

    global_step = 0
    if resume:
        state = trainer.restore(resume)
        global_step = int(state["global_step"])
        if state.get("config") != _config_digest(cfg):
            logger.warning("resuming %s with different settings %s (was %s): the data order changes",
                           resume.path, _config_digest(cfg), state.get("config"))
        logger.info("resumed from %s at step %d", resume.path, global_step)

    cache = MaskCache(cache_uri, max_cached_shards=1_000_000)  # shard tables hold RLE text only
    heldout = heldout_images if cfg.exclude_heldout else 0
    dataset = GroundingDataset(
        cache, training_image_ids(cache, heldout), cfg.resolution, latent_side, in_memory=cfg.cache_samples,
        image_transform=cfg.image_transform, mask_transform=cfg.mask_transform,
    )
    sampler = ResumableBatchSampler(
        len(dataset), cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes,
        start=global_step * cfg.gradient_accumulation_steps,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
        pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0,
    )
    model = _Model(
        denoiser=prepared_unet, vae=loaded.vae, latent_scaling=loaded.latent_scaling,
        embed=TextEmbedder(loaded.encode, cfg.cache_text_embeddings),
        noise_scheduler=loaded.noise_scheduler, capture=capture,
        group_weights=dict(cfg.grounding.group_weights), token_weight=cfg.token_loss_weight,
        pixel_weight=cfg.pixel_loss_weight, caption_dropout=cfg.caption_dropout, weight_dtype=weight_dtype,
        normalize_by_layers=cfg.grounding.normalize_by_layers,
        mmdit=loaded.mmdit, flow=cfg.flow_matching,
    )
    metrics = MetricsLog(storage.join(output_uri, "metrics.jsonl"), global_step) if accelerator.is_main_process else None
    resumed_at = global_step
    global_step = _loop(cfg, trainer, model, loader, metrics, output_dir, global_step)

    denoiser_dir = denoiser_dir_name(unet)
    unet_uri = storage.join(output_uri, lora.LORA_DIR if lora.enabled(cfg.lora) else denoiser_dir)
    final_losses: dict[str, float] = {}
    # A rerun of a finished run trains no step: its published U-Net is already this
    # checkpoint's, and republishing identical weights would only move their identity.
    finished_before = global_step == resumed_at and _published(output_dir, cfg.lora, denoiser_dir)
    if accelerator.is_main_process and finished_before:
        final_losses = metrics.final_losses()
    elif accelerator.is_main_process:
        final = accelerator.unwrap_model(prepared_unet)
        if ema is not None:
            ema.copy_to(trainable)  # the EMA weights are the result
        if capture is not None:
            capture.remove()  # the saved model must not reference our processor
        publish_unet(final, output_dir)
        if metrics.records:
            plot_loss_curve(metrics.records, storage.join(output_uri, "loss_curve.png"))
        final_losses = metrics.final_losses()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_uri=output_uri, unet_uri=unet_uri, global_step=global_step, final_losses=final_losses)


def _loop(cfg: TrainConfig, trainer: TrainingState, model: _Model, loader, metrics: MetricsLog | None,
          output_dir: str, global_step: int) -> int:
    """Optimizer steps until ``max_steps``; checkpoints and logs along the way."""
    acc = trainer.accelerator
    if global_step >= cfg.max_steps:
        return global_step
    writer = tensorboard_writer(os.path.join(output_dir, "tensorboard")) if acc.is_main_process else None
    progress = tqdm(total=cfg.max_steps, initial=global_step, desc="train", disable=not acc.is_main_process)
    samples_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * acc.num_processes
    sums: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    for batch in loader:
        with acc.accumulate(trainer.unet):
            losses = step_losses(model, batch, trainer.noise, acc.device)
            acc.backward(losses["loss"])
            if acc.sync_gradients:
                acc.clip_grad_norm_(trainer.unet.parameters(), cfg.max_grad_norm)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value.detach()
        if not acc.sync_gradients:
            continue
        trainer.lr_scheduler.step()
        if trainer.ema is not None:
            trainer.ema.step(trainable_parameters(acc.unwrap_model(trainer.unet)))
        global_step += 1
        elapsed, started = time.perf_counter() - started, time.perf_counter()
        record = {key: value.item() / cfg.gradient_accumulation_steps for key, value in sums.items()}
        record.update(step=global_step, lr=trainer.lr_scheduler.get_last_lr()[0], step_time_s=elapsed,
                      samples_per_s=samples_per_step / max(elapsed, 1e-9))
        sums = {}
        progress.update(1)
        if metrics is not None:
            metrics.append(record)
            if writer is not None:
                for key, value in record.items():
                    if key != "step":
                        writer.add_scalar(key, value, global_step)
            if global_step % cfg.log_every == 0:
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                metrics.flush()
        if global_step % cfg.checkpoint_every == 0 or global_step >= cfg.max_steps:
            if metrics is not None:  # before the checkpoint: a resumed run finds every earlier record
                metrics.flush()
            trainer.save(output_dir, global_step, {"config": _config_digest(cfg)}, cfg.checkpoints_total_limit)
        if global_step >= cfg.max_steps:
            break
    progress.close()
    if writer is not None:
        writer.close()
    return global_step


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``accelerate launch -m tokencompose_core.train`` (no Prefect): a profile
    and overrides, or (the train task's several processes, tokencompose_core.launch) the
    sections in a settings file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--profile", default="tiny")
    parser.add_argument("--settings", default=None, help="JSON with the train and models sections, heldout_images")
    parser.add_argument("--cache", required=True, help="mask cache URI")
    parser.add_argument("--output", required=True, help="run folder (local or mounted path)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.settings:
        settings = storage.read_json(args.settings)
        sections = (TrainConfig.model_validate(settings["train"]), ModelsConfig.model_validate(settings["models"]),
                    int(settings["heldout_images"]))
    else:
        config = load_config(args.profile, args.overrides)
        sections = (config.train, config.models, config.score.heldout_images)
    cfg, models, heldout_images = sections
    result = train(cfg, models, args.cache, args.output, heldout_images)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.__dict__, indent=2))
        if args.settings:  # what the launching task reads back
            storage.atomic_write_json(os.path.join(local_path(args.output), RESULT_FILE), result.__dict__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
