"""Stage 3: fine-tune the U-Net with the denoising loss plus the grounding losses.

One loop for every setting: CPU, one GPU or ``accelerate launch`` with several
processes; latent (VAE) or pixel-space models; epsilon, v or sample prediction;
mixed precision, gradient checkpointing, accumulation, clipping, EMA, any
diffusers lr schedule. Per step::

    L = L_denoise + sum_g w_g (lambda * L_token(g) + gamma * L_pixel(g))

over the supervised groups g (``attention.supervised_groups``). Only those
groups' cross-attention layers run the capturing processor; with both weights
at 0 the step is a plain fine-tune with fused attention everywhere.

Output folder::

    unet/                        final U-Net (EMA weights when EMA is on), safetensors
    checkpoints/checkpoint-<N>/  unet/, optimizer.pt, lr_scheduler.pt, ema.pt, rng-<rank>.pt, state.json,
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
        --cache runs/sd14/masks --output runs/sd14/train/ddp
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m tokencompose_core.train ...

(accelerate 1.x's ``--cpu`` flag alone starts one process unless mpirun is set up.)
Every process draws its own share of each epoch's permutation; the losses in
metrics.jsonl are those of process 0.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import os
import posixpath
import pickle
import random
import shutil
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from tokencompose_core import outputs, storage
from tokencompose_core.attention import AttentionCapture, supervised_groups
from tokencompose_core.config import PipelineConfig, load_config
from tokencompose_core.data import GroundingDataset, ResumableBatchSampler, collate, training_image_ids
from tokencompose_core.losses import grounding_losses
from tokencompose_core.mask_cache import MaskCache
from tokencompose_core.models import load_diffusion, resolve_diffusion_dir

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    output_uri: str
    unet_uri: str
    global_step: int
    final_losses: dict[str, float]  # mean of the last steps' logged losses


# ----------------------------------------------------------------------------- text


class TextEmbedder:
    """Caption -> (77, D) embeddings of the frozen text encoder, cached per caption when asked."""

    def __init__(self, text_encoder: torch.nn.Module, tokenizer, device: torch.device, cache: bool) -> None:
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.device = device
        self._cache: dict[str, torch.Tensor] | None = {} if cache else None

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def __call__(self, captions: list[str]) -> torch.Tensor:
        if self._cache is None:
            return self._encode(captions)
        missing = sorted(set(captions) - self._cache.keys())
        if missing:
            for caption, embedding in zip(missing, self._encode(missing)):
                self._cache[caption] = embedding
        return torch.stack([self._cache[caption] for caption in captions])


# ----------------------------------------------------------------------------- checkpoints


def _local_path(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    if not storage._is_local(fs):
        raise ValueError(
            f"training output {uri!r} must be a local or mounted path: checkpoints are published "
            "by renaming a finished folder, which object stores cannot do atomically"
        )
    return path


def checkpoint_steps(output_dir: str) -> list[int]:
    """Steps of the complete checkpoints in ``output_dir``, ascending."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        if name.startswith(CHECKPOINT_PREFIX) and os.path.isfile(os.path.join(root, name, "state.json")):
            steps.append(int(name[len(CHECKPOINT_PREFIX) :]))
    return sorted(steps)


def _remove_checkpoint(path: str) -> None:
    """Unlist a checkpoint with one rename to a ``.tmp-`` name, then delete it: a run killed
    half-way through the deletion must not leave a listed checkpoint with files missing."""
    if os.path.isdir(path):
        doomed = os.path.join(os.path.dirname(path), f".tmp-removed-{os.path.basename(path)}-{uuid.uuid4().hex}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _remove_partial_checkpoints(output_dir: str) -> None:
    """Delete temporary folders a killed run left behind (they are never resumed from)."""
    root = os.path.join(output_dir, "checkpoints")
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"{CHECKPOINT_PREFIX}{step}")


def _torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _load_torch(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)


def _rng_state(noise: torch.Generator) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "noise": noise.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, noise: torch.Generator) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    noise.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Trainer:
    """What a checkpoint holds, besides the data position (derived from the step)."""

    accelerator: Accelerator
    unet: torch.nn.Module  # prepared (possibly DDP-wrapped)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel | None
    noise: torch.Generator

    def save(self, output_dir: str, step: int, state: dict, keep: int | None) -> None:
        """Write checkpoint-<step> atomically (all processes call this)."""
        acc = self.accelerator
        final = checkpoint_dir(output_dir, step)
        temp = os.path.join(output_dir, "checkpoints", f".tmp-{CHECKPOINT_PREFIX}{step}")
        if acc.is_main_process:
            shutil.rmtree(temp, ignore_errors=True)
            os.makedirs(temp)
        acc.wait_for_everyone()
        storage.atomic_write_bytes(
            os.path.join(temp, f"rng-{acc.process_index}.pt"), _torch_bytes(_rng_state(self.noise))
        )
        acc.wait_for_everyone()
        if acc.is_main_process:
            acc.unwrap_model(self.unet).save_pretrained(os.path.join(temp, "unet"), safe_serialization=True)
            storage.atomic_write_bytes(os.path.join(temp, "optimizer.pt"), _torch_bytes(self.optimizer.state_dict()))
            storage.atomic_write_bytes(
                os.path.join(temp, "lr_scheduler.pt"), _torch_bytes(self.lr_scheduler.state_dict())
            )
            if self.ema is not None:
                storage.atomic_write_bytes(os.path.join(temp, "ema.pt"), _torch_bytes(self.ema.state_dict()))
            storage.atomic_write_json(os.path.join(temp, "state.json"), {**state, "global_step": step})
            outputs.write_manifest(temp)  # last: it vouches for every file above, every process's RNG too
            _remove_checkpoint(final)
            os.replace(temp, final)
            for old in checkpoint_steps(output_dir)[: -keep] if keep else []:
                _remove_checkpoint(checkpoint_dir(output_dir, old))
        acc.wait_for_everyone()

    def restore(self, checkpoint: "_Checkpoint") -> dict:
        """Restore everything but the U-Net weights (loaded with the model) from a read checkpoint."""
        states = checkpoint.states
        self.optimizer.load_state_dict(states["optimizer"])
        self.lr_scheduler.load_state_dict(states["lr_scheduler"])
        if self.ema is not None:
            if "ema" in states:
                self.ema.load_state_dict(states["ema"])
                self.ema.to(self.accelerator.device)
            else:
                logger.warning("checkpoint %s has no EMA state; EMA restarts from the current weights",
                               checkpoint.path)
        if "rng" in states:
            _set_rng_state(states["rng"], self.noise)
        else:  # resumed on more processes than saved: data order is still exact, noise is not
            logger.warning("no RNG state for process %d in %s", self.accelerator.process_index, checkpoint.path)
        return checkpoint.state


class CheckpointError(RuntimeError):
    """Checkpoints exist but none is whole; the message names each one and what is wrong with it."""


@dataclass
class _Checkpoint:
    """A checkpoint verified and read before the model is built, so a damaged one is passed over."""

    path: str
    state: dict  # state.json
    states: dict  # "optimizer", "lr_scheduler", "ema", "rng" (this process's) -> loaded state


class _Damaged(Exception):
    """A checkpoint file that does not load; the message names the file."""


# What a damaged file raises on load: pickle/zip errors, truncated data, unreadable or missing files.
_LOAD_ERRORS = (pickle.UnpicklingError, SafetensorError, RuntimeError, EOFError, OSError, ValueError, KeyError,
                TypeError)


def _read_checkpoint(path: str, process_index: int) -> _Checkpoint:
    """Load a checkpoint's states (and the U-Net files' headers); :class:`_Damaged` names the file that fails."""
    files = {"optimizer": "optimizer.pt", "lr_scheduler": "lr_scheduler.pt", "ema": "ema.pt",
             "rng": f"rng-{process_index}.pt"}
    optional = {"ema", "rng"}  # EMA off; resumed on more processes than saved
    states = {}
    current = os.path.join(path, "state.json")
    try:
        state = storage.read_json(current)
        for key, name in files.items():
            current = os.path.join(path, name)
            if key in optional and not os.path.isfile(current):
                continue
            states[key] = _load_torch(current)
        for current in sorted(glob.glob(os.path.join(path, "unet", "*.safetensors"))) or [os.path.join(path, "unet")]:
            with safe_open(current, framework="pt") as weights:  # reads the header only
                weights.keys()
        current = os.path.join(path, "unet", "config.json")
        storage.read_json(current)
    except _LOAD_ERRORS as error:
        raise _Damaged(f"{current}: {type(error).__name__}: {error}".splitlines()[0]) from error
    return _Checkpoint(path, state, states)


def _checkpoint_problems(path: str) -> list[str]:
    if not outputs.has_manifest(path):
        # Written before checkpoints had manifests: only a failed load can show damage.
        logger.warning("checkpoint %s has no %s; resuming from it unverified", path, outputs.MANIFEST_NAME)
        return []
    return outputs.verify_manifest(path, deep=True)


def _resume_checkpoint(output_dir: str, enabled: bool, process_index: int) -> _Checkpoint | None:
    """The newest whole checkpoint, read; damaged newer ones are passed over with a warning.

    Raises :class:`CheckpointError` when checkpoints exist but none is whole.
    """
    damaged = []
    for step in reversed(checkpoint_steps(output_dir) if enabled else []):
        path = checkpoint_dir(output_dir, step)
        problems = _checkpoint_problems(path)
        if not problems:
            try:
                return _read_checkpoint(path, process_index)
            except _Damaged as error:
                problems = [str(error)]
        logger.warning("checkpoint %s is damaged, trying an older one: %s", path, "; ".join(problems))
        damaged.append(f"{path} ({'; '.join(problems)})")
    if damaged:
        raise CheckpointError(f"no whole checkpoint to resume from: {', '.join(damaged)}; "
                              "delete them, or set train.resume=false to start over")
    return None


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
    """Per-step records kept in memory and republished atomically as JSON lines."""

    def __init__(self, uri: str, resume_step: int) -> None:
        self.uri = uri
        self.records: list[dict] = []
        if resume_step and storage.exists(uri):
            lines = storage.read_bytes(uri).decode("utf-8").splitlines()
            # Steps after the checkpoint are redone, so their old records go.
            self.records = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= resume_step]

    def append(self, record: dict) -> None:
        self.records.append(record)

    def flush(self) -> None:
        text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in self.records)
        storage.atomic_write_bytes(self.uri, text.encode("utf-8"))

    def final_losses(self, last: int = 10) -> dict[str, float]:
        tail = self.records[-last:]
        if not tail:
            return {}
        keys = [key for key in tail[-1] if key == "loss" or key.startswith(("denoise", "token/", "pixel/"))]
        return {key: float(np.mean([r[key] for r in tail if key in r])) for key in keys}


def plot_loss_curve(records: list[dict], uri: str) -> None:
    """Denoising, token and pixel losses against the step, smoothed, as a PNG."""
    from tokencompose_core.reports import pyplot, save_figure

    plt = pyplot()

    steps = np.array([r["step"] for r in records])
    keys = [k for k in records[-1] if k.startswith(("denoise", "token/", "pixel/"))]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    window = max(1, len(records) // 50)
    for axis, prefix in zip(axes, ("denoise", "token/", "pixel/")):
        for key in (k for k in keys if k.startswith(prefix)):
            values = np.array([r.get(key, np.nan) for r in records], dtype=float)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(steps[window - 1 :], smooth, label=key)
        axis.set_title(prefix.rstrip("/") + " loss")
        axis.set_xlabel("step")
        if axis.lines:
            axis.legend(fontsize=7)
    save_figure(figure, uri)


def _tensorboard(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional extra
        return None
    return SummaryWriter(log_dir)


# ----------------------------------------------------------------------------- the step


@dataclass
class _Model:
    """Frozen parts and fixed settings the step needs."""

    unet: torch.nn.Module
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
    pixels = batch.pixel_values.to(device, dtype=model.weight_dtype, non_blocking=True)
    with torch.no_grad():
        if model.vae is None:
            latents = pixels.float()
        else:
            posterior = model.vae.encode(pixels).latent_dist
            latents = posterior.sample(generator=generator).float() * model.latent_scaling
    size = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (size,), generator=generator)
    dropped = torch.rand(size, generator=generator) < model.caption_dropout
    captions = ["" if drop else caption for drop, caption in zip(dropped.tolist(), batch.captions)]
    # A dropped caption has no noun tokens left to ground.
    positions = batch.token_positions.masked_fill(dropped[:, None, None], -1)
    timesteps = timesteps.to(device)
    noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_states = model.embed(captions).to(device, dtype=model.weight_dtype)
    if model.capture is not None:
        model.capture.clear()
        # Only the nouns' columns are captured; positions now index those columns.
        positions = model.capture.capture_tokens(positions.to(device))
    prediction = model.unet(noisy, timesteps, encoder_states).sample
    denoise = F.mse_loss(prediction.float(), _targets(model, latents, noise, timesteps).float())
    losses = {"denoise": denoise}
    total = denoise
    if model.capture is not None:
        masks = batch.masks.to(device, non_blocking=True)
        for group, maps in model.capture.maps().items():
            token, pixel = grounding_losses(maps, masks, positions)
            weight = model.group_weights.get(group, 1.0)
            total = total + weight * (model.token_weight * token + model.pixel_weight * pixel)
            losses[f"token/{group}"] = token
            losses[f"pixel/{group}"] = pixel
    losses["loss"] = total
    return losses


# ----------------------------------------------------------------------------- setup


def _groups(unet: torch.nn.Module, config: PipelineConfig, latent_side: int) -> dict[str, list[str]]:
    cfg = config.train
    if cfg.token_loss_weight == 0 and cfg.pixel_loss_weight == 0:
        return {}
    groups = supervised_groups(unet, list(cfg.grounding.layers), latent_side)
    unknown = set(cfg.grounding.group_weights) - set(groups)
    if unknown:
        raise ValueError(f"train.grounding.group_weights names unknown groups {sorted(unknown)}; "
                         f"this model at resolution {cfg.resolution} has {sorted(groups)}")
    return {name: layers for name, layers in groups.items() if cfg.grounding.group_weights.get(name, 1.0) > 0}


def _drop_load_path(config_path: str) -> None:
    """Remove ``_name_or_path`` (where the weights were loaded from: the base model, or a
    checkpoint when a lost ``unet/`` is restored) so the published U-Net's bytes depend
    on its weights and architecture alone, and its content identity with them."""
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config.pop("_name_or_path", None)
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _publish_unet(unet: torch.nn.Module, output_dir: str) -> str:
    """Save the final U-Net to <output>/unet by renaming a finished folder over the old one."""
    final = os.path.join(output_dir, "unet")
    temp = os.path.join(output_dir, f".tmp-unet-{uuid.uuid4().hex}")
    unet.save_pretrained(temp, safe_serialization=True)
    _drop_load_path(os.path.join(temp, "config.json"))
    old = None
    if os.path.exists(final):
        old = os.path.join(output_dir, f".old-unet-{uuid.uuid4().hex}")
        os.replace(final, old)
    os.replace(temp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return final


def run_folder(config: PipelineConfig, fingerprint: str, cache_identity: str) -> str:
    """``<root>/train/<train.run_name>``, else ``run-<key>`` from the training fingerprint and
    the mask cache's content."""
    if config.train.run_name:
        return storage.join(config.storage.root, "train", config.train.run_name)
    return outputs.output_folder(config, "train", "run", [fingerprint, cache_identity])


def result_files(output_uri: str) -> list[str]:
    """A finished run's result, relative to its folder: the final ``unet/`` and the metrics
    (checkpoints are the way there, not the result)."""
    fs, base = storage.filesystem(output_uri)
    unet = [posixpath.relpath(path, base) for path in sorted(fs.find(posixpath.join(base, "unet")))]
    return unet + [name for name in ("metrics.jsonl", "loss_curve.png") if fs.exists(posixpath.join(base, name))]


def _config_digest(config: PipelineConfig) -> dict:
    """Settings that must match for a resumed run to continue the same data order."""
    cfg = config.train
    return {"batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "seed": cfg.seed, "resolution": cfg.resolution}


def train(
    config: PipelineConfig,
    cache_uri: str,
    output_uri: str,
    init_unet: str | None = None,
    model_dir: str | None = None,
) -> TrainResult:
    """Fine-tune the U-Net on the mask cache at ``cache_uri``; write the run to ``output_uri``.

    ``model_dir``: diffusers model folder (default: ``train.init_model`` or the
    profile's model); ``init_unet``: a trained ``unet/`` folder to start from.
    Resumes from the newest checkpoint in ``output_uri`` when ``train.resume``.
    """
    cfg = config.train
    output_dir = _local_path(output_uri)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps
    )
    device = accelerator.device
    weight_dtype = _DTYPES[cfg.mixed_precision]
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # same initial state on every process

    if accelerator.is_main_process:
        _remove_partial_checkpoints(output_dir)
    resume = _resume_checkpoint(output_dir, cfg.resume, accelerator.process_index)
    model_dir = model_dir or cfg.init_model or resolve_diffusion_dir(config.models)
    unet_dir = os.path.join(resume.path, "unet") if resume else init_unet
    parts = load_diffusion(model_dir, unet_dir=unet_dir, device=device, dtype=torch.float32)
    unet = parts.unet
    unet.train().requires_grad_(True)
    for frozen in (parts.vae, parts.text_encoder):
        if frozen is not None:
            frozen.requires_grad_(False).eval().to(device, dtype=weight_dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    latent_side = cfg.resolution // parts.vae_scale_factor
    groups = _groups(unet, config, latent_side)
    capture = AttentionCapture(unet, groups) if groups else None

    # The fused kernel updates every parameter in one pass: 5-10% faster steps on the demo model (CPU).
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, fused=device.type in ("cpu", "cuda"),
    )
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
    )
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, foreach=True) if cfg.ema_decay else None
    if ema is not None:
        ema.to(device)
    prepared_unet, optimizer = accelerator.prepare(unet, optimizer)
    noise = torch.Generator().manual_seed(cfg.seed * 1_000_003 + accelerator.process_index)
    trainer = _Trainer(accelerator, prepared_unet, optimizer, lr_scheduler, ema, noise)

    global_step = 0
    if resume:
        state = trainer.restore(resume)
        global_step = int(state["global_step"])
        if state.get("config") != _config_digest(config):
            logger.warning("resuming %s with different settings %s (was %s): the data order changes",
                           resume.path, _config_digest(config), state.get("config"))
        logger.info("resumed from %s at step %d", resume.path, global_step)

    cache = MaskCache(cache_uri, max_cached_shards=1_000_000)  # shard tables hold RLE text only
    heldout = config.score.heldout_images if cfg.exclude_heldout else 0
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
        unet=prepared_unet, vae=parts.vae, latent_scaling=parts.latent_scaling,
        embed=TextEmbedder(parts.text_encoder, parts.tokenizer, device, cfg.cache_text_embeddings),
        noise_scheduler=DDPMScheduler.from_config(parts.scheduler.config), capture=capture,
        group_weights=dict(cfg.grounding.group_weights), token_weight=cfg.token_loss_weight,
        pixel_weight=cfg.pixel_loss_weight, caption_dropout=cfg.caption_dropout, weight_dtype=weight_dtype,
    )
    metrics = MetricsLog(storage.join(output_uri, "metrics.jsonl"), global_step) if accelerator.is_main_process else None
    resumed_at = global_step
    global_step = _loop(config, trainer, model, loader, metrics, output_dir, global_step)

    unet_uri = storage.join(output_uri, "unet")
    final_losses: dict[str, float] = {}
    # A rerun of a finished run trains no step: its published U-Net is already this
    # checkpoint's, and republishing identical weights would only move their identity.
    finished_before = global_step == resumed_at and os.path.isfile(os.path.join(output_dir, "unet", "config.json"))
    if accelerator.is_main_process and finished_before:
        final_losses = metrics.final_losses()
    elif accelerator.is_main_process:
        final = accelerator.unwrap_model(prepared_unet)
        if ema is not None:
            ema.copy_to(final.parameters())  # the EMA weights are the result
        if capture is not None:
            capture.remove()  # the saved model must not reference our processor
        _publish_unet(final, output_dir)
        if metrics.records:
            plot_loss_curve(metrics.records, storage.join(output_uri, "loss_curve.png"))
        final_losses = metrics.final_losses()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_uri=output_uri, unet_uri=unet_uri, global_step=global_step, final_losses=final_losses)


def _loop(config: PipelineConfig, trainer: _Trainer, model: _Model, loader, metrics: MetricsLog | None,
          output_dir: str, global_step: int) -> int:
    """Optimizer steps until ``max_steps``; checkpoints and logs along the way."""
    cfg = config.train
    acc = trainer.accelerator
    if global_step >= cfg.max_steps:
        return global_step
    writer = _tensorboard(os.path.join(output_dir, "tensorboard")) if acc.is_main_process else None
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
            trainer.ema.step(acc.unwrap_model(trainer.unet).parameters())
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
            trainer.save(output_dir, global_step, {"config": _config_digest(config)}, cfg.checkpoints_total_limit)
        if global_step >= cfg.max_steps:
            break
    progress.close()
    if writer is not None:
        writer.close()
    return global_step


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``accelerate launch -m tokencompose_core.train`` (no Prefect)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--profile", default="tiny")
    parser.add_argument("--cache", required=True, help="mask cache URI")
    parser.add_argument("--output", required=True, help="run folder (local or mounted path)")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--init-unet", default=None)
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.profile, args.overrides)
    result = train(config, args.cache, args.output, init_unet=args.init_unet, model_dir=args.model_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.__dict__, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
